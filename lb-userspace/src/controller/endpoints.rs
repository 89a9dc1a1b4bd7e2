//! Backend endpoints (`XLB_ENDPOINTS`): for every backend ip:port/proto,
//! the services it serves, so a backend's packet finds its flow; and the
//! service flags that follow from them (a backend shared between services
//! makes new flows check for collisions; a Maglev DNAT or DSR service whose
//! backends are its own schedules SYNs without state).
//!
//! Recomputed whole from the model after each change (a few thousand
//! backends at most) and written as a diff: an endpoint appears before a
//! ring points at its backend, and goes only when its last backend id is
//! freed (leaving backends' flows still need their answers mapped).

use std::collections::HashMap;

use lb_common::maps::{
    EndpointEntry, EndpointKey, EndpointService, FILTER_ENDPOINT, FILTER_SERVICE, MAX_SERVICES_PER_ENDPOINT, PortFilter, SVC_F_DSR, SVC_F_FULLNAT, addr_from_ip,
};

use super::{Controller, Result};
use crate::{
    dataplane::DataPlane,
    model::{ServiceId, be_port, service_key},
};

impl<D: DataPlane> Controller<D> {
    /// The endpoints the model calls for.
    pub(super) fn wanted_endpoints(&self) -> HashMap<EndpointKey, EndpointEntry> {
        let mut out: HashMap<EndpointKey, EndpointEntry> = HashMap::new();
        let all = self.services.iter().map(|(sid, s)| (sid, s.id, s.entry().flags, s.slots().collect::<Vec<_>>()));
        let retired = self.retired.iter().map(|(sid, id, b)| (sid, *id, 0u8, vec![b]));
        for (sid, service_id, flags, slots) in all.chain(retired) {
            for b in slots {
                let key = EndpointKey { addr: addr_from_ip(b.addr.ip()), port: be_port(b.addr.port()), proto: sid.proto.number(), _pad: 0 };
                let e = out.entry(key).or_default();
                let i = e.count as usize;
                if i >= MAX_SERVICES_PER_ENDPOINT {
                    // Refused by the planner; a restored state past the bound
                    // keeps the first ones.
                    continue;
                }
                e.services[i] = EndpointService {
                    vip: addr_from_ip(sid.addr.ip()),
                    vip_port: be_port(sid.addr.port()),
                    backend_id: b.id as u16,
                    service_id: service_id as u8,
                    flags: flags & (SVC_F_FULLNAT | SVC_F_DSR),
                    _pad: 0,
                };
                e.count += 1;
                if flags & SVC_F_FULLNAT != 0 {
                    e.any_fullnat = 1;
                }
            }
        }
        out
    }

    /// Services with a backend endpoint that another service also has.
    fn shared_services(wanted: &HashMap<EndpointKey, EndpointEntry>) -> std::collections::HashSet<u8> {
        wanted
            .values()
            .filter(|e| e.count > 1)
            .flat_map(|e| e.services[..(e.count as usize).min(MAX_SERVICES_PER_ENDPOINT)].iter().map(|s| s.service_id))
            .collect()
    }

    /// Writes what changed in the endpoints and in the service flags that
    /// follow from them.
    pub(super) fn refresh_endpoints(&mut self) -> Result<()> {
        let wanted = self.wanted_endpoints();
        // The port filter's bits for every endpoint there will be or still
        // is, before any entry changes; the exact set once they have.
        let f = self.port_filter(None, wanted.keys().chain(self.endpoints.keys()));
        self.write_port_filter(f)?;
        let shared = Self::shared_services(&wanted);
        let mut changed: Vec<ServiceId> = Vec::new();
        for (sid, svc) in self.services.iter_mut() {
            let s = shared.contains(&(svc.id as u8));
            if svc.shared_backends != s {
                svc.shared_backends = s;
                changed.push(*sid);
            }
        }
        // New and changed endpoints first (before any ring points at them).
        for (k, e) in &wanted {
            if self.endpoints.get(k) != Some(e) {
                self.dp.endpoint_set(*k, Some(*e))?;
                self.endpoints.insert(*k, *e);
            }
        }
        for sid in changed {
            let entry = self.svc(&sid)?.entry();
            self.dp.service_set(service_key(&sid), entry)?;
        }
        let gone: Vec<EndpointKey> = self.endpoints.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
        for k in gone {
            self.dp.endpoint_set(k, None)?;
            self.endpoints.remove(&k);
        }
        let f = self.port_filter(None, wanted.keys());
        self.write_port_filter(f)
    }

    /// The port filter for the model's services (and `extra`, about to be
    /// added) and the endpoints `endpoints`.
    pub(super) fn port_filter<'a>(&self, extra: Option<&ServiceId>, endpoints: impl Iterator<Item = &'a EndpointKey>) -> PortFilter {
        let mut f = PortFilter::default();
        for sid in self.services.keys().chain(extra) {
            f.insert(FILTER_SERVICE, sid.proto.number(), be_port(sid.addr.port()));
        }
        for k in endpoints {
            f.insert(FILTER_ENDPOINT, k.proto, k.port);
        }
        f
    }

    /// Writes `f` if it differs from what the data plane has.
    pub(super) fn write_port_filter(&mut self, f: PortFilter) -> Result<()> {
        if *self.port_filter != f {
            self.dp.port_filter_set(&f)?;
            *self.port_filter = f;
        }
        Ok(())
    }
}
