//! The standby's admission of verified datagrams: which to refuse
//! (replays, old epochs, stale send times) and which records to apply.
//!
//! Rules, in order, for a datagram whose tag verified:
//! 1. its send time is more than the tolerance (`SEND_TIME_TOLERANCE`)
//!    from this node's clock, either way: refused, `stale`. This bounds a
//!    replay of anything this receiver cannot remember (an epoch it never
//!    saw, e.g. after this node restarted);
//! 2. its epoch is lower than the newest seen: refused, `old_epoch` (a
//!    previous run of the peer's daemon) — unless the newest epoch has been
//!    silent for twice the tolerance, which only a peer whose clock went
//!    back across a restart can cause: then taken as a restart;
//! 3. its epoch is higher: the peer restarted (`peer_restarts`); a new
//!    window starts;
//! 4. within the epoch, a sliding window of the last `WINDOW` sequence
//!    numbers: a number already seen, or below the window, is refused,
//!    `replayed`; anything else is accepted (reordered ones too), and a
//!    jump past the highest counts the numbers skipped as `gaps`.
//!
//! Of an accepted datagram, an end is remembered for `TOMBSTONE` (with
//! its position in the stream) and older "live" news of that key is
//! ignored (`stale_ignored`). Everything costs O(records in the datagram),
//! amortized: the window moves by at most the sequence numbers the sender
//! used, and tombstones expire from the front of a queue in time order.

use std::{
    collections::{HashMap, VecDeque, hash_map::Entry},
    time::{Duration, Instant},
};

use lb_common::maps::FlowKey;

use super::{
    MAX_TOMBSTONES, SEND_TIME_TOLERANCE, SyncStatus, TOMBSTONE, WINDOW,
    wire::{Datagram, Kind, Record},
};

/// Why a verified datagram was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its (epoch, sequence) was seen already.
    Replayed,
    /// Its sequence number is older than the window.
    BelowWindow,
    /// From an epoch older than the newest seen.
    OldEpoch,
    /// Its send time is too far from this node's clock.
    Stale,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Replayed => "replayed (sequence number already seen)",
            Refusal::BelowWindow => "replayed or too late (sequence number below the window)",
            Refusal::OldEpoch => "from an earlier run of the peer's daemon (older epoch)",
            Refusal::Stale => "send time too far from this node's clock (replayed, or the clocks disagree)",
        })
    }
}

const WORDS: usize = (WINDOW / 64) as usize;

/// The anti-replay window of one epoch: bit `seq % WINDOW` tells whether
/// `seq` was seen, for the `WINDOW` numbers up to `top`.
struct Window {
    epoch: u64,
    /// Receiver-local number of this window (increases with each new
    /// one): positions of different epochs compare by it.
    stream: u64,
    top: u64,
    seen: [u64; WORDS],
    /// Count the numbers skipped before the first datagram as gaps (not
    /// for the first epoch seen: this node may have joined mid-stream).
    from_start: bool,
    last_accepted: Instant,
}

impl Window {
    fn new(epoch: u64, stream: u64, from_start: bool, now: Instant) -> Self {
        Self { epoch, stream, top: 0, seen: [0; WORDS], from_start, last_accepted: now }
    }

    fn bit(seq: u64) -> (usize, u64) {
        let i = seq % WINDOW;
        ((i / 64) as usize, 1 << (i % 64))
    }

    fn check(&self, seq: u64) -> Result<(), Refusal> {
        if seq > self.top {
            return Ok(());
        }
        if self.top - seq >= WINDOW {
            return Err(Refusal::BelowWindow);
        }
        let (w, b) = Self::bit(seq);
        if self.seen[w] & b != 0 { Err(Refusal::Replayed) } else { Ok(()) }
    }

    /// Marks `seq` seen (after `check`); returns the numbers skipped.
    fn mark(&mut self, seq: u64) -> u64 {
        let mut gaps = 0;
        if seq > self.top {
            let advance = seq - self.top;
            if self.top > 0 || self.from_start {
                gaps = advance - 1;
            }
            if advance >= WINDOW {
                self.seen = [0; WORDS];
            } else {
                for s in self.top + 1..seq {
                    let (w, b) = Self::bit(s);
                    self.seen[w] &= !b;
                }
            }
            self.top = seq;
        }
        let (w, b) = Self::bit(seq);
        self.seen[w] |= b;
        gaps
    }
}

/// A datagram's place in what this receiver accepted: (stream, sequence).
type Position = (u64, u64);

/// Ended flows, in a map for lookups and a queue in time order for expiry.
struct Tombstones {
    /// At most this many (`MAX_TOMBSTONES`).
    cap: usize,
    ends: HashMap<FlowKey, (Position, Instant)>,
    /// (when, key) in the order set; an entry whose key was set again
    /// later, or cleared, is skipped when it comes out.
    order: VecDeque<(Instant, FlowKey)>,
}

impl Tombstones {
    fn new(cap: usize) -> Self {
        Self { cap, ends: HashMap::new(), order: VecDeque::new() }
    }

    /// Drops the tombstones older than `TOMBSTONE` (and the oldest beyond
    /// the cap): each queue entry is looked at once.
    fn expire(&mut self, now: Instant) {
        while let Some(&(when, key)) = self.order.front() {
            let full = self.ends.len() > self.cap || self.order.len() > 2 * self.cap;
            if !full && now.saturating_duration_since(when) < TOMBSTONE {
                break;
            }
            self.order.pop_front();
            if self.ends.get(&key).is_some_and(|(_, w)| *w == when) {
                self.ends.remove(&key);
            }
        }
    }

    fn end(&mut self, key: FlowKey, at: Position, now: Instant) {
        match self.ends.entry(key) {
            Entry::Occupied(mut e) => {
                if at >= e.get().0 {
                    e.insert((at, now));
                    self.order.push_back((now, key));
                }
            }
            Entry::Vacant(e) => {
                e.insert((at, now));
                self.order.push_back((now, key));
            }
        }
    }
}

/// The standby's bookkeeping: what it received and what it must ignore.
pub struct Receiver {
    tolerance: Duration,
    /// The newest epoch's window (none before the first datagram).
    window: Option<Window>,
    streams: u64,
    tombstones: Tombstones,
    /// Verified datagrams that reached the receiver (refused ones too).
    pub datagrams: u64,
    pub replayed: u64,
    pub old_epoch: u64,
    pub stale: u64,
    pub peer_restarts: u64,
    pub gaps: u64,
    pub stale_ignored: u64,
    /// Send-to-apply delay of the last datagram (wall clocks of both nodes).
    pub last_lag: Duration,
}

impl Default for Receiver {
    fn default() -> Self {
        Self::with_tolerance(SEND_TIME_TOLERANCE)
    }
}

impl Receiver {
    /// A receiver that refuses send times further than `tolerance` from
    /// its clock.
    pub fn with_tolerance(tolerance: Duration) -> Self {
        Self {
            tolerance,
            window: None,
            streams: 0,
            tombstones: Tombstones::new(MAX_TOMBSTONES),
            datagrams: 0,
            replayed: 0,
            old_epoch: 0,
            stale: 0,
            peer_restarts: 0,
            gaps: 0,
            stale_ignored: 0,
            last_lag: Duration::ZERO,
        }
    }

    /// The peer's newest epoch (0 before any datagram).
    pub fn peer_epoch(&self) -> u64 {
        self.window.as_ref().map_or(0, |w| w.epoch)
    }

    /// Which of a verified datagram's records to apply, in order; a
    /// refused datagram changes nothing but its counter. `now` and
    /// `now_unix_ns` are this node's monotonic and wall clocks.
    pub fn admit(&mut self, d: &Datagram, now: Instant, now_unix_ns: u64) -> Result<Vec<Record>, Refusal> {
        self.datagrams += 1;
        if u128::from(now_unix_ns.abs_diff(d.sent_unix_ns)) > self.tolerance.as_nanos() {
            self.stale += 1;
            return Err(Refusal::Stale);
        }
        // Whether a new window starts, and if so whether it is a restart.
        let new_window = match &self.window {
            None => Some(false),
            Some(w) if d.epoch > w.epoch => Some(true),
            Some(w) if d.epoch < w.epoch => {
                if now.saturating_duration_since(w.last_accepted) <= self.tolerance.saturating_mul(2) {
                    self.old_epoch += 1;
                    return Err(Refusal::OldEpoch);
                }
                // The newest epoch has been silent longer than any replay of
                // an older one can be (it would be stale): a real sender
                // whose clock went back across its restart.
                Some(true)
            }
            Some(w) => {
                if let Err(why) = w.check(d.seq) {
                    self.replayed += 1;
                    return Err(why);
                }
                None
            }
        };
        let w = match (new_window, &mut self.window) {
            (None, Some(w)) => w,
            (restart, slot) => {
                let restart = restart == Some(true);
                self.streams += 1;
                self.peer_restarts += u64::from(restart);
                slot.insert(Window::new(d.epoch, self.streams, restart, now))
            }
        };
        self.gaps += w.mark(d.seq);
        w.last_accepted = now;
        let at = (w.stream, d.seq);
        self.last_lag = Duration::from_nanos(now_unix_ns.saturating_sub(d.sent_unix_ns));

        self.tombstones.expire(now);
        let mut out = Vec::with_capacity(d.records.len());
        for r in &d.records {
            match r.kind {
                Kind::End => {
                    self.tombstones.end(r.flow.key, at, now);
                    out.push(*r);
                }
                Kind::Live => match self.tombstones.ends.get(&r.flow.key) {
                    // News older than the end: the flow is gone.
                    Some((end_at, _)) if at < *end_at => self.stale_ignored += 1,
                    Some(_) => {
                        // A newer flow on the same 5-tuple.
                        self.tombstones.ends.remove(&r.flow.key);
                        out.push(*r);
                    }
                    None => out.push(*r),
                },
            }
        }
        Ok(out)
    }

    /// Copies the receiver's figures into the node's sync status.
    pub fn report(&self, s: &mut SyncStatus) {
        s.received_datagrams = self.datagrams;
        s.replayed_datagrams = self.replayed;
        s.old_epoch_datagrams = self.old_epoch;
        s.stale_datagrams = self.stale;
        s.peer_restarts = self.peer_restarts;
        s.peer_epoch = self.peer_epoch();
        s.sequence_gaps = self.gaps;
        s.stale_ignored = self.stale_ignored;
        s.lag_s = self.last_lag.as_secs_f64();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::maps::{FlowEnd, addr_v4};

    /// The receiver's wall clock in these tests (unix ns).
    const T0: u64 = 1_700_000_000_000_000_000;
    /// The peer's first epoch, and the one after its restart.
    const E1: u64 = T0 - 3_600_000_000_000;
    const E2: u64 = T0 - 1_000_000_000;

    fn flow(port: u16) -> FlowEnd {
        let key = FlowKey::new(addr_v4(0x0200000a), addr_v4(0x0100630a), port.to_be(), 80u16.to_be(), 6);
        let mut f = FlowEnd { key, ..Default::default() };
        f.state.packets_orig = 7;
        f
    }

    fn live(port: u16) -> Record {
        Record { kind: Kind::Live, idle: Duration::from_millis(250), flow: flow(port) }
    }

    fn end(port: u16) -> Record {
        Record { kind: Kind::End, ..live(port) }
    }

    /// A datagram of epoch `epoch`, sent at T0.
    fn dg(epoch: u64, seq: u64, records: Vec<Record>) -> Datagram {
        Datagram { epoch, seq, sent_unix_ns: T0, records }
    }

    fn admit(r: &mut Receiver, d: &Datagram, now: Instant) -> Result<Vec<Record>, Refusal> {
        r.admit(d, now, T0)
    }

    #[test]
    fn a_late_live_record_cannot_resurrect_an_ended_flow() {
        let mut r = Receiver::default();
        let now = Instant::now();
        let ended = dg(E1, 10, vec![end(1)]);
        let late = dg(E1, 9, vec![live(1), live(2)]);
        assert_eq!(admit(&mut r, &ended, now).expect("admitted").len(), 1);
        let admitted = admit(&mut r, &late, now).expect("admitted");
        assert_eq!(admitted, vec![live(2)], "the ended flow's older news is ignored, others apply");
        assert_eq!(r.stale_ignored, 1);
        // A newer flow on the same 5-tuple is admitted.
        assert_eq!(admit(&mut r, &dg(E1, 11, vec![live(1)]), now), Ok(vec![live(1)]));
        assert_eq!(r.gaps, 0);
        assert_eq!(admit(&mut r, &dg(E1, 15, vec![]), now), Ok(vec![]));
        assert_eq!(r.gaps, 3, "12, 13, 14 never arrived");
    }

    #[test]
    fn a_replayed_datagram_is_refused_and_counted() {
        let mut r = Receiver::default();
        let now = Instant::now();
        let d = dg(E1, 1, vec![live(1)]);
        assert_eq!(admit(&mut r, &d, now), Ok(vec![live(1)]));
        assert_eq!(admit(&mut r, &d, now), Err(Refusal::Replayed));
        assert_eq!(admit(&mut r, &dg(E1, 2, vec![live(2)]), now), Ok(vec![live(2)]));
        assert_eq!(admit(&mut r, &d, now), Err(Refusal::Replayed), "still remembered after newer ones");
        assert_eq!((r.datagrams, r.replayed, r.gaps), (4, 2, 0));
        let mut s = SyncStatus::default();
        r.report(&mut s);
        assert_eq!((s.received_datagrams, s.replayed_datagrams, s.peer_epoch), (4, 2, E1));
    }

    #[test]
    fn reordered_datagrams_within_the_window_are_each_accepted_once() {
        let mut r = Receiver::default();
        let now = Instant::now();
        let order = [1u64, 5, 3, 2, 4, 1000, 7, 6, 999];
        for &seq in &order {
            assert_eq!(admit(&mut r, &dg(E1, seq, vec![live(seq as u16)]), now), Ok(vec![live(seq as u16)]), "seq {seq}");
        }
        for &seq in &order {
            assert_eq!(admit(&mut r, &dg(E1, seq, vec![]), now), Err(Refusal::Replayed), "seq {seq} again");
        }
        assert_eq!(r.replayed, order.len() as u64);
        // 8 (never sent yet) is still accepted: 1000 - 8 < WINDOW.
        assert_eq!(admit(&mut r, &dg(E1, 8, vec![]), now), Ok(vec![]));
    }

    #[test]
    fn a_datagram_older_than_the_window_is_refused() {
        let mut r = Receiver::default();
        let now = Instant::now();
        assert!(admit(&mut r, &dg(E1, 5, vec![]), now).is_ok());
        assert!(admit(&mut r, &dg(E1, 5 + WINDOW, vec![]), now).is_ok());
        assert_eq!(admit(&mut r, &dg(E1, 6, vec![]), now), Ok(vec![]), "the oldest number inside the window");
        assert_eq!(admit(&mut r, &dg(E1, 4, vec![]), now), Err(Refusal::BelowWindow));
        assert_eq!(admit(&mut r, &dg(E1, 5, vec![]), now), Err(Refusal::BelowWindow));
        assert_eq!(r.replayed, 2);
        // A long jump clears the window: numbers since are new, older are out.
        assert!(admit(&mut r, &dg(E1, 10 * WINDOW, vec![]), now).is_ok());
        assert_eq!(admit(&mut r, &dg(E1, 10 * WINDOW - 1, vec![]), now), Ok(vec![]));
        assert_eq!(admit(&mut r, &dg(E1, 9 * WINDOW, vec![]), now), Err(Refusal::BelowWindow));
        // Bits reused around the ring do not leak: WINDOW + 5 and 5 share one.
        let mut r = Receiver::default();
        assert!(admit(&mut r, &dg(E1, 5, vec![]), now).is_ok());
        assert_eq!(admit(&mut r, &dg(E1, WINDOW + 4, vec![]), now), Ok(vec![]));
        assert_eq!(admit(&mut r, &dg(E1, WINDOW + 5, vec![]), now), Ok(vec![]), "not mistaken for 5");
    }

    #[test]
    fn a_restarted_master_is_followed_and_its_old_epoch_refused() {
        let mut r = Receiver::default();
        let now = Instant::now();
        for seq in 1..=500 {
            assert!(admit(&mut r, &dg(E1, seq, vec![]), now).is_ok());
        }
        let before = dg(E1, 499, vec![live(9)]);
        // The master restarts: a new epoch, numbered from 1 again.
        assert_eq!(admit(&mut r, &dg(E2, 1, vec![live(1)]), now), Ok(vec![live(1)]));
        assert_eq!((r.peer_restarts, r.peer_epoch(), r.gaps), (1, E2, 0));
        assert_eq!(admit(&mut r, &dg(E2, 2, vec![live(2)]), now), Ok(vec![live(2)]));
        assert_eq!(admit(&mut r, &dg(E2, 1, vec![]), now), Err(Refusal::Replayed));
        // The previous run's datagrams (live or replayed) are refused now.
        assert_eq!(admit(&mut r, &dg(E1, 501, vec![live(9)]), now), Err(Refusal::OldEpoch));
        assert_eq!(admit(&mut r, &before, now), Err(Refusal::OldEpoch));
        assert_eq!(r.old_epoch, 2);
        // Lost datagrams right after the restart are gaps from 1.
        assert!(admit(&mut r, &dg(E2, 5, vec![]), now).is_ok());
        assert_eq!(r.gaps, 2);
        // A third start, seen first at its 4th datagram: 3 gaps.
        assert!(admit(&mut r, &dg(E2 + 1, 4, vec![]), now).is_ok());
        assert_eq!((r.peer_restarts, r.gaps), (2, 5));
    }

    #[test]
    fn an_end_before_a_restart_does_not_block_the_new_run_news() {
        let mut r = Receiver::default();
        let now = Instant::now();
        assert!(admit(&mut r, &dg(E1, 900, vec![end(1)]), now).is_ok());
        // The restarted master's table still has a flow on that 5-tuple.
        assert_eq!(admit(&mut r, &dg(E2, 1, vec![live(1)]), now), Ok(vec![live(1)]));
        assert_eq!(r.stale_ignored, 0);
    }

    #[test]
    fn stale_send_times_are_refused_either_way() {
        let mut r = Receiver::default();
        let now = Instant::now();
        let tol = SEND_TIME_TOLERANCE.as_nanos() as u64;
        let at = |sent: u64, seq: u64| Datagram { epoch: E1, seq, sent_unix_ns: sent, records: vec![live(1)] };
        assert_eq!(admit(&mut r, &at(T0 - tol - 1, 1), now), Err(Refusal::Stale), "too old");
        assert_eq!(admit(&mut r, &at(T0 + tol + 1, 1), now), Err(Refusal::Stale), "from the future");
        assert_eq!(r.stale, 2);
        assert_eq!(r.peer_epoch(), 0, "a refused datagram starts no window");
        assert_eq!(admit(&mut r, &at(T0 - tol, 1), now), Ok(vec![live(1)]), "at the edge");
        assert_eq!(admit(&mut r, &at(T0 + tol, 2), now), Ok(vec![live(1)]), "at the edge");
        // An epoch this receiver never saw, replayed later, is stale.
        let mut fresh = Receiver::default();
        assert_eq!(fresh.admit(&dg(E1, 7, vec![]), now, T0 + tol + 1), Err(Refusal::Stale));
        assert_eq!(fresh.datagrams, 1);
        // A tighter tolerance.
        let mut tight = Receiver::with_tolerance(Duration::from_secs(1));
        assert_eq!(tight.admit(&dg(E1, 1, vec![]), now, T0 + 2_000_000_000), Err(Refusal::Stale));
        assert_eq!(tight.admit(&dg(E1, 1, vec![]), now, T0 + 500_000_000), Ok(vec![]));
        assert_eq!(tight.last_lag, Duration::from_millis(500));
    }

    #[test]
    fn a_lower_epoch_is_taken_as_a_restart_only_after_the_newest_fell_silent() {
        let mut r = Receiver::default();
        let t = Instant::now();
        assert!(admit(&mut r, &dg(E2, 1, vec![]), t).is_ok());
        let silent = 2 * SEND_TIME_TOLERANCE;
        assert_eq!(admit(&mut r, &dg(E1, 1, vec![]), t + silent), Err(Refusal::OldEpoch));
        // The peer restarted with its clock set back, and E2 is gone.
        let later = t + silent + Duration::from_millis(1);
        assert_eq!(admit(&mut r, &dg(E1, 1, vec![live(1)]), later), Ok(vec![live(1)]));
        assert_eq!((r.peer_restarts, r.peer_epoch(), r.old_epoch), (1, E1, 1));
        assert_eq!(admit(&mut r, &dg(E1, 1, vec![]), later), Err(Refusal::Replayed));
    }

    #[test]
    fn tombstones_expire_and_an_end_keeps_the_newest_position() {
        let mut r = Receiver::default();
        let t = Instant::now();
        assert!(admit(&mut r, &dg(E1, 10, vec![end(1)]), t).is_ok());
        // A reordered, older end does not move the tombstone back.
        assert!(admit(&mut r, &dg(E1, 8, vec![end(1)]), t).is_ok());
        assert_eq!(admit(&mut r, &dg(E1, 9, vec![live(1)]), t), Ok(vec![]));
        // After TOMBSTONE, older news applies again (the refresh's view wins).
        let later = t + TOMBSTONE;
        assert_eq!(admit(&mut r, &dg(E1, 7, vec![live(1)]), later), Ok(vec![live(1)]));
        assert!(r.tombstones.ends.is_empty() && r.tombstones.order.is_empty());
        // An end set again later lives from the later time.
        let mut r = Receiver::default();
        assert!(admit(&mut r, &dg(E1, 1, vec![end(2)]), t).is_ok());
        assert!(admit(&mut r, &dg(E1, 3, vec![end(2)]), t + TOMBSTONE / 2).is_ok());
        assert_eq!(admit(&mut r, &dg(E1, 2, vec![live(2)]), t + TOMBSTONE), Ok(vec![]), "the second end still holds");
        assert_eq!(r.tombstones.order.len(), 1, "the first end's queue entry is gone");
        assert_eq!(admit(&mut r, &dg(E1, 4, vec![]), t + TOMBSTONE + TOMBSTONE / 2), Ok(vec![]));
        assert!(r.tombstones.ends.is_empty() && r.tombstones.order.is_empty());
    }

    #[test]
    fn admission_stays_cheap_with_100000_live_tombstones() {
        let mut r = Receiver::default();
        let t = Instant::now();
        let key = |i: u32| {
            let mut f = flow((i & 0xffff) as u16);
            f.key.src_addr = addr_v4(0x0a00_0000 | (i >> 16));
            f
        };
        let mut seq = 0;
        let mut i = 0u32;
        while i < 100_000 {
            let n = (crate::ha::PER_DATAGRAM as u32).min(100_000 - i);
            let recs = (i..i + n).map(|k| Record { kind: Kind::End, idle: Duration::ZERO, flow: key(k) }).collect();
            seq += 1;
            assert!(admit(&mut r, &dg(E1, seq, recs), t).is_ok());
            i += n;
        }
        assert_eq!((r.tombstones.ends.len(), r.tombstones.order.len()), (100_000, 100_000));
        // While none is due, a datagram touches only its own records: the
        // structures neither shrink nor grow by more than what it carries.
        let started = Instant::now();
        for k in 0..10_000u16 {
            seq += 1;
            let d = dg(E1, seq, vec![live(k), live(k.wrapping_add(1))]);
            assert_eq!(admit(&mut r, &d, t + TOMBSTONE / 2).map(|v| v.len()), Ok(2));
        }
        eprintln!("10,000 datagrams with 100,000 live tombstones: {:?}", started.elapsed());
        assert_eq!((r.tombstones.ends.len(), r.tombstones.order.len()), (100_000, 100_000));
        // A tombstoned key's older news is still refused.
        assert_eq!(admit(&mut r, &dg(E1, 1, vec![Record { kind: Kind::Live, idle: Duration::ZERO, flow: key(7) }]), t), Err(Refusal::BelowWindow));
        seq += 1;
        let mut old = dg(E1, seq, vec![]);
        old.records.push(Record { kind: Kind::Live, idle: Duration::ZERO, flow: key(7) });
        assert_eq!(admit(&mut r, &old, t + TOMBSTONE / 2), Ok(vec![old.records[0]]), "a newer flow on the 5-tuple");
        assert_eq!(r.tombstones.ends.len(), 99_999);
        // After TOMBSTONE every one is gone, at once, and the next datagram
        // finds nothing left to expire.
        seq += 1;
        assert!(admit(&mut r, &dg(E1, seq, vec![]), t + TOMBSTONE).is_ok());
        assert_eq!((r.tombstones.ends.len(), r.tombstones.order.len()), (0, 0));
    }

    #[test]
    fn tombstones_are_capped() {
        let mut t = Tombstones::new(1000);
        let now = Instant::now();
        let mut f = flow(1);
        for i in 0..1010 {
            f.key.src_addr = addr_v4(i);
            t.end(f.key, (1, u64::from(i)), now);
        }
        t.expire(now);
        assert_eq!((t.ends.len(), t.order.len()), (1000, 1000));
        f.key.src_addr = addr_v4(9);
        assert!(!t.ends.contains_key(&f.key), "the oldest went first");
        f.key.src_addr = addr_v4(10);
        assert!(t.ends.contains_key(&f.key));
        // Ends set again (queue entries left behind) are bounded too.
        for _ in 0..3000 {
            t.end(f.key, (2, 0), now);
            t.expire(now);
        }
        assert!(t.order.len() <= 2000 + 1, "{}", t.order.len());
    }
}
