//! `cargo xtask bench` (second part): xlb against the alternatives, end to
//! end, in one run, on one topology (client ns → lb ns → two backend ns,
//! real kernel TCP/UDP, nginx on the backends).
//!
//! Peers, each set up in the lb namespace and torn down before the next:
//! - `route`: plain routing through the lb namespace to backend 0 (the
//!   floor: no balancing at all);
//! - `xlb-native`, `xlb-generic`: the daemon in each XDP mode;
//! - `nftables`: kernel conntrack DNAT with round robin (`numgen inc`), what
//!   a firewall balancer does;
//! - `haproxy`: HAProxy in TCP mode, a userspace proxy (no UDP).
//!
//! Measurements per peer: HTTP keep-alive requests/s and p99 (wrk), new
//! connections/s (wrk, `Connection: close`), UDP 64-byte datagrams/s
//! delivered to the backends (a bounded blast from the client), single-flow
//! TCP throughput (iperf3), softirq CPU per million UDP datagrams (host-wide
//! /proc/stat: namespaces share CPUs, so this counts every side's softirq
//! work, the same for every peer) and the per-backend split of 200 requests.
//! Rounds are interleaved (A B C ... A B C ...); medians and spreads are
//! printed with ratios of xlb to each peer; JSON goes to
//! target/bench/e2e.json. Every load runs for a fixed, short time.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use testbed::{Daemon, Netns, Topology, TopologyOptions, in_netns, netns::Spawned as Proc, topology::backend_addr, wait_for};

const ROUNDS: usize = 3;
const HTTP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;
const IPERF_PORT: u16 = 5201;
const LOAD: Duration = Duration::from_secs(4);

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Peer {
    Route,
    XlbNative,
    XlbGeneric,
    Nftables,
    Haproxy,
}

impl Peer {
    const ALL: [Peer; 5] = [Peer::Route, Peer::XlbNative, Peer::XlbGeneric, Peer::Nftables, Peer::Haproxy];
    fn name(self) -> &'static str {
        match self {
            Peer::Route => "route",
            Peer::XlbNative => "xlb-native",
            Peer::XlbGeneric => "xlb-generic",
            Peer::Nftables => "nftables",
            Peer::Haproxy => "haproxy",
        }
    }
}

/// One round's figures for one peer (`None`: not applicable).
#[derive(Default, Clone, Debug)]
struct Sample {
    keepalive_rps: Option<f64>,
    keepalive_p99_ms: Option<f64>,
    new_conns_per_s: Option<f64>,
    udp_pps: Option<f64>,
    softirq_s_per_mpkt: Option<f64>,
    tcp_gbps: Option<f64>,
    split_max_min: Option<f64>,
}

fn spawn_in(ns: &Netns, prog: &str, args: &[&str]) -> anyhow::Result<Proc> {
    ns.spawn(prog, args)
}

fn output_in(ns: &Netns, prog: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("nsenter").arg(format!("--net={}", ns.path())).arg(prog).args(args).output().with_context(|| format!("running {prog}"))?;
    if !out.status.success() {
        bail!("{prog} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The backends: nginx answering its name on HTTP_PORT, a UDP sink counting
/// datagrams on UDP_PORT, and iperf3 on backend 0.
struct Backends {
    _nginx: Vec<Proc>,
    _iperf: Proc,
    udp_received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    dir: std::path::PathBuf,
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_backends(topo: &Topology) -> anyhow::Result<Backends> {
    let dir = std::env::temp_dir().join(format!("{}-e2e", topo.prefix));
    std::fs::create_dir_all(&dir)?;
    let mut nginx = Vec::new();
    for (i, b) in topo.backends.iter().enumerate() {
        let prefix = dir.join(format!("nginx{i}"));
        std::fs::create_dir_all(prefix.join("logs"))?;
        let conf = prefix.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off; worker_processes 1; pid {p}/nginx.pid; error_log {p}/logs/error.log;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 60s;\n\
                   client_body_temp_path {p}; proxy_temp_path {p}; fastcgi_temp_path {p}; uwsgi_temp_path {p}; scgi_temp_path {p};\n\
                   server {{ listen {HTTP_PORT} reuseport backlog=4096; location / {{ return 200 \"b{i}\\n\"; }} }} }}\n",
                p = prefix.display()
            ),
        )?;
        nginx.push(spawn_in(b, "nginx", &["-c", conf.to_str().context("path")?, "-p", prefix.to_str().context("path")?])?);
    }
    let iperf = spawn_in(&topo.backends[0], "iperf3", &["-s", "-p", &IPERF_PORT.to_string()])?;
    let udp_received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    for b in &topo.backends {
        let sock = in_netns(&b.name, || UdpSocket::bind(("0.0.0.0", UDP_PORT)))??;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let (n, stop) = (udp_received.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if sock.recv(&mut buf).is_ok() {
                    n.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    // Ready when every nginx answers (directly, through the lb's routing).
    for i in 0..topo.backends.len() {
        let to = SocketAddr::new(backend_addr(i).into(), HTTP_PORT);
        wait_for("nginx to answer", Duration::from_secs(10), || http_get(&topo.client, to).ok())?;
    }
    let to = SocketAddr::new(backend_addr(0).into(), IPERF_PORT);
    wait_for("iperf3 to listen", Duration::from_secs(10), || {
        in_netns(&topo.client.name, || TcpStream::connect_timeout(&to, Duration::from_millis(200))).ok()?.ok()
    })?;
    Ok(Backends { _nginx: nginx, _iperf: iperf, udp_received, stop, dir })
}

/// One `GET /` with `Connection: close`; returns the body.
fn http_get(client: &Netns, to: SocketAddr) -> anyhow::Result<String> {
    in_netns(&client.name, || -> anyhow::Result<String> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let body = resp.split("\r\n\r\n").nth(1).context("no HTTP body")?;
        Ok(body.trim().to_owned())
    })?
}

/// What a peer needs set up in the lb namespace, torn down on drop.
enum Setup {
    None,
    Xlb {
        _daemon: Daemon,
    },
    /// The lb namespace's path.
    Nft(String),
    Haproxy {
        _proc: Proc,
    },
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Setup::Nft(path) = self {
            let _ = Command::new("nsenter").arg(format!("--net={path}")).args(["nft", "delete", "table", "ip", "xlbbench"]).output();
        }
    }
}

/// The address clients use for `port` under `peer`.
fn target(topo: &Topology, peer: Peer, port: u16) -> SocketAddr {
    match peer {
        Peer::Route => SocketAddr::new(backend_addr(0).into(), port),
        _ => topo.vip_sock(port),
    }
}

fn set_up(topo: &Topology, peer: Peer) -> anyhow::Result<Setup> {
    let vip = topo.vip(0).ip().to_string();
    let b = |i: usize| backend_addr(i).to_string();
    Ok(match peer {
        Peer::Route => Setup::None,
        Peer::XlbNative | Peer::XlbGeneric => {
            let mode = if peer == Peer::XlbNative { "native" } else { "generic" };
            let d = Daemon::start(&topo.lb, &topo.lb_ifaces, &["--xdp-mode", mode])?;
            for (port, bport, proto, backends) in [(80, HTTP_PORT, "tcp", 2), (53, UDP_PORT, "udp", 2), (IPERF_PORT, IPERF_PORT, "tcp", 1)] {
                let v = format!("{vip}:{port}");
                d.ok(&["service", "add", &v, "--proto", proto, "--scheduler", "wrr"])?;
                for i in 0..backends {
                    d.ok(&["backend", "add", &v, &format!("{}:{bport}", b(i)), "--proto", proto])?;
                }
            }
            Setup::Xlb { _daemon: d }
        }
        Peer::Nftables => {
            let rules = format!(
                "table ip xlbbench {{\n\
                 chain pre {{ type nat hook prerouting priority dstnat;\n\
                   ip daddr {vip} tcp dport 80 dnat to numgen inc mod 2 map {{ 0 : {b0} . {HTTP_PORT}, 1 : {b1} . {HTTP_PORT} }}\n\
                   ip daddr {vip} udp dport 53 dnat to numgen inc mod 2 map {{ 0 : {b0} . {UDP_PORT}, 1 : {b1} . {UDP_PORT} }}\n\
                   ip daddr {vip} tcp dport {IPERF_PORT} dnat to {b0}:{IPERF_PORT}\n\
                 }}\n}}\n",
                b0 = b(0),
                b1 = b(1)
            );
            let file = std::env::temp_dir().join(format!("{}-nft.conf", topo.prefix));
            std::fs::write(&file, rules)?;
            topo.lb.exec("nft", &["-f", file.to_str().context("path")?])?;
            let _ = std::fs::remove_file(&file);
            Setup::Nft(topo.lb.path())
        }
        Peer::Haproxy => {
            let conf = std::env::temp_dir().join(format!("{}-haproxy.cfg", topo.prefix));
            std::fs::write(
                &conf,
                format!(
                    "global\n  maxconn 8000\n  nbthread 1\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
                     listen web\n  bind {vip}:80\n  balance roundrobin\n  server b0 {b0}:{HTTP_PORT}\n  server b1 {b1}:{HTTP_PORT}\n\
                     listen iperf\n  bind {vip}:{IPERF_PORT}\n  server b0 {b0}:{IPERF_PORT}\n",
                    b0 = b(0),
                    b1 = b(1)
                ),
            )?;
            let p = spawn_in(&topo.lb, "haproxy", &["-db", "-f", conf.to_str().context("path")?])?;
            let to = topo.vip_sock(80);
            wait_for("haproxy to listen", Duration::from_secs(10), || http_get(&topo.client, to).ok())?;
            Setup::Haproxy { _proc: p }
        }
    })
}

/// wrk against `to`: (requests/s, p99 in ms).
fn wrk(topo: &Topology, to: SocketAddr, close: bool) -> anyhow::Result<(f64, f64)> {
    let url = format!("http://{to}/");
    let secs = format!("{}s", LOAD.as_secs());
    let mut args = vec!["-t1", "-c32", "-d", &secs, "--latency", "--timeout", "2s"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(&url);
    let out = output_in(&topo.client, "wrk", &args)?;
    let rps = out.lines().find_map(|l| l.strip_prefix("Requests/sec:")).context("wrk printed no Requests/sec")?.trim().parse::<f64>()?;
    let p99 = out.lines().find_map(|l| l.trim().strip_prefix("99%")).map(|v| parse_wrk_latency(v.trim())).unwrap_or(f64::NAN);
    Ok((rps, p99))
}

/// "1.23ms", "456.00us", "1.2s" → milliseconds.
fn parse_wrk_latency(v: &str) -> f64 {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1e3,
        "ms" => n,
        "s" => n * 1e3,
        "m" => n * 60e3,
        _ => f64::NAN,
    }
}

/// Host-wide softirq time in seconds (/proc/stat, USER_HZ ticks).
fn softirq_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: f64 = stat.lines().next().and_then(|l| l.split_whitespace().nth(7)).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: plain sysconf query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}

/// Blasts 64-byte UDP datagrams from 64 client ports at `to` for LOAD;
/// returns (datagrams/s delivered to the backends, softirq s per million).
fn udp_blast(topo: &Topology, backends: &Backends, to: SocketAddr) -> anyhow::Result<(f64, f64)> {
    let before = backends.udp_received.load(Ordering::Relaxed);
    let irq0 = softirq_seconds();
    let start = Instant::now();
    in_netns(&topo.client.name, || -> anyhow::Result<()> {
        let socks: Vec<UdpSocket> = (0..64).map(|_| UdpSocket::bind("0.0.0.0:0").and_then(|s| s.connect(to).map(|_| s))).collect::<Result<_, _>>()?;
        let payload = [0x5au8; 36]; // 20 IP + 8 UDP + 36 = 64 bytes
        while start.elapsed() < LOAD {
            for s in &socks {
                for _ in 0..16 {
                    let _ = s.send(&payload);
                }
            }
        }
        Ok(())
    })??;
    let sent_for = start.elapsed();
    // Let the last datagrams land (bounded).
    let mut last = backends.udp_received.load(Ordering::Relaxed);
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(100));
        let now = backends.udp_received.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let got = (last - before) as f64;
    let irq = softirq_seconds() - irq0;
    Ok((got / sent_for.as_secs_f64(), if got > 0.0 { irq / (got / 1e6) } else { f64::NAN }))
}

/// iperf3, one flow, 3 s: Gbit/s received.
fn iperf(topo: &Topology, to: SocketAddr) -> anyhow::Result<f64> {
    let out = output_in(&topo.client, "iperf3", &["-c", &to.ip().to_string(), "-p", &to.port().to_string(), "-t", "3", "-J"])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
    v["end"]["sum_received"]["bits_per_second"].as_f64().map(|b| b / 1e9).context("iperf3 printed no throughput")
}

/// 200 requests, one connection each: max/min of the per-backend counts.
fn split(topo: &Topology, to: SocketAddr) -> anyhow::Result<f64> {
    let mut n: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..200 {
        *n.entry(http_get(&topo.client, to)?).or_default() += 1;
    }
    let (max, min) = (n.values().max().copied().unwrap_or(0), n.values().min().copied().unwrap_or(0));
    Ok(if n.len() < 2 || min == 0 { f64::INFINITY } else { max as f64 / min as f64 })
}

fn measure(topo: &Topology, backends: &Backends, peer: Peer) -> anyhow::Result<Sample> {
    let _setup = set_up(topo, peer).with_context(|| format!("setting up {}", peer.name()))?;
    let http = target(topo, peer, if peer == Peer::Route { HTTP_PORT } else { 80 });
    let mut s = Sample::default();
    let (rps, p99) = wrk(topo, http, false)?;
    s.keepalive_rps = Some(rps);
    s.keepalive_p99_ms = Some(p99);
    s.new_conns_per_s = Some(wrk(topo, http, true).context("wrk, new connections")?.0);
    if peer != Peer::Haproxy {
        let (pps, irq) = udp_blast(topo, backends, target(topo, peer, if peer == Peer::Route { UDP_PORT } else { 53 }))?;
        s.udp_pps = Some(pps);
        s.softirq_s_per_mpkt = Some(irq);
    }
    s.tcp_gbps = Some(iperf(topo, target(topo, peer, IPERF_PORT))?);
    if peer != Peer::Route {
        s.split_max_min = Some(split(topo, http)?);
    }
    Ok(s)
}

/// Median, min, max of the present values.
fn stats(v: impl Iterator<Item = Option<f64>>) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = v.flatten().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some((v[v.len() / 2], v[0], v[v.len() - 1]))
}

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(testbed::have_privileges(), "the benchmarks need root (netns, XDP)");
    for tool in ["nginx", "wrk", "haproxy", "nft", "iperf3"] {
        anyhow::ensure!(
            Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success()),
            "{tool} is missing: `cargo xtask bench` installs it"
        );
    }
    let topo = Topology::new(TopologyOptions { backends: 2, ..Default::default() })?;
    // Tens of thousands of short connections per load: TIME_WAIT must not
    // run the client (or HAProxy's backend side) out of ports by round 2.
    for ns in std::iter::once(&topo.client).chain([&topo.lb]).chain(topo.backends.iter()) {
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    }
    let backends = start_backends(&topo)?;
    println!("\nend to end: client ns → lb ns → 2 backend ns (nginx), {ROUNDS} interleaved rounds, {}s loads; median (min-max)", LOAD.as_secs());
    let mut samples: BTreeMap<Peer, Vec<Sample>> = BTreeMap::new();
    // XLB_BENCH_PEERS=route,haproxy limits the run (development).
    let only = std::env::var("XLB_BENCH_PEERS").ok();
    let peers: Vec<Peer> = Peer::ALL.into_iter().filter(|p| only.as_deref().is_none_or(|o| o.split(',').any(|n| n == p.name()))).collect();
    for round in 0..ROUNDS {
        for &peer in &peers {
            let s = measure(&topo, &backends, peer).with_context(|| format!("round {round}, {}", peer.name()))?;
            eprintln!("  round {round} {:<12} {s:?}", peer.name());
            samples.entry(peer).or_default().push(s);
        }
    }
    type Field = (&'static str, &'static str, fn(&Sample) -> Option<f64>, bool);
    let fields: [Field; 7] = [
        ("keepalive_rps", "HTTP keep-alive req/s", |s| s.keepalive_rps, true),
        ("keepalive_p99_ms", "keep-alive p99 ms", |s| s.keepalive_p99_ms, false),
        ("new_conns_per_s", "new connections/s", |s| s.new_conns_per_s, true),
        ("udp_pps", "UDP 64 B datagrams/s", |s| s.udp_pps, true),
        ("softirq_s_per_mpkt", "softirq s per M datagrams", |s| s.softirq_s_per_mpkt, false),
        ("tcp_gbps", "single TCP flow Gbit/s", |s| s.tcp_gbps, true),
        ("split_max_min", "backend split max/min", |s| s.split_max_min, false),
    ];
    let mut json = serde_json::Map::new();
    print!("  {:<27}", "");
    for p in Peer::ALL {
        print!(" {:>22}", p.name());
    }
    println!();
    for (key, label, get, _) in &fields {
        print!("  {label:<27}");
        let mut row = serde_json::Map::new();
        for p in Peer::ALL {
            match samples.get(&p).and_then(|v| stats(v.iter().map(get))) {
                Some((m, lo, hi)) => {
                    print!(" {:>22}", format!("{} ({}-{})", fmt(m), fmt(lo), fmt(hi)));
                    row.insert(p.name().into(), serde_json::json!({ "median": m, "min": lo, "max": hi }));
                }
                None => print!(" {:>22}", "n/a"),
            }
        }
        println!();
        json.insert((*key).into(), row.into());
    }
    println!("\n  xlb-native / peer (medians; >1 is better for xlb on every row, lower-is-better rows inverted):");
    let mut ratios = serde_json::Map::new();
    for (key, label, get, higher_better) in &fields {
        let Some((x, _, _)) = samples.get(&Peer::XlbNative).and_then(|v| stats(v.iter().map(get))) else { continue };
        print!("  {label:<27}");
        let mut row = serde_json::Map::new();
        for p in [Peer::Route, Peer::XlbGeneric, Peer::Nftables, Peer::Haproxy] {
            match samples.get(&p).and_then(|v| stats(v.iter().map(get))) {
                Some((m, _, _)) if m > 0.0 && x > 0.0 => {
                    let r = if *higher_better { x / m } else { m / x };
                    print!(" {:>12}", format!("{:.2}x {}", r, p.name()));
                    row.insert(p.name().into(), r.into());
                }
                _ => print!(" {:>12}", "-"),
            }
        }
        println!();
        ratios.insert((*key).into(), row.into());
    }
    let goal = |key: &str, peer: &str, want: f64| -> String {
        let r = ratios.get(key).and_then(|r| r.get(peer)).and_then(|v| v.as_f64());
        match r {
            Some(r) => format!("{key} vs {peer}: {r:.2}x (goal ≥ {want}x: {})", if r >= want { "met" } else { "NOT met" }),
            None => format!("{key} vs {peer}: not measured"),
        }
    };
    println!("\n  goals:");
    for line in [
        goal("udp_pps", "nftables", 1.3),
        goal("new_conns_per_s", "nftables", 1.3),
        goal("new_conns_per_s", "haproxy", 2.0),
        goal("keepalive_rps", "nftables", 1.0),
        goal("keepalive_p99_ms", "nftables", 1.0),
        goal("tcp_gbps", "nftables", 0.9),
    ] {
        println!("    {line}");
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    let out = serde_json::json!({ "benchmark": "end_to_end", "rounds": ROUNDS, "load_s": LOAD.as_secs(), "results": json, "xlb_native_ratio": ratios });
    std::fs::write(dir.join("e2e.json"), serde_json::to_string_pretty(&out)?)?;
    println!("written to target/bench/e2e.json");
    Ok(())
}

fn fmt(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}
