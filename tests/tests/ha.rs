//! An active/standby pair with keepalived and state sync: the active node's
//! daemon dies, the gateways move, and every established flow carries on
//! through the standby with no reset.

use std::time::{Duration, Instant};

use testbed::{LineClient, TcpNameServer, ha::{self, Pair}, wait_for};

const PORT: u16 = 8080;

#[test]
fn a_failover_keeps_100_established_flows_and_new_flows_work() {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let mut pair = Pair::new(2).expect("pair topology");
    let _servers: Vec<TcpNameServer> = pair
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| TcpNameServer::start(&b.name, &format!("b{i}"), ([0, 0, 0, 0], PORT).into()).expect("server"))
        .collect();
    for i in 0..2 {
        pair.start_daemon(i, &[]).expect("daemon");
    }
    let vip = format!("{}:80", ha::VIP);
    pair.both(&["service", "add", &vip, "--scheduler", "wrr"]).expect("service on both");
    for i in 0..2 {
        pair.both(&["backend", "add", &vip, &format!("{}:{PORT}", ha::backend_addr(i))]).expect("backend on both");
    }
    pair.start_keepalived(0, 150).expect("keepalived a");
    pair.start_keepalived(1, 100).expect("keepalived b");
    let master = pair.wait_master(Duration::from_secs(15)).expect("a master is elected");
    let standby = 1 - master;
    let target = std::net::SocketAddr::new(ha::VIP.into(), 80);
    let mut clients: Vec<(LineClient, String)> = (0..100)
        .map(|i| {
            let mut c = LineClient::connect(&pair.client.name, target).expect("connect through the master");
            let who = c.ask(&format!("hello {i}")).expect("answer");
            (c, who)
        })
        .collect();
    // The standby has every flow.
    let sd = pair.nodes[standby].daemon.as_ref().expect("standby daemon");
    wait_for("the standby to hold the 100 flows", Duration::from_secs(10), || {
        let f = sd.json(&["flows"]).ok()?;
        (f.as_array()?.len() == 100).then_some(())
    })
    .expect("synced flows on the standby");
    let s = sd.json(&["status"]).expect("status");
    assert_eq!(s["sync"]["refused_datagrams"], 0, "{:#}", s["sync"]);

    // The active node's daemon dies and its program goes with it; its
    // keepalived sees `xlb health` fail and gives the gateways up.
    let failed_at = Instant::now();
    if let Some(mut d) = pair.nodes[master].daemon.take() {
        d.stop().expect("stop the active daemon");
    }
    let new_master = pair.wait_master(Duration::from_secs(15)).expect("the standby takes over");
    assert_eq!(new_master, standby);
    // Every established flow goes on, on its backend, with no reset.
    let mut first_ok = None;
    for (i, (c, who)) in clients.iter_mut().enumerate() {
        let got = c.ask(&format!("after failover {i}")).unwrap_or_else(|e| {
            let st = pair.nodes[standby].daemon.as_ref().and_then(|d| d.json(&["status"]).ok()).unwrap_or_default();
            let nonzero: Vec<String> = st["counters"].as_object().map(|m| m.iter().filter(|(_, v)| v.as_u64() != Some(0)).map(|(k, v)| format!("{k}={v}")).collect()).unwrap_or_default();
            panic!(
                "flow {i} broke in the failover: {e:#}\nnew master counters: {nonzero:?}\nsync: {}\nclient neigh: {}\nbackend0 neigh: {}\nstandby addrs: {}",
                st["sync"],
                pair.client.ip(&["neigh"]).unwrap_or_default(),
                pair.backends[0].ip(&["neigh"]).unwrap_or_default(),
                pair.nodes[standby].ns.ip(&["-4", "-br", "addr"]).unwrap_or_default()
            )
        });
        assert_eq!(&got, who, "flow {i} changed backend");
        first_ok.get_or_insert_with(|| failed_at.elapsed());
    }
    let recovered = first_ok.unwrap_or_default();
    eprintln!("failover: 100/100 flows continued; first answer through the standby {recovered:?} after the active daemon died");
    // New flows work through the new master.
    for i in 0..10 {
        let mut c = LineClient::connect(&pair.client.name, target).expect("new flow after failover");
        let who = c.ask(&format!("new {i}")).expect("answer");
        assert!(who == "b0" || who == "b1");
    }
    let s = pair.nodes[standby].daemon.as_ref().expect("daemon").json(&["status"]).expect("status");
    assert_eq!(s["counters"]["rst_reactive"], 0, "no flow was reset: {:#}", s["counters"]);
    assert_eq!(s["counters"]["rst_miss"], 0, "no flow was missing on the standby: {:#}", s["counters"]);
}
