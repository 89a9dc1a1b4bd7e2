//! Full NAT through real kernel stacks: backends with no route back to the
//! clients (only their own link) serve through the VIP, see the balancer's
//! addresses, and a tiny port pool refuses new flows cleanly.

use std::{
    collections::{HashMap, HashSet},
    io::ErrorKind,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use testbed::{Daemon, LineClient, Topology, TopologyOptions, wait_for};

const PORT: u16 = 8080;

fn require_root() {
    assert!(testbed::have_privileges(), "these tests need root (netns, XDP): run them with `cargo xtask test`");
}

fn isolated(backends: usize) -> Topology {
    require_root();
    Topology::new(TopologyOptions { backends, isolated_backends: true, ..Default::default() }).expect("topology")
}

/// `n` sequential connections through the VIP of a full-NAT service on
/// three isolated backends; every backend serves, and sees only the
/// balancer's address on its link, from ports of the pool; flow logs name
/// the real client.
fn serve_through_full_nat(v6: bool, n: usize) {
    serve_through_full_nat_on(isolated(3), v6, n);
}

fn serve_through_full_nat_on(topo: Topology, v6: bool, n: usize) {
    let dir = std::env::temp_dir().join(format!("{}-flowlog", topo.prefix));
    std::fs::create_dir_all(&dir).expect("dir");
    let log = dir.join("flows.jsonl");
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, &["--flow-log", log.to_str().expect("path"), "--flow-log-new"]).expect("daemon");
    let servers = topo.tcp_servers_of(v6, PORT).expect("servers");
    let vip = topo.vip_of(v6, 80);
    daemon.ok(&["service", "add", &vip.to_string(), "--mode", "fullnat", "--scheduler", "wrr", "--snat-ports", "20000-29999"]).expect("service");
    for i in 0..3 {
        daemon.ok(&["backend", "add", &vip.to_string(), &topo.backend_of(v6, i, PORT).to_string()]).expect("backend");
    }
    // Without full NAT these backends could not answer at all: no route.
    let mut per_backend: HashMap<String, usize> = HashMap::new();
    for i in 0..n {
        let mut c = LineClient::connect(&topo.client.name, vip).expect("connect through the VIP");
        assert_eq!(c.stream().peer_addr().expect("peer"), vip);
        *per_backend.entry(c.ask(&format!("hello {i}")).expect("answer")).or_default() += 1;
    }
    assert_eq!(per_backend.len(), 3, "{per_backend:?}");
    // Round robin with a cursor per CPU: each CPU's share is exact, so the
    // totals differ by at most one per CPU.
    assert!(per_backend.values().all(|&k| k.abs_diff(n / 3) <= 2), "round robin over three: {per_backend:?}");
    for (i, s) in servers.iter().enumerate() {
        let peers = s.seen.peers.lock().expect("lock");
        let lb: IpAddr = topo.lb_backend_side(i, v6);
        assert!(!peers.is_empty(), "{} saw nobody", s.name);
        for p in peers.keys() {
            assert_eq!(p.ip(), lb, "{} saw {p}: not the balancer's address on its link", s.name);
            assert!((20000..=29999).contains(&p.port()), "{} saw source port {} outside the pool", s.name, p.port());
        }
    }
    let client = Topology::client_addr(v6);
    let records = wait_for("a flow-log record per new flow", Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&log).ok()?;
        let v: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).filter(|v: &serde_json::Value| v["event"] == "new").collect();
        (v.len() >= n).then_some(v)
    })
    .expect("flow log");
    for r in &records {
        let c: SocketAddr = r["client"].as_str().expect("client").parse().expect("addr");
        assert_eq!(c.ip(), client, "the flow log must show the real client: {r}");
        let snat: SocketAddr = r["snat"].as_str().expect("snat recorded in full NAT").parse().expect("addr");
        assert!((20000..=29999).contains(&snat.port()), "{r}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn isolated_backends_serve_300_connections_through_full_nat() {
    serve_through_full_nat(false, 300);
}

#[test]
fn isolated_backends_serve_through_full_nat_over_ipv6() {
    serve_through_full_nat(true, 60);
}

#[test]
fn isolated_backends_behind_a_switch_serve_through_full_nat() {
    require_root();
    let switched = || Topology::new(TopologyOptions { backends: 3, isolated_backends: true, switched: true }).expect("topology");
    serve_through_full_nat_on(switched(), false, 120);
    serve_through_full_nat_on(switched(), true, 60);
}

#[test]
fn an_exhausted_port_pool_refuses_the_next_flow_and_leaves_the_others_alone() {
    let topo = isolated(1);
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, &[]).expect("daemon");
    let _servers = topo.tcp_servers(PORT).expect("servers");
    let vip = topo.vip_sock(80);
    daemon.ok(&["service", "add", &vip.to_string(), "--mode", "fullnat", "--snat-ports", "40000-40003"]).expect("service");
    daemon.ok(&["backend", "add", &vip.to_string(), &topo.backend(0, PORT).to_string()]).expect("backend");
    let mut open: Vec<LineClient> = (0..4).map(|_| LineClient::connect(&topo.client.name, vip).expect("connect within the pool")).collect();
    for (i, c) in open.iter_mut().enumerate() {
        assert_eq!(c.ask(&format!("hi {i}")).expect("answer"), "b0");
    }
    // The fifth is refused at once (a RST answers the SYN), not left hanging.
    let start = Instant::now();
    let refused = LineClient::connect(&topo.client.name, vip).err().expect("a fifth flow must be refused");
    let kind = refused.downcast_ref::<std::io::Error>().map(|e| e.kind());
    assert_eq!(kind, Some(ErrorKind::ConnectionRefused), "{refused:#}");
    assert!(start.elapsed() < Duration::from_secs(1), "refusal took {:?}", start.elapsed());
    // Port use comes from the table walker's snapshot: one taken after the
    // four flows.
    let since = Instant::now();
    let status = wait_for("a table snapshot taken after the four flows", Duration::from_secs(5), || {
        let s = daemon.json(&["status"]).ok()?;
        (s["table"]["snapshot_age_s"].as_f64()? < since.elapsed().as_secs_f64()).then_some(s)
    })
    .expect("snapshot");
    assert!(status["counters"]["refused_no_port"].as_u64().unwrap_or(0) >= 1, "{status:#}");
    assert!(status["services"][0]["backends"][0]["traffic"]["refused_no_port"].as_u64().unwrap_or(0) >= 1, "{status:#}");
    assert_eq!(status["services"][0]["backends"][0]["snat_ports"], serde_json::json!({ "in_use": 4, "pool": 4 }), "{status:#}");
    // The four flows go on, each on its own port.
    for (i, c) in open.iter_mut().enumerate() {
        assert_eq!(c.ask(&format!("still there {i}")).expect("existing flow untouched"), "b0");
    }
    let ports: HashSet<u16> = _servers[0].seen.peers.lock().expect("lock").keys().map(|p| p.port()).collect();
    assert_eq!(ports.len(), 4, "four flows, four distinct pool ports: {ports:?}");
    // Closing one gives its port back (FIN from both sides, then the
    // controller's expiry): a new flow gets through again.
    drop(open.pop());
    let again = wait_for("a freed port to be reused", Duration::from_secs(10), || LineClient::connect(&topo.client.name, vip).ok());
    let mut again = again.expect("a new flow once a port is free");
    assert_eq!(again.ask("back").expect("answer"), "b0");
}
