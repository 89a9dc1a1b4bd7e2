//! Reports: `status` (and the metrics built from it) from the model, the
//! latest table snapshot and the data plane's counters; `flows` from a
//! walk made off the controller. Neither walks the table under the
//! controller: a status at a million flows costs what it costs at ten.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use lb_common::{
    maps::{addr_from_ip, addr_to_ip},
    stats, tcp,
};

use super::{Controller, Result};
use crate::{
    api::{BackendStatus, FlowInfo, NamedStatus, PortUse, ServiceStatus, Status, TableStatus, Traffic},
    dataplane::{BackendRef, DataPlane, FlowTable, TrafficOf},
    model::{Proto, ServiceId, be_port, port_from, settings::NatMode},
    table,
};

/// A counter kept outside the controller (the flow-log writer's), shown
/// in `status` and the metrics.
pub type SharedCounter = (String, Arc<std::sync::atomic::AtomicU64>);

impl<D: DataPlane> Controller<D> {
    /// Shows `counters` in the status report.
    pub fn with_counters(mut self, counters: Vec<SharedCounter>) -> Self {
        self.shared_counters = counters;
        self
    }

    pub fn status(&self) -> Result<Status> {
        let raw = self.dp.global_counters()?;
        let mut counters: BTreeMap<String, u64> =
            stats::LABELS.iter().map(|(i, label)| (label.to_string(), raw.get(*i as usize).copied().unwrap_or(0))).collect();
        counters.insert("rst_send_errors".into(), self.rst_send_errors);
        let icmp_errors = lb_common::icmp::KINDS
            .iter()
            .map(|(k, kind)| {
                let by_outcome = lb_common::icmp::OUTCOMES
                    .iter()
                    .map(|(o, outcome)| (outcome.to_string(), raw.get(stats::icmp_error(*k, *o) as usize).copied().unwrap_or(0)))
                    .collect();
                (kind.to_string(), by_outcome)
            })
            .collect();
        for (name, c) in &self.shared_counters {
            counters.insert(name.clone(), c.load(Ordering::Relaxed));
        }
        // The kernel's LRU does not report evictions: what was created and
        // is neither removed (by the program or the controller) nor present
        // was evicted. All three as of the latest walk (counted as it
        // started, present as it found them): a burst since then is not
        // taken for evictions. Exact while this daemon has run since the
        // data plane was loaded.
        let snap = &self.snapshot;
        let present = snap.counts.established + snap.counts.half_open;
        counters.insert("table_evictions".into(), snap.totals.created.saturating_sub(snap.totals.removed + present));
        let now = Instant::now();
        let ports = &snap.ports;
        let mut services = Vec::new();
        for (sid, svc) in &self.services {
            let slots: Vec<&crate::model::BackendSlot> = svc.slots().collect();
            let ids: Vec<u32> = slots.iter().map(|b| b.id).collect();
            let traffic = self.dp.traffic(TrafficOf::Backends, &ids)?;
            let mut backends = Vec::new();
            let mut active_total = 0;
            // Packets and bytes are counted per backend in the data plane.
            let mut svc_traffic = self.dp.traffic(TrafficOf::Services, &[svc.id])?.first().copied().unwrap_or_default();
            for t in traffic.iter().chain(std::iter::once(&svc.freed_traffic)) {
                svc_traffic.packets_in += t.packets_in;
                svc_traffic.bytes_in += t.bytes_in;
                svc_traffic.packets_out += t.packets_out;
                svc_traffic.bytes_out += t.bytes_out;
            }
            for (slot, t) in slots.iter().zip(traffic) {
                let active = snap.backend(slot.id).active;
                active_total += active;
                backends.push(BackendStatus {
                    backend: slot.addr,
                    id: slot.id,
                    weight: slot.weight,
                    state: slot.lifecycle().name().into(),
                    registered: slot.registered,
                    healthy: slot.health.healthy,
                    last_health_error: slot.health.last_error.clone(),
                    resets: self.backend_resets.get(&slot.id).copied().unwrap_or_default(),
                    drain_remaining_s: slot.drain.and_then(|d| d.deadline).map(|d| d.saturating_duration_since(now).as_secs_f64()),
                    snat_ports: (svc.settings.mode == NatMode::Fullnat).then(|| PortUse {
                        in_use: ports.get(&(addr_from_ip(slot.addr.ip()), be_port(slot.addr.port()))).copied().unwrap_or(0),
                        pool: svc.settings.snat_ports.ports() as u64,
                    }),
                    active_flows: active,
                    traffic: t.into(),
                });
            }
            services.push(ServiceStatus {
                service: sid.addr,
                proto: sid.proto,
                id: svc.id,
                scheduler: svc.settings.scheduler.to_string(),
                settings: svc.settings.clone(),
                active_flows: active_total,
                resets: svc.resets,
                traffic: Traffic::from(svc_traffic),
                backends,
                named_backends: svc
                    .named
                    .iter()
                    .map(|(name, n)| NamedStatus {
                        backend: name.to_string(),
                        weight: n.weight,
                        addresses: n.addrs.iter().map(|a| SocketAddr::new(*a, name.port)).collect(),
                        ttl_s: n.ttl.as_secs_f64(),
                        next_lookup_s: n.next_resolve.saturating_duration_since(now).as_secs_f64(),
                        last_error: n.last_error.clone(),
                    })
                    .collect(),
            });
        }
        let (capacity, half_open_capacity) = self.dp.capacity();
        Ok(Status {
            sync: self.sync.as_ref().map(|s| crate::ha::SyncStatus { dropped_records: s.dropped.load(Ordering::Relaxed), ..s.status.clone() }),
            interfaces: self.dp.attachments(),
            table: TableStatus {
                entries: snap.counts.established,
                capacity_flows: capacity as u64,
                half_open_entries: snap.counts.half_open,
                half_open_capacity_flows: half_open_capacity as u64,
                snapshot_age_s: snap.taken_at.map(|t| now.saturating_duration_since(t).as_secs_f64()),
            },
            counters,
            icmp_errors,
            services,
        })
    }
}

/// The flows of the table (of one service, if given), for `xlb flows`:
/// walks the table through its own handle (call it off the controller);
/// `backends` names the backends by id.
pub fn flows(table: &dyn FlowTable, filter: Option<ServiceId>, backends: &HashMap<u32, BackendRef>) -> Result<Vec<FlowInfo>> {
    let now = table.now()?;
    let hz = table.hz().max(1) as f64;
    let mut out = Vec::new();
    table.walk(&mut |f| {
        let k = f.key;
        let Some(proto) = Proto::from_number(k.proto) else { return };
        let service = SocketAddr::new(addr_to_ip(&k.dst_addr), port_from(k.dst_port));
        if filter.is_some_and(|s| s.addr != service || s.proto != proto) {
            return;
        }
        let state = match proto {
            Proto::Udp => "none",
            Proto::Tcp => tcp::state_name(f.combined_state()),
        };
        let b = backends.get(&f.backend_id()).copied().unwrap_or_default();
        let secs = |t: u32| now.wrapping_sub(t) as f64 / hz;
        out.push(FlowInfo {
            client: SocketAddr::new(addr_to_ip(&k.src_addr), port_from(k.src_port)),
            service,
            proto,
            backend: SocketAddr::new(addr_to_ip(&b.addr), port_from(b.port)),
            snat: f.is_fullnat().then(|| SocketAddr::new(addr_to_ip(&b.snat), port_from(f.state.snat_port))),
            state: state.into(),
            age_s: secs(f.state.created),
            idle_s: table::idle(f, now, hz as u32).as_secs_f64(),
        });
    })?;
    out.sort_by_key(|f| (f.service, f.client));
    Ok(out)
}
