//! The flow hash used to schedule by 5-tuple: SipHash-1-3 under a secret
//! 128-bit key (`Globals::hash_key`). Without the key nobody can compute
//! which backend a 5-tuple lands on (and aim a flood at one backend); with
//! the same key every node of a cluster schedules a flow alike.

use crate::maps::Addr;

#[inline(always)]
const fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

#[inline(always)]
const fn sip_init(key: &[u64; 2]) -> [u64; 4] {
    [key[0] ^ 0x736f_6d65_7073_6575, key[1] ^ 0x646f_7261_6e64_6f6d, key[0] ^ 0x6c79_6765_6e65_7261, key[1] ^ 0x7465_6462_7974_6573]
}

#[inline(always)]
const fn sip_word(v: &mut [u64; 4], m: u64) {
    v[3] ^= m;
    sip_round(v);
    v[0] ^= m;
}

/// Hashes the 5-tuple (as stored in `FlowKey`) under `key`: SipHash-1-3 of
/// the 40-byte little-endian message `src ‖ dst ‖ sport ‖ dport ‖ proto ‖
/// 0-padding`, folded to 32 bits.
#[inline(always)]
pub const fn flow_hash(key: &[u64; 2], src: &Addr, dst: &Addr, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut v = sip_init(key);
    sip_word(&mut v, src[0] as u64 | (src[1] as u64) << 32);
    sip_word(&mut v, src[2] as u64 | (src[3] as u64) << 32);
    sip_word(&mut v, dst[0] as u64 | (dst[1] as u64) << 32);
    sip_word(&mut v, dst[2] as u64 | (dst[3] as u64) << 32);
    sip_word(&mut v, sport as u64 | (dport as u64) << 16 | (proto as u64) << 32);
    // The final block: the message length (40) in its top byte.
    sip_word(&mut v, 40 << 56);
    v[2] ^= 0xff;
    sip_round(&mut v);
    sip_round(&mut v);
    sip_round(&mut v);
    let h = v[0] ^ v[1] ^ v[2] ^ v[3];
    (h ^ h >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::addr_v4;
    use alloc::vec::Vec;

    /// SipHash-c-d of any message (the reference algorithm, for the tests).
    fn siphash(c: usize, d: usize, key: &[u64; 2], msg: &[u8]) -> u64 {
        let mut v = sip_init(key);
        let mut chunks = msg.chunks_exact(8);
        for ch in &mut chunks {
            let m = u64::from_le_bytes(ch.try_into().expect("8 bytes"));
            v[3] ^= m;
            for _ in 0..c {
                sip_round(&mut v);
            }
            v[0] ^= m;
        }
        let mut last = [0u8; 8];
        last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        last[7] = msg.len() as u8;
        let m = u64::from_le_bytes(last);
        v[3] ^= m;
        for _ in 0..c {
            sip_round(&mut v);
        }
        v[0] ^= m;
        v[2] ^= 0xff;
        for _ in 0..d {
            sip_round(&mut v);
        }
        v[0] ^ v[1] ^ v[2] ^ v[3]
    }

    fn key() -> [u64; 2] {
        let k: Vec<u8> = (0u8..16).collect();
        [u64::from_le_bytes(k[..8].try_into().expect("8")), u64::from_le_bytes(k[8..].try_into().expect("8"))]
    }

    #[test]
    fn the_reference_algorithm_matches_the_published_vector() {
        // SipHash-2-4, key 00..0f, message 00..0e (the paper's appendix).
        let msg: Vec<u8> = (0u8..15).collect();
        assert_eq!(siphash(2, 4, &key(), &msg), 0xa129_ca61_49be_45e5);
    }

    #[test]
    fn the_flow_hash_is_siphash_1_3_of_the_tuple() {
        let (src, dst) = (addr_v4(0x0200000a), [0x20010db8u32.to_be(), 0, 0, 7u32.to_be()]);
        let mut msg = Vec::new();
        for w in src.iter().chain(dst.iter()) {
            msg.extend_from_slice(&w.to_le_bytes());
        }
        msg.extend_from_slice(&4000u16.to_le_bytes());
        msg.extend_from_slice(&80u16.to_le_bytes());
        msg.extend_from_slice(&[6, 0, 0, 0]);
        assert_eq!(msg.len(), 40);
        let h = siphash(1, 3, &key(), &msg);
        assert_eq!(flow_hash(&key(), &src, &dst, 4000, 80, 6), (h ^ h >> 32) as u32);
    }

    #[test]
    fn spreads_neighbouring_ports_evenly_and_depends_on_the_key() {
        let mut buckets = [0u32; 8];
        let (src, dst) = (addr_v4(0x0200000a), addr_v4(0x0100630a));
        for port in 30000..38000u16 {
            buckets[(flow_hash(&key(), &src, &dst, port.to_be(), 80u16.to_be(), 6) % 8) as usize] += 1;
        }
        for b in buckets {
            assert!((900..1100).contains(&b), "{buckets:?}");
        }
        let other = [1, 2];
        let same = (30000..30100u16).filter(|p| flow_hash(&key(), &src, &dst, *p, 80, 6) == flow_hash(&other, &src, &dst, *p, 80, 6)).count();
        assert_eq!(same, 0, "another key gives other hashes");
        assert_ne!(flow_hash(&key(), &src, &dst, 3, 4, 6), flow_hash(&key(), &src, &dst, 4, 3, 6));
    }
}
