//! Packets from a backend (backend ip:port → a client, or the balancer's
//! full-NAT address): the flow is found through the backend's services
//! (`XLB_ENDPOINTS`: in DNAT the client is the packet's destination, so
//! the flow's key follows from the VIP) or its full-NAT port (`XLB_PORTS`:
//! the port's holder).
//!
//! Without a flow, a backend's packet is never forwarded with the
//! backend's address visible: it is reverse-NATed from its only service
//! when there is one (a SYN-ACK then creates the half-open flow, any other
//! segment re-creates the lost flow: the backend, trusted, says where it
//! goes), handed to the kernel when it is for the balancer itself, and
//! otherwise dropped (a TCP one answered with a RST so the backend lets
//! its connection go).

use aya_ebpf::programs::XdpContext;
use lb_common::{
    maps::{
        ADDR_LOCAL, DIR_TO_CLIENT, EndpointEntry, EndpointService, FLOW_PICKED_UP, FlowKey, FlowState, MAX_SERVICES_PER_ENDPOINT, NAT_SRC, NatTuple, PROTO_TCP,
        SVC_F_FULLNAT, backend_is_gone,
    },
    stats as stat, tcp,
};

use crate::{
    conntrack::{self, Table},
    flow,
    maps::{BACKENDS, PORTS},
    parse::{Packet, Verdict, is_addr},
    ports, reset, stats,
};

/// The flow of a backend's packet: its entry (null if none), its key
/// written to `pkt.flow_key` and `flow::packet`'s mode to `mode`. A
/// separate BPF function returning the map value (see `client::find`).
#[inline(never)]
pub fn find(pkt: &mut Packet, ep: &EndpointEntry, mode: &mut u64) -> *mut FlowState {
    match find_in(pkt, ep) {
        Some((e, table)) => {
            *mode = flow::mode(table, false);
            e
        }
        None => core::ptr::null_mut(),
    }
}

#[inline(always)]
fn find_in(pkt: &mut Packet, ep: &EndpointEntry) -> Option<(*mut FlowState, Table)> {
    // A SYN-ACK belongs to a flow still in its handshake.
    let synack = pkt.key.proto == PROTO_TCP && pkt.tcp_flags & tcp::FLAG_SYN != 0;
    if ep.any_fullnat != 0 {
        // SAFETY: read-only use of a map value; the key is copied out.
        if let Some(owner) = unsafe { PORTS.get(&pkt.key) } {
            pkt.flow_key = owner.flow;
            if let Some((e, table)) = lookup(&pkt.flow_key, synack) {
                // SAFETY: map value pointer from the kernel.
                let st = unsafe { &*e };
                // The holder still holds this port towards this backend.
                if holds_here(st, ep, pkt.key.dst_port) {
                    return Some((e, table));
                }
            }
        }
    }
    for i in 0..MAX_SERVICES_PER_ENDPOINT {
        if i as u32 >= ep.count {
            break;
        }
        let s = &ep.services[i];
        if s.flags & SVC_F_FULLNAT != 0 {
            continue;
        }
        pkt.flow_key = dnat_flow_key(pkt, s);
        if let Some((e, table)) = lookup(&pkt.flow_key, synack) {
            // SAFETY: map value pointer from the kernel.
            if unsafe { (*e).backend_id } == s.backend_id {
                return Some((e, table));
            }
        }
    }
    None
}

/// The key of the DNAT flow a backend's packet belongs to through service
/// `s` of its endpoint: the client is the packet's destination.
#[inline(always)]
pub fn dnat_flow_key(pkt: &Packet, s: &EndpointService) -> FlowKey {
    FlowKey::new(pkt.key.dst_addr, s.vip, pkt.key.dst_port, s.vip_port, pkt.key.proto)
}

/// A flow by key: a SYN-ACK looks in the half-open table first.
#[inline(always)]
fn lookup(key: &FlowKey, synack: bool) -> Option<(*mut FlowState, Table)> {
    if synack {
        if let Some(e) = conntrack::get(Table::HalfOpen, key) {
            return Some((e, Table::HalfOpen));
        }
        // A closed connection's entry (lingering) is not the new
        // connection on its tuple: the SYN-ACK starts a flow of its own.
        // SAFETY: map value pointer from the kernel.
        return conntrack::get(Table::Established, key)
            .filter(|e| !tcp::is_closed(unsafe { (**e).orig.state }, unsafe { (**e).reply.state }))
            .map(|e| (e, Table::Established));
    }
    if let Some(e) = conntrack::get(Table::Established, key) {
        return Some((e, Table::Established));
    }
    conntrack::get(Table::HalfOpen, key).map(|e| (e, Table::HalfOpen))
}

/// Whether full-NAT flow `st` holds `port` towards this endpoint (as one of
/// its services' backends).
#[inline(always)]
pub fn holds_here(st: &FlowState, ep: &EndpointEntry, port: u16) -> bool {
    for i in 0..MAX_SERVICES_PER_ENDPOINT {
        if i as u32 >= ep.count {
            break;
        }
        let s = &ep.services[i];
        if s.service_id == st.service_id && ports::holds(st, s.backend_id, port) {
            return true;
        }
    }
    false
}

/// A backend's packet that belongs to no flow in the table
/// (`Verdict::to_bits`: a BPF function cannot return a struct). A separate
/// BPF function.
#[inline(never)]
pub fn no_flow(ctx: &XdpContext, pkt: &Packet, ep: &EndpointEntry) -> u64 {
    no_flow_verdict(ctx, pkt, ep, conntrack::now() as u32).to_bits()
}

#[inline(always)]
fn no_flow_verdict(ctx: &XdpContext, pkt: &Packet, ep: &EndpointEntry, now: u32) -> Verdict {
    if is_addr(&pkt.key.dst_addr, ADDR_LOCAL) {
        // For the balancer itself (health checks, a full-NAT port whose
        // flow is gone): the kernel's business.
        return Verdict::pass(stat::PASS_NOT_SERVICE);
    }
    let is_tcp = pkt.key.proto == PROTO_TCP;
    // Only an endpoint of a single DNAT service says which flow it is.
    let s = &ep.services[0];
    if ep.count != 1 || s.flags & SVC_F_FULLNAT != 0 {
        return refuse(ctx, pkt);
    }
    let Some(b) = BACKENDS.get(s.backend_id as u32) else { return refuse(ctx, pkt) };
    if backend_is_gone(b.state) {
        return refuse(ctx, pkt);
    }
    let key = dnat_flow_key(pkt, s);
    let flags = pkt.tcp_flags;
    if is_tcp && flags & (tcp::FLAG_RST | tcp::FLAG_FIN) != 0 && flags & tcp::FLAG_SYN == 0 {
        // The end of a flow already gone: told to the client, nothing made.
        stats::count(stat::REPLY_STATELESS);
        let t = NatTuple {
            src: key.dst_addr,
            dst: key.src_addr,
            sport: key.dst_port,
            dport: key.src_port,
            flags: NAT_SRC,
            direction: DIR_TO_CLIENT,
            mss_clamp: 0,
            hop: 0,
        };
        return flow::nat_and_forward(ctx, pkt, &t, None, s.backend_id as u32);
    }
    if is_tcp && flags & tcp::FLAG_ACK == 0 {
        // A backend does not open connections through a VIP (a SYN), and
        // every other segment of a connection carries an ACK.
        if flags & tcp::FLAG_SYN == 0 {
            return Verdict::drop(stat::TCP_INVALID);
        }
        return refuse(ctx, pkt);
    }
    // A SYN-ACK starts the half-open flow (its SYN created nothing); any
    // other segment, or a UDP answer, re-creates a lost flow (picked up).
    // Either waits in the half-open table until the client's side confirms
    // it: anyone can claim a backend's source address, so what it alone
    // says never reaches the connection table.
    let picked_up = !(is_tcp && flags & tcp::FLAG_SYN != 0);
    create(ctx, pkt, &key, s, picked_up, now)
}

/// Creates the half-open flow of a backend's packet (`picked_up`: of a
/// connection already under way) and forwards the packet to the client.
#[inline(always)]
fn create(ctx: &XdpContext, pkt: &Packet, key: &FlowKey, s: &EndpointService, picked_up: bool, now: u32) -> Verdict {
    let flags = if picked_up { FLOW_PICKED_UP } else { 0 };
    let Some(st) = conntrack::scratch(s.backend_id, s.service_id, flags, 0, now) else { return Verdict::drop(stat::DROP_TABLE_FULL) };
    if pkt.key.proto == PROTO_TCP {
        let _ = tcp::track(&mut st.reply, &mut st.orig, &flow::segment(pkt));
    }
    // Counted in the entry (the scratch copy is what gets inserted).
    conntrack::touch(st, false, pkt.ip_len, now);
    if !conntrack::insert(Table::HalfOpen, key, st) {
        return Verdict::drop(stat::DROP_TABLE_FULL);
    }
    stats::count_new_flow(s.service_id as u32, s.backend_id as u32);
    if picked_up {
        stats::count(stat::REDERIVED);
    }
    let Some(b) = BACKENDS.get(s.backend_id as u32) else { return Verdict::drop(stat::DROP_MALFORMED) };
    let t = flow::tuple(key, st, b, false);
    flow::nat_and_forward(ctx, pkt, &t, None, s.backend_id as u32)
}

/// Drops a backend's packet that belongs to no flow; a TCP one (not a RST)
/// is answered with a RST, so the backend lets the connection go.
#[inline(always)]
fn refuse(ctx: &XdpContext, pkt: &Packet) -> Verdict {
    if pkt.key.proto == PROTO_TCP {
        return reset::answer(ctx, pkt, stat::DROP_REPLY_NO_FLOW);
    }
    Verdict::drop(stat::DROP_REPLY_NO_FLOW)
}
