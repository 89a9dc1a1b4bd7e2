//! Answering a TCP segment with a RST built in place and sent back out of
//! the interface it came in on (XDP_TX): for flows whose backend is gone,
//! and for non-SYN segments that match no flow.
//!
//! The RST takes its sequence number from the segment's ACK (RFC 793 "Reset
//! Generation"), which is exactly the receiver's RCV.NXT, so the peer's
//! stack accepts it even under RFC 5961; a challenge ACK (sent by a peer
//! that got an inexact RST) is answered the same way, exactly.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_tail, programs::XdpContext};
use lb_common::{rst, tcp};
use network_types::{eth::EthHdr, tcp::TcpHdr};

use crate::parse::{Packet, Verdict, l4_hdr, ptr_at};

/// Rewrites the frame into the RST answering it and returns XDP_TX, counted
/// under `stat`. A RST is never answered (no RST storms): dropped instead.
#[inline(always)]
pub fn answer(ctx: &XdpContext, pkt: &Packet, stat: u32) -> Verdict {
    if pkt.tcp_flags & tcp::FLAG_RST != 0 {
        return Verdict::drop(stat);
    }
    let Some(th) = l4_hdr::<TcpHdr>(ctx, pkt) else {
        return Verdict::drop(stat);
    };
    // SAFETY: bounds-checked just above.
    let ack_seq = unsafe { (*th).ack_seq };
    let seg_ack = if pkt.tcp_flags & tcp::FLAG_ACK != 0 { Some(u32::from_be_bytes(ack_seq)) } else { None };
    let seg_end = tcp::segment_end(pkt.seq, pkt.payload_len, pkt.tcp_flags);
    let r = rst::answering(pkt.key.src_addr, pkt.key.dst_addr, pkt.key.src_port.to_ne_bytes(), pkt.key.dst_port.to_ne_bytes(), seg_ack, seg_end);
    // Cut the frame to Ethernet [+ VLAN] + the reset's headers, then write
    // them straight into it (no copy on the stack).
    let ip_off = pkt.l3_off;
    let new_len = ip_off + if pkt.v6 { rst::RST_LEN_V6 } else { rst::RST_LEN };
    let cur_len = ctx.data_end() - ctx.data();
    if cur_len > new_len {
        // SAFETY: plain helper call; packet pointers are re-derived below.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((cur_len - new_len) as i32)) } != 0 {
            return Verdict::drop(stat);
        }
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return Verdict::drop(stat) };
    if pkt.v6 {
        let Some(out) = ptr_at::<[u8; rst::RST_LEN_V6]>(ctx, ip_off) else { return Verdict::drop(stat) };
        // SAFETY: bounds-checked just above.
        rst::write_v6(&r, unsafe { &mut *out });
    } else {
        let Some(out) = ptr_at::<[u8; rst::RST_LEN]>(ctx, ip_off) else { return Verdict::drop(stat) };
        // SAFETY: bounds-checked just above.
        rst::write_v4(&r, unsafe { &mut *out });
    }
    // SAFETY: bounds-checked above (after the tail moved, so the
    // verifier sees a fresh check; the MACs are untouched by the cut).
    unsafe {
        let (src_mac, dst_mac) = ((*eth).src_addr, (*eth).dst_addr);
        (*eth).dst_addr = src_mac;
        (*eth).src_addr = dst_mac;
    }
    Verdict { action: xdp_action::XDP_TX, stat }
}
