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
//! The table holds one entry per flow (`lb_common::maps::FlowState`, keyed
//! by the client → VIP 5-tuple); the controller sees it as [`Flow`]s, and
//! names backends by id (addresses come from the model, [`BackendRef`]).

pub mod batch;
pub mod clock;
pub mod fake;
pub mod iface;
pub mod kernel;

use lb_common::{
    maps::{
        Addr, Backend, EndpointEntry, EndpointKey, FLOW_DSR, FLOW_FULLNAT, FlowEnd, FlowKey, FlowState, Globals, PROTO_TCP, PortFilter, PortOwner,
        ServiceEntry, ServiceKey, TCPD_SEEN, TrafficCounters,
    },
    rst::Rst,
    tcp,
};

pub use kernel::{
    AttachMode, Attachment, DataplaneError, EBPF_OBJECT, KernelDataPlane, KernelTable, LoadOptions, attach_decap_pinned, attach_mss_clamp_pinned, chain,
    ifindex, load_mss_clamp, mss_clamp_program, pinned_links, remove_pins, unpin_link,
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
    /// Sets the data plane's settings (`Globals`).
    fn globals_set(&mut self, g: Globals) -> Result<()>;
    /// Sets how a backend endpoint's packets find their flows (`None`
    /// removes it).
    fn endpoint_set(&mut self, key: EndpointKey, entry: Option<EndpointEntry>) -> Result<()>;
    /// Sets which ports may have a service or an endpoint (a set bit only
    /// means "look"; see `PortFilter`).
    fn port_filter_set(&mut self, f: &PortFilter) -> Result<()>;
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

/// Flows seen by a walk, per table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableCounts {
    pub established: u64,
    pub half_open: u64,
}

/// A flow to remove, as it was when the decision was made. The removal
/// re-checks it: a different connection on the same 5-tuple (another
/// creation time, or fewer packets) is never removed, and neither, with
/// `idle`, is one that saw a packet since (it revived).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowRef {
    pub flow: Flow,
    /// Only if it is still as idle as it was.
    pub idle: bool,
}

/// The connection table (see the module doc).
pub trait FlowTable: Send + Sync + 'static {
    /// Calls `f` for every flow of both tables (batched walks).
    fn walk(&self, f: &mut dyn FnMut(&Flow)) -> Result<TableCounts>;
    /// Removes the flows still as decided (see [`FlowRef`]); returns those
    /// removed, as they were just before (their sequence numbers are what a
    /// RST needs). Their full-NAT ports are taken back by the data plane.
    fn remove_if_unchanged(&self, decided: &[FlowRef]) -> Result<Vec<Flow>>;
    /// Removes flows by key whatever they are now (what the sync peer says
    /// ended). Returns how many went.
    fn remove_keys(&self, keys: &[FlowKey]) -> Result<usize>;
    /// Installs an established flow (state sync from the peer; benchmarks),
    /// and for full NAT its port (`port`: the backend → balancer key).
    fn install(&self, flow: &Flow, port: Option<FlowKey>) -> Result<()>;
    /// Calls `f` for every full-NAT port entry: (backend → balancer key,
    /// holder). Holders may be gone: the data plane takes such ports back
    /// when it needs them.
    fn for_each_port(&self, f: &mut dyn FnMut(&FlowKey, &PortOwner)) -> Result<()>;
    /// The data plane's clock now (jiffies, low 32 bits: the unit of flow
    /// times).
    fn now(&self) -> Result<u32>;
    /// Jiffies per second.
    fn hz(&self) -> u32;
    /// Flows this process removed since the data plane was loaded (the
    /// kernel does not count LRU evictions: they are computed from it).
    fn entries_removed(&self) -> u64;
}

/// A backend as flow records and RSTs name it: address, port (network
/// byte order), the balancer's full-NAT source towards it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendRef {
    pub addr: Addr,
    pub port: u16,
    pub snat: Addr,
}

impl From<&Backend> for BackendRef {
    fn from(b: &Backend) -> Self {
        BackendRef { addr: b.addr, port: b.port, snat: b.snat_addr }
    }
}

/// One flow of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// Its client → VIP key.
    pub key: FlowKey,
    pub state: FlowState,
    /// Not yet confirmed (handshake, or the backend's first answer).
    pub half_open: bool,
}

impl Flow {
    pub fn backend_id(&self) -> u32 {
        self.state.backend_id as u32
    }

    pub fn service_id(&self) -> u32 {
        self.state.service_id as u32
    }

    pub fn is_tcp(&self) -> bool {
        self.key.proto == PROTO_TCP
    }

    /// A direct-server-return flow (the backend answers the client itself).
    pub fn is_dsr(&self) -> bool {
        self.state.flags & FLOW_DSR != 0
    }

    pub fn is_fullnat(&self) -> bool {
        self.state.flags & FLOW_FULLNAT != 0
    }

    /// The latest packet of either direction (jiffies).
    pub fn last_seen(&self) -> u32 {
        self.state.last_seen
    }

    /// The TCP state of the flow for humans, both directions combined.
    pub fn combined_state(&self) -> u8 {
        tcp::combined_state(self.state.orig.state, self.state.reply.state)
    }

    /// UDP flows, and TCP flows not yet over: no RST seen, and not both
    /// sides' FIN (a half-closed flow may still carry data one way).
    pub fn is_active(&self) -> bool {
        !self.is_tcp() || !tcp::is_closed(self.state.orig.state, self.state.reply.state)
    }

    /// The RST to the client, from VIP:port, with the sequence number the
    /// client expects next (what the backend sent, or in DSR what the
    /// client acknowledged). A client whose SYN was never answered gets a
    /// RST|ACK acknowledging the SYN (what SYN-SENT accepts, RFC 793).
    pub fn client_rst(&self) -> Rst {
        let (orig, reply) = (&self.state.orig, &self.state.reply);
        let (seq, ack) = if reply.flags & TCPD_SEEN != 0 { (reply.end, None) } else { (0, Some(orig.end)) };
        Rst { src: self.key.dst_addr, dst: self.key.src_addr, sport: self.key.dst_port.to_ne_bytes(), dport: self.key.src_port.to_ne_bytes(), seq, ack }
    }

    /// The RST to the backend, from the address and port it knows the
    /// client by (the client's own in DNAT, the balancer's in full NAT),
    /// with the sequence number it expects (frees its socket at once).
    /// `None` when the client's side was never seen.
    pub fn backend_rst(&self, b: &BackendRef) -> Option<Rst> {
        let orig = &self.state.orig;
        if orig.flags & TCPD_SEEN == 0 {
            return None;
        }
        let (src, sport) = if self.is_fullnat() { (b.snat, self.state.snat_port) } else { (self.key.src_addr, self.key.src_port) };
        Some(Rst { src, dst: b.addr, sport: sport.to_ne_bytes(), dport: b.port.to_ne_bytes(), seq: orig.end, ack: None })
    }

    /// The flow as a flow-log / sync record.
    pub fn end_record(&self, reason: u32, b: &BackendRef) -> FlowEnd {
        FlowEnd { key: self.key, reason, backend_port: b.port, _pad: 0, backend: b.addr, snat: b.snat, state: self.state }
    }

    /// The full-NAT port key of the flow (backend → balancer), if it is
    /// full NAT.
    pub fn port_key(&self, b: &BackendRef) -> Option<FlowKey> {
        self.is_fullnat().then(|| FlowKey::new(b.addr, b.snat, b.port, self.state.snat_port, self.key.proto))
    }

    /// Whether `now` (the table's current copy of this flow) is still the
    /// flow `self` was when a decision was made about it: the same
    /// connection (creation time, and a packet count that only grows: it
    /// tells apart two connections made within one tick), and with `idle`,
    /// no packet since in either direction (counted exactly: the data plane
    /// refreshes `last_seen` only every so often).
    pub fn unchanged_in(&self, now: &Flow, idle: bool) -> bool {
        let (a, b) = (&self.state, &now.state);
        let same = a.created == b.created && a.backend_id == b.backend_id && b.packets_orig >= a.packets_orig && b.packets_reply >= a.packets_reply;
        same && (!idle || (b.packets_orig == a.packets_orig && b.packets_reply == a.packets_reply))
    }
}
