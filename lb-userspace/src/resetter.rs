//! Proactive resets: RST segments sent by the controller through a raw IPv4
//! socket (IP_HDRINCL), built by the same `lb_common::rst` code the XDP
//! program uses.
//!
//! Why a raw socket: it works whatever the XDP mode and NIC (XDP hooks only
//! the receive path, so locally sent segments are not touched by it), the
//! kernel routes them and resolves neighbours, and `sendmmsg` sends them in
//! batches of 256, so 100k flows (two RSTs each) take a fraction of a
//! second (`cargo xtask bench`).

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use lb_common::{
    maps::{FlowEntry, FlowKey},
    rst::{self, Rst},
    tcp,
};

pub struct RstSender {
    fd: OwnedFd,
}

impl RstSender {
    pub fn new() -> io::Result<RstSender> {
        // SAFETY: plain socket(2); IPPROTO_RAW implies IP_HDRINCL.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, owned descriptor.
        Ok(RstSender { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Sends many RSTs, up to 256 per `sendmmsg` call. Returns how many
    /// could not be sent (and the last error).
    pub fn send_all(&self, rsts: &[Rst]) -> (usize, Option<io::Error>) {
        let mut failed = 0;
        let mut last_err = None;
        for chunk in rsts.chunks(256) {
            let mut pkts: Vec<[u8; rst::RST_LEN]> = chunk.iter().map(rst::build).collect();
            let mut addrs: Vec<libc::sockaddr_in> = chunk.iter().map(|r| sockaddr(r.dst)).collect();
            let mut iovs: Vec<libc::iovec> = pkts
                .iter_mut()
                .map(|p| libc::iovec { iov_base: p.as_mut_ptr().cast(), iov_len: p.len() })
                .collect();
            let mut msgs: Vec<libc::mmsghdr> = iovs
                .iter_mut()
                .zip(addrs.iter_mut())
                .map(|(iov, addr)| {
                    // SAFETY: zeroed msghdr is valid; the pointers below outlive the call.
                    let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    h.msg_hdr.msg_name = (addr as *mut libc::sockaddr_in).cast();
                    h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                    h.msg_hdr.msg_iov = iov;
                    h.msg_hdr.msg_iovlen = 1;
                    h
                })
                .collect();
            let mut sent = 0;
            while sent < msgs.len() {
                // SAFETY: `msgs[sent..]` point into live buffers.
                let n = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs[sent..].as_mut_ptr(), (msgs.len() - sent) as u32, 0) };
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
        let pkt = rst::build(r);
        let dst = sockaddr(r.dst);
        // SAFETY: valid buffer and address of the right size.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&dst as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}

fn sockaddr(dst: [u8; 4]) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(dst) },
        sin_zero: [0; 8],
    }
}

/// One flow to reset: its client → VIP entry and, when present, its
/// backend → client entry.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub key: FlowKey,
    pub fwd: FlowEntry,
    pub reverse_key: FlowKey,
    pub rev: Option<FlowEntry>,
}

impl Flow {
    /// The RST to the client, from VIP:port, with the sequence number the
    /// client expects next. A client whose SYN was never answered gets a
    /// RST|ACK acknowledging the SYN (what SYN-SENT accepts, RFC 793).
    pub fn client_rst(&self) -> Rst {
        let (seq, ack) = match self.rev {
            Some(r) if r.tcp_state != tcp::STATE_NONE => (r.seq_next, None),
            _ => (0, Some(self.fwd.seq_next)),
        };
        Rst {
            src: self.key.dst_addr.to_ne_bytes(),
            dst: self.key.src_addr.to_ne_bytes(),
            sport: self.key.dst_port.to_ne_bytes(),
            dport: self.key.src_port.to_ne_bytes(),
            seq,
            ack,
        }
    }

    /// The RST to the backend, from the client's address, with the sequence
    /// number the backend expects next (frees its socket at once).
    pub fn backend_rst(&self) -> Rst {
        Rst {
            src: self.key.src_addr.to_ne_bytes(),
            dst: self.fwd.nat_addr.to_ne_bytes(),
            sport: self.key.src_port.to_ne_bytes(),
            dport: self.fwd.nat_port.to_ne_bytes(),
            seq: self.fwd.seq_next,
            ack: None,
        }
    }

    pub fn is_tcp(&self) -> bool {
        self.key.proto == lb_common::maps::PROTO_TCP
    }

    pub fn client(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.key.src_addr.to_ne_bytes())
    }
}
