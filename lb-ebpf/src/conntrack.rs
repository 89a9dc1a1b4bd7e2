//! The connection table: lookup, creation of a new flow's two entries, and
//! per-packet state upkeep (TCP state, next expected sequence number, last
//! seen).

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_coarse_ns};
use lb_common::{
    maps::{
        Backend, FlowEnd, FlowEntry, FlowKey, ServiceEntry, DIR_TO_BACKEND, DIR_TO_CLIENT,
        LAST_SEEN_GRANULARITY_NS, PROTO_TCP,
    },
    tcp,
};

use crate::{
    maps::{CONNS, FLOW_EVENTS, HALF_OPEN},
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
#[inline(always)]
pub fn promote(key: &FlowKey, fwd: &FlowEntry) {
    let rkey = peer_key(key, fwd);
    // SAFETY: copied out of the map before it is removed.
    let rev = match HALF_OPEN.get_ptr(&rkey) {
        Some(r) => unsafe { *r },
        // Evicted meanwhile: rebuild it from the forward entry.
        None => FlowEntry {
            nat_addr: key.dst_addr,
            nat_port: key.dst_port,
            direction: DIR_TO_CLIENT,
            tcp_state: tcp::STATE_NONE,
            backend_id: fwd.backend_id,
            service_id: fwd.service_id,
            seq_next: 0,
            _pad: 0,
            created_ns: fwd.created_ns,
            last_seen_ns: fwd.last_seen_ns,
            packets: 0,
            bytes: 0,
        },
    };
    if CONNS.insert(&rkey, &rev, BPF_ANY as u64).is_ok() && CONNS.insert(key, fwd, BPF_ANY as u64).is_ok() {
        let _ = HALF_OPEN.remove(&rkey);
        let _ = HALF_OPEN.remove(key);
    }
}

/// Creates both entries of a new flow to `backend`. The reverse entry is
/// written first so that the backend's first reply can never miss.
/// Returns the forward entry, or `None` when the table refused the insert.
#[inline(always)]
pub fn create(
    pkt: &Packet,
    svc: &ServiceEntry,
    backend_id: u32,
    backend: &Backend,
    now: u64,
) -> Option<FlowEntry> {
    let key = &pkt.key;
    let reverse_key = FlowKey {
        src_addr: backend.addr,
        dst_addr: key.src_addr,
        src_port: backend.port,
        dst_port: key.src_port,
        proto: key.proto,
        _pad: [0; 3],
    };
    let reverse = FlowEntry {
        nat_addr: key.dst_addr,
        nat_port: key.dst_port,
        direction: DIR_TO_CLIENT,
        tcp_state: tcp::STATE_NONE,
        backend_id,
        service_id: svc.id,
        seq_next: 0,
        _pad: 0,
        created_ns: now,
        last_seen_ns: now,
        packets: 0,
        bytes: 0,
    };
    let is_tcp = key.proto == PROTO_TCP;
    let forward = FlowEntry {
        nat_addr: backend.addr,
        nat_port: backend.port,
        direction: DIR_TO_BACKEND,
        tcp_state: if is_tcp { tcp::next_state(tcp::STATE_NONE, pkt.tcp_flags) } else { tcp::STATE_NONE },
        backend_id,
        service_id: svc.id,
        seq_next: if is_tcp { tcp::segment_end(pkt.seq, pkt.payload_len, pkt.tcp_flags) } else { 0 },
        _pad: 0,
        created_ns: now,
        last_seen_ns: now,
        packets: 1,
        bytes: pkt.ip_len as u64,
    };
    // TCP flows wait in the half-open table until their handshake
    // completes; UDP flows go straight to the connection table.
    let table = if is_tcp { &HALF_OPEN } else { &CONNS };
    table.insert(&reverse_key, &reverse, BPF_ANY as u64).ok()?;
    if table.insert(key, &forward, BPF_ANY as u64).is_err() {
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
    pkt.key.proto == PROTO_TCP
        && pkt.tcp_flags & (tcp::FLAG_SYN | tcp::FLAG_ACK) == tcp::FLAG_SYN
        && tcp::is_reusable(e.tcp_state)
}

/// Key of the other direction's entry of the flow `entry` belongs to.
#[inline(always)]
pub fn peer_key(key: &FlowKey, e: &FlowEntry) -> FlowKey {
    if e.direction == DIR_TO_BACKEND {
        // client → VIP; peer: backend → client.
        FlowKey { src_addr: e.nat_addr, dst_addr: key.src_addr, src_port: e.nat_port, dst_port: key.src_port, proto: key.proto, _pad: [0; 3] }
    } else {
        // backend → client; peer: client → VIP.
        FlowKey { src_addr: key.dst_addr, dst_addr: e.nat_addr, src_port: key.dst_port, dst_port: e.nat_port, proto: key.proto, _pad: [0; 3] }
    }
}

/// Removes both entries of a flow from `table` and reports it (with
/// `reason`, and `last_bytes` for the packet that ended it, if counted) to
/// the controller's flow log.
#[inline(always)]
pub fn remove(key: &FlowKey, e: &FlowEntry, table: Table, reason: u32, last_bytes: u64) {
    let map = if table == Table::Established { &CONNS } else { &HALF_OPEN };
    let pkey = peer_key(key, e);
    // SAFETY: read before the entry is removed.
    let peer = map.get_ptr(&pkey).map(|p| unsafe { &*p });
    let mut mine = *e;
    if last_bytes > 0 {
        mine.packets += 1;
        mine.bytes += last_bytes;
    }
    if e.direction == DIR_TO_BACKEND {
        report(key, &mine, peer, reason);
    } else if let Some(fwd) = peer {
        report(&pkey, fwd, Some(&mine), reason);
    }
    // (A reverse entry whose forward entry is gone says nothing about the
    // client side: no record.)
    let _ = map.remove(&pkey);
    let _ = map.remove(key);
    crate::stats::count_n(lb_common::stats::ENTRIES_REMOVED, 2);
}

/// Sends a flow record to the controller (`fwd_key` is the client → VIP
/// key; `to_client` absent is zeroes). Written straight into the ring
/// buffer (the record would not fit the BPF stack beside the packet's
/// state). A full ring buffer loses the record, counted, never the packet.
#[inline(always)]
pub fn report(fwd_key: &FlowKey, to_backend: &FlowEntry, to_client: Option<&FlowEntry>, reason: u32) {
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
    }
    slot.submit(0);
}
