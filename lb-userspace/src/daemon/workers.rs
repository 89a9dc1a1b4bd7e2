//! The two threads that do the table work the controller must never wait
//! for: the table walker (snapshots, expiry, the sync refresh) and the
//! reset worker (reset jobs, each on a thread of its own so a job spread
//! over minutes holds up no other).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc as std_mpsc,
    },
    time::{Duration, Instant},
};

use super::actor::Handle;
use crate::{
    dataplane::{FlowTable, KernelTable},
    ha::REFRESH,
    resets::{self, rst::RstSender},
    table,
};

/// Walks the table, hands the snapshot and the decisions to the
/// controller, removes what expired. Runs until the actor is gone or
/// `stop` is set.
pub fn walker(table: KernelTable, ctl: Handle, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let Some((rules, interval)) = ctl.call_blocking(|c| (c.walk_rules(), c.walk_interval())) else { return };
        let now = match table.now() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "reading the data plane's clock failed: no walk");
                pause_until(started + interval, &stop);
                continue;
            }
        };
        match table::walk(&table, &rules, now, &mut |_| {}) {
            Ok((snap, decisions)) => {
                // Removed only if still as the walk saw them (re-checked
                // per flow): a flow that revived meanwhile stays.
                let expired = table::expire(&table, &decisions);
                let took = snap.took;
                ctl.post_blocking(move |c| {
                    if let Err(e) = c.on_snapshot(snap) {
                        tracing::warn!(error = %e, "applying a table snapshot failed");
                    }
                    match expired {
                        Ok(e) => c.on_expired(&e),
                        Err(e) => tracing::warn!(error = %e, "expiring idle flows failed"),
                    }
                    c.idle_reset_jobs(&decisions);
                });
                tracing::trace!(?took, "table walked");
            }
            Err(e) => tracing::warn!(error = %e, "walking the table failed"),
        }
        // The next walk when due (`interval` grows with the table).
        pause_until(started + interval, &stop);
    }
}

/// As sync master, sends every established flow to the peer every
/// `REFRESH` (heals lost datagrams, keeps the peer's copies alive), or less
/// often when the table is big (a refresh walk never takes more than a
/// fifth of a CPU). Flows in their handshake are not sent: a SYN flood on
/// the master must not reach the standby's table. Waits for room on the
/// queue's refresh lane rather than dropping.
pub fn refresher(table: KernelTable, out: super::sync::Outbound, ctl: Handle, stop: Arc<AtomicBool>) {
    let mut wait = REFRESH;
    while !stop.load(Ordering::Relaxed) {
        pause_until(Instant::now() + wait, &stop);
        if !out.is_master() || stop.load(Ordering::Relaxed) {
            continue;
        }
        let started = Instant::now();
        // Backends are named by address in records (ids differ between nodes).
        let Some(backends) = ctl.call_blocking(|c| c.backend_refs()) else { return };
        let now = match table.now() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "reading the data plane's clock failed: no sync refresh");
                continue;
            }
        };
        let hz = table.hz();
        let mut open = true;
        let walked = table.walk(&mut |f| {
            if open
                && !f.half_open
                && let Some(b) = backends.get(&f.backend_id())
            {
                open = out.refresh(f, table::idle(f, now, hz), b);
            }
        });
        if let Err(e) = walked {
            tracing::warn!(error = %e, "walking the table for a sync refresh failed");
        }
        if !open {
            return; // the sending task is gone
        }
        wait = REFRESH.max(started.elapsed() * 5);
    }
}

/// Sleeps until `t`, waking early when `stop` is set.
fn pause_until(t: Instant, stop: &AtomicBool) {
    while Instant::now() < t && !stop.load(Ordering::Relaxed) {
        std::thread::sleep((t - Instant::now()).min(Duration::from_millis(100)));
    }
}

/// Runs reset jobs as they come, each on its own thread; outcomes go back
/// to the controller.
pub fn reset_worker(jobs: std_mpsc::Receiver<resets::Job>, table: KernelTable, sender: Option<Arc<RstSender>>, ctl: Handle) {
    while let Ok(job) = jobs.recv() {
        let (table, sender, ctl) = (table.clone(), sender.clone(), ctl.clone());
        let spawned = std::thread::Builder::new().name("xlb-reset".into()).spawn(move || {
            let backend = match job.target {
                resets::Target::Backend(id) => Some(id),
                _ => None,
            };
            resets::run(&table as &dyn FlowTable, sender.as_deref(), &job, &mut |o| {
                ctl.post_blocking(move |c| c.on_reset(o, backend));
            });
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "starting a reset thread failed: the data plane resets those flows on their next packet");
        }
    }
}
