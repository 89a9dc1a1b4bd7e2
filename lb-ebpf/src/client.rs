//! Packets to a service (client → VIP:port): the packet of a flow in the
//! table, a new flow, or a packet without a flow.
//!
//! - A SYN of a service that can schedule statelessly (Maglev DNAT, DSR)
//!   creates nothing: it goes where the keyed hash sends it, and the
//!   backend's SYN-ACK creates the half-open flow (`backend`). A SYN flood
//!   costs the table nothing.
//! - Any other new flow (a SYN of round robin, least-connections, full NAT
//!   or shared backends; a UDP datagram) starts in the half-open table and
//!   is confirmed into the connection table by the handshake (`flow`) or
//!   the backend's answer.
//! - A non-SYN without a flow is forwarded by hash where the service can
//!   (its backend re-creates the flow when it answers) and answered with a
//!   RST where it cannot (full NAT, `--on-miss reset` on round robin).
//!   Nothing a client sends without a handshake enters the connection
//!   table.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    maps::{
        Backend, EndpointKey, FLOW_DSR, FLOW_FULLNAT, FlowKey, FlowState, PROTO_TCP, SCHED_MAGLEV, SVC_F_DSR, SVC_F_FULLNAT, SVC_F_MISS_REHASH,
        SVC_F_NO_PORT_DROP, SVC_F_SHARED_BACKENDS, SVC_F_STATELESS_SYN, ServiceEntry,
    },
    stats as stat,
    tcp::{self},
};

use crate::{
    conntrack::{self, Inserted, Table},
    flow,
    maps::{CONNS, ENDPOINTS, HALF_OPEN},
    parse::{Packet, Verdict},
    ports, reset, schedule, stats,
};

/// The flow of a packet to service `svc`: its entry (null if none), with
/// `flow::packet`'s mode written to `mode`. A separate BPF function
/// returning the map value itself: the entry's processing (`flow::packet`)
/// is then called from the program's top, not from here, which keeps the
/// call chain within the 512-byte BPF stack.
///
/// A non-SYN's connection-table entry was looked up by the program's top
/// already (a live one never gets here): `closed_entry` is it, if it is
/// closed, else null.
#[inline(never)]
pub fn find(pkt: &Packet, svc: &ServiceEntry, mode: &mut u64, closed_entry: *mut FlowState) -> *mut FlowState {
    let key = &pkt.key;
    let syn = key.proto == PROTO_TCP && pkt.tcp_flags & (tcp::FLAG_SYN | tcp::FLAG_ACK) == tcp::FLAG_SYN;
    if syn {
        if svc.flags & SVC_F_STATELESS_SYN != 0 {
            return core::ptr::null_mut();
        }
        // A SYN on the tuple of a flow not closed both ways follows that
        // flow (the backend answers it). Else it is a new flow: its insert
        // (`new_flow`, `BPF_NOEXIST`) finds a retransmitted SYN's half-open
        // flow if there is one, without a lookup before (a miss, nearly
        // always).
        if let Some(e) = CONNS.get_ptr_mut(key) {
            // SAFETY: map value pointer from the kernel.
            if !closed(unsafe { &*e }) {
                *mode = flow::mode(Table::Established, true);
                return e;
            }
        }
        return core::ptr::null_mut();
    }
    match HALF_OPEN.get_ptr_mut(key) {
        // A flow in its handshake, or a new connection on the 5-tuple of a
        // closed one.
        Some(h) => {
            *mode = flow::mode(Table::HalfOpen, true);
            h
        }
        None => {
            *mode = flow::mode(Table::Established, true);
            closed_entry
        }
    }
}

/// What a packet to `svc` without a flow gets (`find` found none).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    /// Forwarded where the keyed hash sends it, creating nothing.
    ByHash,
    /// A new flow (`new_flow`).
    New,
    /// Answered with a RST (`reset_miss`).
    Reset,
    /// Handed to the kernel untouched (a client's RST or SYN-ACK).
    Pass,
}

/// Decides what a packet without a flow gets (counting it).
#[inline(always)]
pub fn unknown(pkt: &Packet, svc: &ServiceEntry) -> Unknown {
    if pkt.key.proto != PROTO_TCP {
        return Unknown::New;
    }
    let flags = pkt.tcp_flags;
    if flags & (tcp::FLAG_SYN | tcp::FLAG_ACK) == tcp::FLAG_SYN {
        if svc.flags & SVC_F_STATELESS_SYN != 0 {
            stats::count(stat::STATELESS_SYN);
            return Unknown::ByHash;
        }
        return Unknown::New;
    }
    if flags & (tcp::FLAG_RST | tcp::FLAG_SYN) != 0 {
        // A RST creates nothing and is not answered; neither is a SYN-ACK
        // from a client.
        return Unknown::Pass;
    }
    if svc.flags & SVC_F_DSR != 0 {
        // DSR: the backend's answers never pass here, so a flow can only
        // start from the client's side (its entry lets the controller
        // reset it).
        return Unknown::New;
    }
    // Not where the backend's answer could not be mapped back: full NAT
    // (no source port) and backends shared with another service (which
    // VIP would the answer be from?).
    let hashable = svc.flags & (SVC_F_FULLNAT | SVC_F_SHARED_BACKENDS) == 0 && (svc.scheduler == SCHED_MAGLEV || svc.flags & SVC_F_MISS_REHASH != 0);
    if !hashable {
        return Unknown::Reset;
    }
    // Where the hash sends it (for Maglev: where the flow was, unless the
    // ring changed); the backend knows whether the connection exists, and
    // its answer re-creates the flow here. A spoofed segment creates
    // nothing.
    stats::count(stat::REHASHED);
    Unknown::ByHash
}

#[inline(always)]
fn closed(e: &FlowState) -> bool {
    tcp::is_closed(e.orig.state, e.reply.state)
}

/// A TCP segment without a flow where none can be made: answered with a
/// RST. A separate BPF function.
#[inline(never)]
pub fn reset_miss(ctx: &XdpContext, pkt: &Packet) -> u64 {
    reset::answer(ctx, pkt, stat::RST_MISS).to_bits()
}

/// Forwards a packet by hash, without state. A separate BPF function.
#[inline(never)]
pub fn by_hash(ctx: &XdpContext, pkt: &Packet, svc: &ServiceEntry) -> u64 {
    stateless(ctx, pkt, svc).to_bits()
}

/// Forwards a packet to the backend its hash picks, with no state.
#[inline(always)]
fn stateless(ctx: &XdpContext, pkt: &Packet, svc: &ServiceEntry) -> Verdict {
    let Some((backend_id, b)) = schedule::pick(svc, &pkt.key, true) else {
        return Verdict::pass(stat::PASS_NO_BACKEND);
    };
    let key = &pkt.key;
    let t = if svc.flags & SVC_F_DSR != 0 { flow::dsr_to_backend(key, b) } else { flow::dnat_to_backend(key, b) };
    flow::nat_and_forward(ctx, pkt, &t, None, backend_id)
}

/// `new_flow`'s "its key has an entry already" (`fresh`: nothing written;
/// the caller processes that flow, or calls again with `fresh` false).
pub const FLOW_EXISTS: u64 = u64::MAX - 1;

/// A new flow: scheduled, entered in the half-open table, forwarded. A
/// separate BPF function. `fresh`: only if its key has no entry
/// (`BPF_NOEXIST`, else [`FLOW_EXISTS`]); otherwise it replaces one.
#[inline(never)]
pub fn new_flow(ctx: &XdpContext, pkt: &Packet, svc: &ServiceEntry, fresh: bool) -> u64 {
    new_flow_verdict(ctx, pkt, svc, fresh, conntrack::now() as u32).map_or(FLOW_EXISTS, Verdict::to_bits)
}

/// The verdict, or `None` when `fresh` found an entry.
#[inline(always)]
fn new_flow_verdict(ctx: &XdpContext, pkt: &Packet, svc: &ServiceEntry, fresh: bool, now: u32) -> Option<Verdict> {
    let key = &pkt.key;
    let is_tcp = key.proto == PROTO_TCP;
    // A refusal is for a new flow only: a `fresh` packet's key may have a
    // flow in its handshake already (a retransmitted SYN, not looked up
    // before: see `find`), which then takes the packet instead. Looked up
    // here, on the rare refusals, not on every SYN.
    let known = || fresh && HALF_OPEN.get_ptr(key).is_some();
    let Some((backend_id, b)) = schedule::pick(svc, key, false) else {
        return if known() { None } else { Some(Verdict::pass(stat::PASS_NO_BACKEND)) };
    };
    if svc.flags & SVC_F_SHARED_BACKENDS != 0 && collides(key, b) {
        if known() {
            return None;
        }
        // The backend already has a connection from this client address
        // and port (through another VIP): to it, this would be the same
        // connection. Refused, never mixed up.
        if is_tcp {
            return Some(reset::answer(ctx, pkt, stat::REFUSED_COLLISION));
        }
        return Some(Verdict::drop(stat::REFUSED_COLLISION));
    }
    let fullnat = svc.flags & SVC_F_FULLNAT != 0;
    let snat_port = if fullnat {
        let Some(port) = ports::allocate(svc, backend_id as u16, b, key, now) else {
            if known() {
                return None;
            }
            // Refused cleanly: never a port shared with a live flow.
            stats::count_no_port(svc.id, backend_id);
            if is_tcp && svc.flags & SVC_F_NO_PORT_DROP == 0 {
                return Some(reset::answer(ctx, pkt, stat::REFUSED_NO_PORT));
            }
            return Some(Verdict::drop(stat::REFUSED_NO_PORT));
        };
        port
    } else {
        0
    };
    let flags = if fullnat {
        FLOW_FULLNAT
    } else if svc.flags & SVC_F_DSR != 0 {
        FLOW_DSR
    } else {
        0
    };
    let Some(st) = conntrack::scratch(backend_id as u16, svc.id as u8, flags, snat_port, now) else {
        if fullnat {
            ports::release(b, key.proto, snat_port);
        }
        return Some(Verdict::drop(stat::DROP_TABLE_FULL));
    };
    if is_tcp {
        if svc.flags & SVC_F_DSR != 0 {
            flow::dsr_track(st, &flow::segment(pkt));
        } else {
            let _ = tcp::track(&mut st.orig, &mut st.reply, &flow::segment(pkt));
        }
    }
    // A DSR flow cannot be confirmed (the backend's answers go straight to
    // the client): it starts established.
    let table = if svc.flags & SVC_F_DSR != 0 { Table::Established } else { Table::HalfOpen };
    // Counted in the entry (the scratch copy is what gets inserted).
    conntrack::touch(st, true, pkt.ip_len, now);
    let inserted = conntrack::insert_entry(table, key, st, fresh);
    if inserted != Inserted::Yes {
        if fullnat {
            ports::release(b, key.proto, snat_port);
        }
        if inserted == Inserted::Exists {
            return None;
        }
        return Some(Verdict::drop(stat::DROP_TABLE_FULL));
    }
    stats::count_new_flow(svc.id, backend_id);
    schedule::count_active(backend_id);
    let t = flow::tuple(key, st, b, true);
    Some(flow::nat_and_forward(ctx, pkt, &t, None, backend_id))
}

/// Whether backend `b` already has a live flow from `key`'s client address
/// and port through another service (DNAT: that would be one connection to
/// the backend).
#[inline(always)]
fn collides(key: &FlowKey, b: &Backend) -> bool {
    let ek = EndpointKey { addr: b.addr, port: b.port, proto: key.proto, _pad: 0 };
    // SAFETY: read-only use of a value the controller writes whole.
    let Some(ep) = (unsafe { ENDPOINTS.get(&ek) }) else { return false };
    for i in 0..lb_common::maps::MAX_SERVICES_PER_ENDPOINT {
        if i as u32 >= ep.count {
            break;
        }
        let s = &ep.services[i];
        if s.vip == key.dst_addr && s.vip_port == key.dst_port {
            continue;
        }
        let other = FlowKey::new(key.src_addr, s.vip, key.src_port, s.vip_port, key.proto);
        let live = |e: &FlowState| e.backend_id == s.backend_id && !closed(e);
        // SAFETY: read-only uses of map values.
        if unsafe { CONNS.get(&other) }.is_some_and(live) || unsafe { HALF_OPEN.get(&other) }.is_some_and(live) {
            return true;
        }
    }
    false
}
