//! Every map of the program. Keys and values are defined in
//! `lb_common::maps`; the controller writes configuration maps and reads
//! counters, the program writes the connection table and counters.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use lb_common::{
    maps::{
        Addr, Backend, DEFAULT_CONN_CAPACITY, DEFAULT_HALF_OPEN_CAPACITY, EndpointEntry, EndpointKey, FLOW_EVENTS_BYTES, FlowKey, FlowState, Globals,
        MAX_BACKENDS, MAX_IFACES, MAX_SERVICES, NEXT_HOP_SLOTS, NextHop, PortOwner, RING_SLOTS, ServiceEntry, ServiceKey, TrafficCounters,
    },
    stats,
};

/// VIP:port/proto → service. Controller-written.
#[map(name = "XLB_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceEntry> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Address → `ADDR_*` bits. Controller-written. Only for what carries no
/// ports (fragments) and for backend packets that belong to no flow (to a
/// local address: the host's own traffic).
#[map(name = "XLB_ADDRS")]
pub static ADDRS: HashMap<Addr, u32> = HashMap::with_max_entries(MAX_SERVICES + MAX_BACKENDS + 1024, 0);

/// Backend ip:port/proto → the services it serves: how a backend's packet
/// finds its flow. Controller-written.
#[map(name = "XLB_ENDPOINTS")]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointEntry> = HashMap::with_max_entries(MAX_BACKENDS, 0);

/// Backend id → backend. Controller-written.
#[map(name = "XLB_BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Per-service scheduling rings of backend ids, `RING_SLOTS` per service.
/// Controller-written.
#[map(name = "XLB_RING")]
pub static RING: Array<u32> = Array::with_max_entries(MAX_SERVICES * RING_SLOTS, 0);

/// Per-CPU round-robin cursor per service: no atomics, no shared cache line.
#[map(name = "XLB_CURSOR")]
pub static CURSOR: PerCpuArray<u32> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// The connection table: one entry per flow (`FlowState`), keyed by the
/// client → VIP 5-tuple. LRU, so a full table recycles the least recently
/// used flows instead of failing; a flow leaves whole. Capacity (in flows)
/// set at load time by the controller.
#[map(name = "XLB_CONNS")]
pub static CONNS: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(DEFAULT_CONN_CAPACITY, 0);

/// Flows not yet confirmed (a TCP handshake not completed, a UDP flow the
/// backend has not answered), same layout as `CONNS`. A SYN or UDP flood
/// churns this table only: established flows are never evicted by it.
/// Capacity set at load time.
#[map(name = "XLB_HALF_OPEN")]
pub static HALF_OPEN: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(DEFAULT_HALF_OPEN_CAPACITY, 0);

/// Global per-CPU counters, indexed by `lb_common::stats`.
#[map(name = "XLB_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);

/// Per-CPU traffic counters per service id (events only: new flows,
/// reactive resets, refusals; packets and bytes are counted per backend).
#[map(name = "XLB_SVC_STATS")]
pub static SERVICE_STATS: PerCpuArray<TrafficCounters> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// Per-CPU traffic counters per backend id.
#[map(name = "XLB_BE_STATS")]
pub static BACKEND_STATS: PerCpuArray<TrafficCounters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Active flows per backend id, for least-connections: shared by all CPUs,
/// incremented by the program on each new flow; the controller rewrites
/// the exact counts from its table walk every second.
#[map(name = "XLB_BE_ACTIVE")]
pub static BACKEND_ACTIVE: Array<u64> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Next-hop cache (`lb_common::maps::NextHop`): per CPU (no locks, no
/// torn slots), slots indexed by a neighbour hash.
#[map(name = "XLB_NEXT_HOP")]
pub static NEXT_HOP: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(NEXT_HOP_SLOTS, 0);

/// Flows the program created or removed, for the controller's flow logs
/// and the sync peer.
#[map(name = "XLB_FLOW_EVENTS")]
pub static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(FLOW_EVENTS_BYTES, 0);

/// On DSR backend hosts (`xlb backend-setup`, program `xlb_mss_clamp`): a
/// VIP → the largest MSS the host's SYN-ACKs from it may announce.
#[map(name = "XLB_MSS_CLAMP")]
pub static MSS_CLAMP: HashMap<Addr, u16> = HashMap::with_max_entries(lb_common::maps::MAX_MSS_CLAMP_VIPS, 0);

/// Settings of the whole data plane (`Globals`), written by the controller.
#[map(name = "XLB_GLOBALS")]
pub static GLOBALS: Array<Globals> = Array::with_max_entries(1, 0);

/// Interfaces xlb is attached to (ifindex → ifindex), the redirect targets.
#[map(name = "XLB_DEVMAP")]
pub static DEVMAP: DevMapHash = DevMapHash::with_max_entries(MAX_IFACES, 0);

/// Interfaces the program is attached to: ifindex → `IFACE_*` bits
/// (checksum handling). Controller-written at attach time.
#[map(name = "XLB_IFACES")]
pub static IFACES: HashMap<u32, u32> = HashMap::with_max_entries(MAX_IFACES, 0);

/// Full-NAT source ports in use: backend → balancer tuple → the flow that
/// holds it (see `lb_common::maps` and `ports`). Not LRU, and allocated on
/// demand (`BPF_F_NO_PREALLOC`: costs nothing without full-NAT flows).
/// Capacity set at load time.
#[map(name = "XLB_PORTS")]
pub static PORTS: HashMap<FlowKey, PortOwner> = HashMap::with_max_entries(DEFAULT_CONN_CAPACITY + DEFAULT_HALF_OPEN_CAPACITY, BPF_F_NO_PREALLOC);

/// `BPF_F_NO_PREALLOC`.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Per-CPU scratch space for the FIB lookup's parameters (the stack has no
/// room for them on the deepest call chain). Not pinned.
#[map(name = "XLB_FIB_SCRATCH")]
pub static FIB_SCRATCH: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);

/// Which (protocol, port)s may have a service or a backend endpoint: tested
/// before those hash lookups (`lb_common::maps::PortFilter`).
#[map(name = "XLB_PORT_FILTER")]
pub static PORT_FILTER: aya_ebpf::maps::Array<lb_common::maps::PortFilter> = aya_ebpf::maps::Array::with_max_entries(1, 0);

/// The packet being processed, as parsed (per CPU: off the 512-byte BPF
/// stack, which the call chain down to the route and rewrite needs).
#[map(name = "XLB_PACKET")]
pub static PACKET: PerCpuArray<crate::parse::Packet> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch space where a new flow is built (it would not fit the
/// 512-byte BPF stack beside the packet's state on the deepest path). Not
/// pinned: its contents never outlive one packet.
#[map(name = "XLB_SCRATCH")]
pub static SCRATCH: PerCpuArray<FlowState> = PerCpuArray::with_max_entries(1, 0);

/// Slot 0: the full program (`xlb_full`), where the entry sends every
/// packet it does not take. Filled by the loader before anything is
/// attached; pinned, so a program left attached by a daemon that exited
/// still has it.
#[map(name = "XLB_FULL_PROG")]
pub static FULL_PROGRAM: ProgramArray = ProgramArray::with_max_entries(1, 0);
