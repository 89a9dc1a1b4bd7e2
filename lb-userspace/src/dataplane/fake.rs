//! An in-memory data plane for the controller's unit tests (no root, no
//! kernel): it records every configuration map as the kernel would hold
//! it, keeps a flow table tests fill by hand, and fails a chosen operation
//! on request so partial failures can be tested.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
};

use lb_common::maps::{Addr, Backend, EndpointEntry, EndpointKey, FlowKey, Globals, PortFilter, PortOwner, ServiceEntry, ServiceKey, TrafficCounters};

use super::{Attachment, DataPlane, DataplaneError, Flow, FlowRef, FlowTable, Result, TableCounts, TrafficOf};

/// What the fake's maps hold (shared by the data plane and its table
/// handles).
#[derive(Default)]
pub struct FakeState {
    pub services: HashMap<ServiceKey, ServiceEntry>,
    pub addrs: HashMap<Addr, u32>,
    pub backends: BTreeMap<u32, Backend>,
    /// Ring slots per service id (as long as the longest ring written).
    pub rings: HashMap<u32, Vec<u32>>,
    pub globals: Globals,
    pub endpoints: HashMap<EndpointKey, EndpointEntry>,
    pub port_filter: Box<PortFilter>,
    pub active: HashMap<u32, u64>,
    pub counters: Vec<u64>,
    pub service_traffic: HashMap<u32, TrafficCounters>,
    pub backend_traffic: HashMap<u32, TrafficCounters>,
    /// Flows by their client → VIP key.
    pub flows: BTreeMap<FlowKeyOrd, Flow>,
    /// Full-NAT ports: backend → balancer key → holder.
    pub ports: HashMap<FlowKey, PortOwner>,
    /// The data plane's clock (jiffies; the fake runs at 1000 Hz).
    pub now: u32,
    pub removed_entries: u64,
    /// Operation names that fail next time (`ring_write`, `backend_set`,
    /// `service_set`, `addr_set`, ...), each once.
    pub fail: Vec<&'static str>,
    /// Every configuration write, in order (for tests of ordering).
    pub log: Vec<String>,
    pub attachments: Vec<Attachment>,
    /// Walks of the flow table so far (reports must not walk).
    pub walks: u64,
}

/// `FlowKey` ordered (a `BTreeMap` keeps walks deterministic).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowKeyOrd([u8; 40]);

impl From<&FlowKey> for FlowKeyOrd {
    fn from(k: &FlowKey) -> Self {
        // SAFETY: FlowKey is 40 bytes, repr(C), integers only.
        FlowKeyOrd(unsafe { std::mem::transmute_copy::<FlowKey, [u8; 40]>(k) })
    }
}

/// The fake data plane.
#[derive(Clone, Default)]
pub struct FakeDataPlane {
    state: Arc<Mutex<FakeState>>,
    capacity: (u32, u32),
}

/// The fake's table handle.
#[derive(Clone)]
pub struct FakeTable {
    state: Arc<Mutex<FakeState>>,
}

fn lock(s: &Mutex<FakeState>) -> MutexGuard<'_, FakeState> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeState {
    fn check(&mut self, op: &'static str) -> Result<()> {
        if let Some(i) = self.fail.iter().position(|f| *f == op) {
            self.fail.remove(i);
            return Err(DataplaneError::Syscall { op, map: "FAKE", cause: std::io::Error::other("injected failure") });
        }
        Ok(())
    }
}

impl FakeDataPlane {
    pub fn new(conn_capacity: u32, half_open_capacity: u32) -> FakeDataPlane {
        let d = FakeDataPlane { state: Arc::default(), capacity: (conn_capacity, half_open_capacity) };
        d.state().counters = vec![0; lb_common::stats::COUNT as usize];
        d
    }

    /// The maps, to inspect or to change (tests).
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        lock(&self.state)
    }

    /// Makes the next `op` fail once.
    pub fn fail_next(&self, op: &'static str) {
        self.state().fail.push(op);
    }

    /// The backends a service's ring schedules to, in slot order.
    pub fn ring(&self, service_id: u32) -> Vec<u32> {
        let s = self.state();
        let len = s.services.values().find(|e| e.id == service_id).map_or(0, |e| e.ring_len as usize);
        s.rings.get(&service_id).map(|r| r[..len.min(r.len())].to_vec()).unwrap_or_default()
    }
}

impl DataPlane for FakeDataPlane {
    type Table = FakeTable;

    fn table(&self) -> FakeTable {
        FakeTable { state: self.state.clone() }
    }
    fn service_set(&mut self, key: ServiceKey, entry: ServiceEntry) -> Result<()> {
        let mut s = self.state();
        s.check("service_set")?;
        s.log.push(format!("service_set {} len {}", entry.id, entry.ring_len));
        s.services.insert(key, entry);
        Ok(())
    }
    fn service_remove(&mut self, key: &ServiceKey) -> Result<()> {
        let mut s = self.state();
        s.check("service_remove")?;
        if let Some(e) = s.services.remove(key) {
            s.log.push(format!("service_remove {}", e.id));
        }
        Ok(())
    }
    fn addr_set(&mut self, addr: Addr, flags: u32) -> Result<()> {
        let mut s = self.state();
        s.check("addr_set")?;
        if flags == 0 {
            s.addrs.remove(&addr);
        } else {
            s.addrs.insert(addr, flags);
        }
        Ok(())
    }
    fn backend_set(&mut self, id: u32, b: Backend) -> Result<()> {
        let mut s = self.state();
        s.check("backend_set")?;
        s.log.push(format!("backend_set {id} state {}", b.state));
        s.backends.insert(id, b);
        Ok(())
    }
    fn ring_write(&mut self, service_id: u32, _old: &[u32], new: &[u32]) -> Result<()> {
        let mut s = self.state();
        s.check("ring_write")?;
        s.log.push(format!("ring_write {service_id} {}", new.len()));
        let r = s.rings.entry(service_id).or_default();
        if r.len() < new.len() {
            r.resize(new.len(), 0);
        }
        r[..new.len()].copy_from_slice(new);
        Ok(())
    }
    fn globals_set(&mut self, g: Globals) -> Result<()> {
        let mut s = self.state();
        s.check("globals_set")?;
        s.globals = g;
        Ok(())
    }
    fn port_filter_set(&mut self, f: &PortFilter) -> Result<()> {
        let mut s = self.state();
        s.check("port_filter_set")?;
        *s.port_filter = *f;
        Ok(())
    }
    fn endpoint_set(&mut self, key: EndpointKey, entry: Option<EndpointEntry>) -> Result<()> {
        let mut s = self.state();
        s.check("endpoint_set")?;
        match entry {
            Some(e) => {
                s.log.push(format!("endpoint_set {}", e.count));
                s.endpoints.insert(key, e);
            }
            None => {
                s.endpoints.remove(&key);
            }
        }
        Ok(())
    }
    fn backend_active_set(&mut self, id: u32, count: u64) -> Result<()> {
        self.state().active.insert(id, count);
        Ok(())
    }
    fn reset_traffic(&mut self, service_id: Option<u32>, backend_id: Option<u32>) -> Result<()> {
        let mut s = self.state();
        s.check("reset_traffic")?;
        if let Some(i) = service_id {
            s.service_traffic.remove(&i);
        }
        if let Some(i) = backend_id {
            s.backend_traffic.remove(&i);
        }
        Ok(())
    }
    fn global_counters(&self) -> Result<Vec<u64>> {
        Ok(self.state().counters.clone())
    }
    fn traffic(&self, of: TrafficOf, ids: &[u32]) -> Result<Vec<TrafficCounters>> {
        let s = self.state();
        let m = match of {
            TrafficOf::Services => &s.service_traffic,
            TrafficOf::Backends => &s.backend_traffic,
        };
        Ok(ids.iter().map(|i| m.get(i).copied().unwrap_or_default()).collect())
    }
    fn attachments(&self) -> Vec<Attachment> {
        self.state().attachments.clone()
    }
    fn capacity(&self) -> (u32, u32) {
        self.capacity
    }
}

impl FakeTable {
    fn state(&self) -> MutexGuard<'_, FakeState> {
        lock(&self.state)
    }

    /// Sets the data plane's clock (jiffies, 1000 a second).
    pub fn set_now(&self, now: u32) {
        self.state().now = now;
    }

    /// Puts a flow in the table as the data plane would (tests).
    pub fn put(&self, f: Flow) {
        self.state().flows.insert((&f.key).into(), f);
    }

    /// The flow of `key`, if any.
    pub fn get(&self, key: &FlowKey) -> Option<Flow> {
        self.state().flows.get(&key.into()).copied()
    }

    pub fn len(&self) -> usize {
        self.state().flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl FlowTable for FakeTable {
    fn walk(&self, f: &mut dyn FnMut(&Flow)) -> Result<TableCounts> {
        // Copied out first: `f` may call back into the table.
        let flows: Vec<Flow> = {
            let mut s = self.state();
            s.walks += 1;
            s.flows.values().copied().collect()
        };
        let mut counts = TableCounts::default();
        for fl in &flows {
            if fl.half_open {
                counts.half_open += 1;
            } else {
                counts.established += 1;
            }
            f(fl);
        }
        Ok(counts)
    }
    fn remove_if_unchanged(&self, decided: &[FlowRef]) -> Result<Vec<Flow>> {
        let mut s = self.state();
        s.check("remove_if_unchanged")?;
        let mut gone = Vec::new();
        for d in decided {
            let k: FlowKeyOrd = (&d.flow.key).into();
            let Some(now) = s.flows.get(&k).copied() else { continue };
            if d.flow.unchanged_in(&now, d.idle) {
                s.flows.remove(&k);
                s.removed_entries += 1;
                gone.push(now);
            }
        }
        Ok(gone)
    }
    fn remove_keys(&self, keys: &[FlowKey]) -> Result<usize> {
        let mut s = self.state();
        let n = keys.iter().filter(|k| s.flows.remove(&(*k).into()).is_some()).count();
        s.removed_entries += n as u64;
        Ok(n)
    }
    fn install(&self, flow: &Flow, port: Option<FlowKey>) -> Result<()> {
        let mut s = self.state();
        s.check("install")?;
        if let Some(p) = port {
            s.ports.insert(p, PortOwner { flow: flow.key, claimed: flow.state.created, _pad: 0 });
        }
        s.flows.insert((&flow.key).into(), *flow);
        Ok(())
    }
    fn for_each_port(&self, f: &mut dyn FnMut(&FlowKey, &PortOwner)) -> Result<()> {
        let ports: Vec<(FlowKey, PortOwner)> = self.state().ports.iter().map(|(k, v)| (*k, *v)).collect();
        for (k, v) in ports {
            f(&k, &v);
        }
        Ok(())
    }
    fn now(&self) -> Result<u32> {
        Ok(self.state().now)
    }
    fn hz(&self) -> u32 {
        1000
    }
    fn entries_removed(&self) -> u64 {
        self.state().removed_entries
    }
}
