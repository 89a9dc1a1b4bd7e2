//! Address/port rewriting with incremental checksum updates (RFC 1624), for
//! both families: a flow entry holds the whole tuple its packets leave with
//! and says (`nat_flags`) which half to rewrite: the destination (DNAT,
//! client → backend), the source (DNAT, backend → client), or both
//! (full-NAT, either way).

use lb_common::{
    csum,
    maps::{addr_bytes, Addr, FlowEntry, NAT_DST, NAT_SRC, PROTO_TCP},
};

use aya_ebpf::programs::XdpContext;
use network_types::{
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::parse::{l4_hdr, ptr_at, Packet};

/// The L4 checksum after rewriting the addresses and ports `e` changes
/// (the checksum covers the addresses through the pseudo-header), with the
/// port fields rewritten on the way.
#[inline(always)]
fn l4_check(pkt: &Packet, e: &FlowEntry, check: u16, sport: &mut [u8; 2], dport: &mut [u8; 2]) -> u16 {
    let mut c = check;
    if e.nat_flags & NAT_SRC != 0 {
        c = rewrite_end(c, pkt.v6, &pkt.key.src_addr, &e.nat_src, sport, e.nat_sport);
    }
    if e.nat_flags & NAT_DST != 0 {
        c = rewrite_end(c, pkt.v6, &pkt.key.dst_addr, &e.nat_dst, dport, e.nat_dport);
    }
    c
}

/// One end of the tuple: the checksum updated for its address (`old` →
/// `new`) and port, the port field rewritten.
#[inline(always)]
fn rewrite_end(check: u16, v6: bool, old: &Addr, new: &Addr, port_field: &mut [u8; 2], port: u16) -> u16 {
    let c = if v6 { csum::update_addr16(check, old, new) } else { csum::update_addr(check, old[3].to_ne_bytes(), new[3].to_ne_bytes()) };
    let port = port.to_ne_bytes();
    let c = csum::update_port(c, *port_field, port);
    *port_field = port;
    c
}

/// Rewrites the packet to leave with the entry's tuple.
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, pkt: &Packet, e: &FlowEntry) {
    let src = e.nat_flags & NAT_SRC != 0;
    let dst = e.nat_flags & NAT_DST != 0;
    if pkt.key.proto == PROTO_TCP {
        let Some(tcp) = l4_hdr::<TcpHdr>(ctx, pkt) else { return };
        // SAFETY: bounds-checked just above.
        let tcp = unsafe { &mut *tcp };
        tcp.check = l4_check(pkt, e, u16::from_ne_bytes(tcp.check), &mut tcp.source, &mut tcp.dest).to_ne_bytes();
    } else {
        let Some(udp) = l4_hdr::<UdpHdr>(ctx, pkt) else { return };
        // SAFETY: bounds-checked just above.
        let udp = unsafe { &mut *udp };
        let old = u16::from_ne_bytes(udp.check);
        let c = l4_check(pkt, e, old, &mut udp.src, &mut udp.dst);
        udp.check = csum::udp_fixup(old, c).to_ne_bytes();
    }
    if pkt.v6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, pkt.l3_off) else { return };
        // SAFETY: bounds-checked just above.
        let ip = unsafe { &mut *ip };
        if src {
            ip.src_addr = addr_bytes(&e.nat_src);
        }
        if dst {
            ip.dst_addr = addr_bytes(&e.nat_dst);
        }
    } else {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, pkt.l3_off) else { return };
        // SAFETY: bounds-checked just above.
        let ip = unsafe { &mut *ip };
        let mut c = u16::from_ne_bytes(ip.check);
        if src {
            let new = e.nat_src[3].to_ne_bytes();
            c = csum::update_addr(c, ip.src_addr, new);
            ip.src_addr = new;
        }
        if dst {
            let new = e.nat_dst[3].to_ne_bytes();
            c = csum::update_addr(c, ip.dst_addr, new);
            ip.dst_addr = new;
        }
        ip.check = c.to_ne_bytes();
    }
}

/// Decrements the TTL (IPv4, updating the header checksum) or the hop
/// limit (IPv6). Returns false when the packet must not be forwarded (it
/// would reach zero): the kernel sends the ICMP error.
#[inline(always)]
pub fn decrement_ttl(ctx: &XdpContext, pkt: &Packet) -> bool {
    if pkt.v6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, pkt.l3_off) else { return false };
        // SAFETY: bounds-checked just above.
        let ip = unsafe { &mut *ip };
        if ip.hop_limit <= 1 {
            return false;
        }
        ip.hop_limit -= 1;
        return true;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, pkt.l3_off) else { return false };
    // SAFETY: bounds-checked just above.
    let ip = unsafe { &mut *ip };
    if ip.ttl <= 1 {
        return false;
    }
    let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.ttl -= 1;
    let new = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.check = csum::update_u16(u16::from_ne_bytes(ip.check), old, new).to_ne_bytes();
    true
}
