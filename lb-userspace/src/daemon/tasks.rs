//! The daemon's async tasks around the controller: upkeep and health
//! checkers, DNS lookups, BGP announcements, next hops kept resolved, and
//! the data plane's flow events. Each talks to the controller through its
//! mailbox and does its own waiting (probes, lookups, netlink) off it.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use lb_common::maps::FlowEnd;

use super::{actor::Handle, flowlog, sync::Outbound};
use crate::{
    controller::HealthTarget,
    dns::Resolver,
    ha::bgp::Announcer,
    host::neighbours::{self, Neighbour},
};

/// Every 200 ms: slow-start rings and drain deadlines (`Controller::tick`:
/// no table walk), and one health checker per checked backend, kept in
/// line with the configuration.
pub async fn upkeep(ctl: Handle) {
    let mut checkers: HashMap<u32, (HealthTarget, tokio::task::JoinHandle<()>)> = HashMap::new();
    let mut every = tokio::time::interval(Duration::from_millis(200));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let targets = ctl
            .call(|c| {
                if let Err(e) = c.tick(Instant::now()) {
                    tracing::warn!(error = %e, "periodic upkeep failed");
                }
                c.health_targets()
            })
            .await;
        let Some(targets) = targets else { return };
        let want: HashMap<u32, HealthTarget> = targets.into_iter().map(|t| (t.backend_id, t)).collect();
        checkers.retain(|id, (t, h)| {
            let keep = want.get(id) == Some(t);
            if !keep {
                h.abort();
            }
            keep
        });
        for (id, t) in want {
            checkers.entry(id).or_insert_with(|| (t.clone(), tokio::spawn(check_loop(ctl.clone(), t))));
        }
    }
}

/// Probes one backend on a fixed cadence (a slow probe does not stretch the
/// interval: detection takes at most fall × interval).
async fn check_loop(ctl: Handle, t: HealthTarget) {
    let mut every = tokio::time::interval(t.check.interval.0);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let result = crate::health::probe(t.addr, &t.check).await;
        let id = t.backend_id;
        let addr = t.addr;
        ctl.post(move |c| {
            if let Err(e) = c.health_result(id, result) {
                tracing::warn!(backend = %addr, error = %e, "applying a health result failed");
            }
        })
        .await;
    }
}

/// Looks up every backend name whose answer ran out, concurrently and off
/// the controller, and hands the answers to it.
pub async fn names(ctl: Handle, resolver: Arc<Resolver>) {
    let mut every = tokio::time::interval(Duration::from_millis(200));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(due) = ctl.call(|c| c.dns_due(Instant::now())).await else { return };
        if due.is_empty() {
            continue;
        }
        let lookups: Vec<_> = due
            .into_iter()
            .map(|(sid, name)| {
                let r = resolver.clone();
                tokio::spawn(async move {
                    let answer = r.resolve(&name.host).await;
                    (sid, name, answer)
                })
            })
            .collect();
        let mut answers = Vec::with_capacity(lookups.len());
        for l in lookups {
            if let Ok(a) = l.await {
                answers.push(a);
            }
        }
        ctl.post(move |c| {
            for (sid, name, answer) in answers {
                if let Err(e) = c.dns_apply(sid, &name, answer, Instant::now()) {
                    tracing::warn!(service = %sid, backend = %name, error = %e, "applying a DNS answer failed");
                }
            }
        })
        .await;
    }
}

/// Keeps BIRD's include file in line with the VIPs that have a backend to
/// serve them (every 500 ms; BIRD is told off the async workers).
pub async fn announce(ctl: Handle, announcer: Arc<std::sync::Mutex<Announcer>>) {
    let mut every = tokio::time::interval(Duration::from_millis(500));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(vips) = ctl.call(|c| c.announced_vips()).await else { return };
        let a = announcer.clone();
        let _ = tokio::task::spawn_blocking(move || a.lock().map(|mut a| a.set(&vips)).unwrap_or(false)).await;
    }
}

/// Withdraws every VIP from BGP; true when BIRD took it.
pub async fn withdraw(announcer: Arc<std::sync::Mutex<Announcer>>) -> bool {
    tokio::task::spawn_blocking(move || announcer.lock().map(|mut a| a.set(&[])).unwrap_or(false)).await.unwrap_or(false)
}

/// Keeps the next hops of the backends and of the routes' gateways
/// resolved (`host::neighbours`): at once when the backends or interfaces
/// change, and every 10 s (routes change too). Netlink calls block: they
/// run off the async workers.
pub async fn next_hops(ctl: Handle) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_inputs = None;
    let mut last_full = Instant::now();
    loop {
        every.tick().await;
        let Some((inputs, ours)) = ctl.call(|c| (c.next_hop_inputs(), c.managed_neighbours().clone())).await else { return };
        if last_inputs.as_ref() == Some(&inputs) && last_full.elapsed() < Duration::from_secs(10) {
            continue;
        }
        last_full = Instant::now();
        let (backends, ifindexes): (Vec<IpAddr>, Vec<u32>) = inputs.clone();
        let done = tokio::task::spawn_blocking(move || -> std::io::Result<BTreeSet<Neighbour>> {
            let mut nl = neighbours::Netlink::open()?;
            let want = neighbours::wanted(&mut nl, &backends, &ifindexes)?;
            let mut ours = ours;
            neighbours::reconcile(&mut nl, &mut ours, &want);
            Ok(ours)
        })
        .await;
        match done {
            Ok(Ok(ours)) => {
                ctl.post(move |c| c.set_managed_neighbours(ours)).await;
                last_inputs = Some(inputs);
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "reading routes for the next hops to keep resolved failed (the kernel resolves them on demand)"),
            Err(e) => tracing::warn!(error = %e, "the next-hop task panicked"),
        }
    }
}

/// Keeps the data plane's list of this host's own addresses current
/// (`ADDR_LOCAL`: a backend's packet to one of them that belongs to no flow
/// is the host's, e.g. a health check's answer): now and every 2 s.
pub async fn local_addresses(ctl: Handle) {
    let mut every = tokio::time::interval(Duration::from_secs(2));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<BTreeSet<IpAddr>> = None;
    loop {
        every.tick().await;
        let found = tokio::task::spawn_blocking(|| neighbours::Netlink::open()?.local_addresses()).await;
        let addrs: BTreeSet<IpAddr> = match found {
            Ok(Ok(a)) => a.into_iter().collect(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading this host's addresses failed");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the address task panicked");
                continue;
            }
        };
        if last.as_ref() == Some(&addrs) {
            continue;
        }
        last = Some(addrs.clone());
        let Some(r) = ctl.call(move |c| c.set_local_addrs(addrs)).await else { return };
        if let Err(e) = r {
            tracing::warn!(error = %e, "writing this host's addresses to the data plane failed");
            last = None;
        }
    }
}

/// Reads the data plane's flow events (new flows, flows it removed) into
/// the flow log and, as master, to the sync peer; the controller is not
/// involved. Always drained (even with neither) so the buffer never stays
/// full.
pub async fn flow_events(rb: aya::maps::RingBuf<aya::maps::MapData>, log: Option<flowlog::Sender>, sync: Option<Outbound>) {
    // SAFETY: the ring buffer owns its map fd, which stays open and the same
    // for as long as the AsyncFd owns the ring buffer.
    let mut fd = match unsafe { tokio::io::unix::AsyncFd::register(rb) } {
        Ok(fd) => fd,
        Err(e) => {
            let e = e.into_parts().1;
            tracing::error!(error = %e, "cannot poll the flow event ring buffer: no flow logs or sync records for the data plane's own changes");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "polling the flow event ring buffer failed");
                return;
            }
        };
        {
            let rb = guard.get_inner_mut();
            while let Some(item) = rb.next() {
                if item.len() < std::mem::size_of::<FlowEnd>() {
                    continue;
                }
                // SAFETY: the program writes whole FlowEnd records (Pod).
                let ev = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEnd>()) };
                if let Some(l) = &log {
                    l.send(ev);
                }
                if let Some(s) = &sync {
                    s.event(&ev);
                }
            }
        }
        guard.clear_ready();
    }
}
