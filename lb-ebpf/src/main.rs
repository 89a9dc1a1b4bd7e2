//! xlb's XDP program: NAT load balancing on a 5-tuple connection table.
//!
//! Packet path (one function per concern, see the modules):
//! parse → (to a VIP) conntrack lookup → schedule on a new flow → NAT →
//! forward; (from a backend) conntrack lookup → reverse NAT → forward.
//! Every return goes through `count`, so every verdict has a counter.
#![no_std]
#![no_main]

mod conntrack;
mod csum;
mod encap;
mod forward;
mod maps;
mod nat;
mod parse;
mod ports;
mod reset;
mod schedule;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    maps::{
        ADDR_VIP, BACKEND_DOWN, BACKEND_UNUSED, DIR_TO_BACKEND, FlowEntry, NAT_ENCAP, PROTO_TCP, SVC_F_FULLNAT, SVC_F_MISS_REHASH, SVC_F_NO_PORT_DROP,
        ServiceKey, backend_is_gone, end_reason,
    },
    stats as stat, tcp,
};

use crate::parse::{Packet, Verdict};

#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    stats::count(stat::RX);
    let mut pkt = Packet::default();
    let parsed = parse::parse_into(&ctx, &mut pkt);
    let v = if parsed != parse::PARSED {
        Verdict::from_bits(parsed)
    } else {
        let now = conntrack::now();
        let v = existing_flow(&ctx, &pkt, now);
        if v != NO_FLOW {
            Verdict::from_bits(v)
        } else if pkt.role != ADDR_VIP {
            // From a backend address but not a flow of ours: the host's
            // own traffic (health checks, management).
            Verdict::pass(stat::PASS_NOT_SERVICE)
        } else {
            Verdict::from_bits(new_flow(&ctx, &pkt, now))
        }
    };
    stats::count(v.stat);
    v.action
}

/// Attached to the peer ends of veth pairs in test and demo topologies: a
/// veth in native XDP mode only delivers XDP_TX/redirected frames when its
/// peer runs an XDP program.
#[xdp]
pub fn xlb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// On DSR backends (`xlb backend-setup`): strips the IPIP header the
/// balancer added, so the client's packet reaches the local stack as sent.
#[xdp]
pub fn xlb_decap(ctx: XdpContext) -> u32 {
    encap::decap(&ctx)
}

/// `existing_flow`'s "no usable entry".
const NO_FLOW: u64 = u64::MAX;

/// A packet of a flow in the table: forwarded, reset, or torn down
/// (`Verdict::to_bits`). [`NO_FLOW`]: no usable entry, the packet starts a
/// new flow (or is not ours).
///
/// This, [`new_flow`] and the parser are separate BPF functions (not
/// inlined), called one after the other from the entry point: each gets
/// its own stack frame within the 512-byte limit, and no frame is counted
/// twice. They return verdicts as a `u64` (see `Verdict::to_bits`).
#[inline(never)]
fn existing_flow(ctx: &XdpContext, pkt: &Packet, now: u64) -> u64 {
    existing_flow_verdict(ctx, pkt, now).map_or(NO_FLOW, Verdict::to_bits)
}

#[inline(always)]
fn existing_flow_verdict(ctx: &XdpContext, pkt: &Packet, now: u64) -> Option<Verdict> {
    let is_tcp = pkt.key.proto == PROTO_TCP;
    if let Some((entry, table)) = conntrack::lookup(&pkt.key) {
        // Read in place (no 88-byte copy on the stack); every use comes
        // before the entry is removed or rewritten.
        // SAFETY: map value pointer from the kernel.
        let e = unsafe { &*entry };
        let to_backend = e.direction == DIR_TO_BACKEND;
        let state = maps::BACKENDS.get(e.backend_id).map_or(BACKEND_UNUSED, |b| b.state);
        if backend_is_gone(state) {
            let reason = if state == BACKEND_DOWN { end_reason::UNHEALTHY } else { end_reason::REMOVED };
            let (service_id, backend_id) = (e.service_id, e.backend_id);
            conntrack::remove(&pkt.key, e, table, reason, 0);
            if is_tcp {
                // No black hole: the sender learns at once.
                stats::count_reactive_reset(service_id, backend_id);
                return Some(reset::answer(ctx, pkt, stat::RST_REACTIVE));
            }
            if !to_backend {
                return Some(Verdict::drop(stat::DROP_GONE_BACKEND));
            }
            stats::count(stat::UDP_RESCHEDULED);
            return None;
        }
        if is_tcp && pkt.tcp_flags & tcp::FLAG_RST != 0 {
            return Some(pass_rst(ctx, pkt, e, table, now));
        }
        if to_backend && conntrack::is_new_connection(entry, pkt) {
            // Port reuse after the previous connection ended: its entries
            // go, the SYN starts a new flow below.
            conntrack::remove(&pkt.key, e, table, end_reason::FIN, 0);
        } else {
            conntrack::touch(entry, pkt, now);
            // SAFETY: map value pointer; read again after `touch` wrote it.
            let e = unsafe { &*entry };
            if table == conntrack::Table::HalfOpen && to_backend && pkt.tcp_flags & tcp::FLAG_SYN == 0 {
                // The handshake completed: the flow is established.
                conntrack::promote(&pkt.key, e);
                stats::count(stat::PROMOTED);
            }
            // SAFETY: the entry's own field, in the map.
            let memo = unsafe { core::ptr::addr_of_mut!((*entry).hop) };
            return Some(nat_and_forward(ctx, pkt, e, Some(memo), false, now));
        }
    }
    None
}

/// Rewrites (or encapsulates) a packet of flow `e` and sends it on. The
/// route comes first, so the rewrite knows whether the packet leaves as an
/// XDP frame or goes to the kernel (a partial checksum is completed only in
/// the first case: see `nat::checksum_form`).
#[inline(always)]
fn nat_and_forward(ctx: &XdpContext, pkt: &Packet, e: &FlowEntry, hop_memo: Option<*mut u32>, new_flow: bool, now: u64) -> Verdict {
    stats::count_traffic(e.service_id, e.backend_id, e.direction == DIR_TO_BACKEND, pkt.ip_len as u64, new_flow);
    let route = forward::route(ctx, pkt, e, hop_memo, now);
    let leaving = route.is_ok();
    if e.nat_flags & NAT_ENCAP != 0 {
        if let Err(stat) = encap::ipip(ctx, pkt, e, leaving) {
            return Verdict::pass(stat);
        }
    } else if !nat::rewrite(ctx, pkt, e, leaving) {
        return Verdict::pass(stat::PASS_CSUM_TOO_LONG);
    }
    match route {
        Ok(slot) => forward::send(ctx, pkt, slot),
        // Passed already rewritten: the kernel forwards it.
        Err(v) => v,
    }
}

/// A RST for a live flow is forwarded either way; it tears the flow down
/// only when it carries exactly the sequence number the receiver expects
/// (what the receiver itself accepts, RFC 5961 §3.2), so a spoofed or stale
/// RST cannot remove the flow from the table.
#[inline(always)]
fn pass_rst(ctx: &XdpContext, pkt: &Packet, e: &FlowEntry, table: conntrack::Table, now: u64) -> Verdict {
    let exact = e.tcp_state != tcp::STATE_NONE && pkt.seq == e.seq_next;
    // Forwarded first: `e` may point into the table, and goes below.
    let v = nat_and_forward(ctx, pkt, e, None, false, now);
    if exact {
        let reason = if e.direction == DIR_TO_BACKEND { end_reason::RST_CLIENT } else { end_reason::RST_BACKEND };
        conntrack::remove(&pkt.key, e, table, reason, pkt.ip_len as u64);
        stats::count(stat::RST_TEARDOWN);
    } else {
        stats::count(stat::RST_IGNORED);
    }
    v
}

/// A new flow: scheduled, entered in the table, forwarded. A separate BPF
/// function (see [`existing_flow`]).
#[inline(never)]
fn new_flow(ctx: &XdpContext, pkt: &Packet, now: u64) -> u64 {
    new_flow_verdict(ctx, pkt, now).to_bits()
}

#[inline(always)]
fn new_flow_verdict(ctx: &XdpContext, pkt: &Packet, now: u64) -> Verdict {
    let skey = ServiceKey { addr: pkt.key.dst_addr, port: pkt.key.dst_port, proto: pkt.key.proto, _pad: 0 };
    // SAFETY: read-only use of a value the controller writes whole.
    let Some(svc) = (unsafe { maps::SERVICES.get(&skey) }) else {
        return Verdict::pass(stat::PASS_NOT_SERVICE);
    };
    let mut by_hash = false;
    if pkt.key.proto == PROTO_TCP && pkt.tcp_flags & (tcp::FLAG_SYN | tcp::FLAG_ACK | tcp::FLAG_RST) != tcp::FLAG_SYN {
        // Mid-flow segment without an entry (lost state, or a flow this
        // node never saw). A RST creates nothing and is not answered.
        if pkt.tcp_flags & (tcp::FLAG_RST | tcp::FLAG_SYN) != 0 {
            return Verdict::pass(stat::PASS_NO_FLOW);
        }
        if svc.flags & SVC_F_MISS_REHASH == 0 {
            return reset::answer(ctx, pkt, stat::RST_MISS);
        }
        by_hash = true;
        stats::count(stat::REHASHED);
    }
    let Some((backend_id, backend)) = schedule::pick(svc, &pkt.key, by_hash) else {
        return Verdict::pass(stat::PASS_NO_BACKEND);
    };
    let snat_port = if svc.flags & SVC_F_FULLNAT != 0 {
        let Some(port) = ports::allocate(svc, &backend, pkt.key.proto, now) else {
            // Refused cleanly: never a port shared with a live flow.
            stats::count_no_port(svc.id, backend_id);
            if pkt.key.proto == PROTO_TCP && svc.flags & SVC_F_NO_PORT_DROP == 0 {
                return reset::answer(ctx, pkt, stat::REFUSED_NO_PORT);
            }
            return Verdict::drop(stat::REFUSED_NO_PORT);
        };
        Some(port)
    } else {
        None
    };
    let Some(entry) = conntrack::create(pkt, svc, backend_id, &backend, snat_port, now) else {
        if let Some(port) = snat_port {
            ports::release(&backend, pkt.key.proto, port);
        }
        return Verdict::drop(stat::DROP_TABLE_FULL);
    };
    stats::count(stat::NEW_FLOWS);
    stats::count_n(stat::ENTRIES_CREATED, if entry.nat_flags & NAT_ENCAP != 0 { 1 } else { 2 });
    schedule::count_active(backend_id);
    // A TCP flow is new once its handshake completes (`promote`).
    if pkt.key.proto != PROTO_TCP {
        conntrack::report_new(&pkt.key, entry, None);
    }
    nat_and_forward(ctx, pkt, entry, None, true, now)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
