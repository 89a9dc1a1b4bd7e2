//! An active/standby pair: two balancer namespaces on the same two links
//! (bridges in a switch namespace), keepalived (VRRP) moving the client
//! side's gateway and the backends' gateway between them.
//!
//! ```text
//!  client 10.0.0.2 ─┐                        ┌─ backend0 10.1.0.2
//!                   ├─ br-c ─┬─ lbA .11 ─┬─ br-b ─┤
//!   gateway 10.0.0.1 (VRRP)  └─ lbB .12 ─┘   gateway 10.1.0.1 (VRRP)
//!                                                 └─ backend1 10.1.0.3
//!  VIP 10.99.0.1 on both balancers' lo; the client routes it via 10.0.0.1.
//! ```
//!
//! Each balancer runs `xlb daemon` (generic XDP on its two links, state
//! sync with the other) and keepalived with `xlb health` as its track
//! script and `xlb role` as its notify hook.

use std::{
    net::{Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{Daemon, Netns, daemon::xlb_bin, in_netns, netns::unique_prefix, wait_for};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const SYNC_PORT: u16 = 7946;
/// The pair's shared sync key (both daemons' key file).
pub const SYNC_KEY: &[u8] = b"a shared pair secret, 32 bytes!!";

pub struct Node {
    pub ns: Netns,
    pub daemon: Option<Daemon>,
    keepalived: Option<Child>,
    /// Its address on the client link and on the backend link.
    pub client_side: Ipv4Addr,
    pub backend_side: Ipv4Addr,
    dir: std::path::PathBuf,
}

impl Node {
    /// Stops keepalived (its VRRP adverts stop: the peer takes over).
    pub fn stop_keepalived(&mut self) {
        if let Some(mut k) = self.keepalived.take() {
            let _ = k.kill();
            let _ = k.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_keepalived();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct Pair {
    // Dropped first: processes before namespaces.
    pub nodes: Vec<Node>,
    pub client: Netns,
    pub backends: Vec<Netns>,
    pub switch: Netns,
}

pub fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, 2 + i as u8)
}

impl Pair {
    pub fn new(backends: usize) -> anyhow::Result<Pair> {
        let prefix = unique_prefix();
        let switch = Netns::new(&format!("{prefix}-sw"))?;
        let client = Netns::new(&format!("{prefix}-c"))?;
        let mut pair = Pair { nodes: Vec::new(), client, backends: Vec::new(), switch };
        for i in 0..backends {
            pair.backends.push(Netns::new(&format!("{prefix}-b{i}"))?);
        }
        for br in ["brc", "brb"] {
            pair.switch.ip(&["link", "add", br, "type", "bridge"])?;
            pair.switch.ip(&["link", "set", br, "up"])?;
        }
        pair.plug(&pair.client, "c0", "pc", "brc", &format!("{CLIENT}/24"))?;
        pair.client.ip(&["route", "add", "default", "via", "10.0.0.1"])?;
        for i in 0..backends {
            let b = &pair.backends[i];
            pair.plug(b, "s0", &format!("ps{i}"), "brb", &format!("{}/24", backend_addr(i)))?;
            b.ip(&["route", "add", "default", "via", "10.1.0.1"])?;
        }
        for (n, name) in ["a", "b"].iter().enumerate() {
            let ns = Netns::new(&format!("{prefix}-lb{name}"))?;
            let (cs, bs) = (Ipv4Addr::new(10, 0, 0, 11 + n as u8), Ipv4Addr::new(10, 1, 0, 11 + n as u8));
            pair.plug(&ns, "xc", &format!("p{name}c"), "brc", &format!("{cs}/24"))?;
            pair.plug(&ns, "xb", &format!("p{name}b"), "brb", &format!("{bs}/24"))?;
            ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            let dir = std::env::temp_dir().join(format!("{prefix}-ha-{name}"));
            std::fs::create_dir_all(&dir)?;
            pair.nodes.push(Node { ns, daemon: None, keepalived: None, client_side: cs, backend_side: bs, dir });
        }
        Ok(pair)
    }

    /// A veth from `ns` (named `inside`, address `addr`) to a port of `bridge`.
    fn plug(&self, ns: &Netns, inside: &str, port: &str, bridge: &str, addr: &str) -> anyhow::Result<()> {
        self.switch.ip(&["link", "add", port, "type", "veth", "peer", "name", inside, "netns", &ns.name])?;
        self.switch.ip(&["link", "set", port, "master", bridge])?;
        self.switch.ip(&["link", "set", port, "up"])?;
        ns.ip(&["addr", "add", addr, "dev", inside])?;
        ns.ip(&["link", "set", inside, "up"])?;
        Ok(())
    }

    /// Starts node `i`'s daemon (state sync with the other node).
    pub fn start_daemon(&mut self, i: usize, extra: &[&str]) -> anyhow::Result<()> {
        let peer = &self.nodes[1 - i];
        let peer_addr = SocketAddr::new(peer.backend_side.into(), SYNC_PORT).to_string();
        let node = &self.nodes[i];
        let key = node.dir.join("sync.key");
        std::fs::write(&key, SYNC_KEY)?;
        let listen = SocketAddr::new(node.backend_side.into(), SYNC_PORT).to_string();
        let mut args = vec!["--xdp-mode", "generic", "--sync-listen", &listen, "--sync-peer", &peer_addr, "--sync-key-file", key.to_str().context("path")?];
        args.extend_from_slice(extra);
        let d = Daemon::start(&node.ns, &["xc".to_string(), "xb".to_string()], &args)?;
        self.nodes[i].daemon = Some(d);
        Ok(())
    }

    /// Starts keepalived on node `i`: one VRRP instance owning both
    /// gateways, tracking `xlb health`, calling `xlb role` on transitions.
    pub fn start_keepalived(&mut self, i: usize, priority: u8) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        let peer = &self.nodes[1 - i];
        let sock = node.daemon.as_ref().context("start the daemon first")?.socket.clone();
        let xlb = format!("{} --socket {}", xlb_bin().display(), sock.display());
        let conf = node.dir.join("keepalived.conf");
        std::fs::write(
            &conf,
            format!(
                "global_defs {{\n  script_user root\n}}\n\
                 vrrp_script xlb_health {{\n  script \"{xlb} health\"\n  interval 1\n  timeout 1\n  fall 1\n  rise 1\n}}\n\
                 vrrp_instance lb {{\n  state BACKUP\n  interface xc\n  virtual_router_id 51\n  priority {priority}\n  advert_int 1\n  nopreempt\n\
                   unicast_src_ip {me}\n  unicast_peer {{\n    {peer}\n  }}\n\
                   virtual_ipaddress {{\n    10.0.0.1/24 dev xc\n    10.1.0.1/24 dev xb\n  }}\n\
                   track_script {{\n    xlb_health\n  }}\n\
                   notify_master \"{xlb} role master\"\n  notify_backup \"{xlb} role backup\"\n  notify_fault \"{xlb} role backup\"\n}}\n",
                me = node.client_side,
                peer = peer.client_side,
            ),
        )?;
        let pid = |n: &str| node.dir.join(n).to_string_lossy().into_owned();
        let child = Command::new("nsenter")
            .arg(format!("--net={}", node.ns.path()))
            .args(["keepalived", "--dont-fork", "--log-console", "--vrrp", "-f"])
            .arg(&conf)
            .args(["-p", &pid("k.pid"), "-r", &pid("v.pid"), "-c", &pid("c.pid")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting keepalived (installed by `cargo xtask setup`)")?;
        self.nodes[i].keepalived = Some(child);
        Ok(())
    }

    /// The node whose daemon says it is master, waiting up to `timeout`.
    pub fn wait_master(&self, timeout: Duration) -> anyhow::Result<usize> {
        wait_for("a master", timeout, || {
            self.nodes.iter().position(|n| {
                n.daemon.as_ref().and_then(|d| d.json(&["status"]).ok()).is_some_and(|s| s["sync"]["role"] == "master")
                    && n.ns.ip(&["-4", "addr", "show", "dev", "xc"]).is_ok_and(|o| o.contains("10.0.0.1/24"))
            })
        })
    }

    /// The payload of the next sync datagram node `at` receives from its
    /// peer, as seen on its link (the daemon gets it too), within `timeout`.
    pub fn capture_sync_datagram(&self, at: usize, timeout: Duration) -> anyhow::Result<Vec<u8>> {
        let from = self.nodes[1 - at].backend_side.octets();
        in_netns(&self.nodes[at].ns.name, move || -> anyhow::Result<Vec<u8>> {
            // SAFETY: plain socket(2); the fd is owned below.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from((libc::ETH_P_IP as u16).to_be())) };
            if fd < 0 {
                bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
            }
            // SAFETY: a fresh fd we own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
            // SAFETY: a valid timeval of the size given.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            let deadline = Instant::now() + timeout;
            let mut buf = [0u8; 2048];
            while Instant::now() < deadline {
                // SAFETY: the buffer is ours and its length is given.
                let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                let Ok(n) = usize::try_from(n) else { continue };
                let p = &buf[..n];
                if p.len() < 28 || p[0] >> 4 != 4 || p[9] != 17 || p[12..16] != from {
                    continue;
                }
                let ihl = usize::from(p[0] & 15) * 4;
                if p.len() >= ihl + 8 && u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]) == SYNC_PORT {
                    return Ok(p[ihl + 8..].to_vec());
                }
            }
            bail!("no sync datagram from the peer within {timeout:?}")
        })?
    }

    /// Sends `payload` to node `1 - from`'s sync port from node `from`'s
    /// address (any port: the peer check is by address), as a replay or a
    /// forgery would arrive.
    pub fn send_sync_as(&self, from: usize, payload: &[u8]) -> anyhow::Result<()> {
        let src = self.nodes[from].backend_side;
        let dst = SocketAddr::new(self.nodes[1 - from].backend_side.into(), SYNC_PORT);
        in_netns(&self.nodes[from].ns.name, || -> anyhow::Result<()> {
            let sock = std::net::UdpSocket::bind((src, 0)).context("binding a UDP socket")?;
            sock.send_to(payload, dst).context("sending")?;
            Ok(())
        })?
    }

    /// Runs `xlb ARGS` against both daemons.
    pub fn both(&self, args: &[&str]) -> anyhow::Result<()> {
        for n in &self.nodes {
            n.daemon.as_ref().context("daemon")?.ok(args)?;
        }
        Ok(())
    }
}
