//! Planning changes: a desired configuration (`xlb apply`, a config file)
//! is checked whole against the model before anything is written, and
//! turned into steps the controller carries out in an order that never
//! leaves a service without backends for new flows (new rings are written
//! before anything is marked gone). The checks single operations make
//! (address family, DSR rules, capacity, the full-NAT source) live here
//! too, so every path refuses the same things the same way.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{IpAddr, SocketAddr},
};

use lb_common::maps::{MAX_BACKENDS, MAX_SERVICES, RING_SLOTS};

use crate::{
    api::desired::Desired,
    model::{
        HostPort, Refusal, Service, ServiceId, check_unicast, check_weight,
        settings::{NatMode, ServiceSettings, SnatSource},
    },
};

type Result<T> = std::result::Result<T, Refusal>;

/// How the balancer's source address towards a backend is found (the
/// routing table's choice in the daemon; tests give their own).
pub type SnatResolver<'a> = &'a dyn Fn(IpAddr) -> std::result::Result<IpAddr, String>;

/// The balancer's source address towards `backend` under `settings`: the
/// configured one, else the resolver's (full NAT and DSR need one);
/// unspecified for DNAT, which does not use it.
pub fn snat_source(settings: &ServiceSettings, backend: IpAddr, resolve: SnatResolver) -> Result<IpAddr> {
    if settings.mode == NatMode::Dnat {
        return Ok(match backend {
            IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        });
    }
    if let SnatSource::Addr(a) = settings.snat_source {
        if a.is_ipv4() != backend.is_ipv4() {
            return Err(Refusal::BadRequest(format!("source address {a} and backend {backend} are not the same address family")));
        }
        return Ok(a);
    }
    resolve(backend).map_err(Refusal::BadRequest)
}

/// The routing table's source address towards `backend` (a connected UDP
/// socket's local address: nothing is sent).
pub fn route_source(backend: IpAddr) -> std::result::Result<IpAddr, String> {
    let local: SocketAddr = match backend {
        IpAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
        IpAddr::V6(_) => ([0u16; 8], 0).into(),
    };
    let found = std::net::UdpSocket::bind(local).and_then(|s| s.connect(SocketAddr::new(backend, 9)).map(|_| s)).and_then(|s| s.local_addr());
    match found {
        Ok(a) if !a.ip().is_unspecified() => Ok(a.ip()),
        Ok(_) => Err(format!("no source address towards backend {backend}: set --snat-source")),
        Err(e) => Err(format!("cannot choose a source address towards backend {backend}: {e} (add a route to it, or set --snat-source)")),
    }
}

/// What a backend must be to join `sid` under `settings`.
pub fn check_backend(sid: &ServiceId, settings: &ServiceSettings, backend: SocketAddr) -> Result<()> {
    check_unicast("backend", backend)?;
    if sid.addr.is_ipv4() != backend.is_ipv4() {
        return Err(Refusal::BadRequest(format!(
            "backend {backend} and service {sid} are not the same address family (an IPv4 VIP with IPv6 backends is not supported)"
        )));
    }
    check_dsr(sid, settings, std::iter::once(backend))
}

/// Settings that depend on the service's kind: direct server return
/// carries IPv4 packets in IPIP, untouched (the backend answers from the
/// VIP's own port); an MSS clamp is for TCP.
pub fn check_dsr(sid: &ServiceId, settings: &ServiceSettings, backends: impl Iterator<Item = SocketAddr>) -> Result<()> {
    if settings.mss_clamp != 0 && sid.proto != crate::model::Proto::Tcp {
        return Err(Refusal::BadRequest(format!("{sid}: mss_clamp applies to TCP services only (an MSS is a TCP option)")));
    }
    if settings.mode != NatMode::Dsr {
        return Ok(());
    }
    if !sid.addr.is_ipv4() {
        return Err(Refusal::BadRequest(format!("{sid}: DSR mode is IPv4 only (IPIP); use dnat or fullnat for IPv6")));
    }
    for b in backends {
        if b.port() != sid.addr.port() {
            return Err(Refusal::BadRequest(format!(
                "{sid}: backend {b}: in DSR mode the backend answers from the VIP itself, so its port must be {}",
                sid.addr.port()
            )));
        }
    }
    Ok(())
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    AddService(ServiceId, ServiceSettings),
    /// New settings, with every backend's source address for them.
    Settings(ServiceId, ServiceSettings, Vec<(SocketAddr, IpAddr)>),
    AddBackend(ServiceId, SocketAddr, u32, IpAddr),
    Reweight(ServiceId, SocketAddr, u32),
    AddNamed(ServiceId, HostPort, u32),
    ReweightNamed(ServiceId, HostPort, u32),
    RemoveNamed(ServiceId, HostPort),
    RemoveBackend(ServiceId, SocketAddr),
    RemoveService(ServiceId),
}

/// A checked plan: the changes in words and the steps.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub changes: Vec<String>,
    pub steps: Vec<Step>,
}

impl Plan {
    fn push(&mut self, change: String, step: Step) {
        self.changes.push(change);
        self.steps.push(step);
    }
}

/// What is in use besides the services themselves (ids held by leaving
/// backends count).
pub struct Usage {
    pub backend_ids_in_use: usize,
    pub names_supported: bool,
}

/// Checks `want` whole against the running `services` and plans the
/// changes. Nothing is written here; an error names the field
/// (`services[2].backends[0].backend: ...`).
pub fn plan_apply(services: &BTreeMap<ServiceId, Service>, usage: &Usage, want: &Desired, resolve: SnatResolver) -> Result<Plan> {
    let bad = |path: String, e: Refusal| Refusal::BadRequest(format!("{path}: {e}"));
    if want.services.len() > MAX_SERVICES as usize {
        return Err(Refusal::Capacity(format!("{} services, at most {MAX_SERVICES}", want.services.len())));
    }
    let mut seen = HashSet::new();
    // One backend ip:port may serve a few services, no more (its packets
    // find their flow among them).
    let mut sharing: BTreeMap<(SocketAddr, crate::model::Proto), usize> = BTreeMap::new();
    for (i, s) in want.services.iter().enumerate() {
        for (j, b) in s.backends.iter().enumerate() {
            let n = sharing.entry((b.backend, s.proto)).or_default();
            *n += 1;
            if *n > lb_common::maps::MAX_SERVICES_PER_ENDPOINT {
                return Err(Refusal::Capacity(format!(
                    "services[{i}].backends[{j}].backend: {} would serve more than {} services",
                    b.backend,
                    lb_common::maps::MAX_SERVICES_PER_ENDPOINT
                )));
            }
        }
    }
    // Backend ids: those in use stay in use (leaving backends keep theirs
    // until their flows are gone); every new backend needs one more.
    let mut ids_needed = usage.backend_ids_in_use;
    let mut plan = Plan::default();
    let mut removals = Plan::default();
    for (i, s) in want.services.iter().enumerate() {
        let sid = ServiceId { addr: s.service, proto: s.proto };
        let at = |f: &str| format!("services[{i}]{f}");
        check_unicast("service", s.service).map_err(|e| bad(at(".service"), e))?;
        if !seen.insert(sid) {
            return Err(bad(at(""), Refusal::BadRequest(format!("service {sid} is listed twice"))));
        }
        s.settings.validate().map_err(|e| bad(at(".settings"), Refusal::BadRequest(e)))?;
        if s.backends.len() > RING_SLOTS as usize {
            return Err(bad(at(".backends"), Refusal::Capacity(format!("{} backends, at most {RING_SLOTS}", s.backends.len()))));
        }
        if !s.named_backends.is_empty() && !usage.names_supported {
            return Err(bad(at(".named_backends"), Refusal::BadRequest("backends by DNS name need the daemon's resolver".into())));
        }
        let mut listed = HashSet::new();
        let mut snat = Vec::new();
        for (j, b) in s.backends.iter().enumerate() {
            let path = at(&format!(".backends[{j}]"));
            check_backend(&sid, &s.settings, b.backend).map_err(|e| bad(format!("{path}.backend"), e))?;
            check_weight(b.weight).map_err(|e| bad(format!("{path}.weight"), e))?;
            if !listed.insert(b.backend) {
                return Err(bad(format!("{path}.backend"), Refusal::BadRequest(format!("{} is listed twice on {sid}", b.backend))));
            }
            // Every backend's source address is found now: a full-NAT or
            // DSR service whose backend has no route fails here, not
            // half-way through.
            snat.push((b.backend, snat_source(&s.settings, b.backend.ip(), resolve).map_err(|e| bad(format!("{path}.backend"), e))?));
        }
        let mut names = BTreeSet::new();
        for (j, n) in s.named_backends.iter().enumerate() {
            let path = at(&format!(".named_backends[{j}]"));
            check_weight(n.weight).map_err(|e| bad(format!("{path}.weight"), e))?;
            if !names.insert(n.backend.clone()) {
                return Err(bad(format!("{path}.backend"), Refusal::BadRequest(format!("{} is listed twice on {sid}", n.backend))));
            }
        }
        let snat_of = |a: SocketAddr| snat.iter().find(|(b, _)| *b == a).map(|(_, s)| *s);
        match services.get(&sid) {
            None => {
                plan.push(format!("add service {sid}"), Step::AddService(sid, s.settings.clone()));
                for b in &s.backends {
                    ids_needed += 1;
                    let src = snat_of(b.backend).unwrap_or(b.backend.ip());
                    plan.push(format!("add backend {} to {sid} (weight {})", b.backend, b.weight), Step::AddBackend(sid, b.backend, b.weight, src));
                }
                for n in &s.named_backends {
                    plan.push(
                        format!("add backend {} to {sid} (weight {}, resolved by the daemon)", n.backend, n.weight),
                        Step::AddNamed(sid, n.backend.clone(), n.weight),
                    );
                }
            }
            Some(cur) => {
                if cur.settings != s.settings {
                    // The source addresses under the new settings, for every
                    // backend that stays or is leaving.
                    let mut all = Vec::new();
                    for slot in cur.slots() {
                        let src = match snat_of(slot.addr) {
                            Some(a) => a,
                            None => snat_source(&s.settings, slot.addr.ip(), resolve).map_err(|e| bad(at(".settings"), e))?,
                        };
                        all.push((slot.addr, src));
                    }
                    check_dsr(&sid, &s.settings, s.backends.iter().map(|b| b.backend)).map_err(|e| bad(at(".settings"), e))?;
                    plan.push(format!("change settings of {sid}"), Step::Settings(sid, s.settings.clone(), all));
                }
                for b in &s.backends {
                    match cur.backends.get(&b.backend) {
                        None => {
                            ids_needed += 1;
                            let src = snat_of(b.backend).unwrap_or(b.backend.ip());
                            plan.push(format!("add backend {} to {sid} (weight {})", b.backend, b.weight), Step::AddBackend(sid, b.backend, b.weight, src));
                        }
                        Some(slot) if slot.weight != b.weight => {
                            plan.push(
                                format!("reweight backend {} on {sid}: {} -> {}", b.backend, slot.weight, b.weight),
                                Step::Reweight(sid, b.backend, b.weight),
                            );
                        }
                        Some(_) => {}
                    }
                }
                for n in &s.named_backends {
                    match cur.named.get(&n.backend) {
                        None => plan.push(
                            format!("add backend {} to {sid} (weight {}, resolved by the daemon)", n.backend, n.weight),
                            Step::AddNamed(sid, n.backend.clone(), n.weight),
                        ),
                        Some(c) if c.weight != n.weight => plan.push(
                            format!("reweight backend {} on {sid}: {} -> {}", n.backend, c.weight, n.weight),
                            Step::ReweightNamed(sid, n.backend.clone(), n.weight),
                        ),
                        Some(_) => {}
                    }
                }
                for name in cur.named.keys() {
                    if !names.contains(name) {
                        removals.push(format!("remove backend {name} from {sid} (policy {})", s.settings.on_remove), Step::RemoveNamed(sid, name.clone()));
                    }
                }
                for addr in cur.backends.keys() {
                    if !listed.contains(addr) && !cur.owned_by_name(*addr) {
                        removals.push(format!("remove backend {addr} from {sid} (policy {})", s.settings.on_remove), Step::RemoveBackend(sid, *addr));
                    }
                }
            }
        }
    }
    for sid in services.keys() {
        if !seen.contains(sid) {
            removals.push(format!("remove service {sid}"), Step::RemoveService(*sid));
        }
    }
    if ids_needed > MAX_BACKENDS as usize {
        return Err(Refusal::Capacity(format!(
            "this configuration needs {ids_needed} backend slots, at most {MAX_BACKENDS} (removed backends keep theirs until their flows are gone)"
        )));
    }
    // Additions first, removals last: the controller writes the new rings
    // between them.
    plan.changes.extend(removals.changes);
    plan.steps.extend(removals.steps);
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::desired::{DesiredBackend, DesiredService},
        model::Proto,
    };

    fn no_route(b: IpAddr) -> std::result::Result<IpAddr, String> {
        Err(format!("no route to {b}"))
    }

    fn via_lb(b: IpAddr) -> std::result::Result<IpAddr, String> {
        Ok(if b.is_ipv4() { "10.1.0.1".parse().expect("ip") } else { "fd01::1".parse().expect("ip") })
    }

    fn svc(addr: &str, backends: &[&str], settings: ServiceSettings) -> DesiredService {
        DesiredService {
            service: addr.parse().expect("addr"),
            proto: Proto::Tcp,
            settings,
            backends: backends.iter().map(|b| DesiredBackend { backend: b.parse().expect("addr"), weight: 1 }).collect(),
            named_backends: Vec::new(),
        }
    }

    fn usage() -> Usage {
        Usage { backend_ids_in_use: 0, names_supported: false }
    }

    #[test]
    fn every_check_runs_before_any_step_and_errors_name_the_field() {
        let services = BTreeMap::new();
        let full = ServiceSettings { mode: NatMode::Fullnat, ..Default::default() };
        let want = Desired {
            services: vec![
                svc("10.99.0.1:80", &["10.1.1.2:80"], ServiceSettings::default()),
                svc("10.99.0.2:80", &["10.1.1.3:80", "10.1.1.4:80"], full.clone()),
            ],
        };
        let e = plan_apply(&services, &usage(), &want, &no_route).expect_err("no route for full NAT");
        assert!(e.to_string().starts_with("services[1].backends[0].backend: no route to 10.1.1.3"), "{e}");
        let family = Desired { services: vec![svc("10.99.0.1:80", &["[fd01::2]:80"], ServiceSettings::default())] };
        assert!(plan_apply(&services, &usage(), &family, &via_lb).expect_err("family").to_string().contains("services[0].backends[0].backend"));
        let dsr = ServiceSettings { mode: NatMode::Dsr, ..Default::default() };
        let dsr_port = Desired { services: vec![svc("10.99.0.1:80", &["10.1.1.2:8080"], dsr)] };
        assert!(plan_apply(&services, &usage(), &dsr_port, &via_lb).expect_err("dsr port").to_string().contains("its port must be 80"));
        let ok = plan_apply(&services, &usage(), &Desired { services: vec![svc("10.99.0.2:80", &["10.1.1.3:80"], full)] }, &via_lb).expect("valid");
        assert_eq!(
            ok.steps[1],
            Step::AddBackend(
                ServiceId { addr: "10.99.0.2:80".parse().expect("a"), proto: Proto::Tcp },
                "10.1.1.3:80".parse().expect("a"),
                1,
                "10.1.0.1".parse().expect("ip")
            ),
            "the source address is found at planning time"
        );
    }

    #[test]
    fn capacity_counts_the_ids_leaving_backends_still_hold() {
        let services = BTreeMap::new();
        let many: Vec<String> = (0..10).map(|i| format!("10.1.1.{}:80", i + 1)).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let want = Desired { services: vec![svc("10.99.0.1:80", &refs, ServiceSettings::default())] };
        let near_full = Usage { backend_ids_in_use: MAX_BACKENDS as usize - 5, names_supported: false };
        assert!(matches!(plan_apply(&services, &near_full, &want, &via_lb), Err(Refusal::Capacity(_))));
        assert!(plan_apply(&services, &usage(), &want, &via_lb).is_ok());
    }

    #[test]
    fn removals_come_after_every_addition() {
        let sid = ServiceId { addr: "10.99.0.1:80".parse().expect("a"), proto: Proto::Tcp };
        let mut cur = Service::new(0, ServiceSettings::default());
        for (id, a) in ["10.1.1.2:80", "10.1.1.3:80"].iter().enumerate() {
            let addr: SocketAddr = a.parse().expect("a");
            cur.backends.insert(addr, crate::model::BackendSlot::new(id as u32, addr, addr.ip(), 1, std::time::Instant::now()));
        }
        let services = BTreeMap::from([(sid, cur)]);
        let want = Desired {
            services: vec![
                svc("10.99.0.1:80", &["10.1.1.4:80"], ServiceSettings::default()),
                svc("10.99.0.9:80", &["10.1.1.5:80"], ServiceSettings::default()),
            ],
        };
        let plan = plan_apply(&services, &Usage { backend_ids_in_use: 2, names_supported: false }, &want, &via_lb).expect("plan");
        let first_removal = plan.steps.iter().position(|s| matches!(s, Step::RemoveBackend(..))).expect("removals");
        let last_add = plan.steps.iter().rposition(|s| matches!(s, Step::AddBackend(..) | Step::AddService(..))).expect("adds");
        assert!(last_add < first_removal, "{:?}", plan.steps);
    }
}
