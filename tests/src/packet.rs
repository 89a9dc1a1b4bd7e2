//! Building test frames (Ethernet [+802.1Q] / IPv4 or IPv6 [+ extension
//! headers] / TCP|UDP) with correct checksums, for BPF_PROG_TEST_RUN
//! fixtures. Expected outputs are built the
//! same way from the expected field values, so comparing bytes checks every
//! rewritten field and both checksums at once.

use std::net::IpAddr;

use lb_common::csum;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        doff: u8,
    },
    /// `no_csum`: send checksum 0 ("none", RFC 768).
    Udp {
        sport: u16,
        dport: u16,
        no_csum: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// TTL or hop limit.
    pub ttl: u8,
    /// IPv6 extension headers before the L4 header: (next-header value
    /// naming it, length in bytes, a multiple of 8).
    pub ext: Vec<(u8, usize)>,
    pub l4: L4,
    pub payload: Vec<u8>,
    /// The L4 checksum field holds only the pseudo-header seed, as a
    /// sender with TX checksum offload (CHECKSUM_PARTIAL) leaves it.
    pub partial_csum: bool,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

impl Frame {
    fn new(src: IpAddr, dst: IpAddr, l4: L4, payload: &[u8]) -> Frame {
        Frame {
            dst_mac: [0x02, 0, 0, 0, 0xaa, 0x01],
            src_mac: [0x02, 0, 0, 0, 0xbb, 0x01],
            vlan: None,
            src,
            dst,
            ttl: 64,
            ext: Vec::new(),
            l4,
            payload: payload.to_vec(),
            partial_csum: false,
        }
    }

    /// This frame as a local stack with TX checksum offload sends it: the
    /// L4 checksum field holds the pseudo-header seed.
    pub fn partial(mut self) -> Frame {
        self.partial_csum = true;
        self
    }

    pub fn tcp<A: Into<IpAddr>>(src: (A, u16), dst: (A, u16), flags: u8, seq: u32, ack: u32) -> Frame {
        Frame::new(src.0.into(), dst.0.into(), L4::Tcp { sport: src.1, dport: dst.1, seq, ack, flags, doff: 5 }, &[])
    }

    pub fn udp<A: Into<IpAddr>>(src: (A, u16), dst: (A, u16), payload: &[u8]) -> Frame {
        Frame::new(src.0.into(), dst.0.into(), L4::Udp { sport: src.1, dport: dst.1, no_csum: false }, payload)
    }

    /// Offset of the IP header.
    pub fn l3_offset(&self) -> usize {
        if self.vlan.is_some() { 18 } else { 14 }
    }

    fn pseudo_sum(&self, proto: u8, len: usize) -> u32 {
        let mut p = Vec::new();
        match (self.src, self.dst) {
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                p.extend_from_slice(&(len as u32).to_be_bytes());
                p.extend_from_slice(&[0, 0, 0, proto]);
            }
            (s, d) => {
                let v4 = |a: IpAddr| match a {
                    IpAddr::V4(a) => a.octets(),
                    IpAddr::V6(_) => panic!("mixed address families in a test frame"),
                };
                p.extend_from_slice(&v4(s));
                p.extend_from_slice(&v4(d));
                p.extend_from_slice(&[0, proto]);
                p.extend_from_slice(&(len as u16).to_be_bytes());
            }
        }
        csum::sum_bytes(&p, 0)
    }

    pub fn build(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        let proto;
        match self.l4 {
            L4::Tcp { sport, dport, seq, ack, flags, doff } => {
                proto = 6u8;
                l4.extend_from_slice(&sport.to_be_bytes());
                l4.extend_from_slice(&dport.to_be_bytes());
                l4.extend_from_slice(&seq.to_be_bytes());
                l4.extend_from_slice(&ack.to_be_bytes());
                l4.push(doff << 4);
                l4.push(flags);
                l4.extend_from_slice(&64240u16.to_be_bytes());
                l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
                // Options as NOPs when doff > 5 (kept within what we build).
                let opt_len = (doff as usize).saturating_sub(5) * 4;
                l4.extend(std::iter::repeat_n(1u8, opt_len));
                l4.extend_from_slice(&self.payload);
                let c = if self.partial_csum {
                    csum::fold(self.pseudo_sum(proto, l4.len()))
                } else {
                    !csum::fold(csum::sum_bytes(&l4, self.pseudo_sum(proto, l4.len())))
                };
                l4[16..18].copy_from_slice(&c.to_ne_bytes());
            }
            L4::Udp { sport, dport, no_csum } => {
                proto = 17u8;
                let len = (8 + self.payload.len()) as u16;
                l4.extend_from_slice(&sport.to_be_bytes());
                l4.extend_from_slice(&dport.to_be_bytes());
                l4.extend_from_slice(&len.to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
                l4.extend_from_slice(&self.payload);
                if self.partial_csum {
                    let c = csum::fold(self.pseudo_sum(proto, l4.len()));
                    l4[6..8].copy_from_slice(&c.to_ne_bytes());
                } else if !no_csum {
                    let mut c = !csum::fold(csum::sum_bytes(&l4, self.pseudo_sum(proto, l4.len())));
                    if c == 0 {
                        c = 0xffff;
                    }
                    l4[6..8].copy_from_slice(&c.to_ne_bytes());
                }
            }
        }
        let (ip, ether_type) = match (self.src, self.dst) {
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                // Extension headers, each naming the next.
                let mut ext = Vec::new();
                let mut first = proto;
                for (i, (_, len)) in self.ext.iter().enumerate() {
                    let next = self.ext.get(i + 1).map_or(proto, |e| e.0);
                    let mut h = vec![0u8; *len];
                    h[0] = next;
                    if let Some(l) = h.get_mut(1) {
                        *l = (len / 8).saturating_sub(1) as u8;
                    }
                    ext.extend_from_slice(&h);
                    if i == 0 {
                        first = self.ext[0].0;
                    }
                }
                let mut ip = vec![0u8; 40];
                ip[0] = 0x60;
                ip[4..6].copy_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
                ip[6] = first;
                ip[7] = self.ttl;
                ip[8..24].copy_from_slice(&src.octets());
                ip[24..40].copy_from_slice(&dst.octets());
                ip.extend_from_slice(&ext);
                (ip, 0x86ddu16)
            }
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut ip = vec![0u8; 20];
                ip[0] = 0x45;
                ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
                ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
                ip[6] = 0x40; // DF
                ip[8] = self.ttl;
                ip[9] = proto;
                ip[12..16].copy_from_slice(&src.octets());
                ip[16..20].copy_from_slice(&dst.octets());
                let c = csum::checksum(&ip);
                ip[10..12].copy_from_slice(&c.to_ne_bytes());
                (ip, 0x0800u16)
            }
            _ => panic!("mixed address families in a test frame"),
        };

        let mut f = Vec::new();
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        if let Some(vid) = self.vlan {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        f.extend_from_slice(&ether_type.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        f
    }
}

/// Recomputes the checksums of a frame built like ours (IPv4 header and
/// L4; IPv6 without extension headers: L4) and says whether they match
/// what the frame carries.
pub fn checksums_valid(frame: &[u8], l3: usize) -> bool {
    if frame[l3] >> 4 == 6 {
        let ip = &frame[l3..l3 + 40];
        let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
        let seg = &frame[l3 + 40..l3 + 40 + plen];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&ip[8..40]);
        pseudo.extend_from_slice(&(plen as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, ip[6]]);
        return csum::fold(csum::sum_bytes(seg, csum::sum_bytes(&pseudo, 0))) == 0xffff;
    }
    let ip = &frame[l3..l3 + 20];
    if csum::fold(csum::sum_bytes(ip, 0)) != 0xffff {
        return false;
    }
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let proto = ip[9];
    let seg = &frame[l3 + 20..l3 + tot];
    let (src, dst) = ([ip[12], ip[13], ip[14], ip[15]], [ip[16], ip[17], ip[18], ip[19]]);
    if proto == 17 && seg[6..8] == [0, 0] {
        return true;
    }
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src);
    pseudo[4..8].copy_from_slice(&dst);
    pseudo[9] = proto;
    pseudo[10..12].copy_from_slice(&(seg.len() as u16).to_be_bytes());
    csum::fold(csum::sum_bytes(seg, csum::sum_bytes(&pseudo, 0))) == 0xffff
}

/// Sends raw IPv4 packets (headers included) from the calling thread's
/// network namespace, in batches; returns how many the kernel took.
pub fn send_raw_ipv4(packets: &[Vec<u8>]) -> std::io::Result<usize> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); IPPROTO_RAW implies IP_HDRINCL.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut sent = 0;
    for p in packets {
        let dst = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes([p[16], p[17], p[18], p[19]]) },
            sin_zero: [0; 8],
        };
        // SAFETY: valid buffer and address.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                p.as_ptr().cast(),
                p.len(),
                0,
                (&dst as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if n > 0 {
            sent += 1;
        }
    }
    Ok(sent)
}
