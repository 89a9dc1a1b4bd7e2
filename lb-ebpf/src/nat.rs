//! Address/port rewriting with incremental checksum updates (RFC 1624), for
//! both families: a packet's `NatTuple` holds the whole tuple it leaves with
//! and says (`flags`) which half to rewrite: the destination (DNAT,
//! client → backend), the source (DNAT, backend → client), or both
//! (full-NAT, either way).

use lb_common::{
    csum,
    maps::{Addr, CSUM_FULL, CSUM_SEED_COMPLETE_ON_TX, CSUM_SEED_KEPT, IFACE_GENERIC, IFACE_VIRTUAL, NAT_DST, NAT_SRC, NatTuple, PROTO_TCP},
};

use aya_ebpf::{bindings::xdp_md, programs::XdpContext};
use network_types::{
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{
    maps::IFACES,
    parse::{Packet, l4_hdr, ptr_at},
    wire,
};

/// The L4 checksum after rewriting the addresses and ports `e` changes
/// (the checksum covers the addresses through the pseudo-header), with the
/// port fields rewritten on the way. A partial seed (`full` false) follows
/// the addresses only: the ports are summed when it is completed.
#[inline(always)]
fn l4_check(pkt: &Packet, t: &NatTuple, full: bool, check: u16, sport: *mut [u8; 2], dport: *mut [u8; 2]) -> u16 {
    // The seed is a checksum's complement: the same update, on its complement.
    let mut c = if full { check } else { !check };
    if t.flags & NAT_SRC != 0 {
        c = rewrite_end(c, full, pkt.v6, &pkt.key.src_addr, &t.src, sport, t.sport);
    }
    if t.flags & NAT_DST != 0 {
        c = rewrite_end(c, full, pkt.v6, &pkt.key.dst_addr, &t.dst, dport, t.dport);
    }
    if full { c } else { !c }
}

/// One end of the tuple: the checksum updated for its address (`old` →
/// `new`) and, for a full checksum, its port; the port field (in a
/// bounds-checked header) rewritten.
#[inline(always)]
fn rewrite_end(check: u16, full: bool, v6: bool, old: &Addr, new: &Addr, port_field: *mut [u8; 2], port: u16) -> u16 {
    let mut c = if v6 { csum::update_addr16(check, old, new) } else { csum::update_addr(check, old[3].to_ne_bytes(), new[3].to_ne_bytes()) };
    // SAFETY: a field of the caller's bounds-checked L4 header.
    unsafe {
        if full {
            c = csum::update_port(c, wire::load_u16(port_field).to_ne_bytes(), port.to_ne_bytes());
        }
        wire::store_u16(port_field, port);
    }
    c
}

/// Rewrites the packet to leave with tuple `t`. `leaving`: it will
/// leave as an XDP frame (XDP_TX, redirect), else it is passed to the
/// kernel. A partial checksum (see [`checksum_form`]) is kept a seed for
/// the new addresses, and completed when the frame leaves as an XDP frame
/// from a native-mode attachment. False when that completion was impossible
/// (the frame must then be passed: the kernel completes it).
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, pkt: &Packet, t: &NatTuple, leaving: bool) -> bool {
    // The completion runs here, not inside the global function: the
    // deepest call chain must stay within the 512-byte stack.
    xlb_rewrite(ctx.ctx, pkt, t, leaving as u64) == 0 || crate::csum::complete(ctx, pkt, 0)
}

/// [`rewrite`] as a global BPF function (exported by the linker, see
/// build.rs): the verifier checks it once for all callers and all the
/// verdicts decided before it, instead of once per caller path. Returns 1
/// when the checksum must now be completed (a seed, leaving as an XDP
/// frame from a native-mode attachment), else 0.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn xlb_rewrite(ctx: *mut xdp_md, pkt: *const Packet, t: *const NatTuple, leaving: u64) -> u64 {
    let ctx = &XdpContext::new(ctx);
    // Global function arguments may be null as far as the verifier knows.
    // SAFETY: valid pointers from the callers (`rewrite`), or null.
    let (Some(pkt), Some(t)) = (unsafe { pkt.as_ref() }, unsafe { t.as_ref() }) else { return 0 };
    let form = rewrite_inline(ctx, pkt, t, None);
    (leaving != 0 && form == CSUM_SEED_COMPLETE_ON_TX) as u64
}

/// [`rewrite`] of a packet whose checksum form the caller found (and
/// counted: [`l4_checksum_form`]), inlined into the caller; a
/// `CSUM_SEED_COMPLETE_ON_TX` seed is moved to the new addresses, and the
/// caller completes it (`csum::complete`).
#[inline(always)]
pub fn rewrite_in_place(ctx: &XdpContext, pkt: &Packet, t: &NatTuple, form: u8) {
    rewrite_inline(ctx, pkt, t, Some(form));
}

/// The L4 checksum field of a parsed TCP/UDP packet as it is now.
#[inline(always)]
fn l4_checksum_field(ctx: &XdpContext, pkt: &Packet) -> Option<u16> {
    if pkt.key.proto == PROTO_TCP {
        // SAFETY: bounds-checked by l4_hdr.
        l4_hdr::<TcpHdr>(ctx, pkt).map(|h| unsafe { wire::load_u16(&raw const (*h).check) })
    } else {
        // SAFETY: as above.
        l4_hdr::<UdpHdr>(ctx, pkt).map(|h| unsafe { wire::load_u16(&raw const (*h).check) })
    }
}

/// The form of the packet's L4 checksum as it came (see
/// [`checksum_form`]), counted when `counted`.
#[inline(always)]
pub fn l4_checksum_form(ctx: &XdpContext, pkt: &Packet, counted: bool) -> u8 {
    match l4_checksum_field(ctx, pkt) {
        Some(c) if counted => checksum_form(ctx, pkt, c),
        Some(c) => checksum_form_uncounted(ctx, pkt, c),
        None => CSUM_FULL,
    }
}

/// The rewrite; returns the checksum form (`CSUM_*`): `known`, or found
/// (and counted) here.
#[inline(always)]
fn rewrite_inline(ctx: &XdpContext, pkt: &Packet, t: &NatTuple, known: Option<u8>) -> u8 {
    let src = t.flags & NAT_SRC != 0;
    let dst = t.flags & NAT_DST != 0;
    let form;
    if pkt.key.proto == PROTO_TCP {
        let Some(tcp) = l4_hdr::<TcpHdr>(ctx, pkt) else { return CSUM_FULL };
        // SAFETY: bounds-checked just above; fields of that header.
        unsafe {
            let old = wire::load_u16(&raw const (*tcp).check);
            form = known.unwrap_or_else(|| checksum_form(ctx, pkt, old));
            let c = l4_check(pkt, t, form == CSUM_FULL, old, &raw mut (*tcp).source, &raw mut (*tcp).dest);
            wire::store_u16(&raw mut (*tcp).check, c);
        }
    } else {
        let Some(udp) = l4_hdr::<UdpHdr>(ctx, pkt) else { return CSUM_FULL };
        // SAFETY: as above.
        unsafe {
            let old = wire::load_u16(&raw const (*udp).check);
            form = known.unwrap_or_else(|| checksum_form(ctx, pkt, old));
            let c = l4_check(pkt, t, form == CSUM_FULL, old, &raw mut (*udp).src, &raw mut (*udp).dst);
            wire::store_u16(&raw mut (*udp).check, if form == CSUM_FULL { csum::udp_fixup(old, c) } else { c });
        }
    }
    if pkt.v6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, pkt.l3_off) else { return form };
        // SAFETY: bounds-checked just above; fields of that header.
        unsafe {
            if src {
                store_addr16(&raw mut (*ip).src_addr, &t.src);
            }
            if dst {
                store_addr16(&raw mut (*ip).dst_addr, &t.dst);
            }
        }
    } else {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, pkt.l3_off) else { return form };
        // The header's addresses are the parsed key's (read from it).
        // SAFETY: bounds-checked just above; fields of that header.
        unsafe {
            let mut c = wire::load_u16(&raw const (*ip).check);
            if src {
                c = csum::update_addr(c, pkt.key.src_addr[3].to_ne_bytes(), t.src[3].to_ne_bytes());
                wire::store_u32(&raw mut (*ip).src_addr, t.src[3]);
            }
            if dst {
                c = csum::update_addr(c, pkt.key.dst_addr[3].to_ne_bytes(), t.dst[3].to_ne_bytes());
                wire::store_u32(&raw mut (*ip).dst_addr, t.dst[3]);
            }
            wire::store_u16(&raw mut (*ip).check, c);
        }
    }
    form
}

/// Writes address `a` (map form) into a 16-byte IPv6 address field.
///
/// # Safety
/// `field` is in a bounds-checked header.
#[inline(always)]
unsafe fn store_addr16(field: *mut [u8; 16], a: &Addr) {
    let p = field as *mut [u8; 4];
    for (i, w) in a.iter().enumerate() {
        // SAFETY: word `i` of the caller's field.
        unsafe { wire::store_u32(p.add(i), *w) };
    }
}

/// Whether the L4 checksum field `check` holds a full checksum or only the
/// pseudo-header seed that a sender with TX checksum offload leaves for the
/// NIC (`lb_common::maps::CSUM_*`). A few adds per packet; the interface
/// lookup happens only when the field equals the seed (every such frame
/// from a virtual interface, 1 in 65,536 others). Decided here, at the
/// rewrite, so no path before it depends on the answer.
#[inline(always)]
pub fn checksum_form(ctx: &XdpContext, pkt: &Packet, check: u16) -> u8 {
    let form = checksum_form_uncounted(ctx, pkt, check);
    if form != CSUM_FULL {
        crate::stats::count(lb_common::stats::CSUM_PARTIAL);
    }
    form
}

/// [`checksum_form`] without counting the partial ones (for a look at the
/// same packet before its rewrite counts it).
#[inline(always)]
pub fn checksum_form_uncounted(ctx: &XdpContext, pkt: &Packet, check: u16) -> u8 {
    if check == 0 {
        // IPv4 UDP without a checksum (never a seed: a seed is the fold of
        // a non-zero sum).
        return CSUM_FULL;
    }
    let seed = if pkt.v6 {
        csum::pseudo_fold_v6(&pkt.key.src_addr, &pkt.key.dst_addr, pkt.key.proto, pkt.l4_len)
    } else {
        csum::pseudo_fold_v4(pkt.key.src_addr[3], pkt.key.dst_addr[3], pkt.key.proto, pkt.l4_len)
    };
    if check != seed {
        return CSUM_FULL;
    }
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: read-only use of a value the controller writes whole.
    match unsafe { IFACES.get(&ifindex) } {
        Some(f) if f & IFACE_VIRTUAL != 0 => {
            if f & IFACE_GENERIC != 0 {
                CSUM_SEED_KEPT
            } else {
                CSUM_SEED_COMPLETE_ON_TX
            }
        }
        _ => CSUM_FULL,
    }
}

/// Whether the TTL (IPv4) or hop limit (IPv6) lets the packet be
/// forwarded: at 1 it would reach zero here, and the kernel must send the
/// ICMP error.
#[inline(always)]
pub fn ttl_allows_forwarding(ctx: &XdpContext, pkt: &Packet) -> bool {
    if pkt.v6 {
        // SAFETY: bounds-checked by ptr_at.
        return ptr_at::<Ipv6Hdr>(ctx, pkt.l3_off).is_some_and(|ip| unsafe { (*ip).hop_limit } > 1);
    }
    // SAFETY: bounds-checked by ptr_at.
    ptr_at::<Ipv4Hdr>(ctx, pkt.l3_off).is_some_and(|ip| unsafe { (*ip).ttl } > 1)
}

/// Decrements the TTL (IPv4, updating the header checksum) or the hop
/// limit (IPv6) of the header at `pkt.l3_off` (checked by
/// [`ttl_allows_forwarding`] before).
#[inline(always)]
pub fn decrement_ttl(ctx: &XdpContext, pkt: &Packet) {
    if pkt.v6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, pkt.l3_off) else { return };
        // SAFETY: bounds-checked just above.
        let ip = unsafe { &mut *ip };
        ip.hop_limit = ip.hop_limit.saturating_sub(1);
        return;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, pkt.l3_off) else { return };
    // TTL and protocol as one checksummed word (bytes 8 and 9).
    // SAFETY: bounds-checked just above; fields of that header.
    unsafe {
        let word = &raw mut (*ip).ttl as *mut [u8; 2];
        let old = wire::load_u16(word);
        let [ttl, proto] = old.to_ne_bytes();
        let new = u16::from_ne_bytes([ttl.saturating_sub(1), proto]);
        wire::store_u16(word, new);
        wire::store_u16(&raw mut (*ip).check, csum::update_u16(wire::load_u16(&raw const (*ip).check), old, new));
    }
}
