//! Proactive resets: jobs that find a backend's (or a service's, or a
//! list of idle) flows, remove each one only if it is still the flow that
//! was decided about, and send RSTs to both ends of the ones removed. A
//! job may be spread over a window (`--reset-spread`): each part is
//! re-checked when its turn comes, so a connection made on the same
//! 5-tuple in the meantime is never touched.
//!
//! Jobs run on their own thread (the daemon's reset worker), never on the
//! controller's; results come back as [`Outcome`]s.

pub mod rst;

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use crate::{
    dataplane::{BackendRef, Flow, FlowRef, FlowTable},
    model::{ResetCause, ServiceId},
};

/// Which flows a job resets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Every flow of this backend id.
    Backend(u32),
    /// Every flow of this service id.
    Service(u32),
    /// These flows, as decided (idle expiry with reset).
    Flows(Vec<FlowRef>),
}

#[derive(Clone, Debug)]
pub struct Job {
    pub service: ServiceId,
    /// For logs.
    pub backend: Option<SocketAddr>,
    pub cause: ResetCause,
    pub target: Target,
    pub spread: Duration,
    /// The addresses of the backends whose flows the job may reset, by id
    /// (the RST to a backend is addressed from the model, not the table).
    pub backends: HashMap<u32, BackendRef>,
}

/// What (part of) a job did.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub service: Option<ServiceId>,
    pub cause: Option<ResetCause>,
    /// TCP flows reset (RSTs sent), by backend id.
    pub reset_by_backend: HashMap<u32, u64>,
    /// Every flow removed (for flow logs and the sync peer).
    pub removed: Vec<Flow>,
    pub send_errors: u64,
    pub last_sent: Option<Instant>,
    /// The job is over (its last part).
    pub done: bool,
}

/// Runs `job` on `table`: finds its flows, then removes and resets them,
/// paced over the job's spread; `sender` sends the RSTs (none: removal
/// only). Each part's outcome goes to `report`.
pub fn run(table: &dyn FlowTable, sender: Option<&rst::RstSender>, job: &Job, report: &mut dyn FnMut(Outcome)) {
    let decided: Vec<FlowRef> = match &job.target {
        Target::Flows(f) => f.clone(),
        Target::Backend(id) => collect(table, |f| f.backend_id() == *id),
        Target::Service(id) => collect(table, |f| f.service_id() == *id),
    };
    let n = decided.len();
    if n == 0 {
        report(Outcome { service: Some(job.service), cause: Some(job.cause), done: true, ..Outcome::default() });
        return;
    }
    if job.spread.is_zero() || n < 2 {
        report(Outcome { done: true, ..reset_part(table, sender, job, &decided) });
        return;
    }
    tracing::info!(service = %job.service, backend = ?job.backend, flows = n, spread = ?job.spread, "spreading resets");
    let start = Instant::now();
    let mut done = 0;
    while done < n {
        let elapsed = start.elapsed();
        let due = if elapsed >= job.spread { n } else { (((n as u128 * elapsed.as_nanos()) / job.spread.as_nanos()) as usize + 1).min(n) };
        if due > done {
            let mut o = reset_part(table, sender, job, &decided[done..due]);
            o.done = due == n;
            report(o);
            done = due;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn collect(table: &dyn FlowTable, keep: impl Fn(&Flow) -> bool) -> Vec<FlowRef> {
    let mut out = Vec::new();
    let walked = table.walk(&mut |f| {
        if keep(f) {
            out.push(FlowRef { flow: *f, idle: false });
        }
    });
    if let Err(e) = walked {
        tracing::warn!(error = %e, "walking the table for a reset failed");
    }
    out
}

/// Removes what is still as decided and resets the TCP flows among them
/// that were not over.
fn reset_part(table: &dyn FlowTable, sender: Option<&rst::RstSender>, job: &Job, decided: &[FlowRef]) -> Outcome {
    let mut o = Outcome { service: Some(job.service), cause: Some(job.cause), ..Outcome::default() };
    let removed = match table.remove_if_unchanged(decided) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "removing reset flows from the table failed");
            return o;
        }
    };
    let mut rsts = Vec::new();
    for f in &removed {
        if f.is_tcp() && f.is_active() {
            rsts.push(f.client_rst());
            // A DSR backend is reached only through the tunnel: it learns on
            // its next packet (the data plane answers it).
            if !f.is_dsr()
                && let Some(r) = job.backends.get(&f.backend_id()).and_then(|b| f.backend_rst(b))
            {
                rsts.push(r);
            }
            *o.reset_by_backend.entry(f.backend_id()).or_default() += 1;
        }
    }
    if let Some(tx) = sender
        && !rsts.is_empty()
    {
        let (failed, err) = tx.send_all(&rsts);
        if failed > 0 {
            o.send_errors = failed as u64;
            tracing::warn!(failed, error = ?err, "some RSTs could not be sent");
        }
        o.last_sent = Some(Instant::now());
    }
    o.removed = removed;
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        dataplane::{DataPlane, fake::FakeDataPlane},
        model::Proto,
    };
    use lb_common::tcp;

    fn job(target: Target) -> Job {
        Job {
            service: ServiceId { addr: "10.99.0.1:80".parse().expect("a"), proto: Proto::Tcp },
            backend: None,
            cause: ResetCause::Removed,
            target,
            spread: Duration::ZERO,
            backends: HashMap::new(),
        }
    }

    #[test]
    fn a_backend_job_resets_only_that_backends_live_flows() {
        let t = FakeDataPlane::new(64, 64).table();
        for p in 0..6 {
            t.put(crate::table::tests_support::flow(p, if p < 4 { 1 } else { 2 }, if p == 3 { tcp::STATE_CLOSED } else { tcp::STATE_ESTABLISHED }, 5));
        }
        let mut outcomes = Vec::new();
        run(&t, None, &job(Target::Backend(1)), &mut |o| outcomes.push(o));
        assert_eq!(outcomes.len(), 1);
        assert!(outcomes[0].done);
        assert_eq!(outcomes[0].removed.len(), 4, "every flow of backend 1 goes");
        assert_eq!(outcomes[0].reset_by_backend.get(&1), Some(&3), "three were live: reset; the closed one just goes");
        assert_eq!(t.len(), 2, "backend 2's flows stay");
    }

    #[test]
    fn a_spread_job_rechecks_each_part_when_its_turn_comes() {
        let t = FakeDataPlane::new(64, 64).table();
        for p in 0..20 {
            t.put(crate::table::tests_support::flow(p, 1, tcp::STATE_ESTABLISHED, 5));
        }
        let mut j = job(Target::Backend(1));
        j.spread = Duration::from_millis(200);
        let mut removed = 0;
        let mut replaced = false;
        run(&t, None, &j, &mut |o| {
            removed += o.removed.len();
            if !replaced {
                // A new connection takes one of the remaining 5-tuples.
                let mut f = crate::table::tests_support::flow(19, 1, tcp::STATE_SYN, 9);
                f.state.created = 9;
                t.put(f);
                replaced = true;
            }
        });
        assert_eq!(removed, 19, "the new connection on a decided 5-tuple is left alone");
        assert_eq!(t.len(), 1);
    }
}
