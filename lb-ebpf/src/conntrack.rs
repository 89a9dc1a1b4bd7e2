//! The connection table: lookup, creation of a new flow's two entries, and
//! per-packet state upkeep (TCP state, next expected sequence number, last
//! seen).

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_coarse_ns};
use lb_common::{
    maps::{
        Backend, DIR_TO_BACKEND, FlowEnd, FlowEntry, FlowKey, LAST_SEEN_GRANULARITY_NS, NAT_DST, NAT_ENCAP, NAT_FULL, NAT_SRC, PROTO_TCP, SVC_F_DSR,
        ServiceEntry,
    },
    tcp,
};

use crate::{
    maps::{CONNS, FLOW_EVENTS, HALF_OPEN, PORTS, SCRATCH},
    parse::Packet,
};

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Where a flow's entries live.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Established,
    HalfOpen,
}

/// Finds a packet's entry: the connection table first, then the half-open
/// table (only packets that miss the first pay for the second lookup).
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<(*mut FlowEntry, Table)> {
    if let Some(e) = CONNS.get_ptr_mut(key) {
        return Some((e, Table::Established));
    }
    HALF_OPEN.get_ptr_mut(key).map(|e| (e, Table::HalfOpen))
}

/// Moves a flow whose handshake just completed (the client's first
/// non-SYN segment) from the half-open table to the connection table.
/// `fwd` is the client → VIP entry, already updated for this packet.
/// A TCP flow is reported new here, not at its SYN (flow logs with new
/// records, the sync peer): a SYN flood reaches neither.
#[inline(always)]
pub fn promote(key: &FlowKey, fwd: &FlowEntry) {
    if fwd.nat_flags & NAT_ENCAP != 0 {
        // Direct server return: one entry, no reverse direction.
        if CONNS.insert(key, fwd, BPF_ANY as u64).is_ok() {
            report_new(key, fwd, None);
            let _ = HALF_OPEN.remove(key);
        }
        return;
    }
    let rkey = fwd.peer_key(key.proto);
    // Inserted straight from the half-open table's value (no copy on the
    // stack), before it is removed there.
    let rev: &FlowEntry = match HALF_OPEN.get_ptr(&rkey) {
        // SAFETY: map value pointer from the kernel.
        Some(r) => unsafe { &*r },
        // Evicted meanwhile: rebuild it from the forward entry, in scratch
        // space.
        None => {
            let Some(pair) = SCRATCH.get_ptr_mut(0) else { return };
            // SAFETY: this CPU's scratch slot, unused by the established path.
            let r = unsafe { &mut (*pair)[1] };
            r.fill_reverse_of(key, fwd, fwd.created_ns);
            r
        }
    };
    if CONNS.insert(&rkey, rev, BPF_ANY as u64).is_ok() && CONNS.insert(key, fwd, BPF_ANY as u64).is_ok() {
        // Before the removal: `rev` may point into the half-open table.
        report_new(key, fwd, Some(rev));
        let _ = HALF_OPEN.remove(&rkey);
        let _ = HALF_OPEN.remove(key);
    }
}

/// Creates both entries of a new flow to `backend`; `snat_port` (network
/// order) is the full-NAT source port already allocated for it, if the
/// service is full-NAT. The reverse entry is written first so that the
/// backend's first reply can never miss. Returns the forward entry (in
/// per-CPU scratch space, valid while this packet is processed), or `None`
/// when the table refused the insert.
#[inline(always)]
pub fn create(pkt: &Packet, svc: &ServiceEntry, backend_id: u32, backend: &Backend, snat_port: Option<u16>, now: u64) -> Option<&'static FlowEntry> {
    let key = &pkt.key;
    let is_tcp = key.proto == PROTO_TCP;
    let pair = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot; nothing else uses it during this packet.
    let [forward, reverse] = unsafe { &mut *pair };
    let dsr = svc.flags & SVC_F_DSR != 0;
    match snat_port {
        Some(p) => {
            forward.nat_src = backend.snat_addr;
            forward.nat_sport = p;
            forward.nat_flags = NAT_SRC | NAT_DST | NAT_FULL;
        }
        // The outer header's source: the balancer's address.
        None if dsr => {
            forward.nat_src = backend.snat_addr;
            forward.nat_sport = key.src_port;
            forward.nat_flags = NAT_ENCAP;
        }
        None => {
            forward.nat_src = key.src_addr;
            forward.nat_sport = key.src_port;
            forward.nat_flags = NAT_DST;
        }
    }
    forward.nat_dst = backend.addr;
    forward.nat_dport = backend.port;
    forward.direction = DIR_TO_BACKEND;
    forward.tcp_state = if is_tcp { tcp::next_state(tcp::STATE_NONE, pkt.tcp_flags) } else { tcp::STATE_NONE };
    forward._pad0 = 0;
    forward.backend_id = backend_id;
    forward.service_id = svc.id;
    forward.seq_next = if is_tcp { tcp::segment_end(pkt.seq, pkt.payload_len, pkt.tcp_flags) } else { 0 };
    forward.hop = 0;
    forward.created_ns = now;
    forward.last_seen_ns = now;
    forward.packets = 1;
    forward.bytes = pkt.ip_len as u64;
    // TCP flows wait in the half-open table until their handshake
    // completes; UDP flows go straight to the connection table.
    let table = if is_tcp { &HALF_OPEN } else { &CONNS };
    if dsr {
        // The backend answers the client directly: no reverse entry.
        table.insert(key, &*forward, BPF_ANY as u64).ok()?;
        return Some(forward);
    }
    reverse.fill_reverse_of(key, forward, now);
    let reverse_key = forward.peer_key(key.proto);
    table.insert(&reverse_key, &*reverse, BPF_ANY as u64).ok()?;
    if table.insert(key, &*forward, BPF_ANY as u64).is_err() {
        let _ = table.remove(&reverse_key);
        return None;
    }
    Some(forward)
}

/// Per-packet upkeep of an existing entry. Writes only what changed, so an
/// established flow's pure ACKs leave the cache line clean.
#[inline(always)]
pub fn touch(entry: *mut FlowEntry, pkt: &Packet, now: u64) {
    // SAFETY: `entry` points into a map value returned by the kernel.
    let e = unsafe { &mut *entry };
    if pkt.key.proto == PROTO_TCP {
        let state = tcp::next_state(e.tcp_state, pkt.tcp_flags);
        let end = tcp::segment_end(pkt.seq, pkt.payload_len, pkt.tcp_flags);
        // The first packet of this direction (state NONE) initialises the
        // sequence space; afterwards only forward movement counts.
        if e.tcp_state == tcp::STATE_NONE || tcp::seq_after(end, e.seq_next) {
            e.seq_next = end;
        }
        if state != e.tcp_state {
            e.tcp_state = state;
        }
    }
    if now.wrapping_sub(e.last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
        e.last_seen_ns = now;
    }
    e.packets += 1;
    e.bytes += pkt.ip_len as u64;
}

/// A SYN that finds an entry whose previous connection ended starts a new
/// flow on the same 5-tuple.
#[inline(always)]
pub fn is_new_connection(entry: *const FlowEntry, pkt: &Packet) -> bool {
    // SAFETY: `entry` points into a map value returned by the kernel.
    let e = unsafe { &*entry };
    pkt.key.proto == PROTO_TCP && pkt.tcp_flags & (tcp::FLAG_SYN | tcp::FLAG_ACK) == tcp::FLAG_SYN && tcp::is_reusable(e.tcp_state)
}

/// Removes both entries of a flow from `table` and reports it (with
/// `reason`, and `last_bytes` for the packet that ended it, if counted) to
/// the controller's flow log.
#[inline(always)]
///
/// `e` may point into the map: everything is read from it before the
/// entries go.
pub fn remove(key: &FlowKey, e: &FlowEntry, table: Table, reason: u32, last_bytes: u64) {
    let map = if table == Table::Established { &CONNS } else { &HALF_OPEN };
    let pkey = e.peer_key(key.proto);
    let to_backend = e.direction == DIR_TO_BACKEND;
    let full_nat = e.nat_flags & NAT_FULL != 0;
    // SAFETY: read before the entry is removed.
    let peer = map.get_ptr(&pkey).map(|p| unsafe { &*p });
    if to_backend {
        report(key, e, peer, reason, last_bytes, false);
    } else if let Some(fwd) = peer {
        report(&pkey, fwd, Some(e), reason, last_bytes, true);
    }
    // (A reverse entry whose forward entry is gone says nothing about the
    // client side: no record.)
    let _ = map.remove(&pkey);
    let _ = map.remove(key);
    if full_nat {
        // The full-NAT source port goes with its flow; it is keyed like the
        // backend → balancer entry.
        let _ = PORTS.remove(if to_backend { &pkey } else { key });
    }
    crate::stats::count_n(lb_common::stats::ENTRIES_REMOVED, 2);
}

/// Reports a new flow when the controller asked for new-flow records.
#[inline(always)]
pub fn report_new(key: &FlowKey, fwd: &FlowEntry, rev: Option<&FlowEntry>) {
    if crate::maps::SETTINGS.get(lb_common::maps::SETTING_LOG_NEW_FLOWS).is_some_and(|v| *v != 0) {
        report(key, fwd, rev, lb_common::maps::end_reason::NEW, 0, false);
    }
}

/// Sends a flow record to the controller (`fwd_key` is the client → VIP
/// key; `to_client` absent is zeroes; `last_bytes`, if not 0, is a last
/// packet not yet counted, on the client side's entry if
/// `last_on_to_client`). Written straight into the ring buffer (the record
/// would not fit the BPF stack beside the packet's state). A full ring
/// buffer loses the record, counted, never the packet.
#[inline(always)]
pub fn report(fwd_key: &FlowKey, to_backend: &FlowEntry, to_client: Option<&FlowEntry>, reason: u32, last_bytes: u64, last_on_to_client: bool) {
    let Some(mut slot) = FLOW_EVENTS.reserve::<FlowEnd>(0) else {
        crate::stats::count(lb_common::stats::FLOW_LOG_DROPPED);
        return;
    };
    let p = slot.as_mut_ptr();
    // SAFETY: `p` points to a reserved, properly sized record.
    unsafe {
        (*p).key = *fwd_key;
        (*p).reason = reason;
        (*p)._pad = 0;
        (*p).to_backend = *to_backend;
        match to_client {
            Some(c) => (*p).to_client = *c,
            None => core::ptr::write_bytes(&mut (*p).to_client, 0, 1),
        }
        if last_bytes > 0 {
            let side = if last_on_to_client { &mut (*p).to_client } else { &mut (*p).to_backend };
            side.packets += 1;
            side.bytes += last_bytes;
        }
    }
    slot.submit(0);
}
