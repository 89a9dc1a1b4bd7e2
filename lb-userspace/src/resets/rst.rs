//! Proactive resets: RST segments sent by the controller through raw IPv4
//! and IPv6 sockets (header included), built by the same `lb_common::rst`
//! code the XDP program uses.
//!
//! Why a raw socket: it works whatever the XDP mode and NIC (XDP hooks only
//! the receive path, so locally sent segments are not touched by it), the
//! kernel routes them and resolves neighbours, and `sendmmsg` sends them in
//! batches of 256, so 100k flows (two RSTs each) take a fraction of a
//! second (`cargo xtask bench`).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use lb_common::{
    maps::addr_bytes,
    rst::{self, Rst},
};

/// Raw sockets for both families (IPv4 with IP_HDRINCL, IPv6 with
/// IPV6_HDRINCL: both implied by IPPROTO_RAW).
pub struct RstSender {
    v4: OwnedFd,
    v6: OwnedFd,
}

fn raw_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); IPPROTO_RAW implies the header is ours.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, owned descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A destination address for `sendto`/`sendmmsg`, either family.
#[derive(Clone, Copy)]
#[repr(C)]
union SockAddr {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

fn sockaddr(r: &Rst) -> (SockAddr, libc::socklen_t) {
    if r.is_v6() {
        // SAFETY: zeroed is a valid sockaddr_in6.
        let mut a: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        a.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        a.sin6_addr.s6_addr = addr_bytes(&r.dst);
        (SockAddr { v6: a }, std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
    } else {
        let a =
            libc::sockaddr_in { sin_family: libc::AF_INET as libc::sa_family_t, sin_port: 0, sin_addr: libc::in_addr { s_addr: r.dst[3] }, sin_zero: [0; 8] };
        (SockAddr { v4: a }, std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
    }
}

/// The segment's bytes (IP header included) and its length.
fn packet(r: &Rst) -> ([u8; rst::RST_LEN_V6], usize) {
    let mut b = [0u8; rst::RST_LEN_V6];
    if r.is_v6() {
        b = rst::build_v6(r);
        (b, rst::RST_LEN_V6)
    } else {
        b[..rst::RST_LEN].copy_from_slice(&rst::build_v4(r));
        (b, rst::RST_LEN)
    }
}

impl RstSender {
    pub fn new() -> io::Result<RstSender> {
        Ok(RstSender { v4: raw_socket(libc::AF_INET)?, v6: raw_socket(libc::AF_INET6)? })
    }

    /// Sends many RSTs, up to 256 per `sendmmsg` call (per family). Returns
    /// how many could not be sent (and the last error).
    pub fn send_all(&self, rsts: &[Rst]) -> (usize, Option<io::Error>) {
        let (v6, v4): (Vec<Rst>, Vec<Rst>) = rsts.iter().partition(|r| r.is_v6());
        let (f4, e4) = self.send_family(&self.v4, &v4);
        let (f6, e6) = self.send_family(&self.v6, &v6);
        (f4 + f6, e6.or(e4))
    }

    fn send_family(&self, fd: &OwnedFd, rsts: &[Rst]) -> (usize, Option<io::Error>) {
        let mut failed = 0;
        let mut last_err = None;
        for chunk in rsts.chunks(256) {
            let mut pkts: Vec<([u8; rst::RST_LEN_V6], usize)> = chunk.iter().map(packet).collect();
            let mut addrs: Vec<(SockAddr, libc::socklen_t)> = chunk.iter().map(sockaddr).collect();
            let mut iovs: Vec<libc::iovec> = pkts.iter_mut().map(|(p, len)| libc::iovec { iov_base: p.as_mut_ptr().cast(), iov_len: *len }).collect();
            let mut msgs: Vec<libc::mmsghdr> = iovs
                .iter_mut()
                .zip(addrs.iter_mut())
                .map(|(iov, (addr, len))| {
                    // SAFETY: zeroed msghdr is valid; the pointers below outlive the call.
                    let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    h.msg_hdr.msg_name = (addr as *mut SockAddr).cast();
                    h.msg_hdr.msg_namelen = *len;
                    h.msg_hdr.msg_iov = iov;
                    h.msg_hdr.msg_iovlen = 1;
                    h
                })
                .collect();
            let mut sent = 0;
            while sent < msgs.len() {
                // SAFETY: `msgs[sent..]` point into live buffers.
                let n = unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs[sent..].as_mut_ptr(), (msgs.len() - sent) as u32, 0) };
                if n <= 0 {
                    // This message failed: count it and go on with the next.
                    last_err = Some(io::Error::last_os_error());
                    failed += 1;
                    sent += 1;
                } else {
                    sent += n as usize;
                }
            }
        }
        (failed, last_err)
    }

    pub fn send(&self, r: &Rst) -> io::Result<()> {
        let (pkt, len) = packet(r);
        let (dst, dst_len) = sockaddr(r);
        let fd = if r.is_v6() { &self.v6 } else { &self.v4 };
        // SAFETY: valid buffer and address of the right size.
        let n = unsafe { libc::sendto(fd.as_raw_fd(), pkt.as_ptr().cast(), len, 0, (&dst as *const SockAddr).cast(), dst_len) };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}
