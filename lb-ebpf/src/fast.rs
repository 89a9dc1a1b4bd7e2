//! The program's entry (`xlb`): the packets that make up nearly all of a
//! balancer's traffic, handled in one BPF function with no BPF-to-BPF
//! call; everything else goes on by a tail call to the full program
//! (`xlb_full`, the same packet from the top).
//!
//! Why: every BPF-to-BPF call returns through the kernel's return thunk,
//! which costs ~10 ns a call on this class of machine (four calls: an
//! XDP_PASS program 70 → 110 ns), and the full program's packet path makes
//! four (parse, flow, route, rewrite: the 512-byte stack forces the split).
//! Here the same code is inlined into one frame, which only fits because
//! nothing else is on the path.
//!
//! Handled here, exactly as the full program would (the same functions):
//! - traffic to no service's port and from no backend's port: passed;
//! - a client's packet (not a SYN, not a RST) of a live established flow
//!   (DNAT, full NAT, DSR over IPv4) whose backend is up and whose next
//!   hop is cached and usable: tracked, counted, rewritten (or
//!   encapsulated), its partial checksum completed if it has one (a call
//!   to the summing function, only for such frames) and sent;
//! - a backend's packet (not a SYN, not a RST) of such a flow, found where
//!   `backend::find` finds it first: through its full-NAT port, or as a
//!   DNAT flow of the endpoint's first service.
//!
//! Anything else is decided before the first write (a flow's entry, a
//! counter, the packet), so the full program sees the packet and the state
//! as they came. Parse failures are verdicts here: the full program would
//! reach the same one.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    maps::{
        CSUM_FULL, CSUM_SEED_COMPLETE_ON_TX, EndpointKey, FILTER_ENDPOINT, FILTER_SERVICE, FLOW_DSR, FlowState, NAT_ENCAP, PROTO_TCP, SVC_F_FULLNAT,
        backend_is_gone,
    },
    stats as stat, tcp,
};

use crate::{
    backend, conntrack, csum, encap, flow, forward,
    maps::{BACKENDS, CONNS, ENDPOINTS, PORT_FILTER, PORTS},
    nat,
    parse::{Packet, Verdict},
    stats,
};

/// The verdict for a parsed packet, or `None`: the full program takes it.
#[inline(always)]
pub fn packet(ctx: &XdpContext, pkt: &mut Packet) -> Option<Verdict> {
    if pkt.icmp != lb_common::icmp::NOT_ERROR || pkt.vlan {
        return None;
    }
    let k = &pkt.key;
    let filter = PORT_FILTER.get(0)?;
    if filter.contains(FILTER_SERVICE, k.proto, k.dst_port) {
        return to_service(ctx, pkt);
    }
    if filter.contains(FILTER_ENDPOINT, k.proto, k.src_port) {
        return from_backend(ctx, pkt);
    }
    Some(Verdict::pass(stat::PASS_NOT_SERVICE))
}

/// A packet to a service's port: only a live established flow's.
#[inline(always)]
fn to_service(ctx: &XdpContext, pkt: &Packet) -> Option<Verdict> {
    if !ordinary_segment(pkt) {
        return None;
    }
    let e = CONNS.get_ptr_mut(&pkt.key)?;
    established(ctx, pkt, e, true)
}

/// A packet from a backend's port: the flow `backend::find` finds first,
/// when it is in the connection table (its full-NAT port's holder, or a
/// DNAT flow of the endpoint's first service).
#[inline(always)]
fn from_backend(ctx: &XdpContext, pkt: &mut Packet) -> Option<Verdict> {
    if !ordinary_segment(pkt) {
        return None;
    }
    let k = &pkt.key;
    let ekey = EndpointKey { addr: k.src_addr, port: k.src_port, proto: k.proto, _pad: 0 };
    // SAFETY: read-only use of a value the controller writes whole.
    let Some(ep) = (unsafe { ENDPOINTS.get(&ekey) }) else {
        // What the full program would conclude: the host's own traffic.
        return Some(Verdict::pass(stat::PASS_NOT_SERVICE));
    };
    if ep.any_fullnat != 0 {
        // The port's holder first, as `backend::find`; anything else there
        // (no holder, a half-open one, a port moved on) is the full
        // program's.
        // SAFETY: read-only use of a map value; the key is copied out.
        pkt.flow_key = unsafe { PORTS.get(&pkt.key) }?.flow;
        let e = CONNS.get_ptr_mut(&pkt.flow_key)?;
        // SAFETY: map value pointer from the kernel.
        if !backend::holds_here(unsafe { &*e }, ep, pkt.key.dst_port) {
            return None;
        }
        return established(ctx, pkt, e, false);
    }
    if ep.count == 0 {
        return None;
    }
    let s = ep.services.first()?;
    if s.flags & SVC_F_FULLNAT != 0 {
        return None;
    }
    pkt.flow_key = backend::dnat_flow_key(pkt, s);
    let e = CONNS.get_ptr_mut(&pkt.flow_key)?;
    // SAFETY: map value pointer from the kernel.
    if unsafe { (*e).backend_id } != s.backend_id {
        return None;
    }
    established(ctx, pkt, e, false)
}

/// Not a SYN, not a RST (for UDP: always): a segment that can neither
/// start, nor confirm, nor end a flow.
#[inline(always)]
fn ordinary_segment(pkt: &Packet) -> bool {
    pkt.key.proto != PROTO_TCP || pkt.tcp_flags & (tcp::FLAG_SYN | tcp::FLAG_RST) == 0
}

/// A packet of established flow `e` (key `pkt.key` towards the backend,
/// else `pkt.flow_key`), as `flow::packet` processes it, when nothing in
/// it needs more than tracking, counting, the rewrite and the send.
#[inline(always)]
fn established(ctx: &XdpContext, pkt: &Packet, e: *mut FlowState, to_backend: bool) -> Option<Verdict> {
    // SAFETY: map value pointer from the kernel; nothing removes it here.
    let st = unsafe { &mut *e };
    let dsr = st.flags & FLOW_DSR != 0;
    // (DSR: only the client's packets pass the balancer, IPv4 only.)
    if tcp::is_closed(st.orig.state, st.reply.state) || dsr && (!to_backend || pkt.v6) {
        return None;
    }
    let b = BACKENDS.get(st.backend_id as u32)?;
    if backend_is_gone(b.state) {
        return None;
    }
    let key = if to_backend { &pkt.key } else { &pkt.flow_key };
    let t = flow::tuple(key, st, b, to_backend);
    let hop = forward::cached_route(ctx, pkt, &t)?;
    let form = nat::l4_checksum_form(ctx, pkt, false);
    // A seed to complete (a local stack's frame through a veth with TX
    // offload): done here, the one BPF-to-BPF call on this path and only
    // for such frames, when the segment can be summed.
    let complete = form == CSUM_SEED_COMPLETE_ON_TX;
    let shift = if t.flags & NAT_ENCAP != 0 { encap::OUTER_LEN } else { 0 };
    if complete && !csum::summable(pkt, shift) {
        return None;
    }
    // Decided: from here on, the packet is this program's.
    if form != CSUM_FULL {
        stats::count(stat::CSUM_PARTIAL);
    }
    if pkt.key.proto == PROTO_TCP {
        if dsr {
            flow::dsr_track(st, &flow::segment(pkt));
        } else {
            flow::track_counted(st, &flow::segment(pkt), to_backend);
        }
    }
    conntrack::touch(st, to_backend, pkt.ip_len, conntrack::now() as u32);
    stats::count_traffic(st.backend_id as u32, to_backend, pkt.ip_len as u64);
    if t.flags & NAT_ENCAP != 0 {
        if let Err(stat) = encap::outer_header(ctx, pkt, &t) {
            return Some(Verdict::pass(stat));
        }
    } else {
        nat::rewrite_in_place(ctx, pkt, &t, form);
    }
    // (Cannot fail after `summable`; the full program's verdict if it did.)
    if complete && !csum::complete(ctx, pkt, shift) {
        return Some(Verdict::pass(stat::PASS_CSUM_TOO_LONG));
    }
    Some(forward::send_to(ctx, pkt, hop))
}
