//! ICMP and ICMPv6 errors: the messages a router or host sends back about
//! a packet it could not deliver, quoting that packet's headers. xlb
//! translates those that quote one of its flows (see `lb-ebpf/src/icmp.rs`).

/// ICMP (IPv4) destination unreachable (code 4: fragmentation needed).
pub const V4_DEST_UNREACH: u8 = 3;
/// ICMP time exceeded.
pub const V4_TIME_EXCEEDED: u8 = 11;
/// ICMP parameter problem.
pub const V4_PARAM_PROBLEM: u8 = 12;
/// ICMPv6 destination unreachable.
pub const V6_DEST_UNREACH: u8 = 1;
/// ICMPv6 packet too big.
pub const V6_PACKET_TOO_BIG: u8 = 2;
/// ICMPv6 time exceeded.
pub const V6_TIME_EXCEEDED: u8 = 3;
/// ICMPv6 parameter problem.
pub const V6_PARAM_PROBLEM: u8 = 4;

/// Whether ICMP type `ty` (ICMPv6 when `v6`) is an error that quotes the
/// packet it is about. Echo, redirects, neighbour discovery and the rest
/// are the host's.
pub const fn is_error(v6: bool, ty: u8) -> bool {
    if v6 {
        matches!(ty, V6_DEST_UNREACH | V6_PACKET_TOO_BIG | V6_TIME_EXCEEDED | V6_PARAM_PROBLEM)
    } else {
        matches!(ty, V4_DEST_UNREACH | V4_TIME_EXCEEDED | V4_PARAM_PROBLEM)
    }
}

/// Kinds of error, as counted (both families: ICMPv6 packet too big is
/// IPv4's fragmentation needed). `Packet::icmp_kind` in the data plane.
pub const KIND_TOO_BIG: u8 = 0;
/// Destination unreachable, other than fragmentation needed (host, port,
/// network unreachable, administratively prohibited...).
pub const KIND_UNREACHABLE: u8 = 1;
pub const KIND_TIME_EXCEEDED: u8 = 2;
pub const KIND_PARAM_PROBLEM: u8 = 3;
/// `(kind, label)` of every kind, for status and metrics.
pub const KINDS: [(u8, &str); 4] =
    [(KIND_TOO_BIG, "too_big"), (KIND_UNREACHABLE, "unreachable"), (KIND_TIME_EXCEEDED, "time_exceeded"), (KIND_PARAM_PROBLEM, "parameter_problem")];

/// What became of an error about a flow xlb handles (or claims to be):
/// translated and forwarded to the flow's backend.
pub const OUTCOME_TO_BACKEND: u8 = 0;
/// Translated and forwarded to the flow's client.
pub const OUTCOME_TO_CLIENT: u8 = 1;
/// To a VIP, quoting no flow: passed to the kernel.
pub const OUTCOME_PASSED_NO_FLOW: u8 = 2;
/// Quoting a backend's packet of no flow: dropped.
pub const OUTCOME_DROPPED_NO_FLOW: u8 = 3;
/// To a VIP with a truncated or inconsistent quote: dropped.
pub const OUTCOME_DROPPED_BAD_QUOTE: u8 = 4;
/// `(outcome, label)` of every outcome, for status and metrics.
pub const OUTCOMES: [(u8, &str); 5] = [
    (OUTCOME_TO_BACKEND, "to_backend"),
    (OUTCOME_TO_CLIENT, "to_client"),
    (OUTCOME_PASSED_NO_FLOW, "passed_no_flow"),
    (OUTCOME_DROPPED_NO_FLOW, "dropped_no_flow"),
    (OUTCOME_DROPPED_BAD_QUOTE, "dropped_bad_quote"),
];

/// The counted kind of an error of ICMP type `ty` and code `code`
/// (ICMPv6 when `v6`), one that [`is_error`] accepts.
pub const fn kind(v6: bool, ty: u8, code: u8) -> u8 {
    match (v6, ty) {
        (false, V4_DEST_UNREACH) if code == V4_CODE_FRAG_NEEDED => KIND_TOO_BIG,
        (false, V4_DEST_UNREACH) | (true, V6_DEST_UNREACH) => KIND_UNREACHABLE,
        (true, V6_PACKET_TOO_BIG) => KIND_TOO_BIG,
        (false, V4_TIME_EXCEEDED) | (true, V6_TIME_EXCEEDED) => KIND_TIME_EXCEEDED,
        _ => KIND_PARAM_PROBLEM,
    }
}

/// ICMP destination unreachable code: fragmentation needed and DF set.
pub const V4_CODE_FRAG_NEEDED: u8 = 4;

/// `Packet::icmp` in the data plane: not an ICMP error.
pub const NOT_ERROR: u8 = 0;
/// An ICMP error addressed to a VIP: about a packet xlb sent to a client.
pub const ERROR_TO_VIP: u8 = 1;
/// An ICMP error addressed elsewhere: about a packet xlb sent to a backend,
/// if its quote names one.
pub const ERROR_OTHER: u8 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_the_kinds_that_quote_a_packet() {
        for ty in [3, 11, 12] {
            assert!(is_error(false, ty));
            assert!(!is_error(true, ty) || ty == 3, "ICMPv6 type {ty}");
        }
        for ty in [1, 2, 3, 4] {
            assert!(is_error(true, ty));
        }
        // Echo request/reply, redirect, router/neighbour discovery.
        for ty in [0, 5, 8] {
            assert!(!is_error(false, ty));
        }
        for ty in [128, 129, 133, 134, 135, 136, 137] {
            assert!(!is_error(true, ty));
        }
    }

    #[test]
    fn kinds_follow_type_and_code() {
        assert_eq!(kind(false, 3, 4), KIND_TOO_BIG);
        assert_eq!(kind(true, 2, 0), KIND_TOO_BIG);
        for code in [0, 1, 3, 13] {
            assert_eq!(kind(false, 3, code), KIND_UNREACHABLE, "code {code}");
            assert_eq!(kind(true, 1, code), KIND_UNREACHABLE, "code {code}");
        }
        // ICMPv6 code 4 of destination unreachable is "port unreachable".
        assert_eq!(kind(true, 1, 4), KIND_UNREACHABLE);
        assert_eq!(kind(false, 11, 0), KIND_TIME_EXCEEDED);
        assert_eq!(kind(true, 3, 1), KIND_TIME_EXCEEDED);
        assert_eq!(kind(false, 12, 0), KIND_PARAM_PROBLEM);
        assert_eq!(kind(true, 4, 2), KIND_PARAM_PROBLEM);
    }

    #[test]
    fn every_kind_and_outcome_has_its_own_counter() {
        use crate::stats;
        let mut seen = [false; (stats::COUNT - stats::NAMED) as usize];
        for (k, _) in KINDS {
            for (o, _) in OUTCOMES {
                let i = stats::icmp_error(k, o);
                assert!((stats::NAMED..stats::COUNT).contains(&i));
                let slot = &mut seen[(i - stats::NAMED) as usize];
                assert!(!*slot, "kind {k} outcome {o} shares counter {i}");
                *slot = true;
            }
        }
        assert!(seen.iter().all(|s| *s), "every counter read by one pair");
        assert!(stats::LABELS.iter().all(|(i, _)| *i < stats::NAMED), "named counters come first");
    }
}
