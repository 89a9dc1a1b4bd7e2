//! Direct server return: the client's packet, untouched, inside an outer
//! IPv4 header (IPIP, protocol 4) from the balancer to the backend, which
//! decapsulates it, holds the VIP itself and answers the client directly
//! (LVS-DR/Katran style). Only client → VIP packets pass the balancer.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    csum,
    maps::{CSUM_FULL, CSUM_SEED_COMPLETE_ON_TX, NatTuple},
    stats,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::parse::{Packet, ptr_at};

const IPPROTO_IPIP: u8 = 4;
/// Bytes the outer header adds in front of the client's packet.
pub const OUTER_LEN: usize = Ipv4Hdr::LEN;
const ETH_P_IP: u16 = 0x0800;

/// Prepends the outer header; false when the packet cannot be
/// encapsulated (IPv6, or no headroom), and then it is left unchanged.
/// `leaving`: it will leave as an XDP frame; a partial checksum of the
/// client's segment is then completed (nobody else will, and the backend
/// checks it after decapsulation).
#[inline(always)]
pub fn ipip(ctx: &XdpContext, pkt: &Packet, t: &NatTuple, leaving: bool) -> Result<(), u32> {
    if pkt.v6 || pkt.vlan {
        return Err(stats::PASS_NO_ENCAP);
    }
    let form = if leaving { crate::nat::l4_checksum_form(ctx, pkt, true) } else { CSUM_FULL };
    outer_header(ctx, pkt, t)?;
    if form == CSUM_SEED_COMPLETE_ON_TX && !crate::csum::complete(ctx, pkt, OUTER_LEN) {
        return Err(stats::PASS_CSUM_TOO_LONG);
    }
    Ok(())
}

/// [`ipip`]'s encapsulation alone, for a caller that found the checksum
/// form itself (the entry program, which completes a seed afterwards).
#[inline(always)]
pub fn outer_header(ctx: &XdpContext, pkt: &Packet, t: &NatTuple) -> Result<(), u32> {
    if pkt.v6 || pkt.vlan {
        return Err(stats::PASS_NO_ENCAP);
    }
    // SAFETY: plain helper call; every packet pointer is re-derived below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(Ipv4Hdr::LEN as i32)) } != 0 {
        return Err(stats::PASS_NO_ENCAP);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return Err(stats::PASS_NO_ENCAP) };
    let Some(outer) = ptr_at::<[u8; Ipv4Hdr::LEN]>(ctx, EthHdr::LEN) else { return Err(stats::PASS_NO_ENCAP) };
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN + Ipv4Hdr::LEN) else { return Err(stats::PASS_NO_ENCAP) };
    // SAFETY: all three bounds-checked above; the MACs are set by forward.
    unsafe {
        (*eth).ether_type = ETH_P_IP.to_be();
        let tos = (*inner).tos;
        let total = (pkt.ip_len as u16).wrapping_add(Ipv4Hdr::LEN as u16);
        let o = &mut *outer;
        o.fill(0);
        o[0] = 0x45;
        o[1] = tos;
        o[2..4].copy_from_slice(&total.to_be_bytes());
        o[6] = 0x40; // DF: the inner packet's own PMTU discovery decides
        o[8] = 64;
        o[9] = IPPROTO_IPIP;
        o[12..16].copy_from_slice(&t.src[3].to_ne_bytes());
        o[16..20].copy_from_slice(&t.dst[3].to_ne_bytes());
        let mut sum = 0u32;
        let mut i = 0;
        while i < Ipv4Hdr::LEN {
            sum += u16::from_ne_bytes([o[i], o[i + 1]]) as u32;
            i += 2;
        }
        let c = !csum::fold(sum);
        o[10..12].copy_from_slice(&c.to_ne_bytes());
    }
    Ok(())
}

/// The backend side (`xlb_decap`, attached by `xlb backend-setup`): an
/// IPIP packet (outer IPv4 without options, inner IPv4) loses its outer
/// header and goes up the stack as the client's own packet; everything
/// else passes untouched. For kernels without IPIP tunnels, and cheaper
/// than one.
#[inline(always)]
pub fn decap(ctx: &XdpContext) -> u32 {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return xdp_action::XDP_PASS };
    let Some(outer) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else { return xdp_action::XDP_PASS };
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN + Ipv4Hdr::LEN) else { return xdp_action::XDP_PASS };
    // SAFETY: all bounds-checked above.
    let (ether_type, vihl, proto, frags, inner_vihl) = unsafe { ((*eth).ether_type, (*outer).vihl, (*outer).proto, (*outer).frags, (*inner).vihl) };
    let frags = u16::from_be_bytes(frags);
    if u16::from_be(ether_type) != ETH_P_IP || vihl != 0x45 || proto != IPPROTO_IPIP || frags & 0x3fff != 0 || inner_vihl >> 4 != 4 {
        return xdp_action::XDP_PASS;
    }
    // The Ethernet header moves up over the outer IP header.
    // SAFETY: bounds-checked above; copied out before the move.
    let (dst, src) = unsafe { ((*eth).dst_addr, (*eth).src_addr) };
    // SAFETY: plain helper call; pointers re-derived below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, Ipv4Hdr::LEN as i32) } != 0 {
        return xdp_action::XDP_PASS;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return xdp_action::XDP_DROP };
    // SAFETY: bounds-checked just above.
    unsafe {
        (*eth).dst_addr = dst;
        (*eth).src_addr = src;
        (*eth).ether_type = ETH_P_IP.to_be();
    }
    xdp_action::XDP_PASS
}
