//! The table snapshot: one walker reads the whole connection table
//! (batched, on its own thread, never the controller's), and from that one
//! pass come the figures every report reads (flows and active flows per
//! backend, flows per table, full-NAT ports held) and the expiry
//! decisions. Reports never walk the table on demand: a `status` or a
//! metrics scrape at a million flows costs what it costs at ten.
//!
//! Expiry removes flows with [`FlowTable::remove_if_unchanged`]: a flow
//! that saw a packet after the walk (it revived) or a new connection on the
//! same 5-tuple is never removed by a decision made about the old one.
//! Full-NAT ports need no expiry: the data plane takes a port back when it
//! finds its holder gone.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use lb_common::{
    maps::{Addr, FlowKey, end_reason},
    tcp,
};

use crate::{
    dataplane::{Flow, FlowRef, FlowTable, Result, TableCounts},
    model::{ServiceId, settings::Timeouts},
};

/// How long a finished flow (RST seen, or FIN from both sides) stays in the
/// table: long enough for the last ACK's retransmissions.
pub const CLOSED_LINGER: Duration = Duration::from_secs(2);

/// What a walk judges flows by: each service's timeouts (by service id).
#[derive(Clone, Debug, Default)]
pub struct Rules {
    pub services: HashMap<u32, ServiceRules>,
    /// Table entries created, as counted just before the walk (the
    /// controller adds the removals once it is over): with the entries the
    /// walk finds, what the LRU evicted.
    pub totals: EntryTotals,
}

/// Entries created and removed, as counted (see [`Rules::totals`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryTotals {
    pub created: u64,
    pub removed: u64,
}

#[derive(Clone, Debug)]
pub struct ServiceRules {
    pub sid: ServiceId,
    pub timeouts: Timeouts,
    pub reset_on_idle: bool,
}

/// Flows of one backend in a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendFlows {
    /// Not yet over (see [`Flow::is_active`]).
    pub active: u64,
    pub total: u64,
}

/// What one walk saw.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// When the walk started (monotonic).
    pub taken_at: Option<Instant>,
    pub took: Duration,
    pub counts: TableCounts,
    pub flows: u64,
    /// By backend id.
    pub by_backend: HashMap<u32, BackendFlows>,
    /// Full-NAT ports held by live flows, by backend (address and port as
    /// the maps hold them).
    pub ports: HashMap<(Addr, u16), u64>,
    /// The counts the walk started from ([`Rules::totals`]).
    pub totals: EntryTotals,
}

impl Snapshot {
    pub fn backend(&self, id: u32) -> BackendFlows {
        self.by_backend.get(&id).copied().unwrap_or_default()
    }
}

/// What expires, decided by a walk.
#[derive(Clone, Debug, Default)]
pub struct Decisions {
    /// Flows to forget quietly, with the flow-log reason.
    pub forget: Vec<(FlowRef, u32)>,
    /// Established TCP flows idle past their timeout whose service resets
    /// them (both ends get a RST).
    pub reset: Vec<(ServiceId, FlowRef)>,
}

/// The idle limit of `flow` under `rules`.
fn limit(flow: &Flow, t: &Timeouts) -> Duration {
    if !flow.is_active() {
        CLOSED_LINGER
    } else if !flow.is_tcp() {
        t.udp.0
    } else if flow.half_open {
        t.syn.0
    } else {
        match flow.combined_state() {
            tcp::STATE_SYN | tcp::STATE_NONE => t.syn.0,
            tcp::STATE_FIN => t.closing.0,
            _ => t.established.0,
        }
    }
}

/// How long `f` has been idle at `now` (jiffies, `hz` a second).
pub fn idle(f: &Flow, now: u32, hz: u32) -> Duration {
    let ticks = now.wrapping_sub(f.last_seen());
    // A flow stamped after `now` was read (it revived during the walk).
    if ticks > u32::MAX / 2 {
        return Duration::ZERO;
    }
    Duration::from_millis(ticks as u64 * 1000 / hz.max(1) as u64)
}

/// Walks the table once: the snapshot, the expiry decisions, and every
/// flow handed to `each` (a listing). `now` is the data plane's clock.
pub fn walk(table: &dyn FlowTable, rules: &Rules, now: u32, each: &mut dyn FnMut(&Flow)) -> Result<(Snapshot, Decisions)> {
    let started = Instant::now();
    let hz = table.hz();
    let mut snap = Snapshot { taken_at: Some(started), totals: rules.totals, ..Snapshot::default() };
    let mut d = Decisions::default();
    // Full-NAT flows by key: which port each holds (to count live ports).
    let mut holders: HashMap<FlowKey, (u32, u16)> = HashMap::new();
    let counts = table.walk(&mut |f: &Flow| {
        snap.flows += 1;
        let b = snap.by_backend.entry(f.backend_id()).or_default();
        b.total += 1;
        let active = f.is_active();
        if active {
            b.active += 1;
        }
        if f.is_fullnat() && active {
            holders.insert(f.key, (f.backend_id(), f.state.snat_port));
        }
        each(f);
        let decided = FlowRef { flow: *f, idle: true };
        let Some(r) = rules.services.get(&f.service_id()) else {
            // A flow of a service that is gone.
            d.forget.push((FlowRef { flow: *f, idle: false }, end_reason::SERVICE_REMOVED));
            return;
        };
        if idle(f, now, hz) <= limit(f, &r.timeouts) {
            return;
        }
        if active && f.is_tcp() && !f.half_open && r.reset_on_idle {
            d.reset.push((r.sid, decided));
        } else {
            d.forget.push((decided, if active { end_reason::IDLE } else { end_reason::FIN }));
        }
    })?;
    if !holders.is_empty() {
        table.for_each_port(&mut |k, owner| {
            if holders.get(&owner.flow).is_some_and(|(_, port)| *port == k.dst_port) {
                *snap.ports.entry((k.src_addr, k.src_port)).or_default() += 1;
            }
        })?;
    }
    snap.counts = counts;
    snap.took = started.elapsed();
    Ok((snap, d))
}

/// What an expiry pass removed.
#[derive(Clone, Debug, Default)]
pub struct Expired {
    /// Flows forgotten, with their flow-log reason.
    pub forgotten: Vec<(Flow, u32)>,
}

/// Carries out the quiet part of `d` (the resets go to the reset worker):
/// each flow is removed only if it is still as the walk saw it.
pub fn expire(table: &dyn FlowTable, d: &Decisions) -> Result<Expired> {
    let mut out = Expired::default();
    let reasons: HashMap<FlowKey, u32> = d.forget.iter().map(|(r, why)| (r.flow.key, *why)).collect();
    let refs: Vec<FlowRef> = d.forget.iter().map(|(r, _)| *r).collect();
    for chunk in refs.chunks(4096) {
        for f in table.remove_if_unchanged(chunk)? {
            let reason = reasons.get(&f.key).copied().unwrap_or(end_reason::IDLE);
            out.forgotten.push((f, reason));
        }
    }
    Ok(out)
}

/// Flows for tests.
#[cfg(test)]
pub mod tests_support {
    use super::*;
    use lb_common::maps::{FlowState, PROTO_TCP, TCPD_SEEN, TcpDir, addr_v4};

    /// A DNAT flow from 10.0.0.2:`port` to 10.99.0.1:80 on backend
    /// `backend_id` of service id 0, both sides in TCP `state`, created at
    /// jiffy 1, last seen at `last_seen` (jiffies).
    pub fn flow(port: u16, backend_id: u32, state: u8, last_seen: u32) -> Flow {
        let key = FlowKey::new(addr_v4(0x0200000a), addr_v4(0x0100630a), port.to_be(), 80u16.to_be(), PROTO_TCP);
        let side = |end: u32| TcpDir { end, maxend: end + 65535, maxwin: 65535, state, wscale: 0, flags: TCPD_SEEN, _pad: 0 };
        let state = FlowState {
            backend_id: backend_id as u16,
            created: 1,
            last_seen,
            packets_orig: 3,
            packets_reply: 2,
            orig: side(1001),
            reply: side(5001),
            ..FlowState::default()
        };
        Flow { key, state, half_open: false }
    }
}

#[cfg(test)]
mod tests {
    use super::{tests_support::flow, *};
    use crate::{
        dataplane::DataPlane,
        dataplane::fake::{FakeDataPlane, FakeTable},
        model::Proto,
    };

    fn rules() -> Rules {
        let sid = ServiceId { addr: "10.99.0.1:80".parse().expect("addr"), proto: Proto::Tcp };
        Rules { services: HashMap::from([(0, ServiceRules { sid, timeouts: Timeouts::default(), reset_on_idle: false })]), totals: EntryTotals::default() }
    }

    fn table() -> FakeTable {
        FakeDataPlane::new(1024, 1024).table()
    }

    /// The fake's clock runs at 1000 Hz: a jiffy is a millisecond.
    const S: u32 = 1000;

    #[test]
    fn a_walk_counts_flows_per_backend_and_decides_what_expires() {
        let t = table();
        let now = 1_000 * S;
        t.put(flow(1, 7, tcp::STATE_ESTABLISHED, now - S));
        t.put(flow(2, 7, tcp::STATE_ESTABLISHED, now - 400 * S));
        t.put(flow(3, 8, tcp::STATE_FIN, now - 3 * S));
        let (snap, d) = walk(&t, &rules(), now, &mut |_| {}).expect("walk");
        assert_eq!(snap.flows, 3);
        assert_eq!(snap.backend(7), BackendFlows { active: 2, total: 2 });
        assert_eq!(snap.backend(8), BackendFlows { active: 0, total: 1 }, "both FINs: over");
        let mut forgotten: Vec<u16> = d.forget.iter().map(|(r, _)| u16::from_be(r.flow.key.src_port)).collect();
        forgotten.sort_unstable();
        assert_eq!(forgotten, vec![2, 3], "idle past 350 s, and closed past the linger");
        let e = expire(&t, &d).expect("expire");
        assert_eq!(e.forgotten.len(), 2);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_flow_that_revived_or_was_replaced_after_the_walk_is_not_removed() {
        let t = table();
        let now = 1_000 * S;
        t.put(flow(1, 7, tcp::STATE_ESTABLISHED, now - 400 * S));
        t.put(flow(2, 7, tcp::STATE_FIN, now - 10 * S));
        let (_, d) = walk(&t, &rules(), now, &mut |_| {}).expect("walk");
        assert_eq!(d.forget.len(), 2);
        // After the walk: flow 1 sees a packet, flow 2's 5-tuple is reused
        // by a new connection. (The data plane counts every packet; it
        // moves `last_seen` only every so often: the count is what tells.)
        let mut revived = flow(1, 7, tcp::STATE_ESTABLISHED, now - 400 * S);
        revived.state.packets_orig += 1;
        t.put(revived);
        let mut new = flow(2, 7, tcp::STATE_SYN, now + 1);
        new.state.created = now + 1;
        t.put(new);
        let e = expire(&t, &d).expect("expire");
        assert!(e.forgotten.is_empty(), "{:?}", e.forgotten);
        assert_eq!(t.len(), 2, "the revived flow and the new connection stay");
    }

    #[test]
    fn idle_time_survives_the_clock_wrapping() {
        let f = flow(1, 7, tcp::STATE_ESTABLISHED, u32::MAX - 500);
        assert_eq!(idle(&f, 499, 1000), Duration::from_secs(1));
        assert_eq!(idle(&f, u32::MAX - 600, 1000), Duration::ZERO, "seen after the walk's clock reading");
    }
}
