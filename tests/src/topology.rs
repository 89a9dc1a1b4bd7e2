//! The standard test topology, dual-stack:
//!
//! ```text
//!  client ns              lb ns (xlb attached to l0, l1..lN)            backend ns i
//!  c0 10.0.0.2/24 ──veth── l0 10.0.0.1/24
//!     fd00::2/64              fd00::1/64
//!                          li 10.1.i.1/24 ───────────────veth─────────── b0 10.1.i.2/24
//!                             fd01:i::1/64                                  fd01:i::2/64
//!                          lo: VIP 10.99.0.1/32, fd99::1/128
//! ```
//!
//! or, `switched`, the backends behind a Linux bridge on one subnet, as
//! real backends sit behind a switch:
//!
//! ```text
//!                          l1 10.1.0.1/24 ──veth── sl ┐
//!                             fd01::1/64              ├ br0 (switch ns) ┬─ pb0 ── b0 10.1.0.2/24, fd01::2
//!                                                     │                 ├─ pb1 ── b0 10.1.0.3/24, fd01::3
//!                                                     ┘                 └─ ...
//! ```
//!
//! The client routes everything via the lb; backends route via the lb
//! (DNAT mode needs their replies to come back through it), unless
//! `isolated_backends`: then backends only know their own link (full-NAT
//! tests: replies can only reach the balancer's address).
//!
//! Everything else is as the kernel makes it: default offloads (senders
//! leave partial checksums, TSO on), default sysctls in every namespace,
//! the balancer's included (the daemon sets what it needs). The one
//! addition is the XDP pass program on the far ends of the veths the
//! balancer sends XDP frames into (c0, b0, the switch port): a veth
//! delivers XDP_TX/redirected frames only when its peer runs NAPI (an XDP
//! program or GRO), a kernel requirement of native XDP on veth that the
//! daemon cannot meet from the balancer's namespace (it logs it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

use anyhow::Context as _;
use xlb::dataplane::KernelDataPlane;

use crate::netns::{Netns, in_netns, unique_prefix};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub const LB_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 1);
pub const CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
pub const LB_CLIENT_SIDE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);

#[derive(Default)]
pub struct TopologyOptions {
    pub backends: usize,
    /// Backends get no route beyond their own link.
    pub isolated_backends: bool,
    /// Backends behind a bridge on one subnet (one balancer link, l1).
    pub switched: bool,
}

pub struct Topology {
    /// Holds the pass programs on the peer ends (dropping detaches them);
    /// first, so they go before the namespaces do.
    _peers: Vec<KernelDataPlane>,
    pub prefix: String,
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Netns>,
    /// The switch namespace of a switched topology.
    pub switch: Option<Netns>,
    /// Interfaces in the lb namespace xlb attaches to.
    pub lb_ifaces: Vec<String>,
    switched: bool,
}

/// Address of backend `i` (0-based).
pub fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, (i + 1) as u8, 2)
}

/// IPv6 address of backend `i` (0-based).
pub fn backend_addr6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd01, (i + 1) as u16, 0, 0, 0, 0, 0, 2)
}

/// Backend `i`'s address in a switched topology (one subnet).
pub fn switched_backend(i: usize, v6: bool) -> IpAddr {
    if v6 { Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 2 + i as u16).into() } else { Ipv4Addr::new(10, 1, 0, 2 + i as u8).into() }
}

/// The any-address of a family, to listen on.
fn unspecified(v6: bool) -> IpAddr {
    if v6 { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() }
}

/// The lb's address on backend `i`'s link.
pub fn lb_backend_side(i: usize, v6: bool) -> IpAddr {
    if v6 { Ipv6Addr::new(0xfd01, (i + 1) as u16, 0, 0, 0, 0, 0, 1).into() } else { Ipv4Addr::new(10, 1, (i + 1) as u8, 1).into() }
}

impl Topology {
    pub fn new(opts: TopologyOptions) -> anyhow::Result<Topology> {
        let prefix = unique_prefix();
        let client = Netns::new(&format!("{prefix}-c"))?;
        let lb = Netns::new(&format!("{prefix}-lb"))?;
        let mut backends = Vec::new();
        for i in 0..opts.backends {
            backends.push(Netns::new(&format!("{prefix}-b{i}"))?);
        }
        let switch = if opts.switched { Some(Netns::new(&format!("{prefix}-sw"))?) } else { None };
        let mut topo = Topology { _peers: Vec::new(), prefix, client, lb, backends, switch, lb_ifaces: Vec::new(), switched: opts.switched };
        topo.wire(opts.isolated_backends).context("building the test topology")?;
        Ok(topo)
    }

    fn wire(&mut self, isolated_backends: bool) -> anyhow::Result<()> {
        let lb = &self.lb;
        lb.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
        lb.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo"])?;
        // Client link. IPv6 addresses skip duplicate address detection:
        // usable at once, and nothing else shares these links.
        lb.ip(&["link", "add", "l0", "type", "veth", "peer", "name", "c0", "netns", &self.client.name])?;
        lb.ip(&["addr", "add", &format!("{LB_CLIENT_SIDE}/24"), "dev", "l0"])?;
        lb.ip(&["addr", "add", &format!("{LB_CLIENT_SIDE6}/64"), "dev", "l0", "nodad"])?;
        lb.ip(&["link", "set", "l0", "up"])?;
        self.client.ip(&["addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "c0"])?;
        self.client.ip(&["addr", "add", &format!("{CLIENT_ADDR6}/64"), "dev", "c0", "nodad"])?;
        self.client.ip(&["link", "set", "c0", "up"])?;
        self.client.ip(&["route", "add", "default", "via", &LB_CLIENT_SIDE.to_string()])?;
        // `onlink`: the gateway's connected route may not be installed yet
        // right after the link comes up (IPv6 adds it asynchronously).
        self.client.ip(&["-6", "route", "add", "default", "via", &LB_CLIENT_SIDE6.to_string(), "dev", "c0", "onlink"])?;
        self.lb_ifaces.push("l0".into());
        if let Some(sw) = &self.switch {
            // One link to a bridge, the backends on its other ports.
            sw.ip(&["link", "add", "br0", "type", "bridge"])?;
            sw.ip(&["link", "set", "br0", "up"])?;
            lb.ip(&["link", "add", "l1", "type", "veth", "peer", "name", "sl", "netns", &sw.name])?;
            sw.ip(&["link", "set", "sl", "master", "br0"])?;
            sw.ip(&["link", "set", "sl", "up"])?;
            lb.ip(&["addr", "add", "10.1.0.1/24", "dev", "l1"])?;
            lb.ip(&["addr", "add", "fd01::1/64", "dev", "l1", "nodad"])?;
            lb.ip(&["link", "set", "l1", "up"])?;
            for (i, b) in self.backends.iter().enumerate() {
                let port = format!("pb{i}");
                sw.ip(&["link", "add", &port, "type", "veth", "peer", "name", "b0", "netns", &b.name])?;
                sw.ip(&["link", "set", &port, "master", "br0"])?;
                sw.ip(&["link", "set", &port, "up"])?;
                b.ip(&["addr", "add", &format!("{}/24", switched_backend(i, false)), "dev", "b0"])?;
                b.ip(&["addr", "add", &format!("{}/64", switched_backend(i, true)), "dev", "b0", "nodad"])?;
                b.ip(&["link", "set", "b0", "up"])?;
                if !isolated_backends {
                    b.ip(&["route", "add", "default", "via", "10.1.0.1"])?;
                    b.ip(&["-6", "route", "add", "default", "via", "fd01::1", "dev", "b0", "onlink"])?;
                }
            }
            self.lb_ifaces.push("l1".into());
        } else {
            // One link per backend.
            for i in 0..self.backends.len() {
                self.backend_link(i, isolated_backends)?;
                self.lb_ifaces.push(format!("l{}", i + 1));
            }
        }
        // Pass programs on the far ends of the veths the balancer sends
        // XDP frames into (see the module doc).
        let mut peers: Vec<(&Netns, &str)> = vec![(&self.client, "c0")];
        match &self.switch {
            Some(sw) => peers.push((sw, "sl")),
            None => peers.extend(self.backends.iter().map(|b| (b, "b0"))),
        }
        for (ns, iface) in peers {
            let mut dp = KernelDataPlane::load_pass_only()?;
            in_netns(&ns.name, || -> anyhow::Result<()> {
                let idx = xlb::dataplane::ifindex(iface)?;
                dp.attach_pass(idx)?;
                Ok(())
            })??;
            self._peers.push(dp);
        }
        Ok(())
    }

    /// Backend `i`'s own link (routed topology): `l{i+1}` ↔ its `b0`.
    fn backend_link(&self, i: usize, isolated: bool) -> anyhow::Result<()> {
        let (lb, b) = (&self.lb, &self.backends[i]);
        let l = format!("l{}", i + 1);
        let (gw, gw6) = (lb_backend_side(i, false), lb_backend_side(i, true));
        lb.ip(&["link", "add", &l, "type", "veth", "peer", "name", "b0", "netns", &b.name])?;
        lb.ip(&["addr", "add", &format!("{gw}/24"), "dev", &l])?;
        lb.ip(&["addr", "add", &format!("{gw6}/64"), "dev", &l, "nodad"])?;
        lb.ip(&["link", "set", &l, "up"])?;
        b.ip(&["addr", "add", &format!("{}/24", backend_addr(i)), "dev", "b0"])?;
        b.ip(&["addr", "add", &format!("{}/64", backend_addr6(i)), "dev", "b0", "nodad"])?;
        b.ip(&["link", "set", "b0", "up"])?;
        if !isolated {
            b.ip(&["route", "add", "default", "via", &gw.to_string()])?;
            b.ip(&["-6", "route", "add", "default", "via", &gw6.to_string(), "dev", "b0", "onlink"])?;
        }
        Ok(())
    }

    /// Deletes backend `i`'s link and makes it again (same names and
    /// addresses, new interfaces): what a container restart or a driver
    /// reload does to a balancer's interface.
    pub fn recreate_backend_link(&mut self, i: usize) -> anyhow::Result<()> {
        anyhow::ensure!(!self.switched, "a switched topology has one backend link");
        self.lb.ip(&["link", "del", &format!("l{}", i + 1)])?;
        self.backend_link(i, false)?;
        let mut dp = KernelDataPlane::load_pass_only()?;
        in_netns(&self.backends[i].name, || -> anyhow::Result<()> {
            dp.attach_pass(xlb::dataplane::ifindex("b0")?)?;
            Ok(())
        })??;
        self._peers.push(dp);
        Ok(())
    }

    /// `VIP:port`.
    pub fn vip(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(VIP, port)
    }

    pub fn vip_sock(&self, port: u16) -> SocketAddr {
        SocketAddr::V4(self.vip(port))
    }

    pub fn backend(&self, i: usize, port: u16) -> SocketAddrV4 {
        match self.backend_ip(i, false) {
            IpAddr::V4(v4) => SocketAddrV4::new(v4, port),
            IpAddr::V6(_) => unreachable!("an IPv4 address"),
        }
    }

    /// Backend `i`'s address of either family.
    pub fn backend_ip(&self, i: usize, v6: bool) -> IpAddr {
        match (self.switched, v6) {
            (true, _) => switched_backend(i, v6),
            (false, false) => backend_addr(i).into(),
            (false, true) => backend_addr6(i).into(),
        }
    }

    /// The lb's address on backend `i`'s link.
    pub fn lb_backend_side(&self, i: usize, v6: bool) -> IpAddr {
        match (self.switched, v6) {
            (true, false) => Ipv4Addr::new(10, 1, 0, 1).into(),
            (true, true) => Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 1).into(),
            (false, _) => lb_backend_side(i, v6),
        }
    }

    /// `VIP:port` of either family.
    pub fn vip_of(&self, v6: bool, port: u16) -> SocketAddr {
        if v6 { SocketAddr::new(VIP6.into(), port) } else { self.vip_sock(port) }
    }

    /// Backend `i`'s `addr:port` of either family.
    pub fn backend_of(&self, v6: bool, i: usize, port: u16) -> SocketAddr {
        SocketAddr::new(self.backend_ip(i, v6), port)
    }

    /// The client's address of either family.
    pub fn client_addr(v6: bool) -> IpAddr {
        if v6 { CLIENT_ADDR6.into() } else { CLIENT_ADDR.into() }
    }

    /// TCP name servers listening on `port` of one family only (so the
    /// addresses they record are that family's, not IPv4-mapped).
    pub fn tcp_servers_of(&self, v6: bool, port: u16) -> anyhow::Result<Vec<crate::TcpNameServer>> {
        let any = unspecified(v6);
        self.backends.iter().enumerate().map(|(i, b)| crate::TcpNameServer::start(&b.name, &format!("b{i}"), SocketAddr::new(any, port))).collect()
    }

    /// A TCP name server on `port` in every backend namespace, named b0, b1...
    pub fn tcp_servers(&self, port: u16) -> anyhow::Result<Vec<crate::TcpNameServer>> {
        self.tcp_servers_of(false, port)
    }

    /// A UDP name server on `port` in every backend namespace, named b0, b1...
    pub fn udp_servers(&self, port: u16) -> anyhow::Result<Vec<crate::UdpNameServer>> {
        self.udp_servers_of(false, port)
    }

    /// UDP name servers on `port` of one family.
    pub fn udp_servers_of(&self, v6: bool, port: u16) -> anyhow::Result<Vec<crate::UdpNameServer>> {
        let any = unspecified(v6);
        self.backends.iter().enumerate().map(|(i, b)| crate::UdpNameServer::start(&b.name, &format!("b{i}"), SocketAddr::new(any, port))).collect()
    }
}
