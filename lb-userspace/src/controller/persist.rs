//! The state file: what the daemon saves so a restart (or an upgrade)
//! picks up the running data plane (the model, with the ids the maps refer
//! to), and the host settings it changed.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lb_common::maps::{MAX_BACKENDS, MAX_SERVICES};
use serde::{Deserialize, Serialize};

use super::{Controller, Result, bad};
use crate::{
    dataplane::{Attachment, DataPlane},
    host::{neighbours::Neighbour, sysctl::Change},
    model::{BackendSlot, Drain, HostPort, NamedBackend, Proto, ResetCounts, Service, ServiceId, Tracker, service_key, settings::ServiceSettings},
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedState {
    pub version: u32,
    pub interfaces: Vec<Attachment>,
    pub services: Vec<SavedService>,
    /// Backends of removed services whose flows were still being reset.
    #[serde(default)]
    pub retired: Vec<SavedRetired>,
    /// Host settings the daemon changed, with the values they replaced
    /// (undone by `--detach-on-exit` and `xlb detach`).
    #[serde(default)]
    pub host_changes: Vec<Change>,
    /// Neighbour entries the daemon made managed (removed on detach).
    #[serde(default)]
    pub managed_neighbours: BTreeSet<Neighbour>,
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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedRetired {
    pub service: SocketAddr,
    pub proto: Proto,
    pub backend: SocketAddr,
    pub id: u32,
}

fn save(b: &BackendSlot, now: Instant) -> SavedBackend {
    SavedBackend {
        backend: b.addr,
        id: b.id,
        weight: b.weight,
        registered: b.registered,
        healthy: b.health.healthy,
        draining: b.drain.is_some(),
        drain_remaining_ms: b.drain.and_then(|d| d.deadline).map(|d| d.saturating_duration_since(now).as_millis() as u64),
    }
}

impl<D: DataPlane> Controller<D> {
    /// The whole model, for the state file.
    pub fn snapshot(&self) -> SavedState {
        let now = Instant::now();
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
                    backends: svc.slots().map(|b| save(b, now)).collect(),
                    named: svc
                        .named
                        .iter()
                        .map(|(name, n)| SavedNamed { name: name.clone(), weight: n.weight, addrs: n.addrs.iter().copied().collect() })
                        .collect(),
                })
                .collect(),
            retired: self.retired.iter().map(|(sid, _, b)| SavedRetired { service: sid.addr, proto: sid.proto, backend: b.addr, id: b.id }).collect(),
            host_changes: self.host_changes.clone(),
            managed_neighbours: self.managed_neighbours.clone(),
        }
    }

    /// Rebuilds the model saved by [`Controller::snapshot`] on a data plane
    /// whose maps were taken over from pins, and rewrites the configuration
    /// maps from it (the same values: the flows keep their backends).
    pub fn restore(&mut self, state: &SavedState) -> Result<()> {
        if state.version != SavedState::VERSION {
            return Err(bad(format!("state file version {} is not {}: written by another xlb", state.version, SavedState::VERSION)));
        }
        let now = Instant::now();
        crate::host::sysctl::merge(&mut self.host_changes, state.host_changes.clone());
        self.managed_neighbours.extend(state.managed_neighbours.iter().cloned());
        for s in &state.services {
            let sid = ServiceId { addr: s.service, proto: s.proto };
            if s.id >= MAX_SERVICES || !self.used_service_ids.insert(s.id) || self.services.contains_key(&sid) {
                return Err(bad(format!("state file: service {sid} has a bad or duplicate id {}", s.id)));
            }
            let mut svc = Service::new(s.id, s.settings.clone());
            svc.resets = s.resets;
            // Asked again at once: the state file is no DNS cache.
            svc.named =
                s.named.iter().map(|n| (n.name.clone(), NamedBackend::due(n.weight, n.addrs.iter().copied().collect(), now))).collect::<BTreeMap<_, _>>();
            for b in &s.backends {
                if b.id >= MAX_BACKENDS || !self.used_backend_ids.insert(b.id) {
                    return Err(bad(format!("state file: backend {} has a bad or duplicate id {}", b.backend, b.id)));
                }
                let snat = crate::plan::snat_source(&svc.settings, b.backend.ip(), self.snat.as_ref())?;
                let slot = BackendSlot {
                    id: b.id,
                    addr: b.backend,
                    snat,
                    weight: b.weight,
                    registered: b.registered,
                    health: Tracker { healthy: b.healthy, ..Tracker::default() },
                    drain: b.draining.then(|| Drain { deadline: b.drain_remaining_ms.map(|ms| now + Duration::from_millis(ms)) }),
                    up_since: now.checked_sub(svc.settings.slow_start.0).unwrap_or(now),
                };
                self.next_backend_id = self.next_backend_id.max((b.id + 1) % MAX_BACKENDS);
                if b.registered {
                    svc.backends.insert(b.backend, slot);
                } else {
                    svc.leaving.push(slot);
                }
            }
            self.services.insert(sid, svc);
        }
        for r in &state.retired {
            if r.id < MAX_BACKENDS && self.used_backend_ids.insert(r.id) {
                let mut slot = BackendSlot::new(r.id, r.backend, r.backend.ip(), 1, now);
                slot.registered = false;
                self.retired.push((ServiceId { addr: r.service, proto: r.proto }, u32::MAX, slot));
                self.addr_ref(r.backend.ip(), 0, 1)?;
            }
        }
        // The port filter's bits before the entries they stand for (the
        // endpoints' with them: the rings point at backends below).
        let wanted = self.wanted_endpoints();
        let f = self.port_filter(None, wanted.keys());
        self.write_port_filter(f)?;
        // Address roles, backend slots, service entries and rings.
        let sids: Vec<ServiceId> = self.services.keys().copied().collect();
        for sid in sids {
            self.addr_ref(sid.addr.ip(), 1, 0)?;
            let addrs: Vec<IpAddr> = self.svc(&sid)?.slots().map(|b| b.addr.ip()).collect();
            for a in addrs {
                self.addr_ref(a, 0, 1)?;
            }
            let entry = self.svc(&sid)?.entry();
            self.dp.service_set(service_key(&sid), entry)?;
            let ids: Vec<u32> = self.svc(&sid)?.slots().map(|b| b.id).collect();
            for id in ids {
                self.write_backend(&sid, id)?;
            }
            self.rebuild_ring(sid)?;
        }
        self.refresh_endpoints()?;
        tracing::info!(services = self.services.len(), "restored the saved state");
        Ok(())
    }

    /// Records host settings the daemon changed.
    pub fn record_host_changes(&mut self, changes: Vec<Change>) {
        if !changes.is_empty() {
            crate::host::sysctl::merge(&mut self.host_changes, changes);
            self.dirty = true;
        }
    }

    /// Host settings the daemon changed (to undo on detach).
    pub fn host_changes(&self) -> &[Change] {
        &self.host_changes
    }

    /// The neighbour entries the daemon keeps resolved.
    pub fn managed_neighbours(&self) -> &BTreeSet<Neighbour> {
        &self.managed_neighbours
    }

    /// Records the neighbour entries the daemon now keeps resolved.
    pub fn set_managed_neighbours(&mut self, n: BTreeSet<Neighbour>) {
        if n != self.managed_neighbours {
            self.managed_neighbours = n;
            self.dirty = true;
        }
    }

    /// Every backend address, registered or leaving, and the interfaces
    /// the program is attached to: what the next hops to keep resolved
    /// depend on.
    pub fn next_hop_inputs(&self) -> (Vec<IpAddr>, Vec<u32>) {
        let mut ips: Vec<IpAddr> = self.services.values().flat_map(|s| s.slots().map(|b| b.addr.ip())).collect();
        ips.sort();
        ips.dedup();
        (ips, self.dp.attachments().iter().map(|a| a.ifindex).collect())
    }

    /// The VIPs to announce: every service's address while the program is
    /// attached somewhere, none otherwise.
    pub fn announced_vips(&self) -> Vec<IpAddr> {
        if self.dp.attachments().is_empty() {
            return Vec::new();
        }
        self.services.keys().map(|s| s.addr.ip()).collect()
    }
}
