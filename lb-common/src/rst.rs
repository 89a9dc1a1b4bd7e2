//! Building the IP + TCP headers of a reset, shared by the XDP program
//! (reactive resets, built in place) and the controller (proactive resets,
//! sent through a raw socket), so both emit byte-identical segments.

use crate::maps::{Addr, addr_bytes, is_v4};

/// What a reset carries. Addresses are in map form (IPv4-mapped for IPv4;
/// both ends are the same family); ports are as they go on the wire
/// (network byte order bytes); sequence numbers are host values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rst {
    pub src: Addr,
    pub dst: Addr,
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub seq: u32,
    /// `Some(ack)` sends RST|ACK with this acknowledgment number.
    pub ack: Option<u32>,
}

/// Length of the headers [`build_v4`] writes (no payload, no options).
pub const RST_LEN: usize = 40;
/// Length of the headers [`build_v6`] writes.
pub const RST_LEN_V6: usize = 60;

impl Rst {
    pub const fn is_v6(&self) -> bool {
        !is_v4(&self.dst)
    }
}

// Fixed-size arrays and constant offsets throughout: the XDP program
// cannot have a panic path (the verifier rejects it), so every index here
// must be provably in bounds at compile time.
#[inline(always)]
fn word<const N: usize>(b: &[u8; N], i: usize) -> u32 {
    u16::from_be_bytes([b[i], b[i + 1]]) as u32
}

/// The TCP header of a reset (20 bytes at `at`, checksum left zero).
#[inline(always)]
fn tcp_header<const N: usize>(r: &Rst, b: &mut [u8; N], at: usize) {
    b[at..at + 2].copy_from_slice(&r.sport);
    b[at + 2..at + 4].copy_from_slice(&r.dport);
    b[at + 4..at + 8].copy_from_slice(&r.seq.to_be_bytes());
    let (ack, flags) = match r.ack {
        Some(a) => (a, crate::tcp::FLAG_RST | crate::tcp::FLAG_ACK),
        None => (0, crate::tcp::FLAG_RST),
    };
    b[at + 8..at + 12].copy_from_slice(&ack.to_be_bytes());
    b[at + 12] = 5 << 4;
    b[at + 13] = flags;
}

/// IPv6 header (40 bytes, hop limit 64) followed by a TCP header (20
/// bytes), checksum filled.
#[inline(always)]
pub fn build_v6(r: &Rst) -> [u8; RST_LEN_V6] {
    let mut b = [0u8; RST_LEN_V6];
    write_v6(r, &mut b);
    b
}

/// IPv4 header (20 bytes, DF, TTL 64) followed by a TCP header (20 bytes),
/// both checksums filled.
#[inline(always)]
pub fn build_v4(r: &Rst) -> [u8; RST_LEN] {
    let mut b = [0u8; RST_LEN];
    write_v4(r, &mut b);
    b
}

/// [`build_v6`] written in place (the XDP program writes straight into the
/// packet: no copy on its small stack). Every byte of `b` is written.
#[inline(always)]
pub fn write_v6(r: &Rst, b: &mut [u8; RST_LEN_V6]) {
    b.fill(0);
    b[0] = 0x60;
    b[5] = 20; // payload length
    b[6] = crate::maps::PROTO_TCP;
    b[7] = 64;
    b[8..24].copy_from_slice(&addr_bytes(&r.src));
    b[24..40].copy_from_slice(&addr_bytes(&r.dst));
    tcp_header(r, b, 40);
    // Pseudo-header: addresses, upper-layer length (20), next header.
    let mut sum = crate::maps::PROTO_TCP as u32 + 20;
    let mut i = 8;
    while i < RST_LEN_V6 {
        sum += word(b, i);
        i += 2;
    }
    let check = !crate::csum::fold(sum);
    b[56..58].copy_from_slice(&check.to_be_bytes());
}

/// [`build_v4`] written in place. Every byte of `b` is written.
#[inline(always)]
pub fn write_v4(r: &Rst, b: &mut [u8; RST_LEN]) {
    b.fill(0);
    b[0] = 0x45;
    b[2] = 0;
    b[3] = RST_LEN as u8;
    b[6] = 0x40; // DF
    b[8] = 64;
    b[9] = crate::maps::PROTO_TCP;
    b[12..16].copy_from_slice(&r.src[3].to_ne_bytes());
    b[16..20].copy_from_slice(&r.dst[3].to_ne_bytes());
    tcp_header(r, b, 20);

    let mut ip_sum = 0u32;
    let mut i = 0;
    while i < 20 {
        ip_sum += word(b, i);
        i += 2;
    }
    let ip_check = !crate::csum::fold(ip_sum);
    b[10..12].copy_from_slice(&ip_check.to_be_bytes());

    // Pseudo-header: addresses, protocol, TCP length (20).
    let mut tcp_sum = word(b, 12) + word(b, 14) + word(b, 16) + word(b, 18) + crate::maps::PROTO_TCP as u32 + 20;
    let mut i = 20;
    while i < RST_LEN {
        tcp_sum += word(b, i);
        i += 2;
    }
    let tcp_check = !crate::csum::fold(tcp_sum);
    b[36..38].copy_from_slice(&tcp_check.to_be_bytes());
}

/// The reset a receiver of `seg` would send, per RFC 793 "Reset
/// Generation": if `seg` carries an ACK the reset takes its sequence number
/// from it (exactly what the peer expects next, so RFC 5961 accepts it);
/// otherwise sequence 0 with RST|ACK acknowledging the whole segment.
/// `seg_end` is the segment's sequence number plus its length (SYN and FIN
/// count one). Addresses and ports are swapped.
#[inline(always)]
pub fn answering(src: Addr, dst: Addr, sport: [u8; 2], dport: [u8; 2], seg_ack: Option<u32>, seg_end: u32) -> Rst {
    match seg_ack {
        Some(ack) => Rst { src: dst, dst: src, sport: dport, dport: sport, seq: ack, ack: None },
        None => Rst { src: dst, dst: src, sport: dport, dport: sport, seq: 0, ack: Some(seg_end) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        csum,
        maps::{addr_from_bytes, addr_v4},
    };

    fn v4(a: [u8; 4]) -> Addr {
        addr_v4(u32::from_ne_bytes(a))
    }

    #[test]
    fn checksums_verify_against_full_recomputation() {
        let r = Rst { src: v4([10, 99, 0, 1]), dst: v4([10, 0, 0, 2]), sport: 80u16.to_be_bytes(), dport: 40000u16.to_be_bytes(), seq: 0xdead_beef, ack: None };
        assert!(!r.is_v6());
        let b = build_v4(&r);
        assert_eq!(csum::fold(csum::sum_bytes(&b[..20], 0)), 0xffff, "IPv4 header checksum");
        let mut seg = b[20..].to_vec();
        let carried = [seg[16], seg[17]];
        seg[16] = 0;
        seg[17] = 0;
        assert_eq!(csum::l4_checksum_v4([10, 99, 0, 1], [10, 0, 0, 2], 6, &seg).to_ne_bytes(), carried, "TCP checksum");
        assert_eq!(b[33], crate::tcp::FLAG_RST);
        assert_eq!(u32::from_be_bytes([b[24], b[25], b[26], b[27]]), 0xdead_beef);
    }

    #[test]
    fn ipv6_reset_checksum_verifies_against_full_recomputation() {
        let src = [0xfd, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let dst = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xab, 2];
        let r = Rst { src: addr_from_bytes(src), dst: addr_from_bytes(dst), sport: 80u16.to_be_bytes(), dport: 40000u16.to_be_bytes(), seq: 7, ack: Some(99) };
        assert!(r.is_v6());
        let b = build_v6(&r);
        assert_eq!(b[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([b[4], b[5]]), 20);
        assert_eq!((&b[8..24], &b[24..40]), (&src[..], &dst[..]));
        let mut seg = b[40..].to_vec();
        let carried = [seg[16], seg[17]];
        seg[16] = 0;
        seg[17] = 0;
        assert_eq!(csum::l4_checksum_v6(src, dst, 6, &seg).to_ne_bytes(), carried, "TCP checksum");
        assert_eq!(b[53], crate::tcp::FLAG_RST | crate::tcp::FLAG_ACK);
        assert_eq!(u32::from_be_bytes([b[48], b[49], b[50], b[51]]), 99);
    }

    #[test]
    fn answering_a_segment_with_ack_uses_its_ack_as_sequence() {
        let (one, two) = (v4([1, 1, 1, 1]), v4([2, 2, 2, 2]));
        let r = answering(one, two, [0, 1], [0, 2], Some(777), 1234);
        assert_eq!(r, Rst { src: two, dst: one, sport: [0, 2], dport: [0, 1], seq: 777, ack: None });
        let r = answering(one, two, [0, 1], [0, 2], None, 1234);
        assert_eq!((r.seq, r.ack), (0, Some(1234)));
        let b = build_v4(&r);
        assert_eq!(b[33], crate::tcp::FLAG_RST | crate::tcp::FLAG_ACK);
        assert_eq!(csum::fold(csum::sum_bytes(&b[..20], 0)), 0xffff);
    }
}
