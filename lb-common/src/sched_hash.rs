//! The flow hash used to schedule by 5-tuple. Seedless on purpose: every
//! balancer computes the same value for the same flow.

/// Mixes the 5-tuple (as stored in `FlowKey`) into 32 bits (a murmur3
/// finaliser over a simple combination; good avalanche, a few instructions).
#[inline(always)]
pub const fn flow_hash(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> u32 {
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

    #[test]
    fn spreads_neighbouring_ports_evenly() {
        let mut buckets = [0u32; 8];
        for port in 30000..38000u16 {
            buckets[(flow_hash(0x0200000a, 0x0100630a, port.to_be(), 80u16.to_be(), 6) % 8) as usize] += 1;
        }
        for b in buckets {
            assert!((900..1100).contains(&b), "{buckets:?}");
        }
    }

    #[test]
    fn is_deterministic() {
        assert_eq!(flow_hash(1, 2, 3, 4, 6), flow_hash(1, 2, 3, 4, 6));
        assert_ne!(flow_hash(1, 2, 3, 4, 6), flow_hash(1, 2, 4, 3, 6));
    }
}
