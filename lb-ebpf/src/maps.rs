//! Every map of the program. Keys and values are defined in
//! `lb_common::maps`; the controller writes configuration maps and reads
//! counters, the program writes the connection table and counters.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    maps::{
        Addr, Backend, DEFAULT_CONN_CAPACITY, DEFAULT_HALF_OPEN_CAPACITY, FLOW_EVENTS_BYTES, FlowEntry, FlowKey, MAX_BACKENDS, MAX_IFACES, MAX_SERVICES,
        NEXT_HOP_SLOTS, NextHop, RING_SLOTS, SETTINGS_COUNT, ServiceEntry, ServiceKey, TrafficCounters,
    },
    stats,
};

/// VIP:port/proto → service. Controller-written.
#[map(name = "XLB_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceEntry> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Address → `ADDR_VIP | ADDR_BACKEND`. Controller-written. Lets packets
/// that are not xlb's business leave early.
#[map(name = "XLB_ADDRS")]
pub static ADDRS: HashMap<Addr, u32> = HashMap::with_max_entries(MAX_SERVICES + MAX_BACKENDS, 0);

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

/// The connection table: two entries per flow (see `FlowEntry`). LRU so a
/// full table recycles the least recently used flows instead of failing.
/// Capacity is set at load time by the controller.
#[map(name = "XLB_CONNS")]
pub static CONNS: LruHashMap<FlowKey, FlowEntry> = LruHashMap::with_max_entries(DEFAULT_CONN_CAPACITY * 2, 0);

/// Half-open TCP flows (SYN seen, handshake not complete), same layout as
/// `CONNS`. A SYN flood churns this table only: established flows in
/// `CONNS` are never evicted by it. Capacity set at load time.
#[map(name = "XLB_HALF_OPEN")]
pub static HALF_OPEN: LruHashMap<FlowKey, FlowEntry> = LruHashMap::with_max_entries(DEFAULT_HALF_OPEN_CAPACITY * 2, 0);

/// Global per-CPU counters, indexed by `lb_common::stats`.
#[map(name = "XLB_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);

/// Per-CPU traffic counters per service id.
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

/// Flows the program removed (RST teardown, reactive resets), for the
/// controller's flow logs.
#[map(name = "XLB_FLOW_EVENTS")]
pub static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(FLOW_EVENTS_BYTES, 0);

/// Global switches (`SETTING_*`), written by the controller.
#[map(name = "XLB_SETTINGS")]
pub static SETTINGS: Array<u32> = Array::with_max_entries(SETTINGS_COUNT, 0);

/// Interfaces xlb is attached to (ifindex → ifindex), the redirect targets.
#[map(name = "XLB_DEVMAP")]
pub static DEVMAP: DevMapHash = DevMapHash::with_max_entries(MAX_IFACES, 0);

/// Interfaces the program is attached to: ifindex → `IFACE_*` bits
/// (checksum handling). Controller-written at attach time.
#[map(name = "XLB_IFACES")]
pub static IFACES: HashMap<u32, u32> = HashMap::with_max_entries(MAX_IFACES, 0);

/// Full-NAT source ports in use: backend → balancer key of the owning flow
/// → allocation time. Not LRU (see `lb_common::maps::PORTS_GRACE_NS`).
/// Capacity set at load time (connection + half-open capacity).
#[map(name = "XLB_PORTS")]
pub static PORTS: HashMap<FlowKey, u64> = HashMap::with_max_entries(DEFAULT_CONN_CAPACITY + DEFAULT_HALF_OPEN_CAPACITY, 0);

/// Per-CPU scratch space for the FIB lookup's parameters (the stack has no
/// room for them on the deepest call chain). Not pinned.
#[map(name = "XLB_FIB_SCRATCH")]
pub static FIB_SCRATCH: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch space where a new flow's two entries are built (they
/// would not fit the 512-byte BPF stack beside the packet's state). Not
/// pinned: its contents never outlive one packet.
#[map(name = "XLB_SCRATCH")]
pub static SCRATCH: PerCpuArray<[FlowEntry; 2]> = PerCpuArray::with_max_entries(1, 0);
