//! Next hops kept resolved: managed neighbour entries (`NTF_EXT_MANAGED`,
//! kernel 5.16+, made for XDP balancers) for the backends and for the
//! gateways of the routes out of the managed interfaces. The kernel
//! re-probes them every few seconds, so `bpf_fib_lookup` finds them
//! resolved instead of answering "no neighbour" and sending the packet the
//! slow way through the kernel. They are also marked `extern_learn`, which
//! keeps the kernel's garbage collection away from them.
//!
//! Clients on a managed link itself (no gateway) are not managed: there
//! may be any number of them, and their first packets take the kernel path
//! (which works: see `host`).
//!
//! Talks rtnetlink through `netlink-packet-route`; every call blocks for a
//! moment (run it off the async workers).

use std::{collections::BTreeSet, io, net::IpAddr};

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourFlags, NeighbourMessage, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use serde::{Deserialize, Serialize};

/// A neighbour entry: an address on an interface.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Neighbour {
    pub ifindex: u32,
    pub addr: IpAddr,
}

/// An rtnetlink socket in the current network namespace.
pub struct Netlink {
    sock: Socket,
    seq: u32,
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl Netlink {
    pub fn open() -> io::Result<Netlink> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Netlink { sock, seq: 0 })
    }

    /// Sends one request and collects the answers (several for a dump)
    /// until the kernel's ACK, error or end of dump.
    pub(super) fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf[..]);
        self.sock.send(&buf, 0)?;
        let mut out = Vec::new();
        let mut rx = vec![0u8; 1 << 16];
        loop {
            let n = self.sock.recv(&mut &mut rx[..], 0)?;
            let mut off = 0;
            while off < n {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[off..n]).map_err(other)?;
                let len = m.header.length as usize;
                if m.header.sequence_number == self.seq {
                    match m.payload {
                        NetlinkPayload::Done(_) => return Ok(out),
                        NetlinkPayload::Error(e) => {
                            return match e.code {
                                None => Ok(out),
                                Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                            };
                        }
                        NetlinkPayload::InnerMessage(i) => {
                            out.push(i);
                            if flags & NLM_F_DUMP == 0 && flags & NLM_F_ACK == 0 {
                                return Ok(out);
                            }
                        }
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                off += len;
            }
        }
    }

    /// Where the kernel sends packets for `dst`: (interface, neighbour:
    /// the gateway, or `dst` itself on-link). `None`: no route, or a
    /// local/unreachable one.
    pub fn route_to(&mut self, dst: IpAddr) -> io::Result<Option<Neighbour>> {
        let mut m = RouteMessage::default();
        m.header.address_family = if dst.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        m.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
        m.attributes.push(RouteAttribute::Destination(dst.into()));
        let answers = match self.request(RouteNetlinkMessage::GetRoute(m), 0) {
            Ok(a) => a,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH)) => return Ok(None),
            Err(e) => return Err(e),
        };
        for a in answers {
            if let RouteNetlinkMessage::NewRoute(r) = a {
                if r.header.kind != RouteType::Unicast {
                    return Ok(None);
                }
                let (oif, gw) = oif_and_gateway(&r.attributes);
                return Ok(oif.map(|ifindex| Neighbour { ifindex, addr: gw.unwrap_or(dst) }));
            }
        }
        Ok(None)
    }

    /// The gateways of the main table's routes (IPv4 and IPv6, multipath
    /// included), with their interfaces.
    pub fn gateways(&mut self) -> io::Result<BTreeSet<Neighbour>> {
        let mut out = BTreeSet::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut m = RouteMessage::default();
            m.header.address_family = family;
            for a in self.request(RouteNetlinkMessage::GetRoute(m), NLM_F_DUMP)? {
                let RouteNetlinkMessage::NewRoute(r) = a else { continue };
                if r.header.table != RouteHeader::RT_TABLE_MAIN || r.header.kind != RouteType::Unicast {
                    continue;
                }
                let (oif, gw) = oif_and_gateway(&r.attributes);
                if let (Some(ifindex), Some(addr)) = (oif, gw) {
                    out.insert(Neighbour { ifindex, addr });
                }
                for a in &r.attributes {
                    if let RouteAttribute::MultiPath(hops) = a {
                        for h in hops {
                            if let (_, Some(addr)) = oif_and_gateway(&h.attributes) {
                                out.insert(Neighbour { ifindex: h.interface_index, addr });
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Makes `n` a managed neighbour (created unresolved, or an existing
    /// entry converted in place: a resolved one stays resolved).
    pub fn manage(&mut self, n: &Neighbour) -> io::Result<()> {
        let mut m = NeighbourMessage::default();
        m.header.family = if n.addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        m.header.ifindex = n.ifindex;
        m.header.state = NeighbourState::None;
        m.header.flags = NeighbourFlags::ExtLearned;
        m.attributes.push(NeighbourAttribute::Destination(neighbour_address(n.addr)));
        m.attributes.push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        self.request(RouteNetlinkMessage::NewNeighbour(m), NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE).map(drop)
    }

    /// Removes a neighbour entry (the kernel learns it again when needed).
    pub fn forget(&mut self, n: &Neighbour) -> io::Result<()> {
        let mut m = NeighbourMessage::default();
        m.header.family = if n.addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        m.header.ifindex = n.ifindex;
        m.attributes.push(NeighbourAttribute::Destination(neighbour_address(n.addr)));
        match self.request(RouteNetlinkMessage::DelNeighbour(m), NLM_F_ACK) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENODEV)) => Ok(()),
            other => other.map(drop),
        }
    }
}

fn neighbour_address(a: IpAddr) -> NeighbourAddress {
    match a {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}

fn oif_and_gateway(attrs: &[RouteAttribute]) -> (Option<u32>, Option<IpAddr>) {
    let mut oif = None;
    let mut gw = None;
    for a in attrs {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(v4)) => gw = Some(IpAddr::V4(*v4)),
            RouteAttribute::Gateway(RouteAddress::Inet6(v6)) => gw = Some(IpAddr::V6(*v6)),
            _ => {}
        }
    }
    (oif, gw)
}

/// The neighbours to keep resolved: the next hop of every backend, and
/// every route's gateway, where the interface is one the data plane
/// forwards on.
pub fn wanted(nl: &mut Netlink, backends: &[IpAddr], ifindexes: &[u32]) -> io::Result<BTreeSet<Neighbour>> {
    let mut out: BTreeSet<Neighbour> = nl.gateways()?.into_iter().filter(|n| ifindexes.contains(&n.ifindex)).collect();
    for b in backends {
        if let Some(n) = nl.route_to(*b)?
            && ifindexes.contains(&n.ifindex)
        {
            out.insert(n);
        }
    }
    Ok(out)
}

/// Makes the managed set equal `want`: new ones managed, ones no longer
/// wanted forgotten. `ours` is what this daemon manages (updated; saved in
/// the state file so a restart or `xlb detach` can clean up). Failures are
/// logged, not fatal: the kernel path still works without them.
pub fn reconcile(nl: &mut Netlink, ours: &mut BTreeSet<Neighbour>, want: &BTreeSet<Neighbour>) {
    for n in want.difference(&ours.clone()) {
        match nl.manage(n) {
            Ok(()) => {
                tracing::info!(ifindex = n.ifindex, addr = %n.addr, "next hop kept resolved (managed neighbour)");
                ours.insert(n.clone());
            }
            Err(e) => {
                tracing::warn!(ifindex = n.ifindex, addr = %n.addr, error = %e, "making a next hop a managed neighbour failed (the kernel resolves it on demand instead)")
            }
        }
    }
    for n in ours.clone().difference(want) {
        if let Err(e) = nl.forget(n) {
            tracing::warn!(ifindex = n.ifindex, addr = %n.addr, error = %e, "removing a managed neighbour failed");
        }
        tracing::debug!(ifindex = n.ifindex, addr = %n.addr, "next hop no longer managed");
        ours.remove(n);
    }
}

/// Forgets every neighbour in `ours` (detach).
pub fn forget_all(ours: &BTreeSet<Neighbour>) {
    let Ok(mut nl) = Netlink::open() else { return };
    for n in ours {
        if let Err(e) = nl.forget(n) {
            tracing::warn!(ifindex = n.ifindex, addr = %n.addr, error = %e, "removing a managed neighbour failed");
        }
    }
}
