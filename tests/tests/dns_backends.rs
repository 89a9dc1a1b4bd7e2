//! Backends given by DNS name, against a real DNS server (dnsmasq) started
//! in the lb namespace: the record changes, and within its TTL plus one
//! lookup interval the old address takes no new flows, its flows follow the
//! removal policy, and the new address serves.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use testbed::{Daemon, LineClient, Outcome, Topology, TopologyOptions, wait_for, watch_idle};

const PORT: u16 = 8080;
/// The record's TTL (dnsmasq `--local-ttl`).
const TTL: Duration = Duration::from_secs(2);

/// dnsmasq answering from a hosts file on 127.0.0.1:5300 in a namespace;
/// `set` rewrites the file and makes it re-read it (SIGHUP).
struct Dns {
    child: Child,
    hosts: std::path::PathBuf,
}

impl Dns {
    fn start(topo: &Topology, hosts: &str) -> Dns {
        let hosts_path = std::env::temp_dir().join(format!("{}-hosts", topo.prefix));
        std::fs::write(&hosts_path, hosts).expect("hosts file");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", topo.lb.path()))
            .args(["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--bind-interfaces"])
            .args(["--listen-address=127.0.0.1", "--port=5300", "--user=root", "--pid-file"])
            .arg(format!("--addn-hosts={}", hosts_path.display()))
            .arg(format!("--local-ttl={}", TTL.as_secs()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (installed by `cargo xtask setup`)");
        Dns { child, hosts: hosts_path }
    }

    fn set(&self, hosts: &str) {
        std::fs::write(&self.hosts, hosts).expect("hosts file");
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.hosts);
    }
}

fn registered(daemon: &Daemon) -> Vec<String> {
    let s = daemon.json(&["status"]).expect("status");
    s["services"][0]["backends"]
        .as_array()
        .map(|b| b.iter().filter(|b| b["registered"] == true).filter_map(|b| b["backend"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

#[test]
fn a_changed_record_moves_the_backend_within_ttl_and_the_old_flows_are_reset() {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let topo = Topology::new(TopologyOptions { backends: 2, ..Default::default() }).expect("topology");
    let dns = Dns::start(&topo, &format!("{} app.internal\n", topo.backend(0, PORT).ip()));
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, &["--dns-server", "127.0.0.1:5300"]).expect("daemon");
    let _servers = topo.tcp_servers(PORT).expect("servers");
    let vip = topo.vip(80).to_string();
    daemon.ok(&["service", "add", &vip]).expect("service");
    // dnsmasq may take a moment to listen: the first add can fail cleanly.
    let added =
        wait_for("the name to resolve", Duration::from_secs(10), || daemon.json(&["backend", "add", &vip, "app.internal:8080"]).ok()).expect("backend by name");
    assert_eq!(added["addresses"], serde_json::json!([topo.backend(0, PORT).to_string()]), "{added}");
    let mut clients: Vec<LineClient> = (0..10).map(|_| LineClient::connect(&topo.client.name, topo.vip_sock(80)).expect("connect")).collect();
    for c in clients.iter_mut() {
        assert_eq!(c.ask("hi").expect("answer"), "b0");
    }

    // The backend moves (a restart on a new address).
    let changed = Instant::now();
    dns.set(&format!("{} app.internal\n", topo.backend(1, PORT).ip()));
    let new = topo.backend(1, PORT).to_string();
    wait_for("the new address to replace the old", Duration::from_secs(10), || (registered(&daemon) == vec![new.clone()]).then_some(())).expect("moved");
    let took = changed.elapsed();
    eprintln!("record changed: the new address replaced the old after {took:?} (TTL {TTL:?})");
    // TTL plus the 1 s floor on a lookup's retry plus the 200 ms lookup
    // cadence, with room for a loaded machine.
    assert!(took <= TTL + Duration::from_millis(2500), "the old address served {took:?} after the record changed (TTL {TTL:?})");
    // The old address's clients were reset (policy reset), not left hanging.
    let streams: Vec<&std::net::TcpStream> = clients.iter().map(|c| c.stream()).collect();
    let outcomes = watch_idle(&streams, changed, took + Duration::from_secs(3));
    assert!(outcomes.iter().all(|o| matches!(o, Outcome::Reset(_))), "{outcomes:?}");
    // New flows go to the new address.
    for _ in 0..5 {
        let mut c = LineClient::connect(&topo.client.name, topo.vip_sock(80)).expect("connect");
        assert_eq!(c.ask("again").expect("answer"), "b1");
    }
    let status = daemon.json(&["status"]).expect("status");
    let named = &status["services"][0]["named_backends"][0];
    assert_eq!(named["backend"], "app.internal:8080", "{status:#}");
    assert_eq!(named["addresses"], serde_json::json!([new]), "{status:#}");

    // The name goes away: its address leaves; new connections are refused
    // by the kernel (no backend), not black-holed.
    dns.set("");
    wait_for("the vanished name's address to leave", Duration::from_secs(10), || registered(&daemon).is_empty().then_some(())).expect("gone");
    let refused = LineClient::connect(&topo.client.name, topo.vip_sock(80));
    assert!(refused.is_err(), "a connection succeeded with no backend");

    // Removing the name by name.
    dns.set(&format!("{} app.internal\n", topo.backend(0, PORT).ip()));
    wait_for("the name to come back", Duration::from_secs(10), || (registered(&daemon).len() == 1).then_some(())).expect("back");
    daemon.ok(&["backend", "remove", &vip, "app.internal:8080"]).expect("remove by name");
    assert!(registered(&daemon).is_empty());
    let status = daemon.json(&["status"]).expect("status");
    assert_eq!(status["services"][0]["named_backends"], serde_json::json!([]), "{status:#}");
}

#[test]
fn a_name_that_does_not_resolve_is_refused_and_changes_nothing() {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let topo = Topology::new(TopologyOptions { backends: 1, ..Default::default() }).expect("topology");
    let _dns = Dns::start(&topo, &format!("{} app.internal\n", topo.backend(0, PORT).ip()));
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, &["--dns-server", "127.0.0.1:5300"]).expect("daemon");
    let vip = topo.vip(80).to_string();
    daemon.ok(&["service", "add", &vip]).expect("service");
    wait_for("dnsmasq to answer", Duration::from_secs(10), || daemon.ok(&["backend", "add", &vip, "app.internal:8080"]).ok()).expect("add");
    daemon.ok(&["backend", "remove", &vip, "app.internal:8080"]).expect("remove");
    let out = daemon.cli(&["backend", "add", &vip, "nosuch.internal:8080"]).expect("cli");
    assert_eq!(out.status.code(), Some(2), "a bad name is the caller's error (exit 2): {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuch.internal"), "{out:?}");
    // An IPv6 service cannot take a name with only IPv4 addresses.
    let vip6 = topo.vip_of(true, 80).to_string();
    daemon.ok(&["service", "add", &vip6]).expect("v6 service");
    let out = daemon.cli(&["backend", "add", &vip6, "app.internal:8080"]).expect("cli");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no IPv6 address"), "{out:?}");
    assert!(registered(&daemon).is_empty());
    let bad = daemon.cli(&["backend", "add", &vip, "not a name:80"]).expect("cli");
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
}

#[test]
fn a_dead_dns_server_keeps_the_last_answer_for_the_maximum_ttl_and_no_longer() {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let topo = Topology::new(TopologyOptions { backends: 1, ..Default::default() }).expect("topology");
    let dns = Dns::start(&topo, &format!("{} app.internal\n", topo.backend(0, PORT).ip()));
    let max = Duration::from_secs(10);
    // One miss removes (the hysteresis of --dns-misses is the controller's
    // unit tests' business): this test is about the maximum TTL.
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, &["--dns-server", "127.0.0.1:5300", "--dns-max-ttl", "10s", "--dns-misses", "1"]).expect("daemon");
    let vip = topo.vip(80).to_string();
    daemon.ok(&["service", "add", &vip]).expect("service");
    wait_for("dnsmasq to answer", Duration::from_secs(10), || daemon.ok(&["backend", "add", &vip, "app.internal:8080"]).ok()).expect("add");
    // The DNS server dies: the last answer (at most TTL old) is kept...
    drop(dns);
    let dead = Instant::now();
    // (A failed lookup takes the resolver's timeouts: a few seconds.)
    wait_for("the failed lookup to be reported", max, || {
        let s = daemon.json(&["status"]).ok()?;
        s["services"][0]["named_backends"][0]["last_error"].is_string().then_some(())
    })
    .expect("the failure is reported in status");
    if dead.elapsed() < max - TTL {
        assert_eq!(registered(&daemon).len(), 1, "a DNS outage must not empty the service at once");
    }
    // ...but not forever: gone once the last answer is older than the maximum.
    wait_for("the stale address to leave", max + Duration::from_secs(6), || registered(&daemon).is_empty().then_some(())).expect("stale address removed");
    let took = dead.elapsed();
    assert!(took >= max - TTL, "removed after {took:?}, before the maximum TTL ({max:?}) since the last answer");
}
