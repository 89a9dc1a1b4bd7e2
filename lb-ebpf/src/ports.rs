//! Full-NAT source ports. Each backend has the service's whole pool to
//! itself (what must be unique is the backend-side tuple). A port is taken
//! with an exclusive insert into `XLB_PORTS`, keyed by the backend →
//! balancer tuple and valued by the flow that holds it, and is never
//! deleted: when a new flow's probe finds a port whose holder is gone
//! (evicted, closed, removed), it takes the port over in place. So ports
//! come back by themselves, whether or not the daemon runs.
//!
//! The pool is split between the CPUs (port `lo + cpu + k × ncpus`): only
//! one CPU ever takes a given port over, and one CPU runs one packet at a
//! time, so the check "its holder is gone" and the takeover cannot race:
//! two live flows never share a port. A CPU whose own share is all held
//! may still claim another CPU's port that was never taken (the exclusive
//! insert decides), so a small pool is not cut in pieces while it has
//! never-used ports.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_get_smp_processor_id},
};
use lb_common::{
    maps::{Backend, FLOW_FULLNAT, FlowKey, FlowState, PortOwner, SNAT_PORT_PROBES, ServiceEntry},
    tcp,
};

use crate::maps::{CONNS, GLOBALS, HALF_OPEN, PORTS};

/// A free source port (network byte order) towards backend `backend_id`
/// for the new flow `owner`, now held by it; `None` when
/// `SNAT_PORT_PROBES` candidates of this CPU's share were all held by live
/// flows (or the share is empty): the pool is exhausted as far as this
/// flow is concerned.
#[inline(always)]
pub fn allocate(svc: &ServiceEntry, backend_id: u16, backend: &Backend, owner: &FlowKey, now: u32) -> Option<u16> {
    let lo = svc.snat_port_lo as u32;
    let hi = svc.snat_port_hi as u32;
    if lo == 0 || hi < lo {
        return None;
    }
    let claim = PortOwner { flow: *owner, claimed: now, _pad: 0 };
    if let Some(port) = from_own_share(lo, hi, backend_id, backend, owner, &claim, now) {
        return Some(port);
    }
    let n = hi - lo + 1;
    // This CPU's share is held: a port never taken, anywhere in the pool.
    // SAFETY: helper without arguments.
    let Some(mut p) = unsafe { bpf_get_prandom_u32() }.checked_rem(n) else { return None };
    for _ in 0..SNAT_PORT_PROBES {
        let port = ((lo + p) as u16).to_be();
        let key = port_key(backend, owner.proto, port);
        if PORTS.get_ptr_mut(&key).is_none() && PORTS.insert(&key, &claim, BPF_NOEXIST as u64).is_ok() {
            return Some(port);
        }
        p += 1;
        if p >= n {
            p = 0;
        }
    }
    None
}

/// A port of this CPU's share of the pool `lo..=hi` (see the module doc):
/// never taken, or taken over from a holder that is gone.
#[inline(always)]
fn from_own_share(lo: u32, hi: u32, backend_id: u16, backend: &Backend, owner: &FlowKey, claim: &PortOwner, now: u32) -> Option<u16> {
    let ncpus = GLOBALS.get(0).map_or(1, |g| if g.ncpus == 0 { 1 } else { g.ncpus });
    // SAFETY: helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let n = hi - lo + 1;
    if cpu >= n || ncpus == 0 {
        return None;
    }
    // This CPU's ports: lo + cpu, lo + cpu + ncpus, ...
    let share = (n - cpu).div_ceil(ncpus);
    if share == 0 {
        return None;
    }
    // SAFETY: helper without arguments.
    let mut k = unsafe { bpf_get_prandom_u32() } % share;
    for _ in 0..SNAT_PORT_PROBES {
        let port = ((lo + cpu + k * ncpus) as u16).to_be();
        let key = port_key(backend, owner.proto, port);
        match PORTS.get_ptr_mut(&key) {
            None => {
                if PORTS.insert(&key, claim, BPF_NOEXIST as u64).is_ok() {
                    return Some(port);
                }
            }
            Some(held) => {
                // SAFETY: map value pointer from the kernel.
                let held = unsafe { &mut *held };
                if holder_gone(&held.flow, backend_id, port, now) {
                    // Only this CPU takes this port over (see the module doc).
                    held.flow = *owner;
                    held.claimed = now;
                    crate::stats::count(lb_common::stats::PORT_RECLAIMED);
                    return Some(port);
                }
            }
        }
        k += 1;
        if k >= share {
            k = 0;
        }
    }
    None
}

/// Whether the flow `flow` no longer holds `port` towards `backend_id`:
/// it left the tables, its key now belongs to another connection (another
/// backend or port), or it is over (both FINs, or a RST). A closed flow's
/// port may carry a new connection at once (the backend's side of it is
/// done too).
#[inline(always)]
fn holder_gone(flow: &FlowKey, backend_id: u16, port: u16, _now: u32) -> bool {
    // SAFETY: read-only uses of map values.
    let e = match unsafe { CONNS.get(flow) } {
        Some(e) => e,
        // SAFETY: as above.
        None => match unsafe { HALF_OPEN.get(flow) } {
            Some(e) => e,
            None => return true,
        },
    };
    !holds(e, backend_id, port) || tcp::is_closed(e.orig.state, e.reply.state)
}

/// Whether flow state `e` is the holder of `port` towards `backend_id`.
#[inline(always)]
pub fn holds(e: &FlowState, backend_id: u16, port: u16) -> bool {
    e.flags & FLOW_FULLNAT != 0 && e.snat_port == port && e.backend_id == backend_id
}

/// Gives back a port whose flow could not be created (same CPU, same
/// packet: nobody else has seen it).
#[inline(always)]
pub fn release(backend: &Backend, proto: u8, port: u16) {
    let _ = PORTS.remove(&port_key(backend, proto, port));
}

/// The `XLB_PORTS` key of `port` towards `backend`: the backend →
/// balancer tuple (what the backend's packets of the flow arrive with).
#[inline(always)]
fn port_key(backend: &Backend, proto: u8, port: u16) -> FlowKey {
    FlowKey::new(backend.addr, backend.snat_addr, backend.port, port, proto)
}
