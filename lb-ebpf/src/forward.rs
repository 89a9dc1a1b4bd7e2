//! Sending a rewritten packet on: the next hop (from a one-second cache of
//! FIB lookups), then XDP_TX (same interface) or a devmap redirect. Whatever XDP cannot finish (an
//! unresolved neighbour, an interface xlb does not manage, TTL expiry) goes
//! to the kernel, already rewritten, so the kernel completes it.

use core::mem;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use lb_common::{
    maps::{NextHop, NEXT_HOP_TTL_NS},
    stats,
};

use crate::{
    maps::{DEVMAP, NEXT_HOP},
    nat,
    parse::{Packet, Verdict},
};

const AF_INET: u8 = 2;

#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Packet, to_backend: bool, nat_port: u16, now: u64) -> Verdict {
    if pkt.vlan {
        // The egress may be another VLAN or none: the kernel's VLAN devices
        // know which tag (if any) the rewritten packet needs.
        return Verdict::pass(stats::PASS_VLAN);
    }
    // SAFETY: `ip` was bounds-checked by the parser.
    let dst = u32::from_ne_bytes(unsafe { (*pkt.ip).dst_addr });
    let hop = match NEXT_HOP.get_ptr(&dst) {
        // SAFETY: map value pointer from the kernel.
        Some(h) if unsafe { (*h).expires_ns } > now => unsafe { *h },
        _ => match fib(ctx, pkt, to_backend, nat_port) {
            Ok(h) => {
                let h = NextHop { expires_ns: now + NEXT_HOP_TTL_NS, ..h };
                let _ = NEXT_HOP.insert(&dst, &h, 0);
                h
            }
            Err(v) => return v,
        },
    };
    let ingress = ctx.ingress_ifindex() as u32;
    let same_iface = hop.ifindex == ingress;
    // Check the redirect target before touching the packet: once the MACs
    // are rewritten the kernel would no longer accept it.
    if !same_iface && DEVMAP.get(hop.ifindex).is_none() {
        return Verdict::pass(stats::PASS_NOT_MANAGED_IFACE);
    }
    if !nat::decrement_ttl(pkt) {
        return Verdict::pass(stats::PASS_TTL);
    }
    // SAFETY: `eth` was bounds-checked by the parser.
    unsafe {
        (*pkt.eth).dst_addr = hop.dmac;
        (*pkt.eth).src_addr = hop.smac;
    }
    if same_iface {
        return Verdict { action: xdp_action::XDP_TX, stat: stats::TX };
    }
    // The entry was present a moment ago; should it vanish in between, the
    // helper returns the low bits of the flags: drop.
    let action = DEVMAP
        .redirect(hop.ifindex, xdp_action::XDP_DROP as u64)
        .unwrap_or(xdp_action::XDP_DROP);
    Verdict { action, stat: stats::REDIRECT }
}

/// The kernel's FIB lookup for the rewritten packet; what XDP cannot finish
/// (unresolved neighbour, no route) is a counted pass to the kernel.
#[inline(always)]
fn fib(ctx: &XdpContext, pkt: &Packet, to_backend: bool, nat_port: u16) -> Result<NextHop, Verdict> {
    // SAFETY: zeroed is a valid bit pattern for this plain C struct.
    let mut p: FibParams = unsafe { mem::zeroed() };
    // SAFETY: `ip` was bounds-checked by the parser.
    let ip = unsafe { &*pkt.ip };
    p.family = AF_INET;
    p.l4_protocol = pkt.key.proto;
    p.__bindgen_anon_1.tot_len = u16::from_be_bytes(ip.tot_len);
    p.__bindgen_anon_2.tos = ip.tos;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.src_addr);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.dst_addr);
    // Ports as they are after the rewrite (NAT changed one of them).
    let (sport, dport) = if to_backend { (pkt.key.src_port, nat_port) } else { (nat_port, pkt.key.dst_port) };
    p.sport = sport;
    p.dport = dport;
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
