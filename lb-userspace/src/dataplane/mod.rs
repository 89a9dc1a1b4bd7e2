//! The data-plane layer: everything that touches the kernel's programs and
//! maps (aya), behind two traits so the controller above it runs, and is
//! tested, against an in-memory fake ([`fake`]) as well as the real thing
//! ([`kernel`]).
//!
//! - [`DataPlane`]: the configuration maps the controller writes (services,
//!   backends, rings, address roles, switches) and the counters it reads.
//!   Owned by the controller.
//! - [`FlowTable`]: the connection table: walks, removals that re-check
//!   what they remove, synced installs, full-NAT ports. A cheap handle that
//!   can be cloned onto other threads (the table walker, the reset worker),
//!   so no table walk ever runs on the controller's own thread.
//!
//! The table is seen as [`Flow`]s (both directions of a flow joined), not
//! as the kernel's entries: how a flow is stored is this layer's business.

pub mod batch;
pub mod fake;
pub mod iface;
pub mod kernel;

use lb_common::{
    maps::{Addr, Backend, DIR_TO_BACKEND, FlowEntry, FlowKey, NAT_ENCAP, PROTO_TCP, ServiceEntry, ServiceKey, TrafficCounters},
    rst::Rst,
    tcp,
};

pub use kernel::{
    AttachMode, Attachment, DataplaneError, EBPF_OBJECT, KernelDataPlane, KernelTable, LoadOptions, attach_decap_pinned, chain, ifindex, pinned_links,
    remove_pins, unpin_link,
};

pub type Result<T> = std::result::Result<T, DataplaneError>;

/// Which per-CPU traffic counters: per service id or per backend id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficOf {
    Services,
    Backends,
}

/// The configuration maps and counters (see the module doc).
pub trait DataPlane: Send + 'static {
    type Table: FlowTable + Clone;

    /// A handle on the connection table for other threads.
    fn table(&self) -> Self::Table;

    fn service_set(&mut self, key: ServiceKey, entry: ServiceEntry) -> Result<()>;
    fn service_remove(&mut self, key: &ServiceKey) -> Result<()>;
    /// Sets the role bits of an address (`ADDR_*`); 0 removes it.
    fn addr_set(&mut self, addr: Addr, flags: u32) -> Result<()>;
    fn backend_set(&mut self, id: u32, b: Backend) -> Result<()>;
    /// Writes the slots of service `service_id`'s ring that differ from
    /// `old` (one batched operation where the kernel allows).
    fn ring_write(&mut self, service_id: u32, old: &[u32], new: &[u32]) -> Result<()>;
    /// Sets a global switch (`SETTING_*`).
    fn setting_set(&mut self, index: u32, value: u32) -> Result<()>;
    /// Sets a backend's active-flow count (least-connections input).
    fn backend_active_set(&mut self, id: u32, count: u64) -> Result<()>;
    /// Zeroes a service's or a backend's traffic counters (ids are reused).
    fn reset_traffic(&mut self, service_id: Option<u32>, backend_id: Option<u32>) -> Result<()>;

    /// Global counters summed over CPUs, indexed by `lb_common::stats`.
    fn global_counters(&self) -> Result<Vec<u64>>;
    /// Traffic counters of `ids`, summed over CPUs, in order.
    fn traffic(&self, of: TrafficOf, ids: &[u32]) -> Result<Vec<TrafficCounters>>;

    /// Where the program is attached.
    fn attachments(&self) -> Vec<Attachment>;
    /// (connection table, half-open table) capacities, in flows.
    fn capacity(&self) -> (u32, u32);
}

/// Entries seen by a walk, per table (kept or not by the caller).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableCounts {
    pub established_entries: u64,
    pub half_open_entries: u64,
}

/// A flow to remove, as it was when the decision was made. The removal
/// re-checks it: a different flow on the same 5-tuple (another creation
/// time) is never removed, and neither, with `idle`, is one that saw a
/// packet since (it revived).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowRef {
    pub flow: Flow,
    /// Only if it is still as idle as it was.
    pub idle: bool,
}

/// The connection table (see the module doc).
pub trait FlowTable: Send + Sync + 'static {
    /// Calls `flows` for every flow (batched walks of both tables), and
    /// `orphans` for every entry of a flow whose other half is gone (the
    /// LRU can evict one entry of a pair).
    fn walk(&self, flows: &mut dyn FnMut(&Flow), orphans: &mut dyn FnMut(&FlowKey, &FlowEntry)) -> Result<TableCounts>;
    /// Removes the flows still as decided (see [`FlowRef`]), with the
    /// full-NAT ports they held; returns those removed, as they were just
    /// before (their sequence numbers are what a RST needs).
    fn remove_if_unchanged(&self, decided: &[FlowRef]) -> Result<Vec<Flow>>;
    /// Removes flows by key whatever they are now (what the sync peer says
    /// ended). Returns how many entries went.
    fn remove_keys(&self, keys: &[FlowKey]) -> Result<usize>;
    /// Installs a flow (state sync from the peer; benchmarks), both its
    /// entries, holding its full-NAT port.
    fn install(&self, flow: &Flow, now_ns: u64) -> Result<()>;
    /// Calls `f` for every full-NAT port held: (port key, allocation time).
    fn for_each_port(&self, f: &mut dyn FnMut(&FlowKey, u64)) -> Result<()>;
    /// Whether a full-NAT port still belongs to a flow.
    fn port_in_use(&self, key: &FlowKey) -> Result<bool>;
    /// Gives full-NAT ports back; returns how many were held.
    fn ports_release(&self, keys: &[FlowKey]) -> Result<usize>;
    /// Entries this process removed since the data plane was loaded (the
    /// kernel does not count LRU evictions: they are computed from it).
    fn entries_removed(&self) -> u64;
}

/// One flow of the table: its client → VIP entry and, when present, its
/// backend → client entry (a DSR flow has none; an evicted one may have
/// lost it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub key: FlowKey,
    pub fwd: FlowEntry,
    pub reverse_key: FlowKey,
    pub rev: Option<FlowEntry>,
    /// Still in the half-open table (TCP handshake not completed).
    pub half_open: bool,
}

impl Flow {
    /// A flow from its client → VIP entry (`key`, `fwd`) and the table's
    /// entry for the other direction, if any.
    pub fn joined(key: FlowKey, fwd: FlowEntry, rev: Option<FlowEntry>, half_open: bool) -> Flow {
        Flow { key, reverse_key: fwd.peer_key(key.proto), fwd, rev, half_open }
    }

    pub fn backend_id(&self) -> u32 {
        self.fwd.backend_id
    }

    pub fn service_id(&self) -> u32 {
        self.fwd.service_id
    }

    pub fn is_tcp(&self) -> bool {
        self.key.proto == PROTO_TCP
    }

    /// A direct-server-return flow (one entry: the backend answers the
    /// client itself).
    pub fn is_dsr(&self) -> bool {
        self.fwd.nat_flags & NAT_ENCAP != 0
    }

    /// The latest packet of either direction (monotonic ns).
    pub fn last_seen_ns(&self) -> u64 {
        self.rev.map_or(self.fwd.last_seen_ns, |r| r.last_seen_ns.max(self.fwd.last_seen_ns))
    }

    /// The TCP state of the flow for humans, both directions combined.
    pub fn combined_state(&self) -> u8 {
        tcp::combined_state(self.fwd.tcp_state, self.rev.map_or(tcp::STATE_NONE, |r| r.tcp_state))
    }

    /// UDP flows, and TCP flows not yet over: no RST seen, and not both
    /// sides' FIN (a half-closed flow may still carry data one way).
    pub fn is_active(&self) -> bool {
        if !self.is_tcp() {
            return true;
        }
        let rev = self.rev.map_or(tcp::STATE_NONE, |r| r.tcp_state);
        let closed = self.fwd.tcp_state == tcp::STATE_CLOSED || rev == tcp::STATE_CLOSED;
        let both_fin = self.fwd.tcp_state == tcp::STATE_FIN && rev == tcp::STATE_FIN;
        !closed && !both_fin
    }

    /// The entries' keys (the second is absent in DSR).
    pub fn keys(&self) -> impl Iterator<Item = FlowKey> + '_ {
        std::iter::once(self.key).chain((!self.is_dsr()).then_some(self.reverse_key))
    }

    /// The RST to the client, from VIP:port, with the sequence number the
    /// client expects next. A client whose SYN was never answered gets a
    /// RST|ACK acknowledging the SYN (what SYN-SENT accepts, RFC 793).
    pub fn client_rst(&self) -> Rst {
        let (seq, ack) = match self.rev {
            Some(r) if r.tcp_state != tcp::STATE_NONE => (r.seq_next, None),
            _ => (0, Some(self.fwd.seq_next)),
        };
        Rst { src: self.key.dst_addr, dst: self.key.src_addr, sport: self.key.dst_port.to_ne_bytes(), dport: self.key.src_port.to_ne_bytes(), seq, ack }
    }

    /// The RST to the backend, from the address and port it knows the
    /// client by (the client's own in DNAT, the balancer's in full NAT),
    /// with the sequence number the backend expects next (frees its socket
    /// at once).
    pub fn backend_rst(&self) -> Rst {
        Rst {
            src: self.fwd.nat_src,
            dst: self.fwd.nat_dst,
            sport: self.fwd.nat_sport.to_ne_bytes(),
            dport: self.fwd.nat_dport.to_ne_bytes(),
            seq: self.fwd.seq_next,
            ack: None,
        }
    }

    /// The flow as a flow-log / sync record.
    pub fn end_record(&self, reason: u32) -> lb_common::maps::FlowEnd {
        lb_common::maps::FlowEnd { key: self.key, reason, _pad: 0, to_backend: self.fwd, to_client: self.rev.unwrap_or_default() }
    }

    /// Whether `now` (the table's current copy of this flow) is still the
    /// flow `self` was when a decision was made about it: the same
    /// connection (creation time; and its packet count, which only grows,
    /// tells apart two connections made within one tick of the data
    /// plane's coarse clock), and with `idle`, no packet since in either
    /// direction (counted exactly: the data plane updates `last_seen` only
    /// every so often).
    pub fn unchanged_in(&self, now: &Flow, idle: bool) -> bool {
        let rev_packets = |f: &Flow| f.rev.map_or(0, |r| r.packets);
        let same = self.fwd.created_ns == now.fwd.created_ns && now.fwd.packets >= self.fwd.packets && self.fwd.direction == DIR_TO_BACKEND;
        same && (!idle || (now.fwd.packets == self.fwd.packets && rev_packets(now) <= rev_packets(self)))
    }
}
