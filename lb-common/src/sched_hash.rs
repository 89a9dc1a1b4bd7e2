//! The flow hash used to schedule by 5-tuple. Seedless on purpose: every
//! balancer computes the same value for the same flow.

use crate::maps::Addr;

/// Mixes the 5-tuple (as stored in `FlowKey`) into 32 bits (a murmur3
/// finaliser over a simple combination; good avalanche, a few instructions).
/// IPv6 addresses are folded to one word first (for IPv4-mapped ones the
/// fold is a constant xor the IPv4 address).
#[inline(always)]
pub const fn flow_hash(src: &Addr, dst: &Addr, sport: u16, dport: u16, proto: u8) -> u32 {
    let src = src[0] ^ src[1].rotate_left(7) ^ src[2].rotate_left(14) ^ src[3];
    let dst = dst[0] ^ dst[1].rotate_left(7) ^ dst[2].rotate_left(14) ^ dst[3];
    let mut h = src ^ dst.rotate_left(13) ^ ((sport as u32) << 16 | dport as u32) ^ (proto as u32).wrapping_mul(0x9e37_79b9);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::addr_v4;

    #[test]
    fn spreads_neighbouring_ports_evenly() {
        let mut buckets = [0u32; 8];
        for port in 30000..38000u16 {
            buckets[(flow_hash(&addr_v4(0x0200000a), &addr_v4(0x0100630a), port.to_be(), 80u16.to_be(), 6) % 8) as usize] += 1;
        }
        for b in buckets {
            assert!((900..1100).contains(&b), "{buckets:?}");
        }
    }

    #[test]
    fn is_deterministic() {
        let (a, b) = (addr_v4(1), [0x20, 0, 0, 2]);
        assert_eq!(flow_hash(&a, &b, 3, 4, 6), flow_hash(&a, &b, 3, 4, 6));
        assert_ne!(flow_hash(&a, &b, 3, 4, 6), flow_hash(&a, &b, 4, 3, 6));
        assert_ne!(flow_hash(&a, &b, 3, 4, 6), flow_hash(&b, &a, 3, 4, 6));
    }
}
