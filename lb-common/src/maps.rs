//! Keys and values of the BPF maps, shared bit for bit by the XDP program and
//! the controller.
//!
//! Rules (so the kernel and userspace agree on every byte): `#[repr(C)]`,
//! explicit `_pad` fields and no implicit padding (checked by the size
//! asserts at the bottom), integers only (no `bool`, enum or `Option`).
//! Addresses and ports are kept in **network byte order** inside native
//! integers (`u32::from_ne_bytes(packet_bytes)`), so the data plane copies
//! them between packet and map without swapping.
//!
//! Addresses are 16 bytes ([`Addr`]) for both families: an IPv4 address is
//! stored IPv4-mapped (`::ffff:a.b.c.d`), so one set of maps, one key
//! layout and one code path serve IPv4 and IPv6 (as Katran's flow key does).

/// Map names: the symbol names in the eBPF object and the file names of the
/// pins under the pin directory (the kernel keeps at most 15 characters).
pub mod names {
    pub const SERVICES: &str = "XLB_SERVICES";
    pub const ADDRS: &str = "XLB_ADDRS";
    pub const BACKENDS: &str = "XLB_BACKENDS";
    pub const RING: &str = "XLB_RING";
    pub const CURSOR: &str = "XLB_CURSOR";
    pub const CONNS: &str = "XLB_CONNS";
    pub const HALF_OPEN: &str = "XLB_HALF_OPEN";
    pub const STATS: &str = "XLB_STATS";
    pub const SERVICE_STATS: &str = "XLB_SVC_STATS";
    pub const BACKEND_STATS: &str = "XLB_BE_STATS";
    pub const DEVMAP: &str = "XLB_DEVMAP";
    pub const BACKEND_ACTIVE: &str = "XLB_BE_ACTIVE";
    pub const NEXT_HOP: &str = "XLB_NEXT_HOP";
    pub const FLOW_EVENTS: &str = "XLB_FLOW_EVENTS";
    pub const GLOBALS: &str = "XLB_GLOBALS";
    pub const PORTS: &str = "XLB_PORTS";
    pub const IFACES: &str = "XLB_IFACES";
    pub const ENDPOINTS: &str = "XLB_ENDPOINTS";
    pub const PORT_FILTER: &str = "XLB_PORT_FILTER";
    /// The entry program's tail-call target (the full program).
    pub const FULL_PROGRAM: &str = "XLB_FULL_PROG";
    /// Backend hosts only (`xlb_mss_clamp`): VIP → the largest MSS its
    /// SYN-ACKs may announce. Not pinned, not the balancer's.
    pub const MSS_CLAMP: &str = "XLB_MSS_CLAMP";
    /// Every map the controller pins, in a stable order.
    pub const ALL: [&str; 20] = [
        SERVICES,
        ADDRS,
        BACKENDS,
        RING,
        CURSOR,
        CONNS,
        HALF_OPEN,
        STATS,
        SERVICE_STATS,
        BACKEND_STATS,
        DEVMAP,
        BACKEND_ACTIVE,
        NEXT_HOP,
        FLOW_EVENTS,
        GLOBALS,
        PORTS,
        IFACES,
        ENDPOINTS,
        PORT_FILTER,
        FULL_PROGRAM,
    ];
}

/// An address as the maps hold it: four words in network byte order
/// (`u32::from_ne_bytes` of each 4 packet bytes). IPv4 is IPv4-mapped.
pub type Addr = [u32; 4];

/// The third word of an IPv4-mapped address (`::ffff:0:0/96`).
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The map form of an IPv4 address given as its packet word.
#[inline(always)]
pub const fn addr_v4(a: u32) -> Addr {
    [0, 0, V4_MAPPED_WORD, a]
}

/// Whether a map address is an IPv4 one.
#[inline(always)]
pub const fn is_v4(a: &Addr) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED_WORD
}

/// The map form of 16 packet bytes.
#[inline(always)]
pub const fn addr_from_bytes(b: [u8; 16]) -> Addr {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// The 16 packet bytes of a map address.
#[inline(always)]
pub const fn addr_bytes(a: &Addr) -> [u8; 16] {
    let (w0, w1, w2, w3) = (a[0].to_ne_bytes(), a[1].to_ne_bytes(), a[2].to_ne_bytes(), a[3].to_ne_bytes());
    [w0[0], w0[1], w0[2], w0[3], w1[0], w1[1], w1[2], w1[3], w2[0], w2[1], w2[2], w2[3], w3[0], w3[1], w3[2], w3[3]]
}

/// The map form of an address.
pub const fn addr_from_ip(ip: core::net::IpAddr) -> Addr {
    match ip {
        core::net::IpAddr::V4(v4) => addr_v4(u32::from_ne_bytes(v4.octets())),
        core::net::IpAddr::V6(v6) => addr_from_bytes(v6.octets()),
    }
}

/// The address a map form stands for (IPv4-mapped → IPv4).
pub const fn addr_to_ip(a: &Addr) -> core::net::IpAddr {
    if is_v4(a) {
        let b = a[3].to_ne_bytes();
        core::net::IpAddr::V4(core::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    } else {
        core::net::IpAddr::V6(core::net::Ipv6Addr::from_octets(addr_bytes(a)))
    }
}

/// Services (VIP:port/proto) the data plane knows. Service ids index the
/// per-service arrays, so they are below this bound.
pub const MAX_SERVICES: u32 = 64;
/// Backends across all services; a backend id indexes `XLB_BACKENDS` and
/// `XLB_BE_STATS`. A backend registered on two services has two ids.
pub const MAX_BACKENDS: u32 = 4096;
/// Scheduling slots per service in `XLB_RING`: the largest Maglev table
/// (a prime). Service `s` owns slots `s * RING_SLOTS .. s * RING_SLOTS +
/// ring_len`. 64 services × 65537 slots × 4 bytes = 16.8 MB.
pub const RING_SLOTS: u32 = 65537;
/// Default capacity of the connection table, in flows (one entry each).
/// One above a power of two on purpose: the kernel gives a hash map the
/// next power of two of buckets, so this table gets 2^21 buckets and stays
/// at most half loaded even when full (shorter chains for every lookup and
/// every miss: 1M-flow ACKs 431 -> 301 ns, see docs/benchmarks.md), for 16
/// bytes more per flow.
pub const DEFAULT_CONN_CAPACITY: u32 = (1 << 20) + 1;
/// Default capacity of the half-open table (TCP flows whose handshake has
/// not completed), in flows: a quarter of the connection table's, one
/// above a power of two for the same reason.
pub const DEFAULT_HALF_OPEN_CAPACITY: u32 = (1 << 18) + 1;

/// The half-open capacity for a connection table of `conn` flows when none
/// is given: a quarter (at least 1024), one more (see
/// [`DEFAULT_HALF_OPEN_CAPACITY`]).
pub const fn default_half_open_capacity(conn: u32) -> u32 {
    let q = conn / 4;
    (if q < 1024 { 1024 } else { q }) + 1
}
/// Interfaces the program may redirect to.
pub const MAX_IFACES: u32 = 64;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `XLB_IFACES` value bits: what the data plane must know about an
/// interface it is attached to (keyed by ifindex, written by the
/// controller at attach time).
///
/// The interface can deliver frames whose L4 checksum is only the
/// pseudo-header seed (CHECKSUM_PARTIAL: sent by a local stack through a
/// veth, tap or other virtual device with TX checksum offload, the
/// default). Frames from a physical NIC always carry full checksums, so
/// a full checksum that happens to equal the seed (1 in 65,536) is never
/// mistaken for one there.
pub const IFACE_VIRTUAL: u32 = 1;
/// Attached in generic (skb) mode: the skb, and with it the kernel's
/// knowledge that a checksum is still partial, survives every verdict;
/// in native mode it survives only XDP_PASS.
pub const IFACE_GENERIC: u32 = 2;

/// `Packet::csum` in the data plane: what the L4 checksum field holds.
/// A full checksum (updated incrementally, RFC 1624).
pub const CSUM_FULL: u8 = 0;
/// A partial seed the kernel will complete for this frame whatever its
/// verdict (generic mode): kept a seed, moved with the addresses.
pub const CSUM_SEED_KEPT: u8 = 1;
/// A partial seed that nobody completes once the frame leaves by XDP_TX or
/// XDP_REDIRECT (native mode): completed over the segment before it goes;
/// kept a seed when the frame is passed to the kernel (whose skb still says
/// partial).
pub const CSUM_SEED_COMPLETE_ON_TX: u8 = 2;

/// `XLB_ADDRS` value bits: what an address is to the data plane. Consulted
/// only off the hot path (fragments, which carry no ports; packets from a
/// backend that belong to no flow), never for TCP/UDP flow packets, which
/// are classified by VIP:port (`XLB_SERVICES`) and backend ip:port
/// (`XLB_ENDPOINTS`).
pub const ADDR_VIP: u32 = 1;
pub const ADDR_BACKEND: u32 = 2;
/// An address of the balancer host itself (its own traffic to a backend,
/// health checks: their replies are the kernel's, never a flow).
pub const ADDR_LOCAL: u32 = 4;

/// `ServiceEntry::scheduler`: weighted round robin over the ring (per-CPU
/// cursor).
pub const SCHED_WRR: u8 = 1;
/// Weighted Maglev: the ring is a Maglev table, indexed by flow hash.
pub const SCHED_MAGLEV: u8 = 2;
/// Least connections by sampling the (weighted) ring: of four backends
/// drawn in proportion to their weights, the one with the fewest active
/// flows per unit of weight.
pub const SCHED_LEAST_CONN: u8 = 3;

/// `Backend::state`: how the data plane treats the backend's flows.
/// 0 marks an unused slot.
pub const BACKEND_UNUSED: u8 = 0;
/// New and existing flows.
pub const BACKEND_UP: u8 = 1;
/// No new flows; existing flows are forwarded (drain and keep policies).
pub const BACKEND_DRAINING: u8 = 2;
/// Unhealthy, reset policy: no new flows; a TCP packet of an existing flow
/// is answered with a RST and the flow removed; UDP flows are rescheduled.
pub const BACKEND_DOWN: u8 = 3;
/// Deregistered, reset policy: as `BACKEND_DOWN`.
pub const BACKEND_REMOVED: u8 = 4;

/// Whether flows of a backend in `state` are reset on their next packet.
pub const fn backend_is_gone(state: u8) -> bool {
    state == BACKEND_DOWN || state == BACKEND_REMOVED || state == BACKEND_UNUSED
}

/// `ServiceEntry::flags`: a non-SYN TCP packet without a flow entry is
/// scheduled by hash and given one (instead of being reset). For several
/// balancers sharing a VIP with the same backends.
pub const SVC_F_MISS_REHASH: u8 = 1;
/// Full-NAT: the client's address and port are replaced by the backend's
/// `snat_addr` and a port from the service's pool, so replies come back to
/// the balancer without any routing on the backend.
pub const SVC_F_FULLNAT: u8 = 2;
/// Full-NAT: a new flow that finds no free source port is dropped (default:
/// a TCP SYN is answered with a RST; UDP is always dropped).
pub const SVC_F_NO_PORT_DROP: u8 = 4;
/// Direct server return (IPIP): see `NAT_ENCAP`.
pub const SVC_F_DSR: u8 = 8;
/// SYNs are scheduled by hash and create no state (Maglev DNAT and DSR
/// services whose backends serve no other service): a SYN flood creates
/// nothing; the backend's SYN-ACK creates the half-open flow. Set by the
/// controller.
pub const SVC_F_STATELESS_SYN: u8 = 16;
/// Some backend of the service also serves another service (DNAT): a new
/// flow is checked against the other services' flows from the same client
/// address and port (they would be one connection to the backend) and
/// refused on a collision. Set by the controller.
pub const SVC_F_SHARED_BACKENDS: u8 = 32;

/// `NatTuple::flags`: which half of the tuple a packet's rewrite changes.
pub const NAT_SRC: u8 = 1;
pub const NAT_DST: u8 = 2;
/// Direct server return: the packet is not rewritten but encapsulated
/// (IPIP) towards `NatTuple::dst` from `NatTuple::src`.
pub const NAT_ENCAP: u8 = 8;

/// Full-NAT source ports tried for a new flow before it is refused (all of
/// them when the pool is smaller).
pub const SNAT_PORT_PROBES: u32 = 16;
/// Default full-NAT port pool: below Linux's default ephemeral range
/// (`net.ipv4.ip_local_port_range` 32768–60999), so flows never collide
/// with the balancer host's own connections (health checks) to a backend.
pub const DEFAULT_SNAT_PORT_LO: u16 = 1024;
pub const DEFAULT_SNAT_PORT_HI: u16 = 32767;

/// `NatTuple::direction`: which way a packet goes.
/// Client → VIP packets get their destination rewritten to the backend.
pub const DIR_TO_BACKEND: u8 = 1;
/// Backend → client packets get their source rewritten to the VIP.
pub const DIR_TO_CLIENT: u8 = 2;

/// Key of `XLB_SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    /// VIP.
    pub addr: Addr,
    /// Port, network byte order.
    pub port: u16,
    /// IP protocol number (`PROTO_TCP`/`PROTO_UDP`).
    pub proto: u8,
    pub _pad: u8,
}

/// Value of `XLB_SERVICES`. Written by the controller only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceEntry {
    /// Index into the per-service arrays (`XLB_RING`, `XLB_CURSOR`, `XLB_SVC_STATS`).
    pub id: u32,
    /// Used slots of this service's ring; 0 means no backend can take new flows.
    pub ring_len: u32,
    /// `SCHED_*`.
    pub scheduler: u8,
    /// `SVC_F_*`.
    pub flags: u8,
    pub _pad: u16,
    /// Idle timeouts in seconds, per flow state (enforced by the controller).
    pub syn_timeout_s: u32,
    pub established_timeout_s: u32,
    pub closing_timeout_s: u32,
    pub udp_timeout_s: u32,
    /// Full-NAT source port pool (host byte order, inclusive); each backend
    /// has the whole pool to itself.
    pub snat_port_lo: u16,
    pub snat_port_hi: u16,
}

/// Value of `XLB_BACKENDS` (an array indexed by backend id). Written by the
/// controller only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: Addr,
    /// Full-NAT services: the balancer's source address towards this
    /// backend (unused in DNAT mode).
    pub snat_addr: Addr,
    /// Port, network byte order.
    pub port: u16,
    /// `BACKEND_*`.
    pub state: u8,
    pub _pad: u8,
    pub weight: u32,
    pub service_id: u32,
    /// The largest MSS a SYN or SYN-ACK of this backend's flows may
    /// announce (its service's `mss_clamp`; 0: left alone). Here, not in
    /// the service entry: backend packets find their backend, not their
    /// service.
    pub mss_clamp: u16,
    pub _pad2: u16,
}

/// Key of `XLB_CONNS`: the 5-tuple of a packet as it arrives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src_addr: Addr,
    pub dst_addr: Addr,
    /// Network byte order.
    pub src_port: u16,
    /// Network byte order.
    pub dst_port: u16,
    pub proto: u8,
    /// Explicit integer padding (an array would be zeroed with an
    /// out-of-line `memset` in the data plane).
    pub _pad0: u8,
    pub _pad1: u16,
}

impl FlowKey {
    pub const fn new(src_addr: Addr, dst_addr: Addr, src_port: u16, dst_port: u16, proto: u8) -> FlowKey {
        FlowKey { src_addr, dst_addr, src_port, dst_port, proto, _pad0: 0, _pad1: 0 }
    }

    /// The key of packets going the other way.
    pub const fn reversed(&self) -> FlowKey {
        FlowKey::new(self.dst_addr, self.src_addr, self.dst_port, self.src_port, self.proto)
    }
}

/// One direction of a TCP flow as the data plane tracks it (the kernel's
/// conntrack does the same, `tcp_in_window`): what the sender has sent and
/// may send, what it advertised. See `lb_common::tcp::track`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpDir {
    /// Highest sequence number sent plus one (seq + len, SYN and FIN
    /// counting one): what the receiver expects next, so a RST towards the
    /// receiver must carry exactly this to tear the flow down.
    pub end: u32,
    /// Highest sequence number the receiver allows this side to send: the
    /// receiver's ack + its window (at least 1).
    pub maxend: u32,
    /// Largest window this side advertised (scaled).
    pub maxwin: u32,
    /// `tcp::STATE_*` of this side.
    pub state: u8,
    /// Window scale shift of this side's windows (RFC 7323), 0-14.
    pub wscale: u8,
    /// `TCPD_*`.
    pub flags: u8,
    pub _pad: u8,
}

/// `TcpDir::flags`: this direction's sequence space is known (a SYN, or a
/// first packet of a picked-up flow, initialised it).
pub const TCPD_SEEN: u8 = 1;
/// Its windows are not known exactly (a flow picked up mid-stream, a
/// window scale the data plane never saw): the window checks on packets
/// towards it are liberal.
pub const TCPD_LIBERAL: u8 = 2;
/// It sent a window scale option in its SYN or SYN-ACK.
pub const TCPD_WSCALE: u8 = 4;

/// Value of `XLB_CONNS` and `XLB_HALF_OPEN`: one entry per flow, keyed by
/// the client → VIP 5-tuple as the client's packets arrive. A backend's
/// packet finds it through its service (`XLB_ENDPOINTS`: DNAT, the client
/// is the packet's destination) or its full-NAT port (`XLB_PORTS`: the
/// owner's key). A flow is one entry, so the table can never hold half of
/// one: whatever leaves the table leaves whole.
///
/// The rewrite is derived, not stored: towards the backend the destination
/// is `XLB_BACKENDS[backend_id]` (and in full NAT the source its
/// `snat_addr`:`snat_port`), towards the client the source is the key's
/// VIP:port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowState {
    pub backend_id: u16,
    pub service_id: u8,
    /// `FLOW_*`.
    pub flags: u8,
    /// Full NAT: the source port towards the backend (network byte order).
    pub snat_port: u16,
    pub _pad: u16,
    /// The [`neighbour_hash`] of the next hop towards the client (its
    /// gateway, or the client on-link), once a FIB lookup found it; 0
    /// before. Flows behind one gateway share its `XLB_NEXT_HOP` slot.
    pub hop: u32,
    /// Jiffies (low 32 bits) at creation and at the last packet (refreshed
    /// every `LAST_SEEN_STEP` jiffies at most).
    pub created: u32,
    pub last_seen: u32,
    /// Packets forwarded each way (to the backend, to the client).
    pub packets_orig: u32,
    pub packets_reply: u32,
    /// The client's side (its packets go to the backend) and the backend's.
    pub orig: TcpDir,
    pub reply: TcpDir,
    /// IP bytes forwarded each way.
    pub bytes_orig: u64,
    pub bytes_reply: u64,
}

/// `FlowState::flags`: the flow holds a full-NAT source port (an
/// `XLB_PORTS` entry keyed by the backend → balancer tuple).
pub const FLOW_FULLNAT: u8 = 1;
/// Direct server return: the backend answers the client directly; the
/// reply direction is inferred from the client's acknowledgements.
pub const FLOW_DSR: u8 = 2;
/// Created from a backend's packet after the flow's entry was lost, or
/// installed by state sync: picked up mid-stream.
pub const FLOW_PICKED_UP: u8 = 4;
/// Reported new (flow logs, sync) already.
pub const FLOW_REPORTED: u8 = 8;

/// A packet's rewrite: the tuple it leaves with and which half changed.
/// Built per packet from the flow and its backend; the route and the
/// rewrite take it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatTuple {
    pub src: Addr,
    pub dst: Addr,
    /// Network byte order.
    pub sport: u16,
    pub dport: u16,
    /// `NAT_*`.
    pub flags: u8,
    /// `DIR_*`.
    pub direction: u8,
    /// A SYN or SYN-ACK's MSS is lowered to this (0: left alone).
    pub mss_clamp: u16,
    /// Towards the client: the flow's remembered next hop (`FlowState::hop`).
    pub hop: u32,
}

/// Key of `XLB_ENDPOINTS`: a backend's ip:port/proto, as its packets leave
/// it. Same layout as [`ServiceKey`].
pub type EndpointKey = ServiceKey;

/// `XLB_PORT_FILTER` (one entry, written by the controller): one bit per
/// (set, protocol, port): whether some service listens on that destination
/// port, whether some backend endpoint sends from that source port. The
/// program tests it (an inlined array read) before the `XLB_SERVICES` and
/// `XLB_ENDPOINTS` hash lookups, so traffic of neither costs no hash lookup.
/// A bit may be set with nothing behind it (the controller sets bits before
/// the entries they stand for and clears them after): a set bit only means
/// "look".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortFilter {
    pub bits: [u64; PORT_FILTER_WORDS],
}

/// Two sets × two protocols × 65,536 ports, 64 per word.
pub const PORT_FILTER_WORDS: usize = (2 * 2 * 65_536) / 64;
/// `PortFilter` set: services, by destination port.
pub const FILTER_SERVICE: usize = 0;
/// `PortFilter` set: backend endpoints, by source port.
pub const FILTER_ENDPOINT: usize = 1;

impl Default for PortFilter {
    fn default() -> Self {
        PortFilter { bits: [0; PORT_FILTER_WORDS] }
    }
}

impl PortFilter {
    /// The word and bit of (`set`, `proto`, `port`: network byte order, as
    /// keys hold it). TCP and UDP have their own bits; other protocols
    /// share UDP's (they never have services).
    #[inline(always)]
    pub const fn position(set: usize, proto: u8, port: u16) -> (usize, u64) {
        let port = u16::from_be(port) as usize;
        let p = if proto == PROTO_TCP { 0 } else { 1 };
        let i = ((set & 1) << 17) | (p << 16) | port;
        (i >> 6, 1 << (i & 63))
    }

    pub fn insert(&mut self, set: usize, proto: u8, port: u16) {
        let (w, b) = Self::position(set, proto, port);
        self.bits[w] |= b;
    }

    #[inline(always)]
    pub fn contains(&self, set: usize, proto: u8, port: u16) -> bool {
        let (w, b) = Self::position(set, proto, port);
        // (`get`: a bound the verifier sees; the word is always in range.)
        matches!(self.bits.get(w), Some(x) if x & b != 0)
    }

    /// Both filters' bits.
    pub fn union(&self, other: &PortFilter) -> PortFilter {
        let mut out = *self;
        for (o, x) in out.bits.iter_mut().zip(other.bits.iter()) {
            *o |= x;
        }
        out
    }
}

/// A service a backend endpoint belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointService {
    /// The service's VIP and port (network byte order).
    pub vip: Addr,
    pub vip_port: u16,
    /// The backend's id in that service.
    pub backend_id: u16,
    pub service_id: u8,
    /// The service's `SVC_F_*`.
    pub flags: u8,
    pub _pad: u16,
}

/// Services one backend endpoint serves, at most this many.
pub const MAX_SERVICES_PER_ENDPOINT: usize = 4;

/// Value of `XLB_ENDPOINTS`: how a backend's packet finds its flow.
/// Written by the controller.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointEntry {
    /// Used slots of `services`.
    pub count: u32,
    /// Some of them are full NAT (look the packet up in `XLB_PORTS` first).
    pub any_fullnat: u32,
    pub services: [EndpointService; MAX_SERVICES_PER_ENDPOINT],
}

/// Value of `XLB_PORTS` (keyed by the backend → balancer tuple of a
/// full-NAT flow): the flow that holds the port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortOwner {
    /// The owner's client → VIP key.
    pub flow: FlowKey,
    /// Jiffies when it was taken.
    pub claimed: u32,
    pub _pad: u32,
}

/// Value of `XLB_GLOBALS` (one entry): settings of the whole data plane.
/// Written by the controller.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Globals {
    /// The flow hash's secret key (SipHash-1-3, see `sched_hash`): the same
    /// on every node of a cluster, so they schedule alike.
    pub hash_key: [u64; 2],
    /// Possible CPUs (full-NAT ports are split between them).
    pub ncpus: u32,
    /// `GLOBAL_*`.
    pub flags: u32,
}

/// `Globals::flags`: report new flows through the flow-event ring buffer
/// (flow logs with new records, state sync).
pub const GLOBAL_LOG_NEW_FLOWS: u32 = 1;
/// `Globals::flags`: ICMP errors about flows are not translated (passed to
/// the kernel as they come) and packets too big for their egress are not
/// answered (passed rewritten): a diagnostic switch, `--icmp-translation
/// off`.
pub const GLOBAL_NO_ICMP: u32 = 2;

/// VIPs a backend host clamps the MSS of (`XLB_MSS_CLAMP`).
pub const MAX_MSS_CLAMP_VIPS: u32 = 256;

/// Jiffies between two refreshes of a flow's `last_seen` (64-640 ms for
/// HZ 1000-100): an established flow's pure ACKs leave its entry clean.
pub const LAST_SEEN_STEP: u32 = 64;

/// Why a flow ended, in flow logs (`FlowEnd::reason` for the data plane's
/// own removals; the controller uses the same numbers).
pub mod end_reason {
    /// FIN from both sides.
    pub const FIN: u32 = 1;
    /// The client sent a RST (exact sequence).
    pub const RST_CLIENT: u32 = 2;
    /// The backend sent a RST (exact sequence).
    pub const RST_BACKEND: u32 = 3;
    /// Idle past its timeout.
    pub const IDLE: u32 = 4;
    /// Its backend was deregistered.
    pub const REMOVED: u32 = 5;
    /// Its backend failed its health check.
    pub const UNHEALTHY: u32 = 6;
    /// A drain reached its deadline.
    pub const DRAIN_DEADLINE: u32 = 7;
    /// Its service was removed.
    pub const SERVICE_REMOVED: u32 = 8;
    /// Not an end: a new flow (logged when new-flow records are on).
    pub const NEW: u32 = 9;

    pub const fn name(r: u32) -> &'static str {
        match r {
            FIN => "fin",
            RST_CLIENT => "rst_client",
            RST_BACKEND => "rst_backend",
            IDLE => "idle",
            REMOVED => "backend_removed",
            UNHEALTHY => "unhealthy",
            DRAIN_DEADLINE => "drain_deadline",
            SERVICE_REMOVED => "service_removed",
            NEW => "new",
            _ => "unknown",
        }
    }
}

/// A flow the data plane reports to the controller through the
/// `XLB_FLOW_EVENTS` ring buffer (a new flow, or one it removed; a full
/// buffer drops the record, counted, never the packet), and what the
/// controller's flow log and state sync carry. The backend is named by
/// address (ids differ between nodes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEnd {
    /// Client → VIP key.
    pub key: FlowKey,
    /// `end_reason::*`.
    pub reason: u32,
    /// The backend's port (network byte order).
    pub backend_port: u16,
    pub _pad: u16,
    pub backend: Addr,
    /// Full NAT: the balancer's source address towards the backend.
    pub snat: Addr,
    pub state: FlowState,
}

/// Size of the flow event ring buffer.
pub const FLOW_EVENTS_BYTES: u32 = 1 << 20;

/// A slot of `XLB_NEXT_HOP` (a per-CPU array of `NEXT_HOP_SLOTS`): where
/// a FIB lookup said packets go, kept for `NEXT_HOP_TTL_NS` (a FIB lookup
/// costs an order of magnitude more than the rest of a packet's work).
///
/// Slot `h % NEXT_HOP_SLOTS` holds the next hop whose key hash is `h`
/// (`hop`, checked on every use). Towards a backend the key is the
/// backend's address (few, each its own slot); towards a client it is the
/// next hop's own address, the gateway for routed clients, so any number of
/// clients behind a gateway share one slot (the flow remembers the hash in
/// `FlowState::hop`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NextHop {
    /// The key's [`neighbour_hash`]; 0: empty slot.
    pub hop: u32,
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// The route's MTU (0: unknown); larger packets go to the kernel.
    pub mtu: u16,
    /// `NEXT_HOP_*`.
    pub flags: u8,
    pub _pad: u8,
    /// Jiffies after which the slot is looked up again.
    pub expires: u64,
}

/// `NextHop::flags`: the egress interface is a redirect target (in
/// `XLB_DEVMAP` when the slot was filled), so no packet has to look it up.
pub const NEXT_HOP_MANAGED: u8 = 1;

/// How long a cached next hop is trusted, in jiffies (0.25-2.5 s for HZ
/// 1000-100): route and neighbour changes reach the data plane within it.
pub const NEXT_HOP_TTL: u64 = 256;
/// Next-hop slots per CPU (a power of two).
pub const NEXT_HOP_SLOTS: u32 = 65536;

/// The key of a next hop in `XLB_NEXT_HOP`: a 32-bit mix of an address,
/// never 0. For IPv4 the mix is a bijection (murmur3's finaliser), so two
/// IPv4 addresses never share a hash: a slot can never hand one neighbour's
/// MAC to another's traffic. IPv6 addresses are folded first (a collision
/// needs two of them active at once with equal 32-bit mixes).
#[inline(always)]
pub const fn neighbour_hash(a: &Addr) -> u32 {
    let x = if is_v4(a) { a[3] } else { a[0] ^ a[1].rotate_left(8) ^ a[2].rotate_left(16) ^ a[3].rotate_left(24) ^ 0x5bd1_e995 };
    let mut h = x;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    if h == 0 { 1 } else { h }
}

// `XLB_PORTS`: full-NAT source ports in use, keyed by the backend →
// balancer tuple, valued by their owner ([`PortOwner`]). A plain hash
// (not LRU, allocated on demand): a port is taken with an exclusive
// insert, and given back only by the program itself when it finds the
// port's owner gone (evicted, closed, removed) while looking for a free
// port, so it never depends on the daemon. The ports of a pool are split
// between the CPUs (`Globals::ncpus`): only one CPU ever takes a given
// port back, so two live flows can never share one.

/// Per-service and per-backend traffic counters (per-CPU arrays, summed by
/// the controller). "In" is client → backend, "out" is backend → client.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrafficCounters {
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub new_flows: u64,
    /// RSTs the program itself sent for flows of this backend/service
    /// whose backend was gone (reactive resets).
    pub reactive_resets: u64,
    /// Full-NAT: new flows refused because no source port was free.
    pub no_port: u64,
}

impl TrafficCounters {
    pub fn add(&mut self, o: &TrafficCounters) {
        self.packets_in += o.packets_in;
        self.bytes_in += o.bytes_in;
        self.packets_out += o.packets_out;
        self.bytes_out += o.bytes_out;
        self.new_flows += o.new_flows;
        self.reactive_resets += o.reactive_resets;
        self.no_port += o.no_port;
    }
}

// No implicit padding anywhere: these sizes are the sum of the fields.
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);
const _: () = assert!(core::mem::size_of::<ServiceEntry>() == 32);
const _: () = assert!(core::mem::size_of::<Backend>() == 48);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
const _: () = assert!(core::mem::size_of::<TcpDir>() == 16);
const _: () = assert!(core::mem::size_of::<FlowState>() == 80);
const _: () = assert!(core::mem::size_of::<NatTuple>() == 44);
const _: () = assert!(core::mem::size_of::<EndpointService>() == 24);
const _: () = assert!(core::mem::size_of::<EndpointEntry>() == 104);
const _: () = assert!(core::mem::size_of::<PortOwner>() == 48);
const _: () = assert!(core::mem::size_of::<Globals>() == 24);
const _: () = assert!(core::mem::size_of::<FlowEnd>() == 160);
const _: () = assert!(core::mem::size_of::<TrafficCounters>() == 56);
const _: () = assert!(core::mem::size_of::<NextHop>() == 32);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C), integer-only, with no implicit padding (see
    // the size asserts above), so every bit pattern is valid.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for PortFilter {}
    unsafe impl aya::Pod for ServiceEntry {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowState {}
    unsafe impl aya::Pod for TcpDir {}
    unsafe impl aya::Pod for NatTuple {}
    unsafe impl aya::Pod for EndpointService {}
    unsafe impl aya::Pod for EndpointEntry {}
    unsafe impl aya::Pod for PortOwner {}
    unsafe impl aya::Pod for Globals {}
    unsafe impl aya::Pod for TrafficCounters {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for FlowEnd {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_filter_keeps_sets_protocols_and_ports_apart() {
        let mut f = PortFilter::default();
        let port = |p: u16| u16::from_ne_bytes(p.to_be_bytes());
        f.insert(FILTER_SERVICE, PROTO_TCP, port(80));
        f.insert(FILTER_ENDPOINT, PROTO_UDP, port(5353));
        assert!(f.contains(FILTER_SERVICE, PROTO_TCP, port(80)));
        assert!(!f.contains(FILTER_SERVICE, PROTO_UDP, port(80)), "another protocol");
        assert!(!f.contains(FILTER_ENDPOINT, PROTO_TCP, port(80)), "another set");
        assert!(!f.contains(FILTER_SERVICE, PROTO_TCP, port(81)), "another port");
        assert!(f.contains(FILTER_ENDPOINT, PROTO_UDP, port(5353)));
        for p in [0u16, 1, 63, 64, 65_535] {
            for set in [FILTER_SERVICE, FILTER_ENDPOINT] {
                for proto in [PROTO_TCP, PROTO_UDP] {
                    let (w, _) = PortFilter::position(set, proto, port(p));
                    assert!(w < PORT_FILTER_WORDS);
                }
            }
        }
        let mut g = PortFilter::default();
        g.insert(FILTER_SERVICE, PROTO_TCP, port(443));
        let u = f.union(&g);
        assert!(u.contains(FILTER_SERVICE, PROTO_TCP, port(443)) && u.contains(FILTER_SERVICE, PROTO_TCP, port(80)));
    }

    #[test]
    fn ipv4_neighbour_hashes_never_collide_and_are_never_zero() {
        // A bijection on 32 bits (0 maps to 0, sent to 1: checked apart).
        let mut seen = alloc::collections::BTreeSet::new();
        for i in 0..200_000u32 {
            let a = addr_v4(u32::from_be_bytes([10, 200, 0, 0]).wrapping_add(i).to_be());
            assert!(seen.insert(neighbour_hash(&a)), "collision at {i}");
        }
        assert!(!seen.contains(&0));
        assert_ne!(neighbour_hash(&addr_v4(0)), 0);
    }
}

#[cfg(test)]
mod capacity_tests {
    use super::*;

    #[test]
    fn default_capacities_sit_just_above_a_power_of_two() {
        // The kernel's hash then has twice as many buckets as entries.
        for c in [DEFAULT_CONN_CAPACITY, DEFAULT_HALF_OPEN_CAPACITY] {
            assert!((c - 1).is_power_of_two(), "{c}");
            assert_eq!(c.next_power_of_two(), 2 * (c - 1), "{c}");
        }
        assert_eq!(default_half_open_capacity(DEFAULT_CONN_CAPACITY), DEFAULT_HALF_OPEN_CAPACITY);
        assert_eq!(default_half_open_capacity(100), 1025, "at least 1024");
        assert_eq!(default_half_open_capacity(1 << 22), (1 << 20) + 1);
    }
}
