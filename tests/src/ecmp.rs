//! Active/active behind ECMP: a router namespace running BIRD (BGP) with
//! Linux multipath routes (L4 hash) to two xlb nodes in DSR mode, which
//! announce the VIP through their own BIRD while their data plane is up.
//!
//! ```text
//!  client 10.0.0.2 ── router 10.0.0.1 | 10.2.0.1 ──┬── fabric bridge ──┬─ lbA 10.2.0.11 (xlb + BIRD)
//!                     BIRD, ECMP to the VIP        │                   ├─ lbB 10.2.0.12 (xlb + BIRD)
//!                                                   │                   ├─ backend0 10.2.0.2 (decap, VIP on lo)
//!                                                   └───────────────────┴─ backend1 10.2.0.3
//! ```
//!
//! Backends answer clients directly through the router (DSR).

use std::{net::Ipv4Addr, path::PathBuf, process::Command};

use anyhow::Context as _;

use crate::{
    Daemon, Netns,
    daemon::xlb_bin,
    netns::{Spawned, unique_prefix},
};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

pub fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 2, 0, 2 + i as u8)
}

pub fn lb_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 2, 0, 11 + i as u8)
}

pub struct LbNode {
    pub ns: Netns,
    pub daemon: Option<Daemon>,
    _bird: Option<Spawned>,
    pub bird_socket: PathBuf,
    pub include: PathBuf,
}

pub struct Fabric {
    pub lbs: Vec<LbNode>,
    _router_bird: Option<Spawned>,
    pub router_bird_socket: PathBuf,
    pub client: Netns,
    pub router: Netns,
    pub backends: Vec<Netns>,
    pub switch: Netns,
    dir: PathBuf,
}

impl Drop for Fabric {
    fn drop(&mut self) {
        self.tear_down_backends();
        for lb in &mut self.lbs {
            lb.daemon.take();
            lb._bird.take();
        }
        self._router_bird.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Fabric {
    pub fn new(backends: usize) -> anyhow::Result<Fabric> {
        let prefix = unique_prefix();
        let dir = std::env::temp_dir().join(format!("{prefix}-ecmp"));
        std::fs::create_dir_all(&dir)?;
        let switch = Netns::new(&format!("{prefix}-sw"))?;
        let client = Netns::new(&format!("{prefix}-c"))?;
        let router = Netns::new(&format!("{prefix}-r"))?;
        let mut f =
            Fabric { lbs: Vec::new(), _router_bird: None, router_bird_socket: dir.join("router.ctl"), client, router, backends: Vec::new(), switch, dir };
        f.switch.ip(&["link", "add", "fab", "type", "bridge"])?;
        f.switch.ip(&["link", "set", "fab", "up"])?;
        // Client ↔ router: a plain veth pair.
        f.router.ip(&["link", "add", "r0", "type", "veth", "peer", "name", "c0", "netns", &f.client.name])?;
        f.router.ip(&["addr", "add", "10.0.0.1/24", "dev", "r0"])?;
        f.router.ip(&["link", "set", "r0", "up"])?;
        f.client.ip(&["addr", "add", "10.0.0.2/24", "dev", "c0"])?;
        f.client.ip(&["link", "set", "c0", "up"])?;
        f.client.ip(&["route", "add", "default", "via", "10.0.0.1"])?;
        // The router is a router (not the balancer: the daemon sets up its own host).
        f.router.sysctl("net.ipv4.ip_forward", "1")?;
        // Flows spread over the multipath route by their 5-tuple.
        f.router.sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;
        f.plug(&f.router, "rf", "pr", "10.2.0.1/24")?;
        for i in 0..backends {
            let b = Netns::new(&format!("{prefix}-b{i}"))?;
            f.plug(&b, "s0", &format!("pb{i}"), &format!("{}/24", backend_addr(i)))?;
            b.ip(&["route", "add", "default", "via", "10.2.0.1"])?;
            f.backends.push(b);
        }
        for i in 0..2 {
            let ns = Netns::new(&format!("{prefix}-lb{i}"))?;
            f.plug(&ns, "xf", &format!("pl{i}"), &format!("{}/24", lb_addr(i)))?;
            // A balancer node's own way to clients (its resets go there).
            ns.ip(&["route", "add", "default", "via", "10.2.0.1"])?;
            ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            let include = f.dir.join(format!("lb{i}-vips.conf"));
            std::fs::write(&include, xlb::ha::bgp::include_text(&[]))?;
            f.lbs.push(LbNode { ns, daemon: None, _bird: None, bird_socket: f.dir.join(format!("lb{i}.ctl")), include });
        }
        Ok(f)
    }

    fn plug(&self, ns: &Netns, inside: &str, port: &str, addr: &str) -> anyhow::Result<()> {
        self.switch.ip(&["link", "add", port, "type", "veth", "peer", "name", inside, "netns", &ns.name])?;
        self.switch.ip(&["link", "set", port, "master", "fab"])?;
        self.switch.ip(&["link", "set", port, "up"])?;
        ns.ip(&["addr", "add", addr, "dev", inside])?;
        ns.ip(&["link", "set", inside, "up"])?;
        Ok(())
    }

    /// Each backend: `xlb backend-setup` (decapsulation, VIP on lo).
    pub fn set_up_backends(&self) -> anyhow::Result<()> {
        for b in &self.backends {
            let pins = self.dir.join(format!("{}-decap", b.name));
            // bpffs is needed for the pinned link: under /sys/fs/bpf.
            let pin_dir = format!("/sys/fs/bpf/{}", pins.file_name().and_then(|n| n.to_str()).unwrap_or("xlb-decap"));
            b.exec(&xlb_bin().to_string_lossy(), &["backend-setup", "--iface", "s0", "--vip", &VIP.to_string(), "--pin-dir", &pin_dir])?;
        }
        Ok(())
    }

    /// Removes the backends' pinned decapsulation links.
    pub fn tear_down_backends(&self) {
        for b in &self.backends {
            let pins = self.dir.join(format!("{}-decap", b.name));
            let pin_dir = format!("/sys/fs/bpf/{}", pins.file_name().and_then(|n| n.to_str()).unwrap_or("xlb-decap"));
            let _ = b.exec(&xlb_bin().to_string_lossy(), &["backend-setup", "--iface", "s0", "--remove", "--pin-dir", &pin_dir]);
            let _ = std::fs::remove_dir(&pin_dir);
        }
    }

    pub fn start_router_bird(&mut self) -> anyhow::Result<()> {
        let conf = self.dir.join("router.conf");
        let mut peers = String::new();
        for i in 0..self.lbs.len() {
            peers.push_str(&format!(
                "protocol bgp lb{i} {{\n  local 10.2.0.1 as 65000;\n  neighbor {} as 65001;\n  hold time 3;\n  connect retry time 1;\n  ipv4 {{ import all; export none; }};\n}}\n",
                lb_addr(i)
            ));
        }
        std::fs::write(
            &conf,
            format!(
                "router id 10.2.0.1;\nprotocol device {{ scan time 1; }}\nprotocol kernel {{\n  merge paths on;\n  ipv4 {{ import none; export all; }};\n}}\n{peers}"
            ),
        )?;
        let sock = self.router_bird_socket.to_string_lossy().into_owned();
        self._router_bird = Some(self.router.spawn("bird", &["-f", "-c", conf.to_str().context("path")?, "-s", &sock, "-P", &format!("{sock}.pid")])?);
        Ok(())
    }

    pub fn start_lb_bird(&mut self, i: usize) -> anyhow::Result<()> {
        let lb = &self.lbs[i];
        let conf = self.dir.join(format!("lb{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                "router id {me};\nprotocol device {{ scan time 1; }}\ninclude \"{include}\";\n\
                 protocol bgp uplink {{\n  local {me} as 65001;\n  neighbor 10.2.0.1 as 65000;\n  hold time 3;\n  connect retry time 1;\n\
                   ipv4 {{ import none; export where proto = \"xlb_vips\"; next hop self; }};\n}}\n",
                me = lb_addr(i),
                include = lb.include.display()
            ),
        )?;
        let sock = lb.bird_socket.to_string_lossy().into_owned();
        let p = lb.ns.spawn("bird", &["-f", "-c", conf.to_str().context("path")?, "-s", &sock, "-P", &format!("{sock}.pid")])?;
        self.lbs[i]._bird = Some(p);
        Ok(())
    }

    /// Starts node `i`'s daemon (generic XDP on the fabric link, BIRD
    /// announcing the VIP while it runs).
    pub fn start_daemon(&mut self, i: usize) -> anyhow::Result<()> {
        let lb = &self.lbs[i];
        let (include, sock) = (lb.include.to_string_lossy().into_owned(), lb.bird_socket.to_string_lossy().into_owned());
        // One flow-hash key for the cluster: either node schedules a flow
        // it never saw where the other did.
        let key = self.dir.join("flow-hash.key");
        std::fs::write(&key, "000102030405060708090a0b0c0d0e0f\n")?;
        let key = key.to_string_lossy().into_owned();
        let d = Daemon::start(
            &lb.ns,
            &["xf".to_string()],
            &["--xdp-mode", "generic", "--bird-include", &include, "--bird-socket", &sock, "--withdraw-grace", "2s", "--flow-hash-key-file", &key],
        )?;
        self.lbs[i].daemon = Some(d);
        Ok(())
    }

    /// BIRD's and the daemons' view, for failure messages.
    pub fn diagnostics(&self) -> String {
        let birdc = |sock: &PathBuf, what: &[&str]| -> String {
            Command::new("birdc")
                .arg("-s")
                .arg(sock)
                .args(what)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
                .unwrap_or_else(|e| e.to_string())
        };
        let mut out = format!(
            "router protocols:\n{}\nrouter routes:\n{}\nkernel: {}\n",
            birdc(&self.router_bird_socket, &["show", "protocols"]),
            birdc(&self.router_bird_socket, &["show", "route"]),
            self.router.ip(&["route"]).unwrap_or_default()
        );
        for (i, lb) in self.lbs.iter().enumerate() {
            let st = lb.daemon.as_ref().and_then(|d| d.json(&["status"]).ok()).unwrap_or_default();
            let nonzero: Vec<String> = st["counters"]
                .as_object()
                .map(|m| m.iter().filter(|(_, v)| v.as_u64() != Some(0)).map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_default();
            out.push_str(&format!("lb{i} counters: {nonzero:?}\n"));
            let nstat = lb.ns.exec("nstat", &["-az"]).unwrap_or_default();
            let interesting: Vec<&str> = nstat.lines().filter(|l| !l.contains(" 0 ") && !l.contains("Ip6") && !l.contains("Octets")).collect();
            out.push_str(&format!("lb{i} neigh: {}\nlb{i} nstat: {interesting:?}\n", lb.ns.ip(&["neigh"]).unwrap_or_default()));
            out.push_str(&format!(
                "lb{i} include:\n{}\nlb{i} protocols:\n{}\nlb{i} routes:\n{}\nlb{i} daemon log tail:\n{}\n",
                std::fs::read_to_string(&lb.include).unwrap_or_default(),
                birdc(&lb.bird_socket, &["show", "protocols"]),
                birdc(&lb.bird_socket, &["show", "route"]),
                lb.daemon.as_ref().map(|d| d.log_text().lines().rev().take(8).collect::<Vec<_>>().join("\n")).unwrap_or_default()
            ));
        }
        for (i, b) in self.backends.iter().enumerate() {
            out.push_str(&format!("backend{i}: {}\n{}\n", b.ip(&["-s", "link", "show", "s0"]).unwrap_or_default(), b.ip(&["-4", "addr"]).unwrap_or_default()));
        }
        out
    }

    /// The router's next hops for the VIP.
    pub fn next_hops(&self) -> Vec<String> {
        let out = self.router.ip(&["-4", "route", "show", &format!("{VIP}/32")]).unwrap_or_default();
        out.split_whitespace().collect::<Vec<_>>().windows(2).filter(|w| w[0] == "via").map(|w| w[1].to_owned()).collect()
    }
}
