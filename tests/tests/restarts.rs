//! Restarts and upgrades lose no flows: the data plane outlives the daemon,
//! a new daemon takes it over in place, and a layout it cannot read is
//! refused instead of corrupted.

use std::time::Duration;

use testbed::{Daemon, LineClient, TcpNameServer, Topology, TopologyOptions};

struct Bed {
    _servers: Vec<TcpNameServer>,
    daemon: Daemon,
    topo: Topology,
}

fn bed(backends: usize) -> Bed {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let topo = Topology::new(TopologyOptions { backends, ..Default::default() }).expect("topology");
    let daemon = Daemon::start_persistent(&topo.lb, &topo.lb_ifaces, &[]).expect("daemon");
    let servers = topo.tcp_servers(8080).expect("servers");
    let vip = topo.vip(80).to_string();
    daemon.ok(&["service", "add", &vip, "--health", "tcp", "--health-interval", "500ms", "--health-timeout", "300ms"]).expect("service");
    for i in 0..backends {
        daemon.ok(&["backend", "add", &vip, &topo.backend(i, 8080).to_string(), "--weight", &(i + 1).to_string()]).expect("backend");
    }
    Bed { _servers: servers, daemon, topo }
}

/// One message on every connection; each must come back from the backend
/// that answered first.
fn round(clients: &mut [(LineClient, String)], tag: &str) {
    for (i, (c, who)) in clients.iter_mut().enumerate() {
        let got = c.ask(&format!("{tag} {i}")).unwrap_or_else(|e| panic!("connection {i} failed in round {tag}: {e}"));
        assert_eq!(&got, who, "connection {i} moved from {who} to {got} in round {tag}");
    }
}

#[test]
fn live_connections_survive_two_daemon_restarts_and_time_without_a_daemon() {
    let mut b = bed(3);
    let mut clients: Vec<(LineClient, String)> = (0..100)
        .map(|i| {
            let mut c = LineClient::connect(&b.topo.client.name, b.topo.vip_sock(80)).expect("connect");
            let who = c.ask(&format!("hello {i}")).expect("hello");
            (c, who)
        })
        .collect();
    let before = b.daemon.json(&["status"]).expect("status");
    for restart in 0..2 {
        round(&mut clients, &format!("before-stop-{restart}"));
        let status = b.daemon.stop().expect("stop");
        assert!(status.success(), "{}", b.daemon.log_text());
        // No controller: the data plane forwards on its own.
        round(&mut clients, &format!("no-daemon-{restart}"));
        let link = b.topo.lb.ip(&["link", "show", "l0"]).expect("link");
        assert!(link.contains("xdp"), "the program must stay attached while no daemon runs: {link}");
        b.daemon.restart(&[]).expect("restart");
        round(&mut clients, &format!("after-restart-{restart}"));
    }
    // The model came back as it was (same services, backends, settings, ids).
    let after = b.daemon.json(&["status"]).expect("status");
    for key in ["service", "proto", "id", "settings"] {
        assert_eq!(before["services"][0][key], after["services"][0][key], "{key} changed across restarts");
    }
    let ids = |s: &serde_json::Value| -> Vec<(serde_json::Value, serde_json::Value, serde_json::Value)> {
        s["services"][0]["backends"].as_array().expect("backends").iter().map(|b| (b["backend"].clone(), b["id"].clone(), b["weight"].clone())).collect()
    };
    assert_eq!(ids(&before), ids(&after));
    let flows = b.daemon.json(&["flows"]).expect("flows");
    assert_eq!(flows.as_array().map(Vec::len), Some(100), "the connection table survived");
    // And the restarted daemon still manages it: new flows, and changes.
    let mut fresh = LineClient::connect(&b.topo.client.name, b.topo.vip_sock(80)).expect("new connection");
    fresh.ask("new").expect("new flow after restarts");
    b.daemon.ok(&["service", "set", &b.topo.vip(80).to_string(), "--on-remove", "keep"]).expect("change after restart");
}

#[test]
fn a_layout_change_is_refused_and_the_running_data_plane_keeps_forwarding() {
    let mut b = bed(2);
    let mut clients: Vec<(LineClient, String)> = (0..10)
        .map(|i| {
            let mut c = LineClient::connect(&b.topo.client.name, b.topo.vip_sock(80)).expect("connect");
            let who = c.ask(&format!("hello {i}")).expect("hello");
            (c, who)
        })
        .collect();
    b.daemon.stop().expect("stop");
    // A daemon built for another table size (a layout change) must refuse.
    let (status, log) = b.daemon.run_variant_expecting_exit(&["--conn-capacity", "1000"]).expect("run");
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("another layout") && log.contains("--conn-capacity 65536"), "{log}");
    round(&mut clients, "after-refusal");
    // A missing state file is refused too (the services would be unknown).
    let saved = std::fs::read(&b.daemon.state_file).expect("state file");
    std::fs::remove_file(&b.daemon.state_file).expect("rm");
    let (status, log) = b.daemon.run_variant_expecting_exit(&[]).expect("run");
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("state file") && log.contains("xlb detach"), "{log}");
    round(&mut clients, "after-missing-state");
    std::fs::write(&b.daemon.state_file, saved).expect("restore");
    b.daemon.restart(&[]).expect("a compatible daemon takes over");
    round(&mut clients, "after-takeover");
}

#[test]
fn detach_removes_the_program_and_the_pins_for_good() {
    let mut b = bed(1);
    let mut c = LineClient::connect(&b.topo.client.name, b.topo.vip_sock(80)).expect("connect");
    c.ask("hi").expect("hi");
    let out = b.daemon.detach().expect("run");
    assert_eq!(out.status.code(), Some(1), "detach must refuse while the daemon runs");
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop it first"));
    b.daemon.stop().expect("stop");
    let out = b.daemon.detach().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for l in &b.topo.lb_ifaces {
        let link = b.topo.lb.ip(&["link", "show", l]).expect("link");
        assert!(!link.contains("xdp"), "{l} still has XDP after detach: {link}");
    }
    assert!(!b.daemon.pin_dir.exists(), "pins left");
    assert!(!b.daemon.state_file.exists(), "state left");
    // Nothing balances any more: the VIP's kernel answers (no server there).
    let r = testbed::in_netns(&b.topo.client.name, || std::net::TcpStream::connect_timeout(&b.topo.vip_sock(80), Duration::from_secs(2))).expect("ns");
    assert!(r.is_err(), "a connection to the VIP was balanced after detach");
    let again = b.daemon.detach().expect("run");
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to detach"));
}
