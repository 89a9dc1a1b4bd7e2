//! Tools for hostile traffic: a raw Ethernet sender ([`Injector`], frames
//! built with [`crate::packet::Frame`] and sent from a namespace through an
//! AF_PACKET socket, so anything can be spoofed, malformed or truncated), a
//! capture ([`Capture`], AF_PACKET with a kernel-side filter on addresses),
//! a seeded random source ([`Rng`]), TCP connections from a chosen source
//! port ([`connect_from`]), many line connections watched at once
//! ([`Lines`], [`pump`]), and builders for what [`crate::packet::Frame`]
//! does not make (ICMP, IPv4 options, checksums after a mutation).

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lb_common::csum;

use crate::{
    netns::{Netns, in_netns},
    packet::Frame,
};

// Linux constants (include/uapi/linux/if_packet.h, asm-generic/socket.h).
const SOL_PACKET: libc::c_int = 263;
const PACKET_STATISTICS: libc::c_int = 6;
const PACKET_QDISC_BYPASS: libc::c_int = 20;
const PACKET_OUTGOING: u8 = 4;
const SO_ATTACH_FILTER: libc::c_int = 26;
const SO_RCVBUFFORCE: libc::c_int = 33;
const ETH_P_ALL: u16 = 0x0003;

/// A seeded pseudo-random source (splitmix64): attacks are random, and a
/// failing run can be replayed with its seed (`XLB_ATTACK_SEED`).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// `XLB_ATTACK_SEED` if set, else a fresh seed from the kernel; returns
    /// the seed too, for the failure messages.
    pub fn from_env_or_entropy() -> (Rng, u64) {
        let seed = std::env::var("XLB_ATTACK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(entropy);
        (Rng::new(seed), seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    pub fn u16(&mut self) -> u16 {
        (self.next_u64() >> 48) as u16
    }

    pub fn u8(&mut self) -> u8 {
        (self.next_u64() >> 56) as u8
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Uniform in `lo..hi` (`hi` > `lo`).
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo)
    }

    /// True `num` times in `den`.
    pub fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn entropy() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: valid buffer of 8 bytes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        // Not expected on Linux; the clock is random enough for a seed.
        return std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    }
    u64::from_ne_bytes(b)
}

/// The MAC address of `iface` in `ns`.
pub fn mac_of(ns: &Netns, iface: &str) -> anyhow::Result<[u8; 6]> {
    let out = ns.ip(&["-o", "link", "show", "dev", iface])?;
    let hex = out.split("link/ether ").nth(1).and_then(|s| s.get(..17)).with_context(|| format!("no MAC address for {iface} in {}: {out}", ns.name))?;
    let mut mac = [0u8; 6];
    for (i, part) in hex.split(':').enumerate() {
        anyhow::ensure!(i < 6, "bad MAC {hex}");
        mac[i] = u8::from_str_radix(part, 16).with_context(|| format!("bad MAC {hex}"))?;
    }
    Ok(mac)
}

fn setsockopt_int(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: valid socket and option buffer.
    let rc = unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, (&value as *const libc::c_int).cast(), size_of::<libc::c_int>() as libc::socklen_t) };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// An AF_PACKET socket of namespace `ns` bound to `iface`, with `protocol`
/// (network order; 0: receives nothing).
fn packet_socket(ns: &Netns, iface: &str, protocol: u16, before_bind: impl FnOnce(&OwnedFd) -> io::Result<()> + Send) -> anyhow::Result<OwnedFd> {
    let ifindex = ns.ifindex(iface)?;
    let fd = in_netns(&ns.name, || -> io::Result<OwnedFd> {
        // SAFETY: plain socket(2); protocol 0 until bound, so nothing is
        // queued before the filter is in place.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        before_bind(&fd)?;
        // SAFETY: zeroed is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = protocol;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: valid socket and address.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), (&sll as *const libc::sockaddr_ll).cast(), size_of::<libc::sockaddr_ll>() as libc::socklen_t) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    })?
    .with_context(|| format!("AF_PACKET socket on {iface} in {}", ns.name))?;
    Ok(fd)
}

/// Sends raw Ethernet frames out of an interface of a namespace: what a
/// host on that link can put on the wire, byte for byte (spoofed sources,
/// bad lengths, truncated headers). Frames shorter than an Ethernet header
/// cannot be sent (the kernel refuses them); they are counted as refused.
pub struct Injector {
    fd: OwnedFd,
    /// The sending interface's MAC (the frames' source).
    pub src_mac: [u8; 6],
    /// The peer interface's MAC (the frames' destination).
    pub dst_mac: [u8; 6],
}

impl Injector {
    /// Frames leave `iface` of `ns` towards `peer_iface` of `peer` (the
    /// other end of the link: the balancer's interface).
    pub fn open(ns: &Netns, iface: &str, peer: &Netns, peer_iface: &str) -> anyhow::Result<Injector> {
        let src_mac = mac_of(ns, iface)?;
        let dst_mac = mac_of(peer, peer_iface)?;
        let fd = packet_socket(ns, iface, 0, |fd| {
            // Straight to the driver; best effort (a veth has no queue anyway).
            let _ = setsockopt_int(fd, SOL_PACKET, PACKET_QDISC_BYPASS, 1);
            Ok(())
        })?;
        Ok(Injector { fd, src_mac, dst_mac })
    }

    /// `f` addressed from this link to the peer, built.
    pub fn frame(&self, mut f: Frame) -> Vec<u8> {
        f.src_mac = self.src_mac;
        f.dst_mac = self.dst_mac;
        f.build()
    }

    /// An Ethernet frame around `l3` (ether type `ether_type`).
    pub fn eth(&self, ether_type: u16, l3: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(14 + l3.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&ether_type.to_be_bytes());
        f.extend_from_slice(l3);
        f
    }

    /// Sends `frames` (in batches of `sendmmsg`); returns how many the
    /// kernel took and how many it refused (too short, too long, or the
    /// link's queue full).
    pub fn send(&self, frames: &[Vec<u8>]) -> (usize, usize) {
        let (mut sent, mut refused) = (0, 0);
        let mut rest = frames;
        while !rest.is_empty() {
            let batch = &rest[..rest.len().min(64)];
            let mut iov: Vec<libc::iovec> = batch.iter().map(|f| libc::iovec { iov_base: f.as_ptr() as *mut libc::c_void, iov_len: f.len() }).collect();
            let mut msgs: Vec<libc::mmsghdr> = iov
                .iter_mut()
                .map(|v| {
                    // SAFETY: zeroed is a valid msghdr.
                    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
                    h.msg_iov = v;
                    h.msg_iovlen = 1;
                    libc::mmsghdr { msg_hdr: h, msg_len: 0 }
                })
                .collect();
            // SAFETY: valid socket and message array pointing at live buffers.
            let n = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as libc::c_uint, 0) };
            // The first `n` went; the next one failed (skipped), if any.
            let n = n.max(0) as usize;
            sent += n;
            let consumed = if n < batch.len() {
                refused += 1;
                n + 1
            } else {
                n
            };
            rest = &rest[consumed..];
        }
        (sent, refused)
    }
}

/// A frame a [`Capture`] saw.
#[derive(Clone, Debug)]
pub struct Captured {
    /// Sent by this namespace (else received).
    pub outgoing: bool,
    pub frame: Vec<u8>,
}

/// Captures, on one interface of a namespace, every IPv4/IPv6 frame whose
/// source is one of `from` or whose destination is one of `to` (a
/// classic BPF filter in the kernel: nothing else is copied, so a capture
/// during a flood does not overflow), in both directions.
pub struct Capture {
    frames: Arc<Mutex<Vec<Captured>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    fd: Arc<OwnedFd>,
}

/// The capture's filter program: accept (whole frame) when the source is
/// in `from` or the destination in `to`; VLAN-tagged frames are not looked at.
fn address_filter(from: &[IpAddr], to: &[IpAddr]) -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = 0x20;
    const LD_H_ABS: u16 = 0x28;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let ins = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let accept = ins(RET_K, 0, 0, 0x0004_0000);
    // One block per family: compare, accept on a match, else fall through.
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for (addrs, off4, off6) in [(from, 26u32, 22u32), (to, 30, 38)] {
        for a in addrs {
            match a {
                IpAddr::V4(a) => {
                    v4.push(ins(LD_W_ABS, 0, 0, off4));
                    v4.push(ins(JEQ_K, 0, 1, u32::from(*a)));
                    v4.push(accept);
                }
                IpAddr::V6(a) => {
                    let o = a.octets();
                    for w in 0..4 {
                        let word = u32::from_be_bytes([o[w * 4], o[w * 4 + 1], o[w * 4 + 2], o[w * 4 + 3]]);
                        // A mismatch skips what is left of this address's block.
                        let left = (3 - w) as u8 * 2 + 1;
                        v6.push(ins(LD_W_ABS, 0, 0, off6 + w as u32 * 4));
                        v6.push(ins(JEQ_K, 0, left, word));
                    }
                    v6.push(accept);
                }
            }
        }
    }
    let reject = ins(RET_K, 0, 0, 0);
    v4.push(reject);
    v6.push(reject);
    let mut prog = vec![ins(LD_H_ABS, 0, 0, 12), ins(JEQ_K, 0, v4.len() as u8, 0x0800)];
    prog.extend(v4);
    prog.push(ins(JEQ_K, 0, v6.len() as u8, 0x86dd));
    prog.extend(v6);
    prog.push(reject);
    prog
}

impl Capture {
    pub fn start(ns: &Netns, iface: &str, from: &[IpAddr], to: &[IpAddr]) -> anyhow::Result<Capture> {
        anyhow::ensure!(from.len() + to.len() <= 24, "a capture filter on at most 24 addresses");
        let filter = address_filter(from, to);
        let fd = packet_socket(ns, iface, ETH_P_ALL.to_be(), |fd| {
            let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut libc::sock_filter };
            // SAFETY: valid socket and program (it outlives the call; the kernel copies it).
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    SO_ATTACH_FILTER,
                    (&prog as *const libc::sock_fprog).cast(),
                    size_of::<libc::sock_fprog>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            let _ = setsockopt_int(fd, libc::SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20);
            let tv = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
            // SAFETY: valid socket and option buffer.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            Ok(())
        })?;
        let fd = Arc::new(fd);
        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (fd, frames, stop) = (fd.clone(), frames.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    // SAFETY: zeroed is a valid sockaddr_ll.
                    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                    let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                    // SAFETY: valid socket, buffer and address storage.
                    let n = unsafe {
                        libc::recvfrom(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0, (&mut from as *mut libc::sockaddr_ll).cast(), &mut len)
                    };
                    if n > 0 {
                        let c = Captured { outgoing: from.sll_pkttype == PACKET_OUTGOING, frame: buf[..n as usize].to_vec() };
                        frames.lock().unwrap_or_else(|e| e.into_inner()).push(c);
                        continue;
                    }
                    // A timeout with nothing left to read: done once asked to stop.
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                }
            })
        };
        Ok(Capture { frames, stop, thread: Some(thread), fd })
    }

    /// What was captured so far.
    pub fn frames(&self) -> Vec<Captured> {
        self.frames.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops (after reading what is queued) and returns every frame, and
    /// how many frames the kernel dropped for lack of buffer space (a
    /// capture that dropped frames cannot say what it did not see).
    pub fn stop(mut self) -> (Vec<Captured>, u32) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut st = [0u32; 2];
        let mut len = size_of::<[u32; 2]>() as libc::socklen_t;
        // SAFETY: valid socket; struct tpacket_stats is two u32s.
        unsafe { libc::getsockopt(self.fd.as_raw_fd(), SOL_PACKET, PACKET_STATISTICS, st.as_mut_ptr().cast(), &mut len) };
        (std::mem::take(&mut *self.frames.lock().unwrap_or_else(|e| e.into_inner())), st[1])
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP or UDP segment (or another IP packet: proto, addresses) read
/// back from a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: u8,
    /// TCP flags (0 otherwise).
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
}

/// Parses an Ethernet frame (untagged) carrying IPv4 (any IHL) or IPv6
/// (no extension headers); ports are 0 for what is neither TCP nor UDP.
pub fn parse_segment(frame: &[u8]) -> Option<Segment> {
    let et = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (src, dst, proto, l4): (IpAddr, IpAddr, u8, &[u8]) = match et {
        0x0800 => {
            let ihl = (*ip.first()? & 0x0f) as usize * 4;
            let tot = u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]) as usize;
            let s: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let d: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (Ipv4Addr::from(s).into(), Ipv4Addr::from(d).into(), ip[9], ip.get(ihl..tot.min(ip.len()))?)
        }
        0x86dd => {
            let plen = u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]) as usize;
            let s: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let d: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (Ipv6Addr::from(s).into(), Ipv6Addr::from(d).into(), ip[6], ip.get(40..(40 + plen).min(ip.len()))?)
        }
        _ => return None,
    };
    let mut seg = Segment { src: SocketAddr::new(src, 0), dst: SocketAddr::new(dst, 0), proto, flags: 0, seq: 0, ack: 0, payload: Vec::new() };
    match proto {
        6 if l4.len() >= 20 => {
            seg.src.set_port(u16::from_be_bytes([l4[0], l4[1]]));
            seg.dst.set_port(u16::from_be_bytes([l4[2], l4[3]]));
            seg.seq = u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]);
            seg.ack = u32::from_be_bytes([l4[8], l4[9], l4[10], l4[11]]);
            seg.flags = l4[13];
            seg.payload = l4.get((l4[12] >> 4) as usize * 4..).unwrap_or_default().to_vec();
        }
        17 if l4.len() >= 8 => {
            seg.src.set_port(u16::from_be_bytes([l4[0], l4[1]]));
            seg.dst.set_port(u16::from_be_bytes([l4[2], l4[3]]));
            seg.payload = l4[8..].to_vec();
        }
        _ => {}
    }
    Some(seg)
}

/// An IPv4 packet (header without options, checksum set) around `payload`.
pub fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&0x4321u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = csum::checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_ne_bytes());
    ip.extend_from_slice(payload);
    ip
}

/// An IPv6 packet (no extension headers) around `payload`.
pub fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut ip = vec![0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    ip[6] = next;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&src.octets());
    ip[24..40].copy_from_slice(&dst.octets());
    ip.extend_from_slice(payload);
    ip
}

/// An ICMP message (type, code, the 4 bytes after the checksum, body),
/// checksum set.
pub fn icmp4(ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let c = csum::checksum(&m);
    m[2..4].copy_from_slice(&c.to_ne_bytes());
    m
}

/// An ICMPv6 message from `src` to `dst`, checksum set.
pub fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let c = csum::l4_checksum_v6(src.octets(), dst.octets(), 58, &m);
    m[2..4].copy_from_slice(&c.to_ne_bytes());
    m
}

/// Recomputes, in place, the IPv4 header checksum and the TCP/UDP/ICMP
/// checksum of an untagged Ethernet frame as far as its headers can be
/// followed (after a mutation that should still look valid); does
/// nothing where they cannot.
pub fn refresh_checksums(frame: &mut [u8]) {
    if frame.len() < 14 {
        return;
    }
    let et = u16::from_be_bytes([frame[12], frame[13]]);
    let ip = &mut frame[14..];
    match et {
        0x0800 if ip.len() >= 20 => {
            let ihl = ((ip[0] & 0x0f) as usize * 4).max(20);
            if ip.len() < ihl {
                return;
            }
            ip[10..12].copy_from_slice(&[0, 0]);
            let c = csum::checksum(&ip[..ihl]);
            ip[10..12].copy_from_slice(&c.to_ne_bytes());
            let tot = (u16::from_be_bytes([ip[2], ip[3]]) as usize).clamp(ihl, ip.len());
            // Not for a later fragment: its payload is no L4 header.
            if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
                return;
            }
            let (src, dst, proto) = ([ip[12], ip[13], ip[14], ip[15]], [ip[16], ip[17], ip[18], ip[19]], ip[9]);
            let l4 = &mut ip[ihl..tot];
            match proto {
                6 | 17 => {
                    let at = if proto == 6 { 16 } else { 6 };
                    if l4.len() < at + 2 {
                        return;
                    }
                    l4[at..at + 2].copy_from_slice(&[0, 0]);
                    let c = csum::l4_checksum_v4(src, dst, proto, l4);
                    l4[at..at + 2].copy_from_slice(&c.to_ne_bytes());
                }
                1 if l4.len() >= 4 => {
                    l4[2..4].copy_from_slice(&[0, 0]);
                    let c = csum::checksum(l4);
                    l4[2..4].copy_from_slice(&c.to_ne_bytes());
                }
                _ => {}
            }
        }
        0x86dd if ip.len() >= 40 => {
            let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            let end = (40 + plen).min(ip.len());
            let src: [u8; 16] = ip[8..24].try_into().unwrap_or_default();
            let dst: [u8; 16] = ip[24..40].try_into().unwrap_or_default();
            // Follow the options headers the way the kernel does.
            let (mut next, mut off) = (ip[6], 40usize);
            while matches!(next, 0 | 43 | 60) && off + 2 <= end {
                let len = (ip[off + 1] as usize + 1) * 8;
                next = ip[off];
                off += len;
            }
            if off > end {
                return;
            }
            let l4 = &mut ip[off..end];
            let at = match next {
                6 => 16,
                17 => 6,
                58 => 2,
                _ => return,
            };
            if l4.len() < at + 2 {
                return;
            }
            l4[at..at + 2].copy_from_slice(&[0, 0]);
            let c = csum::l4_checksum_v6(src, dst, next, l4);
            l4[at..at + 2].copy_from_slice(&c.to_ne_bytes());
        }
        _ => {}
    }
}

fn sockaddr_of(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: v6.ip().octets() },
                sin6_scope_id: 0,
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// A TCP connection being opened from a chosen local address and port
/// (`SO_REUSEADDR`, so several sockets may use one port towards different
/// destinations, as a client with a fixed source port does).
pub struct Connecting {
    fd: OwnedFd,
    started: Instant,
}

/// Starts a connection from `local` (port 0: any) to `to` inside
/// namespace `ns`; the SYN is on its way when this returns.
pub fn connect_from(ns: &str, local: SocketAddr, to: SocketAddr) -> anyhow::Result<Connecting> {
    let fd = in_netns(ns, || -> io::Result<OwnedFd> {
        let family = if to.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
        let (ss, len) = sockaddr_of(local);
        // SAFETY: valid socket and address.
        if unsafe { libc::bind(fd.as_raw_fd(), (&ss as *const libc::sockaddr_storage).cast(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let (ss, len) = sockaddr_of(to);
        // SAFETY: valid socket and address.
        if unsafe { libc::connect(fd.as_raw_fd(), (&ss as *const libc::sockaddr_storage).cast(), len) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(e);
            }
        }
        Ok(fd)
    })?
    .with_context(|| format!("connecting from {local} to {to}"))?;
    Ok(Connecting { fd, started: Instant::now() })
}

impl Connecting {
    /// The local address the socket is bound to (the chosen port).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        // SAFETY: a TcpStream view of our socket, forgotten at once (the
        // descriptor stays ours).
        let s = std::mem::ManuallyDrop::new(unsafe { TcpStream::from_raw_fd(self.fd.as_raw_fd()) });
        s.local_addr()
    }

    /// Waits until the connection is established (a blocking stream) or
    /// has failed (its error: refused, reset, timed out), at most `timeout`
    /// after it started.
    pub fn finish(self, timeout: Duration) -> io::Result<TcpStream> {
        let deadline = self.started + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut p = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
            // SAFETY: one valid pollfd (a last look without waiting once the time is up).
            let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(100) as i32) };
            if n > 0 {
                break;
            }
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, format!("not connected after {timeout:?}")));
            }
        }
        let mut err: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid socket and option buffer.
        unsafe { libc::getsockopt(self.fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_ERROR, (&mut err as *mut libc::c_int).cast(), &mut len) };
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
        let s = TcpStream::from(self.fd);
        s.set_nonblocking(false)?;
        Ok(s)
    }
}

/// One of many line connections watched at once with [`pump`].
pub struct Lines {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// Complete lines received, without the newline.
    pub lines: Vec<String>,
    /// How the connection failed, if it did (a RST: `ConnectionReset`).
    pub error: Option<io::ErrorKind>,
    /// The peer closed (FIN).
    pub eof: bool,
}

impl Lines {
    pub fn new(stream: TcpStream) -> io::Result<Lines> {
        stream.set_nonblocking(true)?;
        Ok(Lines { stream, buf: Vec::new(), lines: Vec::new(), error: None, eof: false })
    }

    /// Sends one line (a failure is recorded, not returned).
    pub fn send(&mut self, line: &str) {
        if self.error.is_none()
            && let Err(e) = self.stream.write_all(format!("{line}\n").as_bytes())
        {
            self.error = Some(e.kind());
        }
    }

    /// The connection was reset (ECONNRESET): "told".
    pub fn reset(&self) -> bool {
        self.error == Some(io::ErrorKind::ConnectionReset)
    }

    /// Still open: no error, no FIN.
    pub fn open(&self) -> bool {
        self.error.is_none() && !self.eof
    }

    fn read_ready(&mut self) {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.eof = true;
                    return;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.error = Some(e.kind());
                    break;
                }
            }
        }
        while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=i).collect();
            self.lines.push(String::from_utf8_lossy(&line[..i]).into_owned());
        }
    }
}

/// Reads from every open connection of `conns` until `done` holds for
/// each (or it failed, or the peer closed), or `deadline` passes.
pub fn pump(conns: &mut [Lines], deadline: Instant, mut done: impl FnMut(usize, &Lines) -> bool) {
    loop {
        let waiting: Vec<usize> = (0..conns.len()).filter(|&i| conns[i].open() && !done(i, &conns[i])).collect();
        let left = deadline.saturating_duration_since(Instant::now());
        if waiting.is_empty() || left.is_zero() {
            return;
        }
        let mut fds: Vec<libc::pollfd> = waiting.iter().map(|&i| libc::pollfd { fd: conns[i].stream.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
        // SAFETY: valid array of pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, left.as_millis().clamp(1, 100) as i32) };
        if n <= 0 {
            continue;
        }
        for (p, &i) in fds.iter().zip(&waiting) {
            if p.revents != 0 {
                conns[i].read_ready();
            }
        }
    }
}

/// Fails unless this process may use raw sockets and namespaces.
pub fn require_root() -> anyhow::Result<()> {
    if !crate::have_privileges() {
        bail!("needs root (netns, XDP, raw sockets): run `cargo xtask test`");
    }
    Ok(())
}

/// A TCP listener on `bind` in namespace `ns` with an accept queue of
/// `backlog` (`listen(2)`): with 0, one connection waiting to be accepted
/// fills it, and the kernel drops further SYNs until it is accepted (a
/// busy backend, whose SYN-ACKs come late).
pub fn listen_with_backlog(ns: &str, bind: SocketAddr, backlog: i32) -> anyhow::Result<std::net::TcpListener> {
    let fd = in_netns(ns, || -> io::Result<OwnedFd> {
        let family = if bind.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
        let (ss, len) = sockaddr_of(bind);
        // SAFETY: valid socket and address.
        if unsafe { libc::bind(fd.as_raw_fd(), (&ss as *const libc::sockaddr_storage).cast(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: valid socket.
        if unsafe { libc::listen(fd.as_raw_fd(), backlog) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    })?
    .with_context(|| format!("listening on {bind} in {ns}"))?;
    Ok(std::net::TcpListener::from(fd))
}
