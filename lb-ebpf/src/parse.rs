//! Header parsing. Every access is checked against `data_end`; every way a
//! packet can fail to parse maps to a counted verdict.
//!
//! Policy (see docs/architecture.md):
//! - IPv4 options: passed to the kernel, never NATed (counted).
//! - Fragments, IPv4 and IPv6 alike, to a VIP address or from a backend
//!   address: dropped (counted): later fragments carry no ports, so no
//!   flow can be found for them, NATing only the first would corrupt the
//!   datagram, and passing one from a backend would leak its address.
//!   Other fragments are the host's: passed.
//! - IPv6 extension headers: Hop-by-Hop and Destination Options are
//!   skipped (up to `MAX_IPV6_EXT_HDRS`); a Routing header, ESP/AH or a
//!   longer chain is passed to the kernel untouched (counted), with no
//!   state created.
//! - Bad IHL, TCP data offset or lengths: dropped (counted); no state.
//! Anything else that is not TCP/UDP over IPv4 or IPv6 (ARP, ICMP, ICMPv6
//! neighbour discovery...) goes to the kernel untouched. Whether a TCP/UDP
//! packet is xlb's business (to a service, or from a backend) is decided
//! after parsing, by VIP:port and backend ip:port.

use core::mem;

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    maps::{ADDR_BACKEND, ADDR_VIP, Addr, FlowKey, PROTO_TCP, PROTO_UDP, addr_from_bytes, addr_v4},
    stats,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

use crate::{maps::ADDRS, wire};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// "More fragments" flag and fragment offset mask, in the host-order
/// flags/offset word.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

/// IPv6 next-header values of extension headers.
const NH_HOP_BY_HOP: u8 = 0;
const NH_ROUTING: u8 = 43;
const NH_FRAGMENT: u8 = 44;
const NH_ESP: u8 = 50;
const NH_AH: u8 = 51;
const NH_DEST_OPTS: u8 = 60;
const NH_MOBILITY: u8 = 135;
const NH_HIP: u8 = 139;
const NH_SHIM6: u8 = 140;
/// Hop-by-Hop / Destination Options headers skipped before the packet is
/// passed as "too many extension headers". Real traffic carries at most
/// one or two.
pub const MAX_IPV6_EXT_HDRS: usize = 4;

/// A parse outcome that ends processing: an XDP action and the counter that
/// explains it.
#[derive(Clone, Copy)]
pub struct Verdict {
    pub action: u32,
    pub stat: u32,
}

impl Verdict {
    /// A verdict as one register: BPF functions cannot return a struct
    /// through the caller's stack (the verifier refuses the pointer).
    #[inline(always)]
    pub const fn to_bits(self) -> u64 {
        (self.action as u64) << 32 | self.stat as u64
    }
    #[inline(always)]
    pub const fn from_bits(b: u64) -> Self {
        Verdict { action: (b >> 32) as u32, stat: b as u32 }
    }
    pub const fn pass(stat: u32) -> Self {
        Verdict { action: xdp_action::XDP_PASS, stat }
    }
    pub const fn drop(stat: u32) -> Self {
        Verdict { action: xdp_action::XDP_DROP, stat }
    }
}

/// A parsed TCP/UDP packet (IPv4 or IPv6) that concerns xlb. Offsets, no
/// pointers: LLVM may spill a packet pointer as two 32-bit halves (it
/// knows the high half is zero), which the verifier refuses; users
/// re-derive pointers with [`ptr_at`]. `repr(C)`: global BPF functions
/// take it by pointer (its BTF describes the layout).
#[derive(Default)]
#[repr(C)]
pub struct Packet {
    /// Offset of the IP header.
    pub l3_off: usize,
    /// Offset of the TCP/UDP header. Users re-derive typed pointers with
    /// [`l4_hdr`] / [`ptr_at`] inside their branch: the verifier does not
    /// carry "proto is TCP" across spills, so a pointer chosen here could
    /// not be proven in bounds there.
    pub l4_off: usize,
    /// IPv6 (else IPv4).
    pub v6: bool,
    /// Addresses in map form (IPv4-mapped for IPv4).
    pub key: FlowKey,
    /// TCP flags byte (`lb_common::tcp::FLAG_*`), 0 for UDP.
    pub tcp_flags: u8,
    /// The window scale option of a SYN, `NO_WSCALE` if none (or not a SYN).
    pub wscale: u8,
    /// TCP window field (unscaled), host order.
    pub win: u16,
    /// TCP sequence and acknowledgement numbers, host order.
    pub seq: u32,
    pub ack: u32,
    /// TCP payload length in bytes.
    pub payload_len: u32,
    /// IP total length (IPv6: header, extension headers and payload).
    pub ip_len: u32,
    /// The frame carries an 802.1Q/802.1ad tag.
    pub vlan: bool,
    /// L4 header and payload length in bytes.
    pub l4_len: u32,
    /// A backend's packet: the key of its flow (client → VIP), once found.
    pub flow_key: FlowKey,
    /// An ICMP/ICMPv6 error quoting a TCP/UDP packet: `key` is then the
    /// quoted packet's tuple reversed (the key of the flow it is about, as
    /// a packet of the other direction would carry it), `l4_off` the ICMP
    /// header and `inner_l3` the quoted IP header.
    /// (`lb_common::icmp::NOT_ERROR`, `ERROR_TO_VIP`, `ERROR_OTHER`.)
    pub icmp: u8,
    /// The error's counted kind (`lb_common::icmp::KIND_*`).
    pub icmp_kind: u8,
    pub inner_l3: usize,
    /// A packet too big for its egress, to be answered by the program's
    /// top: the VIP the error comes from (see `too_big`).
    pub answer_from: Addr,
}

/// `Packet::wscale` when the segment carries no window scale option.
pub const NO_WSCALE: u8 = 0xff;
/// TCP options walked in a SYN (Linux sends five; a SYN with more than this
/// many before its window scale is treated as without one).
const MAX_TCP_OPTIONS: usize = 8;

/// Largest header offset the program reads at. Offsets travel between BPF
/// functions on the stack, where the verifier loses their bounds; checking
/// against this constant restores them before any pointer arithmetic.
pub const MAX_HDR_OFFSET: usize = 512;
/// IPv6 extension header bytes followed before the packet is passed as
/// "too many extension headers".
pub const MAX_IPV6_EXT_BYTES: usize = 256;

#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    ptr_at_upto::<T, MAX_HDR_OFFSET>(ctx, offset)
}

/// As [`ptr_at`], for offsets up to `MAX` (payload walks).
#[inline(always)]
pub fn ptr_at_upto<T, const MAX: usize>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    if offset > MAX {
        return None;
    }
    // Fresh loads of data/data_end every time: LLVM would otherwise reuse
    // a packet pointer spilled long before (whose checked range the
    // verifier no longer knows) and drop this check as redundant.
    // SAFETY: `ctx.ctx` is the kernel's xdp_md for this call.
    let (start, end) = unsafe { (core::ptr::read_volatile(&(*ctx.ctx).data) as usize, core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize) };
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

/// `parse_into`'s "parsed" (no XDP action is this large).
pub const PARSED: u64 = u64::MAX;

/// Parses the frame into `out`; returns [`PARSED`] or a verdict
/// (`Verdict::to_bits`). A separate BPF function (not inlined), so its
/// locals do not add to the stack frames of the paths that follow.
#[inline(never)]
pub fn parse_into(ctx: &XdpContext, out: &mut Packet) -> u64 {
    match parse(ctx, out) {
        Ok(()) => PARSED,
        Err(v) => v.to_bits(),
    }
}

/// Parses into `pkt` (written in place: the packet lives in a per-CPU
/// slot, and a copy would not fit this function's stack frame).
#[inline(always)]
pub fn parse(ctx: &XdpContext, pkt: &mut Packet) -> Result<(), Verdict> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Verdict::pass(stats::PASS_TRUNCATED))?;
    // SAFETY: bounds checked by ptr_at.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut l3 = EthHdr::LEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let vlan: *const VlanHdr = ptr_at(ctx, EthHdr::LEN).ok_or(Verdict::pass(stats::PASS_TRUNCATED))?;
        // SAFETY: bounds checked by ptr_at.
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        l3 = EthHdr::LEN + VlanHdr::LEN;
    }
    // As for IPv6 extension headers below: one range for both (tagged or
    // not), so what follows is verified once for both.
    // SAFETY: a plain read of a local.
    let l3 = unsafe { core::ptr::read_volatile(&l3) } & 0x1f;
    // A second tag (QinQ) lands in the "not IP" branch: not ours.
    if ether_type == ETH_P_IP {
        parse_v4(ctx, l3, pkt)?
    } else if ether_type == ETH_P_IPV6 {
        parse_v6(ctx, l3, pkt)?
    } else {
        return Err(Verdict::pass(stats::PASS_NOT_IP));
    };
    let l4_len = pkt.ip_len as usize - (pkt.l4_off - l3);
    if pkt.key.proto == PROTO_ICMP || pkt.key.proto == PROTO_ICMPV6 {
        return parse_icmp(ctx, pkt, l4_len);
    }
    parse_l4(ctx, pkt, l4_len)
}

const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;

/// An ICMP/ICMPv6 error (what a router or host sends about a packet it
/// could not deliver) quoting a TCP/UDP packet: the quote's tuple,
/// reversed, becomes the key (see [`Packet::icmp`]). Anything else of ICMP
/// (echo, neighbour discovery, ...) is the kernel's. A quote that cannot
/// be followed: dropped when the error is addressed to a VIP (it is about
/// xlb's traffic, but names nothing usable), else the kernel's.
#[inline(always)]
fn parse_icmp(ctx: &XdpContext, pkt: &mut Packet, l4_len: usize) -> Result<(), Verdict> {
    let l4 = pkt.l4_off;
    let hdr: *const [u8; 8] = ptr_at(ctx, l4).ok_or(Verdict::pass(stats::PASS_OTHER_PROTO))?;
    // SAFETY: bounds checked by ptr_at.
    let (ty, code) = unsafe { ((*hdr)[0], (*hdr)[1]) };
    if !lb_common::icmp::is_error(pkt.v6, ty) || l4_len < 8 {
        return Err(Verdict::pass(stats::PASS_OTHER_PROTO));
    }
    pkt.icmp_kind = lb_common::icmp::kind(pkt.v6, ty, code);
    let to_vip = is_addr(&pkt.key.dst_addr, ADDR_VIP);
    let quote = parse_quote(ctx, pkt, l4_len, to_vip);
    if quote.is_err() && to_vip {
        crate::stats::count(stats::icmp_error(pkt.icmp_kind, lb_common::icmp::OUTCOME_DROPPED_BAD_QUOTE));
    }
    quote
}

/// The quoted packet of an ICMP error (after its 8-byte header at
/// `pkt.l4_off`), see [`parse_icmp`].
#[inline(always)]
fn parse_quote(ctx: &XdpContext, pkt: &mut Packet, l4_len: usize, to_vip: bool) -> Result<(), Verdict> {
    let bad = if to_vip { Verdict::drop(stats::DROP_ICMP_BAD_QUOTE) } else { Verdict::pass(stats::PASS_OTHER_PROTO) };
    let inner = pkt.l4_off + 8;
    let (src, dst, proto, inner_l4) = if pkt.v6 {
        let ip: *const Ipv6Hdr = ptr_at(ctx, inner).ok_or(bad)?;
        // SAFETY: bounds checked by ptr_at.
        let (vcf0, next, s, d) = unsafe { ((*ip).vcf[0], (*ip).next_hdr, (*ip).src_addr, (*ip).dst_addr) };
        if vcf0 >> 4 != 6 {
            return Err(bad);
        }
        (addr_from_bytes(s), addr_from_bytes(d), next, inner + Ipv6Hdr::LEN)
    } else {
        let ip: *const Ipv4Hdr = ptr_at(ctx, inner).ok_or(bad)?;
        // SAFETY: bounds checked by ptr_at.
        let (vihl, p, s, d) = unsafe { ((*ip).vihl, (*ip).proto, (*ip).src_addr, (*ip).dst_addr) };
        // A quoted header with options is not followed (rare: xlb never
        // sends one).
        if vihl != 0x45 {
            return Err(bad);
        }
        (addr_v4(u32::from_ne_bytes(s)), addr_v4(u32::from_ne_bytes(d)), p, inner + Ipv4Hdr::LEN)
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(bad);
    }
    // The first 8 bytes of the quoted segment: its ports (and a UDP
    // checksum), what every ICMP error carries at least.
    let ports: *const [u8; 8] = ptr_at(ctx, inner_l4).ok_or(bad)?;
    // SAFETY: bounds checked by ptr_at.
    let p = unsafe { *ports };
    let (sport, dport) = (u16::from_ne_bytes([p[0], p[1]]), u16::from_ne_bytes([p[2], p[3]]));
    pkt.key = FlowKey::new(dst, src, dport, sport, proto);
    pkt.icmp = if to_vip { lb_common::icmp::ERROR_TO_VIP } else { lb_common::icmp::ERROR_OTHER };
    pkt.inner_l3 = inner;
    pkt.l4_len = l4_len as u32;
    Ok(())
}

/// A fragment: dropped if it is xlb's (to a VIP address, or from a
/// backend address), else the host's.
#[inline(always)]
fn fragment(src: &Addr, dst: &Addr) -> Verdict {
    if is_addr(dst, ADDR_VIP) || is_addr(src, ADDR_BACKEND) { Verdict::drop(stats::DROP_FRAGMENT) } else { Verdict::pass(stats::PASS_NOT_SERVICE) }
}

/// Writes every field of `pkt` for a packet whose headers were checked.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn new_packet(pkt: &mut Packet, l3: usize, l4: usize, v6: bool, src: Addr, dst: Addr, proto: u8, ip_len: usize) {
    pkt.l3_off = l3;
    pkt.l4_off = l4;
    pkt.v6 = v6;
    pkt.key = FlowKey::new(src, dst, 0, 0, proto);
    pkt.tcp_flags = 0;
    pkt.wscale = NO_WSCALE;
    pkt.win = 0;
    pkt.seq = 0;
    pkt.ack = 0;
    pkt.payload_len = 0;
    pkt.ip_len = ip_len as u32;
    pkt.vlan = l3 != EthHdr::LEN;
    pkt.l4_len = 0;
    pkt.flow_key = FlowKey::new([0; 4], [0; 4], 0, 0, 0);
    pkt.icmp = lb_common::icmp::NOT_ERROR;
    pkt.inner_l3 = 0;
    pkt.answer_from = [0; 4];
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, l3: usize, pkt: &mut Packet) -> Result<(), Verdict> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, l3).ok_or(Verdict::pass(stats::PASS_TRUNCATED))?;
    // SAFETY: bounds checked by ptr_at (the 20-byte base header).
    let (vihl, dst, src, proto) = unsafe { ((*ip).vihl, wire::load_u32(&raw const (*ip).dst_addr), wire::load_u32(&raw const (*ip).src_addr), (*ip).proto) };
    if vihl >> 4 != 4 {
        return Err(Verdict::pass(stats::PASS_NOT_IP));
    }
    let dst = addr_v4(dst);
    let src = addr_v4(src);

    let ihl = vihl & 0x0f;
    if ihl < 5 {
        return Err(Verdict::drop(stats::DROP_MALFORMED));
    }
    if ihl > 5 {
        return Err(Verdict::pass(stats::PASS_IP_OPTIONS));
    }
    // SAFETY: within the checked base header.
    let (frags, tot_len) = unsafe { (wire::load_u16(&raw const (*ip).frags), wire::load_u16(&raw const (*ip).tot_len)) };
    let frags = u16::from_be(frags);
    if frags & (IP_MF | IP_OFFSET) != 0 {
        return Err(fragment(&src, &dst));
    }
    let ip_len = u16::from_be(tot_len) as usize;
    if ip_len < Ipv4Hdr::LEN || ctx.data() + l3 + ip_len > ctx.data_end() {
        return Err(Verdict::drop(stats::DROP_MALFORMED));
    }
    match proto {
        PROTO_TCP | PROTO_UDP | PROTO_ICMP => {}
        _ => return Err(Verdict::pass(stats::PASS_OTHER_PROTO)),
    }
    new_packet(pkt, l3, l3 + Ipv4Hdr::LEN, false, src, dst, proto, ip_len);
    Ok(())
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, l3: usize, pkt: &mut Packet) -> Result<(), Verdict> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, l3).ok_or(Verdict::pass(stats::PASS_TRUNCATED))?;
    // SAFETY: bounds checked by ptr_at (the 40-byte fixed header).
    let (vcf0, plen, next, src, dst) = unsafe { ((*ip).vcf[0], (*ip).payload_len, (*ip).next_hdr, (*ip).src_addr, (*ip).dst_addr) };
    if vcf0 >> 4 != 6 {
        return Err(Verdict::pass(stats::PASS_NOT_IP));
    }
    let dst = addr_from_bytes(dst);
    let src = addr_from_bytes(src);

    // Payload length 0 would be a jumbogram (Hop-by-Hop option): never a
    // valid TCP/UDP packet here.
    let plen = u16::from_be_bytes(plen) as usize;
    let ip_len = Ipv6Hdr::LEN + plen;
    if plen == 0 || ctx.data() + l3 + ip_len > ctx.data_end() {
        return Err(Verdict::drop(stats::DROP_MALFORMED));
    }
    let mut next = next;
    let mut ext_len = 0usize;
    for _ in 0..MAX_IPV6_EXT_HDRS {
        if next != NH_HOP_BY_HOP && next != NH_DEST_OPTS {
            break;
        }
        // Next header and length (in 8-byte units, not counting the first 8).
        let h: *const [u8; 2] = ptr_at(ctx, l3 + Ipv6Hdr::LEN + ext_len).ok_or(Verdict::drop(stats::DROP_MALFORMED))?;
        // SAFETY: bounds checked by ptr_at.
        let (nh, len) = unsafe { ((*h)[0], (*h)[1]) };
        next = nh;
        ext_len += (len as usize + 1) * 8;
        if ext_len >= plen {
            return Err(Verdict::drop(stats::DROP_MALFORMED));
        }
        if ext_len > MAX_IPV6_EXT_BYTES {
            return Err(Verdict::pass(stats::PASS_IPV6_EXT_HEADERS));
        }
    }
    // A no-op for the value (at most MAX_IPV6_EXT_BYTES), but it widens
    // what the verifier knows to one range for every number of extension
    // headers: the rest of the program is then verified once for all of
    // them instead of once per chain length (with the VLAN one below:
    // 736k → 487k instructions processed; see the headroom test).
    // (Read back volatile so LLVM, which knows the bound, keeps the mask.)
    // SAFETY: a plain read of a local.
    let ext_len = unsafe { core::ptr::read_volatile(&ext_len) } & 0x1ff;
    match next {
        PROTO_TCP | PROTO_UDP | PROTO_ICMPV6 => {}
        NH_FRAGMENT => return Err(fragment(&src, &dst)),
        NH_HOP_BY_HOP | NH_DEST_OPTS | NH_ROUTING | NH_ESP | NH_AH | NH_MOBILITY | NH_HIP | NH_SHIM6 => {
            return Err(Verdict::pass(stats::PASS_IPV6_EXT_HEADERS));
        }
        _ => return Err(Verdict::pass(stats::PASS_OTHER_PROTO)),
    }
    new_packet(pkt, l3, l3 + Ipv6Hdr::LEN + ext_len, true, src, dst, next, ip_len);
    Ok(())
}

/// Ports and TCP fields; `l4_len` is what the IP header says the L4
/// segment's length is (already checked to be inside the frame).
#[inline(always)]
fn parse_l4(ctx: &XdpContext, pkt: &mut Packet, l4_len: usize) -> Result<(), Verdict> {
    let l4 = pkt.l4_off;
    pkt.l4_len = l4_len as u32;
    if pkt.key.proto == PROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, l4).ok_or(Verdict::drop(stats::DROP_MALFORMED))?;
        // SAFETY: bounds checked by ptr_at.
        let (doff, sport, dport, seq, ack, win, flags) = unsafe {
            // Data offset (high nibble) and flags: bytes 12 and 13.
            let (doff_byte, flags_byte) = (*((tcp as *const u8).add(12)), *((tcp as *const u8).add(13)));
            (
                (doff_byte >> 4) as usize,
                wire::load_u16(&raw const (*tcp).source),
                wire::load_u16(&raw const (*tcp).dest),
                wire::load_u32(&raw const (*tcp).seq),
                wire::load_u32(&raw const (*tcp).ack_seq),
                wire::load_u16(&raw const (*tcp).window),
                flags_byte,
            )
        };
        let hdr_len = doff * 4;
        if doff < 5 || hdr_len > l4_len {
            return Err(Verdict::drop(stats::DROP_MALFORMED));
        }
        pkt.key.src_port = sport;
        pkt.key.dst_port = dport;
        pkt.tcp_flags = flags;
        pkt.seq = u32::from_be(seq);
        pkt.ack = u32::from_be(ack);
        pkt.win = u16::from_be(win);
        pkt.payload_len = (l4_len - hdr_len) as u32;
        if flags & lb_common::tcp::FLAG_SYN != 0 && hdr_len > TcpHdr::LEN {
            pkt.wscale = syn_wscale(ctx, l4, hdr_len);
        }
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, l4).ok_or(Verdict::drop(stats::DROP_MALFORMED))?;
        // SAFETY: bounds checked by ptr_at.
        let (sport, dport, len) =
            unsafe { (wire::load_u16(&raw const (*udp).src), wire::load_u16(&raw const (*udp).dst), wire::load_u16(&raw const (*udp).len)) };
        let len = u16::from_be(len) as usize;
        if len < UdpHdr::LEN || len > l4_len {
            return Err(Verdict::drop(stats::DROP_MALFORMED));
        }
        pkt.key.src_port = sport;
        pkt.key.dst_port = dport;
    }
    Ok(())
}

/// The window scale option among a SYN's options (header `hdr_len` bytes
/// at `l4`), as `lb_common::tcp::parse_wscale` reads it.
#[inline(always)]
fn syn_wscale(ctx: &XdpContext, l4: usize, hdr_len: usize) -> u8 {
    let mut off = TcpHdr::LEN;
    for _ in 0..MAX_TCP_OPTIONS {
        // Three bytes at a time (an option with its length and a value):
        // the window scale needs all three, and a one-byte read's bound
        // compiles to a compare the verifier learns no range from.
        if off + 3 > hdr_len {
            break;
        }
        let Some(opt) = ptr_at::<[u8; 3]>(ctx, l4 + off) else { break };
        // SAFETY: bounds-checked by ptr_at.
        let opt = unsafe { *opt };
        let kind = opt[0];
        if kind == 0 {
            break;
        }
        if kind == 1 {
            off += 1;
            continue;
        }
        let len = opt[1] as usize;
        if len < 2 || off + len > hdr_len {
            break;
        }
        if kind == 3 && len == 3 {
            return opt[2];
        }
        off += len;
    }
    NO_WSCALE
}

#[inline(always)]
pub fn is_addr(addr: &Addr, role: u32) -> bool {
    // SAFETY: read-only use of a value the controller writes whole.
    matches!(unsafe { ADDRS.get(addr) }, Some(flags) if flags & role != 0)
}
