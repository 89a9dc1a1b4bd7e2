//! TCP flow state tracking as the data plane sees it: pure functions so the
//! XDP program and the host tests share them.

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

/// A SYN for an existing flow whose previous life ended may start a new flow
/// on the same 5-tuple (port reuse): it is scheduled afresh.
#[inline(always)]
pub const fn is_reusable(state: u8) -> bool {
    state == STATE_FIN || state == STATE_CLOSED
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
}
