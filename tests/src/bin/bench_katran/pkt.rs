//! Test frames (Ethernet / IPv4 / TCP, 54 bytes, valid checksums) written
//! into a caller's buffer without allocating, and one BPF_PROG_TEST_RUN
//! call. Both programs get frames from here; only the destination differs.

use std::net::Ipv4Addr;

use anyhow::Context as _;
use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use lb_common::csum;

pub const FRAME_LEN: usize = 54;
/// What a program may make of a frame: Katran adds a 20-byte IPIP header.
pub const OUT_LEN: usize = 256;

pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

pub type Buf = [u8; FRAME_LEN];

/// One TCP segment's headers.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
}

impl Seg {
    /// Writes the frame as `testbed::packet::Frame::tcp(..).build()` does
    /// (TTL 64, DF, IP id 0x1234, window 64240; checked by a unit test),
    /// without allocating: it runs once per timed call.
    pub fn write(&self, b: &mut Buf) {
        b[0..6].copy_from_slice(&self.dst_mac);
        b[6..12].copy_from_slice(&self.src_mac);
        b[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut b[14..34];
        ip.copy_from_slice(&[0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        ip[12..16].copy_from_slice(&self.src.0.octets());
        ip[16..20].copy_from_slice(&self.dst.0.octets());
        let c = csum::checksum(ip);
        ip[10..12].copy_from_slice(&c.to_ne_bytes());
        let t = &mut b[34..54];
        t[0..2].copy_from_slice(&self.src.1.to_be_bytes());
        t[2..4].copy_from_slice(&self.dst.1.to_be_bytes());
        t[4..8].copy_from_slice(&self.seq.to_be_bytes());
        t[8..12].copy_from_slice(&self.ack.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = self.flags;
        t[14..16].copy_from_slice(&64240u16.to_be_bytes());
        t[16..20].fill(0);
        let c = csum::l4_checksum_v4(self.src.0.octets(), self.dst.0.octets(), 6, t);
        t[16..18].copy_from_slice(&c.to_ne_bytes());
    }

    pub fn frame(&self) -> Buf {
        let mut b = [0u8; FRAME_LEN];
        self.write(&mut b);
        b
    }
}

/// `frame` as a local stack with TX checksum offload sends it through a
/// veth: the TCP checksum field holds only the pseudo-header seed (as
/// `testbed::packet::Frame::partial` builds it).
pub fn partial(mut frame: Buf) -> Buf {
    let word = |o: usize| u32::from_ne_bytes([frame[o], frame[o + 1], frame[o + 2], frame[o + 3]]);
    let seed = csum::pseudo_fold_v4(word(26), word(30), 6, (FRAME_LEN - 34) as u32);
    frame[50..52].copy_from_slice(&seed.to_ne_bytes());
    frame
}

/// The result of one call.
#[derive(Clone, Copy, Debug)]
pub struct Ran {
    pub verdict: u32,
    pub len: usize,
    /// Kernel-reported duration, ns.
    pub ns: u32,
}

/// One BPF_PROG_TEST_RUN call, repeat=1 (both programs rewrite the buffer,
/// so a repeat would time the rewritten packet), the frame arriving on
/// `ifindex`. The calling thread must be in the namespace of `ifindex`.
pub fn run(prog: &Xdp, ifindex: u32, frame: &[u8], out: &mut [u8; OUT_LEN]) -> anyhow::Result<Ran> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
    let mut ctx = [0u8; 24];
    for (c, v) in ctx.chunks_exact_mut(4).zip(md) {
        c.copy_from_slice(&v.to_ne_bytes());
    }
    let r = prog
        .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out[..]), ctx_in: Some(&ctx), ..TestRunOptions::default() })
        .context("BPF_PROG_TEST_RUN")?;
    Ok(Ran { verdict: r.return_value, len: r.data_size_out as usize, ns: u32::try_from(r.duration.as_nanos()).unwrap_or(u32::MAX) })
}

pub fn rd32(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

pub fn rd16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub fn verdict_name(v: u32) -> &'static str {
    match v {
        0 => "XDP_ABORTED",
        1 => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "XDP_?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_match_the_test_beds_builder() {
        let s = Seg {
            dst_mac: [2, 0, 0, 0, 0x10, 0],
            src_mac: [2, 0, 0, 0, 0, 2],
            src: (Ipv4Addr::new(10, 100, 0, 7), 12345),
            dst: (Ipv4Addr::new(10, 99, 0, 1), 80),
            flags: TCP_SYN | TCP_ACK,
            seq: 0xdead_beef,
            ack: 77,
        };
        let mut want = testbed::packet::Frame::tcp(s.src, s.dst, s.flags, s.seq, s.ack);
        want.dst_mac = s.dst_mac;
        want.src_mac = s.src_mac;
        assert_eq!(s.frame().to_vec(), want.build());
        assert!(testbed::packet::checksums_valid(&s.frame(), 14));
        assert_eq!(partial(s.frame()).to_vec(), want.partial().build());
    }
}
