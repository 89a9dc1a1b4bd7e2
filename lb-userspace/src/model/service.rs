//! A service: its settings, its backends (registered, and deregistered
//! ones still holding flows), backends given by name, and the scheduling
//! ring its settings and backends call for.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use lb_common::{
    maps::{
        RING_SLOTS, SCHED_LEAST_CONN, SCHED_MAGLEV, SCHED_WRR, SVC_F_DSR, SVC_F_FULLNAT, SVC_F_MISS_REHASH, SVC_F_NO_PORT_DROP, SVC_F_SHARED_BACKENDS,
        SVC_F_STATELESS_SYN, ServiceEntry,
    },
    sched,
};

use super::{
    BackendSlot, HostPort, NamedBackend, ResetCounts,
    settings::{MissPolicy, NatMode, NoPortPolicy, Scheduler, ServiceSettings},
};

#[derive(Clone, Debug)]
pub struct Service {
    /// Index of the per-service maps (ring, counters, cursor).
    pub id: u32,
    /// The ring as written to the data plane.
    pub ring: Vec<u32>,
    pub settings: ServiceSettings,
    pub backends: BTreeMap<SocketAddr, BackendSlot>,
    /// Deregistered backends that still have flows (drain and keep
    /// policies, or resets under way).
    pub leaving: Vec<BackendSlot>,
    pub resets: ResetCounts,
    /// Backends given by DNS name, and the addresses each one registered.
    pub named: BTreeMap<HostPort, NamedBackend>,
    /// Traffic of backends freed since (the data plane counts packets per
    /// backend; a service's are its backends', these included).
    pub freed_traffic: lb_common::maps::TrafficCounters,
    /// One of its backend endpoints also serves another service (set by
    /// the controller from the endpoints).
    pub shared_backends: bool,
}

impl Service {
    pub fn new(id: u32, settings: ServiceSettings) -> Service {
        Service {
            id,
            ring: Vec::new(),
            settings,
            backends: BTreeMap::new(),
            leaving: Vec::new(),
            resets: ResetCounts::default(),
            named: BTreeMap::new(),
            freed_traffic: Default::default(),
            shared_backends: false,
        }
    }

    /// Every backend slot: registered ones, then leaving ones.
    pub fn slots(&self) -> impl Iterator<Item = &BackendSlot> {
        self.backends.values().chain(self.leaving.iter())
    }

    pub fn slots_mut(&mut self) -> impl Iterator<Item = &mut BackendSlot> {
        self.backends.values_mut().chain(self.leaving.iter_mut())
    }

    /// The slot with backend id `id`, registered or leaving.
    pub fn slot_by_id(&self, id: u32) -> Option<&BackendSlot> {
        self.slots().find(|b| b.id == id)
    }

    pub fn slot_by_id_mut(&mut self, id: u32) -> Option<&mut BackendSlot> {
        self.slots_mut().find(|b| b.id == id)
    }

    /// Whether `addr` was registered by one of the service's names.
    pub fn owned_by_name(&self, addr: SocketAddr) -> bool {
        self.named.iter().any(|(name, n)| name.port == addr.port() && n.addrs.contains(&addr.ip()))
    }

    /// The ring the service calls for now: its backends that take new
    /// flows, weighted (slow start ramps the weights).
    pub fn wanted_ring(&self, now: Instant) -> Vec<u32> {
        let ramp = self.settings.slow_start.0;
        let live = self.backends.values().filter(|b| b.takes_new_flows());
        match self.settings.scheduler {
            // Least-conn samples the weighted round-robin sequence.
            Scheduler::Wrr | Scheduler::LeastConn => {
                let weights: Vec<(u32, u32)> = live.map(|b| (b.id, b.effective_weight(now, ramp))).collect();
                sched::build_wrr_ring(&weights, RING_SLOTS as usize)
            }
            Scheduler::Maglev => {
                let backends: Vec<sched::MaglevBackend> =
                    live.map(|b| sched::MaglevBackend { id: b.id, weight: b.effective_weight(now, ramp), identity: b.maglev_identity() }).collect();
                sched::build_maglev(&backends, self.settings.maglev_size as usize)
            }
        }
    }

    /// Whether a backend is still ramping up its weight (its ring changes
    /// with time).
    pub fn ramping(&self, now: Instant) -> bool {
        let ramp = self.settings.slow_start.0;
        !ramp.is_zero() && self.backends.values().any(|b| now.saturating_duration_since(b.up_since) < ramp + Duration::from_millis(500))
    }

    /// A backend's data-plane entry (with the service's MSS clamp).
    pub fn backend_entry(&self, b: &BackendSlot) -> lb_common::maps::Backend {
        b.entry(self.id, self.settings.mss_clamp)
    }

    /// The service's data-plane entry (with the ring as written).
    pub fn entry(&self) -> ServiceEntry {
        let s = &self.settings;
        ServiceEntry {
            id: self.id,
            ring_len: self.ring.len() as u32,
            scheduler: match s.scheduler {
                Scheduler::Maglev => SCHED_MAGLEV,
                Scheduler::Wrr => SCHED_WRR,
                Scheduler::LeastConn => SCHED_LEAST_CONN,
            },
            flags: if s.on_miss == MissPolicy::Rehash { SVC_F_MISS_REHASH } else { 0 }
                | if s.mode == NatMode::Fullnat { SVC_F_FULLNAT } else { 0 }
                | if s.on_no_port == NoPortPolicy::Drop { SVC_F_NO_PORT_DROP } else { 0 }
                | if s.mode == NatMode::Dsr { SVC_F_DSR } else { 0 }
                // SYNs without state where a hash schedules them: Maglev,
                // not full NAT (a port is state), backends of its own.
                | if s.scheduler == Scheduler::Maglev && s.mode != NatMode::Fullnat && !self.shared_backends { SVC_F_STATELESS_SYN } else { 0 }
                | if self.shared_backends { SVC_F_SHARED_BACKENDS } else { 0 },
            _pad: 0,
            syn_timeout_s: s.timeouts.syn.0.as_secs() as u32,
            established_timeout_s: s.timeouts.established.0.as_secs() as u32,
            closing_timeout_s: s.timeouts.closing.0.as_secs() as u32,
            udp_timeout_s: s.timeouts.udp.0.as_secs() as u32,
            snat_port_lo: s.snat_ports.0,
            snat_port_hi: s.snat_ports.1,
        }
    }
}
