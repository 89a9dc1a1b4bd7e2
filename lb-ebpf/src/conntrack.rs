//! The connection table: one entry per flow, keyed by the client → VIP
//! 5-tuple, in one of two tables: `HALF_OPEN` until the flow is confirmed
//! (a TCP handshake the client completed by acknowledging the backend's
//! SYN-ACK, a UDP flow the backend answered), then `CONNS`. Lookups,
//! creation, promotion, removal, and the records sent to the controller.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_jiffies64,
};
use lb_common::maps::{Backend, FlowEnd, FlowKey, FlowState, GLOBAL_LOG_NEW_FLOWS, LAST_SEEN_STEP, TcpDir, end_reason};

use crate::maps::{BACKENDS, CONNS, FLOW_EVENTS, GLOBALS, HALF_OPEN, SCRATCH};

/// The data plane's clock: jiffies (one load: the verifier inlines the
/// helper). Flow times are its low 32 bits; the controller maps them to
/// its own clock (see `dataplane::clock`).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_jiffies64() }
}

/// Where a flow's entry lives.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Table {
    Established = 0,
    HalfOpen = 1,
}

#[inline(always)]
pub fn get(table: Table, key: &FlowKey) -> Option<*mut FlowState> {
    if table == Table::Established { CONNS.get_ptr_mut(key) } else { HALF_OPEN.get_ptr_mut(key) }
}

/// A new flow's state, built in this CPU's scratch slot (an entry would
/// not fit the BPF stack beside the packet's state): every field written,
/// nothing of either side seen yet.
#[inline(always)]
pub fn scratch(backend_id: u16, service_id: u8, flags: u8, snat_port: u16, now: u32) -> Option<&'static mut FlowState> {
    let st = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot; nothing else uses it during this
    // packet.
    let st = unsafe { &mut *st };
    st.backend_id = backend_id;
    st.service_id = service_id;
    st.flags = flags;
    st.snat_port = snat_port;
    st._pad = 0;
    st.hop = 0;
    st.created = now;
    st.last_seen = now;
    st.packets_orig = 0;
    st.packets_reply = 0;
    st.orig = TcpDir::default();
    st.reply = TcpDir::default();
    st.bytes_orig = 0;
    st.bytes_reply = 0;
    Some(st)
}

/// Enters a new flow (`state`, usually in per-CPU scratch space) in
/// `table`. A flow on the same key there is replaced: it is the same
/// client connection again (a retransmitted SYN whose entry was evicted, a
/// reused port).
#[inline(always)]
pub fn insert(table: Table, key: &FlowKey, state: &FlowState) -> bool {
    insert_entry(table, key, state, false) == Inserted::Yes
}

/// What an insert did.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    Yes,
    /// `only_new` and the key is there: nothing written.
    Exists,
    /// The table refused it.
    Refused,
}

/// Inserts a flow's entry; `only_new`: only if its key has none
/// (`BPF_NOEXIST`), what a SYN needs in one call instead of a lookup
/// (almost always a miss) and then an insert.
#[inline(always)]
pub fn insert_entry(table: Table, key: &FlowKey, state: &FlowState, only_new: bool) -> Inserted {
    let flags = if only_new { BPF_NOEXIST } else { BPF_ANY } as u64;
    let r = if table == Table::Established { CONNS.insert(key, state, flags) } else { HALF_OPEN.insert(key, state, flags) };
    match r {
        Ok(()) => {
            crate::stats::count(lb_common::stats::ENTRIES_CREATED);
            Inserted::Yes
        }
        Err(e) if e == -EEXIST => Inserted::Exists,
        Err(_) => Inserted::Refused,
    }
}

const EEXIST: i32 = 17;

/// Moves a confirmed flow from the half-open table to the connection table
/// (one insert, one delete: the entry stays whole). `e` is read before it
/// goes: afterwards its memory may hold another flow.
#[inline(always)]
pub fn promote(key: &FlowKey, e: *mut FlowState) {
    // SAFETY: map value pointer from the kernel.
    let st = unsafe { &mut *e };
    report_new(key, st);
    if CONNS.insert(key, st, BPF_ANY as u64).is_ok() {
        let _ = HALF_OPEN.remove(key);
        crate::stats::count(lb_common::stats::PROMOTED);
    }
}

/// Removes a flow and reports it (`reason`; `last_bytes` for the packet
/// that ended it, counted on the side `last_to_backend` says).
#[inline(always)]
pub fn remove(key: &FlowKey, e: *const FlowState, table: Table, reason: u32) {
    // SAFETY: map value pointer; read before the entry goes.
    report(key, unsafe { &*e }, reason);
    let _ = if table == Table::Established { CONNS.remove(key) } else { HALF_OPEN.remove(key) };
    crate::stats::count(lb_common::stats::ENTRIES_REMOVED);
}

/// Refreshes `last_seen` (at most every `LAST_SEEN_STEP` jiffies, so an
/// established flow's pure ACKs leave the line clean) and the counters.
#[inline(always)]
pub fn touch(st: &mut FlowState, to_backend: bool, bytes: u32, now: u32) {
    if now.wrapping_sub(st.last_seen) >= LAST_SEEN_STEP {
        st.last_seen = now;
    }
    if to_backend {
        st.packets_orig += 1;
        st.bytes_orig += bytes as u64;
    } else {
        st.packets_reply += 1;
        st.bytes_reply += bytes as u64;
    }
}

/// Reports a newly confirmed flow, once, when the controller asked for
/// new-flow records (flow logs, state sync).
#[inline(always)]
pub fn report_new(key: &FlowKey, st: &mut FlowState) {
    if st.flags & lb_common::maps::FLOW_REPORTED != 0 {
        return;
    }
    st.flags |= lb_common::maps::FLOW_REPORTED;
    if GLOBALS.get(0).is_some_and(|g| g.flags & GLOBAL_LOG_NEW_FLOWS != 0) {
        report(key, st, end_reason::NEW);
    }
}

/// Sends a flow record to the controller, with its backend by address.
/// Written straight into the ring buffer (the record would not fit the BPF
/// stack beside the packet's state). A full ring buffer loses the record,
/// counted, never the packet.
#[inline(always)]
pub fn report(key: &FlowKey, st: &FlowState, reason: u32) {
    let Some(mut slot) = FLOW_EVENTS.reserve::<FlowEnd>(0) else {
        crate::stats::count(lb_common::stats::FLOW_LOG_DROPPED);
        return;
    };
    let p = slot.as_mut_ptr();
    let b: Option<&Backend> = BACKENDS.get(st.backend_id as u32);
    // SAFETY: `p` points to a reserved, properly sized record; every field
    // is written.
    unsafe {
        (*p).key = *key;
        (*p).reason = reason;
        (*p)._pad = 0;
        match b {
            Some(b) => {
                (*p).backend = b.addr;
                (*p).backend_port = b.port;
                (*p).snat = b.snat_addr;
            }
            None => {
                (*p).backend = [0; 4];
                (*p).backend_port = 0;
                (*p).snat = [0; 4];
            }
        }
        (*p).state = *st;
    }
    slot.submit(0);
}
