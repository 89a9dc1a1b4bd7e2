//! The table snapshot: one walker reads the whole connection table
//! (batched, on its own thread, never the controller's), and from that one
//! pass come the figures every report reads (flows and active flows per
//! backend, entries per table), the expiry decisions and, for a sync
//! master, the refresh. Reports never walk the table on demand: a
//! `status` or a metrics scrape at a million flows costs what it costs at
//! ten.
//!
//! Expiry removes flows with [`FlowTable::remove_if_unchanged`]: a flow
//! that saw a packet after the walk (it revived) or a new connection on the
//! same 5-tuple is never removed by a decision made about the old one.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use lb_common::{
    maps::{FlowKey, PORTS_GRACE_NS, end_reason},
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
    /// Entries whose flow's other half is gone, idle past the established
    /// timeout (or of no service).
    pub orphans: Vec<FlowKey>,
    /// Full-NAT ports no flow of the walk held, past the grace of a flow
    /// being created: to confirm and give back.
    pub stale_ports: Vec<FlowKey>,
}

/// The idle limit of `flow` under `rules`.
fn limit(flow: &Flow, t: &Timeouts) -> Duration {
    if !flow.is_active() {
        CLOSED_LINGER
    } else if !flow.is_tcp() {
        t.udp.0
    } else {
        match flow.combined_state() {
            tcp::STATE_SYN | tcp::STATE_NONE => t.syn.0,
            tcp::STATE_FIN => t.closing.0,
            _ => t.established.0,
        }
    }
}

/// Walks the table once: the snapshot, the expiry decisions, and every
/// flow handed to `each` (a sync refresh, a listing). `now_ns` is
/// `CLOCK_MONOTONIC` (the data plane's clock).
pub fn walk(table: &dyn FlowTable, rules: &Rules, now_ns: u64, each: &mut dyn FnMut(&Flow)) -> Result<(Snapshot, Decisions)> {
    let started = Instant::now();
    let mut snap = Snapshot { taken_at: Some(started), ..Snapshot::default() };
    let mut d = Decisions::default();
    let mut reverse_keys: HashSet<FlowKey> = HashSet::new();
    let mut orphan_entries = Vec::new();
    let counts = table.walk(
        &mut |f: &Flow| {
            snap.flows += 1;
            let b = snap.by_backend.entry(f.backend_id()).or_default();
            b.total += 1;
            let active = f.is_active();
            if active {
                b.active += 1;
            }
            reverse_keys.insert(f.reverse_key);
            each(f);
            let idle = Duration::from_nanos(now_ns.saturating_sub(f.last_seen_ns()));
            let decided = FlowRef { flow: *f, idle: true };
            let Some(r) = rules.services.get(&f.service_id()) else {
                // A flow of a service that is gone.
                d.forget.push((FlowRef { flow: *f, idle: false }, end_reason::SERVICE_REMOVED));
                return;
            };
            if idle <= limit(f, &r.timeouts) {
                return;
            }
            if active && f.is_tcp() && r.reset_on_idle {
                d.reset.push((r.sid, decided));
            } else {
                d.forget.push((decided, if active { end_reason::IDLE } else { end_reason::FIN }));
            }
        },
        &mut |k, v| orphan_entries.push((*k, *v)),
    )?;
    for (k, v) in orphan_entries {
        let limit = rules.services.get(&v.service_id).map_or(Duration::ZERO, |r| r.timeouts.established.0);
        if Duration::from_nanos(now_ns.saturating_sub(v.last_seen_ns)) > limit {
            d.orphans.push(k);
        }
    }
    table.for_each_port(&mut |k, allocated_ns| {
        if now_ns.saturating_sub(allocated_ns) > PORTS_GRACE_NS && !reverse_keys.contains(k) {
            d.stale_ports.push(*k);
        }
    })?;
    snap.counts = counts;
    snap.took = started.elapsed();
    Ok((snap, d))
}

/// What an expiry pass removed.
#[derive(Clone, Debug, Default)]
pub struct Expired {
    /// Flows forgotten, with their flow-log reason, by service id.
    pub forgotten: Vec<(Flow, u32)>,
    pub orphans: usize,
    pub ports_released: usize,
}

/// Carries out the quiet part of `d` (the resets go to the reset worker):
/// each flow is removed only if it is still as the walk saw it.
pub fn expire(table: &dyn FlowTable, d: &Decisions) -> Result<Expired> {
    let mut out = Expired::default();
    let refs: Vec<FlowRef> = d.forget.iter().map(|(r, _)| *r).collect();
    for chunk in refs.chunks(4096) {
        for f in table.remove_if_unchanged(chunk)? {
            let reason = d.forget.iter().find(|(r, _)| r.flow.key == f.key).map_or(end_reason::IDLE, |(_, why)| *why);
            out.forgotten.push((f, reason));
        }
    }
    if !d.orphans.is_empty() {
        out.orphans = table.remove_keys(&d.orphans)?;
    }
    let mut stale = Vec::new();
    for k in &d.stale_ports {
        if !table.port_in_use(k)? {
            stale.push(*k);
        }
    }
    if !stale.is_empty() {
        out.ports_released = table.ports_release(&stale)?;
    }
    Ok(out)
}

/// The monotonic clock the data plane stamps flows with
/// (`bpf_ktime_get_coarse_ns` reads `CLOCK_MONOTONIC`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Flows for tests.
#[cfg(test)]
pub mod tests_support {
    use super::*;
    use lb_common::maps::{DIR_TO_BACKEND, DIR_TO_CLIENT, FlowEntry, PROTO_TCP, addr_v4};

    /// A DNAT flow from 10.0.0.2:`port` to 10.99.0.1:80 on backend
    /// `backend_id` (10.1.1.2:8080) of service id 0, created at 1 ns.
    pub fn flow(port: u16, backend_id: u32, state: u8, last_seen_ns: u64) -> Flow {
        let key = FlowKey {
            src_addr: addr_v4(0x0200000a),
            dst_addr: addr_v4(0x0100630a),
            src_port: port.to_be(),
            dst_port: 80u16.to_be(),
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        let fwd = FlowEntry {
            nat_src: key.src_addr,
            nat_dst: addr_v4(0x0201010a),
            nat_sport: key.src_port,
            nat_dport: 8080u16.to_be(),
            direction: DIR_TO_BACKEND,
            tcp_state: state,
            backend_id,
            service_id: 0,
            created_ns: 1,
            last_seen_ns,
            ..Default::default()
        };
        let mut rev = FlowEntry::default();
        rev.fill_reverse_of(&key, &fwd, last_seen_ns);
        rev.tcp_state = state;
        rev.direction = DIR_TO_CLIENT;
        Flow::joined(key, fwd, Some(rev), false)
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
        Rules { services: HashMap::from([(0, ServiceRules { sid, timeouts: Timeouts::default(), reset_on_idle: false })]) }
    }

    fn table() -> FakeTable {
        FakeDataPlane::new(1024, 1024).table()
    }

    #[test]
    fn a_walk_counts_flows_per_backend_and_decides_what_expires() {
        let t = table();
        let now = 1_000 * 1_000_000_000u64;
        t.put(flow(1, 7, tcp::STATE_ESTABLISHED, now - 1_000_000_000));
        t.put(flow(2, 7, tcp::STATE_ESTABLISHED, now - 400 * 1_000_000_000));
        t.put(flow(3, 8, tcp::STATE_FIN, now - 3 * 1_000_000_000));
        let (snap, d) = walk(&t, &rules(), now, &mut |_| {}).expect("walk");
        assert_eq!(snap.flows, 3);
        assert_eq!(snap.backend(7), BackendFlows { active: 2, total: 2 });
        assert_eq!(snap.backend(8), BackendFlows { active: 0, total: 1 }, "both FINs: over");
        let forgotten: Vec<u16> = d.forget.iter().map(|(r, _)| u16::from_be(r.flow.key.src_port)).collect();
        assert_eq!(forgotten, vec![2, 3], "idle past 350 s, and closed past the linger");
        let e = expire(&t, &d).expect("expire");
        assert_eq!(e.forgotten.len(), 2);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_flow_that_revived_or_was_replaced_after_the_walk_is_not_removed() {
        let t = table();
        let now = 1_000 * 1_000_000_000u64;
        t.put(flow(1, 7, tcp::STATE_ESTABLISHED, now - 400 * 1_000_000_000));
        t.put(flow(2, 7, tcp::STATE_FIN, now - 10 * 1_000_000_000));
        let (_, d) = walk(&t, &rules(), now, &mut |_| {}).expect("walk");
        assert_eq!(d.forget.len(), 2);
        // After the walk: flow 1 sees a packet, flow 2's 5-tuple is reused
        // by a new connection.
        // (The data plane counts every packet; it moves `last_seen` only
        // every so often: the count is what tells.)
        let mut revived = flow(1, 7, tcp::STATE_ESTABLISHED, now - 400 * 1_000_000_000);
        revived.fwd.packets += 1;
        t.put(revived);
        let mut new = flow(2, 7, tcp::STATE_SYN, now + 1);
        new.fwd.created_ns = now + 1;
        t.put(new);
        let e = expire(&t, &d).expect("expire");
        assert!(e.forgotten.is_empty(), "{:?}", e.forgotten);
        assert_eq!(t.len(), 2, "the revived flow and the new connection stay");
    }
}
