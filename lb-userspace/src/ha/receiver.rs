//! The standby's admission of verified datagrams: what to apply and what
//! to ignore.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use lb_common::maps::FlowKey;

use super::{
    TOMBSTONE,
    wire::{Datagram, Kind, Record, unix_ns},
};

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

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::maps::{FlowEnd, addr_v4};

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
