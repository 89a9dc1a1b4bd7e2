//! The two threads that do the table work the controller must never wait
//! for: the table walker (snapshots, expiry, the sync refresh) and the
//! reset worker (reset jobs, each on a thread of its own so a job spread
//! over minutes holds up no other).

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc as std_mpsc, Arc,
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
/// controller, removes what expired; as sync master, sends every flow to
/// the peer every `REFRESH` (heals lost datagrams, keeps the peer's copies
/// alive). Runs until the actor is gone or `stop` is set.
pub fn walker(table: KernelTable, ctl: Handle, sync: Option<super::sync::Outbound>, stop: Arc<AtomicBool>) {
    let mut last_refresh = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let Some((rules, interval)) = ctl.call_blocking(|c| (c.walk_rules(), c.walk_interval())) else { return };
        let refresh = sync.as_ref().filter(|s| s.is_master() && last_refresh.elapsed() >= REFRESH);
        let now = table::monotonic_ns();
        let walked = table::walk(&table, &rules, now, &mut |f| {
            // Established flows only: a SYN flood must not reach the peer.
            if let Some(s) = refresh
                && !f.half_open
            {
                s.live(f, now);
            }
        });
        if refresh.is_some() {
            last_refresh = Instant::now();
        }
        match walked {
            Ok((snap, decisions)) => {
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
        let next = started + interval;
        while Instant::now() < next && !stop.load(Ordering::Relaxed) {
            std::thread::sleep((next - Instant::now()).min(Duration::from_millis(100)));
        }
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
