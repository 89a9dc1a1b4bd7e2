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

use lb_common::maps::{DIR_TO_BACKEND, FlowEntry, addr_to_ip};

use super::{Controller, Result, bad};
use crate::{
    dataplane::{DataPlane, Flow, FlowTable},
    ha::{Kind, Record, Role, SyncStatus},
    model::{Proto, ServiceId, port_from},
    table::monotonic_ns,
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
        let now = monotonic_ns();
        let mut ends = Vec::new();
        let (mut applied, mut unknown) = (0u64, 0u64);
        for r in records {
            let f = &r.flow;
            let key = f.key;
            if r.kind == Kind::End {
                ends.push(key);
                ends.push(f.to_backend.peer_key(key.proto));
                applied += 1;
                continue;
            }
            let Some(proto) = Proto::from_number(key.proto) else {
                unknown += 1;
                continue;
            };
            let sid = ServiceId { addr: SocketAddr::new(addr_to_ip(&key.dst_addr), port_from(key.dst_port)), proto };
            let backend = SocketAddr::new(addr_to_ip(&f.to_backend.nat_dst), port_from(f.to_backend.nat_dport));
            let ids = self.services.get(&sid).and_then(|svc| Some((svc.id, svc.slots().find(|b| b.addr == backend)?.id)));
            let Some((service_id, backend_id)) = ids else {
                unknown += 1;
                continue;
            };
            let last = now.saturating_sub(r.idle.as_nanos() as u64);
            let fwd = FlowEntry { backend_id, service_id, created_ns: last, last_seen_ns: last, direction: DIR_TO_BACKEND, ..f.to_backend };
            let mut rev = f.to_client;
            if rev.direction == DIR_TO_BACKEND || rev == FlowEntry::default() {
                rev.fill_reverse_of(&key, &fwd, last);
            }
            rev.backend_id = backend_id;
            rev.service_id = service_id;
            rev.created_ns = last;
            rev.last_seen_ns = last;
            self.table.install(&Flow::joined(key, fwd, Some(rev), false), now)?;
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
