//! Building the IPv4 + TCP headers of a reset, shared by the XDP program
//! (reactive resets, built in place) and the controller (proactive resets,
//! sent through a raw socket), so both emit byte-identical segments.

/// What a reset carries. Addresses and ports are as they go on the wire
/// (network byte order bytes); sequence numbers are host values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rst {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub seq: u32,
    /// `Some(ack)` sends RST|ACK with this acknowledgment number.
    pub ack: Option<u32>,
}

/// Length of the headers [`build`] writes (no payload, no options).
pub const RST_LEN: usize = 40;

#[inline(always)]
fn word(b: &[u8; RST_LEN], i: usize) -> u32 {
    u16::from_be_bytes([b[i], b[i + 1]]) as u32
}

/// IPv4 header (20 bytes, DF, TTL 64) followed by a TCP header (20 bytes),
/// both checksums filled.
#[inline(always)]
pub fn build(r: &Rst) -> [u8; RST_LEN] {
    let mut b = [0u8; RST_LEN];
    b[0] = 0x45;
    b[2] = 0;
    b[3] = RST_LEN as u8;
    b[6] = 0x40; // DF
    b[8] = 64;
    b[9] = crate::maps::PROTO_TCP;
    b[12..16].copy_from_slice(&r.src);
    b[16..20].copy_from_slice(&r.dst);
    b[20..22].copy_from_slice(&r.sport);
    b[22..24].copy_from_slice(&r.dport);
    b[24..28].copy_from_slice(&r.seq.to_be_bytes());
    let (ack, flags) = match r.ack {
        Some(a) => (a, crate::tcp::FLAG_RST | crate::tcp::FLAG_ACK),
        None => (0, crate::tcp::FLAG_RST),
    };
    b[28..32].copy_from_slice(&ack.to_be_bytes());
    b[32] = 5 << 4;
    b[33] = flags;

    let mut ip_sum = 0u32;
    let mut i = 0;
    while i < 20 {
        ip_sum += word(&b, i);
        i += 2;
    }
    let ip_check = !crate::csum::fold(ip_sum);
    b[10..12].copy_from_slice(&ip_check.to_be_bytes());

    // Pseudo-header: addresses, protocol, TCP length (20).
    let mut tcp_sum = word(&b, 12) + word(&b, 14) + word(&b, 16) + word(&b, 18) + crate::maps::PROTO_TCP as u32 + 20;
    let mut i = 20;
    while i < RST_LEN {
        tcp_sum += word(&b, i);
        i += 2;
    }
    let tcp_check = !crate::csum::fold(tcp_sum);
    b[36..38].copy_from_slice(&tcp_check.to_be_bytes());
    b
}

/// The reset a receiver of `seg` would send, per RFC 793 "Reset
/// Generation": if `seg` carries an ACK the reset takes its sequence number
/// from it (exactly what the peer expects next, so RFC 5961 accepts it);
/// otherwise sequence 0 with RST|ACK acknowledging the whole segment.
/// `seg_end` is the segment's sequence number plus its length (SYN and FIN
/// count one). Addresses and ports are swapped.
#[inline(always)]
pub fn answering(
    src: [u8; 4],
    dst: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
    seg_ack: Option<u32>,
    seg_end: u32,
) -> Rst {
    match seg_ack {
        Some(ack) => Rst { src: dst, dst: src, sport: dport, dport: sport, seq: ack, ack: None },
        None => Rst { src: dst, dst: src, sport: dport, dport: sport, seq: 0, ack: Some(seg_end) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csum;

    #[test]
    fn checksums_verify_against_full_recomputation() {
        let r = Rst { src: [10, 99, 0, 1], dst: [10, 0, 0, 2], sport: 80u16.to_be_bytes(), dport: 40000u16.to_be_bytes(), seq: 0xdead_beef, ack: None };
        let b = build(&r);
        assert_eq!(csum::fold(csum::sum_bytes(&b[..20], 0)), 0xffff, "IPv4 header checksum");
        let mut seg = b[20..].to_vec();
        let carried = [seg[16], seg[17]];
        seg[16] = 0;
        seg[17] = 0;
        assert_eq!(csum::l4_checksum_v4(r.src, r.dst, 6, &seg).to_ne_bytes(), carried, "TCP checksum");
        assert_eq!(b[33], crate::tcp::FLAG_RST);
        assert_eq!(u32::from_be_bytes([b[24], b[25], b[26], b[27]]), 0xdead_beef);
    }

    #[test]
    fn answering_a_segment_with_ack_uses_its_ack_as_sequence() {
        let r = answering([1, 1, 1, 1], [2, 2, 2, 2], [0, 1], [0, 2], Some(777), 1234);
        assert_eq!(r, Rst { src: [2, 2, 2, 2], dst: [1, 1, 1, 1], sport: [0, 2], dport: [0, 1], seq: 777, ack: None });
        let r = answering([1, 1, 1, 1], [2, 2, 2, 2], [0, 1], [0, 2], None, 1234);
        assert_eq!((r.seq, r.ack), (0, Some(1234)));
        let b = build(&r);
        assert_eq!(b[33], crate::tcp::FLAG_RST | crate::tcp::FLAG_ACK);
        assert_eq!(csum::fold(csum::sum_bytes(&b[..20], 0)), 0xffff);
    }
}
