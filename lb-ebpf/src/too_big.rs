//! Answering a packet that does not fit its egress MTU after NAT or
//! encapsulation: "fragmentation needed" (IPv4, when DF is set) or "packet
//! too big" (IPv6, always), from the VIP, quoting the packet as it came
//! and carrying the MTU it may use, built in place and sent back out of
//! the interface it came in on (XDP_TX). The sender lowers its path MTU
//! for the tuple it used, which is what the quote names; the kernel's own
//! error (for a packet handed to it already rewritten) would name the
//! rewritten tuple, which the sender never used.
//!
//! Only in native mode: in generic mode a frame larger than the MTU is
//! usually a GSO super-frame of a local sender, which the kernel segments.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    csum,
    maps::{Addr, GLOBAL_NO_ICMP, IFACE_GENERIC},
    stats,
};
use network_types::eth::EthHdr;

use crate::{
    maps::{GLOBALS, IFACES},
    parse::{Packet, Verdict, ptr_at},
};

/// IPv4 header + ICMP header in front of the quote.
const V4_PREFIX: usize = 20 + 8;
/// IPv6 header + ICMPv6 header in front of the quote.
const V6_PREFIX: usize = 40 + 8;
/// The quote: the packet's IP header and the first 8 bytes of its
/// segment (its ports: all the sender's stack needs to find the socket).
const V4_QUOTE: usize = 20 + 8;
const V6_QUOTE: usize = 40 + 8;
/// IPv6's minimum MTU: a packet too big is never told to go below it.
const V6_MIN_MTU: u32 = 1280;

/// Whether a packet too big for its egress is answered here: native
/// mode (see the module doc), untagged, and IPv6 or IPv4 with DF set
/// (else the kernel may fragment it).
#[inline(always)]
pub fn answerable(ctx: &XdpContext, pkt: &Packet) -> bool {
    if pkt.vlan || GLOBALS.get(0).is_some_and(|g| g.flags & GLOBAL_NO_ICMP != 0) {
        return false;
    }
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: read-only use of a value the controller writes whole.
    if unsafe { IFACES.get(&ifindex) }.is_some_and(|f| f & IFACE_GENERIC != 0) {
        return false;
    }
    if pkt.v6 {
        return true;
    }
    // SAFETY: bounds checked by ptr_at.
    ptr_at::<[u8; 2]>(ctx, pkt.l3_off + 6).is_some_and(|f| unsafe { (*f)[0] } & 0x40 != 0)
}

/// The error answering `pkt` (not rewritten) from `vip` with MTU `mtu`,
/// built in place; `None` if it could not be built (nothing was sent).
#[inline(always)]
pub fn answer(ctx: &XdpContext, pkt: &Packet, vip: &Addr, mtu: u32) -> Option<Verdict> {
    let v = if pkt.v6 { answer_v6(ctx, pkt, vip, mtu.max(V6_MIN_MTU) as u64) } else { answer_v4(ctx, pkt, vip, mtu as u64) };
    (v != 0).then(|| Verdict::from_bits(v))
}

/// The one's complement sum of the `N` bytes at `off`, read in place (16
/// bits at a time: the offsets used are even), unfolded.
#[inline(always)]
fn sum_at<const N: usize>(ctx: &XdpContext, off: usize, initial: u32) -> Option<u32> {
    let p = ptr_at::<[u8; N]>(ctx, off)? as *const u16;
    let mut sum = initial;
    for i in 0..N / 2 {
        // SAFETY: within the N bytes bounds-checked by ptr_at.
        sum += unsafe { *p.add(i) } as u32;
    }
    Some(sum)
}

/// Grows the frame by `prefix` bytes at the front and cuts it to
/// `total`, moving the Ethernet header to the new front with its MACs
/// swapped (back to where the packet came from).
#[inline(always)]
fn reframe(ctx: &XdpContext, prefix: usize, total: usize) -> Option<()> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let (src, dst) = unsafe { ((*eth).src_addr, (*eth).dst_addr) };
    // SAFETY: plain helper calls; every packet pointer is re-derived after.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(prefix as i32)) } != 0 {
        return None;
    }
    let len = ctx.data_end() - ctx.data();
    if len < total {
        return None;
    }
    // SAFETY: as above.
    if len > total && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((len - total) as i32)) } != 0 {
        return None;
    }
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst_addr = src;
        (*eth).src_addr = dst;
        (*eth).ether_type = (*ptr_at::<EthHdr>(ctx, prefix)?).ether_type;
    }
    Some(())
}

#[inline(never)]
fn answer_v4(ctx: &XdpContext, pkt: &Packet, vip: &Addr, mtu: u64) -> u64 {
    build_v4(ctx, pkt, vip, mtu as u32).map_or(0, Verdict::to_bits)
}

#[inline(never)]
fn answer_v6(ctx: &XdpContext, pkt: &Packet, vip: &Addr, mtu: u64) -> u64 {
    build_v6(ctx, pkt, vip, mtu as u32).map_or(0, Verdict::to_bits)
}

#[inline(always)]
fn build_v4(ctx: &XdpContext, pkt: &Packet, vip: &Addr, mtu: u32) -> Option<Verdict> {
    let sender = pkt.key.src_addr[3].to_ne_bytes();
    let total = EthHdr::LEN + V4_PREFIX + V4_QUOTE;
    reframe(ctx, V4_PREFIX, total)?;
    let mtu = (mtu.min(0xffff) as u16).to_be_bytes();
    // The quote, now behind the new headers: summed for the ICMP checksum.
    let icmp_sum = sum_at::<V4_QUOTE>(ctx, EthHdr::LEN + V4_PREFIX, csum::sum_bytes(&[lb_common::icmp::V4_DEST_UNREACH, 4, 0, 0, 0, 0, mtu[0], mtu[1]], 0))?;
    let icmp_check = !csum::fold(icmp_sum);
    let out = ptr_at::<[u8; V4_PREFIX]>(ctx, EthHdr::LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let out = unsafe { &mut *out };
    let tot = ((V4_PREFIX + V4_QUOTE) as u16).to_be_bytes();
    let src = vip[3].to_ne_bytes();
    *out = [
        0x45,
        0,
        tot[0],
        tot[1],
        0,
        0,
        0,
        0,
        64,
        1,
        0,
        0,
        src[0],
        src[1],
        src[2],
        src[3],
        sender[0],
        sender[1],
        sender[2],
        sender[3],
        lb_common::icmp::V4_DEST_UNREACH,
        4,
        0,
        0,
        0,
        0,
        mtu[0],
        mtu[1],
    ];
    let ip_check = csum::checksum(&out[..20]).to_ne_bytes();
    out[10] = ip_check[0];
    out[11] = ip_check[1];
    let c = icmp_check.to_ne_bytes();
    out[22] = c[0];
    out[23] = c[1];
    Some(Verdict { action: xdp_action::XDP_TX, stat: stats::ICMP_TOO_BIG_SENT })
}

#[inline(always)]
fn build_v6(ctx: &XdpContext, pkt: &Packet, vip: &Addr, mtu: u32) -> Option<Verdict> {
    let total = EthHdr::LEN + V6_PREFIX + V6_QUOTE;
    reframe(ctx, V6_PREFIX, total)?;
    let mtu_hi = (mtu >> 16) as u16;
    let mtu_lo = mtu as u16;
    // The checksum: the pseudo-header (source, destination, length, next
    // header), the ICMPv6 header, the quote.
    let mut sum = addr_sum(vip) + addr_sum(&pkt.key.src_addr);
    sum += ((8 + V6_QUOTE) as u16).to_be() as u32 + 58u16.to_be() as u32;
    sum += u16::from_ne_bytes([lb_common::icmp::V6_PACKET_TOO_BIG, 0]) as u32 + mtu_hi.to_be() as u32 + mtu_lo.to_be() as u32;
    let sum = sum_at::<V6_QUOTE>(ctx, EthHdr::LEN + V6_PREFIX, sum)?;
    let c = !csum::fold(sum);
    let ip = ptr_at::<[u16; 24]>(ctx, EthHdr::LEN)? as *mut u16;
    // SAFETY: 48 bytes (IPv6 header, ICMPv6 header) bounds-checked by
    // ptr_at, written 16 bits at a time (the offset is even).
    unsafe {
        *ip = u16::from_ne_bytes([0x60, 0]);
        *ip.add(1) = 0;
        *ip.add(2) = ((8 + V6_QUOTE) as u16).to_be();
        *ip.add(3) = u16::from_ne_bytes([58, 64]);
        write_addr(ip.add(4), vip);
        write_addr(ip.add(12), &pkt.key.src_addr);
        *ip.add(20) = u16::from_ne_bytes([lb_common::icmp::V6_PACKET_TOO_BIG, 0]);
        *ip.add(21) = c;
        *ip.add(22) = mtu_hi.to_be();
        *ip.add(23) = mtu_lo.to_be();
    }
    Some(Verdict { action: xdp_action::XDP_TX, stat: stats::ICMP_TOO_BIG_SENT })
}

/// The 16-bit words of a map address, summed (its bytes are the packet's).
#[inline(always)]
fn addr_sum(a: &Addr) -> u32 {
    let mut sum = 0;
    for w in a {
        sum += (w & 0xffff) + (w >> 16);
    }
    sum
}

/// Writes a map address as eight 16-bit words at `p` (little-endian
/// target: a map word's low half is its first two bytes).
///
/// # Safety
/// `p` must point to 16 writable bytes.
#[inline(always)]
unsafe fn write_addr(p: *mut u16, a: &Addr) {
    for (i, w) in a.iter().enumerate() {
        // SAFETY: within the 16 bytes the caller vouches for.
        unsafe {
            *p.add(2 * i) = (*w & 0xffff) as u16;
            *p.add(2 * i + 1) = (*w >> 16) as u16;
        }
    }
}
