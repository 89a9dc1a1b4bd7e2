//! Services and backends: add, change, remove. Each operation checks
//! everything first, writes the data plane next and changes the model
//! last; a write that fails is undone, so the model and the maps never
//! drift apart (a retry then sees the state as it was).

use std::{
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use lb_common::maps::{BACKEND_UNUSED, Backend, MAX_BACKENDS, MAX_SERVICES, RING_SLOTS};

use super::{Controller, ControllerError, Result, bad};
use crate::{
    dataplane::DataPlane,
    model::{
        BackendSlot, Proto, Refusal, ResetCause, Service, ServiceId, Tracker, check_unicast, check_weight, service_key,
        settings::{FlowPolicy, ServiceOptions, ServiceSettings},
    },
    plan, resets,
};

impl<D: DataPlane> Controller<D> {
    pub fn service_add(&mut self, addr: SocketAddr, proto: Proto, options: &ServiceOptions) -> Result<ServiceId> {
        let settings = ServiceSettings::default().patched(options).map_err(bad)?;
        self.service_add_with(ServiceId { addr, proto }, settings)
    }

    /// Adds a service with whole settings (validated by the caller).
    pub(super) fn service_add_with(&mut self, sid: ServiceId, settings: ServiceSettings) -> Result<ServiceId> {
        check_unicast("service", sid.addr)?;
        if self.services.contains_key(&sid) {
            return Err(Refusal::Conflict(format!("service {sid} already exists")).into());
        }
        plan::check_dsr(&sid, &settings, std::iter::empty())?;
        let id = (0..MAX_SERVICES)
            .find(|i| !self.used_service_ids.contains(i))
            .ok_or_else(|| Refusal::Capacity(format!("cannot add {sid}: all {MAX_SERVICES} service slots are in use")))?;
        let svc = Service::new(id, settings);
        self.dp.reset_traffic(Some(id), None)?;
        // Its port's bit before its entry (a clear bit skips the lookup).
        let f = self.port_filter(Some(&sid), self.endpoints.keys());
        self.write_port_filter(f)?;
        self.dp.service_set(service_key(&sid), svc.entry())?;
        if let Err(e) = self.addr_ref(sid.addr.ip(), 1, 0) {
            let _ = self.dp.service_remove(&service_key(&sid));
            return Err(e);
        }
        self.used_service_ids.insert(id);
        self.services.insert(sid, svc);
        tracing::info!(service = %sid, id, "service added");
        self.dirty = true;
        Ok(sid)
    }

    /// Changes a service's settings at run time (only the options given).
    pub fn service_set(&mut self, addr: SocketAddr, proto: Option<Proto>, options: &ServiceOptions) -> Result<(ServiceId, ServiceSettings)> {
        let sid = self.resolve(addr, proto)?;
        let settings = self.svc(&sid)?.settings.patched(options).map_err(bad)?;
        self.replace_settings(sid, settings.clone())?;
        Ok((sid, settings))
    }

    /// Replaces a service's settings whole: every backend's source address
    /// is found for them first (a full-NAT or DSR change that cannot reach a
    /// backend is refused before anything moves), then the maps, then the
    /// model.
    pub(super) fn replace_settings(&mut self, sid: ServiceId, settings: ServiceSettings) -> Result<()> {
        let svc = self.svc(&sid)?;
        plan::check_dsr(&sid, &settings, svc.backends.keys().copied())?;
        let snat: Vec<(u32, IpAddr)> =
            svc.slots().map(|b| plan::snat_source(&settings, b.addr.ip(), self.snat.as_ref()).map(|a| (b.id, a))).collect::<std::result::Result<_, _>>()?;
        let old = svc.clone();
        let svc = self.svc_mut(&sid)?;
        svc.settings = settings;
        for b in svc.slots_mut() {
            if let Some((_, a)) = snat.iter().find(|(id, _)| *id == b.id) {
                b.snat = *a;
            }
        }
        if svc.settings.health.is_none() {
            // No check: nobody is unhealthy any more.
            for b in svc.backends.values_mut() {
                b.health = Tracker::default();
            }
        }
        if let Err(e) = self.write_service_whole(sid).and_then(|()| self.refresh_endpoints()) {
            // Back as it was, in the model and (best effort) in the maps.
            self.services.insert(sid, old);
            let _ = self.write_service_whole(sid);
            let _ = self.refresh_endpoints();
            return Err(e);
        }
        tracing::info!(service = %sid, settings = ?self.svc(&sid)?.settings, "service settings changed");
        self.dirty = true;
        Ok(())
    }

    /// Writes a service's entry, every backend's entry and its ring.
    fn write_service_whole(&mut self, sid: ServiceId) -> Result<()> {
        let svc = self.svc(&sid)?;
        let entries: Vec<(u32, Backend)> = svc.slots().map(|b| (b.id, svc.backend_entry(b))).collect();
        let entry = svc.entry();
        self.dp.service_set(service_key(&sid), entry)?;
        for (id, b) in entries {
            self.dp.backend_set(id, b)?;
        }
        self.rebuild_ring(sid)
    }

    /// Removes a service: no new flows at once, then every flow of it is
    /// reset (the service is gone: no policy can keep its flows). Its
    /// backends' ids are freed once their flows are gone.
    pub fn service_remove(&mut self, addr: SocketAddr, proto: Option<Proto>) -> Result<ServiceId> {
        let sid = self.resolve(addr, proto)?;
        // The data plane first: no new flows, then every backend gone (a
        // packet of one of its flows is answered with a RST).
        self.dp.service_remove(&service_key(&sid))?;
        let svc = self.svc(&sid)?;
        let service_id = svc.id;
        let entries: Vec<(u32, Backend)> = svc
            .slots()
            .map(|b| {
                let mut e = svc.backend_entry(b);
                e.state = lb_common::maps::BACKEND_REMOVED;
                (b.id, e)
            })
            .collect();
        for (id, e) in entries {
            self.dp.backend_set(id, e)?;
        }
        let Some(svc) = self.services.remove(&sid) else { return Ok(sid) };
        self.used_service_ids.remove(&svc.id);
        self.addr_ref(sid.addr.ip(), -1, 0)?;
        let spread = svc.settings.reset_spread.0;
        for mut slot in svc.backends.into_values().chain(svc.leaving) {
            slot.registered = false;
            slot.drain = None;
            self.retired.push((sid, service_id, slot));
        }
        self.queue_reset(resets::Job {
            service: sid,
            backend: None,
            cause: ResetCause::ServiceRemoved,
            target: resets::Target::Service(service_id),
            spread,
            backends: Default::default(),
        });
        // Other services' backends may no longer be shared.
        self.refresh_endpoints()?;
        tracing::info!(service = %sid, "service removed");
        self.dirty = true;
        Ok(sid)
    }

    pub fn backend_add(&mut self, addr: SocketAddr, proto: Option<Proto>, backend: SocketAddr, weight: Option<u32>) -> Result<(ServiceId, u32)> {
        let sid = self.resolve(addr, proto)?;
        let weight = weight.unwrap_or(1);
        let snat = {
            let svc = self.svc(&sid)?;
            check_weight(weight)?;
            plan::check_backend(&sid, &svc.settings, backend)?;
            if svc.backends.contains_key(&backend) {
                return Err(Refusal::Conflict(format!("backend {backend} is already registered on {sid}")).into());
            }
            if svc.backends.len() >= RING_SLOTS as usize {
                return Err(Refusal::Capacity(format!("{sid} already has {RING_SLOTS} backends, the most a service can have")).into());
            }
            let sharing = self.services.iter().filter(|(s, v)| s.proto == sid.proto && v.slots().any(|b| b.addr == backend)).count();
            if sharing >= lb_common::maps::MAX_SERVICES_PER_ENDPOINT {
                return Err(Refusal::Capacity(format!(
                    "backend {backend} already serves {sharing} services, the most one backend ip:port may (its packets must tell their flows apart)"
                ))
                .into());
            }
            plan::snat_source(&svc.settings, backend.ip(), self.snat.as_ref())?
        };
        let id = self.backend_add_unbuilt(sid, backend, weight, snat)?;
        if let Err(e) = self.rebuild_ring(sid) {
            self.backend_unadd(sid, backend);
            return Err(e);
        }
        self.warm_neighbour(backend);
        Ok((sid, id))
    }

    /// Registers a backend (entry written, up) without rebuilding the ring
    /// (the caller does, once for a batch).
    pub(super) fn backend_add_unbuilt(&mut self, sid: ServiceId, backend: SocketAddr, weight: u32, snat: IpAddr) -> Result<u32> {
        let id = (0..MAX_BACKENDS)
            .map(|i| (self.next_backend_id + i) % MAX_BACKENDS)
            .find(|i| !self.used_backend_ids.contains(i))
            .ok_or_else(|| Refusal::Capacity(format!("cannot add {backend}: all {MAX_BACKENDS} backend slots are in use")))?;
        let svc = self.svc(&sid)?;
        let (service_id, mss_clamp) = (svc.id, svc.settings.mss_clamp);
        let slot = BackendSlot::new(id, backend, snat, weight, Instant::now());
        self.dp.reset_traffic(None, Some(id))?;
        self.dp.backend_set(id, slot.entry(service_id, mss_clamp))?;
        if let Err(e) = self.addr_ref(backend.ip(), 0, 1) {
            let _ = self.dp.backend_set(id, Backend { state: BACKEND_UNUSED, ..Default::default() });
            return Err(e);
        }
        self.backend_resets.remove(&id);
        self.used_backend_ids.insert(id);
        self.next_backend_id = (id + 1) % MAX_BACKENDS;
        self.svc_mut(&sid)?.backends.insert(backend, slot);
        // Its packets must find their flows before a ring points at it.
        if let Err(e) = self.refresh_endpoints() {
            self.backend_unadd(sid, backend);
            return Err(e);
        }
        tracing::info!(service = %sid, %backend, id, weight, "backend added");
        self.dirty = true;
        Ok(id)
    }

    /// Undoes `backend_add_unbuilt` (its ring was never written).
    fn backend_unadd(&mut self, sid: ServiceId, backend: SocketAddr) {
        let Some(slot) = self.services.get_mut(&sid).and_then(|s| s.backends.remove(&backend)) else { return };
        let _ = self.dp.backend_set(slot.id, Backend { state: BACKEND_UNUSED, ..Default::default() });
        let _ = self.addr_ref(backend.ip(), 0, -1);
        self.used_backend_ids.remove(&slot.id);
    }

    pub(super) fn warm_neighbour(&self, backend: SocketAddr) {
        if self.warm_neighbours {
            let any: SocketAddr = if backend.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
            let sent = std::net::UdpSocket::bind(any).and_then(|s| s.send_to(&[], SocketAddr::new(backend.ip(), 9)));
            if let Err(e) = sent {
                tracing::debug!(%backend, error = %e, "warming the backend's neighbour entry failed");
            }
        }
    }

    /// Deregisters a backend; its flows follow the service's `on_remove`
    /// policy. Returns the policy applied and how many active flows it had
    /// (as of the latest table snapshot).
    pub fn backend_remove(&mut self, addr: SocketAddr, proto: Option<Proto>, backend: SocketAddr) -> Result<(ServiceId, FlowPolicy, u64)> {
        let sid = self.resolve(addr, proto)?;
        let policy = self.svc(&sid)?.settings.on_remove;
        let id = self.backend_deregister(sid, backend)?;
        if let Err(e) = self.rebuild_ring(sid) {
            self.backend_reregister(sid, backend);
            return Err(e);
        }
        self.backend_retire(sid, id)?;
        let active = self.snapshot.backend(id).active;
        tracing::info!(service = %sid, %backend, %policy, active_flows = active, "backend removed");
        Ok((sid, policy, active))
    }

    /// Takes a backend out of the model's registered set (it no longer
    /// takes new flows once the ring is rebuilt); its data-plane state is
    /// written by `backend_retire`, after the new ring.
    pub(super) fn backend_deregister(&mut self, sid: ServiceId, backend: SocketAddr) -> Result<u32> {
        let svc = self.svc_mut(&sid)?;
        let policy = svc.settings.on_remove;
        let Some(mut slot) = svc.backends.remove(&backend) else {
            return Err(super::not_found(format!("backend {backend} is not registered on {sid}")));
        };
        slot.deregister(policy, Instant::now());
        let id = slot.id;
        svc.leaving.push(slot);
        self.dirty = true;
        Ok(id)
    }

    /// Undoes `backend_deregister` (its ring could not be written).
    fn backend_reregister(&mut self, sid: ServiceId, backend: SocketAddr) {
        let Some(svc) = self.services.get_mut(&sid) else { return };
        if let Some(i) = svc.leaving.iter().position(|b| b.addr == backend) {
            let mut slot = svc.leaving.remove(i);
            slot.registered = true;
            slot.drain = None;
            svc.backends.insert(backend, slot);
        }
    }

    /// After the ring no longer has it: writes a deregistered backend's
    /// state and, under a reset policy, queues the reset of its flows.
    pub(super) fn backend_retire(&mut self, sid: ServiceId, id: u32) -> Result<()> {
        self.write_backend(&sid, id)?;
        let svc = self.svc(&sid)?;
        let Some(slot) = svc.slot_by_id(id) else { return Ok(()) };
        if slot.drain.is_none() {
            let job = resets::Job {
                service: sid,
                backend: Some(slot.addr),
                cause: ResetCause::Removed,
                target: resets::Target::Backend(id),
                spread: svc.settings.reset_spread.0,
                backends: Default::default(),
            };
            self.resetting.insert(id);
            self.queue_reset(job);
        }
        Ok(())
    }

    /// Changes a backend's weight at run time.
    pub fn backend_set(&mut self, addr: SocketAddr, proto: Option<Proto>, backend: SocketAddr, weight: u32) -> Result<(ServiceId, u32)> {
        check_weight(weight)?;
        let sid = self.resolve(addr, proto)?;
        let old = self.reweight_unbuilt(sid, backend, weight)?;
        if let Err(e) = self.rebuild_ring(sid) {
            let _ = self.reweight_unbuilt(sid, backend, old);
            return Err(e);
        }
        tracing::info!(service = %sid, %backend, old, weight, "backend weight changed");
        Ok((sid, old))
    }

    /// Changes a weight in the model and the backend's entry, not the
    /// ring. Returns the old weight.
    pub(super) fn reweight_unbuilt(&mut self, sid: ServiceId, backend: SocketAddr, weight: u32) -> Result<u32> {
        let svc = self.svc_mut(&sid)?;
        let (service_id, mss_clamp) = (svc.id, svc.settings.mss_clamp);
        let Some(slot) = svc.backends.get_mut(&backend) else {
            return Err(super::not_found(format!("backend {backend} is not registered on {sid}")));
        };
        let old = std::mem::replace(&mut slot.weight, weight);
        let entry = slot.entry(service_id, mss_clamp);
        let id = slot.id;
        if let Err(e) = self.dp.backend_set(id, entry) {
            if let Some(slot) = self.services.get_mut(&sid).and_then(|s| s.backends.get_mut(&backend)) {
                slot.weight = old;
            }
            return Err(ControllerError::from(e));
        }
        self.dirty = true;
        Ok(old)
    }

    /// Frees a leaving backend whose flows are all gone: its id returns to
    /// the pool (last in line), its address's role goes.
    pub(super) fn free_backend(&mut self, id: u32) -> Result<()> {
        // Its traffic stays its service's.
        let traffic = self.dp.traffic(crate::dataplane::TrafficOf::Backends, &[id])?.first().copied().unwrap_or_default();
        self.dp.backend_set(id, Backend { state: BACKEND_UNUSED, ..Default::default() })?;
        for svc in self.services.values_mut() {
            if svc.leaving.iter().any(|b| b.id == id) {
                let f = &mut svc.freed_traffic;
                f.packets_in += traffic.packets_in;
                f.bytes_in += traffic.bytes_in;
                f.packets_out += traffic.packets_out;
                f.bytes_out += traffic.bytes_out;
            }
        }
        let mut addr = None;
        for svc in self.services.values_mut() {
            if let Some(i) = svc.leaving.iter().position(|b| b.id == id) {
                addr = Some(svc.leaving.remove(i).addr);
            }
        }
        if let Some(i) = self.retired.iter().position(|(_, _, b)| b.id == id) {
            addr = Some(self.retired.remove(i).2.addr);
        }
        self.used_backend_ids.remove(&id);
        self.empty_streak.remove(&id);
        if let Some(a) = addr {
            self.addr_ref(a.ip(), 0, -1)?;
            tracing::debug!(backend = %a, id, "backend id freed");
        }
        self.dirty = true;
        self.refresh_endpoints()
    }
}
