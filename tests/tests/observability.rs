//! What an operator can see: Prometheus metrics checked against traffic the
//! test sent itself.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{TcpStream, UdpSocket},
    time::Duration,
};

use testbed::{Daemon, Topology, TopologyOptions, UdpNameServer, in_netns};

/// `GET /metrics` from inside the lb namespace; returns sample → value.
fn scrape(ns: &str) -> HashMap<String, f64> {
    let text = in_netns(ns, || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&"127.0.0.1:9100".parse().expect("addr"), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .expect("ns")
    .expect("scrape");
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"), "{head}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(k, v)| (k.to_owned(), v.parse().expect("value"))))
        .collect()
}

#[test]
fn scraped_metrics_match_the_traffic_sent() {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let topo = Topology::new(TopologyOptions { backends: 2, ..Default::default() }).expect("topology");
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, &["--metrics-addr", "127.0.0.1:9100"]).expect("daemon");
    let servers: Vec<UdpNameServer> = topo.udp_servers(5353).expect("servers");
    let vip = topo.vip(53).to_string();
    daemon.ok(&["service", "add", &vip, "--proto", "udp", "--scheduler", "wrr"]).expect("service");
    for i in 0..2 {
        daemon.ok(&["backend", "add", &vip, &topo.backend(i, 5353).to_string()]).expect("backend");
    }
    // 20 flows of 10 datagrams of 32 bytes; each answered by a datagram of
    // "bN " + the payload (35 bytes).
    let mut per_backend: HashMap<String, (u64, u64)> = HashMap::new(); // name -> (datagrams in, datagrams out)
    let mut flows_of: HashMap<String, u64> = HashMap::new();
    for flow in 0..20 {
        let sock = in_netns(&topo.client.name, || UdpSocket::bind("0.0.0.0:0")).expect("ns").expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        for i in 0..10 {
            let payload = format!("{flow:04}-{i:04}-{}", "x".repeat(22));
            assert_eq!(payload.len(), 32);
            sock.send_to(payload.as_bytes(), topo.vip_sock(53)).expect("send");
            let mut buf = [0u8; 128];
            let (n, _) = sock.recv_from(&mut buf).expect("answer (no loss expected inside namespaces)");
            let who = String::from_utf8_lossy(&buf[..2]).into_owned();
            assert_eq!(n, 35);
            if i == 0 {
                *flows_of.entry(who.clone()).or_default() += 1;
            }
            let e = per_backend.entry(who).or_default();
            e.0 += 1;
            e.1 += 1;
        }
    }
    // Table figures come from the table walker's latest snapshot (about
    // once a second): one taken after the traffic.
    let m = testbed::wait_for("a table snapshot with the 20 flows", Duration::from_secs(5), || {
        let m = scrape(&topo.lb.name);
        (m.get("xlb_table_entries{table=\"established\"}") == Some(&20.0)).then_some(m)
    })
    .expect("snapshot");
    for (i, s) in servers.iter().enumerate() {
        let name = format!("b{i}");
        let (sent, answered) = per_backend.get(&name).copied().unwrap_or_default();
        assert_eq!(s.seen.requests.load(std::sync::atomic::Ordering::Relaxed), sent);
        let l = |dir: &str| format!("service=\"10.99.0.1:53\",proto=\"udp\",backend=\"{}\",direction=\"{dir}\"", topo.backend(i, 5353));
        assert_eq!(m.get(&format!("xlb_backend_packets_total{{{}}}", l("in"))), Some(&(sent as f64)), "{name} in");
        assert_eq!(m.get(&format!("xlb_backend_packets_total{{{}}}", l("out"))), Some(&(answered as f64)), "{name} out");
        // IP bytes: 20 (IPv4) + 8 (UDP) + payload.
        assert_eq!(m.get(&format!("xlb_backend_bytes_total{{{}}}", l("in"))), Some(&((sent * 60) as f64)), "{name} bytes in");
        assert_eq!(m.get(&format!("xlb_backend_bytes_total{{{}}}", l("out"))), Some(&((answered * 63) as f64)), "{name} bytes out");
        let bl = format!("service=\"10.99.0.1:53\",proto=\"udp\",backend=\"{}\"", topo.backend(i, 5353));
        let flows = flows_of.get(&name).copied().unwrap_or(0);
        assert!(flows >= 8, "round robin gives each backend about half of 20 flows: {flows_of:?}");
        assert_eq!(m.get(&format!("xlb_backend_new_flows_total{{{bl}}}")), Some(&(flows as f64)), "{name} new flows");
        assert_eq!(m.get(&format!("xlb_backend_state{{{bl},state=\"up\"}}")), Some(&1.0));
    }
    assert_eq!(m.get("xlb_service_packets_total{service=\"10.99.0.1:53\",proto=\"udp\",direction=\"in\"}"), Some(&200.0));
    assert!(m.get("xlb_table_snapshot_age_seconds").is_some_and(|a| *a < 5.0));
    assert!(m.get("xlb_dataplane_rx_total").copied().unwrap_or(0.0) >= 400.0);
    assert!(m.contains_key("xlb_dataplane_verdicts_total{reason=\"pass_not_service\"}"));
}

#[test]
fn an_unusable_metrics_address_fails_the_start_cleanly() {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let topo = Topology::new(TopologyOptions { backends: 0, ..Default::default() }).expect("topology");
    // 10.9.9.9 is not an address of the lb namespace.
    let (status, log, d) = Daemon::run_expecting_exit(&topo.lb, &topo.lb_ifaces, &["--metrics-addr", "10.9.9.9:9100"]).expect("run");
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("binding the metrics address 10.9.9.9:9100"), "{log}");
    assert!(!d.socket.exists());
    let link = topo.lb.ip(&["link", "show", "l0"]).expect("link");
    assert!(!link.contains("xdp"), "{link}");
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn export_apply_round_trip_diff_dry_run_and_refusals() {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let topo = Topology::new(TopologyOptions { backends: 0, ..Default::default() }).expect("topology");
    let a = Daemon::start(&topo.lb, &topo.lb_ifaces, &[]).expect("daemon a");
    a.ok(&[
        "service",
        "add",
        "10.99.0.1:80",
        "--scheduler",
        "least-conn",
        "--on-remove",
        "drain:30s",
        "--health",
        "http:/healthz",
        "--fall",
        "2",
        "--timeout-established",
        "1h",
    ])
    .expect("svc");
    a.ok(&["backend", "add", "10.99.0.1:80", "10.1.1.2:8080", "--weight", "3"]).expect("b");
    a.ok(&["backend", "add", "10.99.0.1:80", "10.1.2.2:8080"]).expect("b");
    a.ok(&["service", "add", "10.99.0.1:53", "--proto", "udp", "--reset-spread", "5s"]).expect("svc");
    a.ok(&["backend", "add", "10.99.0.1:53", "10.1.3.2:53", "--proto", "udp"]).expect("b");
    let exported = a.ok(&["export"]).expect("export");
    let dir = std::env::temp_dir().join(format!("{}-export", topo.prefix));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("config.json");
    std::fs::write(&file, &exported).expect("write");
    drop(a);

    // Clone onto a fresh daemon: export → apply → export is identical.
    let b = Daemon::start(&topo.lb, &topo.lb_ifaces, &[]).expect("daemon b");
    let dry = b.ok(&["apply", "-f", file.to_str().expect("path"), "--dry-run"]).expect("dry run");
    assert!(dry.contains("would add service 10.99.0.1:80/tcp") && dry.contains("would add backend 10.1.1.2:8080"), "{dry}");
    assert_eq!(b.ok(&["export"]).expect("export"), "{\n  \"services\": []\n}\n", "a dry run changed the configuration");
    let out = b.ok(&["apply", "-f", file.to_str().expect("path")]).expect("apply");
    assert_eq!(out.lines().count(), 5, "2 services and 3 backends added: {out}");
    assert_eq!(b.ok(&["export"]).expect("export"), exported, "export → apply → export must be identical");
    assert_eq!(b.ok(&["apply", "-f", file.to_str().expect("path")]).expect("again"), "nothing to change\n");

    // A changed file applies only the difference.
    let mut v: serde_json::Value = serde_json::from_str(&exported).expect("json");
    v["services"][1]["backends"][0]["weight"] = 5.into(); // 10.99.0.1:80 is second (sorted by address)
    v["services"][1]["backends"].as_array_mut().expect("backends").remove(1);
    v["services"][0]["settings"]["on_miss"] = "rehash".into();
    std::fs::write(&file, serde_json::to_string(&v).expect("json")).expect("write");
    let out = b.ok(&["apply", "-f", file.to_str().expect("path")]).expect("apply diff");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(out.contains("change settings of 10.99.0.1:53/udp"), "{out}");
    assert!(out.contains("reweight backend 10.1.1.2:8080 on 10.99.0.1:80/tcp: 3 -> 5"), "{out}");
    assert!(out.contains("remove backend 10.1.2.2:8080 from 10.99.0.1:80/tcp"), "{out}");

    // Invalid files change nothing and name the bad field.
    let before = b.ok(&["export"]).expect("export");
    let bad_cases = [
        (r#"{"services":[{"service":"10.99.0.1:80","proto":"tcp","backends":[{"backend":"10.1.1.2:8080","weight":0}]}]}"#, "services[0].backends[0].weight"),
        (r#"{"services":[{"service":"10.99.0.1:80","proto":"tcp","settings":{"on_remve":"keep"}}]}"#, "unknown field `on_remve`"),
        (r#"{"services":[{"service":"10.99.0.1","proto":"tcp"}]}"#, "invalid"),
        (r#"{"services":[{"service":"10.99.0.1:80","proto":"tcp","settings":{"maglev_size":1000}}]}"#, "services[0].settings: maglev_size 1000"),
        (r#"{"services":[{"service":"10.99.0.1:80","proto":"tcp"},{"service":"10.99.0.1:80","proto":"tcp"}]}"#, "listed twice"),
    ];
    for (text, needle) in bad_cases {
        std::fs::write(&file, text).expect("write");
        let out = b.cli(&["apply", "-f", file.to_str().expect("path")]).expect("run");
        assert_eq!(out.status.code(), Some(2), "{text}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains(needle), "{text}: {:?} lacks {needle:?}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(b.ok(&["export"]).expect("export"), before, "a refused apply changed the configuration");
    }
    let o = b.cli(&["backend", "set", "10.99.0.1:80", "10.1.1.2:8080", "--weight", "7"]).expect("set");
    assert!(o.status.success() && stdout(&o).contains("weight 5 -> 7"), "{}", stdout(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn top_renders_backends_and_their_rates_in_a_terminal() {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let topo = Topology::new(TopologyOptions { backends: 2, ..Default::default() }).expect("topology");
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, &[]).expect("daemon");
    let _servers: Vec<UdpNameServer> = topo.udp_servers(5353).expect("servers");
    let vip = topo.vip(53).to_string();
    daemon.ok(&["service", "add", &vip, "--proto", "udp"]).expect("service");
    for i in 0..2 {
        daemon.ok(&["backend", "add", &vip, &topo.backend(i, 5353).to_string()]).expect("backend");
    }
    let session = format!("{}-top", topo.prefix);
    let cmd = format!("{} --socket {} top", testbed::daemon::xlb_bin().display(), daemon.socket.display());
    let tmux = |args: &[&str]| std::process::Command::new("tmux").args(args).output().expect("tmux (installed by `cargo xtask setup`)");
    assert!(tmux(&["new-session", "-d", "-s", &session, "-x", "150", "-y", "30", &cmd]).status.success());
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = std::process::Command::new("tmux").args(["kill-session", "-t", &self.0]).output();
        }
    }
    let _kill = Kill(session.clone());
    // Traffic for a few seconds while top refreshes.
    let sock = in_netns(&topo.client.name, || UdpSocket::bind("0.0.0.0:0")).expect("ns").expect("bind");
    let start = std::time::Instant::now();
    let mut screen = String::new();
    let found = testbed::wait_for("top to show both backends with traffic", Duration::from_secs(8), || {
        for _ in 0..50 {
            let _ = sock.send_to(&[b'x'; 500], topo.vip_sock(53));
        }
        screen = String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", &session]).stdout).into_owned();
        let rows: Vec<&str> = screen.lines().filter(|l| l.contains("10.1.1.2:5353") || l.contains("10.1.2.2:5353")).collect();
        // A backend row with a nonzero rate (kilo- or megabits/s).
        let busy = |r: &&str| {
            r.contains(" up ")
                && r.split_whitespace().any(|w| w.len() > 1 && (w.ends_with('k') || w.ends_with('M')) && w[..w.len() - 1].parse::<f64>().is_ok_and(|v| v > 0.0))
        };
        (rows.len() == 2 && start.elapsed() > Duration::from_secs(2) && rows.iter().any(busy)).then_some(())
    });
    assert!(found.is_ok(), "screen:\n{screen}");
    assert!(screen.contains("xlb top") && screen.contains("10.99.0.1:53/udp") && screen.contains("IN b/s"), "{screen}");
    // q quits.
    tmux(&["send-keys", "-t", &session, "q"]);
    let quit = testbed::wait_for("top to quit on q", Duration::from_secs(3), || (!tmux(&["has-session", "-t", &session]).status.success()).then_some(()));
    assert!(quit.is_ok(), "top did not quit on q");
}

#[test]
fn flow_logs_record_fifty_flows_ended_five_ways_with_their_bytes() {
    use testbed::LineClient;
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let topo = Topology::new(TopologyOptions { backends: 2, ..Default::default() }).expect("topology");
    let dir = std::env::temp_dir().join(format!("{}-flowlog", topo.prefix));
    std::fs::create_dir_all(&dir).expect("dir");
    let log = dir.join("flows.jsonl");
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, &["--flow-log", log.to_str().expect("path"), "--flow-log-new"]).expect("daemon");
    let _servers = topo.tcp_servers(8080).expect("servers");
    let (v80, v81) = (topo.vip(80).to_string(), topo.vip(81).to_string());
    daemon.ok(&["service", "add", &v80, "--timeout-established", "3s"]).expect("service");
    daemon.ok(&["backend", "add", &v80, &topo.backend(0, 8080).to_string()]).expect("backend");
    daemon.ok(&["service", "add", &v81]).expect("service");
    daemon.ok(&["backend", "add", &v81, &topo.backend(1, 8080).to_string()]).expect("backend");
    let connect = |port: u16| {
        let mut c = LineClient::connect(&topo.client.name, topo.vip_sock(port)).expect("connect");
        c.ask("hello").expect("hello");
        c
    };
    // A port freed by an aborted flow may be reused by a later one: keep
    // every way a flow on that port ended.
    let mut by_port: HashMap<u16, Vec<&str>> = HashMap::new();
    let mut note = |c: &LineClient, how: &'static str| {
        by_port.entry(c.stream().local_addr().expect("local").port()).or_default().push(how);
    };
    let mut keep = Vec::new();
    for _ in 0..10 {
        // FIN from both sides.
        let c = connect(80);
        note(&c, "fin");
        c.stream().shutdown(std::net::Shutdown::Both).expect("close");
        keep.push(c);
        // The client aborts.
        let c = connect(80);
        note(&c, "rst_client");
        testbed::servers::abort(c.stream());
        drop(c);
        // The backend aborts.
        let mut c = connect(80);
        note(&c, "rst_backend");
        c.send("rst").expect("ask for a RST");
        keep.push(c);
        // Idle past the 3 s timeout.
        let c = connect(80);
        note(&c, "idle");
        keep.push(c);
        // On a backend that will be removed.
        let c = connect(81);
        note(&c, "backend_removed");
        keep.push(c);
    }
    daemon.ok(&["backend", "remove", &v81, &topo.backend(1, 8080).to_string()]).expect("remove");
    let all = testbed::wait_for("50 end records", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&log).ok()?;
        let recs: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        (recs.iter().filter(|r| r["event"] == "end").count() >= 50).then_some(recs)
    })
    .expect("records");
    let new = all.iter().filter(|r| r["event"] == "new").count();
    assert_eq!(new, 50, "one new-flow record per flow (--flow-log-new)");
    let records: Vec<serde_json::Value> = all.into_iter().filter(|r| r["event"] == "end").collect();
    assert_eq!(records.len(), 50, "one end record per flow");
    let mut reasons: HashMap<String, u32> = HashMap::new();
    let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
    for r in &records {
        let client: std::net::SocketAddr = r["client"].as_str().expect("client").parse().expect("addr");
        let ways = by_port.get_mut(&client.port()).unwrap_or_else(|| panic!("record for an unknown flow: {r}"));
        let reason = r["reason"].as_str().unwrap_or("");
        let i = ways.iter().position(|w| *w == reason).unwrap_or_else(|| panic!("{r}: the flow on this port ended by {ways:?}"));
        let want = ways.remove(i);
        *reasons.entry(want.to_string()).or_default() += 1;
        assert!(r["packets_in"].as_u64().unwrap_or(0) >= 3 && r["packets_out"].as_u64().unwrap_or(0) >= 2, "{r}");
        assert!(r["duration_s"].as_f64().unwrap_or(-1.0) >= 0.0 && r["start"].as_f64().unwrap_or(0.0) > 1.7e9, "{r}");
        if r["vip"] == v80.as_str() {
            bytes_in += r["bytes_in"].as_u64().unwrap_or(0);
            bytes_out += r["bytes_out"].as_u64().unwrap_or(0);
        }
    }
    assert_eq!(reasons.len(), 5, "{reasons:?}");
    assert!(reasons.values().all(|n| *n == 10), "{reasons:?}");
    // Every byte of the :80 flows is in their records but each client's
    // SYN: a Maglev service forwards it before the flow exists (the
    // backend's SYN-ACK creates it), 60 IP bytes from a Linux client with
    // its default options (MSS, SACK, timestamps, window scale).
    let s = daemon.json(&["status"]).expect("status");
    let svc = s["services"].as_array().expect("services").iter().find(|x| x["service"] == v80.as_str()).expect("svc").clone();
    assert_eq!(bytes_in + 40 * 60, svc["traffic"]["bytes_in"].as_u64().unwrap_or(0), "bytes in");
    assert_eq!(bytes_out, svc["traffic"]["bytes_out"].as_u64().unwrap_or(0), "bytes out");
    drop(keep);
    let _ = std::fs::remove_dir_all(&dir);
}
