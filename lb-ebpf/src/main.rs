//! xlb's XDP program: NAT load balancing on a 5-tuple connection table.
//!
//! Packet path (one function per concern, see the modules):
//! parse → (to a VIP) conntrack lookup → schedule on a new flow → NAT →
//! forward; (from a backend) conntrack lookup → reverse NAT → forward.
//! Every return goes through `count`, so every verdict has a counter.
#![no_std]
#![no_main]

mod conntrack;
mod forward;
mod maps;
mod nat;
mod parse;
mod reset;
mod schedule;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    maps::{
        backend_is_gone, end_reason, FlowEntry, SETTING_LOG_NEW_FLOWS, ServiceKey, ADDR_VIP, BACKEND_DOWN, DIR_TO_BACKEND, PROTO_TCP,
        SVC_F_MISS_REHASH,
    },
    stats as stat,
    tcp,
};

use crate::parse::{Packet, Verdict};

#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    stats::count(stat::RX);
    let v = match parse::parse(&ctx) {
        Ok(pkt) => balance(&ctx, &pkt),
        Err(v) => v,
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

#[inline(always)]
fn balance(ctx: &XdpContext, pkt: &Packet) -> Verdict {
    let now = conntrack::now();
    let is_tcp = pkt.key.proto == PROTO_TCP;
    if let Some((entry, table)) = conntrack::lookup(&pkt.key) {
        // SAFETY: map value pointer from the kernel; copied once.
        let e = unsafe { *entry };
        let to_backend = e.direction == DIR_TO_BACKEND;
        let (gone, reason) = match maps::BACKENDS.get(e.backend_id) {
            Some(b) => (
                backend_is_gone(b.state),
                if b.state == BACKEND_DOWN { end_reason::UNHEALTHY } else { end_reason::REMOVED },
            ),
            None => (true, end_reason::REMOVED),
        };
        if gone {
            conntrack::remove(&pkt.key, &e, table, reason, 0);
            if is_tcp {
                // No black hole: the sender learns at once.
                stats::count_reactive_reset(e.service_id, e.backend_id);
                return reset::answer(ctx, pkt, stat::RST_REACTIVE);
            }
            if !to_backend {
                return Verdict::drop(stat::DROP_GONE_BACKEND);
            }
            stats::count(stat::UDP_RESCHEDULED);
            return new_flow(ctx, pkt, now);
        }
        if is_tcp && pkt.tcp_flags & tcp::FLAG_RST != 0 {
            return pass_rst(ctx, pkt, &e, table, now);
        }
        if to_backend && conntrack::is_new_connection(entry, pkt) {
            // Port reuse after the previous connection ended: its entries
            // go, the SYN starts a new flow below.
            conntrack::remove(&pkt.key, &e, table, end_reason::FIN, 0);
        } else {
            conntrack::touch(entry, pkt, now);
            if table == conntrack::Table::HalfOpen && to_backend && pkt.tcp_flags & tcp::FLAG_SYN == 0 {
                // The handshake completed: the flow is established.
                // SAFETY: map value pointer; read after `touch` updated it.
                conntrack::promote(&pkt.key, unsafe { &*entry });
                stats::count(stat::PROMOTED);
            }
            return nat_and_forward(ctx, pkt, &e, false, now);
        }
    }
    if pkt.role != ADDR_VIP {
        // From a backend address but not a flow of ours: the host's own
        // traffic (health checks, management).
        return Verdict::pass(stat::PASS_NOT_SERVICE);
    }
    new_flow(ctx, pkt, now)
}

#[inline(always)]
fn nat_and_forward(ctx: &XdpContext, pkt: &Packet, e: &FlowEntry, new_flow: bool, now: u64) -> Verdict {
    let to_backend = e.direction == DIR_TO_BACKEND;
    if to_backend {
        nat::rewrite_dst(ctx, pkt, e.nat_addr, e.nat_port);
    } else {
        nat::rewrite_src(ctx, pkt, e.nat_addr, e.nat_port);
    }
    stats::count_traffic(e.service_id, e.backend_id, to_backend, pkt.ip_len as u64, new_flow);
    forward::forward(ctx, pkt, to_backend, e.nat_port, now)
}

/// A RST for a live flow is forwarded either way; it tears the flow down
/// only when it carries exactly the sequence number the receiver expects
/// (what the receiver itself accepts, RFC 5961 §3.2), so a spoofed or stale
/// RST cannot remove the flow from the table.
#[inline(always)]
fn pass_rst(ctx: &XdpContext, pkt: &Packet, e: &FlowEntry, table: conntrack::Table, now: u64) -> Verdict {
    let exact = e.tcp_state != tcp::STATE_NONE && pkt.seq == e.seq_next;
    if exact {
        let reason = if e.direction == DIR_TO_BACKEND { end_reason::RST_CLIENT } else { end_reason::RST_BACKEND };
        conntrack::remove(&pkt.key, e, table, reason, pkt.ip_len as u64);
        stats::count(stat::RST_TEARDOWN);
    } else {
        stats::count(stat::RST_IGNORED);
    }
    nat_and_forward(ctx, pkt, e, false, now)
}

#[inline(always)]
fn new_flow(ctx: &XdpContext, pkt: &Packet, now: u64) -> Verdict {
    let skey = ServiceKey {
        addr: pkt.key.dst_addr,
        port: pkt.key.dst_port,
        proto: pkt.key.proto,
        _pad: 0,
    };
    // SAFETY: read-only use of a value the controller writes whole.
    let Some(svc) = (unsafe { maps::SERVICES.get(&skey) }) else {
        return Verdict::pass(stat::PASS_NOT_SERVICE);
    };
    let mut by_hash = false;
    if pkt.key.proto == PROTO_TCP
        && pkt.tcp_flags & (tcp::FLAG_SYN | tcp::FLAG_ACK | tcp::FLAG_RST) != tcp::FLAG_SYN
    {
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
    let Some(entry) = conntrack::create(pkt, svc, backend_id, &backend, now) else {
        return Verdict::drop(stat::DROP_TABLE_FULL);
    };
    stats::count(stat::NEW_FLOWS);
    schedule::count_active(backend_id);
    if maps::SETTINGS.get(SETTING_LOG_NEW_FLOWS).is_some_and(|v| *v != 0) {
        conntrack::report(&pkt.key, &entry, None, end_reason::NEW);
    }
    nat_and_forward(ctx, pkt, &entry, true, now)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
