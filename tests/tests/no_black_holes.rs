//! No black holes: when a backend goes away, every client of it learns at
//! once (real kernel TCP through client → lb → backend namespaces).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use testbed::{Daemon, LineClient, Outcome, TcpNameServer, Topology, TopologyOptions, wait_for, watch_idle};

const PORT: u16 = 8080;

struct Bed {
    servers: Vec<Option<TcpNameServer>>,
    daemon: Daemon,
    topo: Topology,
    v6: bool,
}

/// `backends` namespaces with name servers; the service on VIP:80 gets the
/// first `registered` of them.
fn bed(backends: usize, registered: usize, service_args: &[&str], daemon_args: &[&str]) -> Bed {
    bed_of(false, false, backends, registered, service_args, daemon_args)
}

/// As [`bed`], over IPv6 (`v6`), or with backends that have no route but
/// their own link (`isolated`: full-NAT services).
fn bed_of(v6: bool, isolated: bool, backends: usize, registered: usize, service_args: &[&str], daemon_args: &[&str]) -> Bed {
    bed_on(v6, TopologyOptions { backends, isolated_backends: isolated, ..Default::default() }, registered, service_args, daemon_args)
}

fn bed_on(v6: bool, opts: TopologyOptions, registered: usize, service_args: &[&str], daemon_args: &[&str]) -> Bed {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let topo = Topology::new(opts).expect("topology");
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, daemon_args).expect("daemon");
    let servers = topo.tcp_servers_of(v6, PORT).expect("servers").into_iter().map(Some).collect();
    let vip = topo.vip_of(v6, 80).to_string();
    // Round robin: predictable shares per backend.
    let mut args = vec!["service", "add", vip.as_str(), "--scheduler", "wrr"];
    args.extend_from_slice(service_args);
    daemon.ok(&args).expect("service add");
    let b = Bed { servers, daemon, topo, v6 };
    for i in 0..registered {
        b.add(i);
    }
    b
}

impl Bed {
    fn vip(&self) -> String {
        self.topo.vip_of(self.v6, 80).to_string()
    }
    fn backend(&self, i: usize) -> String {
        self.topo.backend_of(self.v6, i, PORT).to_string()
    }
    fn add(&self, i: usize) {
        self.daemon.ok(&["backend", "add", &self.vip(), &self.backend(i)]).expect("backend add");
    }
    fn connect(&self) -> LineClient {
        LineClient::connect(&self.topo.client.name, self.topo.vip_of(self.v6, 80)).expect("connect to the VIP")
    }
    /// `n` idle clients, each having said hello; returns them with the
    /// backend that answered.
    fn idle_clients(&self, n: usize) -> Vec<(LineClient, String)> {
        (0..n)
            .map(|i| {
                let mut c = self.connect();
                let who = c.ask(&format!("hello {i}")).expect("hello");
                (c, who)
            })
            .collect()
    }
    fn backend_status(&self, i: usize) -> serde_json::Value {
        let s = self.daemon.json(&["status"]).expect("status");
        s["services"][0]["backends"].as_array().expect("backends").iter().find(|b| b["backend"] == self.backend(i)).cloned().unwrap_or(serde_json::Value::Null)
    }
}

fn resets_within(outcomes: &[Outcome], limit: Duration) -> usize {
    outcomes.iter().filter(|o| matches!(o, Outcome::Reset(t) if *t <= limit)).count()
}

#[test]
fn red_black_deploy_resets_every_idle_client_at_once_and_loses_nothing_silently() {
    red_black(bed(4, 2, &[], &[]));
}

#[test]
fn red_black_deploy_over_ipv6() {
    red_black(bed_of(true, false, 4, 2, &[], &[]));
}

#[test]
fn red_black_deploy_in_full_nat_mode() {
    // Backends without a route back to clients: only full NAT reaches them.
    red_black(bed_of(false, true, 4, 2, &["--mode", "fullnat"], &[]));
}

#[test]
fn red_black_deploy_behind_a_switch() {
    red_black(bed_on(false, TopologyOptions { backends: 4, switched: true, ..Default::default() }, 2, &[], &[]));
}

#[test]
fn red_black_deploy_in_full_nat_mode_behind_a_switch() {
    red_black(bed_on(false, TopologyOptions { backends: 4, switched: true, isolated_backends: true }, 2, &["--mode", "fullnat"], &[]));
}

/// 200 idle clients on the two old backends; the new ones join, the old
/// ones leave: every client is reset at once, nothing is lost silently.
fn red_black(b: Bed) {
    let mut clients = b.idle_clients(200);
    let on_old = clients.iter().filter(|(_, w)| w == "b0" || w == "b1").count();
    assert_eq!(on_old, 200, "all clients start on the old backends");
    // Deploy: the new backends join, then the old ones leave (policy reset).
    b.add(2);
    b.add(3);
    let start = Instant::now();
    b.daemon.ok(&["backend", "remove", &b.vip(), &b.backend(0)]).expect("remove b0");
    b.daemon.ok(&["backend", "remove", &b.vip(), &b.backend(1)]).expect("remove b1");
    let streams: Vec<&std::net::TcpStream> = clients.iter().map(|(c, _)| c.stream()).collect();
    let outcomes = watch_idle(&streams, start, Duration::from_secs(3));
    assert_eq!(
        resets_within(&outcomes, Duration::from_secs(1)),
        200,
        "every idle client must see ECONNRESET within 1 s without sending: {:?}",
        outcomes.iter().filter(|o| !matches!(o, Outcome::Reset(t) if *t <= Duration::from_secs(1))).collect::<Vec<_>>()
    );

    // Every message sent after the removal either fails at the client or
    // reaches a live backend.
    let before: u64 = (2..4).map(|i| b.servers[i].as_ref().map_or(0, |s| s.seen.requests.load(std::sync::atomic::Ordering::Relaxed))).sum();
    let (mut failed_loudly, mut delivered) = (0, 0);
    for (i, (c, _)) in clients.iter_mut().enumerate() {
        match c.send(&format!("late {i}")) {
            Err(_) => failed_loudly += 1,
            Ok(()) => match c.answer(&format!("late {i}")) {
                Ok(who) => {
                    assert!(who == "b2" || who == "b3", "a late message reached {who}");
                    delivered += 1;
                }
                Err(_) => failed_loudly += 1,
            },
        }
        let mut again = b.connect();
        let who = again.ask(&format!("reconnected {i}")).expect("reconnect through the VIP");
        assert!(who == "b2" || who == "b3", "reconnect landed on {who}");
        delivered += 1;
    }
    assert_eq!(failed_loudly + delivered, 400, "a message went missing silently");
    let after: u64 = (2..4).map(|i| b.servers[i].as_ref().map_or(0, |s| s.seen.requests.load(std::sync::atomic::Ordering::Relaxed))).sum();
    assert_eq!(after - before, delivered as u64, "delivered messages must be exactly those the new backends received");
    eprintln!("red/black: 200/200 reset within 1 s; after removal {failed_loudly} messages failed loudly, {delivered} delivered");
    let s = b.daemon.json(&["status"]).expect("status");
    assert_eq!(s["services"][0]["resets"]["removed"], 200, "{s:#}");
}

/// What the connection loops saw.
#[derive(Default)]
struct Loops {
    /// Exchanges completed, by backend, split at the apply's answer.
    before: HashMap<String, u64>,
    after: HashMap<String, u64>,
    failures: Vec<String>,
}

#[test]
fn red_black_through_apply_while_200_clients_connect_in_a_loop_fails_no_new_connection() {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    };
    // b0 and b1 serve; the deploy replaces them with b2 in one apply. Their
    // flows drain (they end by themselves: each exchange is short).
    let b = bed(3, 2, &["--on-remove", "drain:10s"], &[]);
    let no_backend = |b: &Bed| b.daemon.json(&["status"]).expect("status")["counters"]["pass_no_backend"].as_u64().unwrap_or(0);
    let refused_before = no_backend(&b);
    let stop = Arc::new(AtomicBool::new(false));
    let applied = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Loops::default()));
    let deadline = Instant::now() + Duration::from_secs(30);
    let loops: Vec<_> = (0..200)
        .map(|i| {
            let (stop, applied, seen) = (stop.clone(), applied.clone(), seen.clone());
            let (ns, vip) = (b.topo.client.name.clone(), b.topo.vip_of(false, 80));
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    // Whether the apply had answered before this connection began.
                    let after = applied.load(Ordering::Relaxed);
                    let got = LineClient::connect(&ns, vip).and_then(|mut c| c.ask(&format!("loop {i} {n}")));
                    let mut s = seen.lock().expect("lock");
                    match got {
                        Ok(who) => *(if after { &mut s.after } else { &mut s.before }).entry(who).or_default() += 1,
                        Err(e) => s.failures.push(format!("loop {i} connection {n}: {e:#}")),
                    }
                    n += 1;
                }
            })
        })
        .collect();
    let total = |m: &HashMap<String, u64>| m.values().sum::<u64>();
    wait_for("the loops to be running", Duration::from_secs(15), || (total(&seen.lock().expect("lock").before) >= 1000).then_some(())).expect("loops");
    // The deploy, as an orchestrator does it: export, edit, apply.
    let mut config: serde_json::Value = serde_json::from_str(&b.daemon.ok(&["export"]).expect("export")).expect("export is JSON");
    config["services"][0]["backends"] = serde_json::json!([{ "backend": b.backend(2), "weight": 1 }]);
    let file = std::env::temp_dir().join(format!("{}-apply.json", b.topo.prefix));
    std::fs::write(&file, config.to_string()).expect("write the config");
    let out = b.daemon.ok(&["apply", "-f", file.to_str().expect("path")]);
    let _ = std::fs::remove_file(&file);
    out.expect("apply");
    applied.store(true, Ordering::Relaxed);
    wait_for("connections after the apply", Duration::from_secs(15), || (total(&seen.lock().expect("lock").after) >= 1000).then_some(())).expect("loops after");
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.join().expect("loop thread");
    }
    let s = seen.lock().expect("lock");
    assert!(
        s.failures.is_empty(),
        "{} of {} connections failed, first: {:?}",
        s.failures.len(),
        total(&s.before) + total(&s.after) + s.failures.len() as u64,
        &s.failures[..s.failures.len().min(5)]
    );
    assert_eq!(no_backend(&b), refused_before, "no new flow met an empty ring");
    assert!(s.before.contains_key("b0") && s.before.contains_key("b1"), "{:?}", s.before);
    assert_eq!(s.after.keys().collect::<Vec<_>>(), vec!["b2"], "after the apply every new connection goes to b2: {:?}", s.after);
    eprintln!("red/black through apply: {} connections before, {} after, none failed", total(&s.before), total(&s.after));
}

#[test]
fn a_dead_backend_is_detected_and_its_flows_reset_while_others_serve_on() {
    let (interval, fall) = (Duration::from_millis(500), 2u32);
    let b = bed(3, 3, &["--health", "tcp", "--health-interval", "500ms", "--health-timeout", "300ms", "--fall", "2", "--rise", "2"], &[]);
    let mut b = b;
    let clients = b.idle_clients(150);
    let on_b0: Vec<&LineClient> = clients.iter().filter(|(_, w)| w == "b0").map(|(c, _)| c).collect();
    // Round robin (per-CPU cursors) puts about a third on b0.
    assert!((45..=55).contains(&on_b0.len()), "{} flows on b0", on_b0.len());
    let n_b0 = on_b0.len();
    // The backend host dies: its server stops and its link goes silent.
    let dead = Instant::now();
    b.topo.backends[0].ip(&["link", "set", "b0", "down"]).expect("link down");
    b.servers[0] = None;
    let budget = interval * fall + Duration::from_secs(1);
    let marked = wait_for("b0 to be marked down", budget + Duration::from_secs(2), || (b.backend_status(0)["state"] == "down").then(|| dead.elapsed()))
        .expect("b0 marked down");
    assert!(marked <= budget, "marked down after {marked:?}, budget {budget:?}");
    let streams: Vec<&std::net::TcpStream> = on_b0.iter().map(|c| c.stream()).collect();
    let outcomes = watch_idle(&streams, dead, budget + Duration::from_secs(1));
    assert_eq!(resets_within(&outcomes, budget + Duration::from_secs(1)), n_b0, "{outcomes:?}");
    // After detection: every new connection succeeds, on the live backends.
    let mut per: HashMap<String, u32> = HashMap::new();
    for i in 0..100 {
        let mut c = b.connect();
        *per.entry(c.ask(&format!("after {i}")).expect("new connection after detection")).or_default() += 1;
    }
    assert_eq!(per.get("b0"), None, "{per:?}");
    assert_eq!(per.values().sum::<u32>(), 100);
    let s = b.daemon.json(&["status"]).expect("status");
    assert_eq!(s["services"][0]["resets"]["unhealthy"], n_b0 as u64, "{s:#}");
    assert_eq!(b.backend_status(0)["resets"]["unhealthy"], n_b0 as u64, "per-backend reset count");
    assert_eq!(b.backend_status(1)["resets"]["unhealthy"], 0);
    // The other backends' flows were untouched.
    let mut clients = clients;
    for (c, w) in clients.iter_mut().filter(|(_, w)| w != "b0") {
        assert_eq!(&c.ask("still there").expect("a flow on a live backend survived"), w);
    }
}

#[test]
fn drain_lets_short_flows_finish_and_resets_a_long_one_at_the_deadline() {
    let b = bed(2, 1, &["--on-remove", "drain:3s"], &[]);
    b.add(1);
    // Flows on b0: several short ones and one long one (b0 is the ring's first pick).
    let mut on_b0: Vec<LineClient> = Vec::new();
    let mut others = Vec::new();
    while on_b0.len() < 6 {
        let mut c = b.connect();
        if c.ask("which").expect("ask") == "b0" { on_b0.push(c) } else { others.push(c) }
    }
    let mut long = on_b0.pop().expect("long flow");
    let start = Instant::now();
    b.daemon.ok(&["backend", "remove", &b.vip(), &b.backend(0)]).expect("remove");
    // Short flows finish normally during the drain.
    for (i, mut c) in on_b0.into_iter().enumerate() {
        assert_eq!(c.ask(&format!("last {i}")).expect("a draining flow still works"), "b0");
        c.stream().shutdown(std::net::Shutdown::Both).expect("close");
    }
    // New flows go elsewhere.
    for _ in 0..4 {
        assert_eq!(b.connect().ask("new").expect("new"), "b1");
    }
    assert_eq!(b.backend_status(0)["state"], "draining");
    // The long flow works until the deadline...
    std::thread::sleep(Duration::from_millis(2000).saturating_sub(start.elapsed()));
    assert_eq!(long.ask("still here").expect("not reset before the deadline"), "b0");
    assert!(start.elapsed() < Duration::from_secs(3));
    // ...and is reset at it.
    let outcome = watch_idle(&[long.stream()], start, Duration::from_secs(5));
    match outcome[0] {
        Outcome::Reset(t) => assert!(t >= Duration::from_secs(3) && t < Duration::from_millis(4500), "reset at {t:?}"),
        o => panic!("the long flow was not reset: {o:?}"),
    }
    let s = b.daemon.json(&["status"]).expect("status");
    assert_eq!(s["services"][0]["resets"]["drain_deadline"], 1, "{s:#}");
}

#[test]
fn without_the_proactive_walk_a_client_that_writes_gets_the_rst_from_xdp() {
    let b = bed(1, 1, &[], &["--test-disable-proactive-reset"]);
    let mut clients = b.idle_clients(3);
    let start = Instant::now();
    b.daemon.ok(&["backend", "remove", &b.vip(), &b.backend(0)]).expect("remove");
    // Nothing is sent to idle clients in this mode...
    let quiet = watch_idle(&[clients[0].0.stream()], start, Duration::from_millis(500));
    assert_eq!(quiet[0], Outcome::Silent);
    // ...but the first write is answered by the XDP program with a RST.
    let (c, _) = &mut clients[0];
    c.send("anyone?").expect("the write itself is accepted locally");
    let outcome = watch_idle(&[c.stream()], Instant::now(), Duration::from_secs(2));
    assert!(matches!(outcome[0], Outcome::Reset(_)), "{outcome:?}");
    let s = b.daemon.json(&["status"]).expect("status");
    assert!(s["counters"]["rst_reactive"].as_u64().unwrap_or(0) >= 1, "{s:#}");
    assert!(s["services"][0]["traffic"]["reactive_resets"].as_u64().unwrap_or(0) >= 1, "per-service reactive resets: {s:#}");
}

#[test]
fn a_spoofed_rst_does_not_kill_a_live_flow_and_late_packets_create_no_state() {
    let b = bed(1, 1, &[], &[]);
    let mut c = b.connect();
    assert_eq!(c.ask("hi").expect("hi"), "b0");
    let local = c.stream().local_addr().expect("local");
    // An attacker on the client side sends RSTs with guessed sequence numbers.
    let spoof = |seq: u32| {
        let r = lb_common::rst::Rst {
            src: lb_common::maps::addr_from_ip(local.ip()),
            dst: lb_common::maps::addr_from_ip(b.topo.vip_sock(80).ip()),
            sport: local.port().to_be_bytes(),
            dport: 80u16.to_be_bytes(),
            seq,
            ack: None,
        };
        testbed::in_netns(&b.topo.client.name, || xlb::resets::rst::RstSender::new().and_then(|s| s.send(&r))).expect("ns").expect("send spoofed RST");
    };
    for seq in [0u32, 1, 0x8000_0000, 12345] {
        spoof(seq);
    }
    assert_eq!(c.ask("still alive?").expect("the flow survived spoofed RSTs"), "b0");
    let flows = b.daemon.json(&["flows"]).expect("flows");
    assert_eq!(flows.as_array().map(Vec::len), Some(1), "{flows}");
    let s = b.daemon.json(&["status"]).expect("status");
    assert!(s["counters"]["rst_ignored"].as_u64().unwrap_or(0) >= 4, "{s:#}");
    // After the flow is reset (backend removed), late segments recreate nothing.
    b.daemon.ok(&["backend", "remove", &b.vip(), &b.backend(0)]).expect("remove");
    for seq in [1u32, 2, 3] {
        spoof(seq); // a RST without state
    }
    let _ = c.send("late");
    std::thread::sleep(Duration::from_millis(200));
    let flows = b.daemon.json(&["flows"]).expect("flows");
    assert_eq!(flows.as_array().map(Vec::len), Some(0), "late packets created state: {flows}");
}

#[test]
fn reset_spread_paces_a_mass_reset_over_the_window() {
    let b = bed(1, 1, &["--reset-spread", "2s"], &[]);
    let clients = b.idle_clients(200);
    let start = Instant::now();
    b.daemon.ok(&["backend", "remove", &b.vip(), &b.backend(0)]).expect("remove");
    let streams: Vec<&std::net::TcpStream> = clients.iter().map(|(c, _)| c.stream()).collect();
    let outcomes = watch_idle(&streams, start, Duration::from_secs(5));
    let mut times: Vec<Duration> = outcomes
        .iter()
        .map(|o| match o {
            Outcome::Reset(t) => *t,
            o => panic!("a client was not reset: {o:?}"),
        })
        .collect();
    times.sort();
    let (first, last) = (times[0], times[199]);
    assert!(first < Duration::from_millis(500), "first reset at {first:?}");
    assert!(last >= Duration::from_millis(1700) && last < Duration::from_secs(3), "last reset at {last:?}");
    // Roughly uniform: every half second of the window gets a share.
    for q in 0..4 {
        let lo = Duration::from_millis(500 * q);
        let hi = lo + Duration::from_millis(500);
        let n = times.iter().filter(|t| **t >= lo && **t < hi).count();
        assert!(n >= 25, "only {n} resets in [{lo:?}, {hi:?}): {times:?}");
    }
}

#[test]
fn http_health_checks_take_a_backend_out_and_bring_it_back_after_rise() {
    // Backends that serve HTTP on the service port, with a switchable status.
    let topo = Topology::new(TopologyOptions { backends: 2, ..Default::default() }).expect("topology");
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, &[]).expect("daemon");
    let http: Vec<testbed::HttpStatusServer> = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, n)| testbed::HttpStatusServer::start(&n.name, &format!("b{i}"), "0.0.0.0:8080".parse().expect("addr"), 200).expect("http"))
        .collect();
    let vip = topo.vip(80).to_string();
    daemon
        .ok(&[
            "service",
            "add",
            &vip,
            "--scheduler",
            "wrr",
            "--health",
            "http:/healthz",
            "--health-interval",
            "200ms",
            "--health-timeout",
            "150ms",
            "--fall",
            "2",
            "--rise",
            "3",
        ])
        .expect("service");
    for i in 0..2 {
        daemon.ok(&["backend", "add", &vip, &topo.backend(i, 8080).to_string()]).expect("backend");
    }
    let state = |i: usize| -> String {
        let s = daemon.json(&["status"]).expect("status");
        s["services"][0]["backends"][i]["state"].as_str().unwrap_or("?").to_owned()
    };
    wait_for("probes to reach b0", Duration::from_secs(3), || (http[0].requests.load(std::sync::atomic::Ordering::Relaxed) >= 2).then_some(()))
        .expect("probed");
    assert_eq!(state(0), "up");
    // A 503 is a failure: down after `fall` probes.
    http[0].status.store(503, std::sync::atomic::Ordering::Relaxed);
    let t = Instant::now();
    wait_for("b0 down", Duration::from_secs(3), || (state(0) == "down").then_some(())).expect("down");
    assert!(t.elapsed() <= Duration::from_millis(2 * 200 + 1000), "down after {:?}", t.elapsed());
    let s = daemon.json(&["status"]).expect("status");
    assert!(s["services"][0]["backends"][0]["last_health_error"].as_str().unwrap_or("").contains("503"), "{s:#}");
    assert_eq!(state(1), "up");
    // Back after `rise` successes, and new flows reach it again.
    http[0].status.store(200, std::sync::atomic::Ordering::Relaxed);
    let t = Instant::now();
    wait_for("b0 up again", Duration::from_secs(3), || (state(0) == "up").then_some(())).expect("up");
    assert!(t.elapsed() >= Duration::from_millis(2 * 200), "came back after only {:?}: rise is 3", t.elapsed());
    let mut on_b0 = 0;
    for _ in 0..6 {
        let c = testbed::in_netns(&topo.client.name, || std::net::TcpStream::connect_timeout(&topo.vip_sock(80), Duration::from_secs(2)))
            .expect("ns")
            .expect("connect");
        use std::io::{Read, Write};
        let mut c = c;
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
        let mut buf = String::new();
        c.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        let _ = c.read_to_string(&mut buf);
        assert!(buf.starts_with("HTTP/1.1 200"), "{buf:?}");
        if buf.starts_with("HTTP/1.1 200 b0\r\n") {
            on_b0 += 1;
        }
    }
    assert!(on_b0 >= 2, "b0 gets new flows again: {on_b0} of 6");
}
