//! Per-CPU counters: every verdict has a reason, and every reason a counter.

use lb_common::maps::TrafficCounters;

use crate::maps::{BACKEND_STATS, SERVICE_STATS, STATS};

#[inline(always)]
pub fn count(idx: u32) {
    count_n(idx, 1);
}

#[inline(always)]
pub fn count_n(idx: u32, n: u64) {
    if let Some(c) = STATS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *c += n };
    }
}

/// Adds one packet of `bytes` to a backend's counters (the controller sums
/// a service's from its backends': one per-CPU write per packet, not two).
#[inline(always)]
pub fn count_traffic(backend_id: u32, to_backend: bool, bytes: u64) {
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        let c = unsafe { &mut *c };
        if to_backend {
            c.packets_in += 1;
            c.bytes_in += bytes;
        } else {
            c.packets_out += 1;
            c.bytes_out += bytes;
        }
    }
}

/// Counts a new flow on its service and backend.
#[inline(always)]
pub fn count_new_flow(service_id: u32, backend_id: u32) {
    count(lb_common::stats::NEW_FLOWS);
    count_event(service_id, backend_id, |c| c.new_flows += 1);
}

/// Counts a reactive RST on the flow's service and backend.
#[inline(always)]
pub fn count_reactive_reset(service_id: u32, backend_id: u32) {
    count_event(service_id, backend_id, |c| c.reactive_resets += 1);
}

/// Counts a new flow refused for want of a full-NAT source port.
#[inline(always)]
pub fn count_no_port(service_id: u32, backend_id: u32) {
    count_event(service_id, backend_id, |c| c.no_port += 1);
}

#[inline(always)]
fn count_event(service_id: u32, backend_id: u32, bump: impl Fn(&mut TrafficCounters)) {
    for c in [SERVICE_STATS.get_ptr_mut(service_id), BACKEND_STATS.get_ptr_mut(backend_id)].into_iter().flatten() {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        bump(unsafe { &mut *c });
    }
}
