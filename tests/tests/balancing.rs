//! End-to-end balancing through the XDP program with real kernel TCP/UDP
//! stacks in network namespaces (client → lb → backends).

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpListener, UdpSocket},
    sync::atomic::Ordering,
    time::Duration,
};

use testbed::{
    Daemon, LineClient, TcpNameServer, Topology, TopologyOptions, UdpNameServer, in_netns,
    topology::{CLIENT_ADDR, LB_CLIENT_SIDE},
};

const BACKEND_PORT: u16 = 8080;

fn require_root() {
    assert!(testbed::have_privileges(), "these tests need root (netns, XDP): run them with `cargo xtask test`");
}

/// Topology + daemon + one TCP name server per backend, service on VIP:80.
struct Bed {
    servers: Vec<TcpNameServer>,
    daemon: Daemon,
    topo: Topology,
}

fn bed(backends: usize, weights: &[u32]) -> Bed {
    bed_with(backends, weights, &[], false)
}

fn bed_with(backends: usize, weights: &[u32], daemon_args: &[&str], v6: bool) -> Bed {
    bed_on(TopologyOptions { backends, ..Default::default() }, weights, daemon_args, v6)
}

fn bed_on(opts: TopologyOptions, weights: &[u32], daemon_args: &[&str], v6: bool) -> Bed {
    require_root();
    let backends = opts.backends;
    let topo = Topology::new(opts).expect("topology");
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, daemon_args).expect("daemon");
    let servers = topo.tcp_servers_of(v6, BACKEND_PORT).expect("servers");
    let vip = topo.vip_of(v6, 80).to_string();
    // Round robin: these tests check exact weighted shares.
    daemon.ok(&["service", "add", &vip, "--scheduler", "wrr"]).expect("service add");
    for i in 0..backends {
        let w = weights.get(i).copied().unwrap_or(1).to_string();
        daemon.ok(&["backend", "add", &vip, &topo.backend_of(v6, i, BACKEND_PORT).to_string(), "--weight", &w]).expect("backend add");
    }
    Bed { servers, daemon, topo }
}

#[test]
fn sequential_connections_follow_weights_and_replies_come_from_the_vip() {
    sequential_connections(false);
}

#[test]
fn ipv6_sequential_connections_follow_weights_and_replies_come_from_the_vip() {
    sequential_connections(true);
}

#[test]
fn sequential_connections_follow_weights_behind_a_switch() {
    sequential_connections_on(TopologyOptions { backends: 3, switched: true, ..Default::default() }, false);
    sequential_connections_on(TopologyOptions { backends: 3, switched: true, ..Default::default() }, true);
}

fn sequential_connections(v6: bool) {
    sequential_connections_on(TopologyOptions { backends: 3, ..Default::default() }, v6);
}

fn sequential_connections_on(opts: TopologyOptions, v6: bool) {
    let weights = [1, 1, 2];
    let b = bed_on(opts, &weights, &[], v6);
    let vip = b.topo.vip_of(v6, 80);
    let mut per_backend: HashMap<String, u32> = HashMap::new();
    for i in 0..300 {
        let mut c = LineClient::connect(&b.topo.client.name, vip).expect("connect to VIP");
        // The client's socket is connected to the VIP: the kernel accepts only
        // segments from VIP:80, so any answer proves the source was rewritten.
        assert_eq!(c.stream().peer_addr().expect("peer"), vip);
        let name = c.ask(&format!("hello {i}")).expect("answer through the VIP");
        *per_backend.entry(name).or_default() += 1;
    }
    let total: u32 = weights.iter().sum();
    for (i, w) in weights.iter().enumerate() {
        let got = per_backend.get(&format!("b{i}")).copied().unwrap_or(0) as f64;
        let want = 300.0 * *w as f64 / total as f64;
        assert!((got - want).abs() <= want * 0.10, "backend b{i} (weight {w}) served {got}, expected {want} ±10%: {per_backend:?}");
    }
    // DNAT keeps the client's address: backends see the client, not the lb.
    for s in &b.servers {
        let peers = s.seen.peers.lock().expect("lock");
        assert!(!peers.is_empty(), "{} saw no connection", s.name);
        assert!(peers.keys().all(|p| p.ip() == Topology::client_addr(v6)), "{} saw {peers:?}", s.name);
    }
    let status = b.daemon.json(&["status"]).expect("status");
    let svc = &status["services"][0];
    assert_eq!(svc["traffic"]["new_flows"], 300, "{status:#}");
    assert!(svc["traffic"]["packets_out"].as_u64().unwrap_or(0) >= 600, "{status:#}");
}

#[test]
fn long_lived_connections_stay_on_their_backend_and_are_listed() {
    long_lived_connections(false);
}

#[test]
fn ipv6_long_lived_connections_stay_on_their_backend_and_are_listed() {
    long_lived_connections(true);
}

fn long_lived_connections(v6: bool) {
    let b = bed_with(3, &[1, 1, 1], &[], v6);
    let vip = b.topo.vip_of(v6, 80);
    let ns = b.topo.client.name.clone();
    // 100 connections, each sending 20 messages over ~5 s.
    let mut clients: Vec<LineClient> = (0..100).map(|_| LineClient::connect(&ns, vip).expect("connect")).collect();
    let mut first: Vec<String> = Vec::new();
    for c in clients.iter_mut() {
        first.push(c.ask("m0").expect("first answer"));
    }
    let listed = b.daemon.json(&["flows", "--service", &vip.to_string()]).expect("flows");
    let listed = listed.as_array().expect("flow array").clone();
    assert_eq!(listed.len(), 100, "flows listed: {listed:#?}");
    let mut by_port: HashMap<u16, String> = HashMap::new();
    for f in &listed {
        let client: SocketAddr = f["client"].as_str().expect("client").parse().expect("addr");
        assert_eq!(f["state"], "established", "{f}");
        assert_eq!(f["proto"], "tcp");
        by_port.insert(client.port(), f["backend"].as_str().expect("backend").to_owned());
    }
    for (c, name) in clients.iter().zip(&first) {
        let port = c.stream().local_addr().expect("local").port();
        let backend = by_port.get(&port).unwrap_or_else(|| panic!("client port {port} not listed"));
        let idx: usize = name[1..].parse().expect("backend index");
        assert_eq!(*backend, b.topo.backend_of(v6, idx, BACKEND_PORT).to_string(), "flow table and answers disagree");
    }
    // One backend's flows only: who would be reset if it went now.
    let b0 = b.topo.backend_of(v6, 0, BACKEND_PORT).to_string();
    let only = b.daemon.json(&["flows", "--backend", &b0]).expect("flows --backend");
    let only = only.as_array().expect("array");
    assert_eq!(only.len(), first.iter().filter(|n| *n == "b0").count());
    assert!(only.iter().all(|f| f["backend"] == b0.as_str()));
    for round in 1..20 {
        std::thread::sleep(Duration::from_millis(250));
        for (c, name) in clients.iter_mut().zip(&first) {
            let got = c.ask(&format!("m{round}")).expect("answer");
            assert_eq!(&got, name, "a connection moved to another backend in round {round}");
        }
    }
    let requests: u64 = b.servers.iter().map(|s| s.seen.requests.load(Ordering::Relaxed)).sum();
    assert_eq!(requests, 2000);
}

#[test]
fn udp_request_response_is_sticky_per_flow() {
    udp_sticky(false);
}

#[test]
fn ipv6_udp_request_response_is_sticky_per_flow() {
    udp_sticky(true);
}

fn udp_sticky(v6: bool) {
    require_root();
    let topo = Topology::new(TopologyOptions { backends: 3, ..Default::default() }).expect("topology");
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, &[]).expect("daemon");
    let _servers: Vec<UdpNameServer> = topo.udp_servers_of(v6, 5353).expect("udp servers");
    let vip_sock = topo.vip_of(v6, 53);
    let vip = vip_sock.to_string();
    daemon.ok(&["service", "add", &vip, "--proto", "udp", "--scheduler", "wrr"]).expect("service");
    for i in 0..3 {
        daemon.ok(&["backend", "add", &vip, &topo.backend_of(v6, i, 5353).to_string()]).expect("backend");
    }
    let mut used = std::collections::HashSet::new();
    let any = if v6 { "[::]:0" } else { "0.0.0.0:0" };
    for flow in 0..12 {
        let sock = in_netns(&topo.client.name, || UdpSocket::bind(any)).expect("ns").expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        let mut first = None;
        for i in 0..10 {
            let msg = format!("f{flow} d{i}");
            // UDP may lose a datagram: retry a bounded number of times.
            let mut answer = None;
            for _ in 0..3 {
                sock.send_to(msg.as_bytes(), vip_sock).expect("send");
                let mut buf = [0u8; 256];
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    assert_eq!(from, vip_sock, "reply not from the VIP");
                    answer = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
                    break;
                }
            }
            let answer = answer.unwrap_or_else(|| panic!("no answer to {msg}"));
            let (name, echoed) = answer.split_once(' ').expect("answer format");
            assert_eq!(echoed, msg);
            match &first {
                None => first = Some(name.to_owned()),
                Some(f) => assert_eq!(f, name, "flow {flow} moved between backends"),
            }
        }
        used.insert(first.expect("answered"));
    }
    assert_eq!(used.len(), 3, "12 flows over 3 equal backends use all of them: {used:?}");
}

#[test]
fn traffic_to_the_lb_host_itself_passes_untouched() {
    let b = bed(1, &[1]);
    // A server on the lb's own address, port 9000: not a service.
    let listener = in_netns(&b.topo.lb.name, || TcpListener::bind((LB_CLIENT_SIDE, 9000))).expect("ns").expect("bind");
    let before = b.daemon.json(&["status"]).expect("status")["counters"]["pass_not_service"].as_u64().unwrap_or(0);
    let handle = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().expect("accept");
        use std::io::Write as _;
        s.write_all(b"lb-host\n").expect("write");
        peer
    });
    let mut c = in_netns(&b.topo.client.name, || std::net::TcpStream::connect_timeout(&SocketAddr::from((LB_CLIENT_SIDE, 9000)), Duration::from_secs(5)))
        .expect("ns")
        .expect("connect to the lb host");
    let mut buf = String::new();
    use std::io::Read as _;
    c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    c.read_to_string(&mut buf).expect("read");
    assert_eq!(buf, "lb-host\n");
    let peer = handle.join().expect("server thread");
    assert_eq!(peer.ip(), CLIENT_ADDR);
    let after = b.daemon.json(&["status"]).expect("status")["counters"]["pass_not_service"].as_u64().unwrap_or(0);
    assert!(after > before, "pass counter did not move: {before} → {after}");
    // The VIP itself still answers ICMP through the kernel (not TCP/UDP).
    let ping = b.topo.client.exec("ping", &["-c", "1", "-W", "2", &testbed::topology::VIP.to_string()]);
    assert!(ping.is_ok(), "ping to the VIP failed: {ping:?}");
}

#[test]
fn generic_xdp_mode_balances_the_same_way() {
    let b = bed_with(2, &[1, 1], &["--xdp-mode", "generic"], false);
    let status = b.daemon.json(&["status"]).expect("status");
    assert!(status["interfaces"].as_array().expect("interfaces").iter().all(|i| i["mode"] == "generic"), "{status:#}");
    let vip = b.topo.vip_sock(80);
    let mut per_backend: HashMap<String, u32> = HashMap::new();
    for i in 0..40 {
        let mut c = LineClient::connect(&b.topo.client.name, vip).expect("connect");
        *per_backend.entry(c.ask(&format!("g{i}")).expect("answer")).or_default() += 1;
    }
    // The round-robin cursor is per CPU: each CPU alternates exactly, so the
    // two counts differ by at most one per CPU.
    let (b0, b1) = (per_backend.get("b0").copied().unwrap_or(0), per_backend.get("b1").copied().unwrap_or(0));
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    assert_eq!(b0 + b1, 40, "{per_backend:?}");
    assert!(b0.abs_diff(b1) <= cpus, "{per_backend:?} with {cpus} CPUs");
}
