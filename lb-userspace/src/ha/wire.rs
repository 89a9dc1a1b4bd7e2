//! The sync datagram: layout, authentication, encoding and decoding.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use lb_common::maps::FlowEnd;
use sha2::Sha256;

const MAGIC: &[u8; 4] = b"XLBS";
const VERSION: u8 = 1;
const HEADER: usize = 24;
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
    pub seq: u64,
    pub sent_unix_ns: u64,
    pub records: Vec<Record>,
}

pub(crate) fn unix_ns() -> u64 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::maps::{FlowKey, addr_v4};

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
}
