//! Health results: a backend that fails its check (`fall` in a row) stops
//! taking new flows and its flows follow `on_unhealthy`; one that passes
//! again (`rise`) comes back, ramping up under slow start.

use std::{net::SocketAddr, time::Instant};

use super::{Controller, Result};
use crate::{
    dataplane::DataPlane,
    model::{ResetCause, settings::HealthCheck},
    resets,
};

/// What a health checker needs to know about one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthTarget {
    pub backend_id: u32,
    pub addr: SocketAddr,
    pub check: HealthCheck,
}

impl<D: DataPlane> Controller<D> {
    /// The backends that need a health checker, with their check.
    pub fn health_targets(&self) -> Vec<HealthTarget> {
        self.services
            .values()
            .filter_map(|s| s.settings.health.as_ref().map(|h| (s, h)))
            .flat_map(|(s, h)| s.backends.values().map(move |b| HealthTarget { backend_id: b.id, addr: b.addr, check: h.clone() }))
            .collect()
    }

    /// Records a probe result; on a change of health applies the service's
    /// `on_unhealthy` policy (or brings the backend back): the ring first,
    /// then the backend's state, then the reset of its flows.
    pub fn health_result(&mut self, backend_id: u32, result: std::result::Result<(), String>) -> Result<()> {
        let Some((sid, addr)) = self.services.iter().find_map(|(sid, s)| s.backends.values().find(|b| b.id == backend_id).map(|b| (*sid, b.addr))) else {
            return Ok(()); // removed meanwhile
        };
        let svc = self.svc_mut(&sid)?;
        let Some(h) = svc.settings.health.clone() else { return Ok(()) };
        let (policy, spread) = (svc.settings.on_unhealthy, svc.settings.reset_spread.0);
        let Some(slot) = svc.backends.get_mut(&addr) else { return Ok(()) };
        let err = result.as_ref().err().cloned();
        let Some(healthy) = slot.health_result(result, h.rise, h.fall, policy, Instant::now()) else { return Ok(()) };
        if healthy {
            tracing::info!(service = %sid, backend = %addr, "backend is healthy again: up");
        } else {
            tracing::warn!(service = %sid, backend = %addr, error = err.as_deref().unwrap_or(""), %policy, "backend failed its health check: down");
        }
        let reset_now = !healthy && slot.drain.is_none();
        self.dirty = true;
        if healthy {
            // Its state first, so the new ring never points at a down entry.
            self.write_backend(&sid, backend_id)?;
            self.rebuild_ring(sid)?;
        } else {
            self.rebuild_ring(sid)?;
            self.write_backend(&sid, backend_id)?;
        }
        if reset_now {
            self.resetting.insert(backend_id);
            self.queue_reset(resets::Job {
                service: sid,
                backend: Some(addr),
                cause: ResetCause::Unhealthy,
                target: resets::Target::Backend(backend_id),
                spread,
                backends: Default::default(),
            });
        }
        Ok(())
    }
}
