//! The sync datagram, version 2: layout, authentication, encoding and
//! decoding.
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 4 | magic `XLBS` |
//! | 4 | 1 | version, 2 |
//! | 5 | 1 | record count n, at most `PER_DATAGRAM` |
//! | 6 | 2 | reserved, zero |
//! | 8 | 8 | sender epoch: the sending daemon's start, unix ns (never 0) |
//! | 16 | 8 | sequence number within the epoch, from 1 |
//! | 24 | 8 | send time, unix ns |
//! | 32 | n × `RECORD` | records |
//! | 32 + n × `RECORD` | 32 | HMAC-SHA256 (shared key) of every byte before it |
//!
//! A record: kind (1 live, 2 end), 7 reserved zero bytes, idle time
//! (ns), then the data plane's `FlowEnd` as laid out in memory (both nodes
//! run the same build on the same architecture). Header integers and the
//! idle time are big-endian.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use lb_common::maps::FlowEnd;
use sha2::Sha256;

const MAGIC: &[u8; 4] = b"XLBS";
const VERSION: u8 = 2;
const HEADER: usize = 32;
const MAC_LEN: usize = 32;
const RECORD: usize = 16 + std::mem::size_of::<FlowEnd>();
/// Records per datagram: within a 1500-byte MTU with room for headers.
pub const PER_DATAGRAM: usize = (1400 - HEADER - MAC_LEN) / RECORD;

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
    /// The sender's epoch: its daemon's start time (unix ns).
    pub epoch: u64,
    /// Within the epoch, from 1.
    pub seq: u64,
    pub sent_unix_ns: u64,
    pub records: Vec<Record>,
}

/// The wall clock, unix ns (0 if it is before 1970).
pub fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn mac(key: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length.
    <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
}

/// The sending side of one daemon run: its epoch and the last sequence
/// number used.
#[derive(Debug)]
pub struct Sender {
    epoch: u64,
    seq: u64,
}

impl Sender {
    /// A new epoch, the wall-clock time now: chosen once per daemon start,
    /// so a restarted sender's epoch is larger than its previous one's.
    pub fn start() -> Self {
        Self::with_epoch(unix_ns())
    }

    pub fn with_epoch(epoch: u64) -> Self {
        Self { epoch: epoch.max(1), seq: 0 }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Encodes `records` (the first `PER_DATAGRAM`) as the epoch's next
    /// datagram, stamped with the time now.
    pub fn seal(&mut self, key: &[u8], records: &[Record]) -> Vec<u8> {
        self.seq += 1;
        encode(key, self.epoch, self.seq, unix_ns(), records)
    }
}

/// Encodes the first `PER_DATAGRAM` of `records`, authenticated with `key`.
pub fn encode(key: &[u8], epoch: u64, seq: u64, sent_unix_ns: u64, records: &[Record]) -> Vec<u8> {
    let records = &records[..records.len().min(PER_DATAGRAM)];
    let mut b = Vec::with_capacity(HEADER + records.len() * RECORD + MAC_LEN);
    b.extend_from_slice(MAGIC);
    b.push(VERSION);
    b.push(records.len() as u8);
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&epoch.to_be_bytes());
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(&sent_unix_ns.to_be_bytes());
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

/// The big-endian u64 at `at` (0 past the end; callers check lengths first).
fn be64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        w.copy_from_slice(s);
    }
    u64::from_be_bytes(w)
}

/// Verifies and decodes a datagram; anything malformed or forged is
/// refused with a reason (and changes nothing). Nothing but the magic is
/// looked at before the tag is verified.
pub fn decode(key: &[u8], b: &[u8]) -> Result<Datagram, &'static str> {
    if b.len() < HEADER + MAC_LEN || &b[..4] != MAGIC {
        return Err("not a sync datagram");
    }
    let (body, tag) = b.split_at(b.len() - MAC_LEN);
    let mut m = mac(key);
    m.update(body);
    m.verify_slice(tag).map_err(|_| "bad authentication tag (wrong key, or forged)")?;
    match body[4] {
        VERSION => {}
        1 => return Err("version 1 datagram (the peer runs an older xlb: upgrade both nodes)"),
        _ => return Err("unknown version"),
    }
    if body[6..8] != [0, 0] {
        return Err("reserved header bytes are set");
    }
    let count = body[5] as usize;
    if count > PER_DATAGRAM {
        return Err("more records than a datagram holds");
    }
    if body.len() != HEADER + count * RECORD {
        return Err("length does not match the record count");
    }
    let (epoch, seq, sent_unix_ns) = (be64(body, 8), be64(body, 16), be64(body, 24));
    if epoch == 0 || seq == 0 {
        return Err("epoch or sequence number 0 (never sent)");
    }
    let mut records = Vec::with_capacity(count);
    for r in body[HEADER..].chunks_exact(RECORD) {
        let kind = match r[0] {
            1 => Kind::Live,
            2 => Kind::End,
            _ => return Err("unknown record kind"),
        };
        if r[1..8].iter().any(|&x| x != 0) {
            return Err("reserved record bytes are set");
        }
        let idle = Duration::from_nanos(be64(r, 8));
        // SAFETY: FlowEnd is Pod (every bit pattern is valid); the slice has its size.
        let flow = unsafe { std::ptr::read_unaligned(r[16..].as_ptr().cast::<FlowEnd>()) };
        records.push(Record { kind, idle, flow });
    }
    Ok(Datagram { epoch, seq, sent_unix_ns, records })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::maps::{FlowKey, addr_v4};

    fn flow(port: u16) -> FlowEnd {
        let key = FlowKey::new(addr_v4(0x0200000a), addr_v4(0x0100630a), port.to_be(), 80u16.to_be(), 6);
        let mut f = FlowEnd { key, ..Default::default() };
        f.state.packets_orig = 7;
        f
    }

    fn live(port: u16) -> Record {
        Record { kind: Kind::Live, idle: Duration::from_millis(250), flow: flow(port) }
    }

    /// `body` with a valid tag: what only a holder of the key can send.
    fn signed(key: &[u8], body: &[u8]) -> Vec<u8> {
        let mut m = mac(key);
        m.update(body);
        let mut b = body.to_vec();
        b.extend_from_slice(&m.finalize().into_bytes());
        b
    }

    /// A small deterministic generator (xorshift64*), so failures repeat.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    #[test]
    fn datagrams_round_trip_and_forgeries_are_refused() {
        let key = b"pair secret";
        let recs: Vec<Record> = (0..PER_DATAGRAM as u16).map(live).collect();
        let b = encode(key, 1_700_000_000_000_000_000, 42, 1_700_000_001_000_000_000, &recs);
        assert!(b.len() <= 1400, "{} bytes", b.len());
        assert_eq!(b.len(), HEADER + PER_DATAGRAM * RECORD + MAC_LEN);
        let d = decode(key, &b).expect("valid");
        assert_eq!(d, Datagram { epoch: 1_700_000_000_000_000_000, seq: 42, sent_unix_ns: 1_700_000_001_000_000_000, records: recs.clone() });
        assert_eq!(decode(b"other key", &b), Err("bad authentication tag (wrong key, or forged)"));
        // Every header field and every record byte is under the tag.
        for at in 4..b.len() - MAC_LEN {
            let mut flipped = b.clone();
            flipped[at] ^= 1;
            assert_eq!(decode(key, &flipped), Err("bad authentication tag (wrong key, or forged)"), "byte {at} changed");
        }
        assert!(decode(key, &b[..b.len() - 1]).is_err());
        assert!(decode(key, b"XLBS").is_err());
        assert!(decode(key, &[0u8; 100]).is_err());
        // More records than fit are cut to one datagram's worth.
        let many: Vec<Record> = (0..PER_DATAGRAM as u16 + 3).map(live).collect();
        assert_eq!(decode(key, &encode(key, 1, 1, 0, &many)).expect("valid").records, recs);
        // An empty datagram is valid.
        assert_eq!(decode(key, &encode(key, 1, 1, 0, &[])).expect("valid").records, vec![]);
    }

    #[test]
    fn a_sender_numbers_its_datagrams_from_1_in_its_epoch() {
        let key = b"pair secret";
        let mut s = Sender::with_epoch(5);
        let before = unix_ns();
        let d1 = decode(key, &s.seal(key, &[live(1)])).expect("valid");
        let d2 = decode(key, &s.seal(key, &[live(2)])).expect("valid");
        assert_eq!((d1.epoch, d1.seq, d2.epoch, d2.seq), (5, 1, 5, 2));
        assert!(d1.sent_unix_ns >= before && d2.sent_unix_ns >= d1.sent_unix_ns);
        // A restart's epoch is the clock then: larger than an earlier start's.
        let first = Sender::start();
        std::thread::sleep(Duration::from_millis(2));
        assert!(Sender::start().epoch() > first.epoch());
        assert_eq!(Sender::with_epoch(0).epoch(), 1, "epoch 0 is never used");
    }

    #[test]
    fn signed_but_malformed_datagrams_are_refused_with_a_reason() {
        let key = b"pair secret";
        let good = encode(key, 7, 3, 9, &[live(1), live(2)]);
        let body = &good[..good.len() - MAC_LEN];
        let with = |at: usize, v: u8| {
            let mut x = body.to_vec();
            x[at] = v;
            decode(key, &signed(key, &x))
        };
        assert_eq!(with(4, 1), Err("version 1 datagram (the peer runs an older xlb: upgrade both nodes)"));
        assert_eq!(with(4, 3), Err("unknown version"));
        assert_eq!(with(6, 1), Err("reserved header bytes are set"));
        assert_eq!(with(5, 3), Err("length does not match the record count"));
        assert_eq!(with(5, 1), Err("length does not match the record count"));
        assert_eq!(with(5, 255), Err("more records than a datagram holds"));
        assert_eq!(with(HEADER, 0), Err("unknown record kind"));
        assert_eq!(with(HEADER + RECORD, 3), Err("unknown record kind"));
        assert_eq!(with(HEADER + 1, 1), Err("reserved record bytes are set"));
        assert_eq!(decode(key, &signed(key, &body[..body.len() - 1])), Err("length does not match the record count"));
        assert_eq!(decode(key, &encode(key, 0, 1, 9, &[])), Err("epoch or sequence number 0 (never sent)"));
        assert_eq!(decode(key, &encode(key, 1, 0, 9, &[])), Err("epoch or sequence number 0 (never sent)"));
        // A valid tag over a short body.
        assert_eq!(decode(key, &signed(key, &body[..HEADER - 1])), Err("not a sync datagram"));
    }

    #[test]
    fn truncated_and_random_bytes_are_refused_without_panicking() {
        let key = b"pair secret";
        let good = encode(key, 7, 3, 9, &[live(1), live(2), live(3)]);
        for n in 0..good.len() {
            assert!(decode(key, &good[..n]).is_err(), "a {n}-byte prefix was accepted");
            assert!(decode(key, &good[good.len() - n..]).is_err(), "a {n}-byte suffix was accepted");
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for i in 0..5_000 {
            let n = (rng.next() % 1600) as usize;
            let mut b = rng.bytes(n);
            // Half of them look like sync datagrams up to the tag.
            if i % 2 == 0 && n >= 6 {
                b[..4].copy_from_slice(MAGIC);
                b[4] = VERSION;
                b[5] = (rng.next() % 8) as u8;
            }
            assert!(decode(key, &b).is_err(), "random bytes accepted: {b:?}");
        }
        // Signed random bodies (a key holder's garbage) never panic either;
        // the few that parse keep to the layout.
        for _ in 0..5_000 {
            let n = HEADER + (rng.next() % (4 * RECORD as u64)) as usize;
            let mut b = rng.bytes(n);
            b[..4].copy_from_slice(MAGIC);
            b[4] = VERSION;
            b[5] = (rng.next() % 5) as u8;
            b[6..8].fill(0);
            if let Ok(d) = decode(key, &signed(key, &b)) {
                assert_eq!(n, HEADER + d.records.len() * RECORD);
            }
        }
    }
}
