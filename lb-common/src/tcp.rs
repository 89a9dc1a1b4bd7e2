//! TCP flow state tracking as the data plane sees it: pure functions so the
//! XDP program and the host tests share them.

use crate::maps::{TCPD_LIBERAL, TCPD_SEEN, TCPD_WSCALE, TcpDir};

/// UDP flows and unused entries.
pub const STATE_NONE: u8 = 0;
/// A SYN was seen; the handshake has not completed.
pub const STATE_SYN: u8 = 1;
pub const STATE_ESTABLISHED: u8 = 2;
/// A FIN was seen from this direction.
pub const STATE_FIN: u8 = 3;
/// A RST was seen.
pub const STATE_CLOSED: u8 = 4;

pub const FLAG_FIN: u8 = 0x01;
pub const FLAG_SYN: u8 = 0x02;
pub const FLAG_RST: u8 = 0x04;
pub const FLAG_ACK: u8 = 0x10;

/// State after a segment with `flags` from this entry's direction.
#[inline(always)]
pub const fn next_state(cur: u8, flags: u8) -> u8 {
    if flags & FLAG_RST != 0 || cur == STATE_CLOSED {
        STATE_CLOSED
    } else if flags & FLAG_FIN != 0 {
        STATE_FIN
    } else if flags & FLAG_SYN != 0 {
        // First SYN or a retransmission (SYN or SYN-ACK): still handshaking.
        if cur == STATE_NONE { STATE_SYN } else { cur }
    } else if flags & FLAG_ACK != 0 && (cur == STATE_SYN || cur == STATE_NONE) {
        STATE_ESTABLISHED
    } else {
        cur
    }
}

/// Sequence number following a segment: SYN and FIN each take one.
#[inline(always)]
pub const fn segment_end(seq: u32, payload_len: u32, flags: u8) -> u32 {
    let mut end = seq.wrapping_add(payload_len);
    if flags & FLAG_SYN != 0 {
        end = end.wrapping_add(1);
    }
    if flags & FLAG_FIN != 0 {
        end = end.wrapping_add(1);
    }
    end
}

/// `a` is after `b` in sequence space (RFC 1982 serial arithmetic).
#[inline(always)]
pub const fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// A TCP segment as the tracking sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub seq: u32,
    pub ack: u32,
    /// The window field as sent (unscaled).
    pub win: u16,
    pub flags: u8,
    pub payload_len: u32,
    /// The window scale option of a SYN or SYN-ACK, if any.
    pub wscale: Option<u8>,
}

/// `track`'s verdicts.
pub const TRACK_OK: u8 = 0;
/// Outside the window (sequence or acknowledgement): nothing changed.
pub const TRACK_OUT_OF_WINDOW: u8 = 1;
/// Refused outright (no ACK on a non-SYN, a SYN-ACK that does not
/// acknowledge the SYN): nothing changed.
pub const TRACK_INVALID: u8 = 2;

/// The largest window scale (RFC 7323), assumed for a side whose scale the
/// data plane never saw (its windows are then bounded liberally).
pub const MAX_WSCALE: u8 = 14;
/// The kernel's floor for the acknowledgement window (`MAXACKWINCONST`).
const MIN_ACK_WINDOW: u32 = 66_000;

const fn before(a: u32, b: u32) -> bool {
    seq_after(b, a)
}

/// Makes `d` the side that sent a SYN (or SYN-ACK) starting at `seq`.
#[inline(always)]
fn init_side(d: &mut TcpDir, seg: &Segment, end: u32) {
    let win = if seg.win == 0 { 1 } else { seg.win as u32 };
    d.end = end;
    d.maxend = end;
    d.maxwin = win;
    d.state = STATE_SYN;
    match seg.wscale {
        Some(s) => {
            d.wscale = if s > MAX_WSCALE { MAX_WSCALE } else { s };
            d.flags = TCPD_SEEN | TCPD_WSCALE;
        }
        None => {
            d.wscale = 0;
            d.flags = TCPD_SEEN;
        }
    }
}

/// Tracks a segment from `sender` to `receiver`, as the kernel's conntrack
/// does (`tcp_in_window`): per side, the highest sequence sent, the highest
/// the other side allows, the largest window advertised. A segment is in
/// the window when its sequence lies between what the receiver may still
/// accept (`sender.maxend`) and what it can no longer need (`sender.end`
/// minus the receiver's largest window), and its acknowledgement between
/// what the receiver has sent (`receiver.end`) and an acknowledgement
/// window below it. Only a segment in the window changes anything:
/// retransmissions, reordering, SACK, zero-window probes and keep-alives
/// are in it; a blind attacker's segment almost never is.
///
/// A side never seen (a flow picked up mid-stream, a half-open flow created
/// from the SYN-ACK) is initialised from its first segment, and a window
/// scale the data plane did not see is taken as the largest (liberal).
#[inline(always)]
pub fn track(sender: &mut TcpDir, receiver: &mut TcpDir, seg: &Segment) -> u8 {
    let flags = seg.flags;
    let end = segment_end(seg.seq, seg.payload_len, flags);
    if flags & (FLAG_SYN | FLAG_RST | FLAG_ACK) == 0 {
        // Only a SYN or a RST may come without ACK.
        return TRACK_INVALID;
    }
    if flags & FLAG_SYN != 0 {
        if flags & FLAG_ACK == 0 {
            if sender.state > STATE_SYN {
                // A SYN on a connection past its handshake (not closed
                // both ways, or it would not be here): the backend answers
                // it with a challenge ACK; it changes nothing here.
                return TRACK_INVALID;
            }
            // The client's SYN (again: a retransmission or a new attempt).
            init_side(sender, seg, end);
            return TRACK_OK;
        }
        // The backend's SYN-ACK: it must acknowledge the client's SYN.
        if receiver.flags & TCPD_SEEN != 0 && seg.ack != receiver.end {
            return TRACK_INVALID;
        }
        init_side(sender, seg, end);
        if receiver.flags & TCPD_SEEN == 0 {
            // The client's SYN was not seen (stateless SYN): its sequence
            // space is what this SYN-ACK acknowledges, its windows and
            // scale are unknown.
            receiver.end = seg.ack;
            receiver.maxend = seg.ack;
            receiver.maxwin = 0;
            receiver.state = STATE_SYN;
            receiver.wscale = MAX_WSCALE;
            receiver.flags = TCPD_SEEN | TCPD_LIBERAL | TCPD_WSCALE;
        }
        if sender.flags & receiver.flags & TCPD_WSCALE == 0 {
            // Scaling is in effect only when both sides offered it.
            sender.wscale = 0;
            receiver.wscale = 0;
        }
        // The SYN-ACK's window bounds what the client may send.
        let right = seg.ack.wrapping_add(sender.maxwin);
        if seq_after(right, receiver.maxend) {
            receiver.maxend = right;
        }
        return TRACK_OK;
    }
    if sender.flags & TCPD_SEEN == 0 {
        // First segment of a side never seen: it defines the side; its
        // scale is unknown.
        let win = (seg.win as u32) << MAX_WSCALE;
        sender.end = end;
        sender.maxwin = if win == 0 { 1 } else { win };
        sender.maxend = end.wrapping_add(sender.maxwin);
        sender.wscale = MAX_WSCALE;
        sender.flags = TCPD_SEEN | TCPD_LIBERAL;
        if sender.state == STATE_NONE {
            sender.state = STATE_ESTABLISHED;
        }
    }
    let win = (seg.win as u32) << sender.wscale;
    let ack = if flags & FLAG_ACK != 0 { seg.ack } else { receiver.end };
    let ack_window = if sender.maxwin > MIN_ACK_WINDOW { sender.maxwin } else { MIN_ACK_WINDOW };
    let receiver_known = receiver.flags & TCPD_SEEN != 0;
    // I: not beyond what the receiver allows.
    let upper = !before(sender.maxend, seg.seq);
    // II: not older than the receiver's largest window (unknown: no bound).
    let lower = receiver.maxwin == 0 || !before(end, sender.end.wrapping_sub(receiver.maxwin));
    // III and IV: the acknowledgement is of data the receiver sent.
    let acked = !receiver_known || (!seq_after(ack, receiver.end) && !before(ack, receiver.end.wrapping_sub(ack_window)));
    if !(upper && lower && acked) {
        return TRACK_OUT_OF_WINDOW;
    }
    if win > sender.maxwin {
        sender.maxwin = win;
    }
    if seq_after(end, sender.end) {
        sender.end = end;
    }
    if flags & FLAG_ACK != 0 {
        let right = ack.wrapping_add(if win == 0 { 1 } else { win });
        if !receiver_known {
            // The other side, never seen: it has sent up to what this
            // acknowledges; its windows are unknown.
            receiver.end = ack;
            receiver.maxend = right;
            receiver.maxwin = 0;
            receiver.wscale = MAX_WSCALE;
            receiver.flags = TCPD_SEEN | TCPD_LIBERAL;
            if receiver.state == STATE_NONE {
                receiver.state = STATE_ESTABLISHED;
            }
        } else if seq_after(right, receiver.maxend) {
            receiver.maxend = right;
        }
    }
    sender.state = next_state(sender.state, flags);
    TRACK_OK
}

/// Whether a RST from `sender` carries exactly what the receiver expects
/// (RFC 5961: only such a RST is accepted): the sender's next sequence
/// number; or, before anything of the sender was seen (a RST answering a
/// SYN), an acknowledgement of exactly what the receiver sent.
#[inline(always)]
pub const fn rst_is_exact(sender: &TcpDir, receiver: &TcpDir, seg: &Segment) -> bool {
    if sender.flags & TCPD_SEEN != 0 {
        return seg.seq == sender.end;
    }
    seg.flags & FLAG_ACK != 0 && receiver.flags & TCPD_SEEN != 0 && seg.ack == receiver.end
}

/// Whether an ACK from the client completes the handshake: the backend's
/// SYN-ACK was seen and this acknowledges exactly it.
#[inline(always)]
pub const fn completes_handshake(orig: &TcpDir, reply: &TcpDir, seg: &Segment) -> bool {
    seg.flags & (FLAG_SYN | FLAG_RST | FLAG_ACK) == FLAG_ACK
        && orig.state == STATE_SYN
        && reply.flags & TCPD_SEEN != 0
        && reply.state == STATE_SYN
        && seg.ack == reply.end
}

/// Both sides are done: each sent a FIN, or one sent a RST. Only then may
/// the 5-tuple carry a new connection, and a full-NAT port go to another
/// flow.
#[inline(always)]
pub const fn is_closed(orig: u8, reply: u8) -> bool {
    orig == STATE_CLOSED || reply == STATE_CLOSED || (orig == STATE_FIN && reply == STATE_FIN)
}

/// The window scale option in a SYN's TCP options (`opts`: the bytes after
/// the 20-byte header), if any. The data plane walks the packet the same
/// way, within its bounds.
pub fn parse_wscale(opts: &[u8]) -> Option<u8> {
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => return None,
            1 => i += 1,
            kind => {
                let len = *opts.get(i + 1)? as usize;
                if len < 2 || i + len > opts.len() {
                    return None;
                }
                if kind == 3 && len == 3 {
                    return Some(opts[i + 2]);
                }
                i += len;
            }
        }
    }
    None
}

/// TCP option kind: maximum segment size (length 4).
pub const OPT_MSS: u8 = 2;
/// Option bytes walked at most (a header's options are at most 40 bytes:
/// one step per byte covers even a header of NOPs).
pub const MAX_OPTION_STEPS: usize = 40;

/// The MSS option of a TCP header of `hdr_len` bytes: the offset of its
/// value from the header's start, and the value. `read(off)` gives the two
/// header bytes at `off` (`None` past the packet): the data plane reads
/// the packet with it, the tests a slice. A malformed option list (a length
/// below 2 or past the header, an MSS option of another length) has none.
pub fn find_mss(hdr_len: usize, mut read: impl FnMut(usize) -> Option<[u8; 2]>) -> Option<(usize, u16)> {
    let mut off = 20;
    for _ in 0..MAX_OPTION_STEPS {
        // An MSS option needs 4 bytes; a last byte can only be padding.
        if off + 4 > hdr_len {
            return None;
        }
        let [kind, len] = read(off)?;
        match kind {
            0 => return None,
            1 => off += 1,
            _ => {
                let len = len as usize;
                if len < 2 || off + len > hdr_len {
                    return None;
                }
                if kind == OPT_MSS {
                    return if len == 4 { read(off + 2).map(|v| (off + 2, u16::from_be_bytes(v))) } else { None };
                }
                off += len;
            }
        }
    }
    None
}

/// The flow's state for humans, combining both directions' entries.
pub const fn combined_state(to_backend: u8, to_client: u8) -> u8 {
    if to_backend == STATE_CLOSED || to_client == STATE_CLOSED {
        STATE_CLOSED
    } else if to_backend == STATE_FIN || to_client == STATE_FIN {
        STATE_FIN
    } else if to_backend == STATE_ESTABLISHED {
        STATE_ESTABLISHED
    } else {
        to_backend
    }
}

pub const fn state_name(state: u8) -> &'static str {
    match state {
        STATE_NONE => "none",
        STATE_SYN => "syn",
        STATE_ESTABLISHED => "established",
        STATE_FIN => "fin",
        STATE_CLOSED => "closed",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(seq: u32, ack: u32, flags: u8, len: u32, win: u16) -> Segment {
        Segment { seq, ack, win, flags, payload_len: len, wscale: None }
    }

    /// A handshake client ISN 1000, backend ISN 5000, both scaling by 7;
    /// windows 512 << 7 = 65,536.
    fn established() -> (TcpDir, TcpDir) {
        let (mut c, mut b) = (TcpDir::default(), TcpDir::default());
        let mut syn = seg(1000, 0, FLAG_SYN, 0, 65535);
        syn.wscale = Some(7);
        assert_eq!(track(&mut c, &mut b, &syn), TRACK_OK);
        let mut synack = seg(5000, 1001, FLAG_SYN | FLAG_ACK, 0, 65535);
        synack.wscale = Some(7);
        assert_eq!(track(&mut b, &mut c, &synack), TRACK_OK);
        let ack = seg(1001, 5001, FLAG_ACK, 0, 512);
        assert!(completes_handshake(&c, &b, &ack));
        assert_eq!(track(&mut c, &mut b, &ack), TRACK_OK);
        assert_eq!(track(&mut b, &mut c, &seg(5001, 1001, FLAG_ACK, 0, 512)), TRACK_OK);
        assert_eq!((c.state, b.state), (STATE_ESTABLISHED, STATE_ESTABLISHED));
        assert_eq!((c.wscale, b.wscale), (7, 7));
        (c, b)
    }

    #[test]
    fn data_retransmissions_reordering_and_keepalives_stay_in_the_window() {
        let (mut c, mut b) = established();
        // 3 segments of 1000 bytes, the second arrives last.
        for s in [1001, 3001, 2001] {
            assert_eq!(track(&mut c, &mut b, &seg(s, 5001, FLAG_ACK, 1000, 512)), TRACK_OK, "segment {s}");
        }
        assert_eq!(c.end, 4001);
        // A retransmission of the first, and a keep-alive (one byte before).
        assert_eq!(track(&mut c, &mut b, &seg(1001, 5001, FLAG_ACK, 1000, 512)), TRACK_OK);
        assert_eq!(track(&mut c, &mut b, &seg(4000, 5001, FLAG_ACK, 0, 512)), TRACK_OK);
        assert_eq!(c.end, 4001, "nothing moves backwards");
        // The backend acknowledges it all and closes its window: a one-byte
        // zero-window probe is still in the window.
        assert_eq!(track(&mut b, &mut c, &seg(5001, 4001, FLAG_ACK, 0, 0)), TRACK_OK);
        assert_eq!(track(&mut c, &mut b, &seg(4001, 5001, FLAG_ACK, 1, 512)), TRACK_OK);
    }

    #[test]
    fn a_syn_on_a_connection_past_its_handshake_changes_nothing() {
        let (mut c, mut b) = established();
        assert_eq!(track(&mut c, &mut b, &seg(1001, 5001, FLAG_ACK | FLAG_FIN, 0, 512)), TRACK_OK);
        let before = (c, b);
        assert_eq!(track(&mut c, &mut b, &seg(90_000, 0, FLAG_SYN, 0, 65535)), TRACK_INVALID);
        assert_eq!((c, b), before, "a half-closed connection is not restarted by a SYN");
        // A retransmitted SYN during the handshake is still a SYN.
        let (mut c, mut b) = (TcpDir::default(), TcpDir::default());
        assert_eq!(track(&mut c, &mut b, &seg(1000, 0, FLAG_SYN, 0, 65535)), TRACK_OK);
        assert_eq!(track(&mut c, &mut b, &seg(1000, 0, FLAG_SYN, 0, 65535)), TRACK_OK);
        assert_eq!((c.state, c.end), (STATE_SYN, 1001));
    }

    #[test]
    fn a_blind_segment_changes_nothing_and_a_blind_rst_is_not_exact() {
        let (mut c, mut b) = established();
        let before = (c, b);
        // Sequence numbers anywhere but near the window, with a plausible
        // and an implausible acknowledgement.
        for s in [1001u32.wrapping_add(1 << 31), 1001u32.wrapping_add(1 << 20), 1001u32.wrapping_sub(1 << 20)] {
            for a in [5001u32, 5001u32.wrapping_add(1 << 31)] {
                assert_eq!(track(&mut c, &mut b, &seg(s, a, FLAG_ACK, 1, 512)), TRACK_OUT_OF_WINDOW, "seq {s} ack {a}");
            }
        }
        // In-window sequence but an acknowledgement of data never sent.
        assert_eq!(track(&mut c, &mut b, &seg(1001, 9001, FLAG_ACK, 1, 512)), TRACK_OUT_OF_WINDOW);
        assert_eq!((c, b), before, "nothing changed");
        assert!(!rst_is_exact(&c, &b, &seg(1001u32.wrapping_add(1 << 31), 0, FLAG_RST, 0, 0)));
        assert!(rst_is_exact(&c, &b, &seg(1001, 0, FLAG_RST, 0, 0)));
        // Segments without ACK (other than SYN and RST) are refused.
        assert_eq!(track(&mut c, &mut b, &seg(1001, 0, FLAG_FIN, 0, 512)), TRACK_INVALID);
    }

    #[test]
    fn a_syn_ack_must_acknowledge_the_syn_and_an_ack_completes_only_with_the_isn() {
        let (mut c, mut b) = (TcpDir::default(), TcpDir::default());
        track(&mut c, &mut b, &seg(1000, 0, FLAG_SYN, 0, 65535));
        assert_eq!(track(&mut b, &mut c, &seg(5000, 7777, FLAG_SYN | FLAG_ACK, 0, 65535)), TRACK_INVALID);
        assert_eq!(b.flags & TCPD_SEEN, 0);
        assert_eq!(track(&mut b, &mut c, &seg(5000, 1001, FLAG_SYN | FLAG_ACK, 0, 65535)), TRACK_OK);
        assert!(!completes_handshake(&c, &b, &seg(1001, 5002, FLAG_ACK, 0, 512)), "a guessed ISN");
        assert!(completes_handshake(&c, &b, &seg(1001, 5001, FLAG_ACK, 0, 512)));
        // No scaling unless both offered it.
        assert_eq!((c.wscale, b.wscale), (0, 0));
    }

    #[test]
    fn a_syn_ack_without_the_syn_creates_the_client_side_liberally() {
        let (mut c, mut b) = (TcpDir::default(), TcpDir::default());
        let mut synack = seg(5000, 1001, FLAG_SYN | FLAG_ACK, 0, 65535);
        synack.wscale = Some(7);
        assert_eq!(track(&mut b, &mut c, &synack), TRACK_OK);
        assert_eq!((c.end, c.flags & TCPD_LIBERAL), (1001, TCPD_LIBERAL));
        let ack = seg(1001, 5001, FLAG_ACK, 0, 512);
        assert!(completes_handshake(&c, &b, &ack));
        assert_eq!(track(&mut c, &mut b, &ack), TRACK_OK);
        // The client's data is bounded by the backend's window all the same.
        assert_eq!(track(&mut c, &mut b, &seg(1001u32.wrapping_add(1 << 31), 5001, FLAG_ACK, 1, 512)), TRACK_OUT_OF_WINDOW);
    }

    #[test]
    fn a_flow_picked_up_mid_stream_learns_each_side_from_its_first_segment() {
        let (mut c, mut b) = (TcpDir::default(), TcpDir::default());
        // The backend's packet re-creates the flow.
        assert_eq!(track(&mut b, &mut c, &seg(90_000, 40_000, FLAG_ACK, 100, 1000)), TRACK_OK);
        assert_eq!(b.end, 90_100);
        assert_eq!(track(&mut c, &mut b, &seg(40_000, 90_100, FLAG_ACK, 50, 1000)), TRACK_OK);
        assert_eq!(c.end, 40_050);
        assert_eq!(track(&mut b, &mut c, &seg(90_100, 40_050, FLAG_ACK, 0, 1000)), TRACK_OK);
    }

    #[test]
    fn simultaneous_close_and_rst_close_both_sides() {
        let (mut c, mut b) = established();
        assert_eq!(track(&mut c, &mut b, &seg(1001, 5001, FLAG_FIN | FLAG_ACK, 0, 512)), TRACK_OK);
        assert_eq!(track(&mut b, &mut c, &seg(5001, 1001, FLAG_FIN | FLAG_ACK, 0, 512)), TRACK_OK);
        assert!(!is_closed(c.state, STATE_ESTABLISHED), "one FIN is not closed");
        assert!(is_closed(c.state, b.state));
        assert_eq!((c.end, b.end), (1002, 5002));
        assert!(is_closed(STATE_CLOSED, STATE_ESTABLISHED));
    }

    #[test]
    fn window_scale_options_parse() {
        assert_eq!(parse_wscale(&[2, 4, 5, 0xb4, 1, 3, 3, 7]), Some(7));
        assert_eq!(parse_wscale(&[2, 4, 5, 0xb4, 0, 3, 3, 7]), None, "after the end of options");
        assert_eq!(parse_wscale(&[3, 2, 7]), None, "bad length");
        assert_eq!(parse_wscale(&[1, 1, 3]), None, "truncated");
    }

    #[test]
    fn handshake_data_close() {
        let s = next_state(STATE_NONE, FLAG_SYN);
        assert_eq!(s, STATE_SYN);
        assert_eq!(next_state(s, FLAG_SYN), STATE_SYN, "SYN retransmit");
        let s = next_state(s, FLAG_ACK);
        assert_eq!(s, STATE_ESTABLISHED);
        assert_eq!(next_state(s, FLAG_ACK), STATE_ESTABLISHED);
        let s = next_state(s, FLAG_FIN | FLAG_ACK);
        assert_eq!(s, STATE_FIN);
        assert_eq!(next_state(s, FLAG_ACK), STATE_FIN, "ACK after FIN stays closing");
        assert_eq!(next_state(s, FLAG_RST), STATE_CLOSED);
        assert_eq!(next_state(STATE_CLOSED, FLAG_ACK), STATE_CLOSED);
        assert_eq!(next_state(STATE_CLOSED, FLAG_SYN), STATE_CLOSED);
    }

    #[test]
    fn syn_ack_keeps_handshaking_then_ack_establishes() {
        let s = next_state(STATE_SYN, FLAG_SYN | FLAG_ACK);
        assert_eq!(s, STATE_SYN);
        assert_eq!(next_state(s, FLAG_ACK), STATE_ESTABLISHED);
    }

    #[test]
    fn segment_end_counts_syn_fin_and_wraps() {
        assert_eq!(segment_end(100, 0, FLAG_SYN), 101);
        assert_eq!(segment_end(100, 10, FLAG_ACK), 110);
        assert_eq!(segment_end(100, 10, FLAG_FIN), 111);
        assert_eq!(segment_end(u32::MAX, 2, FLAG_ACK), 1);
    }

    #[test]
    fn seq_after_handles_wraparound() {
        assert!(seq_after(1, u32::MAX));
        assert!(!seq_after(u32::MAX, 1));
        assert!(!seq_after(5, 5));
        assert!(seq_after(6, 5));
    }

    #[test]
    fn combined_state_prefers_teardown() {
        assert_eq!(combined_state(STATE_ESTABLISHED, STATE_FIN), STATE_FIN);
        assert_eq!(combined_state(STATE_FIN, STATE_CLOSED), STATE_CLOSED);
        assert_eq!(combined_state(STATE_ESTABLISHED, STATE_SYN), STATE_ESTABLISHED);
        assert_eq!(combined_state(STATE_SYN, STATE_SYN), STATE_SYN);
    }

    #[test]
    fn the_mss_option_is_found_behind_any_options_and_never_past_the_header() {
        let header = |opts: &[u8]| {
            let mut h = [0u8; 60];
            h[20..20 + opts.len()].copy_from_slice(opts);
            (h, 20 + opts.len())
        };
        let find = |h: &[u8], hdr_len: usize| find_mss(hdr_len, |o| h.get(o..o + 2).map(|b| [b[0], b[1]]));
        // Linux's SYN-ACK: MSS first, then SACK permitted, timestamps, NOP, window scale.
        let (linux, n) = header(&[2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7]);
        assert_eq!(find(&linux[..n], n), Some((22, 1460)));
        // Behind NOPs at an odd offset, and behind window scale.
        let (odd, n) = header(&[1, 2, 4, 0x05, 0x78, 1, 1, 1]);
        assert_eq!(find(&odd[..n], n), Some((23, 1400)));
        let (late, n) = header(&[1, 3, 3, 7, 2, 4, 0x02, 0x18]);
        assert_eq!(find(&late[..n], n), Some((26, 536)));
        // None: no MSS, end of options before it, a bad length, an MSS
        // option of the wrong length or cut by the header's end, 40 NOPs.
        for (opts, why) in [
            (&[1u8, 3, 3, 7][..], "no MSS"),
            (&[0, 0, 0, 0, 2, 4, 5, 0xb4], "end of options first"),
            (&[8, 1, 0, 0, 2, 4, 5, 0xb4], "a length below 2"),
            (&[2, 3, 5, 0xb4], "an MSS option of length 3"),
            (&[1; 40], "40 NOPs"),
        ] {
            let (h, n) = header(opts);
            assert_eq!(find(&h[..n], n), None, "{why}");
        }
        assert_eq!(find(&linux, 23), None, "the header ends inside the option");
        // Cut packets: `read` past the end ends the walk.
        assert_eq!(find(&linux[..21], 40), None);
    }
}
