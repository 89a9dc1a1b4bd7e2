//! Address/port rewriting with incremental checksum updates (RFC 1624).

use lb_common::{csum, maps::PROTO_TCP};

use aya_ebpf::programs::XdpContext;
use network_types::{tcp::TcpHdr, udp::UdpHdr};

use crate::parse::{l4_hdr, Packet};

/// Rewrites the destination (client → backend direction).
#[inline(always)]
pub fn rewrite_dst(ctx: &XdpContext, pkt: &Packet, addr: u32, port: u16) {
    rewrite(ctx, pkt, addr, port, true)
}

/// Rewrites the source (backend → client direction).
#[inline(always)]
pub fn rewrite_src(ctx: &XdpContext, pkt: &Packet, addr: u32, port: u16) {
    rewrite(ctx, pkt, addr, port, false)
}

#[inline(always)]
fn rewrite(ctx: &XdpContext, pkt: &Packet, addr: u32, port: u16, dst: bool) {
    let new_addr = addr.to_ne_bytes();
    let new_port = port.to_ne_bytes();
    // SAFETY: `ip` and the L4 header were bounds-checked by the parser.
    unsafe {
        let ip = &mut *pkt.ip;
        let old_addr = if dst { ip.dst_addr } else { ip.src_addr };
        ip.check = csum::update_addr(u16::from_ne_bytes(ip.check), old_addr, new_addr).to_ne_bytes();
        if dst {
            ip.dst_addr = new_addr;
        } else {
            ip.src_addr = new_addr;
        }
        if pkt.key.proto == PROTO_TCP {
            let Some(tcp) = l4_hdr::<TcpHdr>(ctx, pkt) else { return };
            let tcp = &mut *tcp;
            let port_field = if dst { &mut tcp.dest } else { &mut tcp.source };
            let c = csum::update_addr(u16::from_ne_bytes(tcp.check), old_addr, new_addr);
            let c = csum::update_port(c, *port_field, new_port);
            *port_field = new_port;
            tcp.check = c.to_ne_bytes();
        } else {
            let Some(udp) = l4_hdr::<UdpHdr>(ctx, pkt) else { return };
            let udp = &mut *udp;
            let port_field = if dst { &mut udp.dst } else { &mut udp.src };
            let old = u16::from_ne_bytes(udp.check);
            let c = csum::update_addr(old, old_addr, new_addr);
            let c = csum::update_port(c, *port_field, new_port);
            *port_field = new_port;
            udp.check = csum::udp_fixup(old, c).to_ne_bytes();
        }
    }
}

/// Decrements the TTL, updating the header checksum. Returns false when the
/// packet must not be forwarded (TTL would reach zero).
#[inline(always)]
pub fn decrement_ttl(pkt: &Packet) -> bool {
    // SAFETY: bounds-checked by the parser.
    unsafe {
        let ip = &mut *pkt.ip;
        if ip.ttl <= 1 {
            return false;
        }
        let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
        ip.ttl -= 1;
        let new = u16::from_ne_bytes([ip.ttl, ip.proto]);
        ip.check = csum::update_u16(u16::from_ne_bytes(ip.check), old, new).to_ne_bytes();
    }
    true
}
