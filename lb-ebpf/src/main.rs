//! xlb's XDP program: NAT load balancing on a connection table of one entry
//! per flow.
//!
//! Packet path (one module per concern):
//! parse → to a service (`client`: the flow, a new one, or none) or from a
//! backend (`backend`: the flow found through the backend's services or its
//! full-NAT port) → `flow` (TCP tracking, promotion, counters) → NAT
//! (`nat`, or `encap` for DSR) → `forward` (next hop, TX or redirect).
//! Every return goes through one counter, so every verdict has a reason.
#![no_std]
#![no_main]

mod backend;
mod client;
mod conntrack;
mod csum;
mod encap;
mod flow;
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
    maps::{EndpointKey, ServiceKey},
    stats as stat,
};

use crate::parse::{Packet, Verdict};

#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    let mut pkt = Packet::default();
    let parsed = parse::parse_into(&ctx, &mut pkt);
    let v = if parsed != parse::PARSED { Verdict::from_bits(parsed) } else { Verdict::from_bits(dispatch(&ctx, &pkt)) };
    stats::count(v.stat);
    v.action
}

/// To a service (VIP:port), from a backend (ip:port), or neither: the
/// host's own traffic. Two small-hash lookups at most before the flow's.
#[inline(always)]
fn dispatch(ctx: &XdpContext, pkt: &Packet) -> u64 {
    let k = &pkt.key;
    let skey = ServiceKey { addr: k.dst_addr, port: k.dst_port, proto: k.proto, _pad: 0 };
    // SAFETY: read-only use of a value the controller writes whole.
    if let Some(svc) = unsafe { maps::SERVICES.get(&skey) } {
        return client::packet(ctx, pkt, svc);
    }
    let ekey = EndpointKey { addr: k.src_addr, port: k.src_port, proto: k.proto, _pad: 0 };
    // SAFETY: as above.
    if let Some(ep) = unsafe { maps::ENDPOINTS.get(&ekey) } {
        return backend::packet(ctx, pkt, ep);
    }
    Verdict::pass(stat::PASS_NOT_SERVICE).to_bits()
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

/// The data plane's clock for the controller: writes jiffies and
/// `bpf_ktime_get_coarse_ns` into the first 16 bytes of the test frame it
/// is run on (`BPF_PROG_TEST_RUN`), so the controller can map flow times
/// (jiffies) to its own clock. Never attached.
#[xdp]
pub fn xlb_clock(ctx: XdpContext) -> u32 {
    let Some(p) = parse::ptr_at::<[u64; 2]>(&ctx, 0) else { return xdp_action::XDP_ABORTED };
    // SAFETY: bounds-checked just above; helpers without arguments.
    unsafe {
        (*p)[0] = conntrack::now();
        (*p)[1] = aya_ebpf::helpers::bpf_ktime_get_coarse_ns();
    }
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
