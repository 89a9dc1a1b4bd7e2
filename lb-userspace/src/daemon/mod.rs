//! `xlb daemon`: load, attach, apply the config, then run the controller as
//! an actor on its own thread with tasks and threads around it; on
//! SIGINT/SIGTERM withdraw, stop, and detach or hand over.
//!
//! ```text
//!   API server ─┐                          ┌─> state file
//!   metrics ────┤                          ├─> reset worker ──(RSTs, removals)──> table
//!   upkeep ─────┤   mailbox   ┌─────────┐  ├─> flow-log writer
//!   health ─────┼────────────>│  actor  │──┤
//!   DNS, BGP ───┤             │(control-│  └─> sync queue ──> sync sender ──> peer
//!   next hops ──┤             │  ler)   │
//!   sync recv ──┤             └─────────┘
//!   table walker (snapshots, expiry) ┘        flow events ──> flow log, sync queue
//! ```
//!
//! Nothing but the actor touches the controller; nothing on the actor
//! walks the table or waits on the network.

pub mod actor;
pub mod config;
pub mod flowlog;
pub mod metrics;
pub mod server;
pub mod sync;
mod tasks;
mod workers;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool, mpsc as std_mpsc},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    api::desired::Desired,
    cli::DaemonArgs,
    controller::{Controller, DnsSettings, SavedState},
    dataplane::{KernelDataPlane, LoadOptions},
    dns::Resolver,
    host::sysctl::{self, Sysctl},
    model::TtlLimits,
    resets::rst::RstSender,
};

use actor::{Ctl, Outlets};

/// Removes the control socket when dropped (however `run` ends).
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub async fn run(args: DaemonArgs, socket: PathBuf) -> anyhow::Result<()> {
    // Everything that can be checked without side effects comes first.
    let desired = match &args.config {
        Some(p) => Some(config::Config::load(p)?.desired()?),
        None => None,
    };
    let ttl = TtlLimits { min: args.dns_min_ttl.0, max: args.dns_max_ttl.0 };
    if ttl.min > ttl.max || ttl.min.is_zero() {
        anyhow::bail!("--dns-min-ttl must be positive and at most --dns-max-ttl");
    }
    let flow_log = match &args.flow_log {
        Some(p) => Some(flowlog::FlowLog::open(p, args.flow_log_sample)?.with_new_flows(args.flow_log_new)),
        None => None,
    };
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let listener = server::bind(&socket)?;
    let _socket_file = SocketFile(socket.clone());
    let metrics_listener = match args.metrics_addr {
        Some(a) => Some(metrics::bind(a).await?),
        None => None,
    };
    let sync_cfg = sync::config(&args)?;
    let resolver = match Resolver::new(&args.dns_servers) {
        Ok(r) => Some(Arc::new(r)),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "no DNS resolver: backends given by name are refused");
            None
        }
    };
    if let Some(d) = &desired {
        // Checked whole before anything is loaded (applied after the
        // attach, against the same checks).
        let usage = crate::plan::Usage { backend_ids_in_use: 0, names_supported: resolver.is_some() };
        crate::plan::plan_apply(&Default::default(), &usage, d, &crate::plan::route_source).map_err(|e| anyhow::anyhow!("config: {e}"))?;
    }
    let rst = RstSender::new().context("opening the raw socket for proactive resets (needs CAP_NET_RAW)")?;

    // Loading and attaching block (the BPF syscalls, netlink): off the
    // async workers.
    let hash_key = match &args.flow_hash_key_file {
        Some(p) => Some(read_hash_key(p)?),
        None => None,
    };
    if hash_key.is_none() && (args.bird_include.is_some() || sync_cfg.is_some()) {
        // Behind ECMP or beside a sync peer, another node may take this
        // node's flows: only the same key sends them to the same backends.
        tracing::warn!(
            "no --flow-hash-key-file: this node's flow-hash key is its own, so another balancer taking its flows (ECMP, failover) schedules those without state elsewhere; give every node the same key file"
        );
    }
    let started = {
        let args = args.clone();
        let dns = DnsSettings { enabled: resolver.is_some(), ttl, misses: args.dns_misses };
        // New-flow records are a data-plane switch (off unless asked): flow
        // logs with --flow-log-new, and state sync, need them.
        let log_new = args.flow_log_new || sync_cfg.is_some();
        tokio::task::spawn_blocking(move || start(&args, desired.as_ref(), dns, hash_key, log_new)).await.context("the start-up thread panicked")??
    };
    let Started { mut ctl, events, program_id } = started;

    let flow_log = match flow_log {
        Some(l) => match flowlog::start(l) {
            Ok((sender, counters)) => {
                ctl = ctl.with_counters(counters.shared());
                Some(sender)
            }
            Err(e) => {
                hand_back(&mut ctl);
                return Err(anyhow::Error::from(e).context("starting the flow-log writer"));
            }
        },
        None => None,
    };
    let (outbound, sync_rx) = match &sync_cfg {
        Some((cfg, _)) => {
            ctl = ctl.with_sync(args.role, cfg.peer);
            let (master, dropped) = ctl.sync_shared().unwrap_or_default();
            let (out, rx) = sync::Outbound::new(master, dropped);
            (Some(out), Some(rx))
        }
        None => (None, None),
    };
    save_state(&args.state_file, &ctl);
    let table = ctl.table();
    let master = ctl.sync_shared().map(|(m, _)| m);

    let (jobs_tx, jobs_rx) = std_mpsc::channel();
    let (handle, actor_thread) =
        actor::spawn(ctl, Outlets { state_file: args.state_file.clone(), jobs: jobs_tx, flow_log: flow_log.clone(), sync: outbound.clone() })
            .context("starting the controller thread")?;
    let stop_walker = Arc::new(AtomicBool::new(false));
    let walker = {
        let (table, handle, stop) = (table.clone(), handle.clone(), stop_walker.clone());
        std::thread::Builder::new().name("xlb-walker".into()).spawn(move || workers::walker(table, handle, stop)).context("starting the table walker")?
    };
    if let Some(out) = outbound.clone() {
        let (table, stop, h) = (table.clone(), stop_walker.clone(), handle.clone());
        std::thread::Builder::new().name("xlb-refresh".into()).spawn(move || workers::refresher(table, out, h, stop)).context("starting the sync refresher")?;
    }
    {
        let (table, handle, rst) = (table.clone(), handle.clone(), Arc::new(rst));
        std::thread::Builder::new()
            .name("xlb-resets".into())
            .spawn(move || workers::reset_worker(jobs_rx, table, Some(rst), handle))
            .context("starting the reset worker")?;
    }
    tracing::info!(socket = %socket.display(), pins = %args.pin_dir.display(), state = %args.state_file.display(), "xlb daemon ready");

    let mut tasks = vec![
        tokio::spawn(server::serve(listener, server::Context { ctl: handle.clone(), resolver: resolver.clone(), table: table.clone(), program_id })),
        tokio::spawn(tasks::upkeep(handle.clone())),
        tokio::spawn(tasks::local_addresses(handle.clone())),
        tokio::spawn(tasks::flow_events(events, flow_log, outbound.clone())),
    ];
    if let Some(r) = resolver {
        tasks.push(tokio::spawn(tasks::names(handle.clone(), r)));
    }
    // Managed neighbours change the host too: not with --no-host-setup.
    if !args.no_host_setup {
        tasks.push(tokio::spawn(tasks::next_hops(handle.clone())));
    }
    if let Some(listener) = metrics_listener {
        let h = handle.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = metrics::serve(listener, h).await {
                tracing::error!("{e:#}");
            }
        }));
    }
    if let (Some((cfg, sock)), Some(rx), Some(master)) = (sync_cfg, sync_rx, master) {
        tracing::info!(listen = %cfg.listen, peer = %cfg.peer, role = %args.role, "state sync on");
        let sock = Arc::new(sock);
        tasks.push(tokio::spawn(sync::send(rx, sock.clone(), cfg.clone(), handle.clone())));
        tasks.push(tokio::spawn(sync::receive(sock, cfg, master, handle.clone())));
    }
    let announcer = match (&args.bird_include, &args.bird_socket) {
        (Some(i), Some(s)) => Some(Arc::new(std::sync::Mutex::new(crate::ha::bgp::Announcer::new(i.clone(), s.clone())))),
        _ => None,
    };
    let bgp = announcer.clone().map(|a| tokio::spawn(tasks::announce(handle.clone(), a)));

    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
    }
    if let (Some(t), Some(a)) = (bgp, announcer) {
        t.abort();
        // Withdraw first, keep forwarding while routers converge, then go.
        if tasks::withdraw(a).await {
            tracing::info!(grace = ?args.withdraw_grace.0, "VIPs withdrawn from BGP: forwarding on while routers converge");
            tokio::time::sleep(args.withdraw_grace.0).await;
        }
    }
    for t in &tasks {
        t.abort();
    }
    stop_walker.store(true, std::sync::atomic::Ordering::Relaxed);
    handle.stop().await;
    drop(handle);
    let mut ctl = tokio::task::spawn_blocking(move || {
        let _ = walker.join();
        actor_thread.join()
    })
    .await
    .context("joining the controller thread")?
    .map_err(|_| anyhow::anyhow!("the controller thread panicked: the data plane keeps forwarding; restart the daemon to take it over"))?;
    let detach = args.detach_on_exit;
    tokio::task::spawn_blocking(move || {
        if detach {
            ctl.dataplane().detach_all();
            ctl.dataplane().unpin();
            sysctl::undo(&Sysctl::default(), ctl.host_changes());
            crate::host::neighbours::forget_all(ctl.managed_neighbours());
            let _ = std::fs::remove_file(&args.state_file);
            tracing::info!("detached, pins and state removed, bye");
        } else {
            save_state(&args.state_file, &ctl);
            ctl.dataplane().set_persist(true);
            tracing::info!("the data plane keeps forwarding; `xlb daemon` with the same --pin-dir takes it over, `xlb detach` removes it");
        }
    })
    .await
    .context("the shutdown thread panicked")?;
    Ok(())
}

/// What `start` hands to `run`.
struct Started {
    ctl: Ctl,
    events: aya::maps::RingBuf<aya::maps::MapData>,
    program_id: u32,
}

/// A start that failed after the load: leave what ran before as it was,
/// or nothing if nothing did.
fn hand_back(ctl: &mut Ctl) {
    let restored = ctl.dataplane().restored();
    if restored {
        // The previous data plane keeps forwarding as it was.
        ctl.dataplane().set_persist(true);
    } else {
        ctl.dataplane().detach_all();
        ctl.dataplane().unpin();
    }
}

/// Loads (or takes over) the data plane, sets up the host, attaches, and
/// builds the model: from the saved state when the data plane was running,
/// else from the config file. A failure leaves nothing new behind.
fn start(args: &DaemonArgs, desired: Option<&Desired>, dns: DnsSettings, hash_key: Option<[u64; 2]>, log_new: bool) -> anyhow::Result<Started> {
    let dp = KernelDataPlane::load(LoadOptions {
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
        });
        let parsed = text.and_then(|t| serde_json::from_str(&t).with_context(|| format!("state file {} is not valid", args.state_file.display())));
        match parsed {
            Ok(s) => Some(s),
            Err(e) => {
                let mut dp = dp;
                dp.set_persist(true);
                return Err(e);
            }
        }
    } else {
        None
    };
    let mut ctl = Controller::new(dp).with_neighbour_warming().with_dns(dns);
    let res = (|| -> anyhow::Result<(aya::maps::RingBuf<aya::maps::MapData>, u32)> {
        host_setup(args, &mut ctl)?;
        globals(&mut ctl, restored, hash_key, log_new, args.icmp_translation == "on")?;
        if args.test_disable_proactive_reset {
            tracing::warn!("proactive resets disabled (test switch): flows of gone backends are reset on their next packet only");
            ctl.set_proactive_reset(false);
        }
        if let Some(state) = &saved {
            if args.config.is_some() {
                tracing::warn!("taking over a running data plane: its saved state wins over --config (change it through the API, e.g. `xlb apply`)");
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
        if saved.is_none()
            && let Some(d) = desired
        {
            let changes = ctl.apply(d, false).map_err(|e| anyhow::anyhow!("config: {e}"))?;
            tracing::info!(changes = changes.len(), "configuration applied");
        }
        let events = ctl.dataplane().take_flow_events().context("opening the flow event ring buffer")?;
        let program_id = ctl.dataplane().program_id()?;
        Ok((events, program_id))
    })();
    match res {
        Ok((events, program_id)) => Ok(Started { ctl, events, program_id }),
        Err(e) => {
            hand_back(&mut ctl);
            Err(e)
        }
    }
}

/// The data plane's settings, before the first packet: the flow-hash key
/// (given; else the running data plane's, so a restart schedules alike;
/// else a fresh random one), the CPU count, the new-flow records switch.
fn globals(ctl: &mut Ctl, restored: bool, given: Option<[u64; 2]>, log_new: bool, icmp: bool) -> anyhow::Result<()> {
    let running = if restored { ctl.dataplane().globals().ok().map(|g| g.hash_key).filter(|k| *k != [0, 0]) } else { None };
    let hash_key = match (given, running) {
        (Some(k), Some(r)) if k != r => {
            tracing::warn!("--flow-hash-key-file differs from the running data plane's key: flows without state are scheduled anew");
            k
        }
        (Some(k), _) => k,
        (None, Some(r)) => r,
        (None, None) => random_key().context("generating a flow-hash key")?,
    };
    let ncpus = aya::util::nr_cpus().map_err(|(_, e)| e).context("counting CPUs")? as u32;
    let flags = if log_new { lb_common::maps::GLOBAL_LOG_NEW_FLOWS } else { 0 } | if icmp { 0 } else { lb_common::maps::GLOBAL_NO_ICMP };
    ctl.dataplane().globals_set(lb_common::maps::Globals { hash_key, ncpus, flags }).context("writing the data plane's settings")?;
    Ok(())
}

/// A random 128-bit key (the kernel's random source).
fn random_key() -> std::io::Result<[u64; 2]> {
    use std::io::Read as _;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok([u64::from_le_bytes(b[..8].try_into().unwrap_or_default()), u64::from_le_bytes(b[8..].try_into().unwrap_or_default())])
}

/// Reads a flow-hash key file: 32 hex digits (128 bits), whitespace
/// around them ignored.
pub fn read_hash_key(path: &Path) -> anyhow::Result<[u64; 2]> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the flow-hash key file {}", path.display()))?;
    parse_hash_key(text.trim()).with_context(|| format!("flow-hash key file {}", path.display()))
}

/// Parses 32 hex digits into a SipHash key.
pub fn parse_hash_key(hex: &str) -> anyhow::Result<[u64; 2]> {
    if hex.len() != 32 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        anyhow::bail!("expected 32 hex digits (128 bits), e.g. the output of `head -c 16 /dev/urandom | xxd -p`");
    }
    let word = |s: &str| u64::from_str_radix(s, 16).context("hex digits");
    Ok([word(&hex[..16])?, word(&hex[16..])?])
}

/// What the data plane needs from the host, before the first packet: set
/// it, or (with --no-host-setup) check it and name what is missing.
fn host_setup(args: &DaemonArgs, ctl: &mut Ctl) -> anyhow::Result<()> {
    let sys = Sysctl::default();
    if args.no_host_setup {
        let missing = sysctl::missing(&sys, &args.ifaces);
        if missing.is_empty() {
            return Ok(());
        }
        if !args.force {
            let list: Vec<String> = missing.iter().map(|m| format!("  {m}")).collect();
            anyhow::bail!(
                "--no-host-setup: the data plane needs host settings that are missing:\n{}\nset them (sysctl -w KEY=VALUE), drop --no-host-setup to let the daemon set them, or add --force to start anyway",
                list.join("\n")
            );
        }
        for m in &missing {
            tracing::warn!(setting = m.key, have = m.have, want = m.want, why = m.why, "--force: starting without a host setting the data plane needs");
        }
        return Ok(());
    }
    let changes = sysctl::apply(&sys, &args.ifaces).map_err(anyhow::Error::msg).context("setting up the host for the data plane")?;
    ctl.record_host_changes(changes);
    Ok(())
}

/// Writes the model to the state file (atomically: temp file + rename).
pub fn save_state(path: &Path, ctl: &Ctl) {
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
