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
//! Datagrams are authenticated (HMAC-SHA256 with a shared key) and accepted
//! only from the configured peer address; each carries a sequence number.
//! A lost datagram is healed by the next refresh; a reordered one cannot
//! resurrect a flow: an end is remembered (per key, with its sequence
//! number) for `TOMBSTONE`, and older news of that key is ignored.

pub mod bgp;

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use lb_common::maps::{FlowEnd, FlowKey};
use sha2::Sha256;

const MAGIC: &[u8; 4] = b"XLBS";
const VERSION: u8 = 1;
const HEADER: usize = 24;
const MAC_LEN: usize = 32;
const RECORD: usize = 16 + std::mem::size_of::<FlowEnd>();
/// Records per datagram: within a 1500-byte MTU with room for headers.
pub const PER_DATAGRAM: usize = (1400 - HEADER - MAC_LEN) / RECORD;
/// How often the active node sends its whole table.
pub const REFRESH: Duration = Duration::from_secs(3);
/// How long an ended flow blocks older news of the same key.
pub const TOMBSTONE: Duration = Duration::from_secs(30);

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
    pub received_datagrams: u64,
    /// Refused: not from the peer, bad tag, malformed.
    pub refused_datagrams: u64,
    /// Datagrams received while master (not applied).
    pub ignored_as_master: u64,
    pub applied_records: u64,
    /// Records naming a service or backend this node does not have.
    pub unknown_records: u64,
    pub sequence_gaps: u64,
    pub stale_ignored: u64,
    /// Send-to-apply delay of the last datagram, in seconds.
    pub lag_s: f64,
}

/// What a record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The flow exists (new, or a refresh); `idle` since its last packet.
    Live,
    /// The flow ended.
    End,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    pub idle: Duration,
    pub flow: FlowEnd,
}

/// A datagram as received and verified.
#[derive(Debug, PartialEq, Eq)]
pub struct Datagram {
    pub seq: u64,
    pub sent_unix_ns: u64,
    pub records: Vec<Record>,
}

fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn mac(key: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length.
    <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
}

/// Encodes up to `PER_DATAGRAM` records.
pub fn encode(key: &[u8], seq: u64, records: &[Record]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER + records.len() * RECORD + MAC_LEN);
    b.extend_from_slice(MAGIC);
    b.push(VERSION);
    b.push(records.len() as u8);
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(&unix_ns().to_be_bytes());
    for r in records {
        b.push(match r.kind {
            Kind::Live => 1,
            Kind::End => 2,
        });
        b.extend_from_slice(&[0; 7]);
        b.extend_from_slice(&(r.idle.as_nanos() as u64).to_be_bytes());
        // SAFETY: FlowEnd is repr(C), integers only, no padding holes.
        let raw = unsafe { std::slice::from_raw_parts((&r.flow as *const FlowEnd).cast::<u8>(), std::mem::size_of::<FlowEnd>()) };
        b.extend_from_slice(raw);
    }
    let mut m = mac(key);
    m.update(&b);
    b.extend_from_slice(&m.finalize().into_bytes());
    b
}

/// Verifies and decodes a datagram; anything malformed or forged is
/// refused with a reason (and changes nothing).
pub fn decode(key: &[u8], b: &[u8]) -> Result<Datagram, &'static str> {
    if b.len() < HEADER + MAC_LEN || &b[..4] != MAGIC {
        return Err("not a sync datagram");
    }
    let (body, tag) = b.split_at(b.len() - MAC_LEN);
    let mut m = mac(key);
    m.update(body);
    m.verify_slice(tag).map_err(|_| "bad authentication tag (wrong key, or forged)")?;
    if body[4] != VERSION {
        return Err("unknown version");
    }
    let count = body[5] as usize;
    if body.len() != HEADER + count * RECORD {
        return Err("length does not match the record count");
    }
    let word = |at: usize| u64::from_be_bytes(body[at..at + 8].try_into().unwrap_or([0; 8]));
    let mut records = Vec::with_capacity(count);
    for i in 0..count {
        let r = &body[HEADER + i * RECORD..HEADER + (i + 1) * RECORD];
        let kind = match r[0] {
            1 => Kind::Live,
            2 => Kind::End,
            _ => return Err("unknown record kind"),
        };
        let idle = Duration::from_nanos(u64::from_be_bytes(r[8..16].try_into().unwrap_or([0; 8])));
        // SAFETY: FlowEnd is Pod (every bit pattern is valid); the slice has its size.
        let flow = unsafe { std::ptr::read_unaligned(r[16..].as_ptr().cast::<FlowEnd>()) };
        records.push(Record { kind, idle, flow });
    }
    Ok(Datagram { seq: word(8), sent_unix_ns: word(16), records })
}

/// The standby's bookkeeping: what it received and what it must ignore.
#[derive(Default)]
pub struct Receiver {
    /// Ended flows: key → (sequence of the end, when).
    tombstones: HashMap<FlowKey, (u64, Instant)>,
    pub highest_seq: u64,
    pub datagrams: u64,
    pub refused: u64,
    pub gaps: u64,
    pub stale_ignored: u64,
    /// Send-to-apply delay of the last datagram (wall clocks of both nodes).
    pub last_lag: Duration,
}

impl Receiver {
    /// Which of a verified datagram's records to apply, in order.
    pub fn admit(&mut self, d: &Datagram, now: Instant) -> Vec<Record> {
        self.datagrams += 1;
        if d.seq > self.highest_seq + 1 && self.highest_seq > 0 {
            self.gaps += d.seq - self.highest_seq - 1;
        }
        self.highest_seq = self.highest_seq.max(d.seq);
        self.last_lag = Duration::from_nanos(unix_ns().saturating_sub(d.sent_unix_ns));
        self.tombstones.retain(|_, (_, at)| now.duration_since(*at) < TOMBSTONE);
        let mut out = Vec::new();
        for r in &d.records {
            match r.kind {
                Kind::End => {
                    let t = self.tombstones.entry(r.flow.key).or_insert((d.seq, now));
                    if d.seq >= t.0 {
                        *t = (d.seq, now);
                    }
                    out.push(*r);
                }
                Kind::Live => match self.tombstones.get(&r.flow.key) {
                    // News older than the end: the flow is gone.
                    Some((end_seq, _)) if d.seq < *end_seq => self.stale_ignored += 1,
                    Some(_) => {
                        // A newer flow on the same 5-tuple.
                        self.tombstones.remove(&r.flow.key);
                        out.push(*r);
                    }
                    None => out.push(*r),
                },
            }
        }
        out
    }
}

/// Where the pair talks.
#[derive(Clone, Debug)]
pub struct SyncConfig {
    pub listen: SocketAddr,
    pub peer: SocketAddr,
    pub key: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::maps::addr_v4;

    fn flow(port: u16) -> FlowEnd {
        let mut f = FlowEnd::default();
        f.key = FlowKey { src_addr: addr_v4(0x0200000a), dst_addr: addr_v4(0x0100630a), src_port: port.to_be(), dst_port: 80u16.to_be(), proto: 6, _pad: [0; 3] };
        f.to_backend.packets = 7;
        f
    }

    fn live(port: u16) -> Record {
        Record { kind: Kind::Live, idle: Duration::from_millis(250), flow: flow(port) }
    }

    #[test]
    fn datagrams_round_trip_and_forgeries_are_refused() {
        let key = b"pair secret";
        let recs: Vec<Record> = (0..PER_DATAGRAM as u16).map(live).collect();
        let b = encode(key, 42, &recs);
        assert!(b.len() <= 1400, "{} bytes", b.len());
        let d = decode(key, &b).expect("valid");
        assert_eq!((d.seq, d.records.clone()), (42, recs));
        assert_eq!(decode(b"other key", &b), Err("bad authentication tag (wrong key, or forged)"));
        let mut flipped = b.clone();
        flipped[HEADER + 20] ^= 1;
        assert!(decode(key, &flipped).is_err(), "a changed record must fail the tag");
        assert!(decode(key, &b[..b.len() - 1]).is_err());
        assert!(decode(key, b"XLBS").is_err());
        assert!(decode(key, &[0u8; 100]).is_err());
    }

    #[test]
    fn a_late_live_record_cannot_resurrect_an_ended_flow() {
        let mut r = Receiver::default();
        let now = Instant::now();
        let end = Datagram { seq: 10, sent_unix_ns: 0, records: vec![Record { kind: Kind::End, ..live(1) }] };
        let late = Datagram { seq: 9, sent_unix_ns: 0, records: vec![live(1), live(2)] };
        assert_eq!(r.admit(&end, now).len(), 1);
        let admitted = r.admit(&late, now);
        assert_eq!(admitted, vec![live(2)], "the ended flow's older news is ignored, others apply");
        assert_eq!(r.stale_ignored, 1);
        // A newer flow on the same 5-tuple is admitted.
        let newer = Datagram { seq: 11, sent_unix_ns: 0, records: vec![live(1)] };
        assert_eq!(r.admit(&newer, now), vec![live(1)]);
        assert_eq!(r.gaps, 0);
        let after_gap = Datagram { seq: 15, sent_unix_ns: 0, records: vec![] };
        r.admit(&after_gap, now);
        assert_eq!(r.gaps, 3, "12, 13, 14 never arrived");
    }
}
