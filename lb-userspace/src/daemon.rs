//! `xlb daemon`: load, attach, apply the config, serve the API, and on
//! SIGINT/SIGTERM detach and remove the pins and the socket.

use std::sync::Arc;

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Mutex,
};

use crate::{
    cli::DaemonArgs,
    config::Config,
    controller::{Controller, HealthTarget},
    dataplane::{Dataplane, LoadOptions},
    server,
};

pub async fn run(args: DaemonArgs, socket: std::path::PathBuf) -> anyhow::Result<()> {
    // Everything that can be checked without side effects comes first.
    let config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let listener = server::bind(&socket)?;

    let result = async {
        let mut dp = Dataplane::load(LoadOptions {
            conn_capacity: args.conn_capacity,
            pin_dir: Some(args.pin_dir.clone()),
        })
        .context("loading the XDP program")?;
        for iface in &args.ifaces {
            let att = dp.attach(iface, args.xdp_mode)?;
            tracing::info!(iface = att.iface, ifindex = att.ifindex, mode = att.mode, "attached");
        }
        let sender = crate::resetter::RstSender::new()
            .context("opening the raw socket for proactive resets (needs CAP_NET_RAW)")?;
        let mut ctl = Controller::new(dp).with_resets(sender);
        if args.test_disable_proactive_reset {
            tracing::warn!("proactive resets disabled (test switch): flows of gone backends are reset on their next packet only");
            ctl.set_proactive_reset(false);
        }
        if let Err(e) = config.apply(&mut ctl) {
            ctl.dataplane().unpin();
            return Err(e);
        }
        Ok(ctl)
    }
    .await;
    let ctl = match result {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    tracing::info!(socket = %socket.display(), pins = %args.pin_dir.display(), "xlb daemon ready");
    let ctl = Arc::new(Mutex::new(ctl));
    let serving = tokio::spawn(server::serve(listener, ctl.clone()));
    let upkeep = tokio::spawn(upkeep(ctl.clone()));

    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
    }
    serving.abort();
    upkeep.abort();
    let _ = std::fs::remove_file(&socket);
    let mut ctl = ctl.lock().await;
    ctl.dataplane().detach_all();
    ctl.dataplane().unpin();
    tracing::info!("detached, pins removed, bye");
    Ok(())
}

/// Periodic work: drain deadlines and freeing of deregistered backends
/// (`Controller::tick`), and one health checker per checked backend, kept in
/// line with the configuration.
async fn upkeep(ctl: Arc<Mutex<Controller>>) {
    use std::collections::HashMap;
    let mut checkers: HashMap<u32, (HealthTarget, tokio::task::JoinHandle<()>)> = HashMap::new();
    let mut every = tokio::time::interval(std::time::Duration::from_millis(200));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let targets = {
            let mut c = ctl.lock().await;
            if let Err(e) = c.tick(std::time::Instant::now()) {
                tracing::warn!(error = %e, "periodic upkeep failed");
            }
            server::spawn_pending_resets(&mut c, &ctl);
            c.health_targets()
        };
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
