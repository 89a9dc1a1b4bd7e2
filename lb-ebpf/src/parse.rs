//! Header parsing. Every access is checked against `data_end`; every way a
//! packet can fail to parse maps to a counted verdict.
//!
//! Policy for packets to or from xlb's addresses (see docs/architecture.md):
//! - IPv4 options: passed to the kernel, never NATed (counted).
//! - Fragments: dropped (counted): later fragments carry no ports, so no
//!   flow can be found for them, and NATing only the first would corrupt
//!   the datagram.
//! - Bad IHL, TCP data offset or lengths: dropped (counted); no state.
//! Anything else that is not IPv4 TCP/UDP, or not to/from a service or
//! backend address, goes to the kernel untouched.

use core::mem;

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    maps::{FlowKey, ADDR_BACKEND, ADDR_VIP, PROTO_TCP, PROTO_UDP},
    stats,
};
use network_types::{
    eth::EthHdr,
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

use crate::maps::ADDRS;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// "More fragments" flag and fragment offset mask, in the host-order
/// flags/offset word.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

/// A parse outcome that ends processing: an XDP action and the counter that
/// explains it.
#[derive(Clone, Copy)]
pub struct Verdict {
    pub action: u32,
    pub stat: u32,
}

impl Verdict {
    pub const fn pass(stat: u32) -> Self {
        Verdict { action: xdp_action::XDP_PASS, stat }
    }
    pub const fn drop(stat: u32) -> Self {
        Verdict { action: xdp_action::XDP_DROP, stat }
    }
}

/// A parsed IPv4 TCP/UDP packet that concerns xlb.
pub struct Packet {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    /// Offset of the TCP/UDP header. Users re-derive the typed pointer with
    /// [`l4_hdr`] inside their protocol branch: the verifier does not carry
    /// "proto is TCP" across spills, so a pointer chosen here could not be
    /// proven in bounds there.
    pub l4_off: usize,
    pub key: FlowKey,
    /// `ADDR_VIP` when the destination is a VIP address, else `ADDR_BACKEND`
    /// (the source is a backend address).
    pub role: u32,
    /// TCP flags byte (`lb_common::tcp::FLAG_*`), 0 for UDP.
    pub tcp_flags: u8,
    /// TCP sequence number, host order.
    pub seq: u32,
    /// TCP payload length in bytes.
    pub payload_len: u32,
    /// IP total length.
    pub ip_len: u32,
    /// The frame carries an 802.1Q/802.1ad tag.
    pub vlan: bool,
}

#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The L4 header of a parsed packet, bounds-checked again.
#[inline(always)]
pub fn l4_hdr<T>(ctx: &XdpContext, pkt: &Packet) -> Option<*mut T> {
    ptr_at(ctx, pkt.l4_off)
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Verdict> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Verdict::pass(stats::PASS_TRUNCATED))?;
    // SAFETY: bounds checked by ptr_at.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut l3 = EthHdr::LEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let vlan: *const VlanHdr =
            ptr_at(ctx, EthHdr::LEN).ok_or(Verdict::pass(stats::PASS_TRUNCATED))?;
        // SAFETY: bounds checked by ptr_at.
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        l3 = EthHdr::LEN + VlanHdr::LEN;
    }
    // A second tag (QinQ) lands here too: not ours.
    if ether_type != ETH_P_IP {
        return Err(Verdict::pass(stats::PASS_NOT_IPV4));
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, l3).ok_or(Verdict::pass(stats::PASS_TRUNCATED))?;
    // SAFETY: bounds checked by ptr_at (the 20-byte base header).
    let (vihl, dst, src, proto) =
        unsafe { ((*ip).vihl, (*ip).dst_addr, (*ip).src_addr, (*ip).proto) };
    if vihl >> 4 != 4 {
        return Err(Verdict::pass(stats::PASS_NOT_IPV4));
    }
    let dst = u32::from_ne_bytes(dst);
    let src = u32::from_ne_bytes(src);

    // Is this xlb's business at all? To a VIP, or from a backend.
    let role = if is_addr(dst, ADDR_VIP) {
        ADDR_VIP
    } else if is_addr(src, ADDR_BACKEND) {
        ADDR_BACKEND
    } else {
        return Err(Verdict::pass(stats::PASS_NOT_SERVICE));
    };

    let ihl = vihl & 0x0f;
    if ihl < 5 {
        return Err(Verdict::drop(stats::DROP_MALFORMED));
    }
    if ihl > 5 {
        return Err(Verdict::pass(stats::PASS_IP_OPTIONS));
    }
    // SAFETY: within the checked base header.
    let (frags, tot_len) = unsafe { ((*ip).frags, (*ip).tot_len) };
    let frags = u16::from_be_bytes(frags);
    if frags & (IP_MF | IP_OFFSET) != 0 {
        return Err(Verdict::drop(stats::DROP_FRAGMENT));
    }
    let ip_len = u16::from_be_bytes(tot_len) as usize;
    if ip_len < Ipv4Hdr::LEN || ctx.data() + l3 + ip_len > ctx.data_end() {
        return Err(Verdict::drop(stats::DROP_MALFORMED));
    }
    let l4 = l3 + Ipv4Hdr::LEN;
    let l4_len = ip_len - Ipv4Hdr::LEN;

    let mut pkt = Packet {
        eth,
        ip,
        l4_off: l4,
        key: FlowKey { src_addr: src, dst_addr: dst, src_port: 0, dst_port: 0, proto, _pad: [0; 3] },
        role,
        tcp_flags: 0,
        seq: 0,
        payload_len: 0,
        ip_len: ip_len as u32,
        vlan: l3 != EthHdr::LEN,
    };
    match proto {
        PROTO_TCP => {
            let tcp: *mut TcpHdr = ptr_at(ctx, l4).ok_or(Verdict::drop(stats::DROP_MALFORMED))?;
            // SAFETY: bounds checked by ptr_at.
            let (doff, sport, dport, seq, flags) = unsafe {
                let flags_byte = *((tcp as *const u8).add(13));
                ((*tcp).doff() as usize, (*tcp).source, (*tcp).dest, (*tcp).seq, flags_byte)
            };
            let hdr_len = doff * 4;
            if doff < 5 || hdr_len > l4_len {
                return Err(Verdict::drop(stats::DROP_MALFORMED));
            }
            pkt.key.src_port = u16::from_ne_bytes(sport);
            pkt.key.dst_port = u16::from_ne_bytes(dport);
            pkt.tcp_flags = flags;
            pkt.seq = u32::from_be_bytes(seq);
            pkt.payload_len = (l4_len - hdr_len) as u32;
        }
        PROTO_UDP => {
            let udp: *mut UdpHdr = ptr_at(ctx, l4).ok_or(Verdict::drop(stats::DROP_MALFORMED))?;
            // SAFETY: bounds checked by ptr_at.
            let (sport, dport, len) = unsafe { ((*udp).src, (*udp).dst, (*udp).len) };
            let len = u16::from_be_bytes(len) as usize;
            if len < UdpHdr::LEN || len > l4_len {
                return Err(Verdict::drop(stats::DROP_MALFORMED));
            }
            pkt.key.src_port = u16::from_ne_bytes(sport);
            pkt.key.dst_port = u16::from_ne_bytes(dport);
        }
        _ => return Err(Verdict::pass(stats::PASS_OTHER_PROTO)),
    }
    Ok(pkt)
}

#[inline(always)]
fn is_addr(addr: u32, role: u32) -> bool {
    // SAFETY: read-only use of a value the controller writes whole.
    matches!(unsafe { ADDRS.get(&addr) }, Some(flags) if flags & role != 0)
}
