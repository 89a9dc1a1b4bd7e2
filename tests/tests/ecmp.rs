//! Two xlb nodes in DSR mode behind a router doing ECMP over BGP routes
//! (BIRD): a node stops, its flows move to the other node by the router's
//! rehash and keep their backend (Maglev + `--on-miss rehash`), with no
//! reset; new flows use the survivor; the node comes back and nothing
//! breaks.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use testbed::{
    LineClient, TcpNameServer,
    ecmp::{self, Fabric},
    wait_for,
};

const PORT: u16 = 8080;

fn new_flows(f: &Fabric, i: usize) -> u64 {
    f.lbs[i].daemon.as_ref().and_then(|d| d.json(&["status"]).ok()).and_then(|s| s["counters"]["new_flows"].as_u64()).unwrap_or(0)
        + f.lbs[i].daemon.as_ref().and_then(|d| d.json(&["status"]).ok()).and_then(|s| s["counters"]["rehashed"].as_u64()).unwrap_or(0)
}

#[test]
fn a_node_leaves_and_returns_and_its_200_flows_keep_their_backends() {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let mut f = Fabric::new(2).expect("fabric");
    // (Undone when the fabric is dropped, also on failure.)
    f.set_up_backends().expect("backend setup (decapsulation, VIP on lo)");
    // Servers listen on the VIP's port; they see the client's own address.
    let servers: Vec<TcpNameServer> =
        f.backends.iter().enumerate().map(|(i, b)| TcpNameServer::start(&b.name, &format!("b{i}"), ([0, 0, 0, 0], PORT).into()).expect("server")).collect();
    f.start_router_bird().expect("router BIRD");
    for i in 0..2 {
        f.start_daemon(i).expect("daemon");
        configure(&f, i);
        f.start_lb_bird(i).expect("lb BIRD");
    }
    if let Err(e) = wait_for("the router to route the VIP over both nodes", Duration::from_secs(30), || (f.next_hops().len() == 2).then_some(())) {
        panic!("ECMP over both nodes: {e}\n{}", f.diagnostics());
    }
    let vip = SocketAddr::new(ecmp::VIP.into(), PORT);
    let mut clients: Vec<(LineClient, String)> = (0..200)
        .map(|i| {
            let mut c = LineClient::connect(&f.client.name, vip).unwrap_or_else(|e| panic!("connect through ECMP: {e}\n{}", f.diagnostics()));
            let who = c.ask(&format!("hello {i}")).expect("answer");
            (c, who)
        })
        .collect();
    let per_node: Vec<u64> = (0..2).map(|i| new_flows(&f, i)).collect();
    assert!(per_node.iter().all(|&n| n >= 20), "the router spread flows over both nodes: {per_node:?}");
    // DSR: backends saw the client itself.
    for s in &servers {
        assert!(s.seen.peers.lock().expect("lock").keys().all(|p| p.ip() == std::net::IpAddr::from([10, 0, 0, 2])));
    }

    // Node 0 stops: it withdraws the VIP, forwards through the grace
    // period, then detaches.
    let node1_before = new_flows(&f, 1);
    let stopped = Instant::now();
    f.lbs[0].daemon.as_mut().expect("daemon").stop().expect("stop node 0");
    wait_for("the router to drop node 0", Duration::from_secs(10), || (f.next_hops() == vec![ecmp::lb_addr(1).to_string()]).then_some(())).expect("withdrawn");
    eprintln!("node 0 withdrawn from the router after {:?}", stopped.elapsed());
    let mut moved = HashMap::new();
    for (i, (c, who)) in clients.iter_mut().enumerate() {
        let got = c.ask(&format!("after stop {i}")).unwrap_or_else(|e| panic!("flow {i} broke when node 0 left: {e:#}"));
        assert_eq!(&got, who, "flow {i} changed backend");
        *moved.entry(got).or_insert(0) += 1;
    }
    for i in 0..10 {
        let mut c = LineClient::connect(&f.client.name, vip).expect("new flow on the survivor");
        c.ask(&format!("new {i}")).expect("answer");
    }
    let s1 = f.lbs[1].daemon.as_ref().expect("daemon").json(&["status"]).expect("status");
    assert_eq!(s1["counters"]["rst_miss"], 0, "{:#}", s1["counters"]);
    // DSR: the survivor enters each of node 0's flows at its first segment
    // (scheduled by the shared keyed hash, so on the same backend).
    let taken = new_flows(&f, 1) - node1_before;
    assert!(taken >= per_node[0] + 10, "node 1 took {taken} flows: node 0's {} and the 10 new ones expected: {:#}", per_node[0], s1["counters"]);
    eprintln!("node 0 left: 200/200 flows continued on their backends ({moved:?})");
    // Node 0 comes back.
    f.lbs[0].daemon.as_mut().expect("daemon").restart(&[]).expect("restart node 0");
    // It comes back empty (its state went with it): configured as before,
    // it announces the VIP again.
    configure(&f, 0);
    if let Err(e) = wait_for("the router to use node 0 again", Duration::from_secs(15), || (f.next_hops().len() == 2).then_some(())) {
        panic!("node 0 back: {e}\n{}", f.diagnostics());
    }
    for (i, (c, who)) in clients.iter_mut().enumerate() {
        let got = c.ask(&format!("after return {i}")).unwrap_or_else(|e| panic!("flow {i} broke when node 0 returned: {e:#}"));
        assert_eq!(&got, who, "flow {i} changed backend when node 0 returned");
    }
}

/// The same DSR service on every node: Maglev (the default) and rehash on
/// a miss, so any node sends a flow to the same backend.
fn configure(f: &Fabric, i: usize) {
    let d = f.lbs[i].daemon.as_ref().expect("daemon");
    let vip = format!("{}:{PORT}", ecmp::VIP);
    d.ok(&["service", "add", &vip, "--mode", "dsr", "--on-miss", "rehash"]).expect("DSR service");
    for b in 0..2 {
        d.ok(&["backend", "add", &vip, &format!("{}:{PORT}", ecmp::backend_addr(b))]).expect("backend");
    }
}

#[test]
fn dsr_red_black_resets_every_idle_client_within_a_second_without_it_sending() {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let mut f = Fabric::new(2).expect("fabric");
    f.set_up_backends().expect("backend setup (decapsulation, VIP on lo)");
    let _servers: Vec<TcpNameServer> =
        f.backends.iter().enumerate().map(|(i, b)| TcpNameServer::start(&b.name, &format!("b{i}"), ([0, 0, 0, 0], PORT).into()).expect("server")).collect();
    // One node, routed to statically (no BGP needed for this).
    f.router.ip(&["route", "add", &format!("{}/32", ecmp::VIP), "via", &ecmp::lb_addr(0).to_string()]).expect("route");
    f.start_daemon(0).expect("daemon");
    configure(&f, 0);
    let vip = SocketAddr::new(ecmp::VIP.into(), PORT);
    let mut clients: Vec<LineClient> = (0..100)
        .map(|i| {
            let mut c = LineClient::connect(&f.client.name, vip).unwrap_or_else(|e| panic!("connect through DSR: {e}\n{}", f.diagnostics()));
            c.ask(&format!("hello {i}")).expect("answer");
            c
        })
        .collect();
    // Each client's ACK of the answer has reached the balancer (it tracks
    // what the client acknowledged: the backend's next sequence number).
    let d = f.lbs[0].daemon.as_ref().expect("daemon");
    wait_for("the 100 flows in the table", Duration::from_secs(5), || (d.json(&["flows"]).ok()?.as_array()?.len() == 100).then_some(())).expect("flows");
    // Red/black: both backends removed; the clients send nothing.
    let start = Instant::now();
    for b in 0..2 {
        d.ok(&["backend", "remove", &vip.to_string(), &format!("{}:{PORT}", ecmp::backend_addr(b))]).expect("remove");
    }
    let streams: Vec<&std::net::TcpStream> = clients.iter_mut().map(|c| c.stream()).collect();
    let outcomes = testbed::watch_idle(&streams, start, Duration::from_secs(3));
    let reset_in_time = outcomes.iter().filter(|o| matches!(o, testbed::Outcome::Reset(t) if *t < Duration::from_secs(1))).count();
    let s = d.json(&["status"]).expect("status");
    assert_eq!(
        reset_in_time,
        100,
        "idle DSR clients told within 1 s: {reset_in_time}/100; outcomes {:?}; counters {}; services {}",
        &outcomes[..outcomes.len().min(5)],
        s["counters"],
        s["services"]
    );
}
