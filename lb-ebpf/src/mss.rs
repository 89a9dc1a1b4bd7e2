//! The backend side of DSR's MSS clamp (`xlb_mss_clamp`, a TC egress
//! program that `xlb backend-setup` attaches): the segments that cross the
//! tunnel are the client's, sized by the MSS the backend announces in its
//! SYN-ACK, which DSR never shows the balancer. So the backend's own
//! SYN-ACKs from a VIP get their MSS lowered to what fits the tunnel
//! (`XLB_MSS_CLAMP`), and clients never send a segment the encapsulation
//! would make too big.
//!
//! Reads go through `bpf_skb_load_bytes` (a SYN-ACK is small, but an skb
//! need not be linear); the checksum through `bpf_l4_csum_replace`, which
//! leaves a partial one (TX offload: the NIC sums the options) alone.
//!
//! In DNAT and full NAT both handshake segments cross the balancer: a
//! service's `mss_clamp` is applied in XDP to SYNs towards its backends and
//! SYN-ACKs towards its clients ([`clamp_syn`], from
//! `flow::nat_and_forward`).

use aya_ebpf::{
    bindings::xdp_md,
    programs::{TcContext, XdpContext},
};
use lb_common::{
    csum,
    maps::{Addr, CSUM_FULL, addr_from_bytes, addr_v4},
    tcp::{FLAG_RST, FLAG_SYN, find_mss},
};
use network_types::tcp::TcpHdr;

use crate::{
    maps::MSS_CLAMP,
    parse::{Packet, l4_hdr, ptr_at},
};

/// Lowers the MSS option of the SYN (or SYN-ACK) `pkt` to `limit` if it
/// announces more, before its rewrite: a full checksum is updated, a
/// partial one (a seed the rewrite completes over the new bytes) left.
#[inline(always)]
pub fn clamp_syn(ctx: &XdpContext, pkt: &Packet, limit: u16) {
    xlb_clamp_syn_mss(ctx.ctx, pkt, limit as u64);
}

/// [`clamp_syn`] as a global BPF function (exported, see build.rs):
/// verified once, its frame off the callers' deepest chains.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn xlb_clamp_syn_mss(ctx: *mut xdp_md, pkt: *const Packet, limit: u64) -> u64 {
    let ctx = &XdpContext::new(ctx);
    // SAFETY: a valid pointer from `clamp_syn`, or null.
    let Some(pkt) = (unsafe { pkt.as_ref() }) else { return 0 };
    clamp_syn_inline(ctx, pkt, limit as u16).is_some() as u64
}

#[inline(always)]
fn clamp_syn_inline(ctx: &XdpContext, pkt: &Packet, limit: u16) -> Option<()> {
    let tcp = l4_hdr::<TcpHdr>(ctx, pkt)?;
    // SAFETY: bounds-checked by l4_hdr.
    let (doff, check) = unsafe { ((*tcp).doff() as usize, u16::from_ne_bytes((*tcp).check)) };
    // (ptr_at bounds every offset: no range is needed from the slot.)
    let l4 = pkt.l4_off;
    let (off, mss) = find_mss(doff * 4, |o| {
        // SAFETY: bounds-checked by ptr_at.
        ptr_at::<[u8; 2]>(ctx, l4 + o).map(|p| unsafe { *p })
    })?;
    if mss <= limit {
        return None;
    }
    let full = crate::nat::checksum_form_uncounted(ctx, pkt, check) == CSUM_FULL;
    let new = limit.to_be_bytes();
    let value = ptr_at::<[u8; 2]>(ctx, l4 + off)?;
    // SAFETY: bounds-checked by ptr_at.
    let old = unsafe { core::mem::replace(&mut *value, new) };
    if full {
        // A value at an odd offset adds its bytes to the sum swapped.
        let (o, n) = if off % 2 == 0 { (old, new) } else { ([old[1], old[0]], [new[1], new[0]]) };
        let c = csum::update_u16(check, u16::from_ne_bytes(o), u16::from_ne_bytes(n));
        let tcp = l4_hdr::<TcpHdr>(ctx, pkt)?;
        // SAFETY: bounds-checked by l4_hdr.
        unsafe { (*tcp).check = c.to_ne_bytes() };
    }
    Some(())
}

const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
/// `bpf_l4_csum_replace` flags: the size of the replaced field.
const CSUM_FIELD_2: u64 = 2;
const CSUM_FIELD_4: u64 = 4;

/// Clamps the packet's MSS option if it is a SYN(-ACK) from a clamped
/// VIP; any other packet is left as it is. Never drops.
#[inline(always)]
pub fn clamp(ctx: &TcContext) {
    let _ = clamp_inner(ctx);
}

#[inline(always)]
fn clamp_inner(ctx: &TcContext) -> Option<()> {
    let (l4, src) = tcp_of(ctx)?;
    let flags: u8 = ctx.load(l4 + 13).ok()?;
    if flags & (FLAG_SYN | FLAG_RST) != FLAG_SYN {
        return None;
    }
    // SAFETY: read-only use of a value written whole by backend-setup.
    let limit = *unsafe { MSS_CLAMP.get(&src) }?;
    let doff: u8 = ctx.load(l4 + 12).ok()?;
    let hdr_len = (doff >> 4) as usize * 4;
    // A header longer than the packet is not a SYN-ACK to touch.
    if l4 + hdr_len > ctx.len() as usize {
        return None;
    }
    let (off, mss) = find_mss(hdr_len, |o| ctx.load::<[u8; 2]>(l4 + o).ok())?;
    if mss <= limit {
        return None;
    }
    let at = l4 + off;
    let new = limit.to_be_bytes();
    let check = l4 + 16;
    if off % 2 == 0 {
        let old: [u8; 2] = ctx.load(at).ok()?;
        ctx.store(at, &new, 0).ok()?;
        ctx.l4_csum_replace(check, u16::from_ne_bytes(old) as u64, u16::from_ne_bytes(new) as u64, CSUM_FIELD_2).ok()?;
    } else {
        // The value straddles two checksum words: replace both (the
        // option's length byte before it, the next option's byte after it;
        // both exist: an MSS option at an odd offset ends before the
        // header's last byte).
        let old: [u8; 4] = ctx.load(at - 1).ok()?;
        let both = [old[0], new[0], new[1], old[3]];
        ctx.store(at - 1, &both, 0).ok()?;
        ctx.l4_csum_replace(check, u32::from_ne_bytes(old) as u64, u32::from_ne_bytes(both) as u64, CSUM_FIELD_4).ok()?;
    }
    Some(())
}

/// The TCP header's offset and the source address of an IPv4 (not a
/// fragment) or IPv6 (TCP right after the fixed header) packet.
#[inline(always)]
fn tcp_of(ctx: &TcContext) -> Option<(usize, Addr)> {
    let ether_type = u16::from_be_bytes(ctx.load::<[u8; 2]>(12).ok()?);
    if ether_type == ETH_P_IP {
        let ip: [u8; 20] = ctx.load(ETH_LEN).ok()?;
        let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
        if ip[0] >> 4 != 4 || ip[9] != IPPROTO_TCP || frag != 0 {
            return None;
        }
        let ihl = (ip[0] & 0xf) as usize * 4;
        Some((ETH_LEN + ihl, addr_v4(u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]))))
    } else if ether_type == ETH_P_IPV6 {
        let ip: [u8; 40] = ctx.load(ETH_LEN).ok()?;
        if ip[6] != IPPROTO_TCP {
            return None;
        }
        let mut src = [0u8; 16];
        src.copy_from_slice(&ip[8..24]);
        Some((ETH_LEN + 40, addr_from_bytes(src)))
    } else {
        None
    }
}
