//! ICMP and ICMPv6 errors about a flow, translated both ways as the
//! kernel's NAT does (`nf_nat_icmp_reply_translation`), so path MTU
//! discovery and unreachables work through the balancer:
//!
//! - to a VIP (a router on the client's path could not forward the
//!   backend's packet to the client: fragmentation needed, packet too big;
//!   or the client's host is unreachable): the quote is a packet xlb sent
//!   as VIP:port → client; the error goes to the flow's backend, quoting
//!   the packet as the backend sent it (backend → client, or in full NAT
//!   backend → the balancer's source port);
//! - about a packet to a backend (the backend's port unreachable, a
//!   router's host unreachable in front of it): the error goes to the
//!   client, from the VIP, quoting the packet as the client sent it.
//!
//! What changes: the outer destination (and, towards the client, the outer
//! source), the quoted addresses and ports, the quoted IPv4 header
//! checksum, the quoted TCP/UDP checksum when the quote holds it, and the
//! ICMP checksum (ICMPv6: over the pseudo-header too). A flow's state is
//! never changed by ICMP and no entry is created. DSR flows are not
//! translated (the backend answers the client itself, so errors about its
//! packets reach the backend's path directly, not the balancer).

use aya_ebpf::programs::XdpContext;
use lb_common::{
    csum,
    icmp::{self, ERROR_TO_VIP},
    maps::{DIR_TO_BACKEND, EndpointKey, FLOW_DSR, FlowState, GLOBAL_NO_ICMP, NAT_ENCAP, NatTuple, PROTO_TCP, SVC_F_DSR, ServiceKey},
    stats as stat,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    backend, flow, forward,
    maps::{BACKENDS, CONNS, ENDPOINTS, GLOBALS, HALF_OPEN, SERVICES},
    parse::{Packet, Verdict, ptr_at},
    schedule, stats,
};

/// An ICMP error (`pkt.icmp` set): translated and forwarded, or a safe
/// verdict. A separate BPF function.
#[inline(never)]
pub fn packet(ctx: &XdpContext, pkt: &mut Packet) -> u64 {
    let mut forwarded = false;
    let v = verdict(ctx, pkt, &mut forwarded);
    // One outcome per error, from how it ended: translated and sent on
    // (the rewrite done: the kernel finishes what XDP passes), or refused
    // for a reason of its own. A forwarding that failed (no route, no
    // encapsulation) has only its verdict's counter.
    let outcome = if forwarded {
        Some(if pkt.icmp == ERROR_TO_VIP { icmp::OUTCOME_TO_BACKEND } else { icmp::OUTCOME_TO_CLIENT })
    } else {
        match v.stat {
            stat::PASS_ICMP_NO_FLOW => Some(icmp::OUTCOME_PASSED_NO_FLOW),
            stat::DROP_ICMP_NO_FLOW => Some(icmp::OUTCOME_DROPPED_NO_FLOW),
            stat::DROP_ICMP_BAD_QUOTE => Some(icmp::OUTCOME_DROPPED_BAD_QUOTE),
            _ => None,
        }
    };
    if let Some(o) = outcome {
        stats::count(stat::icmp_error(pkt.icmp_kind, o));
        if o == icmp::OUTCOME_TO_BACKEND {
            stats::count(stat::ICMP_TO_BACKEND);
        } else if o == icmp::OUTCOME_TO_CLIENT {
            stats::count(stat::ICMP_TO_CLIENT);
        }
    }
    v.to_bits()
}

#[inline(always)]
fn verdict(ctx: &XdpContext, pkt: &mut Packet, forwarded: &mut bool) -> Verdict {
    if GLOBALS.get(0).is_some_and(|g| g.flags & GLOBAL_NO_ICMP != 0) {
        return Verdict::pass(stat::PASS_OTHER_PROTO);
    }
    if pkt.icmp == ERROR_TO_VIP {
        // The quote is VIP:port → client: reversed, the flow's own key.
        let e = match CONNS.get_ptr_mut(&pkt.key) {
            Some(e) => e,
            None => match HALF_OPEN.get_ptr_mut(&pkt.key) {
                Some(e) => e,
                None => return no_flow_to_vip(ctx, pkt, forwarded),
            },
        };
        // SAFETY: map value pointer from the kernel; only read.
        let st: &FlowState = unsafe { &*e };
        let Some(b) = BACKENDS.get(st.backend_id as u32) else { return Verdict::drop(stat::DROP_MALFORMED) };
        if st.flags & FLOW_DSR != 0 {
            return to_dsr_backend(ctx, pkt, b, forwarded);
        }
        let t = flow::tuple(&pkt.key, st, b, true);
        return forward(ctx, pkt, &t, false, forwarded);
    }
    // About a packet to a backend? The quote reversed reads like the
    // backend's packet of the flow: found the way the backend's are.
    let ek = EndpointKey { addr: pkt.key.src_addr, port: pkt.key.src_port, proto: pkt.key.proto, _pad: 0 };
    // SAFETY: read-only use of a value the controller writes whole.
    let Some(ep) = (unsafe { ENDPOINTS.get(&ek) }) else { return Verdict::pass(stat::PASS_OTHER_PROTO) };
    let mut mode = 0u64;
    let e = backend::find(pkt, ep, &mut mode);
    if e.is_null() {
        return Verdict::drop(stat::DROP_ICMP_NO_FLOW);
    }
    // SAFETY: map value pointer from the kernel; only read.
    let st: &FlowState = unsafe { &*e };
    if st.flags & FLOW_DSR != 0 {
        return Verdict::drop(stat::DROP_ICMP_NO_FLOW);
    }
    let Some(b) = BACKENDS.get(st.backend_id as u32) else { return Verdict::drop(stat::DROP_MALFORMED) };
    let t = flow::tuple(&pkt.flow_key, st, b, false);
    forward(ctx, pkt, &t, true, forwarded)
}

/// An error to a VIP quoting no flow: a DSR service's (its backends send
/// from the VIP, so routers' errors about their packets come here) goes to
/// the backend the keyed hash picks, the one every node picks; any other
/// is passed (the kernel has no socket for it).
#[inline(always)]
fn no_flow_to_vip(ctx: &XdpContext, pkt: &Packet, forwarded: &mut bool) -> Verdict {
    let skey = ServiceKey { addr: pkt.key.dst_addr, port: pkt.key.dst_port, proto: pkt.key.proto, _pad: 0 };
    // SAFETY: read-only use of a value the controller writes whole.
    if let Some(svc) = unsafe { SERVICES.get(&skey) }
        && svc.flags & SVC_F_DSR != 0
        && let Some((_, b)) = schedule::pick(svc, &pkt.key, true)
    {
        return to_dsr_backend(ctx, pkt, b, forwarded);
    }
    Verdict::pass(stat::PASS_ICMP_NO_FLOW)
}

/// DSR: the error goes to backend `b` as it came, inside the tunnel (the
/// backend sent the quoted packet from the VIP itself: nothing to
/// translate).
#[inline(always)]
fn to_dsr_backend(ctx: &XdpContext, pkt: &Packet, b: &lb_common::maps::Backend, forwarded: &mut bool) -> Verdict {
    let t = NatTuple { src: b.snat_addr, dst: b.addr, sport: 0, dport: 0, flags: NAT_ENCAP, direction: DIR_TO_BACKEND, mss_clamp: 0, hop: 0 };
    let route = forward::route(ctx, pkt, &t, None).map_err(|v| Verdict { stat: v.stat & forward::TOO_BIG_STAT_MASK, ..v });
    // (Untouched, the kernel could do nothing with it: the verdict says
    // why it was not sent.)
    let slot = match route {
        Ok(slot) => slot,
        Err(v) => return v,
    };
    // (Not "leaving": an ICMP checksum is never a partial one.)
    if let Err(stat) = crate::encap::ipip(ctx, pkt, &t, false) {
        return Verdict::pass(stat);
    }
    *forwarded = true;
    forward::send(ctx, pkt, slot)
}

/// Routes, rewrites and sends the error along `t` (the tuple the flow's
/// packets to the same end leave with). `from_vip`: the outer source
/// becomes `t.src` (the VIP: a client never sees a backend's address).
#[inline(always)]
fn forward(ctx: &XdpContext, pkt: &Packet, t: &NatTuple, from_vip: bool, forwarded: &mut bool) -> Verdict {
    // (An ICMP error larger than the egress MTU is the kernel's: it may
    // fragment it.)
    let route = forward::route(ctx, pkt, t, None).map_err(|v| Verdict { stat: v.stat & forward::TOO_BIG_STAT_MASK, ..v });
    if rewrite(ctx, pkt, t, from_vip as u64) == 0 {
        return Verdict::drop(stat::DROP_ICMP_BAD_QUOTE);
    }
    *forwarded = true;
    match route {
        Ok(slot) => forward::send(ctx, pkt, slot),
        Err(v) => v,
    }
}

/// The rewrite (1 when done, 0 when the quote could not be followed).
/// Each family is a separate BPF function: their frames (IPv6 addresses,
/// old and new) are not on the route's call chain nor on each other's.
#[inline(always)]
fn rewrite(ctx: &XdpContext, pkt: &Packet, t: &NatTuple, from_vip: u64) -> u64 {
    if pkt.v6 { rewrite_v6(ctx, pkt, t, from_vip) } else { rewrite_v4(ctx, pkt, t, from_vip) }
}

/// The quoted segment's checksum field, if the quote holds it: its old
/// value and where it is (UDP without a checksum: none).
#[inline(always)]
fn quoted_check(ctx: &XdpContext, pkt: &Packet, inner_l4: usize) -> Option<(*mut [u8; 2], u16)> {
    let field = inner_l4 + if pkt.key.proto == PROTO_TCP { 16 } else { 6 };
    let p = ptr_at::<[u8; 2]>(ctx, field)?;
    // SAFETY: bounds checked by ptr_at.
    let old = u16::from_ne_bytes(unsafe { *p });
    if old == 0 && pkt.key.proto != PROTO_TCP {
        return None;
    }
    Some((p, old))
}

/// Writes the quoted segment's new checksum `c` (computed from `old`) and
/// returns the ICMP checksum `ic` updated for it.
#[inline(always)]
fn set_quoted_check(pkt: &Packet, p: *mut [u8; 2], old: u16, c: u16, ports: ([u8; 2], [u8; 2], [u8; 2], [u8; 2]), ic: u16) -> u16 {
    let c = csum::update_port(csum::update_port(c, ports.0, ports.2), ports.1, ports.3);
    let c = if pkt.key.proto == PROTO_TCP { c } else { csum::udp_fixup(old, c) };
    // SAFETY: a pointer `quoted_check` bounds-checked.
    unsafe { *p = c.to_ne_bytes() };
    csum::update_u16(ic, old, c)
}

/// The quoted ports rewritten to `t`'s reverse (`t.dport` → source,
/// `t.sport` → destination); returns (old src, old dst, new src, new dst).
#[inline(always)]
fn quoted_ports(ctx: &XdpContext, inner_l4: usize, t: &NatTuple) -> Option<([u8; 2], [u8; 2], [u8; 2], [u8; 2])> {
    let p = ptr_at::<[[u8; 2]; 2]>(ctx, inner_l4)?;
    // SAFETY: bounds checked by ptr_at.
    let p = unsafe { &mut *p };
    let (os, od) = (p[0], p[1]);
    let (ns, nd) = (t.dport.to_ne_bytes(), t.sport.to_ne_bytes());
    p[0] = ns;
    p[1] = nd;
    Some((os, od, ns, nd))
}

#[inline(never)]
fn rewrite_v4(ctx: &XdpContext, pkt: &Packet, t: &NatTuple, from_vip: u64) -> u64 {
    rewrite_v4_inline(ctx, pkt, t, from_vip != 0) as u64
}

#[inline(always)]
fn rewrite_v4_inline(ctx: &XdpContext, pkt: &Packet, t: &NatTuple, from_vip: bool) -> bool {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, pkt.l3_off) else { return false };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &mut *ip };
    let mut c = u16::from_ne_bytes(ip.check);
    let new = t.dst[3].to_ne_bytes();
    c = csum::update_addr(c, ip.dst_addr, new);
    ip.dst_addr = new;
    if from_vip {
        let new = t.src[3].to_ne_bytes();
        c = csum::update_addr(c, ip.src_addr, new);
        ip.src_addr = new;
    }
    ip.check = c.to_ne_bytes();
    let Some(h) = ptr_at::<[u8; 4]>(ctx, pkt.l4_off) else { return false };
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { &mut *h };
    let mut ic = u16::from_ne_bytes([h[2], h[3]]);
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, pkt.inner_l3) else { return false };
    // SAFETY: bounds checked by ptr_at.
    let inner = unsafe { &mut *inner };
    // The quote becomes the packet as the other end sent or received it:
    // source `t.dst`, destination `t.src`.
    let (os, od) = (inner.src_addr, inner.dst_addr);
    let (ns, nd) = (t.dst[3].to_ne_bytes(), t.src[3].to_ne_bytes());
    let old_check = u16::from_ne_bytes(inner.check);
    let new_check = csum::update_addr(csum::update_addr(old_check, os, ns), od, nd);
    inner.src_addr = ns;
    inner.dst_addr = nd;
    inner.check = new_check.to_ne_bytes();
    // One delta for the ICMP checksum and the quoted segment's (both cover
    // these addresses).
    let delta = addr4_delta(os, ns) + addr4_delta(od, nd);
    ic = csum::update_u16(apply(ic, delta), old_check, new_check);
    finish_quote(ctx, pkt, t, pkt.inner_l3 + Ipv4Hdr::LEN, ic, delta)
}

#[inline(never)]
fn rewrite_v6(ctx: &XdpContext, pkt: &Packet, t: &NatTuple, from_vip: u64) -> u64 {
    rewrite_v6_inline(ctx, pkt, t, from_vip != 0) as u64
}

#[inline(always)]
fn rewrite_v6_inline(ctx: &XdpContext, pkt: &Packet, t: &NatTuple, from_vip: bool) -> bool {
    let Some(h) = ptr_at::<[u8; 4]>(ctx, pkt.l4_off) else { return false };
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { &mut *h };
    let mut ic = u16::from_ne_bytes([h[2], h[3]]);
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, pkt.l3_off) else { return false };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &mut *ip };
    // The ICMPv6 checksum covers the outer addresses (pseudo-header).
    let mut delta = replace(&mut ip.dst_addr, &t.dst);
    if from_vip {
        delta += replace(&mut ip.src_addr, &t.src);
    }
    ic = apply(ic, delta);
    let Some(inner) = ptr_at::<Ipv6Hdr>(ctx, pkt.inner_l3) else { return false };
    // SAFETY: bounds checked by ptr_at.
    let inner = unsafe { &mut *inner };
    // Source `t.dst`, destination `t.src`: one delta for the ICMP checksum
    // and the quoted segment's (both cover these addresses).
    let delta = replace(&mut inner.src_addr, &t.dst) + replace(&mut inner.dst_addr, &t.src);
    ic = apply(ic, delta);
    finish_quote(ctx, pkt, t, pkt.inner_l3 + Ipv6Hdr::LEN, ic, delta)
}

/// The end of both families' rewrite: the quoted ports, the quoted
/// segment's checksum (its addresses changed by `delta`), and the ICMP
/// checksum `ic` updated for them and written.
#[inline(always)]
fn finish_quote(ctx: &XdpContext, pkt: &Packet, t: &NatTuple, inner_l4: usize, ic: u16, delta: u32) -> bool {
    let Some(ports) = quoted_ports(ctx, inner_l4, t) else { return false };
    let mut ic = csum::update_port(csum::update_port(ic, ports.0, ports.2), ports.1, ports.3);
    if let Some((p, old)) = quoted_check(ctx, pkt, inner_l4) {
        ic = set_quoted_check(pkt, p, old, apply(old, delta), ports, ic);
    }
    let Some(h) = ptr_at::<[u8; 4]>(ctx, pkt.l4_off) else { return false };
    let b = ic.to_ne_bytes();
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*h)[2] = b[0];
        (*h)[3] = b[1];
    }
    true
}

/// The one's complement delta (`~m + m'` per 16-bit word, unfolded) of
/// replacing IPv4 address `old` with `new` (packet bytes).
#[inline(always)]
fn addr4_delta(old: [u8; 4], new: [u8; 4]) -> u32 {
    let w = |a: u8, b: u8| u16::from_ne_bytes([a, b]) as u32;
    (0xffff - w(old[0], old[1])) + (0xffff - w(old[2], old[3])) + w(new[0], new[1]) + w(new[2], new[3])
}

/// Replaces the 16 address bytes at `field` (in the packet) with `new`;
/// returns the one's complement delta of that (RFC 1624: `~m + m'` per
/// 16-bit word), unfolded. In place, 16 bits at a time (IPv6 addresses in
/// a frame are 2-byte aligned): no byte-wise copies spilled to the stack.
#[inline(always)]
fn replace(field: &mut [u8; 16], new: &lb_common::maps::Addr) -> u32 {
    let words = field.as_mut_ptr() as *mut u16;
    let mut sum = 0u32;
    for (i, &n) in new.iter().enumerate() {
        // Each map word's bytes are the packet's, in order: on this
        // little-endian target its low half is the first 16-bit word.
        let (lo, hi) = ((n & 0xffff) as u16, (n >> 16) as u16);
        // SAFETY: `field` holds eight 16-bit words, 2-byte aligned.
        unsafe {
            let (p0, p1) = (words.add(2 * i), words.add(2 * i + 1));
            sum += (0xffff - *p0 as u32) + (0xffff - *p1 as u32) + lo as u32 + hi as u32;
            *p0 = lo;
            *p1 = hi;
        }
    }
    sum
}

/// A checksum with an unfolded delta applied: `~(~c + delta)`.
#[inline(always)]
fn apply(c: u16, delta: u32) -> u16 {
    // At most 4 × 16 words of 17 bits plus 16 bits: fold the carries twice.
    let sum = (!c as u32) + (delta & 0xffff) + (delta >> 16);
    !csum::fold(sum)
}
