//! The daemon's side of state sync (the wire format and admission are in
//! `ha`): the bounded queue of records to the peer, the task that sends
//! them in datagrams, and the task that receives the peer's. Admission runs
//! in the receiving task, not on the controller; only what is admitted is
//! installed.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context as _;
use lb_common::maps::{end_reason, FlowEnd};
use tokio::sync::mpsc;

use super::actor::Handle;
use crate::{
    cli::DaemonArgs,
    dataplane::Flow,
    ha::{Kind, Receiver, Record, SyncConfig, PER_DATAGRAM},
};

/// Records queued for the peer at most: past this the newest are dropped
/// (counted); the next refresh heals what they would have said.
pub const QUEUE: usize = 65_536;

/// Where records for the peer go; sends only while this node is master.
#[derive(Clone)]
pub struct Outbound {
    tx: mpsc::Sender<Record>,
    master: Arc<AtomicBool>,
    pub dropped: Arc<AtomicU64>,
}

impl Outbound {
    pub fn new(master: Arc<AtomicBool>) -> (Outbound, mpsc::Receiver<Record>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Outbound { tx, master, dropped: Arc::new(AtomicU64::new(0)) }, rx)
    }

    pub fn is_master(&self) -> bool {
        self.master.load(Ordering::Relaxed)
    }

    fn push(&self, r: Record) {
        if self.is_master() && self.tx.try_send(r).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A live flow (a refresh), idle since its last packet.
    pub fn live(&self, f: &Flow, now_ns: u64) {
        self.push(Record { kind: Kind::Live, idle: Duration::from_nanos(now_ns.saturating_sub(f.last_seen_ns())), flow: f.end_record(end_reason::NEW) });
    }

    /// Flows that ended.
    pub fn ended(&self, records: &[FlowEnd]) {
        for r in records {
            self.push(Record { kind: Kind::End, idle: Duration::ZERO, flow: *r });
        }
    }

    /// A record of the data plane's own (a new flow, or one it removed).
    pub fn event(&self, ev: &FlowEnd) {
        let kind = if ev.reason == end_reason::NEW { Kind::Live } else { Kind::End };
        self.push(Record { kind, idle: Duration::ZERO, flow: *ev });
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
/// `PER_DATAGRAM` records, or whatever is queued after 10 ms).
pub async fn send(mut rx: mpsc::Receiver<Record>, sock: Arc<tokio::net::UdpSocket>, cfg: SyncConfig, ctl: Handle) {
    let mut seq = 0u64;
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
            if batch.len() < PER_DATAGRAM && tokio::time::Instant::now() < deadline {
                if let Ok(Some(r)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                    batch.push(r);
                    continue;
                }
            }
            seq += 1;
            let d = crate::ha::encode(&cfg.key, seq, &batch);
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

/// Receives the peer's datagrams, admits them here, and has the controller
/// install what was admitted while this node is backup.
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
        let records = receiver.admit(&d, std::time::Instant::now());
        let (datagrams, gaps, stale, lag) = (receiver.datagrams, receiver.gaps, receiver.stale_ignored, receiver.last_lag.as_secs_f64());
        ctl.post(move |c| {
            if let Err(e) = c.sync_install(&records) {
                tracing::warn!(error = %e, "installing synced flows failed");
            }
            if let Some(s) = c.sync_status_mut() {
                s.received_datagrams = datagrams;
                s.sequence_gaps = gaps;
                s.stale_ignored = stale;
                s.lag_s = lag;
            }
        })
        .await;
    }
}
