//! Sending a rewritten packet on: FIB lookup for the next hop, then XDP_TX
//! (same interface) or a devmap redirect. Whatever XDP cannot finish (an
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
use lb_common::stats;

use crate::{maps::DEVMAP, nat, parse::{Packet, Verdict}};

const AF_INET: u8 = 2;

#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Packet, to_backend: bool, nat_port: u16) -> Verdict {
    if pkt.vlan {
        // The egress may be another VLAN or none: the kernel's VLAN devices
        // know which tag (if any) the rewritten packet needs.
        return Verdict::pass(stats::PASS_VLAN);
    }
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
    let (sport, dport) = if to_backend {
        (pkt.key.src_port, nat_port)
    } else {
        (nat_port, pkt.key.dst_port)
    };
    p.sport = sport;
    p.dport = dport;
    let ingress = ctx.ingress_ifindex() as u32;
    p.ifindex = ingress;

    // SAFETY: helper call with a correctly sized, initialised struct.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut p as *mut FibParams,
            mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
            Verdict::pass(stats::PASS_NO_NEIGH)
        } else {
            Verdict::pass(stats::PASS_NO_ROUTE)
        };
    }
    let same_iface = p.ifindex == ingress;
    // Check the redirect target before touching the packet: once the MACs
    // are rewritten the kernel would no longer accept it.
    if !same_iface && DEVMAP.get(p.ifindex).is_none() {
        return Verdict::pass(stats::PASS_NOT_MANAGED_IFACE);
    }
    if !nat::decrement_ttl(pkt) {
        return Verdict::pass(stats::PASS_TTL);
    }
    // SAFETY: `eth` was bounds-checked by the parser.
    unsafe {
        (*pkt.eth).dst_addr = p.dmac;
        (*pkt.eth).src_addr = p.smac;
    }
    if same_iface {
        return Verdict { action: xdp_action::XDP_TX, stat: stats::TX };
    }
    // The entry was present a moment ago; should it vanish in between, the
    // helper returns the low bits of the flags: drop.
    let action = DEVMAP
        .redirect(p.ifindex, xdp_action::XDP_DROP as u64)
        .unwrap_or(xdp_action::XDP_DROP);
    Verdict { action, stat: stats::REDIRECT }
}
