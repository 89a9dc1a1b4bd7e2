//! Backends given by DNS name: their addresses become ordinary backends
//! (see `model::named` for the rules an answer follows). Lookups are made
//! by the daemon, off the controller; their answers come here.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use super::{Controller, Result, bad, not_found};
use crate::{
    dataplane::DataPlane,
    model::{HostPort, NamedBackend, Proto, Refusal, Resolution, ServiceId, check_weight, settings::FlowPolicy},
};

impl<D: DataPlane> Controller<D> {
    /// Registers a backend by name with the answer of its first lookup.
    /// The name must resolve to at least one address of the service's
    /// family.
    pub fn named_add(
        &mut self,
        addr: SocketAddr,
        proto: Option<Proto>,
        name: &HostPort,
        weight: Option<u32>,
        answer: Resolution,
    ) -> Result<(ServiceId, Vec<SocketAddr>)> {
        let weight = weight.unwrap_or(1);
        check_weight(weight)?;
        let sid = self.resolve(addr, proto)?;
        if !self.dns.enabled {
            return Err(bad("backends by DNS name need the daemon's resolver (this controller has none)".into()));
        }
        if self.svc(&sid)?.named.contains_key(name) {
            return Err(Refusal::Conflict(format!("backend {name} is already registered on {sid}")).into());
        }
        let family = if sid.addr.is_ipv4() { "IPv4" } else { "IPv6" };
        let addrs: BTreeSet<IpAddr> = match &answer {
            Resolution::Addrs { addrs, .. } => addrs.iter().copied().filter(|a| a.is_ipv4() == sid.addr.is_ipv4()).collect(),
            Resolution::NoSuchName => BTreeSet::new(),
            Resolution::Failed(e) => return Err(bad(format!("resolving {}: {e} (try again, or check --dns-server)", name.host))),
        };
        if addrs.is_empty() {
            return Err(bad(format!("{} has no {family} address (the service is {family})", name.host)));
        }
        let now = Instant::now();
        let mut named = NamedBackend::due(weight, BTreeSet::new(), now);
        let want = named.take_answer(&answer, sid.addr.is_ipv4(), now, &self.dns.ttl, self.dns.misses).unwrap_or_default();
        self.svc_mut(&sid)?.named.insert(name.clone(), named);
        self.named_sync(sid, name, want)?;
        let registered = self.svc(&sid)?.named.get(name).map(|n| n.addrs.iter().map(|a| SocketAddr::new(*a, name.port)).collect()).unwrap_or_default();
        tracing::info!(service = %sid, backend = %name, addresses = ?registered, "backend added by name");
        self.dirty = true;
        Ok((sid, registered))
    }

    /// Registers a backend by name without an answer yet: the daemon looks
    /// it up at once (configuration files, `apply`).
    pub fn named_register(&mut self, sid: ServiceId, name: HostPort, weight: u32) -> Result<()> {
        check_weight(weight)?;
        if !self.dns.enabled {
            return Err(bad(format!("backend {name}: backends by DNS name need the daemon's resolver")));
        }
        let now = Instant::now();
        self.svc_mut(&sid)?.named.entry(name).or_insert(NamedBackend::due(weight, BTreeSet::new(), now));
        self.dirty = true;
        Ok(())
    }

    /// Deregisters a backend given by name: each of its addresses leaves
    /// under the service's `on_remove` policy. Returns the policy and the
    /// active flows they had.
    pub fn named_remove(&mut self, addr: SocketAddr, proto: Option<Proto>, name: &HostPort) -> Result<(ServiceId, FlowPolicy, u64)> {
        let sid = self.resolve(addr, proto)?;
        let Some(named) = self.svc_mut(&sid)?.named.remove(name) else {
            return Err(not_found(format!("backend {name} is not registered on {sid}")));
        };
        let mut flows = 0;
        for a in named.addrs {
            match self.backend_remove(sid.addr, Some(sid.proto), SocketAddr::new(a, name.port)) {
                Ok((_, _, n)) => flows += n,
                Err(e) => tracing::warn!(service = %sid, backend = %name, address = %a, error = %e, "removing an address of a named backend failed"),
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
        let Some(named) = self.svc_mut(&sid)?.named.get_mut(name) else {
            return Err(not_found(format!("backend {name} is not registered on {sid}")));
        };
        let old = std::mem::replace(&mut named.weight, weight);
        let addrs: Vec<IpAddr> = named.addrs.iter().copied().collect();
        for a in addrs {
            self.backend_set(sid.addr, Some(sid.proto), SocketAddr::new(a, name.port), weight)?;
        }
        self.dirty = true;
        Ok((sid, old))
    }

    /// Names due for a lookup.
    pub fn dns_due(&self, now: Instant) -> Vec<(ServiceId, HostPort)> {
        self.services.iter().flat_map(|(sid, s)| s.named.iter().filter(|(_, n)| n.next_resolve <= now).map(move |(name, _)| (*sid, name.clone()))).collect()
    }

    /// Applies a lookup's answer: new addresses join, vanished ones leave
    /// under the service's `on_remove` policy; an answer that would remove
    /// every address does so only after `--dns-misses` of them in a row.
    pub fn dns_apply(&mut self, sid: ServiceId, name: &HostPort, answer: Resolution, now: Instant) -> Result<()> {
        let (ttl, misses) = (self.dns.ttl, self.dns.misses);
        let Some(named) = self.services.get_mut(&sid).and_then(|s| s.named.get_mut(name)) else { return Ok(()) };
        let before = named.misses;
        let Some(want) = named.take_answer(&answer, sid.addr.is_ipv4(), now, &ttl, misses) else {
            if named.misses > before {
                tracing::warn!(service = %sid, backend = %name, misses = named.misses, of = misses, error = named.last_error.as_deref().unwrap_or(""), "DNS answer would remove every address: keeping them");
            }
            return Ok(());
        };
        self.named_sync(sid, name, want)
    }

    /// Makes the addresses registered for `name` equal `want` (one ring
    /// rebuild for all of them).
    fn named_sync(&mut self, sid: ServiceId, name: &HostPort, want: BTreeSet<IpAddr>) -> Result<()> {
        let Some((have, weight)) = self.svc(&sid)?.named.get(name).map(|n| (n.addrs.clone(), n.weight)) else { return Ok(()) };
        let mut joined = Vec::new();
        for a in want.difference(&have) {
            let backend = SocketAddr::new(*a, name.port);
            if self.svc(&sid)?.backends.contains_key(&backend) {
                tracing::info!(service = %sid, %backend, name = %name, "address already registered otherwise: not taken over by the name");
                continue;
            }
            let settings = self.svc(&sid)?.settings.clone();
            let added = crate::plan::check_backend(&sid, &settings, backend)
                .and_then(|()| crate::plan::snat_source(&settings, backend.ip(), self.snat.as_ref()))
                .map_err(super::ControllerError::from)
                .and_then(|snat| self.backend_add_unbuilt(sid, backend, weight, snat));
            match added {
                Ok(_) => {
                    if let Some(n) = self.services.get_mut(&sid).and_then(|s| s.named.get_mut(name)) {
                        n.addrs.insert(*a);
                    }
                    joined.push(backend);
                    tracing::info!(service = %sid, %backend, name = %name, "address of a named backend joins");
                }
                Err(e) => tracing::warn!(service = %sid, %backend, name = %name, error = %e, "adding a resolved address failed"),
            }
        }
        let mut left = Vec::new();
        for a in have.difference(&want) {
            let backend = SocketAddr::new(*a, name.port);
            if let Some(n) = self.services.get_mut(&sid).and_then(|s| s.named.get_mut(name)) {
                n.addrs.remove(a);
            }
            match self.backend_deregister(sid, backend) {
                Ok(id) => left.push((backend, id)),
                Err(e) => tracing::warn!(service = %sid, %backend, name = %name, error = %e, "removing a vanished address failed"),
            }
        }
        // The new ring first (with what joined, without what left), then
        // the leavers' state.
        self.rebuild_ring(sid)?;
        for (backend, id) in left {
            self.backend_retire(sid, id)?;
            tracing::info!(service = %sid, %backend, name = %name, "address of a named backend leaves");
        }
        for b in joined {
            self.warm_neighbour(b);
        }
        self.dirty = true;
        Ok(())
    }
}
