//! xlb's XDP program: NAT load balancing on a connection table of one entry
//! per flow.
//!
//! Two programs: the entry (`xlb`, module `fast`) takes the packets of
//! established flows and the host's own traffic in one BPF function; every
//! other packet goes by a tail call to the full program (`xlb_full`),
//! which handles anything from the top.
//!
//! The full program's packet path (one module per concern):
//! parse → to a service (`client`: the flow, a new one, or none) or from a
//! backend (`backend`: the flow found through the backend's services or its
//! full-NAT port) → `flow` (TCP tracking, promotion, counters) → NAT
//! (`nat`, or `encap` for DSR) → `forward` (next hop, TX or redirect).
//! Every return goes through one counter, so every verdict has a reason.
#![no_std]
#![no_main]
// Inline BPF assembly: word loads and stores of packet fields (`wire`).
#![feature(asm_experimental_arch)]

mod backend;
mod client;
mod conntrack;
mod csum;
mod encap;
mod fast;
mod flow;
mod forward;
mod icmp;
mod maps;
mod mss;
mod nat;
mod parse;
mod ports;
mod reset;
mod schedule;
mod stats;
mod too_big;
mod wire;

use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    maps::{EndpointKey, FILTER_ENDPOINT, FILTER_SERVICE, PROTO_TCP, ServiceKey},
    stats as stat, tcp,
};

use crate::parse::{Packet, Verdict};

/// The entry: parses, and takes what `fast` takes; the rest goes to
/// `xlb_full` (a tail call: no return, the packet starts over there).
/// (`inline(always)` reaches the body the macro wraps: one BPF function,
/// not two.)
#[xdp]
#[inline(always)]
pub fn xlb(ctx: XdpContext) -> u32 {
    let Some(pkt) = maps::PACKET.get_ptr_mut(0) else { return xdp_action::XDP_PASS };
    // SAFETY: this CPU's slot, used by this packet only; `parse` writes it
    // whole before anything reads it.
    let pkt = unsafe { &mut *pkt };
    let v = match parse::parse(&ctx, pkt) {
        Err(v) => v,
        Ok(()) => match fast::packet(&ctx, pkt) {
            Some(v) => v,
            None => {
                // SAFETY: a tail call with a constant index; on success it
                // does not return.
                unsafe { maps::FULL_PROGRAM.tail_call(&ctx, 0) };
                // Only a data plane loaded without its full program (the
                // loader fills the slot before anything is attached).
                Verdict::pass(stat::PASS_NO_FULL_PROGRAM)
            }
        },
    };
    stats::count(v.stat);
    v.action
}

/// The full program: any packet, from the top (parsed again: it trusts
/// nothing the entry left, so a restart that pairs an older entry with
/// this program stays correct).
#[xdp]
#[inline(always)]
pub fn xlb_full(ctx: XdpContext) -> u32 {
    let Some(pkt) = maps::PACKET.get_ptr_mut(0) else { return xdp_action::XDP_PASS };
    // SAFETY: this CPU's slot, used by this packet only; `parse_into`
    // writes it whole before anything reads it.
    let pkt = unsafe { &mut *pkt };
    let parsed = parse::parse_into(&ctx, pkt);
    let mut v = if parsed != parse::PARSED { Verdict::from_bits(parsed) } else { Verdict::from_bits(dispatch(&ctx, pkt)) };
    if v.stat & forward::TOO_BIG_STAT_MASK == stat::PASS_TOO_BIG && v.stat >> forward::TOO_BIG_MTU_SHIFT != 0 {
        // Too big and not rewritten (`flow::nat_and_forward`): answered
        // with the ICMP error; if it cannot be built, dropped (the packet
        // is still the client's or the backend's, addressed as it came).
        v = too_big::answer(&ctx, pkt, &pkt.answer_from, v.stat >> forward::TOO_BIG_MTU_SHIFT).unwrap_or(Verdict::drop(stat::PASS_TOO_BIG));
    }
    stats::count(v.stat);
    v.action
}

/// To a service (VIP:port), from a backend (ip:port), or neither: the
/// host's own traffic. Two small-hash lookups at most before the flow's.
/// A parsed packet to a service or from a backend. The flow is found by a
/// BPF function of its side (`client::find`, `backend::find`) and processed
/// by `flow::packet` called from here: each chain of calls stays within
/// the 512-byte BPF stack.
#[inline(always)]
fn dispatch(ctx: &XdpContext, pkt: &mut Packet) -> u64 {
    if pkt.icmp != lb_common::icmp::NOT_ERROR {
        return icmp::packet(ctx, pkt);
    }
    let k = &pkt.key;
    let mut mode = 0u64;
    // The port filter first (an inlined array read): traffic to no
    // service's port and from no backend's port costs no hash lookup.
    let filter = maps::PORT_FILTER.get(0);
    let maybe_service = filter.is_none_or(|f| f.contains(FILTER_SERVICE, k.proto, k.dst_port));
    // An established flow's packet (anything but a bare SYN) needs only
    // its entry: looked up first, the service's entry is not needed. (A
    // SYN, a miss, a closed flow or a rescheduled UDP flow take the
    // service path below.)
    let bare_syn = k.proto == PROTO_TCP && pkt.tcp_flags & (tcp::FLAG_SYN | tcp::FLAG_ACK) == tcp::FLAG_SYN;
    // A closed entry found here is handed to `client::find` (not looked up
    // twice).
    let mut closed_entry = core::ptr::null_mut();
    if maybe_service && !bare_syn {
        if let Some(e) = maps::CONNS.get_ptr_mut(&pkt.key) {
            // SAFETY: map value pointer from the kernel.
            let live = !unsafe { tcp::is_closed((*e).orig.state, (*e).reply.state) };
            if live {
                let v = flow::packet(ctx, pkt, &pkt.key, e, flow::mode(conntrack::Table::Established, true));
                if v != flow::RESCHEDULE {
                    return v;
                }
                // Rescheduled: the entry is gone.
            } else {
                closed_entry = e;
            }
        }
    }
    let k = &pkt.key;
    let skey = ServiceKey { addr: k.dst_addr, port: k.dst_port, proto: k.proto, _pad: 0 };
    // SAFETY: read-only use of a value the controller writes whole.
    if let Some(svc) = if maybe_service { unsafe { maps::SERVICES.get(&skey) } } else { None } {
        let e = client::find(pkt, svc, &mut mode, closed_entry);
        if !e.is_null() {
            let v = flow::packet(ctx, pkt, &pkt.key, e, mode);
            if v != flow::RESCHEDULE {
                return v;
            }
            return client::new_flow(ctx, pkt, svc, false);
        }
        return match client::unknown(pkt, svc) {
            client::Unknown::ByHash => client::by_hash(ctx, pkt, svc),
            client::Unknown::New => new_flow_or_existing(ctx, pkt, svc),
            client::Unknown::Reset => client::reset_miss(ctx, pkt),
            client::Unknown::Pass => Verdict::pass(stat::PASS_NO_FLOW).to_bits(),
        };
    }
    if filter.is_some_and(|f| !f.contains(FILTER_ENDPOINT, k.proto, k.src_port)) {
        return Verdict::pass(stat::PASS_NOT_SERVICE).to_bits();
    }
    let ekey = EndpointKey { addr: k.src_addr, port: k.src_port, proto: k.proto, _pad: 0 };
    // SAFETY: as above.
    if let Some(ep) = unsafe { maps::ENDPOINTS.get(&ekey) } {
        let e = backend::find(pkt, ep, &mut mode);
        if !e.is_null() {
            return flow::packet(ctx, pkt, &pkt.flow_key, e, mode);
        }
        return backend::no_flow(ctx, pkt, ep);
    }
    Verdict::pass(stat::PASS_NOT_SERVICE).to_bits()
}

/// A packet that starts a flow: inserted only if its key has no entry; if
/// it has (a retransmitted SYN of a flow in its handshake: the insert
/// found it, no lookup was made before), that flow takes the packet, and
/// if it is gone meanwhile or hands it back, a new flow replaces it.
#[inline(always)]
fn new_flow_or_existing(ctx: &XdpContext, pkt: &Packet, svc: &lb_common::maps::ServiceEntry) -> u64 {
    let v = client::new_flow(ctx, pkt, svc, true);
    if v != client::FLOW_EXISTS {
        return v;
    }
    if let Some(e) = maps::HALF_OPEN.get_ptr_mut(&pkt.key) {
        let v = flow::packet(ctx, pkt, &pkt.key, e, flow::mode(conntrack::Table::HalfOpen, true));
        if v != flow::RESCHEDULE {
            return v;
        }
    }
    // (A closed DSR flow's entry in the connection table, which a new DSR
    // flow replaces.)
    client::new_flow(ctx, pkt, svc, false)
}

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

/// On DSR backends (`xlb backend-setup`, TC egress): lowers the MSS the
/// host's SYN-ACKs from a VIP announce to what fits the tunnel (see
/// `mss`). Hands every packet on (`TC_ACT_UNSPEC`: the next program, or
/// the default action).
#[classifier]
pub fn xlb_mss_clamp(ctx: TcContext) -> i32 {
    mss::clamp(&ctx);
    TC_ACT_UNSPEC
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
