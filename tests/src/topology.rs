//! The standard test topology:
//!
//! ```text
//!  client ns              lb ns (xlb attached to l0, l1..lN)            backend ns i
//!  c0 10.0.0.2/24 ──veth── l0 10.0.0.1/24                               
//!                          li 10.1.i.1/24 ───────────────veth─────────── b0 10.1.i.2/24
//!                          lo: VIP 10.99.0.1/32
//! ```
//!
//! The client routes everything via the lb; backends route via the lb
//! (DNAT mode needs their replies to come back through it). The peer ends
//! (c0, b0) run a pass-only XDP program: a veth in native XDP mode delivers
//! redirected/XDP_TX frames only when its peer has one. Senders have TX
//! checksum offload off so frames reaching XDP carry full checksums, as
//! frames from a real NIC do.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use anyhow::Context as _;
use xlb::dataplane::{Dataplane, LoadOptions};

use crate::netns::{Netns, in_netns, unique_prefix};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub const LB_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

pub struct TopologyOptions {
    pub backends: usize,
}

pub struct Topology {
    /// Holds the pass programs on the peer ends (dropping detaches them);
    /// first, so they go before the namespaces do.
    _peers: Vec<Dataplane>,
    pub prefix: String,
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Netns>,
    /// Interfaces in the lb namespace xlb attaches to.
    pub lb_ifaces: Vec<String>,
}

/// Address of backend `i` (0-based).
pub fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, (i + 1) as u8, 2)
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
        let mut topo = Topology { _peers: Vec::new(), prefix, client, lb, backends, lb_ifaces: Vec::new() };
        topo.wire().context("building the test topology")?;
        Ok(topo)
    }

    fn wire(&mut self) -> anyhow::Result<()> {
        let lb = &self.lb;
        lb.sysctl("net.ipv4.ip_forward", "1")?;
        lb.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
        // Client link.
        lb.ip(&["link", "add", "l0", "type", "veth", "peer", "name", "c0", "netns", &self.client.name])?;
        lb.ip(&["addr", "add", &format!("{LB_CLIENT_SIDE}/24"), "dev", "l0"])?;
        lb.ip(&["link", "set", "l0", "up"])?;
        self.client.ip(&["addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "c0"])?;
        self.client.ip(&["link", "set", "c0", "up"])?;
        self.client.ip(&["route", "add", "default", "via", &LB_CLIENT_SIDE.to_string()])?;
        self.lb_ifaces.push("l0".into());
        // One link per backend.
        for (i, b) in self.backends.iter().enumerate() {
            let l = format!("l{}", i + 1);
            let gw = Ipv4Addr::new(10, 1, (i + 1) as u8, 1);
            lb.ip(&["link", "add", &l, "type", "veth", "peer", "name", "b0", "netns", &b.name])?;
            lb.ip(&["addr", "add", &format!("{gw}/24"), "dev", &l])?;
            lb.ip(&["link", "set", &l, "up"])?;
            b.ip(&["addr", "add", &format!("{}/24", backend_addr(i)), "dev", "b0"])?;
            b.ip(&["link", "set", "b0", "up"])?;
            b.ip(&["route", "add", "default", "via", &gw.to_string()])?;
            self.lb_ifaces.push(l);
        }
        // Full checksums on the wire (see the module doc).
        self.client.exec("ethtool", &["-K", "c0", "tx", "off"])?;
        for b in &self.backends {
            b.exec("ethtool", &["-K", "b0", "tx", "off"])?;
        }
        for l in &self.lb_ifaces {
            lb.exec("ethtool", &["-K", l, "tx", "off"])?;
        }
        // Pass programs on the peer ends.
        let mut peers: Vec<(&Netns, &str)> = vec![(&self.client, "c0")];
        peers.extend(self.backends.iter().map(|b| (b, "b0")));
        for (ns, iface) in peers {
            let mut dp = Dataplane::load(LoadOptions { conn_capacity: 1, half_open_capacity: Some(1), pin_dir: None })?;
            in_netns(&ns.name, || -> anyhow::Result<()> {
                let idx = xlb::dataplane::ifindex(iface)?;
                dp.attach_pass(idx)?;
                Ok(())
            })??;
            self._peers.push(dp);
        }
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
        SocketAddrV4::new(backend_addr(i), port)
    }

    /// A TCP name server on `port` in every backend namespace, named b0, b1...
    pub fn tcp_servers(&self, port: u16) -> anyhow::Result<Vec<crate::TcpNameServer>> {
        self.backends
            .iter()
            .enumerate()
            .map(|(i, b)| crate::TcpNameServer::start(&b.name, &format!("b{i}"), SocketAddr::from(([0, 0, 0, 0], port))))
            .collect()
    }

    /// A UDP name server on `port` in every backend namespace, named b0, b1...
    pub fn udp_servers(&self, port: u16) -> anyhow::Result<Vec<crate::UdpNameServer>> {
        self.backends
            .iter()
            .enumerate()
            .map(|(i, b)| crate::UdpNameServer::start(&b.name, &format!("b{i}"), SocketAddr::from(([0, 0, 0, 0], port))))
            .collect()
    }
}
