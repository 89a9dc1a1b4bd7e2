//! The service model the operator manages (services and their backends) and
//! its translation into data-plane maps. Every API request and the config
//! file go through here, so validation is the same everywhere, and every
//! operation validates fully before it changes anything.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use lb_common::{
    maps::{
        Backend, FlowKey, ServiceEntry, ServiceKey, ADDR_BACKEND, ADDR_VIP, BACKEND_REMOVED,
        BACKEND_UNUSED, BACKEND_UP, DIR_TO_BACKEND, DIR_TO_CLIENT, MAX_BACKENDS, MAX_SERVICES,
        RING_SLOTS, SCHED_WRR,
    },
    sched, stats, tcp,
};
use thiserror::Error;

use crate::{
    api::{BackendStatus, ErrorCode, FlowInfo, Proto, ServiceStatus, Status, TableStatus, Traffic},
    dataplane::{Dataplane, DataplaneError},
};

/// Default flow idle timeouts, in seconds (enforced by a later expiry pass;
/// stored per service now so the layout does not change).
pub const DEFAULT_TIMEOUTS: Timeouts = Timeouts { syn: 30, established: 350, closing: 30, udp: 120 };
pub const MAX_WEIGHT: u32 = 10_000;

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub syn: u32,
    pub established: u32,
    pub closing: u32,
    pub udp: u32,
}

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
    pub addr: SocketAddrV4,
    pub proto: Proto,
}

impl std::fmt::Display for ServiceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.proto)
    }
}

struct BackendSlot {
    id: u32,
    weight: u32,
}

struct Service {
    id: u32,
    ring: Vec<u32>,
    backends: BTreeMap<SocketAddrV4, BackendSlot>,
}

pub struct Controller {
    dp: Dataplane,
    services: BTreeMap<ServiceId, Service>,
    /// Address → (services on it, backends on it): the `XLB_ADDRS` bits.
    addr_refs: HashMap<Ipv4Addr, (u32, u32)>,
    used_service_ids: HashSet<u32>,
    used_backend_ids: HashSet<u32>,
    /// Backend ids are handed out round robin so a just-freed id (whose
    /// flows were only just deleted) is the last to be reused.
    next_backend_id: u32,
}

fn be_addr(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}
fn be_port(p: u16) -> u16 {
    u16::from_ne_bytes(p.to_be_bytes())
}
fn addr_from(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a.to_ne_bytes())
}
fn port_from(p: u16) -> u16 {
    u16::from_be_bytes(p.to_ne_bytes())
}

fn check_unicast(what: &str, a: SocketAddrV4) -> Result<()> {
    let ip = a.ip();
    if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() || ip.is_loopback() {
        return Err(ControllerError::BadRequest(format!(
            "{what} {a}: address must be a unicast, non-loopback IPv4 address"
        )));
    }
    if a.port() == 0 {
        return Err(ControllerError::BadRequest(format!("{what} {a}: port must be 1-65535")));
    }
    Ok(())
}

/// Key of the backend → client entry belonging to a client → VIP entry.
fn reverse_key(k: &FlowKey, v: &lb_common::maps::FlowEntry) -> FlowKey {
    FlowKey { src_addr: v.nat_addr, dst_addr: k.src_addr, src_port: v.nat_port, dst_port: k.src_port, proto: k.proto, _pad: [0; 3] }
}

/// Seconds on the clock `bpf_ktime_get_coarse_ns` uses (CLOCK_MONOTONIC).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
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
        }
    }

    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    /// Finds the service for `addr`, with or without a protocol.
    pub fn resolve(&self, addr: SocketAddrV4, proto: Option<Proto>) -> Result<ServiceId> {
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
        ServiceKey { addr: be_addr(*id.addr.ip()), port: be_port(id.addr.port()), proto: id.proto.number(), _pad: 0 }
    }

    fn service_entry(svc: &Service) -> ServiceEntry {
        ServiceEntry {
            id: svc.id,
            ring_len: svc.ring.len() as u32,
            scheduler: SCHED_WRR,
            flags: 0,
            _pad: 0,
            syn_timeout_s: DEFAULT_TIMEOUTS.syn,
            established_timeout_s: DEFAULT_TIMEOUTS.established,
            closing_timeout_s: DEFAULT_TIMEOUTS.closing,
            udp_timeout_s: DEFAULT_TIMEOUTS.udp,
        }
    }

    fn addr_ref(&mut self, ip: Ipv4Addr, vip: i32, backend: i32) -> Result<()> {
        let e = self.addr_refs.entry(ip).or_insert((0, 0));
        e.0 = e.0.saturating_add_signed(vip);
        e.1 = e.1.saturating_add_signed(backend);
        let flags = if e.0 > 0 { ADDR_VIP } else { 0 } | if e.1 > 0 { ADDR_BACKEND } else { 0 };
        if flags == 0 {
            self.addr_refs.remove(&ip);
        }
        self.dp.addr_set(be_addr(ip), flags)?;
        Ok(())
    }

    pub fn service_add(&mut self, addr: SocketAddrV4, proto: Proto) -> Result<ServiceId> {
        check_unicast("service", addr)?;
        let sid = ServiceId { addr, proto };
        if self.services.contains_key(&sid) {
            return Err(ControllerError::Conflict(format!("service {sid} already exists")));
        }
        let id = (0..MAX_SERVICES)
            .find(|i| !self.used_service_ids.contains(i))
            .ok_or_else(|| ControllerError::Capacity(format!("cannot add {sid}: all {MAX_SERVICES} service slots are in use")))?;
        let svc = Service { id, ring: Vec::new(), backends: BTreeMap::new() };
        self.dp.reset_traffic(Some(id), None)?;
        self.dp.service_set(Self::service_key(&sid), Self::service_entry(&svc))?;
        self.used_service_ids.insert(id);
        self.services.insert(sid, svc);
        self.addr_ref(*addr.ip(), 1, 0)?;
        tracing::info!(service = %sid, id, "service added");
        Ok(sid)
    }

    pub fn service_remove(&mut self, addr: SocketAddrV4, proto: Option<Proto>) -> Result<ServiceId> {
        let sid = self.resolve(addr, proto)?;
        // No new flows first, then the backends and their flows.
        self.dp.service_remove(&Self::service_key(&sid))?;
        let backends: Vec<SocketAddrV4> = self.services[&sid].backends.keys().copied().collect();
        for b in backends {
            self.backend_remove_resolved(sid, b)?;
        }
        if let Some(svc) = self.services.remove(&sid) {
            self.used_service_ids.remove(&svc.id);
        }
        self.addr_ref(*addr.ip(), -1, 0)?;
        tracing::info!(service = %sid, "service removed");
        Ok(sid)
    }

    pub fn backend_add(
        &mut self,
        addr: SocketAddrV4,
        proto: Option<Proto>,
        backend: SocketAddrV4,
        weight: Option<u32>,
    ) -> Result<(ServiceId, u32)> {
        check_unicast("backend", backend)?;
        let weight = weight.unwrap_or(1);
        if weight == 0 || weight > MAX_WEIGHT {
            return Err(ControllerError::BadRequest(format!("weight {weight} is out of range 1-{MAX_WEIGHT}")));
        }
        let sid = self.resolve(addr, proto)?;
        let svc = &self.services[&sid];
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
        self.dp.reset_traffic(None, Some(id))?;
        self.dp.backend_set(
            id,
            Backend {
                addr: be_addr(*backend.ip()),
                port: be_port(backend.port()),
                state: BACKEND_UP,
                _pad: 0,
                weight,
                service_id,
            },
        )?;
        self.used_backend_ids.insert(id);
        self.next_backend_id = (id + 1) % MAX_BACKENDS;
        if let Some(svc) = self.services.get_mut(&sid) {
            svc.backends.insert(backend, BackendSlot { id, weight });
        }
        self.addr_ref(*backend.ip(), 0, 1)?;
        self.rebuild_ring(sid)?;
        tracing::info!(service = %sid, %backend, id, weight, "backend added");
        Ok((sid, id))
    }

    pub fn backend_remove(
        &mut self,
        addr: SocketAddrV4,
        proto: Option<Proto>,
        backend: SocketAddrV4,
    ) -> Result<(ServiceId, usize)> {
        let sid = self.resolve(addr, proto)?;
        if !self.services[&sid].backends.contains_key(&backend) {
            return Err(ControllerError::NotFound(format!("backend {backend} is not registered on {sid}")));
        }
        let flows = self.backend_remove_resolved(sid, backend)?;
        Ok((sid, flows))
    }

    /// Takes the backend out of the ring (no new flows), marks it removed,
    /// deletes its flows, and frees its id. Returns the flows deleted.
    fn backend_remove_resolved(&mut self, sid: ServiceId, backend: SocketAddrV4) -> Result<usize> {
        let Some(slot) = self.services.get_mut(&sid).and_then(|s| s.backends.remove(&backend)) else {
            return Ok(0);
        };
        let id = slot.id;
        self.rebuild_ring(sid)?;
        let mut b = Backend { addr: be_addr(*backend.ip()), port: be_port(backend.port()), state: BACKEND_REMOVED, ..Default::default() };
        self.dp.backend_set(id, b)?;
        let deleted = self.delete_flows(|e| e.backend_id == id)?;
        b.state = BACKEND_UNUSED;
        self.dp.backend_set(id, b)?;
        self.used_backend_ids.remove(&id);
        self.addr_ref(*backend.ip(), 0, -1)?;
        tracing::info!(service = %sid, %backend, flows = deleted / 2, "backend removed");
        Ok(deleted / 2)
    }

    fn delete_flows(&mut self, pred: impl Fn(&lb_common::maps::FlowEntry) -> bool) -> Result<usize> {
        let mut keys: Vec<FlowKey> = Vec::new();
        self.dp.for_each_flow(|k, v| {
            if pred(v) {
                keys.push(*k);
            }
        })?;
        Ok(self.dp.flows_delete(&keys)?)
    }

    fn rebuild_ring(&mut self, sid: ServiceId) -> Result<()> {
        let Some(svc) = self.services.get(&sid) else { return Ok(()) };
        let weights: Vec<(u32, u32)> = svc.backends.values().map(|b| (b.id, b.weight)).collect();
        let ring = sched::build_wrr_ring(&weights, RING_SLOTS as usize);
        self.dp.ring_write(svc.id, &svc.ring, &ring)?;
        if let Some(svc) = self.services.get_mut(&sid) {
            svc.ring = ring;
            let entry = Self::service_entry(svc);
            self.dp.service_set(Self::service_key(&sid), entry)?;
        }
        Ok(())
    }

    pub fn status(&self) -> Result<Status> {
        // A flow is active until either side closes it (FIN or RST); UDP
        // flows are active while they are in the table.
        let mut forward: Vec<(FlowKey, u32, u8)> = Vec::new();
        let mut reverse_state: HashMap<FlowKey, u8> = HashMap::new();
        let mut entries = 0u64;
        self.dp.for_each_flow(|k, v| {
            entries += 1;
            if v.direction == DIR_TO_BACKEND {
                forward.push((reverse_key(k, v), v.backend_id, v.tcp_state));
            } else {
                reverse_state.insert(*k, v.tcp_state);
            }
        })?;
        let mut active_by_backend: HashMap<u32, u64> = HashMap::new();
        for (rkey, backend_id, state) in forward {
            let combined = tcp::combined_state(state, reverse_state.get(&rkey).copied().unwrap_or(tcp::STATE_NONE));
            if matches!(combined, tcp::STATE_NONE | tcp::STATE_SYN | tcp::STATE_ESTABLISHED) {
                *active_by_backend.entry(backend_id).or_default() += 1;
            }
        }
        let raw = self.dp.global_counters()?;
        let counters = stats::LABELS
            .iter()
            .map(|(i, label)| (label.to_string(), raw.get(*i as usize).copied().unwrap_or(0)))
            .collect();
        let mut services = Vec::new();
        for (sid, svc) in &self.services {
            let mut backends = Vec::new();
            let mut active_total = 0;
            for (addr, slot) in &svc.backends {
                let active = active_by_backend.get(&slot.id).copied().unwrap_or(0);
                active_total += active;
                backends.push(BackendStatus {
                    backend: *addr,
                    id: slot.id,
                    weight: slot.weight,
                    state: "up".into(),
                    active_flows: active,
                    traffic: self.dp.backend_counters(slot.id)?.into(),
                });
            }
            services.push(ServiceStatus {
                service: sid.addr,
                proto: sid.proto,
                id: svc.id,
                scheduler: "wrr".into(),
                active_flows: active_total,
                traffic: Traffic::from(self.dp.service_counters(svc.id)?),
                backends,
            });
        }
        Ok(Status {
            interfaces: self.dp.attachments(),
            table: TableStatus { entries, capacity_flows: self.dp.conn_capacity() as u64 },
            counters,
            services,
        })
    }

    pub fn flows(&self, filter: Option<ServiceId>) -> Result<Vec<FlowInfo>> {
        let mut forward = Vec::new();
        let mut reverse_state: HashMap<FlowKey, u8> = HashMap::new();
        self.dp.for_each_flow(|k, v| {
            if v.direction == DIR_TO_BACKEND {
                forward.push((*k, *v));
            } else if v.direction == DIR_TO_CLIENT {
                reverse_state.insert(*k, v.tcp_state);
            }
        })?;
        let now = monotonic_ns();
        let mut out = Vec::new();
        for (k, v) in forward {
            let Some(proto) = Proto::from_number(k.proto) else { continue };
            let service = SocketAddrV4::new(addr_from(k.dst_addr), port_from(k.dst_port));
            if let Some(f) = filter
                && (f.addr != service || f.proto != proto) {
                    continue;
                }
            let backend = SocketAddrV4::new(addr_from(v.nat_addr), port_from(v.nat_port));
            let rkey = reverse_key(&k, &v);
            let state = match proto {
                Proto::Udp => "none",
                Proto::Tcp => tcp::state_name(tcp::combined_state(
                    v.tcp_state,
                    reverse_state.get(&rkey).copied().unwrap_or(tcp::STATE_NONE),
                )),
            };
            let secs = |t: u64| now.saturating_sub(t) as f64 / 1e9;
            out.push(FlowInfo {
                client: SocketAddrV4::new(addr_from(k.src_addr), port_from(k.src_port)),
                service,
                proto,
                backend,
                state: state.into(),
                age_s: secs(v.created_ns),
                idle_s: secs(v.last_seen_ns),
            });
        }
        out.sort_by_key(|f| (f.service, f.client));
        Ok(out)
    }
}
