//! `xlb daemon`: load, attach, apply the config, serve the API, and on
//! SIGINT/SIGTERM detach and remove the pins and the socket.

pub mod config;
pub mod flowlog;
pub mod metrics;
pub mod server;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Mutex,
};

use crate::{
    cli::DaemonArgs,
    daemon::config::Config,
    controller::{Controller, HealthTarget, SavedState},
    dataplane::{Dataplane, LoadOptions},
};

pub async fn run(args: DaemonArgs, socket: std::path::PathBuf) -> anyhow::Result<()> {
    // Everything that can be checked without side effects comes first.
    let config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let flow_log = match &args.flow_log {
        Some(p) => Some(crate::daemon::flowlog::FlowLog::open(p, args.flow_log_sample)?),
        None => None,
    };
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let listener = server::bind(&socket)?;
    let metrics_listener = match args.metrics_addr {
        Some(a) => match crate::daemon::metrics::bind(a).await {
            Ok(l) => Some(l),
            Err(e) => {
                let _ = std::fs::remove_file(&socket);
                return Err(e);
            }
        },
        None => None,
    };

    let sync = match sync_config(&args) {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    let result = start(&args, &config).await;
    // Bounded: flow changes beyond it are dropped and counted (healed by
    // the next refresh); refreshes wait for room.
    let (sync_tx, sync_rx) = crate::ha::queue();
    let ctl = match result {
        Ok(mut c) => {
            // New-flow records are a data-plane switch (off unless asked):
            // flow logs with --flow-log-new, and state sync, need them.
            let on = u32::from(args.flow_log_new || sync.is_some());
            match c.dataplane().setting_set(lb_common::maps::SETTING_LOG_NEW_FLOWS, on) {
                Err(e) => Err(anyhow::Error::from(e).context("setting the new-flow log switch")),
                Ok(()) => {
                    let c = match flow_log {
                        Some(l) => c.with_flow_log(l.with_new_flows(args.flow_log_new)),
                        None => c,
                    };
                    Ok(match &sync {
                        Some((cfg, _)) => c.with_sync(args.role, cfg.peer, sync_tx.clone()),
                        None => c,
                    })
                }
            }
        }
        Err(e) => Err(e),
    };
    let ctl = match ctl {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    save_state(&args.state_file, &ctl);
    tracing::info!(socket = %socket.display(), pins = %args.pin_dir.display(), state = %args.state_file.display(), "xlb daemon ready");
    let ctl = Arc::new(Mutex::new(ctl));
    let serving = tokio::spawn(server::serve(listener, ctl.clone(), args.state_file.clone()));
    let upkeep = tokio::spawn(upkeep(ctl.clone(), args.state_file.clone()));
    // Its own task: a slow or dead DNS server must not hold up expiry and
    // health checks.
    let sync_tasks: Vec<tokio::task::JoinHandle<()>> = match sync {
        Some((cfg, sock)) => {
            tracing::info!(listen = %cfg.listen, peer = %cfg.peer, role = %args.role, "state sync on");
            let sock = Arc::new(sock);
            vec![
                tokio::spawn(sync_send(sync_rx, sock.clone(), cfg.clone(), ctl.clone())),
                tokio::spawn(sync_receive(sock, cfg, ctl.clone())),
                tokio::spawn(sync_refresh(ctl.clone(), sync_tx)),
            ]
        }
        None => Vec::new(),
    };
    let announcer = match (&args.bird_include, &args.bird_socket) {
        (Some(i), Some(s)) => Some(Arc::new(std::sync::Mutex::new(crate::ha::bgp::Announcer::new(i.clone(), s.clone())))),
        _ => None,
    };
    let bgp = announcer.clone().map(|a| {
        let ctl = ctl.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_millis(500));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let vips = ctl.lock().await.announced_vips();
                let a = a.clone();
                let _ = tokio::task::spawn_blocking(move || a.lock().map(|mut a| a.set(&vips)).unwrap_or(false)).await;
            }
        })
    });
    // Managed neighbours change the host too: not with --no-host-setup.
    let next_hops = (!args.no_host_setup).then(|| tokio::spawn(keep_next_hops_resolved(ctl.clone())));
    let dns = tokio::spawn({
        let ctl = ctl.clone();
        async move {
            let mut every = tokio::time::interval(std::time::Duration::from_millis(200));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                resolve_due_names(&ctl).await;
            }
        }
    });
    let events = {
        let rb = ctl.lock().await.dataplane().take_flow_events().context("opening the flow event ring buffer")?;
        tokio::spawn(flow_events(rb, ctl.clone()))
    };
    let metrics = metrics_listener.map(|listener| {
        let ctl = ctl.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::daemon::metrics::serve(listener, ctl).await {
                tracing::error!("{e:#}");
            }
        })
    });

    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
    }
    if let (Some(t), Some(a)) = (bgp, announcer) {
        t.abort();
        // Withdraw first, keep forwarding while routers converge, then go.
        let withdrawn = tokio::task::spawn_blocking(move || a.lock().map(|mut a| a.set(&[])).unwrap_or(false)).await.unwrap_or(false);
        if withdrawn {
            tracing::info!(grace = ?args.withdraw_grace.0, "VIPs withdrawn from BGP: forwarding on while routers converge");
            tokio::time::sleep(args.withdraw_grace.0).await;
        }
    }
    serving.abort();
    upkeep.abort();
    if let Some(t) = next_hops {
        t.abort();
    }
    dns.abort();
    for t in sync_tasks {
        t.abort();
    }
    events.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    let _ = std::fs::remove_file(&socket);
    let mut ctl = ctl.lock().await;
    if args.detach_on_exit {
        ctl.dataplane().detach_all();
        ctl.dataplane().unpin();
        crate::host::sysctl::undo(&crate::host::sysctl::Sysctl::default(), ctl.host_changes());
        crate::host::neighbours::forget_all(ctl.managed_neighbours());
        let _ = std::fs::remove_file(&args.state_file);
        tracing::info!("detached, pins and state removed, bye");
    } else {
        save_state(&args.state_file, &ctl);
        ctl.dataplane().set_persist(true);
        tracing::info!("the data plane keeps forwarding; `xlb daemon` with the same --pin-dir takes it over, `xlb detach` removes it");
    }
    Ok(())
}

/// Loads (or takes over) the data plane, attaches, and builds the model:
/// from the saved state when the data plane was running, else from the
/// config file. A failure leaves nothing new behind.
async fn start(args: &DaemonArgs, config: &Config) -> anyhow::Result<Controller> {
    let dp = Dataplane::load(LoadOptions {
        conn_capacity: args.conn_capacity,
        half_open_capacity: args.half_open_capacity,
        pin_dir: Some(args.pin_dir.clone()),
    })
        .context("loading the XDP program")?;
    let restored = dp.restored();
    let saved: Option<SavedState> = if restored {
        let text = std::fs::read_to_string(&args.state_file).with_context(|| {
            format!(
                "a data plane is pinned in {} but its state file {} cannot be read, so the services it serves are unknown. \
                 Point --state-file at it, or remove that data plane with `xlb detach --pin-dir {}` (its connections will be reset)",
                args.pin_dir.display(),
                args.state_file.display(),
                args.pin_dir.display()
            )
        })?;
        Some(serde_json::from_str(&text).with_context(|| format!("state file {} is not valid", args.state_file.display()))?)
    } else {
        None
    };
    let sender = crate::resets::rst::RstSender::new().context("opening the raw socket for proactive resets (needs CAP_NET_RAW)")?;
    let mut ctl = Controller::new(dp).with_resets(sender).with_neighbour_warming();
    let ttl = crate::dns::TtlLimits { min: args.dns_min_ttl.0, max: args.dns_max_ttl.0 };
    if ttl.min > ttl.max || ttl.min.is_zero() {
        anyhow::bail!("--dns-min-ttl must be positive and at most --dns-max-ttl");
    }
    match crate::dns::Resolver::new(&args.dns_servers) {
        Ok(r) => ctl = ctl.with_dns(r, ttl),
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "no DNS resolver: backends given by name are refused"),
    }
    // What the data plane needs from the host, before the first packet.
    let sys = crate::host::sysctl::Sysctl::default();
    if args.no_host_setup {
        let missing = crate::host::sysctl::missing(&sys, &args.ifaces);
        if !missing.is_empty() {
            let list: Vec<String> = missing.iter().map(|m| format!("  {m}")).collect();
            if !args.force {
                if !restored {
                    ctl.dataplane().unpin();
                } else {
                    ctl.dataplane().set_persist(true);
                }
                anyhow::bail!(
                    "--no-host-setup: the data plane needs host settings that are missing:\n{}\nset them (sysctl -w KEY=VALUE), drop --no-host-setup to let the daemon set them, or add --force to start anyway",
                    list.join("\n")
                );
            }
            for m in &missing {
                tracing::warn!(setting = m.key, have = m.have, want = m.want, why = m.why, "--force: starting without a host setting the data plane needs");
            }
        }
    } else {
        let changes = crate::host::sysctl::apply(&sys, &args.ifaces).map_err(anyhow::Error::msg);
        match changes {
            Ok(c) => ctl.record_host_changes(c),
            Err(e) => {
                if !restored {
                    ctl.dataplane().unpin();
                } else {
                    ctl.dataplane().set_persist(true);
                }
                return Err(e.context("setting up the host for the data plane"));
            }
        }
    }
    if args.test_disable_proactive_reset {
        tracing::warn!("proactive resets disabled (test switch): flows of gone backends are reset on their next packet only");
        ctl.set_proactive_reset(false);
    }
    let res: anyhow::Result<()> = (|| {
        if let Some(state) = &saved {
            if args.config.is_some() {
                tracing::warn!("taking over a running data plane: its saved state wins over --config (use `xlb apply` semantics: change it through the API)");
            }
            ctl.restore(state).context("restoring the saved state")?;
        }
        // Links pinned by the previous run on interfaces not asked for now go.
        for iface in crate::dataplane::pinned_links(&args.pin_dir) {
            if !args.ifaces.contains(&iface) {
                tracing::warn!(iface, "detaching from an interface no longer in --iface");
                let _ = crate::dataplane::unpin_link(&args.pin_dir, &iface);
            }
        }
        for iface in &args.ifaces {
            let previous = saved.as_ref().and_then(|s| s.interfaces.iter().find(|a| &a.iface == iface)).map(|a| a.mode.clone());
            let att = ctl.dataplane().attach(iface, args.xdp_mode, previous.as_deref())?;
            tracing::info!(iface = att.iface, ifindex = att.ifindex, mode = att.mode, "attached");
        }
        if saved.is_none() {
            config.apply(&mut ctl)?;
        }
        Ok(())
    })();
    if let Err(e) = res {
        if !restored {
            // Nothing of ours was running before: leave nothing behind.
            ctl.dataplane().detach_all();
            ctl.dataplane().unpin();
        } else {
            // The previous data plane keeps forwarding as it was.
            ctl.dataplane().set_persist(true);
        }
        return Err(e);
    }
    Ok(ctl)
}

/// Writes the model to the state file (atomically: temp file + rename).
pub fn save_state(path: &std::path::Path, ctl: &Controller) {
    let res = (|| -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&ctl.snapshot())?)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if let Err(e) = res {
        tracing::error!(path = %path.display(), error = %e, "saving the state file failed: a restart would not know the services");
    }
}

/// Periodic work: drain deadlines and freeing of deregistered backends
/// (`Controller::tick`), and one health checker per checked backend, kept in
/// line with the configuration.
async fn upkeep(ctl: Arc<Mutex<Controller>>, state_file: std::path::PathBuf) {
    use std::collections::HashMap;
    let mut checkers: HashMap<u32, (HealthTarget, tokio::task::JoinHandle<()>)> = HashMap::new();
    let mut every = tokio::time::interval(std::time::Duration::from_millis(200));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u64;
    let reader = match ctl.lock().await.dataplane().table_reader() {
        Ok(r) => Some(Arc::new(r)),
        Err(e) => {
            tracing::error!(error = %e, "no table handle for the expiry pass: idle flows will not expire");
            None
        }
    };
    loop {
        every.tick().await;
        ticks += 1;
        let mut expiry = None;
        let targets = {
            let mut c = ctl.lock().await;
            if let Err(e) = c.tick(std::time::Instant::now()) {
                tracing::warn!(error = %e, "periodic upkeep failed");
            }
            if ticks.is_multiple_of(5) {
                expiry = Some(c.expiry_input());
            }
            server::spawn_pending_resets(&mut c, &ctl);
            if c.take_dirty() {
                save_state(&state_file, &c);
            }
            c.health_targets()
        };
        // Idle expiry once a second: the walk of the whole table runs
        // without the controller (API requests and health results go on);
        // only the decisions are applied under it.
        if let (Some(input), Some(reader)) = (expiry, reader.clone()) {
            let plan = tokio::task::spawn_blocking(move || {
                crate::controller::plan_expiry(|f| reader.for_each_flow(f), |f| reader.for_each_port(f), input)
            })
            .await;
            match plan {
                Ok(Ok(plan)) => {
                    let mut c = ctl.lock().await;
                    if let Err(e) = c.expire_apply(plan) {
                        tracing::warn!(error = %e, "expiring idle flows failed");
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "walking the table for expiry failed"),
                Err(e) => tracing::warn!(error = %e, "the expiry walk panicked"),
            }
        }
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

/// Looks up every backend name whose answer ran out (concurrently, without
/// holding the controller) and applies the answers.
async fn resolve_due_names(ctl: &Arc<Mutex<Controller>>) {
    let (due, resolver) = {
        let c = ctl.lock().await;
        (c.dns_due(std::time::Instant::now()), c.resolver())
    };
    let Ok(resolver) = resolver else { return };
    if due.is_empty() {
        return;
    }
    let lookups = due.into_iter().map(|(sid, name)| {
        let r = resolver.clone();
        async move {
            let answer = r.resolve(&name.host).await;
            (sid, name, answer)
        }
    });
    let answers = futures_join_all(lookups).await;
    let mut c = ctl.lock().await;
    for (sid, name, answer) in answers {
        if let Err(e) = c.dns_apply(sid, &name, answer, std::time::Instant::now()) {
            tracing::warn!(service = %sid, backend = %name, error = %e, "applying a DNS answer failed");
        }
    }
    server::spawn_pending_resets(&mut c, ctl);
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join_all<F: std::future::Future + Send + 'static>(fs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// Probes one backend on a fixed cadence (a slow probe does not stretch the
/// interval: detection takes at most fall × interval).
async fn check_loop(ctl: Arc<Mutex<Controller>>, t: HealthTarget) {
    let mut every = tokio::time::interval(t.check.interval.0);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let result = crate::health::probe(t.addr, &t.check).await;
        let mut c = ctl.lock().await;
        if let Err(e) = c.health_result(t.backend_id, result) {
            tracing::warn!(backend = %t.addr, error = %e, "applying a health result failed");
        }
        server::spawn_pending_resets(&mut c, &ctl);
    }
}

/// Reads the data plane's flow-end events into the flow log. Always
/// drained (even without a flow log) so the buffer never stays full.
async fn flow_events(rb: aya::maps::RingBuf<aya::maps::MapData>, ctl: Arc<Mutex<Controller>>) {
    // SAFETY: the ring buffer owns its map fd, which stays open and the same
    // for as long as the AsyncFd owns the ring buffer.
    let mut fd = match unsafe { tokio::io::unix::AsyncFd::register(rb) } {
        Ok(fd) => fd,
        Err(e) => {
            let e = e.into_parts().1;
            tracing::error!(error = %e, "cannot poll the flow event ring buffer: no flow logs for the data plane's removals");
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
        let mut events = Vec::new();
        {
            let rb = guard.get_inner_mut();
            while let Some(item) = rb.next() {
                if item.len() >= std::mem::size_of::<lb_common::maps::FlowEnd>() {
                    // SAFETY: the program writes whole FlowEnd records (Pod).
                    events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<lb_common::maps::FlowEnd>()) });
                }
            }
        }
        guard.clear_ready();
        if !events.is_empty() {
            let mut c = ctl.lock().await;
            for ev in &events {
                c.log_flow_end(ev);
            }
        }
    }
}

/// The state-sync settings and the bound socket, checked before anything
/// is loaded.
fn sync_config(args: &DaemonArgs) -> anyhow::Result<Option<(crate::ha::SyncConfig, tokio::net::UdpSocket)>> {
    let (Some(listen), Some(peer), Some(key_file)) = (args.sync_listen, args.sync_peer, &args.sync_key_file) else { return Ok(None) };
    let key = std::fs::read(key_file).with_context(|| format!("reading the sync key file {}", key_file.display()))?;
    let key: Vec<u8> = key.trim_ascii().to_vec();
    if key.len() < 16 {
        anyhow::bail!("the sync key in {} is {} bytes: use at least 16 random bytes (e.g. `head -c 32 /dev/urandom | base64`)", key_file.display(), key.len());
    }
    let std_sock = std::net::UdpSocket::bind(listen).with_context(|| format!("binding the sync socket {listen}"))?;
    std_sock.set_nonblocking(true).context("sync socket")?;
    let sock = tokio::net::UdpSocket::from_std(std_sock).context("sync socket")?;
    Ok(Some((crate::ha::SyncConfig { listen, peer, key }, sock)))
}

/// Sends queued flow changes to the peer, batched (a datagram per
/// `PER_DATAGRAM` records, or whatever is queued after 10 ms). One epoch
/// per daemon start (its start time), datagrams numbered from 1 in it.
async fn sync_send(
    mut rx: crate::ha::QueueRx,
    sock: Arc<tokio::net::UdpSocket>,
    cfg: crate::ha::SyncConfig,
    ctl: Arc<Mutex<Controller>>,
) {
    let mut sender = crate::ha::Sender::start();
    let mut batch = Vec::with_capacity(crate::ha::PER_DATAGRAM);
    loop {
        let Some(first) = rx.recv().await else { return };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(10);
        let (mut datagrams, mut records) = (0u64, 0u64);
        loop {
            while batch.len() < crate::ha::PER_DATAGRAM {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            if batch.len() < crate::ha::PER_DATAGRAM && tokio::time::Instant::now() < deadline {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(r)) => {
                        batch.push(r);
                        continue;
                    }
                    Ok(None) | Err(_) => {}
                }
            }
            let d = sender.seal(&cfg.key, &batch);
            if let Err(e) = sock.send_to(&d, cfg.peer).await {
                tracing::debug!(error = %e, "sending a sync datagram failed (the next refresh heals it)");
            }
            datagrams += 1;
            records += batch.len() as u64;
            batch.clear();
            if rx.is_empty() || tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        if let Some(s) = ctl.lock().await.sync_status_mut() {
            s.sent_datagrams += datagrams;
            s.sent_records += records;
            s.epoch = sender.epoch();
        }
    }
}

/// Receives the peer's flow changes; installs them while this node is
/// backup.
async fn sync_receive(sock: Arc<tokio::net::UdpSocket>, cfg: crate::ha::SyncConfig, ctl: Arc<Mutex<Controller>>) {
    let mut receiver = crate::ha::Receiver::default();
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "receiving sync datagrams failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let decoded = if from.ip() != cfg.peer.ip() { Err("not from the configured peer") } else { crate::ha::decode(&cfg.key, &buf[..n]) };
        let mut c = ctl.lock().await;
        let d = match decoded {
            Ok(d) => d,
            Err(why) => {
                tracing::debug!(%from, why, "sync datagram refused");
                if let Some(s) = c.sync_status_mut() {
                    s.refused_datagrams += 1;
                }
                continue;
            }
        };
        if c.role() == Some(crate::ha::Role::Master) {
            if let Some(s) = c.sync_status_mut() {
                s.ignored_as_master += 1;
            }
            continue;
        }
        // Anti-replay: a replayed or stale datagram, or one from an earlier
        // run of the peer's daemon, is refused (counted in the status).
        let records = match receiver.admit(&d, std::time::Instant::now(), crate::ha::unix_ns()) {
            Ok(r) => r,
            Err(why) => {
                tracing::debug!(%from, %why, epoch = d.epoch, seq = d.seq, "sync datagram refused");
                Vec::new()
            }
        };
        if let Err(e) = c.sync_install(&records) {
            tracing::warn!(error = %e, "installing synced flows failed");
        }
        if let Some(s) = c.sync_status_mut() {
            receiver.report(s);
        }
    }
}

/// As master, sends the whole table every `REFRESH` (walked without the
/// controller): heals lost datagrams and keeps the peer's copies alive.
/// The records go on the queue's refresh lane, waiting while it is full
/// (no lock held): never dropped, and flow changes keep priority.
async fn sync_refresh(ctl: Arc<Mutex<Controller>>, tx: crate::ha::QueueTx) {
    let reader = match ctl.lock().await.dataplane().table_reader() {
        Ok(r) => Arc::new(r),
        Err(e) => {
            tracing::error!(error = %e, "no table handle for sync refreshes: lost sync datagrams will not be healed");
            return;
        }
    };
    // Every REFRESH, or less often when the table is big: a refresh never
    // takes more than a fifth of the node's time (a 1M-flow table takes
    // about a second to walk here).
    let mut wait = crate::ha::REFRESH;
    loop {
        tokio::time::sleep(wait).await;
        if ctl.lock().await.role() != Some(crate::ha::Role::Master) {
            continue;
        }
        let started = std::time::Instant::now();
        let reader = reader.clone();
        let walked = tokio::task::spawn_blocking(move || crate::controller::live_flows(|f| reader.for_each_flow(f))).await;
        // The walk's cost sets the pace (sending below waits on the socket).
        let walk = started.elapsed();
        match walked {
            Ok(Ok(records)) => {
                for r in records {
                    if tx.send_refresh(r).await.is_err() {
                        return; // the sending task is gone
                    }
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "walking the table for a sync refresh failed"),
            Err(e) => tracing::warn!(error = %e, "the sync refresh walk panicked"),
        }
        wait = crate::ha::REFRESH.max(walk * 5);
    }
}

/// Keeps the next hops of the backends and of the routes' gateways
/// resolved (`neighbours`): at once, when the backends or interfaces
/// change, and every 10 s (routes change too). Off the async workers
/// (netlink calls block).
async fn keep_next_hops_resolved(ctl: Arc<Mutex<Controller>>) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_inputs = None;
    let mut last_full = std::time::Instant::now();
    loop {
        every.tick().await;
        let (inputs, ours) = {
            let c = ctl.lock().await;
            (c.next_hop_inputs(), c.managed_neighbours().clone())
        };
        if last_inputs.as_ref() == Some(&inputs) && last_full.elapsed() < std::time::Duration::from_secs(10) {
            continue;
        }
        last_full = std::time::Instant::now();
        let (backends, ifindexes) = inputs.clone();
        let done = tokio::task::spawn_blocking(move || -> std::io::Result<std::collections::BTreeSet<crate::host::neighbours::Neighbour>> {
            let mut nl = crate::host::neighbours::Netlink::open()?;
            let want = crate::host::neighbours::wanted(&mut nl, &backends, &ifindexes)?;
            let mut ours = ours;
            crate::host::neighbours::reconcile(&mut nl, &mut ours, &want);
            Ok(ours)
        })
        .await;
        match done {
            Ok(Ok(ours)) => {
                ctl.lock().await.set_managed_neighbours(ours);
                last_inputs = Some(inputs);
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "reading routes for the next hops to keep resolved failed (the kernel resolves them on demand)"),
            Err(e) => tracing::warn!(error = %e, "the next-hop task panicked"),
        }
    }
}
