//! Works on the hosts people run it on: kernel-default offloads (partial
//! checksums, TSO) and sysctls everywhere, backends behind a switch, a
//! fresh host, a daemon killed and its interfaces re-created.

use std::{
    collections::{HashMap, HashSet},
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use testbed::{BulkServer, Daemon, LineClient, TcpNameServer, Topology, TopologyOptions, UdpNameServer, download, in_netns, wait_for};

fn require_root() {
    assert!(testbed::have_privileges(), "these tests need root (netns, XDP): run them with `cargo xtask test`");
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Dnat,
    Fullnat,
    Dsr,
}

/// One service in `mode` on the switched topology with kernel defaults:
/// TCP connections spread over the three backends, every reply from the
/// VIP; a 300 KB download (full-size segments, TSO on the backends) and
/// UDP request/response.
fn switched(mode: Mode, xdp: &str, v6: bool) {
    require_root();
    let topo = Topology::new(TopologyOptions { backends: 3, switched: true, isolated_backends: mode == Mode::Fullnat }).expect("topology");
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, &["--xdp-mode", xdp]).expect("daemon");
    // DSR backends answer from the VIP's own port, with the VIP on lo.
    let port = if mode == Mode::Dsr { 80 } else { 8080 };
    let _servers = topo.tcp_servers_of(v6, port).expect("servers");
    // Listening on every address: a DSR backend gets the client's packet to the VIP.
    let any_ip: std::net::IpAddr = if v6 { std::net::Ipv6Addr::UNSPECIFIED.into() } else { std::net::Ipv4Addr::UNSPECIFIED.into() };
    let bulk: Vec<BulkServer> = (0..3).map(|i| BulkServer::start(&topo.backends[i].name, SocketAddr::new(any_ip, port + 1)).expect("bulk server")).collect();
    let mut decap = Vec::new();
    if mode == Mode::Dsr {
        for (i, b) in topo.backends.iter().enumerate() {
            let pins = format!("/sys/fs/bpf/{}-decap{i}", topo.prefix);
            b.exec(
                &testbed::daemon::xlb_bin().to_string_lossy(),
                &["backend-setup", "--iface", "b0", "--vip", &topo.vip(80).ip().to_string(), "--pin-dir", &pins],
            )
            .expect("backend-setup");
            decap.push((b, pins));
        }
    }
    // A DSR backend answers UDP from the VIP only when its socket is bound
    // to it (an unbound one would answer from its own address).
    let _udp: Vec<UdpNameServer> = if mode == Mode::Dsr {
        topo.backends.iter().enumerate().map(|(i, b)| UdpNameServer::start(&b.name, &format!("b{i}"), topo.vip_of(v6, port)).expect("udp server")).collect()
    } else {
        topo.udp_servers_of(v6, port).expect("udp servers")
    };
    let mode_flag = match mode {
        Mode::Dnat => "dnat",
        Mode::Fullnat => "fullnat",
        Mode::Dsr => "dsr",
    };
    for (vport, bport, proto) in [(80, port, "tcp"), (81, port + 1, "tcp"), (53, port, "udp")] {
        let (vport, bport) = if mode == Mode::Dsr { (bport, bport) } else { (vport, bport) };
        let vip = topo.vip_of(v6, vport).to_string();
        daemon.ok(&["service", "add", &vip, "--proto", proto, "--mode", mode_flag, "--scheduler", "wrr"]).expect("service");
        for i in 0..3 {
            daemon.ok(&["backend", "add", &vip, &topo.backend_of(v6, i, bport).to_string(), "--proto", proto]).expect("backend");
        }
    }
    let (tcp_vip, bulk_vip, udp_vip) = if mode == Mode::Dsr {
        (topo.vip_of(v6, port), topo.vip_of(v6, port + 1), topo.vip_of(v6, port))
    } else {
        (topo.vip_of(v6, 80), topo.vip_of(v6, 81), topo.vip_of(v6, 53))
    };
    let what = format!("{mode:?}, {xdp}, {}", if v6 { "IPv6" } else { "IPv4" });
    let mut per_backend: HashMap<String, u32> = HashMap::new();
    for i in 0..60 {
        let mut c = LineClient::connect(&topo.client.name, tcp_vip).unwrap_or_else(|e| panic!("{what}: connection {i}: {e:#}\n{}", daemon.log_text()));
        assert_eq!(c.stream().peer_addr().expect("peer"), tcp_vip);
        let name = c.ask(&format!("hello {i}")).unwrap_or_else(|e| panic!("{what}: connection {i}: {e:#}"));
        *per_backend.entry(name).or_default() += 1;
    }
    assert_eq!(per_backend.len(), 3, "{what}: every backend serves: {per_backend:?}");
    for k in 0..3 {
        download(&topo.client.name, bulk_vip, 300_000, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{what}: download {k}: {e:#}"));
    }
    let any = if v6 { "[::]:0" } else { "0.0.0.0:0" };
    let sock = in_netns(&topo.client.name, || UdpSocket::bind(any)).expect("ns").expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    let answered = (0..20)
        .filter(|i| {
            let msg = format!("u{i}");
            // UDP may lose a datagram: a bounded number of tries each.
            (0..3).any(|_| {
                let _ = sock.send_to(msg.as_bytes(), udp_vip);
                let mut buf = [0u8; 128];
                matches!(sock.recv_from(&mut buf), Ok((n, from)) if from == udp_vip && buf[..n].ends_with(msg.as_bytes()))
            })
        })
        .count();
    assert_eq!(answered, 20, "{what}: UDP answers from the VIP");
    let status = daemon.json(&["status"]).expect("status");
    let counters = &status["counters"];
    if xdp == "native" {
        assert!(counters["csum_partial"].as_u64().unwrap_or(0) > 0, "{what}: the senders' partial checksums were seen: {counters:#}");
    }
    drop(daemon);
    for (b, pins) in decap {
        let _ = b.exec(&testbed::daemon::xlb_bin().to_string_lossy(), &["backend-setup", "--iface", "b0", "--remove", "--pin-dir", &pins]);
        let _ = std::fs::remove_dir(&pins);
    }
    drop(bulk);
}

#[test]
fn switched_backends_with_default_offloads_dnat_native() {
    switched(Mode::Dnat, "native", false);
    switched(Mode::Dnat, "native", true);
}

#[test]
fn switched_backends_with_default_offloads_dnat_generic() {
    switched(Mode::Dnat, "generic", false);
    switched(Mode::Dnat, "generic", true);
}

#[test]
fn switched_backends_with_default_offloads_fullnat_native() {
    switched(Mode::Fullnat, "native", false);
    switched(Mode::Fullnat, "native", true);
}

#[test]
fn switched_backends_with_default_offloads_fullnat_generic() {
    switched(Mode::Fullnat, "generic", false);
    switched(Mode::Fullnat, "generic", true);
}

#[test]
fn switched_backends_with_default_offloads_dsr() {
    switched(Mode::Dsr, "native", false);
    switched(Mode::Dsr, "generic", false);
}

/// The balancer's own namespace is fresh: every sysctl at the kernel's
/// default (forwarding off, accept_local off). The daemon sets what the
/// data plane needs on its interfaces only, keeps the backends' next hops
/// resolved, and puts everything back on exit.
#[test]
fn a_fresh_host_serves_a_thousand_sequential_connections_without_a_stall() {
    require_root();
    let topo = Topology::new(TopologyOptions { backends: 3, ..Default::default() }).expect("topology");
    let sysctl = |k: &str| topo.lb.exec("sysctl", &["-n", k]).expect("sysctl").trim().to_owned();
    assert_eq!(sysctl("net.ipv4.conf.l0.accept_local"), "0", "a fresh namespace");
    let mut daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, &[]).expect("daemon");
    for k in ["net.ipv4.conf.l0.forwarding", "net.ipv4.conf.l1.accept_local", "net.ipv6.conf.l2.forwarding", "net.ipv6.conf.l0.force_forwarding"] {
        assert_eq!(sysctl(k), "1", "{k} set by the daemon");
    }
    assert_eq!(sysctl("net.ipv4.ip_forward"), "0", "nothing host-wide");
    assert!(daemon.log_text().contains("host setting changed"), "each change is logged");
    let _servers = topo.tcp_servers(8080).expect("servers");
    let vip = topo.vip(80).to_string();
    daemon.ok(&["service", "add", &vip]).expect("service");
    for i in 0..3 {
        daemon.ok(&["backend", "add", &vip, &topo.backend(i, 8080).to_string()]).expect("backend");
    }
    // The backends' next hops become managed neighbours.
    wait_for("the backends' next hops to be managed", Duration::from_secs(5), || {
        let n = topo.lb.ip(&["neigh", "show"]).unwrap_or_default();
        (0..3).all(|i| n.lines().any(|l| l.starts_with(&format!("{} ", topo.backend(i, 0).ip())) && l.contains("managed"))).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}", topo.lb.ip(&["neigh", "show"]).unwrap_or_default()));
    let mut slowest = Duration::ZERO;
    for i in 0..1000 {
        let start = Instant::now();
        let mut c = LineClient::connect(&topo.client.name, topo.vip_sock(80)).unwrap_or_else(|e| panic!("connection {i}: {e:#}"));
        c.ask(&format!("hello {i}")).unwrap_or_else(|e| panic!("connection {i}: {e:#}"));
        let took = start.elapsed();
        slowest = slowest.max(took);
        assert!(took < Duration::from_secs(1), "connection {i} took {took:?} (a lost handshake packet is retransmitted after 1 s)");
    }
    eprintln!("slowest of 1000 sequential connections: {slowest:?}");
    daemon.stop().expect("stop");
    assert_eq!(sysctl("net.ipv4.conf.l1.accept_local"), "0", "--detach-on-exit puts the host back");
    assert_eq!(sysctl("net.ipv4.conf.l0.forwarding"), "0");
    let n = topo.lb.ip(&["neigh", "show"]).unwrap_or_default();
    assert!(!n.contains("managed"), "managed neighbours removed on detach: {n}");
}

#[test]
fn without_host_setup_the_daemon_names_what_is_missing_and_force_starts_anyway() {
    require_root();
    let topo = Topology::new(TopologyOptions { backends: 1, ..Default::default() }).expect("topology");
    let (status, log, _d) = Daemon::run_expecting_exit(&topo.lb, &topo.lb_ifaces, &["--no-host-setup"]).expect("run");
    assert!(!status.success(), "refused: {log}");
    for k in ["net.ipv4.conf.l0.forwarding", "net.ipv4.conf.l0.accept_local", "net.ipv4.conf.l1.accept_local", "net.ipv6.conf.l1.forwarding"] {
        assert!(log.contains(k), "the refusal names {k}: {log}");
    }
    assert_eq!(topo.lb.exec("sysctl", &["-n", "net.ipv4.conf.l0.forwarding"]).expect("sysctl").trim(), "0", "left alone");
    assert!(topo.lb.ip(&["link", "show", "l0"]).expect("link").find("xdp").is_none(), "nothing attached after a refusal");
    let d = Daemon::start(&topo.lb, &topo.lb_ifaces, &["--no-host-setup", "--force"]).expect("--force starts");
    assert!(d.log_text().contains("--force: starting without a host setting"), "{}", d.log_text());
    assert_eq!(topo.lb.exec("sysctl", &["-n", "net.ipv4.conf.l0.forwarding"]).expect("sysctl").trim(), "0", "still left alone");
}

/// kill -9, then the interfaces it was attached to are deleted and made
/// again (a container restarted, a driver reloaded): a new daemon starts
/// on the same pins and serves; flows on the links that survived go on.
#[test]
fn a_killed_daemon_whose_interfaces_were_recreated_serves_again_within_five_seconds() {
    require_root();
    let mut topo = Topology::new(TopologyOptions { backends: 3, ..Default::default() }).expect("topology");
    let mut daemon = Daemon::start_persistent(&topo.lb, &topo.lb_ifaces, &[]).expect("daemon");
    let servers: Vec<TcpNameServer> = topo.tcp_servers(8080).expect("servers");
    let vip = topo.vip(80).to_string();
    daemon.ok(&["service", "add", &vip, "--scheduler", "wrr"]).expect("service");
    for i in 0..3 {
        daemon.ok(&["backend", "add", &vip, &topo.backend(i, 8080).to_string()]).expect("backend");
    }
    let mut flows: Vec<(LineClient, String)> = (0..30)
        .map(|i| {
            let mut c = LineClient::connect(&topo.client.name, topo.vip_sock(80)).expect("connect");
            let who = c.ask(&format!("hello {i}")).expect("hello");
            (c, who)
        })
        .collect();
    daemon.kill().expect("kill -9");
    // Backend b1's link goes away and comes back as a new interface.
    topo.recreate_backend_link(1).expect("re-create l2");
    let started = Instant::now();
    daemon.restart(&[]).expect("the daemon starts again");
    wait_for("a new connection through the VIP", Duration::from_secs(5), || {
        let mut c = LineClient::connect(&topo.client.name, topo.vip_sock(80)).ok()?;
        c.ask("after").ok().map(|_| ())
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", daemon.log_text()));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "serving again after {took:?}");
    assert!(daemon.log_text().contains("severed"), "the severed link was replaced, and said so:\n{}", daemon.log_text());
    // Flows through the links that survived were never interrupted.
    let mut kept = 0;
    for (i, (c, who)) in flows.iter_mut().enumerate() {
        if who == &servers[1].name {
            continue;
        }
        let got = c.ask(&format!("again {i}")).unwrap_or_else(|e| panic!("flow {i} on {who}, a link that survived: {e:#}"));
        assert_eq!(&got, who, "flow {i} moved");
        kept += 1;
    }
    assert!(kept >= 15, "{kept} flows checked");
    // And b1 serves new flows on its new link.
    let served: HashSet<String> =
        (0..12).map(|i| LineClient::connect(&topo.client.name, topo.vip_sock(80)).and_then(|mut c| c.ask(&format!("new {i}"))).expect("new flow")).collect();
    assert!(served.contains(&servers[1].name), "the re-created link's backend serves again: {served:?}");
}
