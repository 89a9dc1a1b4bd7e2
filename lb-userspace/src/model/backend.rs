//! A backend of a service and its lifecycle.
//!
//! ```text
//!            add                      remove (on-remove policy)
//!   ───────────────► up ─────────────────────────────────────────┐
//!                    │ ▲                                         ▼
//!   health fails     │ │ health passes again        reset:  removed (flows reset, id freed once empty)
//!   (on-unhealthy)   ▼ │                            drain:  draining ──deadline──► removed
//!                   down (reset) / draining (drain, keep)   keep:   draining (until its flows end)
//! ```
//!
//! What each state means to the data plane (`Backend::state`): up takes
//! new and existing flows; draining only existing ones; down and removed
//! none (a packet of one of their flows is answered with a RST). The
//! effects of a transition (a ring rebuild, the new data-plane state, a
//! reset of the backend's flows) are carried out by the controller.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lb_common::maps::{BACKEND_DOWN, BACKEND_DRAINING, BACKEND_REMOVED, BACKEND_UP, Backend, addr_from_ip};

use super::{be_port, settings::FlowPolicy};

/// Consecutive results of one backend's health probes.
#[derive(Clone, Debug)]
pub struct Tracker {
    pub healthy: bool,
    pub ok_streak: u32,
    pub fail_streak: u32,
    pub last_error: Option<String>,
    pub checks: u64,
}

impl Default for Tracker {
    /// Backends start healthy: a new backend takes traffic at once, and a
    /// failing one is taken out after `fall` failures.
    fn default() -> Self {
        Tracker { healthy: true, ok_streak: 0, fail_streak: 0, last_error: None, checks: 0 }
    }
}

impl Tracker {
    /// Records one result; returns the new health when it changes.
    pub fn record(&mut self, result: Result<(), String>, rise: u32, fall: u32) -> Option<bool> {
        self.checks += 1;
        match result {
            Ok(()) => {
                self.ok_streak += 1;
                self.fail_streak = 0;
                if !self.healthy && self.ok_streak >= rise {
                    self.healthy = true;
                    self.last_error = None;
                    return Some(true);
                }
            }
            Err(e) => {
                self.fail_streak += 1;
                self.ok_streak = 0;
                self.last_error = Some(e);
                if self.healthy && self.fail_streak >= fall {
                    self.healthy = false;
                    return Some(false);
                }
            }
        }
        None
    }
}

/// A backend no longer taking new flows whose flows go on for a while.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drain {
    /// `None`: keep (until its flows end).
    pub deadline: Option<Instant>,
}

impl Drain {
    /// The drain a policy asks for (`None` for reset).
    pub fn of(policy: FlowPolicy, now: Instant) -> Option<Drain> {
        match policy {
            FlowPolicy::Reset => None,
            FlowPolicy::Drain(d) => Some(Drain { deadline: Some(now + d) }),
            FlowPolicy::Keep => Some(Drain { deadline: None }),
        }
    }

    pub fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }
}

/// Where a backend is in its lifecycle (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    Up,
    Draining,
    Down,
    Removed,
}

impl Lifecycle {
    pub const fn name(self) -> &'static str {
        match self {
            Lifecycle::Up => "up",
            Lifecycle::Draining => "draining",
            Lifecycle::Down => "down",
            Lifecycle::Removed => "removed",
        }
    }

    /// The data plane's `Backend::state`.
    pub const fn dp_state(self) -> u8 {
        match self {
            Lifecycle::Up => BACKEND_UP,
            Lifecycle::Draining => BACKEND_DRAINING,
            Lifecycle::Down => BACKEND_DOWN,
            Lifecycle::Removed => BACKEND_REMOVED,
        }
    }
}

/// A backend of a service.
#[derive(Clone, Debug)]
pub struct BackendSlot {
    /// Index of `XLB_BACKENDS` (and of its counters).
    pub id: u32,
    pub addr: SocketAddr,
    /// Full NAT: the balancer's source address towards the backend (DSR:
    /// the outer header's source; unspecified in DNAT mode).
    pub snat: IpAddr,
    pub weight: u32,
    /// False once deregistered (kept while it still has flows).
    pub registered: bool,
    pub health: Tracker,
    pub drain: Option<Drain>,
    /// When the backend joined or came back up (slow start origin).
    pub up_since: Instant,
}

impl BackendSlot {
    pub fn new(id: u32, addr: SocketAddr, snat: IpAddr, weight: u32, now: Instant) -> BackendSlot {
        BackendSlot { id, addr, snat, weight, registered: true, health: Tracker::default(), drain: None, up_since: now }
    }

    pub fn lifecycle(&self) -> Lifecycle {
        if self.drain.is_some() {
            Lifecycle::Draining
        } else if !self.registered {
            Lifecycle::Removed
        } else if !self.health.healthy {
            Lifecycle::Down
        } else {
            Lifecycle::Up
        }
    }

    pub fn takes_new_flows(&self) -> bool {
        self.lifecycle() == Lifecycle::Up
    }

    /// The backend's data-plane entry (`mss_clamp`: its service's, 0 for none).
    pub fn entry(&self, service_id: u32, mss_clamp: u16) -> Backend {
        Backend {
            addr: addr_from_ip(self.addr.ip()),
            snat_addr: addr_from_ip(self.snat),
            port: be_port(self.addr.port()),
            state: self.lifecycle().dp_state(),
            _pad: 0,
            weight: self.weight,
            service_id,
            mss_clamp,
            _pad2: 0,
        }
    }

    /// Deregistration under `policy`: no new flows; returns whether its
    /// flows are to be reset now (policy reset), else they drain.
    pub fn deregister(&mut self, policy: FlowPolicy, now: Instant) -> bool {
        self.registered = false;
        self.drain = Drain::of(policy, now);
        self.drain.is_none()
    }

    /// A health result; `Some(true)` when it just came back up,
    /// `Some(false)` when it just went down (then, under a reset policy,
    /// its flows are to be reset).
    pub fn health_result(&mut self, result: Result<(), String>, rise: u32, fall: u32, policy: FlowPolicy, now: Instant) -> Option<bool> {
        let changed = self.health.record(result, rise, fall)?;
        if changed {
            self.drain = None;
            self.up_since = now;
        } else {
            self.drain = Drain::of(policy, now);
        }
        Some(changed)
    }

    /// The weight the ring is built with. With slow start on (`ramp` not
    /// zero) weights are counted in tenths, so a backend of any weight (1
    /// included) ramps from a tenth of it to all of it in ten steps over
    /// `ramp` (steps: the ring is rebuilt ten times, not constantly).
    pub fn effective_weight(&self, now: Instant, ramp: Duration) -> u32 {
        if ramp.is_zero() {
            return self.weight;
        }
        let elapsed = now.saturating_duration_since(self.up_since);
        if elapsed >= ramp {
            return self.weight.saturating_mul(10);
        }
        let step = (elapsed.as_nanos() * 10 / ramp.as_nanos()) as u32 + 1; // 1..=10
        self.weight.saturating_mul(step)
    }

    /// A stable identity for Maglev: address and port, so every balancer
    /// (and every restart) builds the same table.
    pub fn maglev_identity(&self) -> u64 {
        let a = self.addr;
        let ip = match a.ip() {
            IpAddr::V4(v4) => u32::from(v4) as u64,
            // Folded to 64 bits; the identity only seeds the permutation.
            IpAddr::V6(v6) => {
                let v = u128::from(v6);
                (v as u64) ^ ((v >> 64) as u64).rotate_left(17)
            }
        };
        ip << 16 ^ a.port() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot() -> BackendSlot {
        BackendSlot::new(3, "10.1.1.2:8080".parse().expect("addr"), "0.0.0.0".parse().expect("ip"), 4, Instant::now())
    }

    #[test]
    fn fall_takes_down_and_rise_brings_back() {
        let mut t = Tracker::default();
        assert_eq!(t.record(Err("x".into()), 2, 3), None);
        assert_eq!(t.record(Err("x".into()), 2, 3), None);
        assert_eq!(t.record(Err("x".into()), 2, 3), Some(false));
        assert_eq!(t.record(Err("x".into()), 2, 3), None, "already down");
        assert_eq!(t.record(Ok(()), 2, 3), None);
        assert_eq!(t.record(Err("x".into()), 2, 3), None, "a failure resets the rise streak");
        assert_eq!(t.record(Ok(()), 2, 3), None);
        assert_eq!(t.record(Ok(()), 2, 3), Some(true));
        assert!(t.healthy);
    }

    #[test]
    fn a_success_between_failures_resets_the_fall_streak() {
        let mut t = Tracker::default();
        t.record(Err("x".into()), 1, 2);
        t.record(Ok(()), 1, 2);
        assert_eq!(t.record(Err("x".into()), 1, 2), None);
        assert_eq!(t.record(Err("x".into()), 1, 2), Some(false));
    }

    #[test]
    fn lifecycle_follows_policies() {
        let now = Instant::now();
        let mut b = slot();
        assert_eq!(b.lifecycle(), Lifecycle::Up);
        assert_eq!(b.entry(1, 0).state, BACKEND_UP);
        assert!(!b.deregister(FlowPolicy::Drain(Duration::from_secs(5)), now), "drain: no reset now");
        assert_eq!(b.lifecycle(), Lifecycle::Draining);
        assert!(!b.drain.expect("drain").expired(now + Duration::from_secs(4)));
        assert!(b.drain.expect("drain").expired(now + Duration::from_secs(5)));
        b.drain = None;
        assert_eq!(b.lifecycle(), Lifecycle::Removed);
        assert_eq!(b.entry(1, 0).state, BACKEND_REMOVED);
        let mut b = slot();
        assert!(b.deregister(FlowPolicy::Reset, now), "reset: now");
        let mut b = slot();
        for _ in 0..2 {
            assert_eq!(b.health_result(Err("down".into()), 1, 3, FlowPolicy::Reset, now), None);
        }
        assert_eq!(b.health_result(Err("down".into()), 1, 3, FlowPolicy::Reset, now), Some(false));
        assert_eq!(b.lifecycle(), Lifecycle::Down);
        assert_eq!(b.health_result(Ok(()), 1, 3, FlowPolicy::Reset, now + Duration::from_secs(1)), Some(true));
        assert_eq!((b.lifecycle(), b.up_since), (Lifecycle::Up, now + Duration::from_secs(1)), "slow start begins again");
    }

    #[test]
    fn slow_start_ramps_in_ten_steps() {
        let now = Instant::now();
        let mut b = slot();
        b.weight = 1;
        b.up_since = now;
        let ramp = Duration::from_secs(10);
        // In tenths: a weight of 1 ramps too.
        assert_eq!(b.effective_weight(now, ramp), 1);
        assert_eq!(b.effective_weight(now + Duration::from_millis(5500), ramp), 6);
        assert_eq!(b.effective_weight(now + ramp, ramp), 10);
        assert_eq!(b.effective_weight(now, Duration::ZERO), 1);
        b.weight = 3;
        assert_eq!(b.effective_weight(now, ramp), 3);
        assert_eq!(b.effective_weight(now + ramp, ramp), 30);
    }
}
