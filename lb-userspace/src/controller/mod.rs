//! The controller: it owns the model and the data plane's configuration
//! maps, and turns every change (an API request, a health result, a DNS
//! answer, a table snapshot, the end of a reset) into map writes in an
//! order that is always safe: maps are written before the model says a
//! change happened, and a write that fails leaves both as they were.
//!
//! It is single-threaded and never blocks on the table: walks run on the
//! table walker's thread and resets on the reset worker's (see `table`,
//! `resets`, and `daemon`, which runs the controller as an actor on its own
//! thread). Generic over the data plane so the unit tests drive it against
//! the in-memory fake.
//!
//! One concern per file: `services` (services and backends), `named`
//! (backends by DNS name), `apply` (whole configurations), `health`,
//! `upkeep` (drains, slow start, snapshots, finished resets, freeing ids),
//! `reports` (status, flows), `persist` (the state file), `sync` (the HA
//! peer).

mod apply;
mod endpoints;
mod health;
mod named;
mod persist;
mod reports;
mod services;
mod sync;
mod upkeep;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    time::Duration,
};

use lb_common::maps::{ADDR_BACKEND, ADDR_LOCAL, ADDR_VIP, FlowEnd, addr_from_ip};
use thiserror::Error;

pub use health::HealthTarget;
pub use persist::{SavedBackend, SavedNamed, SavedService, SavedState};
pub use reports::{SharedCounter, flows};
pub use sync::SyncLink;

use crate::{
    api::ErrorCode,
    dataplane::{DataPlane, DataplaneError},
    host::{neighbours::Neighbour, sysctl::Change},
    model::{Refusal, ResetCounts, Service, ServiceId, TtlLimits},
    resets, table,
};

#[derive(Debug, Error)]
pub enum ControllerError {
    #[error("{0}")]
    Refused(Refusal),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

impl From<Refusal> for ControllerError {
    fn from(r: Refusal) -> Self {
        ControllerError::Refused(r)
    }
}

impl ControllerError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ControllerError::Refused(Refusal::BadRequest(_)) => ErrorCode::BadRequest,
            ControllerError::Refused(Refusal::NotFound(_)) => ErrorCode::NotFound,
            ControllerError::Refused(Refusal::Conflict(_)) => ErrorCode::Conflict,
            ControllerError::Refused(Refusal::Ambiguous(_)) => ErrorCode::Ambiguous,
            ControllerError::Refused(Refusal::Capacity(_)) => ErrorCode::Capacity,
            ControllerError::Dataplane(_) => ErrorCode::Internal,
        }
    }
}

pub type Result<T> = std::result::Result<T, ControllerError>;

fn not_found(what: String) -> ControllerError {
    ControllerError::Refused(Refusal::NotFound(what))
}

fn bad(what: String) -> ControllerError {
    ControllerError::Refused(Refusal::BadRequest(what))
}

/// How the controller finds the balancer's source address towards a
/// backend (full NAT, DSR).
pub type SnatResolver = Box<dyn Fn(IpAddr) -> std::result::Result<IpAddr, String> + Send>;

/// Settings of backends given by DNS name.
#[derive(Clone, Copy, Debug)]
pub struct DnsSettings {
    /// A resolver exists (names are refused otherwise).
    pub enabled: bool,
    pub ttl: TtlLimits,
    /// Answers in a row that would remove every address of a name before
    /// they do.
    pub misses: u32,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings { enabled: false, ttl: TtlLimits::default(), misses: 3 }
    }
}

/// `D` defaults to the kernel's data plane (the daemon's, the benches').
pub struct Controller<D: DataPlane = crate::dataplane::KernelDataPlane> {
    dp: D,
    table: D::Table,
    services: BTreeMap<ServiceId, Service>,
    /// Address → (services on it, backends on it): the `XLB_ADDRS` bits.
    addr_refs: HashMap<IpAddr, (u32, u32)>,
    used_service_ids: HashSet<u32>,
    used_backend_ids: HashSet<u32>,
    /// Backend ids are handed out round robin, so a just-freed id is the
    /// last to be reused.
    next_backend_id: u32,
    /// Flows reset per backend id, by cause (since the id was handed out).
    backend_resets: HashMap<u32, ResetCounts>,
    /// Reset jobs waiting for the reset worker.
    jobs: Vec<resets::Job>,
    /// Services whose rings followed slow-start weights at the last tick.
    ramping: BTreeSet<ServiceId>,
    /// Test-only: leave resets to the data plane's reactive path.
    proactive_reset: bool,
    /// The latest table snapshot (reports read it; nothing walks on demand).
    snapshot: table::Snapshot,
    /// Backends of removed services, kept (with their ids) until their
    /// flows are gone: (service, its old id, the backend).
    retired: Vec<(ServiceId, u32, crate::model::BackendSlot)>,
    /// Backend ids with a reset job under way (not freed before it ends).
    resetting: HashSet<u32>,
    /// Leaving backends seen without flows by consecutive snapshots; freed
    /// at the second (a flow moving between tables during one walk can be
    /// missed by it, not by two).
    empty_streak: HashMap<u32, u32>,
    /// Records of flows the controller's decisions removed, for the flow
    /// log and the sync peer (drained by the daemon).
    outbox: Vec<FlowEnd>,
    rst_send_errors: u64,
    last_rst_sent: Option<std::time::Instant>,
    /// The model changed since the last `take_dirty` (state to save).
    dirty: bool,
    dns: DnsSettings,
    snat: SnatResolver,
    sync: Option<SyncLink>,
    /// Resolve a new backend's neighbour at once (the daemon only: tests'
    /// controllers may run where a datagram would leave the host).
    warm_neighbours: bool,
    host_changes: Vec<Change>,
    managed_neighbours: BTreeSet<Neighbour>,
    /// Counters kept elsewhere shown in `status` (the flow-log writer's).
    shared_counters: Vec<reports::SharedCounter>,
    /// The host's own addresses (`ADDR_LOCAL`).
    local_addrs: BTreeSet<IpAddr>,
    /// `XLB_ENDPOINTS` as written.
    endpoints: HashMap<lb_common::maps::EndpointKey, lb_common::maps::EndpointEntry>,
    /// The port filter as last written (`PortFilter`, 32 KiB).
    port_filter: Box<lb_common::maps::PortFilter>,
}

impl<D: DataPlane> Controller<D> {
    pub fn new(dp: D) -> Self {
        let table = dp.table();
        Controller {
            dp,
            table,
            services: BTreeMap::new(),
            addr_refs: HashMap::new(),
            used_service_ids: HashSet::new(),
            used_backend_ids: HashSet::new(),
            next_backend_id: 0,
            backend_resets: HashMap::new(),
            jobs: Vec::new(),
            ramping: BTreeSet::new(),
            proactive_reset: true,
            snapshot: table::Snapshot::default(),
            retired: Vec::new(),
            resetting: HashSet::new(),
            empty_streak: HashMap::new(),
            outbox: Vec::new(),
            rst_send_errors: 0,
            last_rst_sent: None,
            dirty: false,
            dns: DnsSettings::default(),
            snat: Box::new(crate::plan::route_source),
            sync: None,
            warm_neighbours: false,
            host_changes: Vec::new(),
            managed_neighbours: BTreeSet::new(),
            shared_counters: Vec::new(),
            local_addrs: BTreeSet::new(),
            endpoints: HashMap::new(),
            port_filter: Box::default(),
        }
    }

    /// Finds full-NAT and DSR source addresses with `f` instead of the
    /// routing table (tests).
    pub fn with_snat_resolver(mut self, f: SnatResolver) -> Self {
        self.snat = f;
        self
    }

    /// Makes the kernel resolve each new backend's next hop when it is
    /// added (one empty datagram to its discard port).
    pub fn with_neighbour_warming(mut self) -> Self {
        self.warm_neighbours = true;
        self
    }

    /// Enables backends given by DNS name.
    pub fn with_dns(mut self, dns: DnsSettings) -> Self {
        self.dns = dns;
        self
    }

    /// Test-only: skip proactive resets (the data plane still resets a
    /// flow of a gone backend on its next packet).
    pub fn set_proactive_reset(&mut self, on: bool) {
        self.proactive_reset = on;
    }

    pub fn dataplane(&mut self) -> &mut D {
        &mut self.dp
    }

    /// The connection table's handle (for the walker and the reset worker).
    pub fn table(&self) -> D::Table {
        self.table.clone()
    }

    /// Whether the model changed since the last call (the daemon then saves
    /// its state file).
    pub fn take_dirty(&mut self) -> bool {
        std::mem::replace(&mut self.dirty, false)
    }

    /// Reset jobs for the reset worker.
    pub fn take_jobs(&mut self) -> Vec<resets::Job> {
        std::mem::take(&mut self.jobs)
    }

    /// Records of flows the controller removed (flow log, sync peer).
    pub fn take_outbox(&mut self) -> Vec<FlowEnd> {
        std::mem::take(&mut self.outbox)
    }

    /// When the last proactive RST was sent, if any.
    pub fn last_rst_sent(&self) -> Option<std::time::Instant> {
        self.last_rst_sent
    }

    /// Finds the service for `addr`, with or without a protocol.
    pub fn resolve(&self, addr: std::net::SocketAddr, proto: Option<crate::model::Proto>) -> Result<ServiceId> {
        use crate::model::Proto;
        if let Some(proto) = proto {
            let id = ServiceId { addr, proto };
            return if self.services.contains_key(&id) { Ok(id) } else { Err(not_found(format!("service {id} does not exist"))) };
        }
        let found: Vec<ServiceId> =
            [Proto::Tcp, Proto::Udp].into_iter().map(|proto| ServiceId { addr, proto }).filter(|id| self.services.contains_key(id)).collect();
        match found.as_slice() {
            [one] => Ok(*one),
            [] => Err(not_found(format!("service {addr} does not exist"))),
            _ => Err(ControllerError::Refused(Refusal::Ambiguous(format!("{addr} has both a tcp and a udp service: say which with --proto")))),
        }
    }

    fn svc(&self, sid: &ServiceId) -> Result<&Service> {
        self.services.get(sid).ok_or_else(|| not_found(format!("service {sid} does not exist")))
    }

    fn svc_mut(&mut self, sid: &ServiceId) -> Result<&mut Service> {
        self.services.get_mut(sid).ok_or_else(|| not_found(format!("service {sid} does not exist")))
    }

    /// Adjusts the reference counts of `ip` as a VIP and as a backend and
    /// writes its role bits.
    fn addr_ref(&mut self, ip: IpAddr, vip: i32, backend: i32) -> Result<()> {
        let e = self.addr_refs.entry(ip).or_insert((0, 0));
        e.0 = e.0.saturating_add_signed(vip);
        e.1 = e.1.saturating_add_signed(backend);
        let (v, b) = *e;
        if v == 0 && b == 0 {
            self.addr_refs.remove(&ip);
        }
        self.write_addr(ip, v, b)
    }

    /// Writes an address's role bits (`XLB_ADDRS`; 0 removes it).
    fn write_addr(&mut self, ip: IpAddr, vips: u32, backends: u32) -> Result<()> {
        let flags =
            if vips > 0 { ADDR_VIP } else { 0 } | if backends > 0 { ADDR_BACKEND } else { 0 } | if self.local_addrs.contains(&ip) { ADDR_LOCAL } else { 0 };
        self.dp.addr_set(addr_from_ip(ip), flags)?;
        Ok(())
    }

    /// The host's own addresses: a backend's packet to one of them that
    /// belongs to no flow is the host's (a health check's answer), not a
    /// flow's whose entry was lost.
    pub fn set_local_addrs(&mut self, addrs: BTreeSet<IpAddr>) -> Result<()> {
        let changed: Vec<IpAddr> = self.local_addrs.symmetric_difference(&addrs).copied().collect();
        self.local_addrs = addrs;
        for ip in changed {
            let (v, b) = self.addr_refs.get(&ip).copied().unwrap_or((0, 0));
            self.write_addr(ip, v, b)?;
        }
        Ok(())
    }

    /// Rebuilds a service's ring from its backends and writes what changed
    /// (slots first, then the length: the data plane never reads a slot
    /// that is not written yet).
    fn rebuild_ring(&mut self, sid: ServiceId) -> Result<()> {
        self.rebuild_ring_at(sid, std::time::Instant::now())
    }

    /// As `rebuild_ring`, with slow-start weights as of `now`.
    fn rebuild_ring_at(&mut self, sid: ServiceId, now: std::time::Instant) -> Result<()> {
        let Some(svc) = self.services.get(&sid) else { return Ok(()) };
        let ring = svc.wanted_ring(now);
        if ring == svc.ring {
            return Ok(());
        }
        self.dp.ring_write(svc.id, &svc.ring, &ring)?;
        let svc = self.svc_mut(&sid)?;
        let old = std::mem::replace(&mut svc.ring, ring);
        let entry = svc.entry();
        if let Err(e) = self.dp.service_set(crate::model::service_key(&sid), entry) {
            // The length was not written: the model keeps the old ring.
            if let Some(svc) = self.services.get_mut(&sid) {
                svc.ring = old;
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// Writes a backend's data-plane entry as the model has it.
    fn write_backend(&mut self, sid: &ServiceId, id: u32) -> Result<()> {
        let svc = self.svc(sid)?;
        let Some(slot) = svc.slot_by_id(id) else { return Ok(()) };
        let entry = svc.backend_entry(slot);
        self.dp.backend_set(id, entry)?;
        Ok(())
    }

    /// Queues a reset job (or, when proactive resets are off, leaves the
    /// flows to the data plane's reactive resets).
    fn queue_reset(&mut self, mut job: resets::Job) {
        if !self.proactive_reset {
            tracing::debug!(service = %job.service, "proactive reset disabled: the data plane resets flows on their next packet");
            return;
        }
        job.backends = self.backend_refs();
        self.jobs.push(job);
    }

    /// Every backend id the data plane may still have flows of, with its
    /// addresses (flow records and RSTs name backends by address).
    pub fn backend_refs(&self) -> HashMap<u32, crate::dataplane::BackendRef> {
        let mut out = HashMap::new();
        for svc in self.services.values() {
            for b in svc.slots() {
                out.insert(b.id, crate::dataplane::BackendRef::from(&svc.backend_entry(b)));
            }
        }
        for (_, service_id, b) in &self.retired {
            out.insert(b.id, crate::dataplane::BackendRef::from(&b.entry(*service_id, 0)));
        }
        out
    }

    /// Idle timeouts and settings of every service, by service id: what a
    /// table walk judges flows by.
    pub fn walk_rules(&self) -> table::Rules {
        // Created as the walk starts, removed once it is over
        // (`on_snapshot`): an entry created meanwhile and found, one
        // removed meanwhile before the walk reached it, or one seen in
        // both tables (promoted during the walk) makes the eviction figure
        // low for one walk, never high (an alert on it is never false).
        let totals = table::EntryTotals { created: self.global_counter(lb_common::stats::ENTRIES_CREATED), removed: 0 };
        table::Rules {
            totals,
            services: self
                .services
                .iter()
                .map(|(sid, s)| (s.id, table::ServiceRules { sid: *sid, timeouts: s.settings.timeouts, reset_on_idle: s.settings.reset_on_idle }))
                .collect(),
        }
    }

    /// One of the data plane's global counters, summed over CPUs (0 if it
    /// cannot be read).
    pub(super) fn global_counter(&self, idx: u32) -> u64 {
        self.dp.global_counters().ok().and_then(|raw| raw.get(idx as usize).copied()).unwrap_or(0)
    }

    /// How often the table walker should walk: every second, or less often
    /// when the table is big (a walk never takes more than a fifth of a
    /// CPU).
    pub fn walk_interval(&self) -> Duration {
        Duration::from_secs(1).max(self.snapshot.took * 5)
    }
}

#[cfg(test)]
mod tests;
