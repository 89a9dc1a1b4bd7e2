//! Backend choice for a new flow. Every scheduler reads the service's ring
//! of backend ids (filled by the controller); they differ only in how the
//! slot is chosen. `pick` is the one entry point the rest of the program
//! uses, so Maglev (hash → slot) and least-connections plug in here.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::maps::{BACKEND_UP, Backend, FlowKey, RING_SLOTS, SCHED_LEAST_CONN, SCHED_MAGLEV, SCHED_WRR, ServiceEntry};

use crate::maps::{BACKEND_ACTIVE, BACKENDS, CURSOR, GLOBALS, RING};

/// Slots tried when the chosen backend is not up (the controller removes
/// such backends from the ring; this covers the moment in between).
const MAX_PROBES: u32 = 4;

/// Picks a backend for a new flow: `(backend id, backend)`. `by_hash`
/// chooses the slot from the 5-tuple alone, so every balancer with the same
/// ring picks the same backend for a flow it has never seen.
#[inline(always)]
pub fn pick(svc: &ServiceEntry, key: &FlowKey, by_hash: bool) -> Option<(u32, &'static Backend)> {
    let len = svc.ring_len;
    if len == 0 || len > RING_SLOTS {
        return None;
    }
    let start = if by_hash || svc.scheduler == SCHED_MAGLEV {
        flow_hash(key) % len
    } else if svc.scheduler == SCHED_WRR {
        next_cursor(svc.id, len)?
    } else if svc.scheduler == SCHED_LEAST_CONN {
        least_conn_slot(svc.id, len)?
    } else {
        return None;
    };
    let base = svc.id.checked_mul(RING_SLOTS)?;
    for i in 0..MAX_PROBES {
        let mut slot = start + i;
        if slot >= len {
            slot -= len;
        }
        let Some(&id) = RING.get(base + slot) else { continue };
        let Some(b) = BACKENDS.get(id) else { continue };
        if b.state == BACKEND_UP {
            return Some((id, b));
        }
    }
    None
}

/// Weighted round robin: this CPU's cursor over the (already weighted and
/// interleaved) ring.
#[inline(always)]
fn next_cursor(service_id: u32, len: u32) -> Option<u32> {
    let cur = CURSOR.get_ptr_mut(service_id)?;
    // SAFETY: per-CPU slot.
    unsafe {
        let mut c = *cur;
        if c >= len {
            c = 0;
        }
        *cur = c + 1;
        Some(c)
    }
}

/// The keyed hash of the 5-tuple (`lb_common::sched_hash`): the same on
/// every node sharing the key, unpredictable without it.
#[inline(always)]
pub fn flow_hash(k: &FlowKey) -> u32 {
    let key = GLOBALS.get(0).map_or([0, 0], |g| g.hash_key);
    lb_common::sched_hash::flow_hash(&key, &k.src_addr, &k.dst_addr, k.src_port, k.dst_port, k.proto)
}

/// Least connections by sampling: `LC_CHOICES` slots of the weighted ring
/// drawn at random, and the backend with the fewest active flows per unit
/// of weight wins (ties: the first drawn). Four choices rather than the
/// classic two: the least-loaded of three equal backends is among them 80%
/// of the time instead of 56%, for three more lookups per new flow.
#[inline(always)]
fn least_conn_slot(service_id: u32, len: u32) -> Option<u32> {
    const LC_CHOICES: u32 = 4;
    if len == 0 {
        return None;
    }
    let base = service_id.checked_mul(RING_SLOTS)?;
    // SAFETY: helper without arguments.
    let r1 = unsafe { bpf_get_prandom_u32() };
    // SAFETY: as above.
    let r2 = unsafe { bpf_get_prandom_u32() };
    let draws = [r1 & 0xffff, r1 >> 16, r2 & 0xffff, r2 >> 16];
    let mut best: Option<(u32, u64, u64)> = None; // (slot, active, weight)
    for i in 0..LC_CHOICES as usize {
        let slot = draws[i] % len;
        let Some(&id) = RING.get(base + slot) else { continue };
        let Some(b) = BACKENDS.get(id) else { continue };
        let w = b.weight.max(1) as u64;
        let active = BACKEND_ACTIVE.get(id).copied().unwrap_or(0);
        // active/w < best_active/best_w, without division.
        let better = match best {
            None => true,
            Some((_, ba, bw)) => active * bw < ba * w,
        };
        if better {
            best = Some((slot, active, w));
        }
    }
    best.map(|(slot, _, _)| slot)
}

/// Counts a new flow on its backend (least-connections input). A plain
/// add: the BPF target has no atomic read-modify-write in `core`, and two
/// CPUs colliding on the same backend lose an increment at worst, which the
/// controller's once-a-second recount (from the table) corrects.
#[inline(always)]
pub fn count_active(backend_id: u32) {
    if let Some(p) = BACKEND_ACTIVE.get_ptr_mut(backend_id) {
        // SAFETY: a valid map value.
        unsafe { *p += 1 };
    }
}
