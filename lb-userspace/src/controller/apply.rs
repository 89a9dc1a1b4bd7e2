//! Whole configurations: `xlb apply`, `xlb export`, config files. The plan
//! is checked whole first (`plan`); then additions and changes are made,
//! the leaving backends are taken out of the model, every touched ring is
//! rebuilt and written once, and only then are the leavers marked gone in
//! the data plane and their resets queued. A service never goes without
//! backends for new flows while a deploy replaces them.

use std::collections::BTreeSet;

use super::{Controller, Result};
use crate::{
    api::desired::{Desired, DesiredBackend, DesiredNamed, DesiredService},
    dataplane::DataPlane,
    model::ServiceId,
    plan::{self, Step, Usage},
};

impl<D: DataPlane> Controller<D> {
    /// The whole configuration (registered backends only).
    pub fn export(&self) -> Desired {
        Desired {
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

    /// Makes the running configuration match `want`. Everything is checked
    /// first (nothing changes if any of it is wrong, and the error names the
    /// field); returns the changes, applied or (with `dry_run`) only listed.
    pub fn apply(&mut self, want: &Desired, dry_run: bool) -> Result<Vec<String>> {
        let usage = Usage { backend_ids_in_use: self.used_backend_ids.len(), names_supported: self.dns.enabled };
        let plan = plan::plan_apply(&self.services, &usage, want, self.snat.as_ref())?;
        if dry_run {
            return Ok(plan.changes);
        }
        self.execute(plan.steps)?;
        Ok(plan.changes)
    }

    /// Carries out a checked plan (see the module doc for the order).
    pub(super) fn execute(&mut self, steps: Vec<Step>) -> Result<()> {
        let mut touched: BTreeSet<ServiceId> = BTreeSet::new();
        let mut leaving: Vec<(ServiceId, u32)> = Vec::new();
        let mut removed_services = Vec::new();
        for step in steps {
            match step {
                Step::AddService(sid, settings) => {
                    self.service_add_with(sid, settings)?;
                    touched.insert(sid);
                }
                Step::Settings(sid, settings, _snat) => {
                    // The sources were found at planning time; finding them
                    // again here gives the same answer.
                    self.replace_settings(sid, settings)?;
                }
                Step::AddBackend(sid, b, w, snat) => {
                    self.backend_add_unbuilt(sid, b, w, snat)?;
                    touched.insert(sid);
                }
                Step::Reweight(sid, b, w) => {
                    self.reweight_unbuilt(sid, b, w)?;
                    touched.insert(sid);
                }
                Step::AddNamed(sid, name, w) => self.named_register(sid, name, w)?,
                Step::ReweightNamed(sid, name, w) => {
                    self.named_set(sid.addr, Some(sid.proto), &name, w)?;
                }
                Step::RemoveNamed(sid, name) => {
                    if let Some(named) = self.svc_mut(&sid)?.named.remove(&name) {
                        for a in named.addrs {
                            leaving.push((sid, self.backend_deregister(sid, std::net::SocketAddr::new(a, name.port))?));
                        }
                    }
                    touched.insert(sid);
                }
                Step::RemoveBackend(sid, b) => {
                    leaving.push((sid, self.backend_deregister(sid, b)?));
                    touched.insert(sid);
                }
                Step::RemoveService(sid) => removed_services.push(sid),
            }
        }
        // The new rings, before anything is marked gone.
        for sid in &touched {
            self.rebuild_ring(*sid)?;
        }
        for (sid, id) in leaving {
            self.backend_retire(sid, id)?;
        }
        for sid in removed_services {
            self.service_remove(sid.addr, Some(sid.proto))?;
        }
        Ok(())
    }
}
