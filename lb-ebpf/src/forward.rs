//! Sending a packet on, in two steps so the verdict is known before the
//! packet is touched: [`route`] finds the next hop of the packet's
//! outgoing tuple (from a one-second cache of FIB lookups) and decides
//! XDP_TX, a devmap redirect, or a pass to the kernel; [`send`] then
//! finishes a packet already rewritten (TTL, MACs). Whatever XDP cannot
//! finish (an unresolved neighbour, an interface xlb does not manage, TTL
//! expiry, a VLAN tag) goes to the kernel, already rewritten, so the kernel
//! completes it.

use core::mem;

use aya_ebpf::{
    bindings::xdp_md,
    bindings::{BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, xdp_action},
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use lb_common::{
    maps::{Addr, DIR_TO_CLIENT, NAT_ENCAP, NEXT_HOP_MANAGED, NEXT_HOP_SLOTS, NEXT_HOP_TTL, NatTuple, NextHop, addr_v4, neighbour_hash},
    stats,
};
use network_types::eth::EthHdr;

use crate::{
    maps::{DEVMAP, FIB_SCRATCH, NEXT_HOP},
    nat,
    parse::{Packet, Verdict, ptr_at},
    wire,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The route of a packet that will leave with tuple `t`: the index of
/// this CPU's `XLB_NEXT_HOP` slot holding its next hop, or the pass verdict
/// when XDP cannot forward it. Reads the packet, never writes it.
/// In a `PASS_TOO_BIG` verdict from [`route`], the usable MTU is the
/// stat's bits from here up (strip with [`TOO_BIG_STAT_MASK`]).
pub const TOO_BIG_MTU_SHIFT: u32 = 16;
pub const TOO_BIG_STAT_MASK: u32 = (1 << TOO_BIG_MTU_SHIFT) - 1;

/// `hop_memo`: where the neighbour towards a client is remembered (the
/// flow's `hop`), when there is a flow entry to remember it in.
#[inline(always)]
pub fn route(ctx: &XdpContext, pkt: &Packet, t: &NatTuple, hop_memo: Option<*mut u32>) -> Result<u32, Verdict> {
    let memo = hop_memo.unwrap_or(core::ptr::null_mut());
    match xlb_route(ctx.ctx, pkt, t, memo) {
        slot if slot < NEXT_HOP_SLOTS as u64 => Ok(slot as u32),
        v => Err(Verdict::from_bits(v)),
    }
}

/// [`route`] as a global BPF function (exported by the linker, see
/// build.rs): its own stack frame and one verification for every caller.
/// The slot index, or a pass verdict (`Verdict::to_bits`, always larger).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn xlb_route(ctx: *mut xdp_md, pkt: *const Packet, t: *const NatTuple, memo: *mut u32) -> u64 {
    let ctx = &XdpContext::new(ctx);
    // Global function arguments may be null as far as the verifier knows.
    // SAFETY: valid pointers from `route`, or null.
    let (Some(pkt), Some(t)) = (unsafe { pkt.as_ref() }, unsafe { t.as_ref() }) else {
        return Verdict::pass(stats::PASS_NO_ROUTE).to_bits();
    };
    match route_inline(ctx, pkt, t, memo) {
        Ok(slot) => slot as u64,
        Err(v) => v.to_bits(),
    }
}

#[inline(always)]
fn route_inline(ctx: &XdpContext, pkt: &Packet, t: &NatTuple, hop_memo: *mut u32) -> Result<u32, Verdict> {
    if pkt.vlan {
        // The egress may be another VLAN or none: the kernel's VLAN devices
        // know which tag (if any) the rewritten packet needs.
        return Err(Verdict::pass(stats::PASS_VLAN));
    }
    let out_len = out_len(pkt, t);
    let to_client = t.direction == DIR_TO_CLIENT;
    let key = hop_key(t);
    let now = hop_clock();
    let (slot, hop) = match cached(key, now) {
        Some(h) => h,
        None => {
            let (h, neighbour) = fib(ctx, pkt, t, out_len)?;
            let slot_key = if to_client { neighbour_hash(&neighbour) } else { key };
            let slot = slot_key & (NEXT_HOP_SLOTS - 1);
            let Some(p) = NEXT_HOP.get_ptr_mut(slot) else { return Err(Verdict::pass(stats::PASS_NO_ROUTE)) };
            // SAFETY: this CPU's slot.
            let p = unsafe { &mut *p };
            *p = NextHop { hop: slot_key, expires: now + NEXT_HOP_TTL, ..h };
            if to_client && slot_key != t.hop && !hop_memo.is_null() {
                // SAFETY: the entry's own field, in the map.
                unsafe { *hop_memo = slot_key };
            }
            (slot, &*p)
        }
    };
    usable(ctx, pkt, hop, out_len)?;
    Ok(slot)
}

/// [`route`] when the next hop is cached and takes the packet as it is:
/// its slot; `None` for anything else (a cache miss, too big, TTL, an
/// interface not managed, a VLAN tag), which [`route`] then decides. Reads
/// only: no FIB lookup, no slot or flow written.
#[inline(always)]
pub fn cached_route(ctx: &XdpContext, pkt: &Packet, t: &NatTuple) -> Option<&'static NextHop> {
    if pkt.vlan {
        return None;
    }
    let (_, hop) = cached(hop_key(t), hop_clock())?;
    usable(ctx, pkt, hop, out_len(pkt, t)).ok()?;
    Some(hop)
}

/// The IP length a packet leaves with (an encapsulation adds its header).
#[inline(always)]
fn out_len(pkt: &Packet, t: &NatTuple) -> u32 {
    pkt.ip_len + if t.flags & NAT_ENCAP != 0 { crate::encap::OUTER_LEN as u32 } else { 0 }
}

/// The next-hop key of tuple `t`. Towards a backend: its address. Towards
/// a client: its next hop once known (shared by everything behind one
/// gateway), else its address (right when it is on-link).
#[inline(always)]
fn hop_key(t: &NatTuple) -> u32 {
    if t.direction == DIR_TO_CLIENT && t.hop != 0 { t.hop } else { neighbour_hash(&t.dst) }
}

/// Whether next hop `hop` can take a packet of `out_len` bytes from XDP,
/// else the pass verdict that says why not.
#[inline(always)]
fn usable(ctx: &XdpContext, pkt: &Packet, hop: &NextHop, out_len: u32) -> Result<(), Verdict> {
    if hop.mtu != 0 && out_len > hop.mtu as u32 {
        // The MTU usable by the packet as it came (the egress MTU less the
        // encapsulation) rides in the verdict for `too_big::answer`.
        let usable = hop.mtu as u32 - (out_len - pkt.ip_len);
        return Err(Verdict::pass(stats::PASS_TOO_BIG | usable << TOO_BIG_MTU_SHIFT));
    }
    let same_iface = hop.ifindex == ctx.ingress_ifindex() as u32;
    // The redirect target is known before the packet is touched (once the
    // MACs are rewritten the kernel would no longer accept it); it was
    // looked up when the slot was filled, not per packet.
    if !same_iface && hop.flags & NEXT_HOP_MANAGED == 0 {
        return Err(Verdict::pass(stats::PASS_NOT_MANAGED_IFACE));
    }
    if !nat::ttl_allows_forwarding(ctx, pkt) {
        // The kernel sends the ICMP time exceeded.
        return Err(Verdict::pass(stats::PASS_TTL));
    }
    Ok(())
}

/// The clock of the next-hop slots' expiry: jiffies, read here for every
/// path (a slot written against one clock and read against another
/// would never expire, or always be stale).
#[inline(always)]
fn hop_clock() -> u64 {
    crate::conntrack::now()
}

/// This CPU's slot for `key` and its next hop, if it holds `key`, fresh.
#[inline(always)]
fn cached(key: u32, now: u64) -> Option<(u32, &'static NextHop)> {
    let slot = key & (NEXT_HOP_SLOTS - 1);
    let p = NEXT_HOP.get_ptr(slot)?;
    // SAFETY: this CPU's slot.
    let h = unsafe { &*p };
    (h.hop == key && h.expires > now).then_some((slot, h))
}

/// Finishes a packet already rewritten to leave by next-hop slot `slot`
/// (from [`route`], same packet, same CPU): TTL, MACs, XDP_TX or the
/// redirect.
#[inline(always)]
pub fn send(ctx: &XdpContext, pkt: &Packet, slot: u32) -> Verdict {
    let Some(hop) = NEXT_HOP.get_ptr(slot) else { return Verdict::drop(stats::DROP_MALFORMED) };
    // SAFETY: this CPU's slot, filled by `route` for this packet.
    send_to(ctx, pkt, unsafe { &*hop })
}

/// [`send`] by next hop `hop` (this CPU's slot, read for this packet).
#[inline(always)]
pub fn send_to(ctx: &XdpContext, pkt: &Packet, hop: &NextHop) -> Verdict {
    nat::decrement_ttl(ctx, pkt);
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return Verdict::drop(stats::DROP_MALFORMED) };
    // SAFETY: bounds-checked just above; the slot is a map value.
    unsafe {
        copy_mac(&raw mut (*eth).dst_addr, &hop.dmac);
        copy_mac(&raw mut (*eth).src_addr, &hop.smac);
    }
    if hop.ifindex == ctx.ingress_ifindex() as u32 {
        return Verdict { action: xdp_action::XDP_TX, stat: stats::TX };
    }
    // The entry was present a moment ago; should it vanish in between, the
    // helper returns the low bits of the flags: drop.
    let action = DEVMAP.redirect(hop.ifindex, xdp_action::XDP_DROP as u64).unwrap_or(xdp_action::XDP_DROP);
    Verdict { action, stat: stats::REDIRECT }
}

/// A MAC address from a next-hop slot into the Ethernet header: a word
/// and a half-word each way (`wire`), not six bytes.
///
/// # Safety
/// `field` is in the bounds-checked Ethernet header.
#[inline(always)]
unsafe fn copy_mac(field: *mut [u8; 6], mac: &[u8; 6]) {
    let (to, from) = (field as *mut u8, mac.as_ptr());
    // SAFETY: bytes 0-3 and 4-5 of both six-byte fields.
    unsafe {
        wire::store_u32(to as *mut [u8; 4], wire::load_u32(from as *const [u8; 4]));
        wire::store_u16(to.add(4) as *mut [u8; 2], wire::load_u16(from.add(4) as *const [u8; 2]));
    }
}

/// The kernel's FIB lookup for the rewritten packet (`out_len` bytes of
/// IP): the next hop and the neighbour's address (the gateway, or the
/// destination on-link). What XDP cannot finish (unresolved neighbour, no
/// route, too big) is a counted pass to the kernel.
#[inline(always)]
fn fib(ctx: &XdpContext, pkt: &Packet, t: &NatTuple, out_len: u32) -> Result<(NextHop, Addr), Verdict> {
    crate::stats::count(stats::FIB_LOOKUPS);
    // In per-CPU scratch space: 64 bytes more on the stack would pass the
    // 512-byte limit of the deepest call chain.
    let Some(p) = FIB_SCRATCH.get_ptr_mut(0) else { return Err(Verdict::pass(stats::PASS_NO_ROUTE)) };
    // SAFETY: this CPU's scratch slot; zeroed is a valid bit pattern.
    let p = unsafe {
        core::ptr::write_bytes(p, 0, 1);
        &mut *p
    };
    p.l4_protocol = pkt.key.proto;
    p.__bindgen_anon_1.tot_len = out_len as u16;
    // The tuple as it is after the rewrite.
    if pkt.v6 {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = t.src;
        p.__bindgen_anon_4.ipv6_dst = t.dst;
    } else {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = t.src[3];
        p.__bindgen_anon_4.ipv4_dst = t.dst[3];
    }
    p.sport = t.sport;
    p.dport = t.dport;
    p.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: helper call with a correctly sized, initialised struct.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx as *mut _, p as *mut FibParams, mem::size_of::<FibParams>() as i32, 0) };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        // The kernel put the neighbour's address where the destination was
        // (and said AF_INET6 for an IPv4 route via an IPv6 gateway).
        // SAFETY: plain reads of a union of integers.
        let neighbour = unsafe { if p.family == AF_INET6 { p.__bindgen_anon_4.ipv6_dst } else { addr_v4(p.__bindgen_anon_4.ipv4_dst) } };
        // SAFETY: as above.
        let mtu = unsafe { p.__bindgen_anon_1.mtu_result };
        let flags = if DEVMAP.get(p.ifindex).is_some() { NEXT_HOP_MANAGED } else { 0 };
        Ok((NextHop { hop: 0, ifindex: p.ifindex, smac: p.smac, dmac: p.dmac, mtu, flags, _pad: 0, expires: 0 }, neighbour))
    } else if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        Err(Verdict::pass(stats::PASS_NO_NEIGH))
    } else if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        // The route's MTU (the kernel sets it for this verdict), less what
        // the encapsulation adds: what the packet as it came may use.
        // SAFETY: a plain read of a union of integers.
        let mtu = unsafe { p.__bindgen_anon_1.mtu_result } as u32;
        let usable = mtu.saturating_sub(out_len - pkt.ip_len);
        Err(Verdict::pass(stats::PASS_TOO_BIG | usable << TOO_BIG_MTU_SHIFT))
    } else {
        Err(Verdict::pass(stats::PASS_NO_ROUTE))
    }
}
