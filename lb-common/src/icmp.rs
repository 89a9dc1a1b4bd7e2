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
}
