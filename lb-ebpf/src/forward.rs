//! Sending a packet on, in two steps so the verdict is known before the
//! packet is touched: [`route`] finds the next hop of the packet's
//! outgoing tuple (from a one-second cache of FIB lookups) and decides
//! XDP_TX, a devmap redirect, or a pass to the kernel; [`send`] then
//! finishes a packet already rewritten (TTL, MACs). Whatever XDP cannot
//! finish (an unresolved neighbour, an interface xlb does not manage, TTL
//! expiry, a VLAN tag) goes to the kernel, already rewritten, so the kernel
//! completes it.

use core::mem;

use network_types::eth::EthHdr;
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use lb_common::{
    maps::{FlowEntry, NextHop, NEXT_HOP_TTL_NS},
    stats,
};

use crate::{
    maps::{DEVMAP, NEXT_HOP},
    nat,
    parse::{ptr_at, Packet, Verdict},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Where a packet that XDP forwards itself goes.
pub struct Route {
    pub hop: NextHop,
    /// Out of the interface it came in on (XDP_TX).
    pub same_iface: bool,
}

/// The route of a packet that will leave with `e`'s tuple, or the pass
/// verdict when XDP cannot forward it. Reads the packet, never writes it.
#[inline(always)]
pub fn route(ctx: &XdpContext, pkt: &Packet, e: &FlowEntry, now: u64) -> Result<Route, Verdict> {
    if pkt.vlan {
        // The egress may be another VLAN or none: the kernel's VLAN devices
        // know which tag (if any) the rewritten packet needs.
        return Err(Verdict::pass(stats::PASS_VLAN));
    }
    let dst = &e.nat_dst;
    let hop = match NEXT_HOP.get_ptr(dst) {
        // SAFETY: map value pointer from the kernel.
        Some(h) if unsafe { (*h).expires_ns } > now => unsafe { *h },
        _ => {
            let h = fib(ctx, pkt, e)?;
            let h = NextHop { expires_ns: now + NEXT_HOP_TTL_NS, ..h };
            let _ = NEXT_HOP.insert(dst, &h, 0);
            h
        }
    };
    let same_iface = hop.ifindex == ctx.ingress_ifindex() as u32;
    // The redirect target is checked before the packet is touched: once
    // the MACs are rewritten the kernel would no longer accept it.
    if !same_iface && DEVMAP.get(hop.ifindex).is_none() {
        return Err(Verdict::pass(stats::PASS_NOT_MANAGED_IFACE));
    }
    if !nat::ttl_allows_forwarding(ctx, pkt) {
        // The kernel sends the ICMP time exceeded.
        return Err(Verdict::pass(stats::PASS_TTL));
    }
    Ok(Route { hop, same_iface })
}

/// Finishes a packet already rewritten for `r`: TTL, MACs, XDP_TX or the
/// redirect.
#[inline(always)]
pub fn send(ctx: &XdpContext, pkt: &Packet, r: &Route) -> Verdict {
    nat::decrement_ttl(ctx, pkt);
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return Verdict::drop(stats::DROP_MALFORMED) };
    // SAFETY: bounds-checked just above.
    unsafe {
        (*eth).dst_addr = r.hop.dmac;
        (*eth).src_addr = r.hop.smac;
    }
    if r.same_iface {
        return Verdict { action: xdp_action::XDP_TX, stat: stats::TX };
    }
    // The entry was present a moment ago; should it vanish in between, the
    // helper returns the low bits of the flags: drop.
    let action = DEVMAP
        .redirect(r.hop.ifindex, xdp_action::XDP_DROP as u64)
        .unwrap_or(xdp_action::XDP_DROP);
    Verdict { action, stat: stats::REDIRECT }
}

/// The kernel's FIB lookup for the rewritten packet; what XDP cannot finish
/// (unresolved neighbour, no route) is a counted pass to the kernel.
#[inline(always)]
fn fib(ctx: &XdpContext, pkt: &Packet, e: &FlowEntry) -> Result<NextHop, Verdict> {
    // SAFETY: zeroed is a valid bit pattern for this plain C struct.
    let mut p: FibParams = unsafe { mem::zeroed() };
    p.l4_protocol = pkt.key.proto;
    p.__bindgen_anon_1.tot_len = pkt.ip_len as u16;
    // The tuple as it is after the rewrite.
    if pkt.v6 {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = e.nat_src;
        p.__bindgen_anon_4.ipv6_dst = e.nat_dst;
    } else {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = e.nat_src[3];
        p.__bindgen_anon_4.ipv4_dst = e.nat_dst[3];
    }
    p.sport = e.nat_sport;
    p.dport = e.nat_dport;
    p.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: helper call with a correctly sized, initialised struct.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx as *mut _, &mut p as *mut FibParams, mem::size_of::<FibParams>() as i32, 0) };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        Ok(NextHop { ifindex: p.ifindex, smac: p.smac, dmac: p.dmac, expires_ns: 0 })
    } else if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        Err(Verdict::pass(stats::PASS_NO_NEIGH))
    } else {
        Err(Verdict::pass(stats::PASS_NO_ROUTE))
    }
}
