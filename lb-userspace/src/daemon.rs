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
    controller::Controller,
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
        let mut ctl = Controller::new(dp);
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

    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
    }
    serving.abort();
    let _ = std::fs::remove_file(&socket);
    let mut ctl = ctl.lock().await;
    ctl.dataplane().detach_all();
    ctl.dataplane().unpin();
    tracing::info!("detached, pins removed, bye");
    Ok(())
}
