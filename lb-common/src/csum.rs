//! Internet checksum arithmetic (RFC 1071) and incremental update (RFC 1624).
//!
//! Byte-order note: the one's complement sum is byte-order independent as long
//! as every 16-bit word is read and written the same way. The functions here
//! take words exactly as they sit in the packet (`u16::from_ne_bytes` of the
//! two bytes) and return the checksum the same way, so callers never swap.

/// Folds a 32-bit partial sum into 16 bits (end-around carry).
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    // Two rounds are enough: after the first the value is at most 0x1FFFE.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')` for one 16-bit word.
#[inline(always)]
pub const fn update_u16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check as u32) + (!old as u32 & 0xffff) + new as u32;
    !fold(sum)
}

/// Incremental update for a 4-byte field (an IPv4 address) given as the
/// packet's bytes.
#[inline(always)]
pub const fn update_addr(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let sum = (!check as u32)
        + (!u16::from_ne_bytes([old[0], old[1]]) as u32 & 0xffff)
        + (!u16::from_ne_bytes([old[2], old[3]]) as u32 & 0xffff)
        + u16::from_ne_bytes([new[0], new[1]]) as u32
        + u16::from_ne_bytes([new[2], new[3]]) as u32;
    !fold(sum)
}

/// Incremental update for a 16-byte field (an IPv6 address) given as four
/// words of packet bytes (`u32::from_ne_bytes`). Each word's two halves are
/// the packet's 16-bit words in memory order whatever the host's byte
/// order, so the sum is the same.
#[inline(always)]
pub const fn update_addr16(check: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    let mut sum = (!check) as u64;
    let mut i = 0;
    while i < 4 {
        let (o, n) = (!old[i], new[i]);
        sum += (o >> 16) as u64 + (o & 0xffff) as u64 + (n >> 16) as u64 + (n & 0xffff) as u64;
        i += 1;
    }
    // At most 33 words of 16 bits: fits in 22 bits, two folds are enough.
    sum = (sum & 0xffff) + (sum >> 16);
    !fold(sum as u32)
}

/// Incremental update for a 2-byte field (a port) given as the packet's bytes.
#[inline(always)]
pub const fn update_port(check: u16, old: [u8; 2], new: [u8; 2]) -> u16 {
    update_u16(check, u16::from_ne_bytes(old), u16::from_ne_bytes(new))
}

/// UDP over IPv4: a transmitted checksum of zero means "no checksum" and must
/// stay zero (RFC 768); a computed zero is sent as all ones.
#[inline(always)]
pub const fn udp_fixup(old_check: u16, new_check: u16) -> u16 {
    if old_check == 0 {
        0
    } else if new_check == 0 {
        0xffff
    } else {
        new_check
    }
}

/// The folded pseudo-header sum of a TCP/UDP segment over IPv4 (addresses
/// as packet words, `l4_len` in bytes). A sender that leaves the checksum
/// to the NIC (CHECKSUM_PARTIAL: TX offload, the default on veth, tap and
/// every virtual NIC) stores exactly this value, uncomplemented, in the
/// checksum field; the NIC (or the kernel) adds the segment's sum later.
#[inline(always)]
pub const fn pseudo_fold_v4(src: u32, dst: u32, proto: u8, l4_len: u32) -> u16 {
    let sum = (src & 0xffff)
        + (src >> 16)
        + (dst & 0xffff)
        + (dst >> 16)
        + u16::from_ne_bytes([0, proto]) as u32
        + u16::from_ne_bytes((l4_len as u16).to_be_bytes()) as u32;
    fold(sum)
}

/// As [`pseudo_fold_v4`] for IPv6 (RFC 8200 §8.1: 32-bit length, next
/// header in the last byte); addresses as four packet words each.
#[inline(always)]
pub const fn pseudo_fold_v6(src: &[u32; 4], dst: &[u32; 4], proto: u8, l4_len: u32) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 4 {
        sum += (src[i] & 0xffff) + (src[i] >> 16) + (dst[i] & 0xffff) + (dst[i] >> 16);
        i += 1;
    }
    let len = l4_len.to_be_bytes();
    sum += u16::from_ne_bytes([len[0], len[1]]) as u32 + u16::from_ne_bytes([len[2], len[3]]) as u32;
    sum += u16::from_ne_bytes([0, proto]) as u32;
    fold(sum)
}

/// A partial checksum (the pseudo-header seed, uncomplemented) after one
/// 16-bit word of the pseudo-header changed: `seed - old + new`. The RFC
/// 1624 update of a full checksum applied to a seed moves it the wrong
/// way (it subtracts what it should add).
#[inline(always)]
pub const fn seed_update_u16(seed: u16, old: u16, new: u16) -> u16 {
    !update_u16(!seed, old, new)
}

/// As [`seed_update_u16`] for an IPv4 address (packet bytes).
#[inline(always)]
pub const fn seed_update_addr(seed: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    !update_addr(!seed, old, new)
}

/// As [`seed_update_u16`] for an IPv6 address (four packet words).
#[inline(always)]
pub const fn seed_update_addr16(seed: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    !update_addr16(!seed, old, new)
}

/// The full checksum of a segment whose checksum field holds a partial
/// seed, from the one's complement sum of the whole segment as it is
/// (seed included): what the NIC or `skb_checksum_help` would have written.
/// UDP: a zero result is sent as all ones (RFC 768).
#[inline(always)]
pub const fn complete(segment_sum: u32, udp: bool) -> u16 {
    let c = !fold(segment_sum);
    if udp && c == 0 { 0xffff } else { c }
}

/// One's complement sum of `data` (odd length padded with a zero byte), added
/// to `initial`. Not used on the XDP hot path (unbounded loop); used by the
/// controller to build packets and by tests to verify rewritten ones.
pub fn sum_bytes(data: &[u8], initial: u32) -> u32 {
    let mut sum = initial as u64;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_ne_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += u16::from_ne_bytes([*last, 0]) as u64;
    }
    while sum >> 32 != 0 {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
    }
    sum as u32
}

/// Full checksum of `data` (e.g. an IPv4 header with its checksum zeroed).
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum_bytes(data, 0))
}

/// Full TCP/UDP checksum over an IPv4 pseudo-header and `segment` (the L4
/// header with its checksum field zeroed, plus payload).
pub fn l4_checksum_v4(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> u16 {
    let len = segment.len() as u16;
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src);
    pseudo[4..8].copy_from_slice(&dst);
    pseudo[9] = proto;
    pseudo[10..12].copy_from_slice(&len.to_be_bytes());
    !fold(sum_bytes(segment, sum_bytes(&pseudo, 0)))
}

/// Full TCP/UDP checksum over an IPv6 pseudo-header (RFC 8200 §8.1) and
/// `segment` (the L4 header with its checksum field zeroed, plus payload).
pub fn l4_checksum_v6(src: [u8; 16], dst: [u8; 16], proto: u8, segment: &[u8]) -> u16 {
    let mut pseudo = [0u8; 40];
    pseudo[0..16].copy_from_slice(&src);
    pseudo[16..32].copy_from_slice(&dst);
    pseudo[32..36].copy_from_slice(&(segment.len() as u32).to_be_bytes());
    pseudo[39] = proto;
    !fold(sum_bytes(segment, sum_bytes(&pseudo, 0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real IPv4 header (from RFC 1071 examples / Wikipedia) with a known checksum.
    const HDR: [u8; 20] = [0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7];

    fn with_check_zeroed(h: &[u8; 20]) -> [u8; 20] {
        let mut z = *h;
        z[10] = 0;
        z[11] = 0;
        z
    }

    #[test]
    fn full_checksum_matches_known_header() {
        let c = checksum(&with_check_zeroed(&HDR));
        assert_eq!(c.to_ne_bytes(), [0xb8, 0x61]);
    }

    #[test]
    fn incremental_address_update_equals_recompute() {
        // Walk many address pairs, including ones that stress carries.
        let addrs: [[u8; 4]; 6] = [[10, 0, 0, 1], [255, 255, 255, 255], [0, 0, 0, 0], [192, 168, 0, 199], [172, 16, 254, 1], [1, 2, 3, 4]];
        for old in addrs {
            for new in addrs {
                let mut h = HDR;
                h[16..20].copy_from_slice(&old);
                let c0 = checksum(&with_check_zeroed(&h));
                let inc = update_addr(c0, old, new);
                h[16..20].copy_from_slice(&new);
                let full = checksum(&with_check_zeroed(&h));
                // 0x0000 and 0xffff are the same value in one's complement;
                // RFC 1624 guarantees the incremental result never yields -0
                // from a nonzero header, so compare exactly.
                assert_eq!(inc, full, "old {old:?} new {new:?}");
            }
        }
    }

    #[test]
    fn incremental_port_update_equals_recompute_for_tcp() {
        let src = [10, 0, 0, 2];
        let dst = [10, 99, 0, 1];
        let mut seg = [0u8; 24];
        seg[0..2].copy_from_slice(&40000u16.to_be_bytes());
        seg[2..4].copy_from_slice(&80u16.to_be_bytes());
        seg[12] = 0x50;
        seg[20..24].copy_from_slice(b"ping");
        let c0 = l4_checksum_v4(src, dst, 6, &seg);
        // DNAT: dst address and port change.
        let new_dst = [10, 1, 3, 2];
        let c1 = update_addr(c0, dst, new_dst);
        let c1 = update_port(c1, 80u16.to_be_bytes(), 8080u16.to_be_bytes());
        seg[2..4].copy_from_slice(&8080u16.to_be_bytes());
        assert_eq!(c1, l4_checksum_v4(src, new_dst, 6, &seg));
    }

    #[test]
    fn incremental_ipv6_address_update_equals_recompute() {
        let addrs: [[u8; 16]; 4] = [
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            [0xff; 16],
            [0; 16],
            [0x20, 0x01, 0x0d, 0xb8, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10, 0x01, 0x23, 0x45, 0x67],
        ];
        let dst = [0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let mut seg = [0u8; 28];
        seg[0..2].copy_from_slice(&40000u16.to_be_bytes());
        seg[2..4].copy_from_slice(&80u16.to_be_bytes());
        seg[12] = 0x50;
        seg[20..28].copy_from_slice(b"pingpong");
        for old in addrs {
            for new in addrs {
                let c0 = l4_checksum_v6(old, dst, 6, &seg);
                let inc = update_addr16(c0, &crate::maps::addr_from_bytes(old), &crate::maps::addr_from_bytes(new));
                let full = l4_checksum_v6(new, dst, 6, &seg);
                // One's complement: 0 and 0xffff are the same sum.
                assert!(inc == full || (inc == 0 && full == 0xffff) || (inc == 0xffff && full == 0), "old {old:?} new {new:?}: {inc:#x} vs {full:#x}");
            }
        }
    }

    #[test]
    fn udp_zero_checksum_stays_zero_and_computed_zero_becomes_ffff() {
        assert_eq!(udp_fixup(0, 0x1234), 0);
        assert_eq!(udp_fixup(0x1111, 0), 0xffff);
        assert_eq!(udp_fixup(0x1111, 0x2222), 0x2222);
    }

    /// A segment as a CHECKSUM_PARTIAL sender leaves it: the field holds
    /// the pseudo-header seed.
    fn partial_segment_v4(src: [u8; 4], dst: [u8; 4], seg: &mut [u8], field: usize) {
        seg[field..field + 2].fill(0);
        let s = pseudo_fold_v4(u32::from_ne_bytes(src), u32::from_ne_bytes(dst), 6, seg.len() as u32);
        seg[field..field + 2].copy_from_slice(&s.to_ne_bytes());
    }

    #[test]
    fn pseudo_fold_is_what_a_partial_sender_stores_and_completing_gives_the_full_checksum() {
        let (src, dst) = ([10, 0, 0, 2], [10, 99, 0, 1]);
        let mut seg = [0u8; 31];
        seg[0..2].copy_from_slice(&40000u16.to_be_bytes());
        seg[2..4].copy_from_slice(&80u16.to_be_bytes());
        seg[12] = 0x50;
        seg[20..31].copy_from_slice(b"hello world");
        let full = l4_checksum_v4(src, dst, 6, &{
            let mut z = seg;
            z[16..18].fill(0);
            z
        });
        partial_segment_v4(src, dst, &mut seg, 16);
        assert_eq!(complete(sum_bytes(&seg, 0), false), full);
    }

    #[test]
    fn seed_updates_follow_address_changes_so_completion_matches_a_recompute() {
        let addrs: [[u8; 4]; 5] = [[10, 0, 0, 1], [255, 255, 255, 255], [0, 0, 0, 1], [192, 168, 0, 199], [172, 16, 254, 1]];
        for old in addrs {
            for new in addrs {
                let dst = [10, 1, 1, 2];
                let mut seg = [0u8; 24];
                seg[12] = 0x50;
                seg[20..24].copy_from_slice(b"ping");
                partial_segment_v4(old, dst, &mut seg, 16);
                let seed = u16::from_ne_bytes([seg[16], seg[17]]);
                let moved = seed_update_addr(seed, old, new);
                let mut want = seg;
                partial_segment_v4(new, dst, &mut want, 16);
                assert_eq!(moved.to_ne_bytes(), [want[16], want[17]], "{old:?} -> {new:?}");
                // A port is not in the pseudo-header: the seed stays.
                seg[16..18].copy_from_slice(&moved.to_ne_bytes());
                seg[0..2].copy_from_slice(&1234u16.to_be_bytes());
                let mut z = seg;
                z[16..18].fill(0);
                assert_eq!(complete(sum_bytes(&seg, 0), false), l4_checksum_v4(new, dst, 6, &z));
            }
        }
    }

    #[test]
    fn ipv6_pseudo_fold_matches_the_pseudo_header_sum() {
        let src = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let dst = [0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0xab, 0xcd, 0, 0, 0, 1];
        let mut pseudo = [0u8; 40];
        pseudo[0..16].copy_from_slice(&src);
        pseudo[16..32].copy_from_slice(&dst);
        pseudo[32..36].copy_from_slice(&1234u32.to_be_bytes());
        pseudo[39] = 17;
        let a = crate::maps::addr_from_bytes(src);
        let b = crate::maps::addr_from_bytes(dst);
        assert_eq!(pseudo_fold_v6(&a, &b, 17, 1234), fold(sum_bytes(&pseudo, 0)));
        let moved = seed_update_addr16(pseudo_fold_v6(&a, &b, 17, 1234), &b, &a);
        assert_eq!(moved, pseudo_fold_v6(&a, &a, 17, 1234));
    }

    #[test]
    fn completed_udp_zero_is_sent_as_all_ones() {
        assert_eq!(complete(0xffff, true), 0xffff);
        assert_eq!(complete(0xffff, false), 0);
    }

    #[test]
    fn odd_length_is_padded() {
        assert_eq!(sum_bytes(&[0x01], 0), u16::from_ne_bytes([0x01, 0]) as u32);
    }
}
