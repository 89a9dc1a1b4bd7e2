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
mod schedule;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    maps::{ServiceKey, ADDR_VIP, DIR_TO_BACKEND, PROTO_TCP},
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
    if let Some(entry) = conntrack::lookup(&pkt.key) {
        let reschedule = pkt.role == ADDR_VIP && conntrack::is_new_connection(entry, pkt);
        if !reschedule {
            conntrack::touch(entry, pkt, now);
            // SAFETY: map value pointer from the kernel.
            let e = unsafe { *entry };
            let to_backend = e.direction == DIR_TO_BACKEND;
            if to_backend {
                nat::rewrite_dst(ctx, pkt, e.nat_addr, e.nat_port);
            } else {
                nat::rewrite_src(ctx, pkt, e.nat_addr, e.nat_port);
            }
            stats::count_traffic(e.service_id, e.backend_id, to_backend, pkt.ip_len as u64, false);
            return forward::forward(ctx, pkt, to_backend, e.nat_port);
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
    // Only a SYN opens a TCP flow; anything else without an entry creates
    // no state.
    if pkt.key.proto == PROTO_TCP
        && pkt.tcp_flags & (tcp::FLAG_SYN | tcp::FLAG_ACK | tcp::FLAG_RST) != tcp::FLAG_SYN
    {
        return Verdict::pass(stat::PASS_NO_FLOW);
    }
    let Some((backend_id, backend)) = schedule::pick(svc, &pkt.key) else {
        return Verdict::pass(stat::PASS_NO_BACKEND);
    };
    let Some(entry) = conntrack::create(pkt, svc, backend_id, &backend, now) else {
        return Verdict::drop(stat::DROP_TABLE_FULL);
    };
    stats::count(stat::NEW_FLOWS);
    nat::rewrite_dst(ctx, pkt, entry.nat_addr, entry.nat_port);
    stats::count_traffic(svc.id, backend_id, true, pkt.ip_len as u64, true);
    forward::forward(ctx, pkt, true, entry.nat_port)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
