//! The connection table under pressure and over time: SYN floods, idle
//! expiry, closed flows leaving.

use std::{
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use testbed::{
    Daemon, LineClient, TcpNameServer, Topology, TopologyOptions, in_netns,
    packet::{Frame, TCP_SYN, send_raw_ipv4},
};

#[test]
fn a_bounded_syn_flood_into_a_small_table_breaks_no_established_flow() {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let topo = Topology::new(TopologyOptions { backends: 2, ..Default::default() }).expect("topology");
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, &["--conn-capacity", "1024", "--half-open-capacity", "256"]).expect("daemon");
    let _servers: Vec<TcpNameServer> = topo.tcp_servers(8080).expect("servers");
    let vip = topo.vip(80).to_string();
    daemon.ok(&["service", "add", &vip]).expect("service");
    for i in 0..2 {
        daemon.ok(&["backend", "add", &vip, &topo.backend(i, 8080).to_string()]).expect("backend");
    }
    let mut clients: Vec<(LineClient, String)> = (0..100)
        .map(|i| {
            let mut c = LineClient::connect(&topo.client.name, topo.vip_sock(80)).expect("connect");
            let who = c.ask(&format!("hello {i}")).expect("hello");
            (c, who)
        })
        .collect();
    // The flood: SYNs from 40,000 spoofed sources, sent from the client
    // namespace for at most 5 s (their SYN-ACKs die in the client namespace).
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let (ns, stop) = (topo.client.name.clone(), stop.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut sent = 0usize;
            'outer: for round in 0..4u32 {
                let pkts: Vec<Vec<u8>> = (0..10_000u32)
                    .map(|i| {
                        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + round * 10_000 + i);
                        Frame::tcp((src, 1024 + (i % 60000) as u16), (Ipv4Addr::new(10, 99, 0, 1), 80), TCP_SYN, i, 0).build()[14..].to_vec()
                    })
                    .collect();
                sent += in_netns(&ns, || send_raw_ipv4(&pkts)).expect("ns").expect("raw send");
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break 'outer;
                }
            }
            sent
        })
    };
    // Meanwhile every established flow keeps talking.
    let mut rounds = 0;
    while !flood.is_finished() || rounds < 3 {
        for (i, (c, who)) in clients.iter_mut().enumerate() {
            let got = c.ask(&format!("during {rounds} {i}")).unwrap_or_else(|e| panic!("flow {i} broke under the flood: {e}"));
            assert_eq!(&got, who, "flow {i} moved");
        }
        rounds += 1;
        if rounds > 200 {
            stop.store(true, Ordering::Relaxed);
        }
    }
    let sent = flood.join().expect("flood thread");
    assert!(sent >= 20_000, "the flood sent only {sent} SYNs");
    // Table figures come from the table walker's latest snapshot: one
    // taken after the flood.
    let flood_over = Instant::now();
    let s = testbed::wait_for("a table snapshot after the flood", Duration::from_secs(5), || {
        let s = daemon.json(&["status"]).ok()?;
        let age = s["table"]["snapshot_age_s"].as_f64()?;
        (Duration::from_secs_f64(age) < flood_over.elapsed()).then_some(s)
    })
    .expect("snapshot");
    // Not every SYN reaches XDP (a veth drops what its backlog cannot take),
    // but the flood is many times the half-open table. Its SYNs write
    // nothing; the backend's SYN-ACKs (or cookies) create half-open flows.
    let syns = s["counters"]["stateless_syn"].as_u64().unwrap_or(0);
    assert!(syns >= 5_000, "counters must show the flood: stateless_syn {syns} of {sent} sent");
    let new_flows = s["counters"]["new_flows"].as_u64().unwrap_or(0);
    assert_eq!(s["table"]["entries"], 100, "the connection table holds exactly the 100 established flows: {s:#}");
    assert!(s["table"]["half_open_entries"].as_u64().unwrap_or(0) <= 512, "{s:#}");
    // The flood went through the half-open table and was evicted from it.
    let evictions = s["counters"]["table_evictions"].as_u64().unwrap_or(0);
    assert!(evictions + 100 + 512 >= new_flows, "evictions {evictions} for {new_flows} new flows into a 256-flow half-open table");
    // New connections still work after the flood.
    let mut c = LineClient::connect(&topo.client.name, topo.vip_sock(80)).expect("connect after the flood");
    c.ask("after").expect("a new flow after the flood");
    eprintln!("flood: {sent} SYNs, {rounds} rounds of 100 messages, none lost");
}

#[test]
fn idle_flows_expire_reset_on_idle_resets_both_ends_and_closed_flows_leave_within_seconds() {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let topo = Topology::new(TopologyOptions { backends: 1, ..Default::default() }).expect("topology");
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, &[]).expect("daemon");
    let server = TcpNameServer::start(&topo.backends[0].name, "b0", "0.0.0.0:8080".parse().expect("addr")).expect("server");
    let backend = topo.backend(0, 8080).to_string();
    // :80 resets idle flows, :81 forgets them silently.
    for (port, reset) in [(80u16, "true"), (81, "false")] {
        let vip = topo.vip(port).to_string();
        daemon.ok(&["service", "add", &vip, "--timeout-established", "4s", "--reset-on-idle", reset]).expect("service");
        daemon.ok(&["backend", "add", &vip, &backend]).expect("backend");
    }
    let mut resetting = LineClient::connect(&topo.client.name, topo.vip_sock(80)).expect("connect");
    let mut silent = LineClient::connect(&topo.client.name, topo.vip_sock(81)).expect("connect");
    resetting.ask("hi").expect("hi");
    silent.ask("hi").expect("hi");
    let mut closing = LineClient::connect(&topo.client.name, topo.vip_sock(81)).expect("connect");
    closing.ask("bye").expect("bye");
    let start = Instant::now();
    closing.stream().shutdown(std::net::Shutdown::Both).expect("close");
    drop(closing);
    // A closed flow leaves within seconds (it lingers CLOSED_LINGER, 2 s),
    // while the idle ones (4 s timeout) are still there.
    testbed::wait_for("the closed flow to leave the table", Duration::from_secs(4), || {
        let flows = daemon.json(&["flows"]).ok()?;
        (flows.as_array()?.len() == 2).then_some(())
    })
    .expect("closed flow gone");
    assert!(start.elapsed() < Duration::from_millis(3500), "closed flow left after {:?}", start.elapsed());
    // The idle flows: reset at both ends after ~4 s (+1 s expiry cadence).
    let outcomes = testbed::watch_idle(&[resetting.stream(), silent.stream()], start, Duration::from_secs(7));
    match outcomes[0] {
        testbed::Outcome::Reset(t) => assert!(t >= Duration::from_secs(4) && t < Duration::from_millis(6500), "reset at {t:?}"),
        o => panic!("reset-on-idle flow: {o:?}"),
    }
    assert_eq!(outcomes[1], testbed::Outcome::Silent, "without reset-on-idle nothing is sent");
    testbed::wait_for("the backend's side of the idle flow to be reset", Duration::from_secs(2), || {
        (server.seen.resets.load(Ordering::Relaxed) >= 1).then_some(())
    })
    .expect("backend reset");
    let flows = daemon.json(&["flows"]).expect("flows");
    assert_eq!(flows.as_array().map(Vec::len), Some(0), "idle flows left the table: {flows}");
    let s = daemon.json(&["status"]).expect("status");
    assert_eq!(s["services"][0]["resets"]["idle"], 1, "{s:#}");
    assert_eq!(s["services"][1]["resets"]["expired"], 2, "{s:#}"); // the idle one and the closed one
    // The silently forgotten flow is not a black hole: its next write gets
    // a RST (the two services share their backend, so its answer could
    // not be mapped back to a VIP: the segment is not hashed to it).
    silent.send("anyone?").expect("write");
    let o = testbed::watch_idle(&[silent.stream()], Instant::now(), Duration::from_secs(2));
    assert!(matches!(o[0], testbed::Outcome::Reset(_)), "{o:?}");
}
