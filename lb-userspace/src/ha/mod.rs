//! Connection-state sync between the two nodes of an active/standby pair,
//! so established flows survive a failover.
//!
//! The active node (role `master`) sends every flow the data plane creates
//! and every flow that ends (the same ring-buffer events flow logs use),
//! plus a full refresh of the table every `REFRESH` (which heals lost
//! datagrams and keeps the standby's copies from idling out). The standby
//! (role `backup`) installs and removes them in its own tables, translating
//! service and backend ids through addresses (the two nodes need the same
//! services and backends, not the same ids).
//!
//! Datagrams are authenticated (HMAC-SHA256 with a shared key over the
//! whole datagram) and accepted only from the configured peer address
//! (`wire`). Each names its sender's epoch (the sending daemon's start
//! time) and a sequence number within it, and carries its send time: the
//! receiver refuses a replay (a number seen, or older than its window), a
//! previous run's datagrams (a lower epoch), and anything sent too far
//! from its own clock; a higher epoch is the peer's restart, followed at
//! once (`receiver`). A lost datagram is healed by the next refresh; a
//! reordered one cannot resurrect a flow: an end is remembered (per key,
//! with its place in the stream) for `TOMBSTONE`, and older news of that
//! key is ignored. The master's sending queue is bounded (`queue`).

pub mod bgp;
mod queue;
mod receiver;
mod wire;

use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

pub use queue::{QueueError, QueueRx, QueueTx, queue};
pub use receiver::{Receiver, Refusal};
pub use wire::{Datagram, Kind, PER_DATAGRAM, Record, Sender, decode, encode, unix_ns};

/// How often the active node sends its whole table.
pub const REFRESH: Duration = Duration::from_secs(3);
/// How long an ended flow blocks older news of the same key.
pub const TOMBSTONE: Duration = Duration::from_secs(30);
/// At most this many tombstones are kept (the oldest go first).
pub const MAX_TOMBSTONES: usize = 1 << 20;
/// Sequence numbers the receiver remembers below the highest of an epoch
/// (a multiple of 64): a datagram reordered by more is refused.
pub const WINDOW: u64 = 1024;
/// A datagram sent further than this from the receiver's clock, either
/// way, is refused: the pair's clocks must agree within it (NTP).
pub const SEND_TIME_TOLERANCE: Duration = Duration::from_secs(60);
/// Flow changes (new, ended) the master queues for sending: beyond, they
/// are dropped and counted (the next refresh heals them).
pub const EVENT_QUEUE: usize = 32 * 1024;
/// Refresh records queued ahead of the socket (the refresh waits beyond).
pub const REFRESH_QUEUE: usize = 4 * 1024;

/// A node's role in the pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sends its flow state; ignores the peer's.
    Master,
    /// Installs the peer's flow state.
    #[default]
    Backup,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Master => "master",
            Role::Backup => "backup",
        })
    }
}

/// Sync figures for `xlb status` and metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    pub role: Role,
    pub peer: String,
    pub sent_datagrams: u64,
    pub sent_records: u64,
    /// Flow changes not sent: the sending queue was full (the next
    /// refresh heals them).
    #[serde(default)]
    pub dropped_records: u64,
    /// This node's sending epoch (its daemon's start, unix ns).
    #[serde(default)]
    pub epoch: u64,
    /// Authenticated datagrams received as backup (the refused ones below
    /// included).
    pub received_datagrams: u64,
    /// Refused: not from the peer, bad tag, malformed.
    pub refused_datagrams: u64,
    /// Refused: an (epoch, sequence) already seen, or older than the window.
    #[serde(default)]
    pub replayed_datagrams: u64,
    /// Refused: from an earlier run of the peer's daemon (a lower epoch).
    #[serde(default)]
    pub old_epoch_datagrams: u64,
    /// Refused: sent further than `SEND_TIME_TOLERANCE` from this node's
    /// clock.
    #[serde(default)]
    pub stale_datagrams: u64,
    /// Times the peer's epoch grew (its daemon restarted).
    #[serde(default)]
    pub peer_restarts: u64,
    /// The peer's newest epoch (0 before its first datagram).
    #[serde(default)]
    pub peer_epoch: u64,
    /// Datagrams received while master (not applied).
    pub ignored_as_master: u64,
    pub applied_records: u64,
    /// Records naming a service or backend this node does not have.
    pub unknown_records: u64,
    /// Sequence numbers the peer skipped within an epoch (lost datagrams).
    pub sequence_gaps: u64,
    /// Live records ignored: older than the end of their flow.
    pub stale_ignored: u64,
    /// Send-to-apply delay of the last datagram, in seconds.
    pub lag_s: f64,
}

impl SyncStatus {
    /// Takes the receiving side's figures (what `Receiver::report` fills)
    /// from `r`, leaving the rest (role, sending side, installs) as is.
    pub fn take_receiver_figures(&mut self, r: &SyncStatus) {
        self.received_datagrams = r.received_datagrams;
        self.replayed_datagrams = r.replayed_datagrams;
        self.old_epoch_datagrams = r.old_epoch_datagrams;
        self.stale_datagrams = r.stale_datagrams;
        self.peer_restarts = r.peer_restarts;
        self.peer_epoch = r.peer_epoch;
        self.sequence_gaps = r.sequence_gaps;
        self.stale_ignored = r.stale_ignored;
        self.lag_s = r.lag_s;
    }
}

/// Where the pair talks.
#[derive(Clone, Debug)]
pub struct SyncConfig {
    pub listen: SocketAddr,
    pub peer: SocketAddr,
    pub key: Vec<u8>,
}
