//! Full-NAT source ports. Each backend has the service's whole pool to
//! itself (what must be unique is the backend-side tuple). A port is taken
//! with an exclusive insert into `XLB_PORTS` keyed by the backend →
//! balancer tuple, so two flows, on any CPUs, can never hold the same one;
//! it is given back when its flow goes (`conntrack::remove`, or the
//! controller's removals and expiry pass).

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_prandom_u32};
use lb_common::maps::{Backend, FlowKey, SNAT_PORT_PROBES, ServiceEntry};

use crate::maps::PORTS;

/// A free source port (network byte order) towards `backend`, now owned by
/// the caller's new flow; `None` when `SNAT_PORT_PROBES` candidates from a
/// random start were all taken (or the pool is empty): the pool is
/// exhausted as far as this flow is concerned.
#[inline(always)]
pub fn allocate(svc: &ServiceEntry, backend: &Backend, proto: u8, now: u64) -> Option<u16> {
    let lo = svc.snat_port_lo as u32;
    let hi = svc.snat_port_hi as u32;
    if lo == 0 || hi < lo {
        return None;
    }
    let n = hi - lo + 1;
    if n == 0 {
        // Cannot happen (hi < 65536); spelled out so the division below
        // has no panic path, which the verifier would reject.
        return None;
    }
    // SAFETY: helper without arguments.
    let mut off = unsafe { bpf_get_prandom_u32() } % n;
    for _ in 0..SNAT_PORT_PROBES {
        let port = ((lo + off) as u16).to_be();
        if PORTS.insert(&port_key(backend, proto, port), &now, BPF_NOEXIST as u64).is_ok() {
            return Some(port);
        }
        off += 1;
        if off >= n {
            off = 0;
        }
    }
    None
}

/// Gives back a port whose flow could not be created.
#[inline(always)]
pub fn release(backend: &Backend, proto: u8, port: u16) {
    let _ = PORTS.remove(&port_key(backend, proto, port));
}

/// The `XLB_PORTS` key of `port` towards `backend`: the backend →
/// balancer tuple (also the key of the owning flow's reverse entry).
#[inline(always)]
fn port_key(backend: &Backend, proto: u8, port: u16) -> FlowKey {
    FlowKey { src_addr: backend.addr, dst_addr: backend.snat_addr, src_port: backend.port, dst_port: port, proto, _pad: [0; 3] }
}
