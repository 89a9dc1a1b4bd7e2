//! The service model the operator manages (services, their backends and
//! per-service settings) and its translation into data-plane maps. Every
//! API request, health result and config entry goes through here, so
//! validation is the same everywhere, and every operation validates fully
//! before it changes anything.
//!
//! A backend's lifecycle: registered and healthy (UP); unhealthy or
//! deregistered, its flows follow the service's policy: `reset` (the data
//! plane answers their next packet with a RST, and the controller resets
//! them all at once, optionally spread over a window), `drain:D` (no new
//! flows, the rest reset at the deadline) or `keep` (no new flows). A
//! deregistered backend's id is freed once none of its flows is active.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use lb_common::{
    maps::{
        addr_from_ip, addr_to_ip, PORTS_GRACE_NS, NAT_FULL, Backend, FlowEntry, FlowKey, ServiceEntry, ServiceKey, ADDR_BACKEND, ADDR_VIP, BACKEND_DOWN,
        BACKEND_DRAINING, BACKEND_REMOVED, BACKEND_UNUSED, BACKEND_UP, DIR_TO_BACKEND, MAX_BACKENDS,
        end_reason, MAX_SERVICES, RING_SLOTS, SCHED_LEAST_CONN, SCHED_MAGLEV, SCHED_WRR, SVC_F_DSR, SVC_F_FULLNAT, SVC_F_MISS_REHASH, SVC_F_NO_PORT_DROP,
    },
    sched, stats, tcp,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    api::{BackendStatus, ErrorCode, FlowInfo, Proto, ServiceStatus, Status, TableStatus, Traffic},
    dataplane::{Dataplane, DataplaneError},
    dns::{HostPort, Resolution, TtlLimits},
    health::Tracker,
    model::settings::{FlowPolicy, HealthCheck, MissPolicy, NatMode, NoPortPolicy, Scheduler, ServiceOptions, ServiceSettings, SnatSource},
    resets::rst::{Flow, RstSender},
};

pub const MAX_WEIGHT: u32 = 10_000;
/// How long a finished flow (RST seen, or FIN from both sides) stays in the
/// table: long enough for the last ACK's retransmissions.
pub const CLOSED_LINGER: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum ControllerError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Ambiguous(String),
    #[error("{0}")]
    Capacity(String),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

impl ControllerError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ControllerError::BadRequest(_) => ErrorCode::BadRequest,
            ControllerError::NotFound(_) => ErrorCode::NotFound,
            ControllerError::Conflict(_) => ErrorCode::Conflict,
            ControllerError::Ambiguous(_) => ErrorCode::Ambiguous,
            ControllerError::Capacity(_) => ErrorCode::Capacity,
            ControllerError::Dataplane(_) => ErrorCode::Internal,
        }
    }
}

type Result<T> = std::result::Result<T, ControllerError>;

/// `VIP:port/proto`, the identity of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId {
    pub addr: SocketAddr,
    pub proto: Proto,
}

impl std::fmt::Display for ServiceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.proto)
    }
}

/// Why flows were reset (counted per service).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetCause {
    /// The backend was deregistered (policy reset).
    Removed,
    /// The backend failed its health check (policy reset).
    Unhealthy,
    /// A drain reached its deadline.
    DrainDeadline,
    /// An established flow reached its idle timeout (`reset_on_idle`).
    Idle,
}

/// Flows reset by the controller, per cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetCounts {
    pub removed: u64,
    pub unhealthy: u64,
    pub drain_deadline: u64,
    pub idle: u64,
    /// Flows that left the table on their idle timeout (reset or not).
    #[serde(default)]
    pub expired: u64,
}

impl ResetCounts {
    fn add(&mut self, cause: ResetCause, n: u64) {
        match cause {
            ResetCause::Removed => self.removed += n,
            ResetCause::Unhealthy => self.unhealthy += n,
            ResetCause::DrainDeadline => self.drain_deadline += n,
            ResetCause::Idle => self.idle += n,
        }
    }
}

/// What the daemon saves so a restart (or an upgrade) picks up the running
/// data plane: the model, with the ids the maps refer to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedState {
    pub version: u32,
    pub interfaces: Vec<crate::dataplane::Attachment>,
    pub services: Vec<SavedService>,
    /// Host settings the daemon changed, with the values they replaced
    /// (undone by `--detach-on-exit` and `xlb detach`).
    #[serde(default)]
    pub host_changes: Vec<crate::host::sysctl::Change>,
    /// Neighbour entries the daemon made managed (removed on detach).
    #[serde(default)]
    pub managed_neighbours: BTreeSet<crate::host::neighbours::Neighbour>,
}

impl SavedState {
    pub const VERSION: u32 = 1;
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedService {
    pub service: SocketAddr,
    pub proto: Proto,
    pub id: u32,
    pub settings: ServiceSettings,
    pub resets: ResetCounts,
    pub backends: Vec<SavedBackend>,
    #[serde(default)]
    pub named: Vec<SavedNamed>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedNamed {
    pub name: HostPort,
    pub weight: u32,
    pub addrs: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedBackend {
    pub backend: SocketAddr,
    pub id: u32,
    pub weight: u32,
    pub registered: bool,
    pub healthy: bool,
    pub draining: bool,
    pub drain_remaining_ms: Option<u64>,
}

/// One step of an `apply`.
enum Step {
    AddService(ServiceId, ServiceSettings),
    Settings(ServiceId, ServiceSettings),
    AddBackend(ServiceId, SocketAddr, u32),
    Reweight(ServiceId, SocketAddr, u32),
    RemoveBackend(ServiceId, SocketAddr),
    RemoveService(ServiceId),
    AddNamed(ServiceId, HostPort, u32),
    ReweightNamed(ServiceId, HostPort, u32),
    RemoveNamed(ServiceId, HostPort),
}

/// A mass reset to pace over `spread` (zero-spread resets run inline).
pub struct ResetJob {
    pub service: ServiceId,
    pub backend: SocketAddr,
    pub cause: ResetCause,
    pub flows: Vec<Flow>,
    pub spread: Duration,
}

struct Drain {
    /// `None`: keep (no deadline).
    deadline: Option<Instant>,
}

struct BackendSlot {
    id: u32,
    addr: SocketAddr,
    /// Full-NAT: the balancer's source address towards the backend
    /// (unspecified in DNAT mode).
    snat: IpAddr,
    weight: u32,
    registered: bool,
    health: Tracker,
    drain: Option<Drain>,
    /// When the backend joined or came back up (slow start origin).
    up_since: Instant,
}

impl BackendSlot {
    /// The backend's data-plane entry in `state`.
    fn entry(&self, service_id: u32, state: u8) -> Backend {
        Backend {
            addr: addr_from_ip(self.addr.ip()),
            snat_addr: addr_from_ip(self.snat),
            port: be_port(self.addr.port()),
            state,
            _pad: 0,
            weight: self.weight,
            service_id,
        }
    }

    /// How the data plane must treat this backend.
    fn dp_state(&self) -> u8 {
        if self.drain.is_some() {
            BACKEND_DRAINING
        } else if !self.registered {
            BACKEND_REMOVED
        } else if !self.health.healthy {
            BACKEND_DOWN
        } else {
            BACKEND_UP
        }
    }

    fn state_name(&self) -> &'static str {
        match self.dp_state() {
            BACKEND_UP => "up",
            BACKEND_DRAINING => "draining",
            BACKEND_DOWN => "down",
            _ => "removed",
        }
    }

    fn takes_new_flows(&self) -> bool {
        self.dp_state() == BACKEND_UP
    }

    /// Weight during slow start: from 1 up to the full weight in ten steps
    /// over `ramp` (steps, so the ring is rebuilt ten times, not constantly).
    fn effective_weight(&self, now: Instant, ramp: Duration) -> u32 {
        if ramp.is_zero() {
            return self.weight;
        }
        let elapsed = now.saturating_duration_since(self.up_since);
        if elapsed >= ramp {
            return self.weight;
        }
        let step = (elapsed.as_nanos() * 10 / ramp.as_nanos()) as u32 + 1; // 1..=10
        (self.weight * step / 10).max(1)
    }
}

struct Service {
    id: u32,
    ring: Vec<u32>,
    settings: ServiceSettings,
    backends: BTreeMap<SocketAddr, BackendSlot>,
    /// Deregistered backends that still have flows (drain/keep policies, or
    /// resets in progress).
    leaving: Vec<BackendSlot>,
    resets: ResetCounts,
    /// Backends given by DNS name, and the addresses each one registered.
    named: BTreeMap<HostPort, NamedBackend>,
}

impl NamedBackend {
    /// A name to be looked up at once (holding `addrs` meanwhile).
    fn due(weight: u32, addrs: BTreeSet<IpAddr>, now: Instant) -> NamedBackend {
        NamedBackend { weight, addrs, next_resolve: now, last_answer: now, ttl: Duration::ZERO, last_error: None }
    }
}

impl Service {
    /// Whether `addr` was registered by one of the service's names.
    fn owned_by_name(&self, addr: SocketAddr) -> bool {
        self.named.iter().any(|(name, n)| name.port == addr.port() && n.addrs.contains(&addr.ip()))
    }
}

/// A backend given by DNS name: its current addresses are ordinary
/// backends (registered on the service's port... the name's port).
struct NamedBackend {
    weight: u32,
    /// Addresses this name registered (not those registered by hand or by
    /// another name that happen to be the same).
    addrs: BTreeSet<IpAddr>,
    next_resolve: Instant,
    /// The last answer that said something (addresses or no such name).
    last_answer: Instant,
    ttl: Duration,
    last_error: Option<String>,
}

pub struct Controller {
    dp: Dataplane,
    services: BTreeMap<ServiceId, Service>,
    /// Address → (services on it, backends on it): the `XLB_ADDRS` bits.
    addr_refs: HashMap<IpAddr, (u32, u32)>,
    used_service_ids: HashSet<u32>,
    used_backend_ids: HashSet<u32>,
    /// Backend ids are handed out round robin so a just-freed id is the last
    /// to be reused.
    next_backend_id: u32,
    rst: Option<Arc<RstSender>>,
    /// Test-only: leave resets to the data plane's reactive path.
    proactive_reset: bool,
    /// Spread resets waiting for the daemon to pace them.
    pending: Vec<ResetJob>,
    rst_send_errors: u64,
    /// When the last proactive RST went out (benchmarks).
    last_rst_sent: Option<Instant>,
    /// The model changed since the last `take_dirty` (state to save).
    dirty: bool,
    flow_log: Option<crate::daemon::flowlog::FlowLog>,
    /// Flows reset per backend id, by cause (since the id was handed out).
    backend_resets: HashMap<u32, ResetCounts>,
    /// Resolves backends given by name (none: names are refused).
    resolver: Option<Arc<crate::dns::Resolver>>,
    dns_ttl: TtlLimits,
    /// State sync with an active/standby peer: role, figures, and where
    /// this node's flow changes go when it is master.
    sync: Option<SyncState>,
    /// Resolve a new backend's neighbour at once (the daemon only: a
    /// controller in tests may run where a datagram would leave the host).
    warm_neighbours: bool,
    /// While a batch of changes runs (`apply`, a config file): the services
    /// whose rings are rebuilt once at its end instead of after every
    /// backend (a Maglev table is 65,537 slots).
    ring_batch: Option<HashSet<ServiceId>>,
    /// Host settings the daemon changed (saved with the model).
    host_changes: Vec<crate::host::sysctl::Change>,
    /// Neighbour entries the daemon keeps resolved (saved with the model).
    managed_neighbours: BTreeSet<crate::host::neighbours::Neighbour>,
}

struct SyncState {
    status: crate::ha::SyncStatus,
    /// Bounded: see `sync_send`.
    out: crate::ha::QueueTx,
}


fn be_port(p: u16) -> u16 {
    u16::from_ne_bytes(p.to_be_bytes())
}

fn port_from(p: u16) -> u16 {
    u16::from_be_bytes(p.to_ne_bytes())
}

fn check_weight(weight: u32) -> Result<()> {
    if weight == 0 || weight > MAX_WEIGHT {
        return Err(ControllerError::BadRequest(format!("weight {weight} is out of range 1-{MAX_WEIGHT}")));
    }
    Ok(())
}

fn check_unicast(what: &str, a: SocketAddr) -> Result<()> {
    let ip = a.ip();
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    let mapped = matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some());
    if ip.is_unspecified() || ip.is_multicast() || broadcast || ip.is_loopback() || mapped {
        return Err(ControllerError::BadRequest(format!(
            "{what} {a}: address must be a unicast, non-loopback IPv4 or IPv6 address (IPv4-mapped IPv6 is written as IPv4)"
        )));
    }
    if a.port() == 0 {
        return Err(ControllerError::BadRequest(format!("{what} {a}: port must be 1-65535")));
    }
    Ok(())
}

/// The balancer's source address towards `backend` for a full-NAT service:
/// the configured one, else the address the kernel picks from its routing
/// table (a connected UDP socket's local address: nothing is sent).
/// Unspecified for DNAT services, which do not use it.
fn snat_source(settings: &ServiceSettings, backend: IpAddr) -> Result<IpAddr> {
    // Full NAT rewrites to it; DSR uses it as the outer header's source.
    if settings.mode == NatMode::Dnat {
        return Ok(match backend {
            IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        });
    }
    if let SnatSource::Addr(a) = settings.snat_source {
        if a.is_ipv4() != backend.is_ipv4() {
            return Err(ControllerError::BadRequest(format!(
                "full-NAT source {a} and backend {backend} are not the same address family"
            )));
        }
        return Ok(a);
    }
    let local = match backend {
        IpAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        IpAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    let found = std::net::UdpSocket::bind(local)
        .and_then(|s| s.connect(SocketAddr::new(backend, 9)).map(|_| s))
        .and_then(|s| s.local_addr());
    match found {
        Ok(a) if !a.ip().is_unspecified() => Ok(a.ip()),
        Ok(_) => Err(ControllerError::BadRequest(format!("no source address towards backend {backend}: set --snat-source"))),
        Err(e) => Err(ControllerError::BadRequest(format!(
            "cannot choose a full-NAT source address towards backend {backend}: {e} (add a route to it, or set --snat-source)"
        ))),
    }
}

/// Direct server return carries IPv4 packets in IPIP, untouched: the
/// backend answers from the VIP's own port.
fn check_dsr(sid: &ServiceId, settings: &ServiceSettings, backends: impl Iterator<Item = SocketAddr>) -> Result<()> {
    if settings.mode != NatMode::Dsr {
        return Ok(());
    }
    if !sid.addr.is_ipv4() {
        return Err(ControllerError::BadRequest(format!("{sid}: DSR mode is IPv4 only (IPIP); use dnat or fullnat for IPv6")));
    }
    for b in backends {
        if b.port() != sid.addr.port() {
            return Err(ControllerError::BadRequest(format!(
                "{sid}: backend {b}: in DSR mode the backend answers from the VIP itself, so its port must be {}",
                sid.addr.port()
            )));
        }
    }
    Ok(())
}

/// Nanoseconds on the clock `bpf_ktime_get_coarse_ns` uses (CLOCK_MONOTONIC).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A backend's stable identity for Maglev: its address and port, so every
/// balancer (and every restart) builds the same table.
fn maglev_identity(a: SocketAddr) -> u64 {
    let ip = match a.ip() {
        IpAddr::V4(v4) => u32::from(v4) as u64,
        // Folded to 64 bits; the identity only seeds the permutation.
        IpAddr::V6(v6) => {
            let v = u128::from(v6);
            (v as u64) ^ ((v >> 64) as u64).rotate_left(17)
        }
    };
    ip << 16 ^ a.port() as u64
}

/// Key of the backend → client entry belonging to a client → VIP entry.
fn reverse_key(k: &FlowKey, v: &FlowEntry) -> FlowKey {
    v.peer_key(k.proto)
}

/// The flows of the table, forward entries joined with their reverse ones.
struct TableView {
    flows: Vec<Flow>,
    /// Entries walked in (connection table, half-open table), kept or not.
    entries: (u64, u64),
}

impl TableView {
    fn combined_state(f: &Flow) -> u8 {
        tcp::combined_state(f.fwd.tcp_state, f.rev.map(|r| r.tcp_state).unwrap_or(tcp::STATE_NONE))
    }

    /// UDP flows, and TCP flows not yet over: no RST seen, and not both
    /// sides' FIN (a half-closed flow may still carry data one way).
    fn is_active(f: &Flow) -> bool {
        if !f.is_tcp() {
            return true;
        }
        let rev = f.rev.map(|r| r.tcp_state).unwrap_or(tcp::STATE_NONE);
        let closed = f.fwd.tcp_state == tcp::STATE_CLOSED || rev == tcp::STATE_CLOSED;
        let both_fin = f.fwd.tcp_state == tcp::STATE_FIN && rev == tcp::STATE_FIN;
        !closed && !both_fin
    }
}

/// What a health checker needs to know about one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthTarget {
    pub backend_id: u32,
    pub addr: SocketAddr,
    pub check: HealthCheck,
}

impl Controller {
    pub fn new(dp: Dataplane) -> Self {
        Controller {
            dp,
            services: BTreeMap::new(),
            addr_refs: HashMap::new(),
            used_service_ids: HashSet::new(),
            used_backend_ids: HashSet::new(),
            next_backend_id: 0,
            rst: None,
            proactive_reset: true,
            pending: Vec::new(),
            rst_send_errors: 0,
            last_rst_sent: None,
            dirty: false,
            flow_log: None,
            backend_resets: HashMap::new(),
            resolver: None,
            dns_ttl: TtlLimits::default(),
            sync: None,
            warm_neighbours: false,
            ring_batch: None,
            host_changes: Vec::new(),
            managed_neighbours: BTreeSet::new(),
        }
    }

    /// The neighbour entries the daemon keeps resolved.
    pub fn managed_neighbours(&self) -> &BTreeSet<crate::host::neighbours::Neighbour> {
        &self.managed_neighbours
    }

    /// Records the neighbour entries the daemon now keeps resolved.
    pub fn set_managed_neighbours(&mut self, n: BTreeSet<crate::host::neighbours::Neighbour>) {
        if n != self.managed_neighbours {
            self.managed_neighbours = n;
            self.dirty = true;
        }
    }

    /// Every backend address, registered or leaving, and the interfaces
    /// the program is attached to: what the next hops to keep resolved
    /// depend on.
    pub fn next_hop_inputs(&self) -> (Vec<IpAddr>, Vec<u32>) {
        let mut ips: Vec<IpAddr> = self.services.values().flat_map(|s| s.backends.values().chain(s.leaving.iter()).map(|b| b.addr.ip())).collect();
        ips.sort();
        ips.dedup();
        (ips, self.dp.attachments().iter().map(|a| a.ifindex).collect())
    }

    /// Records host settings the daemon changed.
    pub fn record_host_changes(&mut self, changes: Vec<crate::host::sysctl::Change>) {
        if !changes.is_empty() {
            crate::host::sysctl::merge(&mut self.host_changes, changes);
            self.dirty = true;
        }
    }

    /// Host settings the daemon changed (to undo on detach).
    pub fn host_changes(&self) -> &[crate::host::sysctl::Change] {
        &self.host_changes
    }

    /// Runs `f` with ring rebuilds deferred to its end (one per service
    /// touched, also when `f` fails half-way). Backends it takes out are
    /// already marked in the data plane, which never schedules them.
    pub fn batch<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if self.ring_batch.is_some() {
            return f(self);
        }
        self.ring_batch = Some(HashSet::new());
        let res = f(self);
        let touched = self.ring_batch.take().unwrap_or_default();
        for sid in touched {
            self.rebuild_ring(sid)?;
        }
        res
    }

    /// Makes the kernel resolve each new backend's next hop when it is
    /// added (one empty datagram to its discard port), so the data plane's
    /// first packets to it find the neighbour instead of taking the slow
    /// path through the kernel.
    pub fn with_neighbour_warming(mut self) -> Self {
        self.warm_neighbours = true;
        self
    }

    /// Enables state sync: as master, flow changes go to `out`.
    pub fn with_sync(mut self, role: crate::ha::Role, peer: SocketAddr, out: crate::ha::QueueTx) -> Self {
        let status = crate::ha::SyncStatus { role, peer: peer.to_string(), ..Default::default() };
        self.sync = Some(SyncState { status, out });
        self
    }

    pub fn set_role(&mut self, role: crate::ha::Role) -> Result<crate::ha::Role> {
        let Some(s) = self.sync.as_mut() else {
            return Err(ControllerError::BadRequest("this daemon has no sync peer (start it with --sync-listen, --sync-peer, --sync-key-file)".into()));
        };
        let old = std::mem::replace(&mut s.status.role, role);
        if old != role {
            tracing::warn!(%old, new = %role, "role changed");
        }
        Ok(old)
    }

    /// The VIPs to announce: every service's address while the program is
    /// attached somewhere, none otherwise.
    pub fn announced_vips(&self) -> Vec<IpAddr> {
        if self.dp.attachments().is_empty() {
            return Vec::new();
        }
        self.services.keys().map(|s| s.addr.ip()).collect()
    }

    /// The sync role, if syncing.
    pub fn role(&self) -> Option<crate::ha::Role> {
        self.sync.as_ref().map(|s| s.status.role)
    }

    /// Sync figures the daemon's tasks update.
    pub fn sync_status_mut(&mut self) -> Option<&mut crate::ha::SyncStatus> {
        self.sync.as_mut().map(|s| &mut s.status)
    }

    /// As master, queues a flow change for the peer. Never waits (the
    /// lock is held): when the queue is full the change is dropped and
    /// counted; the next refresh heals it.
    fn sync_send(&mut self, kind: crate::ha::Kind, idle: Duration, flow: &lb_common::maps::FlowEnd) {
        if let Some(s) = &mut self.sync
            && s.status.role == crate::ha::Role::Master
            && s.out.try_send(crate::ha::Record { kind, idle, flow: *flow }).is_err()
        {
            s.status.dropped_records += 1;
        }
    }

    /// As backup, installs or removes flows the peer sent. Ids are
    /// translated through addresses: a flow of a service or backend this
    /// node does not have is skipped (counted).
    pub fn sync_install(&mut self, records: &[crate::ha::Record]) -> Result<()> {
        let now = monotonic_ns();
        let mut ends = Vec::new();
        let (mut applied, mut unknown) = (0u64, 0u64);
        for r in records {
            let f = &r.flow;
            let key = f.key;
            let rkey = f.to_backend.peer_key(key.proto);
            if r.kind == crate::ha::Kind::End {
                ends.extend([key, rkey]);
                applied += 1;
                continue;
            }
            let Some(proto) = Proto::from_number(key.proto) else {
                unknown += 1;
                continue;
            };
            let sid = ServiceId { addr: SocketAddr::new(addr_to_ip(&key.dst_addr), port_from(key.dst_port)), proto };
            let backend = SocketAddr::new(addr_to_ip(&f.to_backend.nat_dst), port_from(f.to_backend.nat_dport));
            let ids = self.services.get(&sid).and_then(|svc| {
                let slot = svc.backends.get(&backend).or_else(|| svc.leaving.iter().find(|b| b.addr == backend))?;
                Some((svc.id, slot.id))
            });
            let Some((service_id, backend_id)) = ids else {
                unknown += 1;
                continue;
            };
            let last = now.saturating_sub(r.idle.as_nanos() as u64);
            let mut fwd = FlowEntry { backend_id, service_id, created_ns: last, last_seen_ns: last, ..f.to_backend };
            fwd.direction = DIR_TO_BACKEND;
            let mut rev = f.to_client;
            if rev.direction == DIR_TO_BACKEND || rev == FlowEntry::default() {
                rev.fill_reverse_of(&key, &fwd, last);
            }
            rev.backend_id = backend_id;
            rev.service_id = service_id;
            rev.created_ns = last;
            rev.last_seen_ns = last;
            // Reverse first, as the data plane does.
            self.dp.flow_insert(rkey, rev)?;
            self.dp.flow_insert(key, fwd)?;
            if fwd.nat_flags & NAT_FULL != 0 {
                self.dp.port_hold(rkey, now)?;
            }
            applied += 1;
        }
        if !ends.is_empty() {
            self.dp.flows_delete(&ends)?;
        }
        if let Some(s) = self.sync.as_mut() {
            s.status.applied_records += applied;
            s.status.unknown_records += unknown;
        }
        Ok(())
    }

    /// Enables backends given by DNS name.
    pub fn with_dns(mut self, resolver: crate::dns::Resolver, ttl: TtlLimits) -> Self {
        self.resolver = Some(Arc::new(resolver));
        self.dns_ttl = ttl;
        self
    }

    /// The DNS client, for lookups made without holding the controller.
    pub fn resolver(&self) -> Result<Arc<crate::dns::Resolver>> {
        self.resolver
            .clone()
            .ok_or_else(|| ControllerError::BadRequest("backends by DNS name need the daemon's resolver (this controller has none)".into()))
    }

    /// Enables proactive resets through `sender`.
    pub fn with_resets(mut self, sender: RstSender) -> Self {
        self.rst = Some(Arc::new(sender));
        self
    }

    /// Writes flow logs (records of finished flows) to `log`.
    pub fn with_flow_log(mut self, log: crate::daemon::flowlog::FlowLog) -> Self {
        self.flow_log = Some(log);
        self
    }

    /// Logs a flow the data plane created or removed (from its ring
    /// buffer), and sends it to the sync peer.
    pub fn log_flow_end(&mut self, ev: &lb_common::maps::FlowEnd) {
        if let Some(l) = self.flow_log.as_mut() {
            l.record(ev);
        }
        let kind = if ev.reason == end_reason::NEW { crate::ha::Kind::Live } else { crate::ha::Kind::End };
        self.sync_send(kind, Duration::ZERO, ev);
    }

    fn log_flows(&mut self, flows: &[Flow], reason: u32) {
        for f in flows {
            let ev = lb_common::maps::FlowEnd { key: f.key, reason, _pad: 0, to_backend: f.fwd, to_client: f.rev.unwrap_or_default() };
            if let Some(l) = self.flow_log.as_mut() {
                l.record(&ev);
            }
            self.sync_send(crate::ha::Kind::End, Duration::ZERO, &ev);
        }
    }

    /// Test-only: skip the proactive walk (the data plane still resets a
    /// flow of a gone backend on its next packet).
    pub fn set_proactive_reset(&mut self, on: bool) {
        self.proactive_reset = on;
    }

    /// Whether the model changed since the last call (the daemon then saves
    /// its state file).
    pub fn take_dirty(&mut self) -> bool {
        std::mem::replace(&mut self.dirty, false)
    }

    /// When the last proactive RST was sent, if any.
    pub fn last_rst_sent(&self) -> Option<Instant> {
        self.last_rst_sent
    }

    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    /// Finds the service for `addr`, with or without a protocol.
    pub fn resolve(&self, addr: SocketAddr, proto: Option<Proto>) -> Result<ServiceId> {
        if let Some(proto) = proto {
            let id = ServiceId { addr, proto };
            return if self.services.contains_key(&id) {
                Ok(id)
            } else {
                Err(ControllerError::NotFound(format!("service {id} does not exist")))
            };
        }
        let found: Vec<ServiceId> = [Proto::Tcp, Proto::Udp]
            .into_iter()
            .map(|proto| ServiceId { addr, proto })
            .filter(|id| self.services.contains_key(id))
            .collect();
        match found.as_slice() {
            [one] => Ok(*one),
            [] => Err(ControllerError::NotFound(format!("service {addr} does not exist"))),
            _ => Err(ControllerError::Ambiguous(format!(
                "{addr} has both a tcp and a udp service: say which with --proto"
            ))),
        }
    }

    fn service_key(id: &ServiceId) -> ServiceKey {
        ServiceKey { addr: addr_from_ip(id.addr.ip()), port: be_port(id.addr.port()), proto: id.proto.number(), _pad: 0 }
    }

    fn service_entry(svc: &Service) -> ServiceEntry {
        ServiceEntry {
            id: svc.id,
            ring_len: svc.ring.len() as u32,
            scheduler: match svc.settings.scheduler {
                Scheduler::Maglev => SCHED_MAGLEV,
                Scheduler::Wrr => SCHED_WRR,
                Scheduler::LeastConn => SCHED_LEAST_CONN,
            },
            flags: if svc.settings.on_miss == MissPolicy::Rehash { SVC_F_MISS_REHASH } else { 0 }
                | if svc.settings.mode == NatMode::Fullnat { SVC_F_FULLNAT } else { 0 }
                | if svc.settings.on_no_port == NoPortPolicy::Drop { SVC_F_NO_PORT_DROP } else { 0 }
                | if svc.settings.mode == NatMode::Dsr { SVC_F_DSR } else { 0 },
            _pad: 0,
            syn_timeout_s: svc.settings.timeouts.syn.0.as_secs() as u32,
            established_timeout_s: svc.settings.timeouts.established.0.as_secs() as u32,
            closing_timeout_s: svc.settings.timeouts.closing.0.as_secs() as u32,
            udp_timeout_s: svc.settings.timeouts.udp.0.as_secs() as u32,
            snat_port_lo: svc.settings.snat_ports.0,
            snat_port_hi: svc.settings.snat_ports.1,
        }
    }

    fn addr_ref(&mut self, ip: IpAddr, vip: i32, backend: i32) -> Result<()> {
        let e = self.addr_refs.entry(ip).or_insert((0, 0));
        e.0 = e.0.saturating_add_signed(vip);
        e.1 = e.1.saturating_add_signed(backend);
        let flags = if e.0 > 0 { ADDR_VIP } else { 0 } | if e.1 > 0 { ADDR_BACKEND } else { 0 };
        if flags == 0 {
            self.addr_refs.remove(&ip);
        }
        self.dp.addr_set(addr_from_ip(ip), flags)?;
        Ok(())
    }

    fn svc(&self, sid: &ServiceId) -> Result<&Service> {
        self.services.get(sid).ok_or_else(|| ControllerError::NotFound(format!("service {sid} does not exist")))
    }

    pub fn service_add(&mut self, addr: SocketAddr, proto: Proto, options: &ServiceOptions) -> Result<ServiceId> {
        check_unicast("service", addr)?;
        let sid = ServiceId { addr, proto };
        if self.services.contains_key(&sid) {
            return Err(ControllerError::Conflict(format!("service {sid} already exists")));
        }
        let settings = ServiceSettings::default().patched(options).map_err(ControllerError::BadRequest)?;
        check_dsr(&sid, &settings, std::iter::empty())?;
        let id = (0..MAX_SERVICES)
            .find(|i| !self.used_service_ids.contains(i))
            .ok_or_else(|| ControllerError::Capacity(format!("cannot add {sid}: all {MAX_SERVICES} service slots are in use")))?;
        let svc = Service {
            id,
            ring: Vec::new(),
            settings,
            backends: BTreeMap::new(),
            leaving: Vec::new(),
            resets: ResetCounts::default(),
            named: BTreeMap::new(),
        };
        self.dp.reset_traffic(Some(id), None)?;
        self.dp.service_set(Self::service_key(&sid), Self::service_entry(&svc))?;
        self.used_service_ids.insert(id);
        self.services.insert(sid, svc);
        self.addr_ref(addr.ip(), 1, 0)?;
        tracing::info!(service = %sid, id, "service added");
        self.dirty = true;
        Ok(sid)
    }

    /// Changes a service's settings at run time.
    pub fn service_set(&mut self, addr: SocketAddr, proto: Option<Proto>, options: &ServiceOptions) -> Result<(ServiceId, ServiceSettings)> {
        let sid = self.resolve(addr, proto)?;
        let settings = self.svc(&sid)?.settings.patched(options).map_err(ControllerError::BadRequest)?;
        // Full-NAT source addresses first: a backend without one refuses
        // the change before anything moves.
        let svc = self.svc(&sid)?;
        check_dsr(&sid, &settings, svc.backends.keys().copied())?;
        let snat: Vec<IpAddr> = svc
            .backends
            .values()
            .chain(svc.leaving.iter())
            .map(|b| snat_source(&settings, b.addr.ip()))
            .collect::<Result<_>>()?;
        let Some(svc) = self.services.get_mut(&sid) else { return Err(ControllerError::NotFound(format!("service {sid} does not exist"))) };
        svc.settings = settings.clone();
        for (b, a) in svc.backends.values_mut().chain(svc.leaving.iter_mut()).zip(snat) {
            b.snat = a;
        }
        if settings.health.is_none() {
            // No check: nobody is unhealthy any more.
            for b in svc.backends.values_mut() {
                b.health = Tracker::default();
            }
        }
        let entry = Self::service_entry(svc);
        self.dp.service_set(Self::service_key(&sid), entry)?;
        self.sync_backends(sid)?;
        tracing::info!(service = %sid, ?settings, "service settings changed");
        self.dirty = true;
        Ok((sid, settings))
    }

    pub fn service_remove(&mut self, addr: SocketAddr, proto: Option<Proto>) -> Result<ServiceId> {
        let sid = self.resolve(addr, proto)?;
        // No new flows first; then every flow of the service goes, with a RST
        // (the service itself is gone: no policy can keep its flows).
        self.dp.service_remove(&Self::service_key(&sid))?;
        let Some(svc) = self.services.remove(&sid) else { return Ok(sid) };
        let mut ids: Vec<u32> = svc.backends.values().map(|b| b.id).collect();
        ids.extend(svc.leaving.iter().map(|b| b.id));
        for b in svc.backends.values().chain(svc.leaving.iter()) {
            let gone = b.entry(svc.id, BACKEND_REMOVED);
            self.dp.backend_set(b.id, gone)?;
        }
        let view = self.table()?;
        let flows: Vec<Flow> = view.flows.into_iter().filter(|f| ids.contains(&f.fwd.backend_id)).collect();
        let mut counts = ResetCounts::default();
        self.reset_now(&flows, ResetCause::Removed, &mut counts);
        for b in svc.backends.values().chain(svc.leaving.iter()) {
            self.free_backend(b)?;
        }
        self.used_service_ids.remove(&svc.id);
        self.addr_ref(addr.ip(), -1, 0)?;
        tracing::info!(service = %sid, flows_reset = counts.removed, "service removed");
        self.dirty = true;
        Ok(sid)
    }

    pub fn backend_add(
        &mut self,
        addr: SocketAddr,
        proto: Option<Proto>,
        backend: SocketAddr,
        weight: Option<u32>,
    ) -> Result<(ServiceId, u32)> {
        check_unicast("backend", backend)?;
        let weight = weight.unwrap_or(1);
        check_weight(weight)?;
        let sid = self.resolve(addr, proto)?;
        if sid.addr.is_ipv4() != backend.is_ipv4() {
            return Err(ControllerError::BadRequest(format!(
                "backend {backend} and service {sid} are not the same address family (an IPv4 VIP with IPv6 backends is not supported)"
            )));
        }
        let svc = self.svc(&sid)?;
        check_dsr(&sid, &svc.settings, std::iter::once(backend))?;
        if svc.backends.contains_key(&backend) {
            return Err(ControllerError::Conflict(format!("backend {backend} is already registered on {sid}")));
        }
        if svc.backends.len() >= RING_SLOTS as usize {
            return Err(ControllerError::Capacity(format!("{sid} already has {RING_SLOTS} backends, the most a service can have")));
        }
        let id = (0..MAX_BACKENDS)
            .map(|i| (self.next_backend_id + i) % MAX_BACKENDS)
            .find(|i| !self.used_backend_ids.contains(i))
            .ok_or_else(|| ControllerError::Capacity(format!("cannot add {backend}: all {MAX_BACKENDS} backend slots are in use")))?;
        let service_id = svc.id;
        let snat = snat_source(&svc.settings, backend.ip())?;
        let slot = BackendSlot { id, addr: backend, snat, weight, registered: true, health: Tracker::default(), drain: None, up_since: Instant::now() };
        self.dp.reset_traffic(None, Some(id))?;
        self.backend_resets.remove(&id);
        self.dp.backend_set(id, slot.entry(service_id, BACKEND_UP))?;
        self.used_backend_ids.insert(id);
        self.next_backend_id = (id + 1) % MAX_BACKENDS;
        if let Some(svc) = self.services.get_mut(&sid) {
            svc.backends.insert(backend, slot);
        }
        self.addr_ref(backend.ip(), 0, 1)?;
        self.rebuild_ring(sid)?;
        if self.warm_neighbours {
            let any: SocketAddr = if backend.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
            let sent = std::net::UdpSocket::bind(any).and_then(|s| s.send_to(&[], SocketAddr::new(backend.ip(), 9)));
            if let Err(e) = sent {
                tracing::debug!(%backend, error = %e, "warming the backend's neighbour entry failed");
            }
        }
        tracing::info!(service = %sid, %backend, id, weight, "backend added");
        self.dirty = true;
        Ok((sid, id))
    }

    /// Deregisters a backend; its flows follow the service's `on_remove`
    /// policy. Returns the policy applied and how many active flows it had.
    pub fn backend_remove(
        &mut self,
        addr: SocketAddr,
        proto: Option<Proto>,
        backend: SocketAddr,
    ) -> Result<(ServiceId, FlowPolicy, usize)> {
        let sid = self.resolve(addr, proto)?;
        let Some(mut slot) = self.services.get_mut(&sid).and_then(|s| s.backends.remove(&backend)) else {
            return Err(ControllerError::NotFound(format!("backend {backend} is not registered on {sid}")));
        };
        let settings = self.svc(&sid)?.settings.clone();
        slot.registered = false;
        slot.drain = match settings.on_remove {
            FlowPolicy::Reset => None,
            FlowPolicy::Drain(d) => Some(Drain { deadline: Some(Instant::now() + d) }),
            FlowPolicy::Keep => Some(Drain { deadline: None }),
        };
        // No new flows: out of the ring, then its data-plane state.
        self.rebuild_ring(sid)?;
        self.write_backend(&slot, self.svc(&sid)?.id)?;
        let flows = self.flows_of(slot.id)?;
        let active = flows.iter().filter(|f| TableView::is_active(f)).count();
        if settings.on_remove == FlowPolicy::Reset {
            self.queue_reset(ResetJob { service: sid, backend, cause: ResetCause::Removed, flows, spread: settings.reset_spread.0 });
        }
        if let Some(svc) = self.services.get_mut(&sid) {
            svc.leaving.push(slot);
        }
        tracing::info!(service = %sid, %backend, policy = %settings.on_remove, active_flows = active, "backend removed");
        self.dirty = true;
        Ok((sid, settings.on_remove, active))
    }

    fn write_backend(&mut self, slot: &BackendSlot, service_id: u32) -> Result<()> {
        self.dp.backend_set(slot.id, slot.entry(service_id, slot.dp_state()))?;
        Ok(())
    }

    /// Writes every backend's data-plane state and the ring (after a
    /// settings change).
    fn sync_backends(&mut self, sid: ServiceId) -> Result<()> {
        let Some(svc) = self.services.get(&sid) else { return Ok(()) };
        let service_id = svc.id;
        let slots: Vec<(u32, Backend)> = svc
            .backends
            .values()
            .chain(svc.leaving.iter())
            .map(|b| (b.id, b.entry(service_id, b.dp_state())))
            .collect();
        for (id, b) in slots {
            self.dp.backend_set(id, b)?;
        }
        self.rebuild_ring(sid)
    }

    /// Frees a deregistered backend's id and entries.
    fn free_backend(&mut self, slot: &BackendSlot) -> Result<()> {
        let id = slot.id;
        let keys: Vec<FlowKey> = self
            .flows_of(id)?
            .iter()
            .flat_map(|f| [f.key, f.reverse_key])
            .collect();
        self.dp.flows_delete(&keys)?;
        self.dp.backend_set(id, Backend { state: BACKEND_UNUSED, ..Default::default() })?;
        self.used_backend_ids.remove(&id);
        self.addr_ref(slot.addr.ip(), 0, -1)?;
        tracing::debug!(backend = %slot.addr, id, "backend id freed");
        self.dirty = true;
        Ok(())
    }

    fn rebuild_ring(&mut self, sid: ServiceId) -> Result<()> {
        if let Some(batch) = self.ring_batch.as_mut() {
            batch.insert(sid);
            return Ok(());
        }
        let Some(svc) = self.services.get(&sid) else { return Ok(()) };
        let now = Instant::now();
        let ramp = svc.settings.slow_start.0;
        let live = svc.backends.values().filter(|b| b.takes_new_flows());
        let ring = match svc.settings.scheduler {
            // Least-conn samples the weighted round-robin sequence.
            Scheduler::Wrr | Scheduler::LeastConn => {
                let weights: Vec<(u32, u32)> = live.map(|b| (b.id, b.effective_weight(now, ramp))).collect();
                sched::build_wrr_ring(&weights, RING_SLOTS as usize)
            }
            Scheduler::Maglev => {
                let backends: Vec<sched::MaglevBackend> = live
                    .map(|b| sched::MaglevBackend { id: b.id, weight: b.effective_weight(now, ramp), identity: maglev_identity(b.addr) })
                    .collect();
                sched::build_maglev(&backends, svc.settings.maglev_size as usize)
            }
        };
        if ring == svc.ring {
            return Ok(());
        }
        // Slots first, then the length: the data plane never reads a slot
        // that is not written yet.
        self.dp.ring_write(svc.id, &svc.ring, &ring)?;
        if let Some(svc) = self.services.get_mut(&sid) {
            svc.ring = ring;
            let entry = Self::service_entry(svc);
            self.dp.service_set(Self::service_key(&sid), entry)?;
        }
        Ok(())
    }

    /// Changes a backend's weight at run time.
    pub fn backend_set(&mut self, addr: SocketAddr, proto: Option<Proto>, backend: SocketAddr, weight: u32) -> Result<(ServiceId, u32)> {
        check_weight(weight)?;
        let sid = self.resolve(addr, proto)?;
        let Some(svc) = self.services.get_mut(&sid) else { return Err(ControllerError::NotFound(format!("service {sid} does not exist"))) };
        let service_id = svc.id;
        let Some(slot) = svc.backends.get_mut(&backend) else {
            return Err(ControllerError::NotFound(format!("backend {backend} is not registered on {sid}")));
        };
        let old = slot.weight;
        slot.weight = weight;
        let b = slot.entry(service_id, slot.dp_state());
        let id = slot.id;
        self.dp.backend_set(id, b)?;
        self.rebuild_ring(sid)?;
        self.dirty = true;
        tracing::info!(service = %sid, %backend, old, weight, "backend weight changed");
        Ok((sid, old))
    }

    // ---- backends given by DNS name ----

    /// Registers a backend by name with the answer of its first lookup
    /// (made by the caller without holding the controller). The name must
    /// resolve to at least one address of the service's family.
    pub fn named_add(&mut self, addr: SocketAddr, proto: Option<Proto>, name: &HostPort, weight: Option<u32>, answer: Resolution) -> Result<(ServiceId, Vec<SocketAddr>)> {
        let weight = weight.unwrap_or(1);
        check_weight(weight)?;
        let sid = self.resolve(addr, proto)?;
        if self.svc(&sid)?.named.contains_key(name) {
            return Err(ControllerError::Conflict(format!("backend {name} is already registered on {sid}")));
        }
        let addrs = match &answer {
            Resolution::Addrs { addrs, .. } => Self::same_family(&sid, addrs),
            Resolution::NoSuchName => BTreeSet::new(),
            Resolution::Failed(e) => return Err(ControllerError::BadRequest(format!("resolving {}: {e} (try again, or check --dns-server)", name.host))),
        };
        if addrs.is_empty() {
            let family = if sid.addr.is_ipv4() { "IPv4" } else { "IPv6" };
            return Err(ControllerError::BadRequest(format!("{} has no {family} address (the service is {family})", name.host)));
        }
        let now = Instant::now();
        let mut named = NamedBackend::due(weight, BTreeSet::new(), now);
        named.next_resolve = self.dns_ttl.next(now, &answer);
        if let Resolution::Addrs { ttl, .. } = &answer {
            named.ttl = *ttl;
        }
        if let Some(svc) = self.services.get_mut(&sid) {
            svc.named.insert(name.clone(), named);
        }
        self.batch(|c| c.named_sync(sid, name, addrs))?;
        let registered = self.svc(&sid)?.named.get(name).map(|n| n.addrs.iter().map(|a| SocketAddr::new(*a, name.port)).collect()).unwrap_or_default();
        tracing::info!(service = %sid, backend = %name, addresses = ?registered, "backend added by name");
        self.dirty = true;
        Ok((sid, registered))
    }

    /// Registers a backend by name without an answer yet: the daemon's
    /// upkeep looks it up at once (configuration files, `apply`).
    pub fn named_register(&mut self, sid: ServiceId, name: HostPort, weight: u32) -> Result<()> {
        check_weight(weight)?;
        if self.resolver.is_none() {
            return Err(ControllerError::BadRequest(format!("backend {name}: backends by DNS name need the daemon's resolver")));
        }
        let now = Instant::now();
        let Some(svc) = self.services.get_mut(&sid) else { return Err(ControllerError::NotFound(format!("service {sid} does not exist"))) };
        svc.named.entry(name).or_insert(NamedBackend::due(weight, BTreeSet::new(), now));
        self.dirty = true;
        Ok(())
    }

    /// Deregisters a backend given by name: each of its addresses leaves
    /// under the service's `on_remove` policy. Returns the policy and the
    /// active flows they had.
    pub fn named_remove(&mut self, addr: SocketAddr, proto: Option<Proto>, name: &HostPort) -> Result<(ServiceId, FlowPolicy, usize)> {
        let sid = self.resolve(addr, proto)?;
        let Some(named) = self.services.get_mut(&sid).and_then(|s| s.named.remove(name)) else {
            return Err(ControllerError::NotFound(format!("backend {name} is not registered on {sid}")));
        };
        let mut flows = 0;
        for a in named.addrs {
            if let Ok((_, _, n)) = self.backend_remove(sid.addr, Some(sid.proto), SocketAddr::new(a, name.port)) {
                flows += n;
            }
        }
        let policy = self.svc(&sid)?.settings.on_remove;
        tracing::info!(service = %sid, backend = %name, "backend by name removed");
        self.dirty = true;
        Ok((sid, policy, flows))
    }

    /// Changes the weight of a backend given by name (all its addresses).
    pub fn named_set(&mut self, addr: SocketAddr, proto: Option<Proto>, name: &HostPort, weight: u32) -> Result<(ServiceId, u32)> {
        check_weight(weight)?;
        let sid = self.resolve(addr, proto)?;
        let Some(named) = self.services.get_mut(&sid).and_then(|s| s.named.get_mut(name)) else {
            return Err(ControllerError::NotFound(format!("backend {name} is not registered on {sid}")));
        };
        let old = std::mem::replace(&mut named.weight, weight);
        let addrs: Vec<IpAddr> = named.addrs.iter().copied().collect();
        for a in addrs {
            self.backend_set(sid.addr, Some(sid.proto), SocketAddr::new(a, name.port), weight)?;
        }
        self.dirty = true;
        Ok((sid, old))
    }

    fn same_family(sid: &ServiceId, addrs: &[IpAddr]) -> BTreeSet<IpAddr> {
        addrs.iter().copied().filter(|a| a.is_ipv4() == sid.addr.is_ipv4()).collect()
    }

    /// Names due for a lookup.
    pub fn dns_due(&self, now: Instant) -> Vec<(ServiceId, HostPort)> {
        self.services
            .iter()
            .flat_map(|(sid, s)| s.named.iter().filter(|(_, n)| n.next_resolve <= now).map(move |(name, _)| (*sid, name.clone())))
            .collect()
    }

    /// Applies a lookup's answer: new addresses join, vanished ones leave
    /// under the service's `on_remove` policy. A failed lookup keeps the
    /// last answer until `max` TTL after it, then drops it.
    pub fn dns_apply(&mut self, sid: ServiceId, name: &HostPort, answer: Resolution, now: Instant) -> Result<()> {
        let ttl = self.dns_ttl;
        let Some(named) = self.services.get_mut(&sid).and_then(|s| s.named.get_mut(name)) else { return Ok(()) };
        named.next_resolve = ttl.next(now, &answer);
        let want = match &answer {
            Resolution::Addrs { addrs, ttl: t } => {
                named.last_answer = now;
                named.ttl = *t;
                named.last_error = None;
                Self::same_family(&sid, addrs)
            }
            Resolution::NoSuchName => {
                named.last_answer = now;
                named.last_error = Some("no such name, or no address of the service's family".into());
                BTreeSet::new()
            }
            Resolution::Failed(e) => {
                named.last_error = Some(e.clone());
                if now.saturating_duration_since(named.last_answer) < ttl.max {
                    tracing::warn!(service = %sid, backend = %name, error = %e, "resolving failed: keeping the last answer");
                    return Ok(());
                }
                tracing::warn!(service = %sid, backend = %name, error = %e, "resolving has failed for longer than --dns-max-ttl: its addresses leave");
                BTreeSet::new()
            }
        };
        self.batch(|c| c.named_sync(sid, name, want))
    }

    /// Makes the addresses registered for `name` equal `want`.
    fn named_sync(&mut self, sid: ServiceId, name: &HostPort, want: BTreeSet<IpAddr>) -> Result<()> {
        let Some((have, weight)) = self.svc(&sid)?.named.get(name).map(|n| (n.addrs.clone(), n.weight)) else { return Ok(()) };
        for a in want.difference(&have) {
            let backend = SocketAddr::new(*a, name.port);
            if self.svc(&sid)?.backends.contains_key(&backend) {
                tracing::info!(service = %sid, %backend, name = %name, "address already registered otherwise: not taken over by the name");
                continue;
            }
            match self.backend_add(sid.addr, Some(sid.proto), backend, Some(weight)) {
                Ok(_) => {
                    if let Some(n) = self.services.get_mut(&sid).and_then(|s| s.named.get_mut(name)) {
                        n.addrs.insert(*a);
                    }
                    tracing::info!(service = %sid, %backend, name = %name, "address of a named backend joins");
                }
                Err(e) => tracing::warn!(service = %sid, %backend, name = %name, error = %e, "adding a resolved address failed"),
            }
        }
        for a in have.difference(&want) {
            let backend = SocketAddr::new(*a, name.port);
            if let Some(n) = self.services.get_mut(&sid).and_then(|s| s.named.get_mut(name)) {
                n.addrs.remove(a);
            }
            match self.backend_remove(sid.addr, Some(sid.proto), backend) {
                Ok((_, policy, flows)) => tracing::info!(service = %sid, %backend, name = %name, %policy, flows, "address of a named backend leaves"),
                Err(e) => tracing::warn!(service = %sid, %backend, name = %name, error = %e, "removing a vanished address failed"),
            }
        }
        self.dirty = true;
        Ok(())
    }

    // ---- declarative configuration ----

    /// The whole configuration (registered backends only).
    pub fn export(&self) -> crate::api::desired::Desired {
        use crate::api::desired::{DesiredBackend, DesiredNamed, DesiredService};
        crate::api::desired::Desired {
            services: self
                .services
                .iter()
                .map(|(sid, svc)| DesiredService {
                    service: sid.addr,
                    proto: sid.proto,
                    settings: svc.settings.clone(),
                    backends: svc
                        .backends
                        .values()
                        .filter(|b| !svc.owned_by_name(b.addr))
                        .map(|b| DesiredBackend { backend: b.addr, weight: b.weight })
                        .collect(),
                    named_backends: svc.named.iter().map(|(name, n)| DesiredNamed { backend: name.clone(), weight: n.weight }).collect(),
                })
                .collect(),
        }
    }

    /// Makes the running configuration match `want`: validates all of it
    /// first (nothing changes if any of it is wrong, and the error names the
    /// field), then adds, changes and removes what differs. Returns the
    /// changes, applied or (with `dry_run`) only listed.
    pub fn apply(&mut self, want: &crate::api::desired::Desired, dry_run: bool) -> Result<Vec<String>> {
        let bad = |path: String, msg: String| ControllerError::BadRequest(format!("{path}: {msg}"));
        let mut seen = HashSet::new();
        if want.services.len() > MAX_SERVICES as usize {
            return Err(ControllerError::Capacity(format!("{} services, at most {MAX_SERVICES}", want.services.len())));
        }
        for (i, s) in want.services.iter().enumerate() {
            let sid = ServiceId { addr: s.service, proto: s.proto };
            check_unicast("service", s.service).map_err(|e| bad(format!("services[{i}].service"), e.to_string()))?;
            if !seen.insert(sid) {
                return Err(bad(format!("services[{i}]"), format!("service {sid} is listed twice")));
            }
            s.settings.validate().map_err(|e| bad(format!("services[{i}].settings"), e))?;
            let mut backends = HashSet::new();
            for (j, b) in s.backends.iter().enumerate() {
                let path = format!("services[{i}].backends[{j}]");
                check_unicast("backend", b.backend).map_err(|e| bad(format!("{path}.backend"), e.to_string()))?;
                if b.weight == 0 || b.weight > MAX_WEIGHT {
                    return Err(bad(format!("{path}.weight"), format!("{} is out of range 1-{MAX_WEIGHT}", b.weight)));
                }
                if !backends.insert(b.backend) {
                    return Err(bad(format!("{path}.backend"), format!("{} is listed twice on {sid}", b.backend)));
                }
            }
        }
        // The plan.
        let mut changes = Vec::new();
        let mut steps: Vec<Step> = Vec::new();
        for s in &want.services {
            let sid = ServiceId { addr: s.service, proto: s.proto };
            match self.services.get(&sid) {
                None => {
                    changes.push(format!("add service {sid}"));
                    steps.push(Step::AddService(sid, s.settings.clone()));
                    for b in &s.backends {
                        changes.push(format!("add backend {} to {sid} (weight {})", b.backend, b.weight));
                        steps.push(Step::AddBackend(sid, b.backend, b.weight));
                    }
                    for n in &s.named_backends {
                        changes.push(format!("add backend {} to {sid} (weight {}, resolved by the daemon)", n.backend, n.weight));
                        steps.push(Step::AddNamed(sid, n.backend.clone(), n.weight));
                    }
                }
                Some(cur) => {
                    if cur.settings != s.settings {
                        changes.push(format!("change settings of {sid}"));
                        steps.push(Step::Settings(sid, s.settings.clone()));
                    }
                    for b in &s.backends {
                        match cur.backends.get(&b.backend) {
                            None => {
                                changes.push(format!("add backend {} to {sid} (weight {})", b.backend, b.weight));
                                steps.push(Step::AddBackend(sid, b.backend, b.weight));
                            }
                            Some(slot) if slot.weight != b.weight => {
                                changes.push(format!("reweight backend {} on {sid}: {} -> {}", b.backend, slot.weight, b.weight));
                                steps.push(Step::Reweight(sid, b.backend, b.weight));
                            }
                            Some(_) => {}
                        }
                    }
                    for n in &s.named_backends {
                        match cur.named.get(&n.backend) {
                            None => {
                                changes.push(format!("add backend {} to {sid} (weight {}, resolved by the daemon)", n.backend, n.weight));
                                steps.push(Step::AddNamed(sid, n.backend.clone(), n.weight));
                            }
                            Some(c) if c.weight != n.weight => {
                                changes.push(format!("reweight backend {} on {sid}: {} -> {}", n.backend, c.weight, n.weight));
                                steps.push(Step::ReweightNamed(sid, n.backend.clone(), n.weight));
                            }
                            Some(_) => {}
                        }
                    }
                    for name in cur.named.keys() {
                        if !s.named_backends.iter().any(|n| n.backend == *name) {
                            changes.push(format!("remove backend {name} from {sid} (policy {})", s.settings.on_remove));
                            steps.push(Step::RemoveNamed(sid, name.clone()));
                        }
                    }
                    for addr in cur.backends.keys() {
                        if !s.backends.iter().any(|b| b.backend == *addr) && !cur.owned_by_name(*addr) {
                            changes.push(format!("remove backend {addr} from {sid} (policy {})", s.settings.on_remove));
                            steps.push(Step::RemoveBackend(sid, *addr));
                        }
                    }
                }
            }
        }
        for sid in self.services.keys() {
            if !seen.contains(sid) {
                changes.push(format!("remove service {sid}"));
                steps.push(Step::RemoveService(*sid));
            }
        }
        if dry_run {
            return Ok(changes);
        }
        self.batch(|c| c.apply_steps(steps))?;
        Ok(changes)
    }

    fn apply_steps(&mut self, steps: Vec<Step>) -> Result<()> {
        for step in steps {
            match step {
                Step::AddService(sid, settings) => {
                    self.service_add(sid.addr, sid.proto, &ServiceOptions::default())?;
                    self.replace_settings(sid, settings)?;
                }
                Step::Settings(sid, settings) => self.replace_settings(sid, settings)?,
                Step::AddBackend(sid, b, w) => {
                    self.backend_add(sid.addr, Some(sid.proto), b, Some(w))?;
                }
                Step::Reweight(sid, b, w) => {
                    self.backend_set(sid.addr, Some(sid.proto), b, w)?;
                }
                Step::RemoveBackend(sid, b) => {
                    self.backend_remove(sid.addr, Some(sid.proto), b)?;
                }
                Step::RemoveService(sid) => {
                    self.service_remove(sid.addr, Some(sid.proto))?;
                }
                Step::AddNamed(sid, name, w) => self.named_register(sid, name, w)?,
                Step::ReweightNamed(sid, name, w) => {
                    self.named_set(sid.addr, Some(sid.proto), &name, w)?;
                }
                Step::RemoveNamed(sid, name) => {
                    self.named_remove(sid.addr, Some(sid.proto), &name)?;
                }
            }
        }
        Ok(())
    }

    /// Replaces a service's settings whole (validated by the caller).
    fn replace_settings(&mut self, sid: ServiceId, settings: ServiceSettings) -> Result<()> {
        let Some(svc) = self.services.get_mut(&sid) else { return Err(ControllerError::NotFound(format!("service {sid} does not exist"))) };
        svc.settings = settings;
        if svc.settings.health.is_none() {
            for b in svc.backends.values_mut() {
                b.health = Tracker::default();
            }
        }
        let entry = Self::service_entry(svc);
        self.dp.service_set(Self::service_key(&sid), entry)?;
        self.sync_backends(sid)?;
        self.dirty = true;
        Ok(())
    }

    // ---- the connection table ----

    fn table(&self) -> Result<TableView> {
        self.table_where(|_| true)
    }

    /// The flows whose entries satisfy `keep` (both entries of a flow carry
    /// the same backend and service, so filtering on those keeps pairs whole).
    fn table_where(&self, keep: impl Fn(&FlowEntry) -> bool) -> Result<TableView> {
        let mut forward: Vec<(FlowKey, FlowEntry)> = Vec::new();
        let mut reverse: HashMap<FlowKey, FlowEntry> = HashMap::new();
        let mut entries = (0u64, 0u64);
        self.dp.for_each_flow_tagged(|half_open, k, v| {
            if half_open {
                entries.1 += 1;
            } else {
                entries.0 += 1;
            }
            if !keep(v) {
                return;
            }
            if v.direction == DIR_TO_BACKEND {
                forward.push((*k, *v));
            } else {
                reverse.insert(*k, *v);
            }
        })?;
        let flows = forward
            .into_iter()
            .map(|(key, fwd)| {
                let reverse_key = reverse_key(&key, &fwd);
                let rev = reverse.get(&reverse_key).copied();
                Flow { key, fwd, reverse_key, rev }
            })
            .collect();
        Ok(TableView { flows, entries })
    }

    fn flows_of(&self, backend_id: u32) -> Result<Vec<Flow>> {
        Ok(self.table_where(|e| e.backend_id == backend_id)?.flows)
    }

    // ---- resets ----

    fn queue_reset(&mut self, job: ResetJob) {
        if !self.proactive_reset {
            tracing::debug!(backend = %job.backend, "proactive reset disabled: the data plane resets flows on their next packet");
            return;
        }
        if job.spread.is_zero() || job.flows.len() < 2 {
            let mut counts = ResetCounts::default();
            self.reset_now(&job.flows, job.cause, &mut counts);
            if let Some(svc) = self.services.get_mut(&job.service) {
                svc.resets.add(job.cause, counts.removed + counts.unhealthy + counts.drain_deadline + counts.idle);
            }
        } else {
            self.pending.push(job);
        }
    }

    /// Spread resets for the daemon to pace (see [`run_spread_reset`]).
    pub fn take_pending_resets(&mut self) -> Vec<ResetJob> {
        std::mem::take(&mut self.pending)
    }

    /// Sends both RSTs of every TCP flow not already over and removes all
    /// the flows' entries. Counts TCP flows reset into `counts`.
    fn reset_now(&mut self, flows: &[Flow], cause: ResetCause, counts: &mut ResetCounts) {
        let mut keys = Vec::with_capacity(flows.len() * 2);
        let mut rsts = Vec::with_capacity(flows.len() * 2);
        let mut reset = 0u64;
        for f in flows {
            keys.push(f.key);
            keys.push(f.reverse_key);
            if f.is_tcp() && TableView::is_active(f) {
                rsts.push(f.client_rst());
                if !f.is_dsr() {
                    rsts.push(f.backend_rst());
                }
                reset += 1;
                self.backend_resets.entry(f.fwd.backend_id).or_default().add(cause, 1);
            }
        }
        if let Some(tx) = &self.rst {
            let (failed, err) = tx.send_all(&rsts);
            if failed > 0 {
                self.rst_send_errors += failed as u64;
                tracing::warn!(failed, error = ?err, "some RSTs could not be sent");
            }
            if !rsts.is_empty() {
                self.last_rst_sent = Some(Instant::now());
            }
        }
        if let Err(e) = self.dp.flows_delete(&keys) {
            tracing::warn!(error = %e, "removing reset flows from the table failed");
        }
        let reason = match cause {
            ResetCause::Removed => end_reason::REMOVED,
            ResetCause::Unhealthy => end_reason::UNHEALTHY,
            ResetCause::DrainDeadline => end_reason::DRAIN_DEADLINE,
            ResetCause::Idle => end_reason::IDLE,
        };
        self.log_flows(flows, reason);
        counts.add(cause, reset);
    }

    /// Resets part of a spread job (called by [`run_spread_reset`]).
    fn reset_chunk(&mut self, job: &ResetJob, range: std::ops::Range<usize>) {
        let mut counts = ResetCounts::default();
        self.reset_now(&job.flows[range], job.cause, &mut counts);
        if let Some(svc) = self.services.get_mut(&job.service) {
            svc.resets.add(job.cause, counts.removed + counts.unhealthy + counts.drain_deadline + counts.idle);
        }
    }

    // ---- health ----

    /// The backends that need a health checker, with their check.
    pub fn health_targets(&self) -> Vec<HealthTarget> {
        self.services
            .values()
            .filter_map(|s| s.settings.health.as_ref().map(|h| (s, h)))
            .flat_map(|(s, h)| s.backends.values().map(move |b| HealthTarget { backend_id: b.id, addr: b.addr, check: h.clone() }))
            .collect()
    }

    /// Records a probe result; on a state change applies the service's
    /// `on_unhealthy` policy (or brings the backend back).
    pub fn health_result(&mut self, backend_id: u32, result: std::result::Result<(), String>) -> Result<()> {
        let Some((sid, addr)) = self
            .services
            .iter()
            .find_map(|(sid, s)| s.backends.values().find(|b| b.id == backend_id).map(|b| (*sid, b.addr)))
        else {
            return Ok(()); // removed meanwhile
        };
        let Some(svc) = self.services.get_mut(&sid) else { return Ok(()) };
        let Some(h) = svc.settings.health.clone() else { return Ok(()) };
        let policy = svc.settings.on_unhealthy;
        let spread = svc.settings.reset_spread.0;
        let Some(slot) = svc.backends.get_mut(&addr) else { return Ok(()) };
        let err = result.as_ref().err().cloned();
        let Some(healthy) = slot.health.record(result, h.rise, h.fall) else { return Ok(()) };
        if healthy {
            slot.drain = None;
            slot.up_since = Instant::now();
            tracing::info!(service = %sid, backend = %addr, "backend is healthy again: up");
        } else {
            slot.drain = match policy {
                FlowPolicy::Reset => None,
                FlowPolicy::Drain(d) => Some(Drain { deadline: Some(Instant::now() + d) }),
                FlowPolicy::Keep => Some(Drain { deadline: None }),
            };
            tracing::warn!(service = %sid, backend = %addr, error = err.as_deref().unwrap_or(""), policy = %policy, "backend failed its health check: down");
        }
        let service_id = svc.id;
        let id = slot.id;
        self.dirty = true;
        self.rebuild_ring(sid)?;
        if let Some(slot) = self.services.get(&sid).and_then(|s| s.backends.get(&addr)) {
            let b = slot.entry(service_id, slot.dp_state());
            self.dp.backend_set(id, b)?;
        }
        if !healthy && policy == FlowPolicy::Reset {
            let flows = self.flows_of(id)?;
            self.queue_reset(ResetJob { service: sid, backend: addr, cause: ResetCause::Unhealthy, flows, spread });
        }
        Ok(())
    }

    // ---- periodic upkeep ----

    /// Drain deadlines, and freeing deregistered backends whose flows have
    /// ended. Walks the table only when some backend needs it.
    pub fn tick(&mut self, now: Instant) -> Result<()> {
        // Slow start: rings follow the ramping weights (rebuilt only when a
        // step changes, which `rebuild_ring` notices).
        let ramping: Vec<ServiceId> = self
            .services
            .iter()
            .filter(|(_, s)| {
                let ramp = s.settings.slow_start.0;
                !ramp.is_zero() && s.backends.values().any(|b| now.saturating_duration_since(b.up_since) < ramp + Duration::from_millis(500))
            })
            .map(|(sid, _)| *sid)
            .collect();
        for sid in ramping {
            self.rebuild_ring(sid)?;
        }
        let needs_walk = self.services.values().any(|s| !s.leaving.is_empty() || s.backends.values().any(|b| b.drain.is_some()));
        if !needs_walk {
            return Ok(());
        }
        let view = self.table()?;
        let mut active: HashMap<u32, usize> = HashMap::new();
        let mut by_backend: HashMap<u32, Vec<Flow>> = HashMap::new();
        for f in view.flows {
            if TableView::is_active(&f) {
                *active.entry(f.fwd.backend_id).or_default() += 1;
            }
            by_backend.entry(f.fwd.backend_id).or_default().push(f);
        }
        let sids: Vec<ServiceId> = self.services.keys().copied().collect();
        for sid in sids {
            let Some(svc) = self.services.get_mut(&sid) else { continue };
            let spread = svc.settings.reset_spread.0;
            let service_id = svc.id;
            let mut jobs = Vec::new();
            let mut writes = Vec::new();
            for slot in svc.backends.values_mut().chain(svc.leaving.iter_mut()) {
                let Some(drain) = &slot.drain else { continue };
                let n = active.get(&slot.id).copied().unwrap_or(0);
                let expired = drain.deadline.is_some_and(|d| now >= d);
                if expired || n == 0 {
                    self.dirty = true;
                    // Over: the rest (if any) is reset, the backend stops
                    // forwarding (down if unhealthy, removed if deregistered).
                    slot.drain = None;
                    writes.push((slot.id, slot.entry(service_id, slot.dp_state())));
                    if expired && n > 0 {
                        let flows = by_backend.remove(&slot.id).unwrap_or_default();
                        tracing::info!(service = %sid, backend = %slot.addr, flows = n, "drain deadline reached: resetting the remaining flows");
                        jobs.push(ResetJob { service: sid, backend: slot.addr, cause: ResetCause::DrainDeadline, flows, spread });
                    }
                }
            }
            for (id, b) in writes {
                self.dp.backend_set(id, b)?;
            }
            for j in jobs {
                self.queue_reset(j);
            }
            // Deregistered backends with no active flow left are freed.
            let Some(svc) = self.services.get_mut(&sid) else { continue };
            let (done, keep): (Vec<BackendSlot>, Vec<BackendSlot>) = std::mem::take(&mut svc.leaving)
                .into_iter()
                .partition(|b| b.drain.is_none() && active.get(&b.id).copied().unwrap_or(0) == 0 && !self.pending.iter().any(|j| j.backend == b.addr && j.service == sid));
            svc.leaving = keep;
            for slot in done {
                self.free_backend(&slot)?;
            }
        }
        Ok(())
    }

    // ---- idle expiry ----

    /// What an expiry walk needs to know, taken quickly under the lock.
    pub fn expiry_input(&self) -> ExpiryInput {
        ExpiryInput {
            settings: self.services.iter().map(|(sid, s)| (s.id, (*sid, s.settings.clone()))).collect(),
            backend_ids: self.used_backend_ids.iter().copied().collect(),
        }
    }

    /// Applies a plan made by [`plan_expiry`].
    pub fn expire_apply(&mut self, plan: ExpiryPlan) -> Result<usize> {
        let ExpiryPlan { settings, backend_ids, active, by_service, orphans, stale_ports } = plan;
        for id in backend_ids {
            if self.used_backend_ids.contains(&id) {
                self.dp.backend_active_set(id, active.get(&id).copied().unwrap_or(0))?;
            }
        }
        let mut total = 0;
        for (service_id, (reset, forget)) in by_service {
            let Some((sid, _)) = settings.get(&service_id) else { continue };
            let mut counts = ResetCounts::default();
            self.reset_now(&reset, ResetCause::Idle, &mut counts);
            let keys: Vec<FlowKey> = forget.iter().flat_map(|f| [f.key, f.reverse_key]).collect();
            self.dp.flows_delete(&keys)?;
            let (idle, done): (Vec<Flow>, Vec<Flow>) = forget.into_iter().partition(TableView::is_active);
            self.log_flows(&idle, end_reason::IDLE);
            self.log_flows(&done, end_reason::FIN);
            let forget_len = idle.len() + done.len();
            let n = reset.len() + forget_len;
            total += n;
            if let Some(svc) = self.services.get_mut(sid) {
                svc.resets.idle += counts.idle;
                svc.resets.expired += n as u64;
            }
        }
        if !orphans.is_empty() {
            self.dp.flows_delete(&orphans)?;
        }
        let mut stale = Vec::new();
        for k in stale_ports {
            if !self.dp.port_in_use(&k)? {
                stale.push(k);
            }
        }
        if !stale.is_empty() {
            let n = self.dp.ports_release(&stale)?;
            tracing::debug!(ports = n, "gave back full-NAT ports of evicted flows");
        }
        if total > 0 {
            tracing::debug!(flows = total, orphans = orphans.len(), "expired idle flows");
        }
        Ok(total)
    }

    // ---- saved state (restarts) ----

    /// The whole model, for the state file.
    pub fn snapshot(&self) -> SavedState {
        let now = Instant::now();
        let save = |b: &BackendSlot| SavedBackend {
            backend: b.addr,
            id: b.id,
            weight: b.weight,
            registered: b.registered,
            healthy: b.health.healthy,
            draining: b.drain.is_some(),
            drain_remaining_ms: b.drain.as_ref().and_then(|d| d.deadline).map(|d| d.saturating_duration_since(now).as_millis() as u64),
        };
        SavedState {
            version: SavedState::VERSION,
            interfaces: self.dp.attachments(),
            services: self
                .services
                .iter()
                .map(|(sid, svc)| SavedService {
                    service: sid.addr,
                    proto: sid.proto,
                    id: svc.id,
                    settings: svc.settings.clone(),
                    resets: svc.resets,
                    backends: svc.backends.values().chain(svc.leaving.iter()).map(save).collect(),
                    named: svc
                        .named
                        .iter()
                        .map(|(name, n)| SavedNamed { name: name.clone(), weight: n.weight, addrs: n.addrs.iter().copied().collect() })
                        .collect(),
                })
                .collect(),
            host_changes: self.host_changes.clone(),
            managed_neighbours: self.managed_neighbours.clone(),
        }
    }

    /// Rebuilds the model saved by [`Controller::snapshot`] on a data plane
    /// whose maps were taken over from pins, and rewrites the configuration
    /// maps from it (the same values: the flows keep their backends).
    pub fn restore(&mut self, state: &SavedState) -> Result<()> {
        if state.version != SavedState::VERSION {
            return Err(ControllerError::BadRequest(format!(
                "state file version {} is not {}: written by another xlb",
                state.version,
                SavedState::VERSION
            )));
        }
        let now = Instant::now();
        crate::host::sysctl::merge(&mut self.host_changes, state.host_changes.clone());
        self.managed_neighbours.extend(state.managed_neighbours.iter().cloned());
        for s in &state.services {
            let sid = ServiceId { addr: s.service, proto: s.proto };
            if s.id >= MAX_SERVICES || !self.used_service_ids.insert(s.id) || self.services.contains_key(&sid) {
                return Err(ControllerError::BadRequest(format!("state file: service {sid} has a bad or duplicate id {}", s.id)));
            }
            let mut svc = Service {
                id: s.id,
                ring: Vec::new(),
                settings: s.settings.clone(),
                backends: BTreeMap::new(),
                leaving: Vec::new(),
                resets: s.resets,
                // Asked again at once: the state file is no DNS cache.
                named: s
                    .named
                    .iter()
                    .map(|n| (n.name.clone(), NamedBackend::due(n.weight, n.addrs.iter().copied().collect(), now)))
                    .collect(),
            };
            for b in &s.backends {
                if b.id >= MAX_BACKENDS || !self.used_backend_ids.insert(b.id) {
                    return Err(ControllerError::BadRequest(format!("state file: backend {} has a bad or duplicate id {}", b.backend, b.id)));
                }
                let health = Tracker { healthy: b.healthy, ..Tracker::default() };
                let drain = b.draining.then(|| Drain { deadline: b.drain_remaining_ms.map(|ms| now + Duration::from_millis(ms)) });
                let snat = snat_source(&svc.settings, b.backend.ip())?;
                let slot = BackendSlot { id: b.id, addr: b.backend, snat, weight: b.weight, registered: b.registered, health, drain, up_since: now.checked_sub(svc.settings.slow_start.0).unwrap_or(now) };
                self.next_backend_id = self.next_backend_id.max((b.id + 1) % MAX_BACKENDS);
                if b.registered {
                    svc.backends.insert(b.backend, slot);
                } else {
                    svc.leaving.push(slot);
                }
            }
            self.services.insert(sid, svc);
        }
        // Address roles, backend slots, service entries and rings.
        let sids: Vec<ServiceId> = self.services.keys().copied().collect();
        for sid in sids {
            self.addr_ref(sid.addr.ip(), 1, 0)?;
            let addrs: Vec<IpAddr> = self.services[&sid].backends.values().chain(self.services[&sid].leaving.iter()).map(|b| b.addr.ip()).collect();
            for a in addrs {
                self.addr_ref(a, 0, 1)?;
            }
            if let Some(svc) = self.services.get(&sid) {
                self.dp.service_set(Self::service_key(&sid), Self::service_entry(svc))?;
            }
            self.sync_backends(sid)?;
        }
        tracing::info!(services = self.services.len(), "restored the saved state");
        Ok(())
    }

    // ---- reports ----

    pub fn status(&self) -> Result<Status> {
        let view = self.table()?;
        let mut active_by_backend: HashMap<u32, u64> = HashMap::new();
        for f in &view.flows {
            if TableView::is_active(f) {
                *active_by_backend.entry(f.fwd.backend_id).or_default() += 1;
            }
        }
        let raw = self.dp.global_counters()?;
        let mut counters: BTreeMap<String, u64> = stats::LABELS
            .iter()
            .map(|(i, label)| (label.to_string(), raw.get(*i as usize).copied().unwrap_or(0)))
            .collect();
        counters.insert("rst_send_errors".into(), self.rst_send_errors);
        if let Some(l) = &self.flow_log {
            counters.insert("flow_log_written".into(), l.written);
            counters.insert("flow_log_write_errors".into(), l.write_errors);
        }
        // The kernel's LRU does not report evictions: what was created and
        // is neither removed (by the program or the controller) nor present
        // was evicted. Exact while this daemon has run since the data plane
        // was loaded; a restart loses the controller's share of removals.
        // (Counted in the same walk as the flows above.)
        let (entries, half_open) = view.entries;
        let created = counters.get("entries_created").copied().unwrap_or(0);
        let removed = counters.get("entries_removed").copied().unwrap_or(0) + self.dp.entries_deleted() + entries + half_open;
        counters.insert("table_evictions".into(), created.saturating_sub(removed));
        let now = Instant::now();
        let ports = if self.services.values().any(|s| s.settings.mode == NatMode::Fullnat) { self.dp.ports_in_use()? } else { HashMap::new() };
        let mut services = Vec::new();
        for (sid, svc) in &self.services {
            let mut backends = Vec::new();
            let mut active_total = 0;
            for slot in svc.backends.values().chain(svc.leaving.iter()) {
                let active = active_by_backend.get(&slot.id).copied().unwrap_or(0);
                active_total += active;
                backends.push(BackendStatus {
                    backend: slot.addr,
                    id: slot.id,
                    weight: slot.weight,
                    state: slot.state_name().into(),
                    registered: slot.registered,
                    healthy: slot.health.healthy,
                    last_health_error: slot.health.last_error.clone(),
                    resets: self.backend_resets.get(&slot.id).copied().unwrap_or_default(),
                    drain_remaining_s: slot
                        .drain
                        .as_ref()
                        .and_then(|d| d.deadline)
                        .map(|d| d.saturating_duration_since(now).as_secs_f64()),
                    snat_ports: (svc.settings.mode == NatMode::Fullnat).then(|| crate::api::PortUse {
                        in_use: ports.get(&(addr_from_ip(slot.addr.ip()), be_port(slot.addr.port()))).copied().unwrap_or(0),
                        pool: svc.settings.snat_ports.len() as u64,
                    }),
                    active_flows: active,
                    traffic: self.dp.backend_counters(slot.id)?.into(),
                });
            }
            services.push(ServiceStatus {
                service: sid.addr,
                proto: sid.proto,
                id: svc.id,
                scheduler: svc.settings.scheduler.to_string(),
                settings: svc.settings.clone(),
                active_flows: active_total,
                resets: svc.resets,
                traffic: Traffic::from(self.dp.service_counters(svc.id)?),
                backends,
                named_backends: svc
                    .named
                    .iter()
                    .map(|(name, n)| crate::api::NamedStatus {
                        backend: name.to_string(),
                        weight: n.weight,
                        addresses: n.addrs.iter().map(|a| SocketAddr::new(*a, name.port)).collect(),
                        ttl_s: n.ttl.as_secs_f64(),
                        next_lookup_s: n.next_resolve.saturating_duration_since(now).as_secs_f64(),
                        last_error: n.last_error.clone(),
                    })
                    .collect(),
            });
        }
        Ok(Status {
            sync: self.sync.as_ref().map(|s| s.status.clone()),
            interfaces: self.dp.attachments(),
            table: {
                TableStatus {
                    entries,
                    capacity_flows: self.dp.conn_capacity() as u64,
                    half_open_entries: half_open,
                    half_open_capacity_flows: self.dp.half_open_capacity() as u64,
                }
            },
            counters,
            services,
        })
    }

    pub fn flows(&self, filter: Option<ServiceId>) -> Result<Vec<FlowInfo>> {
        let view = self.table()?;
        let now = monotonic_ns();
        let mut out = Vec::new();
        for f in view.flows {
            let (k, v) = (f.key, f.fwd);
            let Some(proto) = Proto::from_number(k.proto) else { continue };
            let service = SocketAddr::new(addr_to_ip(&k.dst_addr), port_from(k.dst_port));
            if filter.is_some_and(|s| s.addr != service || s.proto != proto) {
                continue;
            }
            let state = match proto {
                Proto::Udp => "none",
                Proto::Tcp => tcp::state_name(TableView::combined_state(&f)),
            };
            let secs = |t: u64| now.saturating_sub(t) as f64 / 1e9;
            out.push(FlowInfo {
                client: SocketAddr::new(addr_to_ip(&k.src_addr), port_from(k.src_port)),
                service,
                proto,
                backend: SocketAddr::new(addr_to_ip(&v.nat_dst), port_from(v.nat_dport)),
                snat: (v.nat_flags & NAT_FULL != 0).then(|| SocketAddr::new(addr_to_ip(&v.nat_src), port_from(v.nat_sport))),
                state: state.into(),
                age_s: secs(v.created_ns),
                idle_s: secs(v.last_seen_ns),
            });
        }
        out.sort_by_key(|f| (f.service, f.client));
        Ok(out)
    }
}

/// Settings and backends an expiry walk is judged against.
pub struct ExpiryInput {
    settings: HashMap<u32, (ServiceId, ServiceSettings)>,
    backend_ids: Vec<u32>,
}

/// What an expiry walk decided: flows to reset or forget per service,
/// orphan entries, and the active flows per backend.
pub struct ExpiryPlan {
    settings: HashMap<u32, (ServiceId, ServiceSettings)>,
    backend_ids: Vec<u32>,
    active: HashMap<u32, u64>,
    by_service: HashMap<u32, (Vec<Flow>, Vec<Flow>)>,
    orphans: Vec<FlowKey>,
    /// Full-NAT ports no flow in the walk held.
    stale_ports: Vec<FlowKey>,
}

/// Both tables walked through `walk`: forward entries in order, reverse
/// entries by key.
type Directions = (Vec<(FlowKey, FlowEntry)>, HashMap<FlowKey, FlowEntry>);

fn split_directions(walk: impl FnOnce(&mut dyn FnMut(&FlowKey, &FlowEntry)) -> std::result::Result<(), DataplaneError>) -> Result<Directions> {
    let mut forward: Vec<(FlowKey, FlowEntry)> = Vec::new();
    let mut reverse: HashMap<FlowKey, FlowEntry> = HashMap::new();
    walk(&mut |k: &FlowKey, v: &FlowEntry| {
        if v.direction == DIR_TO_BACKEND {
            forward.push((*k, *v));
        } else {
            reverse.insert(*k, *v);
        }
    })?;
    Ok((forward, reverse))
}

/// Walks the tables (through `walk`, which may use its own map handles so
/// the controller stays free meanwhile) and decides what expires.
pub fn plan_expiry(
    walk: impl FnOnce(&mut dyn FnMut(&FlowKey, &FlowEntry)) -> std::result::Result<(), DataplaneError>,
    walk_ports: impl FnOnce(&mut dyn FnMut(&FlowKey, u64)) -> std::result::Result<(), DataplaneError>,
    input: ExpiryInput,
) -> Result<ExpiryPlan> {
    let ExpiryInput { settings, backend_ids } = input;
    let now = monotonic_ns();
    let (forward, mut reverse) = split_directions(walk)?;
    // Full-NAT ports whose flow is gone from both tables (evicted: nobody
    // saw it go) past the grace period of a flow being created; confirmed
    // one by one before they are given back (`expire_apply`).
    let mut stale_ports: Vec<FlowKey> = Vec::new();
    walk_ports(&mut |k: &FlowKey, allocated_ns: u64| {
        if now.saturating_sub(allocated_ns) > PORTS_GRACE_NS && !reverse.contains_key(k) {
            stale_ports.push(*k);
        }
    })?;
    // Exact active-flow counts for least-connections, from this walk.
    let mut active: HashMap<u32, u64> = HashMap::new();
    for (key, fwd) in &forward {
        let rkey = reverse_key(key, fwd);
        let f = Flow { key: *key, fwd: *fwd, reverse_key: rkey, rev: reverse.get(&rkey).copied() };
        if TableView::is_active(&f) {
            *active.entry(fwd.backend_id).or_default() += 1;
        }
    }
    let mut by_service: HashMap<u32, (Vec<Flow>, Vec<Flow>)> = HashMap::new(); // (reset, forget)
    let mut orphans: Vec<FlowKey> = Vec::new();
    for (key, fwd) in forward {
        let reverse_key = reverse_key(&key, &fwd);
        let rev = reverse.remove(&reverse_key);
        let flow = Flow { key, fwd, reverse_key, rev };
        let Some((_, st)) = settings.get(&fwd.service_id) else {
            orphans.extend([key, reverse_key]);
            continue;
        };
        let last = rev.map_or(fwd.last_seen_ns, |r| r.last_seen_ns.max(fwd.last_seen_ns));
        let idle = Duration::from_nanos(now.saturating_sub(last));
        let active = TableView::is_active(&flow);
        let limit = if !active {
            CLOSED_LINGER
        } else if !flow.is_tcp() {
            st.timeouts.udp.0
        } else {
            match TableView::combined_state(&flow) {
                tcp::STATE_SYN | tcp::STATE_NONE => st.timeouts.syn.0,
                tcp::STATE_FIN => st.timeouts.closing.0,
                _ => st.timeouts.established.0,
            }
        };
        if idle <= limit {
            continue;
        }
        let e = by_service.entry(fwd.service_id).or_default();
        if active && flow.is_tcp() && st.reset_on_idle {
            e.0.push(flow);
        } else {
            e.1.push(flow);
        }
    }
    // Reverse entries whose forward entry is gone (evicted) go once idle
    // past the established timeout.
    for (k, v) in reverse {
        let limit = settings.get(&v.service_id).map_or(Duration::ZERO, |(_, st)| st.timeouts.established.0);
        if Duration::from_nanos(now.saturating_sub(v.last_seen_ns)) > limit {
            orphans.push(k);
        }
    }
    Ok(ExpiryPlan { settings, backend_ids, active, by_service, orphans, stale_ports })
}

/// Every live flow of the tables as sync records (for a refresh), walked
/// through `walk` (which may use its own map handles).
pub fn live_flows(walk: impl FnOnce(&mut dyn FnMut(&FlowKey, &FlowEntry)) -> std::result::Result<(), DataplaneError>) -> Result<Vec<crate::ha::Record>> {
    let now = monotonic_ns();
    let (forward, reverse) = split_directions(walk)?;
    Ok(forward
        .into_iter()
        .map(|(key, fwd)| {
            let rev = reverse.get(&fwd.peer_key(key.proto)).copied();
            let last = rev.map_or(fwd.last_seen_ns, |r| r.last_seen_ns.max(fwd.last_seen_ns));
            crate::ha::Record {
                kind: crate::ha::Kind::Live,
                idle: Duration::from_nanos(now.saturating_sub(last)),
                flow: lb_common::maps::FlowEnd { key, reason: end_reason::NEW, _pad: 0, to_backend: fwd, to_client: rev.unwrap_or_default() },
            }
        })
        .collect())
}

/// Paces a spread reset: flow `i` of `n` is reset at `i/n` of the window.
pub async fn run_spread_reset(ctl: Arc<tokio::sync::Mutex<Controller>>, job: ResetJob) {
    let n = job.flows.len();
    let start = tokio::time::Instant::now();
    tracing::info!(backend = %job.backend, flows = n, spread = ?job.spread, "spreading resets");
    let mut done = 0;
    while done < n {
        let elapsed = start.elapsed();
        let due = if elapsed >= job.spread { n } else { ((n as u128 * elapsed.as_nanos()) / job.spread.as_nanos()) as usize + 1 };
        let due = due.min(n);
        if due > done {
            ctl.lock().await.reset_chunk(&job, done..due);
            done = due;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
