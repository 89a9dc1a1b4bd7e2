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
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(k, v)| (k.to_owned(), v.parse().expect("value"))))
        .collect()
}

#[test]
fn scraped_metrics_match_the_traffic_sent() {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let topo = Topology::new(TopologyOptions { backends: 2 }).expect("topology");
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, &["--metrics-addr", "127.0.0.1:9100"]).expect("daemon");
    let servers: Vec<UdpNameServer> = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| UdpNameServer::start(&b.name, &format!("b{i}"), "0.0.0.0:5353".parse().expect("addr")).expect("server"))
        .collect();
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
    let m = scrape(&topo.lb.name);
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
    assert_eq!(m.get("xlb_table_entries{table=\"established\"}"), Some(&40.0));
    assert!(m.get("xlb_dataplane_rx_total").copied().unwrap_or(0.0) >= 400.0);
    assert!(m.contains_key("xlb_dataplane_verdicts_total{reason=\"pass_not_service\"}"));
}

#[test]
fn an_unusable_metrics_address_fails_the_start_cleanly() {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let topo = Topology::new(TopologyOptions { backends: 0 }).expect("topology");
    // 10.9.9.9 is not an address of the lb namespace.
    let (status, log, d) = Daemon::run_expecting_exit(&topo.lb, &topo.lb_ifaces, &["--metrics-addr", "10.9.9.9:9100"]).expect("run");
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("binding the metrics address 10.9.9.9:9100"), "{log}");
    assert!(!d.socket.exists());
    let link = topo.lb.ip(&["link", "show", "l0"]).expect("link");
    assert!(!link.contains("xdp"), "{link}");
}
