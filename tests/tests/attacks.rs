//! Hostile traffic against live flows, through real kernel stacks: blind
//! ACK+RST, spoofed handshakes and SYN floods into a small table, more
//! flows than the table holds (with backends that push), two VIPs sharing
//! a backend from one client port, a full-NAT port pool without a daemon,
//! and 30 s of mutated packets. Attacks are built with the test bed's frame
//! builder and injected from the client namespace through an AF_PACKET
//! socket (spoofed sources, any header, any length); what counts is what
//! client sockets and a capture at the client see.
//!
//! Random choices come from a seed printed in every failure; set
//! `XLB_ATTACK_SEED` to replay one. The tests take turns (one lock): each
//! floods the machine, and two floods at once would measure neither.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use testbed::{
    Daemon, LineClient, PushServer, TcpNameServer, Topology, TopologyOptions,
    attack::{self, Capture, Injector, Lines, Rng, Segment, connect_from, parse_segment, pump},
    in_netns,
    packet::{Frame, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    topology::{CLIENT_ADDR, CLIENT_ADDR6, VIP, VIP6},
    wait_for,
};

const PORT: u16 = 8080;

static TURNS: Mutex<()> = Mutex::new(());

/// Holds the machine for one attack at a time (a failed test's poisoned
/// lock is still a lock).
fn one_at_a_time() -> MutexGuard<'static, ()> {
    TURNS.lock().unwrap_or_else(|e| e.into_inner())
}

fn topology(backends: usize) -> Topology {
    attack::require_root().expect("root");
    Topology::new(TopologyOptions { backends, ..Default::default() }).expect("topology")
}

/// A service on `vip` with every backend of `topo` on `port` (of `vip`'s family).
fn service(daemon: &Daemon, topo: &Topology, vip: SocketAddr, port: u16, extra: &[&str]) {
    let v = vip.to_string();
    let mut args = vec!["service", "add", v.as_str()];
    args.extend_from_slice(extra);
    daemon.ok(&args).expect("service add");
    for i in 0..topo.backends.len() {
        daemon.ok(&["backend", "add", &v, &topo.backend_of(vip.is_ipv6(), i, port).to_string()]).expect("backend add");
    }
}

/// A data-plane counter from `xlb status`.
fn counter(daemon: &Daemon, name: &str) -> u64 {
    let s = daemon.json(&["status"]).expect("status");
    s["counters"][name].as_u64().unwrap_or_else(|| panic!("no counter {name:?} in xlb status: {s:#}"))
}

/// `xlb status` from a table snapshot taken after `t` (the table figures
/// come from the walker's latest pass).
fn status_after(daemon: &Daemon, t: Instant) -> serde_json::Value {
    wait_for("a table snapshot taken after the attack", Duration::from_secs(8), || {
        let s = daemon.json(&["status"]).ok()?;
        let age = s["table"]["snapshot_age_s"].as_f64()?;
        (Duration::from_secs_f64(age) < t.elapsed()).then_some(s)
    })
    .expect("a fresh status")
}

/// A live echo connection: who answered its first line, and its 4-tuple.
struct Flow {
    c: LineClient,
    who: String,
    local: SocketAddr,
    vip: SocketAddr,
}

fn echo_flows(topo: &Topology, vip: SocketAddr, n: usize) -> Vec<Flow> {
    (0..n)
        .map(|i| {
            let mut c = LineClient::connect(&topo.client.name, vip).expect("connect to the VIP");
            let who = c.ask(&format!("hello {i}")).expect("hello");
            let local = c.stream().local_addr().expect("local address");
            Flow { c, who, local, vip }
        })
        .collect()
}

/// One exchange on a flow: an error unless the same backend answers.
fn check(f: &mut Flow, msg: &str) -> Result<(), String> {
    match f.c.ask(msg) {
        Ok(w) if w == f.who => Ok(()),
        Ok(w) => Err(format!("{} moved from {} to {w}", f.local, f.who)),
        Err(e) => Err(format!("{}: {e:#}", f.local)),
    }
}

/// The injector of the client namespace: frames from c0 to the
/// balancer's l0.
fn injector(topo: &Topology) -> Injector {
    Injector::open(&topo.client, "c0", &topo.lb, "l0").expect("AF_PACKET socket in the client namespace")
}

/// A spoofed IPv4 source: 10.128.0.0/9 (nothing in the topology), any port.
fn spoofed_v4(rng: &mut Rng) -> (IpAddr, u16) {
    (Ipv4Addr::from(0x0a80_0000 | (rng.u32() & 0x007f_ffff)).into(), rng.range(1024, 65536) as u16)
}

/// A spoofed IPv6 source: fd42::/16.
fn spoofed_v6(rng: &mut Rng) -> (IpAddr, u16) {
    let mut o = [0u8; 16];
    o[0] = 0xfd;
    o[1] = 0x42;
    for b in &mut o[2..] {
        *b = rng.u8();
    }
    (Ipv6Addr::from(o).into(), rng.range(1024, 65536) as u16)
}

/// `n` handshakes from spoofed sources to `vip`: a SYN each, followed by
/// the ACK that would complete it (guessing the SYN-ACK's number) when
/// `with_ack`.
fn spoofed_handshakes(inj: &Injector, rng: &mut Rng, vip: SocketAddr, n: usize, with_ack: bool) -> Vec<Vec<u8>> {
    let mut frames = Vec::with_capacity(if with_ack { 2 * n } else { n });
    for _ in 0..n {
        let src = spoofed_v4(rng);
        let isn = rng.u32();
        frames.push(inj.frame(Frame::tcp(src, (vip.ip(), vip.port()), TCP_SYN, isn, 0)));
        if with_ack {
            frames.push(inj.frame(Frame::tcp(src, (vip.ip(), vip.port()), TCP_ACK, isn.wrapping_add(1), rng.u32())));
        }
    }
    frames
}

/// What a flood sent.
struct Flooded {
    sent: usize,
    refused: usize,
    took: Duration,
}

impl Flooded {
    fn rate(&self) -> f64 {
        self.sent as f64 / self.took.as_secs_f64().max(1e-3)
    }
}

/// Frames sent in a loop, as fast as the namespace can send them, for at
/// least `min` and until stopped, at most `max`.
struct Flood {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Flooded>,
}

impl Flood {
    fn start(inj: Injector, frames: Vec<Vec<u8>>, min: Duration, max: Duration) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let (mut sent, mut refused) = (0, 0);
            'out: loop {
                for chunk in frames.chunks(1024) {
                    let (k, r) = inj.send(chunk);
                    sent += k;
                    refused += r;
                    let t = start.elapsed();
                    if t >= max || (t >= min && s.load(Ordering::Relaxed)) {
                        break 'out;
                    }
                }
            }
            Flooded { sent, refused, took: start.elapsed() }
        });
        Flood { stop, thread }
    }

    fn running(&self) -> bool {
        !self.thread.is_finished()
    }

    fn stop(self) -> Flooded {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("flood thread")
    }
}

/// The first few of a list, for failure messages.
fn first<T: std::fmt::Debug>(v: &[T]) -> String {
    format!("{:?}{}", &v[..v.len().min(5)], if v.len() > 5 { format!(" (and {} more)", v.len() - 5) } else { String::new() })
}

#[test]
fn a_blind_ack_then_rst_at_a_random_sequence_number_breaks_none_of_20_live_flows_nor_the_4_packet_variant() {
    let _turn = one_at_a_time();
    let topo = topology(2);
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, &[]).expect("daemon");
    let _servers = topo.tcp_servers(PORT).expect("servers");
    let vip = topo.vip_sock(80);
    service(&daemon, &topo, vip, PORT, &[]);
    let mut flows = echo_flows(&topo, vip, 40);
    let inj = injector(&topo);
    let (mut rng, seed) = Rng::from_env_or_entropy();
    // The attacker knows each flow's 4-tuple, not its sequence numbers:
    // flows 0-19 get ACK S, RST S; flows 20-39 the same at S and S+2^31.
    let mut frames = Vec::new();
    for (i, f) in flows.iter().enumerate() {
        let s = rng.u32();
        let seqs = if i < 20 { vec![s] } else { vec![s, s.wrapping_add(1 << 31)] };
        for q in seqs {
            let (src, dst) = ((f.local.ip(), f.local.port()), (vip.ip(), vip.port()));
            frames.push(inj.frame(Frame::tcp(src, dst, TCP_ACK, q, rng.u32())));
            frames.push(inj.frame(Frame::tcp(src, dst, TCP_RST, q, 0)));
        }
    }
    let rx = counter(&daemon, "rx");
    let (sent, refused) = inj.send(&frames);
    assert_eq!((sent, refused), (frames.len(), 0), "the kernel refused spoofed frames");
    // Every spoofed segment reached the data plane before the flows talk.
    wait_for("the spoofed segments to reach the data plane", Duration::from_secs(5), || (counter(&daemon, "rx") >= rx + sent as u64).then_some(()))
        .expect("rx");
    let mut broken: Vec<(usize, String)> = Vec::new();
    for (i, f) in flows.iter_mut().enumerate() {
        if let Err(e) = check(f, &format!("after {i}")) {
            broken.push((i, e));
        }
    }
    let two = broken.iter().filter(|(i, _)| *i < 20).count();
    let four = broken.len() - two;
    eprintln!("blind ACK+RST (seed {seed}): {two}/20 broken by ACK S + RST S, {four}/20 by the 4-packet variant");
    assert!(
        broken.is_empty(),
        "blind ACK+RST (seed {seed}): {two} of 20 live flows broken by ACK S, RST S, and {four} of 20 by ACK+RST at S and S+2^31 \
         (a flow is broken when its next exchange fails); first: {}",
        first(&broken)
    );
}

/// 100 established flows through a daemon with `--conn-capacity 4096`.
struct SmallTable {
    flows: Vec<Flow>,
    _servers: Vec<TcpNameServer>,
    daemon: Daemon,
    topo: Topology,
}

fn small_table() -> SmallTable {
    let topo = topology(2);
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, &["--conn-capacity", "4096"]).expect("daemon");
    let servers = topo.tcp_servers(PORT).expect("servers");
    service(&daemon, &topo, topo.vip_sock(80), PORT, &[]);
    let flows = echo_flows(&topo, topo.vip_sock(80), 100);
    SmallTable { flows, _servers: servers, daemon, topo }
}

/// One exchange on each flow of `flows` (by index) not yet broken; the
/// ones that fail join `broken`.
fn round(flows: &mut [Flow], which: impl Iterator<Item = usize>, tag: &str, broken: &mut HashMap<usize, String>) {
    for i in which {
        if broken.contains_key(&i) {
            continue;
        }
        if let Err(e) = check(&mut flows[i], &format!("{tag} {i}")) {
            broken.insert(i, format!("{tag}: {e}"));
        }
    }
}

#[test]
fn spoofed_syn_then_ack_pairs_at_full_rate_for_10s_into_a_small_table_break_none_of_100_established_flows() {
    let _turn = one_at_a_time();
    let mut b = small_table();
    let (mut rng, seed) = Rng::from_env_or_entropy();
    let inj = injector(&b.topo);
    let frames = spoofed_handshakes(&inj, &mut rng, b.topo.vip_sock(80), 1 << 16, true);
    let rx = counter(&b.daemon, "rx");
    let flood = Flood::start(inj, frames, Duration::from_secs(10), Duration::from_secs(10));
    // Flows 0-49 talk throughout, 50-99 stay idle until it is over.
    let mut broken = HashMap::new();
    let mut rounds = 0;
    while flood.running() {
        round(&mut b.flows, 0..50, &format!("during {rounds}"), &mut broken);
        rounds += 1;
    }
    let f = flood.stop();
    round(&mut b.flows, 0..100, "after", &mut broken);
    let reached = counter(&b.daemon, "rx") - rx;
    eprintln!(
        "SYN+ACK pairs (seed {seed}): {} frames in {:?} ({:.0}/s, {} refused), {reached} reached XDP; {rounds} rounds; broken: {} talking, {} idle",
        f.sent,
        f.took,
        f.rate(),
        f.refused,
        broken.keys().filter(|i| **i < 50).count(),
        broken.keys().filter(|i| **i >= 50).count()
    );
    assert!(reached >= f.sent as u64 / 2, "the flood must reach the data plane: {reached} of {} frames", f.sent);
    let mut list: Vec<_> = broken.into_iter().collect();
    list.sort();
    assert!(
        list.is_empty(),
        "spoofed SYN+ACK pairs (seed {seed}, {} frames at {:.0}/s for {:?}) into --conn-capacity 4096 broke {} of 100 established flows \
         ({} of 50 talking, {} of 50 idle); first: {}",
        f.sent,
        f.rate(),
        f.took,
        list.len(),
        list.iter().filter(|(i, _)| *i < 50).count(),
        list.iter().filter(|(i, _)| *i >= 50).count(),
        first(&list)
    );
}

#[test]
fn a_spoofed_syn_flood_at_full_rate_for_10s_leaves_established_flows_and_99_percent_of_500_new_connections_working() {
    let _turn = one_at_a_time();
    let mut b = small_table();
    let (mut rng, seed) = Rng::from_env_or_entropy();
    let inj = injector(&b.topo);
    let frames = spoofed_handshakes(&inj, &mut rng, b.topo.vip_sock(80), 1 << 17, false);
    let rx = counter(&b.daemon, "rx");
    // The flood: 10 s at full rate. It shares the client's link, as an
    // attack from anywhere shares a real one: some of the client's own
    // segments are lost and retransmitted (RTO), so its handshakes take
    // what they take over a real path (ms to a second), not a namespace's
    // µs. The 500 sequential connections start with it and go on after it
    // (bounded): each must succeed, those made during the flood included.
    let flood = Flood::start(inj, frames, Duration::from_secs(10), Duration::from_secs(10));
    let mut broken = HashMap::new();
    let mut failed: Vec<(usize, String)> = Vec::new();
    let mut attempted = 0;
    let mut during = 0;
    let mut took: Vec<Duration> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    for i in 0..500 {
        if Instant::now() > deadline {
            break;
        }
        attempted += 1;
        let t = Instant::now();
        let got = LineClient::connect(&b.topo.client.name, b.topo.vip_sock(80)).and_then(|mut c| c.ask(&format!("new {i}")));
        took.push(t.elapsed());
        if flood.running() {
            during += 1;
        }
        if let Err(e) = got {
            failed.push((i, format!("{e:#}")));
        }
        if i % 50 == 49 {
            round(&mut b.flows, 0..100, &format!("during {i}"), &mut broken);
        }
    }
    let f = flood.stop();
    round(&mut b.flows, 0..100, "after", &mut broken);
    let reached = counter(&b.daemon, "rx") - rx;
    let ok = attempted - failed.len();
    took.sort();
    let pct = |p: usize| took.get(took.len().saturating_sub(1) * p / 100).copied().unwrap_or_default();
    let mut kinds: HashMap<String, usize> = HashMap::new();
    for (_, e) in &failed {
        *kinds.entry(e.clone()).or_default() += 1;
    }
    eprintln!("new connections: p50 {:?} p90 {:?} p99 {:?} max {:?}; failures by kind {kinds:?}", pct(50), pct(90), pct(99), pct(100));
    eprintln!(
        "SYN flood (seed {seed}): {} SYNs in {:?} ({:.0}/s, {} refused), {reached} reached XDP; new connections {ok}/{attempted} of 500 ({during} during the flood); established broken {}",
        f.sent,
        f.took,
        f.rate(),
        f.refused,
        broken.len()
    );
    assert!(reached >= f.sent as u64 / 2, "the flood must reach the data plane: {reached} of {} frames", f.sent);
    assert!(f.took >= Duration::from_secs(10), "the flood must last 10 s: {:?}", f.took);
    assert!(during >= 5, "only {during} connections were made during the flood: the test measured nothing");
    let mut list: Vec<_> = broken.into_iter().collect();
    list.sort();
    let mut problems = Vec::new();
    if ok < 495 {
        problems.push(format!(
            "only {ok} of 500 new connections succeeded ({attempted} attempted within 120 s, {during} during the flood); first failures: {}",
            first(&failed)
        ));
    }
    if !list.is_empty() {
        problems.push(format!("{} of 100 established flows broke; first: {}", list.len(), first(&list)));
    }
    assert!(problems.is_empty(), "spoofed SYN flood (seed {seed}, {} SYNs at {:.0}/s for {:?}): {}", f.sent, f.rate(), f.took, problems.join("; "));
}

/// How one of many flows ended up.
#[derive(Debug)]
enum Fate {
    /// Its push arrived and it answered, from the backend it started on.
    Works,
    /// ECONNRESET: the client knows.
    Told,
    /// Anything else: silence, a FIN, wrong data.
    Broken(String),
}

#[test]
fn three_thousand_flows_through_a_table_for_2048_leak_no_backend_address_and_each_works_or_is_told() {
    const FLOWS: usize = 3000;
    let _turn = one_at_a_time();
    let topo = topology(2);
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, &["--conn-capacity", "2048"]).expect("daemon");
    let servers: Vec<PushServer> = (0..2)
        .map(|i| PushServer::start(&topo.backends[i].name, &format!("b{i}"), SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), PORT)).expect("server"))
        .collect();
    let vip = topo.vip_sock(80);
    service(&daemon, &topo, vip, PORT, &["--scheduler", "wrr"]);
    // Anything from a backend's own address reaching the client left the
    // balancer un-NATed.
    let backend_addrs: Vec<IpAddr> = (0..2).flat_map(|i| [topo.backend_ip(i, false), topo.backend_ip(i, true)]).collect();
    let capture = Capture::start(&topo.client, "c0", &backend_addrs, &[]).expect("capture");
    // The flows, one after another, each with a first exchange.
    let opened: Vec<Result<(TcpStream, String), String>> = in_netns(&topo.client.name, || {
        (0..FLOWS)
            .map(|i| {
                let s = TcpStream::connect_timeout(&vip, Duration::from_secs(3)).map_err(|e| format!("connect: {e}"))?;
                s.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
                (&s).write_all(format!("hello {i}\n").as_bytes()).map_err(|e| format!("hello: {e}"))?;
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).map_err(|e| format!("hello: {e}"))?;
                let who = line.split(' ').next().unwrap_or_default().to_owned();
                Ok((s, who))
            })
            .collect()
    })
    .expect("client namespace");
    let mut fates: Vec<Option<Fate>> = Vec::with_capacity(FLOWS);
    let mut conns = Vec::new();
    let mut whos = Vec::new();
    for r in opened {
        match r {
            Ok((s, who)) => {
                conns.push(Lines::new(s).expect("nonblocking"));
                whos.push(who);
                fates.push(None);
            }
            // A flow refused at once is told; anything else is a failure.
            Err(e) if e.contains("reset") || e.contains("refused") => fates.push(Some(Fate::Told)),
            Err(e) => fates.push(Some(Fate::Broken(format!("opening: {e}")))),
        }
    }
    let opened_ok = conns.len();
    // Each backend writes to all of its connections, unprompted.
    let pushed: u64 = servers.iter().map(|s| s.push().expect("push")).sum();
    let push_of = |who: &str, l: &str| l.starts_with(&format!("{who} push "));
    pump(&mut conns, Instant::now() + Duration::from_secs(5), |i, c| c.lines.iter().any(|l| push_of(&whos[i], l)));
    // Then each client speaks.
    for (i, c) in conns.iter_mut().enumerate() {
        c.send(&format!("after {i}"));
    }
    let answer_of = |i: usize, who: &str, l: &str| l == format!("{who} after {i}");
    pump(&mut conns, Instant::now() + Duration::from_secs(5), |i, c| c.lines.iter().any(|l| answer_of(i, &whos[i], l)));
    let (frames, dropped) = capture.stop();
    for (k, fate) in fates.iter_mut().filter(|f| f.is_none()).enumerate() {
        let (c, who) = (&conns[k], &whos[k]);
        let (pushed_here, answered) = (c.lines.iter().any(|l| push_of(who, l)), c.lines.iter().any(|l| answer_of(k, who, l)));
        *fate = Some(if c.reset() {
            Fate::Told
        } else if pushed_here && answered {
            Fate::Works
        } else {
            Fate::Broken(format!("flow to {who}: push {pushed_here}, answer {answered}, error {:?}, fin {}, lines {:?}", c.error, c.eof, c.lines))
        });
    }
    let leaks: Vec<Segment> = frames.iter().filter(|c| !c.outgoing).filter_map(|c| parse_segment(&c.frame)).collect();
    let works = fates.iter().filter(|f| matches!(f, Some(Fate::Works))).count();
    let told = fates.iter().filter(|f| matches!(f, Some(Fate::Told))).count();
    let broken: Vec<(usize, &str)> = fates
        .iter()
        .enumerate()
        .filter_map(|(i, f)| match f {
            Some(Fate::Broken(why)) => Some((i, why.as_str())),
            _ => None,
        })
        .collect();
    eprintln!(
        "{FLOWS} flows into a table for 2048: {opened_ok} opened, {pushed} pushes written; {works} work, {told} told (RST), {} broken; {} packets from backend addresses at the client",
        broken.len(),
        leaks.len()
    );
    let mut problems = Vec::new();
    if dropped > 0 {
        problems.push(format!("the capture dropped {dropped} frames: it cannot vouch for what it missed"));
    }
    if !leaks.is_empty() {
        let shown: Vec<String> = leaks.iter().take(5).map(|s| format!("{} -> {} flags {:#04x} {}B", s.src, s.dst, s.flags, s.payload.len())).collect();
        problems.push(format!("{} packets reached the client with a backend's source address (un-NATed), e.g. {shown:?}", leaks.len()));
    }
    if !broken.is_empty() {
        problems.push(format!("{} of {FLOWS} flows neither work nor were told (RST): {}", broken.len(), first(&broken)));
    }
    assert!(problems.is_empty(), "{FLOWS} flows through --conn-capacity 2048 ({works} work, {told} told): {}", problems.join("; "));
}

/// One line out, one line back, on a plain stream.
fn ask_on(s: &TcpStream, msg: &str) -> anyhow::Result<String> {
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    (&*s).write_all(format!("{msg}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}

/// How the second connection from one port ended: connected through its
/// own VIP, or refused at once (a RST); anything else (no answer at all)
/// is a black hole.
fn second_connection(c: anyhow::Result<attack::Connecting>, within: Duration, msg: &str, what: &str, problems: &mut Vec<String>) {
    match c.map_err(|e| std::io::Error::other(format!("{e:#}"))).and_then(|c| c.finish(within)) {
        Ok(s) => match ask_on(&s, msg) {
            Ok(a) if a == format!("b0 {msg}") => {}
            other => problems.push(format!("{what} connected but did not answer: {other:?}")),
        },
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset) => {}
        Err(e) => problems.push(format!("{what} was neither answered nor refused (RST) within {within:?}: {e}")),
    }
}

#[test]
fn two_vips_sharing_a_backend_from_one_client_port_each_see_only_their_own_vip() {
    let _turn = one_at_a_time();
    let topo = topology(1);
    let vip2 = Ipv4Addr::new(10, 99, 0, 2);
    topo.lb.ip(&["addr", "add", &format!("{vip2}/32"), "dev", "lo"]).expect("second VIP");
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, &[]).expect("daemon");
    let _plain = TcpNameServer::start(&topo.backends[0].name, "b0", "0.0.0.0:8080".parse().expect("addr")).expect("server");
    // A busy backend (phase 2): one connection waiting to be accepted
    // fills its queue, and SYNs meanwhile get no answer.
    let busy = attack::listen_with_backlog(&topo.backends[0].name, "0.0.0.0:9090".parse().expect("addr"), 0).expect("busy listener");
    let (v1, v2) = (IpAddr::from(VIP), IpAddr::from(vip2));
    let (a1, b1, a2, b2) = (SocketAddr::new(v1, 80), SocketAddr::new(v2, 81), SocketAddr::new(v1, 82), SocketAddr::new(v2, 83));
    for (vip, port) in [(a1, 8080), (b1, 8080), (a2, 9090), (b2, 9090)] {
        service(&daemon, &topo, vip, port, &[]);
    }
    let capture = Capture::start(&topo.client, "c0", &[v1, v2], &[v1, v2]).expect("capture");
    let any = SocketAddr::new(CLIENT_ADDR.into(), 0);
    let mut problems = Vec::new();

    // Phase 1: a connection to VIP1 from port P; then one to VIP2 from P.
    let a = connect_from(&topo.client.name, any, a1).expect("connect").finish(Duration::from_secs(3)).expect("the first connection to VIP1");
    let p1 = a.local_addr().expect("local").port();
    assert_eq!(ask_on(&a, "via-vip1 hello").expect("VIP1 answers"), "b0 via-vip1 hello");
    second_connection(
        connect_from(&topo.client.name, SocketAddr::new(CLIENT_ADDR.into(), p1), b1),
        Duration::from_secs(3),
        "via-vip2 hello",
        &format!("phase 1: the connection to VIP2 from port {p1}"),
        &mut problems,
    );
    match ask_on(&a, "via-vip1 after") {
        Ok(l) if l == "b0 via-vip1 after" => {}
        other => problems.push(format!("phase 1: the connection to VIP1 from port {p1} broke after the one to VIP2: {other:?}")),
    }

    // Phase 2: both handshakes at once (the backend answers neither until
    // its queue frees).
    let filler = connect_from(&topo.client.name, any, a2).expect("connect").finish(Duration::from_secs(3)).expect("the connection that fills the queue");
    let a = connect_from(&topo.client.name, any, a2).expect("connect");
    let p2 = a.local_addr().expect("local").port();
    let b = connect_from(&topo.client.name, SocketAddr::new(CLIENT_ADDR.into(), p2), b2);
    let syn_to = |frames: &[attack::Captured], to: SocketAddr| {
        frames.iter().filter(|c| c.outgoing).filter_map(|c| parse_segment(&c.frame)).any(|s| s.dst == to && s.src.port() == p2 && s.flags & TCP_SYN != 0)
    };
    wait_for("both SYNs to leave the client", Duration::from_secs(2), || {
        let f = capture.frames();
        (syn_to(&f, a2) && (b.is_err() || syn_to(&f, b2))).then_some(())
    })
    .expect("SYNs");
    let _busy = TcpNameServer::start_on(busy, "b0").expect("the busy backend starts accepting");
    match a.finish(Duration::from_secs(6)) {
        Ok(s) => match ask_on(&s, "via-vip1 two") {
            Ok(l) if l == "b0 via-vip1 two" => {}
            other => problems.push(format!("phase 2: the connection to VIP1 from port {p2} connected but did not answer: {other:?}")),
        },
        Err(e) => problems.push(format!("phase 2: the connection to VIP1 from port {p2} never connected (6 s): {e}")),
    }
    second_connection(b, Duration::from_secs(6), "via-vip2 two", &format!("phase 2: the connection to VIP2 from port {p2}"), &mut problems);
    drop(filler);

    // What reached the client: each segment from a VIP to port P must
    // belong to the connection P opened to that VIP (its SYN's sequence
    // space), and carry only that VIP's data.
    let (frames, _) = capture.stop();
    let segs: Vec<(bool, Segment)> = frames.iter().filter_map(|c| parse_segment(&c.frame).map(|s| (c.outgoing, s))).collect();
    let mut isn: HashMap<(u16, SocketAddr), u32> = HashMap::new();
    for (_, s) in segs.iter().filter(|(out, s)| *out && s.flags & (TCP_SYN | TCP_ACK) == TCP_SYN) {
        isn.entry((s.src.port(), s.dst)).or_insert(s.seq);
    }
    let name = |a: SocketAddr| if a.ip() == v1 { "VIP1" } else { "VIP2" };
    if std::env::var_os("XLB_ATTACK_DUMP").is_some() {
        for (out, s) in segs.iter().filter(|(_, s)| [p1, p2].contains(&s.dst.port()) || [p1, p2].contains(&s.src.port())) {
            eprintln!(
                "{} {} -> {} flags {:#04x} seq {} ack {} {:?}",
                if *out { "out" } else { "in " },
                s.src,
                s.dst,
                s.flags,
                s.seq,
                s.ack,
                String::from_utf8_lossy(&s.payload)
            );
        }
    }
    for (_, s) in segs.iter().filter(|(out, s)| !*out && [p1, p2].contains(&s.dst.port())) {
        let (p, from) = (s.dst.port(), s.src);
        let other_tag = if from.ip() == v1 { "via-vip2" } else { "via-vip1" };
        let Some(&own) = isn.get(&(p, from)) else {
            problems.push(format!("{} {from} sent flags {:#04x} to port {p}, which never opened a connection to it", name(from), s.flags));
            continue;
        };
        let rel = s.ack.wrapping_sub(own.wrapping_add(1));
        let whose = isn.iter().find(|((q, to), i)| *q == p && *to != from && s.ack == i.wrapping_add(1)).map(|((_, to), _)| name(*to));
        if s.flags & TCP_SYN != 0 && rel != 0 {
            problems.push(format!(
                "a SYN-ACK from {} {from} to port {p} acknowledges {} (the SYN to {}), not its own connection's SYN",
                name(from),
                s.ack,
                whose.unwrap_or("?")
            ));
        } else if s.flags & TCP_ACK != 0 && rel >= 1 << 20 {
            problems.push(format!(
                "a segment from {} {from} to port {p} (flags {:#04x}) acknowledges {}: outside its connection's sequence space",
                name(from),
                s.flags,
                s.ack
            ));
        }
        if String::from_utf8_lossy(&s.payload).contains(other_tag) {
            problems.push(format!("{} {from} delivered the other VIP's data to port {p}: {:?}", name(from), String::from_utf8_lossy(&s.payload)));
        }
    }
    let s = daemon.json(&["status"]).expect("status");
    eprintln!("reverse-key collision: ports {p1} and {p2}; counters {}", s["counters"]);
    assert!(problems.is_empty(), "two VIPs sharing a backend, one client port toward both: {}", problems.join("; "));
}

#[test]
fn full_nat_with_a_64_port_pool_serves_10000_sequential_connections_with_the_daemon_stopped() {
    const CONNECTIONS: usize = 10_000;
    let _turn = one_at_a_time();
    attack::require_root().expect("root");
    let topo = Topology::new(TopologyOptions { backends: 1, isolated_backends: true, ..Default::default() }).expect("topology");
    let mut daemon = Daemon::start_persistent(&topo.lb, &topo.lb_ifaces, &[]).expect("daemon");
    // A server that wakes on each connection (poll): 10,000 in seconds.
    let _server = PushServer::start(&topo.backends[0].name, "b0", "0.0.0.0:8080".parse().expect("addr")).expect("server");
    let vip = topo.vip_sock(80);
    service(&daemon, &topo, vip, PORT, &["--mode", "fullnat", "--snat-ports", "40000-40063"]);
    let mut setup = LineClient::connect(&topo.client.name, vip).expect("connect while the daemon runs");
    assert_eq!(setup.ask("setup").expect("full NAT serves"), "b0");
    setup.stream().shutdown(Shutdown::Write).expect("close");
    drop(setup);
    // Setup done: the daemon goes, the data plane stays (no --detach-on-exit).
    let status = daemon.stop().expect("stop");
    assert!(status.success(), "{}", daemon.log_text());
    let link = topo.lb.ip(&["link", "show", "l0"]).expect("link");
    assert!(link.contains("xdp"), "the program must stay attached without a daemon: {link}");
    // Open, one exchange, orderly close (the backend's FIN read to the
    // end), one after another; the first failures end the run.
    let started = Instant::now();
    let (ok, failures) = in_netns(&topo.client.name, || {
        let deadline = started + Duration::from_secs(100);
        let (mut ok, mut failures) = (0usize, Vec::new());
        for i in 0..CONNECTIONS {
            if failures.len() >= 10 || Instant::now() > deadline {
                break;
            }
            let one = || -> std::io::Result<()> {
                let s = TcpStream::connect_timeout(&vip, Duration::from_secs(3))?;
                let answer = ask_on(&s, &format!("n {i}")).map_err(std::io::Error::other)?;
                if answer != format!("b0 n {i}") {
                    return Err(std::io::Error::other(format!("answer {answer:?}")));
                }
                s.shutdown(Shutdown::Write)?;
                let mut rest = Vec::new();
                (&s).read_to_end(&mut rest)?;
                Ok(())
            };
            match one() {
                Ok(()) => ok += 1,
                Err(e) => failures.push((i, e.to_string())),
            }
        }
        (ok, failures)
    })
    .expect("client namespace");
    let took = started.elapsed();
    eprintln!("full NAT, 64 ports, no daemon: {ok} of {CONNECTIONS} connections in {took:?}");
    assert!(
        ok == CONNECTIONS,
        "full NAT with a 64-port pool and the daemon stopped: {ok} of {CONNECTIONS} sequential connections succeeded in {took:?} \
         (the run stops at 10 failures or 100 s); failures: {}",
        first(&failures)
    );
}

/// A frame built from `base` and then damaged: truncated, fields set to
/// random or extreme values, bytes flipped (the checksums then recomputed
/// where the headers can still be followed, half of the time, so that
/// damage deeper than a checksum is exercised too).
fn mutate(rng: &mut Rng, mut f: Vec<u8>) -> Vec<u8> {
    let l3 = 14;
    let v6 = f.len() > 13 && f[12] == 0x86;
    let l4 = if v6 { l3 + 40 } else { l3 + 20 };
    for _ in 0..rng.range(1, 4) {
        match rng.below(9) {
            // IPv4 version/IHL, or IPv6 next header.
            0 if !v6 => f[l3] = 0x40 | (rng.u8() & 0x0f),
            0 => f[l3 + 6] = *rng.pick(&[0, 6, 17, 43, 44, 50, 58, 59, 60, 135, 255]),
            // Total / payload length.
            1 => {
                let at = if v6 { l3 + 4 } else { l3 + 2 };
                f[at..at + 2].copy_from_slice(&rng.u16().to_be_bytes());
            }
            // Fragment bits and offset (IPv4).
            2 if !v6 => {
                let any = rng.u16();
                let bits = *rng.pick(&[0x2000u16, 0x0001, 0x2fff, 0x4000 | 0x2000, any]);
                f[l3 + 6..l3 + 8].copy_from_slice(&bits.to_be_bytes());
            }
            // TCP flags, data offset; UDP length.
            3 if f.len() > l4 + 13 => f[l4 + 13] = rng.u8(),
            4 if f.len() > l4 + 12 => f[l4 + 12] = rng.u8() & 0xf0,
            5 if f.len() > l4 + 6 => f[l4 + 4..l4 + 6].copy_from_slice(&rng.u16().to_be_bytes()),
            // A byte anywhere in the headers.
            6 => {
                let at = rng.range(l3, f.len().min(l4 + 40));
                if at < f.len() {
                    f[at] = rng.u8();
                }
            }
            // Options: TCP bytes after the header.
            7 if f.len() > l4 + 20 => {
                for b in &mut f[l4 + 20..] {
                    *b = rng.u8();
                }
            }
            _ => {}
        }
    }
    if rng.chance(1, 2) {
        attack::refresh_checksums(&mut f);
    }
    if rng.chance(1, 3) {
        f.truncate(rng.range(0, f.len() + 1));
    }
    f
}

/// The frames a mutation round starts from: segments on live flows' tuples
/// (both ways, random sequence numbers and flags), new tuples, UDP, IPv6
/// with extension chains and fragments, ICMP errors quoting live flows,
/// segments claiming a backend's address.
fn fuzz_bases(rng: &mut Rng, inj: &Injector, topo: &Topology, flows: &[(SocketAddr, SocketAddr)]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let vip = topo.vip_sock(80);
    for _ in 0..64 {
        let (client, _) = *rng.pick(flows);
        let any = rng.u8();
        let flags = *rng.pick(&[TCP_SYN, TCP_ACK, TCP_RST, TCP_FIN | TCP_ACK, TCP_SYN | TCP_ACK, TCP_RST | TCP_ACK, any]);
        let mut seg = Frame::tcp((client.ip(), client.port()), (vip.ip(), vip.port()), flags, rng.u32(), rng.u32());
        let n = rng.below(64);
        seg.payload = rng.bytes(n);
        out.push(inj.frame(seg));
        // A backend's address, towards the client (and towards anyone).
        let b = topo.backend(rng.below(topo.backends.len()), PORT);
        let to = if rng.chance(1, 2) { client } else { SocketAddr::from((CLIENT_ADDR, rng.u16())) };
        out.push(inj.frame(Frame::tcp((IpAddr::V4(*b.ip()), b.port()), (to.ip(), to.port()), flags, rng.u32(), rng.u32())));
        out.push(inj.frame(Frame::udp((IpAddr::V4(*b.ip()), b.port()), (to.ip(), to.port()), &rng.bytes(8))));
        // New tuples, TCP and UDP, IPv4 and IPv6 (with extension headers).
        out.push(inj.frame(Frame::tcp((IpAddr::V4(CLIENT_ADDR), rng.u16()), (vip.ip(), vip.port()), flags, rng.u32(), rng.u32())));
        out.push(inj.frame(Frame::udp((IpAddr::V4(CLIENT_ADDR), rng.u16()), (vip.ip(), 53), &rng.bytes(16))));
        let src6 = if rng.chance(1, 2) { spoofed_v6(rng) } else { (IpAddr::V6(CLIENT_ADDR6), rng.u16()) };
        let mut six = Frame::tcp(src6, (IpAddr::V6(VIP6), 80), flags, rng.u32(), rng.u32());
        let exts = rng.below(4);
        six.ext = (0..exts)
            .map(|_| {
                let kind = *rng.pick(&[0u8, 43, 44, 60]);
                (kind, 8 * rng.range(1, 4))
            })
            .collect();
        out.push(inj.frame(six));
        // ICMP errors quoting a live flow (the IP header and 8 bytes).
        let quoted = Frame::tcp((vip.ip(), vip.port()), (client.ip(), client.port()), TCP_ACK, rng.u32(), rng.u32()).build();
        let body = &quoted[14..14 + 28];
        let (ty, code) = (*rng.pick(&[3u8, 11, 12]), rng.u8() & 0x0f);
        let icmp = attack::icmp4(ty, code, [0, 0, 0x05, 0x78], body);
        out.push(inj.eth(0x0800, &attack::ipv4_packet(CLIENT_ADDR, VIP, 1, &icmp)));
    }
    out
}

#[test]
fn thirty_seconds_of_mutated_packets_break_none_of_50_echo_flows_and_leave_only_bounded_half_open_state() {
    let _turn = one_at_a_time();
    let topo = topology(2);
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, &["--conn-capacity", "4096", "--half-open-capacity", "1024"]).expect("daemon");
    let _servers = topo.tcp_servers(PORT).expect("servers");
    let vip = topo.vip_sock(80);
    service(&daemon, &topo, vip, PORT, &[]);
    let mut flows = echo_flows(&topo, vip, 50);
    let tuples: Vec<(SocketAddr, SocketAddr)> = flows.iter().map(|f| (f.local, f.vip)).collect();
    let inj = injector(&topo);
    let (mut rng, seed) = Rng::from_env_or_entropy();
    let started = Instant::now();
    let (mut sent, mut rounds) = (0usize, 0usize);
    let mut broken: Vec<(usize, String)> = Vec::new();
    while started.elapsed() < Duration::from_secs(30) {
        let bases = fuzz_bases(&mut rng, &inj, &topo, &tuples);
        let frames: Vec<Vec<u8>> = bases.into_iter().flat_map(|b| [b.clone(), mutate(&mut rng, b.clone()), mutate(&mut rng, b)]).collect();
        sent += inj.send(&frames).0;
        // Every flow talks between rounds of the attack.
        rounds += 1;
        if rounds % 20 == 0 {
            for (i, f) in flows.iter_mut().enumerate() {
                if let Err(e) = check(f, &format!("round {rounds}")) {
                    broken.push((i, e));
                }
            }
            if !broken.is_empty() {
                break;
            }
        }
    }
    let over = Instant::now();
    for (i, f) in flows.iter_mut().enumerate() {
        if let Err(e) = check(f, "after") {
            broken.push((i, e));
        }
    }
    let s = status_after(&daemon, over);
    eprintln!("mutations (seed {seed}): {sent} frames in {:?}, {rounds} rounds; table {}; counters {}", started.elapsed(), s["table"], s["counters"]);
    assert!(broken.is_empty(), "mutated packets (seed {seed}) broke {} of 50 echo flows; first: {}", broken.len(), first(&broken));
    assert!(sent > 100_000, "the attack sent only {sent} frames");
    // In the connection table: the 50 flows and nothing else; the attack's
    // own state stays within the half-open table's bound.
    if s["table"]["entries"] != 50 {
        let dump = std::process::Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(daemon.pin_dir.join("XLB_CONNS")).output().expect("bpftool");
        std::fs::write("/tmp/tr/conns.json", &dump.stdout).expect("write");
        panic!("the connection table holds what the attack made (seed {seed}): {:#}", s["table"]);
    }
    assert!(s["table"]["half_open_entries"].as_u64().unwrap_or(u64::MAX) <= 1024, "{:#}", s["table"]);
}
