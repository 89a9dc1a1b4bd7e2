//! A packet of a flow in the table, either way: the backend's health, TCP
//! tracking (window checks, the handshake, exact RSTs), promotion of a
//! confirmed flow, the counters, and the rewrite and forwarding. Shared by
//! the client path (`client`) and the backend path (`backend`), which only
//! differ in how they find the flow.

use lb_common::{
    maps::{
        BACKEND_DOWN, Backend, DIR_TO_BACKEND, DIR_TO_CLIENT, FLOW_DSR, FLOW_FULLNAT, FLOW_PICKED_UP, FlowKey, FlowState, NAT_DST, NAT_ENCAP, NAT_SRC,
        NatTuple, PROTO_TCP, TCPD_SEEN, backend_is_gone, end_reason,
    },
    stats as stat,
    tcp::{self, Segment},
};

use crate::{
    conntrack::{self, Table},
    encap, forward,
    maps::BACKENDS,
    nat,
    parse::{NO_WSCALE, Packet, Verdict},
    reset, stats,
};

/// `packet`'s "not forwarded here": the flow's backend is gone and the
/// packet (a client's UDP datagram) starts a new flow instead.
pub const RESCHEDULE: u64 = u64::MAX;

/// The packet as a TCP segment.
#[inline(always)]
pub fn segment(pkt: &Packet) -> Segment {
    Segment {
        seq: pkt.seq,
        ack: pkt.ack,
        win: pkt.win,
        flags: pkt.tcp_flags,
        payload_len: pkt.payload_len,
        wscale: if pkt.wscale == NO_WSCALE { None } else { Some(pkt.wscale) },
    }
}

/// DSR towards backend `b`: the outer header, balancer → backend (no
/// clamp: the backend's SYN-ACK never comes back this way).
#[inline(always)]
pub fn dsr_to_backend(key: &FlowKey, b: &Backend) -> NatTuple {
    NatTuple { src: b.snat_addr, dst: b.addr, sport: key.src_port, dport: b.port, flags: NAT_ENCAP, direction: DIR_TO_BACKEND, mss_clamp: 0, hop: 0 }
}

/// DNAT towards backend `b`: the client's packet with the backend as its
/// destination.
#[inline(always)]
pub fn dnat_to_backend(key: &FlowKey, b: &Backend) -> NatTuple {
    NatTuple { src: key.src_addr, dst: b.addr, sport: key.src_port, dport: b.port, flags: NAT_DST, direction: DIR_TO_BACKEND, mss_clamp: b.mss_clamp, hop: 0 }
}

/// The tuple a packet of flow `key` (state `st`, backend `b`) leaves with.
#[inline(always)]
pub fn tuple(key: &FlowKey, st: &FlowState, b: &Backend, to_backend: bool) -> NatTuple {
    if to_backend {
        if st.flags & FLOW_DSR != 0 {
            return dsr_to_backend(key, b);
        }
        if st.flags & FLOW_FULLNAT != 0 {
            return NatTuple {
                src: b.snat_addr,
                dst: b.addr,
                sport: st.snat_port,
                dport: b.port,
                flags: NAT_SRC | NAT_DST,
                direction: DIR_TO_BACKEND,
                mss_clamp: b.mss_clamp,
                hop: 0,
            };
        }
        return dnat_to_backend(key, b);
    }
    let flags = if st.flags & FLOW_FULLNAT != 0 { NAT_SRC | NAT_DST } else { NAT_SRC };
    NatTuple {
        src: key.dst_addr,
        dst: key.src_addr,
        sport: key.dst_port,
        dport: key.src_port,
        flags,
        direction: DIR_TO_CLIENT,
        mss_clamp: b.mss_clamp,
        hop: st.hop,
    }
}

/// `packet`'s `mode`: the entry is in the half-open table.
pub const IN_HALF_OPEN: u64 = 1;
/// `packet`'s `mode`: the packet goes to the backend (else to the client).
pub const TO_BACKEND: u64 = 2;

/// Processes a packet of flow `key`, whose entry `e` is in the table and
/// goes the way `mode` (`IN_HALF_OPEN`, `TO_BACKEND`) says. Returns a
/// verdict (`Verdict::to_bits`) or [`RESCHEDULE`].
///
/// A separate BPF function (not inlined, at most five arguments): the
/// client and backend paths each call it once, and its frame is its own.
#[inline(never)]
pub fn packet(ctx: &aya_ebpf::programs::XdpContext, pkt: &Packet, key: &FlowKey, e: *mut FlowState, mode: u64) -> u64 {
    let table = if mode & IN_HALF_OPEN != 0 { Table::HalfOpen } else { Table::Established };
    packet_verdict(ctx, pkt, key, e, table, mode & TO_BACKEND != 0, conntrack::now() as u32).map_or(RESCHEDULE, Verdict::to_bits)
}

/// The `mode` of a packet of an entry in `table`.
#[inline(always)]
pub fn mode(table: Table, to_backend: bool) -> u64 {
    (if table == Table::HalfOpen { IN_HALF_OPEN } else { 0 }) | if to_backend { TO_BACKEND } else { 0 }
}

#[inline(always)]
fn packet_verdict(
    ctx: &aya_ebpf::programs::XdpContext,
    pkt: &Packet,
    key: &FlowKey,
    e: *mut FlowState,
    table: Table,
    to_backend: bool,
    now: u32,
) -> Option<Verdict> {
    // SAFETY: map value pointer from the kernel; every read of it comes
    // before the entry is removed.
    let st = unsafe { &mut *e };
    let is_tcp = pkt.key.proto == PROTO_TCP;
    let Some(b) = BACKENDS.get(st.backend_id as u32) else { return Some(Verdict::drop(stat::DROP_MALFORMED)) };
    let state = b.state;
    if backend_is_gone(state) {
        let reason = if state == BACKEND_DOWN { end_reason::UNHEALTHY } else { end_reason::REMOVED };
        let (service_id, backend_id) = (st.service_id as u32, st.backend_id as u32);
        conntrack::remove(key, e, table, reason);
        if is_tcp {
            // No black hole: the sender learns at once.
            stats::count_reactive_reset(service_id, backend_id);
            return Some(reset::answer(ctx, pkt, stat::RST_REACTIVE));
        }
        if !to_backend {
            return Some(Verdict::drop(stat::DROP_GONE_BACKEND));
        }
        stats::count(stat::UDP_RESCHEDULED);
        return None;
    }
    let mut promote = false;
    let mut teardown = false;
    if is_tcp {
        let seg = segment(pkt);
        if st.flags & FLOW_DSR != 0 {
            // The backend answers the client itself: the client's side is
            // all there is to see. Its acknowledgements say what the
            // backend sent (a RST to the client must carry that).
            teardown = pkt.tcp_flags & tcp::FLAG_RST != 0 && st.orig.flags & TCPD_SEEN != 0 && pkt.seq == st.orig.end;
            if teardown {
                stats::count(stat::RST_TEARDOWN);
            }
            dsr_track(st, &seg);
        } else if pkt.tcp_flags & tcp::FLAG_RST != 0 {
            let exact = if to_backend { tcp::rst_is_exact(&st.orig, &st.reply, &seg) } else { tcp::rst_is_exact(&st.reply, &st.orig, &seg) };
            if exact {
                teardown = true;
                stats::count(stat::RST_TEARDOWN);
            } else {
                stats::count(stat::RST_IGNORED);
            }
        } else {
            // A half-open flow is confirmed by the client: its ACK of the
            // SYN-ACK, or, for a flow picked up from a backend's segment,
            // a segment of the client's in the window that acknowledges
            // all the backend sent.
            let picked_up = st.flags & FLOW_PICKED_UP != 0;
            // What the backend has sent, as known before this segment (a
            // side the client's own segment defines confirms nothing).
            let reply_end = if st.reply.flags & TCPD_SEEN != 0 { Some(st.reply.end) } else { None };
            let confirming = to_backend && table == Table::HalfOpen;
            let completes = confirming && !picked_up && tcp::completes_handshake(&st.orig, &st.reply, &seg);
            let unverified = confirming && !picked_up && pkt.tcp_flags & tcp::FLAG_SYN == 0 && !completes;
            if unverified {
                // A client's ACK during the handshake that does not
                // acknowledge the SYN-ACK: forwarded (the backend's stack
                // judges it) but it moves nothing, so the real ACK still
                // completes the handshake.
                stats::count(stat::HANDSHAKE_UNVERIFIED);
            } else {
                if track_counted(st, &seg, to_backend) {
                    // A picked-up flow: the client acknowledges exactly
                    // what the backend has sent (a blind guess: 1 in 2^32).
                    promote = completes || (confirming && picked_up && pkt.tcp_flags & tcp::FLAG_ACK != 0 && reply_end == Some(pkt.ack));
                }
            }
        }
    } else {
        // UDP: a flow is confirmed by the other side's datagram (the
        // backend's answer; for one picked up from the backend, the
        // client's next datagram).
        promote = table == Table::HalfOpen && to_backend == (st.flags & FLOW_PICKED_UP != 0);
    }
    conntrack::touch(st, to_backend, pkt.ip_len, now);
    let t = tuple(key, st, b, to_backend);
    let backend_id = st.backend_id as u32;
    // The next hop towards the client is remembered in the entry, unless
    // the entry moves now (promotion) or goes (teardown).
    let memo = if !to_backend && !promote && !teardown { Some(&mut st.hop as *mut u32) } else { None };
    if promote {
        conntrack::promote(key, e);
    }
    let v = nat_and_forward(ctx, pkt, &t, memo, backend_id);
    if teardown {
        let reason = if to_backend { end_reason::RST_CLIENT } else { end_reason::RST_BACKEND };
        // (A RST never promotes: `e` is still this flow's entry.)
        conntrack::remove(key, e, table, reason);
    }
    Some(v)
}

/// Tracks a segment (not a RST) of flow `st` from the client
/// (`to_backend`) or the backend, counting what the tracking refuses;
/// whether it was in the window (only then did it change anything).
#[inline(always)]
pub fn track_counted(st: &mut FlowState, seg: &Segment, to_backend: bool) -> bool {
    let r = if to_backend { tcp::track(&mut st.orig, &mut st.reply, seg) } else { tcp::track(&mut st.reply, &mut st.orig, seg) };
    if r == tcp::TRACK_OUT_OF_WINDOW {
        stats::count(stat::TCP_OUT_OF_WINDOW);
    } else if r != tcp::TRACK_OK {
        stats::count(stat::TCP_INVALID);
    }
    r == tcp::TRACK_OK
}

/// DSR: the client's sequence space and what it acknowledged (the
/// backend's next sequence number), moved forward only.
#[inline(always)]
pub fn dsr_track(st: &mut FlowState, seg: &Segment) {
    let end = tcp::segment_end(seg.seq, seg.payload_len, seg.flags);
    if st.orig.flags & TCPD_SEEN == 0 || tcp::seq_after(end, st.orig.end) {
        st.orig.end = end;
        st.orig.flags |= TCPD_SEEN;
    }
    if seg.flags & tcp::FLAG_ACK != 0 && (st.reply.flags & TCPD_SEEN == 0 || tcp::seq_after(seg.ack, st.reply.end)) {
        st.reply.end = seg.ack;
        st.reply.flags |= TCPD_SEEN;
    }
    st.orig.state = tcp::next_state(st.orig.state, seg.flags);
}

/// Rewrites (or encapsulates) a packet to leave with `t` and sends it on.
/// The route comes first, so the rewrite knows whether the packet leaves as
/// an XDP frame or goes to the kernel (a partial checksum is completed only
/// in the first case: see `nat::checksum_form`).
#[inline(always)]
pub fn nat_and_forward(ctx: &aya_ebpf::programs::XdpContext, pkt: &Packet, t: &NatTuple, hop_memo: Option<*mut u32>, backend_id: u32) -> Verdict {
    let route = match forward::route(ctx, pkt, t, hop_memo) {
        Err(v) if v.stat & forward::TOO_BIG_STAT_MASK == stat::PASS_TOO_BIG => {
            if crate::too_big::answerable(ctx, pkt) {
                // Answered by the program's top (a shallower call chain),
                // from the VIP: the client's packets' destination, the
                // backend's packets' new source. Nothing rewritten.
                let vip = if t.direction == DIR_TO_BACKEND { pkt.key.dst_addr } else { t.src };
                if let Some(p) = crate::maps::PACKET.get_ptr_mut(0) {
                    // SAFETY: this CPU's packet slot (`pkt` itself).
                    unsafe { (*p).answer_from = vip };
                    return v;
                }
            }
            Err(Verdict::pass(stat::PASS_TOO_BIG))
        }
        r => r,
    };
    stats::count_traffic(backend_id, t.direction == DIR_TO_BACKEND, pkt.ip_len as u64);
    let leaving = route.is_ok();
    if t.flags & NAT_ENCAP != 0 {
        if let Err(stat) = encap::ipip(ctx, pkt, t, leaving) {
            return Verdict::pass(stat);
        }
    } else {
        if t.mss_clamp != 0 && pkt.tcp_flags & (lb_common::tcp::FLAG_SYN | lb_common::tcp::FLAG_RST) == lb_common::tcp::FLAG_SYN {
            crate::mss::clamp_syn(ctx, pkt, t.mss_clamp);
        }
        if !nat::rewrite(ctx, pkt, t, leaving) {
            return Verdict::pass(stat::PASS_CSUM_TOO_LONG);
        }
    }
    match route {
        Ok(slot) => forward::send(ctx, pkt, slot),
        // Passed already rewritten: the kernel forwards it.
        Err(v) => v,
    }
}
