//! The daemon's side of state sync (the wire format and admission are in
//! `ha`): the bounded queue of records to the peer, the task that sends
//! them in datagrams, and the task that receives the peer's. Admission runs
//! in the receiving task, not on the controller; only what is admitted is
//! installed.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use lb_common::maps::{FlowEnd, end_reason};

use super::actor::Handle;
use crate::{
    cli::DaemonArgs,
    dataplane::{BackendRef, Flow},
    ha::{Kind, PER_DATAGRAM, QueueError, QueueRx, QueueTx, Receiver, Record, Sender, SyncConfig},
};

/// Where records for the peer go (see `ha::queue`: flow changes are
/// dropped, counted, when their lane is full; refreshes wait). Records are
/// queued only while this node is master.
#[derive(Clone)]
pub struct Outbound {
    tx: QueueTx,
    master: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
}

impl Outbound {
    /// `master` and `dropped` are the controller's (`SyncLink`): the role
    /// it sets, the count it reports.
    pub fn new(master: Arc<AtomicBool>, dropped: Arc<AtomicU64>) -> (Outbound, QueueRx) {
        let (tx, rx) = crate::ha::queue();
        (Outbound { tx, master, dropped }, rx)
    }

    pub fn is_master(&self) -> bool {
        self.master.load(Ordering::Relaxed)
    }

    fn change(&self, r: Record) {
        if self.is_master() && self.tx.try_send(r) == Err(QueueError::Full) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A live flow, for a refresh: waits while the refresh lane is full
    /// (from the refresher's thread). False once the sender is gone.
    pub fn refresh(&self, f: &Flow, idle: Duration, b: &BackendRef) -> bool {
        let r = Record { kind: Kind::Live, idle, flow: f.end_record(end_reason::NEW, b) };
        self.tx.send_refresh_blocking(r).is_ok()
    }

    /// Flows that ended (the controller's removals).
    pub fn ended(&self, records: &[FlowEnd]) {
        for r in records {
            self.change(Record { kind: Kind::End, idle: Duration::ZERO, flow: *r });
        }
    }

    /// A record of the data plane's own (a new flow, or one it removed).
    pub fn event(&self, ev: &FlowEnd) {
        let kind = if ev.reason == end_reason::NEW { Kind::Live } else { Kind::End };
        self.change(Record { kind, idle: Duration::ZERO, flow: *ev });
    }
}

/// The state-sync settings and the bound socket, checked before anything
/// is loaded.
pub fn config(args: &DaemonArgs) -> anyhow::Result<Option<(SyncConfig, tokio::net::UdpSocket)>> {
    let (Some(listen), Some(peer), Some(key_file)) = (args.sync_listen, args.sync_peer, &args.sync_key_file) else { return Ok(None) };
    let key = std::fs::read(key_file).with_context(|| format!("reading the sync key file {}", key_file.display()))?;
    let key: Vec<u8> = key.trim_ascii().to_vec();
    if key.len() < 16 {
        anyhow::bail!("the sync key in {} is {} bytes: use at least 16 random bytes (e.g. `head -c 32 /dev/urandom | base64`)", key_file.display(), key.len());
    }
    let std_sock = std::net::UdpSocket::bind(listen).with_context(|| format!("binding the sync socket {listen}"))?;
    std_sock.set_nonblocking(true).context("sync socket")?;
    let sock = tokio::net::UdpSocket::from_std(std_sock).context("sync socket")?;
    Ok(Some((SyncConfig { listen, peer, key }, sock)))
}

/// Sends queued records to the peer, batched (a datagram per
/// `PER_DATAGRAM` records, or whatever is queued after 10 ms). One epoch
/// per daemon start (its start time), datagrams numbered from 1 in it.
pub async fn send(mut rx: QueueRx, sock: Arc<tokio::net::UdpSocket>, cfg: SyncConfig, ctl: Handle) {
    let mut sender = Sender::start();
    let epoch = sender.epoch();
    ctl.post(move |c| {
        if let Some(s) = c.sync_status_mut() {
            s.epoch = epoch;
        }
    })
    .await;
    let mut batch = Vec::with_capacity(PER_DATAGRAM);
    loop {
        let Some(first) = rx.recv().await else { return };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(10);
        let (mut datagrams, mut records) = (0u64, 0u64);
        loop {
            while batch.len() < PER_DATAGRAM {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            if batch.len() < PER_DATAGRAM
                && tokio::time::Instant::now() < deadline
                && let Ok(Some(r)) = tokio::time::timeout_at(deadline, rx.recv()).await
            {
                batch.push(r);
                continue;
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
        ctl.post(move |c| {
            if let Some(s) = c.sync_status_mut() {
                s.sent_datagrams += datagrams;
                s.sent_records += records;
            }
        })
        .await;
    }
}

/// Receives the peer's datagrams and admits them here (authentication,
/// anti-replay: see `ha::receiver`), off the controller; the controller
/// installs what was admitted while this node is backup.
pub async fn receive(sock: Arc<tokio::net::UdpSocket>, cfg: SyncConfig, master: Arc<AtomicBool>, ctl: Handle) {
    let mut receiver = Receiver::default();
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "receiving sync datagrams failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let decoded = if from.ip() != cfg.peer.ip() { Err("not from the configured peer") } else { crate::ha::decode(&cfg.key, &buf[..n]) };
        let d = match decoded {
            Ok(d) => d,
            Err(why) => {
                tracing::debug!(%from, why, "sync datagram refused");
                ctl.post(|c| {
                    if let Some(s) = c.sync_status_mut() {
                        s.refused_datagrams += 1;
                    }
                })
                .await;
                continue;
            }
        };
        if master.load(Ordering::Relaxed) {
            ctl.post(|c| {
                if let Some(s) = c.sync_status_mut() {
                    s.ignored_as_master += 1;
                }
            })
            .await;
            continue;
        }
        // A replayed or stale datagram, or one from an earlier run of the
        // peer's daemon, is refused (and counted by the receiver).
        let records = match receiver.admit(&d, std::time::Instant::now(), crate::ha::unix_ns()) {
            Ok(r) => r,
            Err(why) => {
                tracing::debug!(%from, %why, epoch = d.epoch, seq = d.seq, "sync datagram refused");
                Vec::new()
            }
        };
        let mut figures = crate::ha::SyncStatus::default();
        receiver.report(&mut figures);
        ctl.post(move |c| {
            if !records.is_empty()
                && let Err(e) = c.sync_install(&records)
            {
                tracing::warn!(error = %e, "installing synced flows failed");
            }
            if let Some(s) = c.sync_status_mut() {
                s.take_receiver_figures(&figures);
            }
        })
        .await;
    }
}
