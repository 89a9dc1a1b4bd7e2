//! Periodic upkeep and the results of work done elsewhere: slow-start
//! rings, drain deadlines, table snapshots (flows per backend, the
//! least-connections counts, freeing the ids of backends whose flows are
//! gone), finished resets and expiry passes.

use std::{
    collections::{BTreeSet, HashMap},
    time::Instant,
};

use lb_common::maps::MAX_BACKENDS;

use super::{Controller, Result};
use crate::{
    dataplane::{DataPlane, FlowTable as _},
    model::{ResetCause, ServiceId},
    resets, table,
};

impl<D: DataPlane> Controller<D> {
    /// Slow start (rings follow ramping weights) and drain deadlines. Cheap:
    /// no table walk.
    pub fn tick(&mut self, now: Instant) -> Result<()> {
        // Rings of services ramping now, and of those that were at the last
        // tick (their backends' last step, to the whole weight).
        let ramping: BTreeSet<ServiceId> = self.services.iter().filter(|(_, s)| s.ramping(now)).map(|(sid, _)| *sid).collect();
        let was = std::mem::replace(&mut self.ramping, ramping.clone());
        for sid in ramping.union(&was) {
            self.rebuild_ring_at(*sid, now)?;
        }
        // Drains that reached their deadline: the rest is reset, the
        // backend stops forwarding (down if unhealthy, removed if
        // deregistered).
        let mut over: Vec<(ServiceId, u32, std::net::SocketAddr, std::time::Duration)> = Vec::new();
        for (sid, svc) in &self.services {
            for b in svc.slots() {
                if b.drain.is_some_and(|d| d.expired(now)) {
                    over.push((*sid, b.id, b.addr, svc.settings.reset_spread.0));
                }
            }
        }
        for (sid, id, addr, spread) in over {
            self.end_drain(sid, id)?;
            let left = self.snapshot.backend(id).active;
            tracing::info!(service = %sid, backend = %addr, flows = left, "drain deadline reached: resetting the remaining flows");
            self.resetting.insert(id);
            self.queue_reset(resets::Job {
                service: sid,
                backend: Some(addr),
                cause: ResetCause::DrainDeadline,
                target: resets::Target::Backend(id),
                spread,
                backends: Default::default(),
            });
        }
        Ok(())
    }

    /// A drain is over: the backend's state becomes what it is without it.
    fn end_drain(&mut self, sid: ServiceId, id: u32) -> Result<()> {
        if let Some(b) = self.svc_mut(&sid)?.slot_by_id_mut(id) {
            b.drain = None;
        }
        self.dirty = true;
        self.write_backend(&sid, id)
    }

    /// A table walk's snapshot: reports read it from now on; drains with no
    /// flow left end; least-connections counts are made exact; leaving
    /// backends without flows in two snapshots in a row are freed.
    pub fn on_snapshot(&mut self, mut snap: table::Snapshot) -> Result<()> {
        // Removals as of now, after the walk (see `walk_rules`).
        snap.totals.removed = self.global_counter(lb_common::stats::ENTRIES_REMOVED) + self.table.entries_removed();
        self.snapshot = snap;
        // Exact active counts for least-connections.
        let ids: Vec<u32> = self.used_backend_ids.iter().copied().filter(|i| *i < MAX_BACKENDS).collect();
        for id in ids {
            self.dp.backend_active_set(id, self.snapshot.backend(id).active)?;
        }
        // Drains whose flows all ended.
        let mut drained = Vec::new();
        for (sid, svc) in &self.services {
            for b in svc.slots() {
                if b.drain.is_some() && self.snapshot.backend(b.id).active == 0 {
                    drained.push((*sid, b.id));
                }
            }
        }
        for (sid, id) in drained {
            self.end_drain(sid, id)?;
        }
        // Leaving backends with no flow at all.
        let leaving: Vec<u32> = self
            .services
            .values()
            .flat_map(|s| s.leaving.iter())
            .chain(self.retired.iter().map(|(_, _, b)| b))
            .filter(|b| b.drain.is_none())
            .map(|b| b.id)
            .collect();
        let mut streak: HashMap<u32, u32> = HashMap::new();
        for id in leaving {
            if self.snapshot.backend(id).total == 0 && !self.resetting.contains(&id) {
                streak.insert(id, self.empty_streak.get(&id).copied().unwrap_or(0) + 1);
            }
        }
        self.empty_streak = streak;
        let free: Vec<u32> = self.empty_streak.iter().filter(|(_, n)| **n >= 2).map(|(id, _)| *id).collect();
        for id in free {
            self.free_backend(id)?;
        }
        Ok(())
    }

    /// (Part of) a reset job is done: counts, records for the flow log and
    /// the sync peer.
    /// `job_backend`: the backend the job was for, if it was for one.
    pub fn on_reset(&mut self, o: resets::Outcome, job_backend: Option<u32>) {
        let cause = o.cause.unwrap_or(ResetCause::Removed);
        let reset: u64 = o.reset_by_backend.values().sum();
        if let Some(svc) = o.service.and_then(|sid| self.services.get_mut(&sid)) {
            svc.resets.add(cause, reset);
        }
        for (id, n) in &o.reset_by_backend {
            self.backend_resets.entry(*id).or_default().add(cause, *n);
        }
        self.rst_send_errors += o.send_errors;
        if o.last_sent.is_some() {
            self.last_rst_sent = o.last_sent;
        }
        let reason = cause.end_reason();
        if !o.removed.is_empty() {
            let refs = self.backend_refs();
            self.outbox.extend(o.removed.iter().map(|f| f.end_record(reason, &refs.get(&f.backend_id()).copied().unwrap_or_default())));
        }
        if o.done
            && let Some(id) = job_backend
        {
            self.resetting.remove(&id);
        }
        if reset > 0 {
            self.dirty = true;
        }
    }

    /// An expiry pass removed these flows (the walker did, after the walk
    /// that decided it): per service counts and flow-log records.
    pub fn on_expired(&mut self, e: &table::Expired) {
        let mut by_service: HashMap<u32, u64> = HashMap::new();
        let refs = if e.forgotten.is_empty() { HashMap::new() } else { self.backend_refs() };
        for (f, reason) in &e.forgotten {
            *by_service.entry(f.service_id()).or_default() += 1;
            self.outbox.push(f.end_record(*reason, &refs.get(&f.backend_id()).copied().unwrap_or_default()));
        }
        for svc in self.services.values_mut() {
            if let Some(n) = by_service.get(&svc.id) {
                svc.resets.expired += n;
            }
        }
        if !e.forgotten.is_empty() {
            tracing::debug!(flows = e.forgotten.len(), "expired idle flows");
        }
    }

    /// The reset job for the flows an expiry walk found idle under
    /// `reset_on_idle`, one per service.
    pub fn idle_reset_jobs(&mut self, d: &table::Decisions) {
        let mut by_service: HashMap<ServiceId, Vec<crate::dataplane::FlowRef>> = HashMap::new();
        for (sid, r) in &d.reset {
            by_service.entry(*sid).or_default().push(*r);
        }
        for (sid, flows) in by_service {
            let spread = self.services.get(&sid).map_or(std::time::Duration::ZERO, |s| s.settings.reset_spread.0);
            self.queue_reset(resets::Job {
                service: sid,
                backend: None,
                cause: ResetCause::Idle,
                target: resets::Target::Flows(flows),
                spread,
                backends: Default::default(),
            });
        }
    }
}
