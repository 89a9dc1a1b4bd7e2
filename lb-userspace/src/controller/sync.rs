//! The controller's side of state sync with an active/standby peer (the
//! wire format and admission are in `ha`): the role, and installing what
//! the peer sends, with service and backend ids translated through
//! addresses (the two nodes need the same services and backends, not the
//! same ids).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use lb_common::maps::{FlowState, addr_to_ip};

use super::{Controller, Result, bad};
use crate::{
    dataplane::{BackendRef, DataPlane, Flow, FlowTable},
    ha::{Kind, Record, Role, SyncStatus},
    model::{Proto, ServiceId, port_from},
};

/// This node's part in a pair.
pub struct SyncLink {
    pub status: SyncStatus,
    /// Whether this node is master, shared with the tasks that send (the
    /// data plane's own flow events go to the peer without the controller).
    pub master: Arc<AtomicBool>,
    /// Flow changes the sending queue had no room for (counted by the
    /// daemon's `Outbound`).
    pub dropped: Arc<AtomicU64>,
}

impl<D: DataPlane> Controller<D> {
    /// Enables state sync with `peer`, starting as `role`.
    pub fn with_sync(mut self, role: Role, peer: SocketAddr) -> Self {
        let master = Arc::new(AtomicBool::new(role == Role::Master));
        self.sync = Some(SyncLink { status: SyncStatus { role, peer: peer.to_string(), ..Default::default() }, master, dropped: Arc::default() });
        self
    }

    /// The shared "this node is master" flag and drop counter, if syncing.
    pub fn sync_shared(&self) -> Option<(Arc<AtomicBool>, Arc<AtomicU64>)> {
        self.sync.as_ref().map(|s| (s.master.clone(), s.dropped.clone()))
    }

    pub fn set_role(&mut self, role: Role) -> Result<Role> {
        let Some(s) = self.sync.as_mut() else {
            return Err(bad("this daemon has no sync peer (start it with --sync-listen, --sync-peer, --sync-key-file)".into()));
        };
        let old = std::mem::replace(&mut s.status.role, role);
        s.master.store(role == Role::Master, Ordering::Relaxed);
        if old != role {
            tracing::warn!(%old, new = %role, "role changed");
        }
        Ok(old)
    }

    /// The sync role, if syncing.
    pub fn role(&self) -> Option<Role> {
        self.sync.as_ref().map(|s| s.status.role)
    }

    /// Sync figures the daemon's tasks update.
    pub fn sync_status_mut(&mut self) -> Option<&mut SyncStatus> {
        self.sync.as_mut().map(|s| &mut s.status)
    }

    /// As backup, installs or removes flows the peer sent. A flow of a
    /// service or backend this node does not have is skipped (counted).
    pub fn sync_install(&mut self, records: &[Record]) -> Result<()> {
        let now = self.table.now()?;
        let hz = self.table.hz() as u128;
        let mut ends = Vec::new();
        let (mut applied, mut unknown) = (0u64, 0u64);
        for r in records {
            let f = &r.flow;
            let key = f.key;
            if r.kind == Kind::End {
                ends.push(key);
                applied += 1;
                continue;
            }
            let Some(proto) = Proto::from_number(key.proto) else {
                unknown += 1;
                continue;
            };
            let sid = ServiceId { addr: SocketAddr::new(addr_to_ip(&key.dst_addr), port_from(key.dst_port)), proto };
            let backend = SocketAddr::new(addr_to_ip(&f.backend), port_from(f.backend_port));
            let found = self.services.get(&sid).and_then(|svc| {
                let b = svc.slots().find(|b| b.addr == backend)?;
                Some((svc.id, b.id, BackendRef::from(&svc.backend_entry(b))))
            });
            let Some((service_id, backend_id, bref)) = found else {
                unknown += 1;
                continue;
            };
            // Its times on this node's clock; ids and the next hop are this
            // node's.
            let last = now.wrapping_sub((r.idle.as_millis() * hz / 1000) as u32);
            let state = FlowState { backend_id: backend_id as u16, service_id: service_id as u8, hop: 0, created: last, last_seen: last, ..f.state };
            let flow = Flow { key, state, half_open: false };
            self.table.install(&flow, flow.port_key(&bref))?;
            applied += 1;
        }
        if !ends.is_empty() {
            self.table.remove_keys(&ends)?;
        }
        if let Some(s) = self.sync.as_mut() {
            s.status.applied_records += applied;
            s.status.unknown_records += unknown;
        }
        Ok(())
    }
}
