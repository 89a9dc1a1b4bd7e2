//! An active/standby pair with keepalived and state sync: the active node's
//! daemon dies, the gateways move, and every established flow carries on
//! through the standby with no reset.

use std::time::{Duration, Instant};

use testbed::{
    LineClient, TcpNameServer,
    ha::{self, Pair},
    wait_for,
};
use xlb::ha::{encode, unix_ns};

const PORT: u16 = 8080;

#[test]
fn a_failover_keeps_100_established_flows_and_new_flows_work() {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let mut pair = Pair::new(2).expect("pair topology");
    let _servers: Vec<TcpNameServer> =
        pair.backends.iter().enumerate().map(|(i, b)| TcpNameServer::start(&b.name, &format!("b{i}"), ([0, 0, 0, 0], PORT).into()).expect("server")).collect();
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
            let nonzero: Vec<String> = st["counters"]
                .as_object()
                .map(|m| m.iter().filter(|(_, v)| v.as_u64() != Some(0)).map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_default();
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

/// The standby's sync figures.
fn sync_status(pair: &Pair, i: usize) -> serde_json::Value {
    pair.nodes[i].daemon.as_ref().and_then(|d| d.json(&["status"]).ok()).map(|s| s["sync"].clone()).unwrap_or_default()
}

fn flows_on(pair: &Pair, i: usize) -> Option<usize> {
    Some(pair.nodes[i].daemon.as_ref()?.json(&["flows"]).ok()?.as_array()?.len())
}

#[test]
fn the_standby_refuses_replays_and_follows_a_restarted_master() {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let mut pair = Pair::new(1).expect("pair topology");
    let _server = TcpNameServer::start(&pair.backends[0].name, "b0", ([0, 0, 0, 0], PORT).into()).expect("server");
    // No keepalived: node 0 is master and holds the gateways.
    pair.start_daemon(0, &["--role", "master"]).expect("master daemon");
    pair.start_daemon(1, &[]).expect("standby daemon");
    let vip = format!("{}:80", ha::VIP);
    pair.both(&["service", "add", &vip]).expect("service on both");
    pair.both(&["backend", "add", &vip, &format!("{}:{PORT}", ha::backend_addr(0))]).expect("backend on both");
    pair.nodes[0].ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "xc"]).expect("client gateway");
    pair.nodes[0].ns.ip(&["addr", "add", "10.1.0.1/24", "dev", "xb"]).expect("backend gateway");
    let target = std::net::SocketAddr::new(ha::VIP.into(), 80);
    let client = pair.client.name.clone();
    let connect = |n: usize| -> Vec<LineClient> {
        (0..n)
            .map(|i| {
                let mut c = LineClient::connect(&client, target).expect("connect through the master");
                assert_eq!(c.ask(&format!("hello {i}")).expect("answer"), "b0");
                c
            })
            .collect()
    };
    let _first = connect(5);
    wait_for("the standby to hold the 5 flows", Duration::from_secs(10), || (flows_on(&pair, 1)? == 5).then_some(())).expect("synced flows");
    let epoch = sync_status(&pair, 0)["epoch"].as_u64().expect("the master's epoch");
    assert!(epoch > 0);
    assert_eq!(sync_status(&pair, 1)["peer_epoch"].as_u64(), Some(epoch), "{:#}", sync_status(&pair, 1));

    // A genuine datagram, seen on the standby's link, sent again from the
    // master's address: refused as a replay, and counted.
    let captured = pair.capture_sync_datagram(1, Duration::from_secs(10)).expect("a sync datagram (refreshes come every 3 s)");
    pair.send_sync_as(0, &captured).expect("replay");
    wait_for("the replay to be counted", Duration::from_secs(5), || (sync_status(&pair, 1)["replayed_datagrams"] == 1).then_some(()))
        .unwrap_or_else(|e| panic!("{e}: {:#}", sync_status(&pair, 1)));
    // Validly signed, but from an earlier run, or sent two minutes ago.
    pair.send_sync_as(0, &encode(ha::SYNC_KEY, epoch - 1, 1, unix_ns(), &[])).expect("old epoch");
    pair.send_sync_as(0, &encode(ha::SYNC_KEY, epoch, 1_000_000, unix_ns() - 120_000_000_000, &[])).expect("stale");
    wait_for("the old epoch and the stale datagram to be counted", Duration::from_secs(5), || {
        let s = sync_status(&pair, 1);
        (s["old_epoch_datagrams"] == 1 && s["stale_datagrams"] == 1).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:#}", sync_status(&pair, 1)));
    let s = sync_status(&pair, 1);
    assert_eq!((s["refused_datagrams"].as_u64(), s["peer_restarts"].as_u64()), (Some(0), Some(0)), "{s:#}");

    // The master's daemon restarts: a new epoch, numbered from 1. The
    // standby follows it at once and keeps installing its flows.
    let master = pair.nodes[0].daemon.as_mut().expect("master daemon");
    master.stop().expect("stop the master");
    master.restart(&[]).expect("restart the master");
    // (Started with --detach-on-exit, it comes back empty.)
    master.ok(&["service", "add", &vip]).expect("service again");
    master.ok(&["backend", "add", &vip, &format!("{}:{PORT}", ha::backend_addr(0))]).expect("backend again");
    let _second = connect(3);
    wait_for("the standby to hold the 3 new flows too", Duration::from_secs(15), || (flows_on(&pair, 1)? == 8).then_some(()))
        .unwrap_or_else(|e| panic!("{e}: {} flows; {:#}", flows_on(&pair, 1).unwrap_or(0), sync_status(&pair, 1)));
    let new_epoch = sync_status(&pair, 0)["epoch"].as_u64().expect("the new epoch");
    assert!(new_epoch > epoch, "a restart's epoch is later: {new_epoch} <= {epoch}");
    let s = sync_status(&pair, 1);
    assert_eq!((s["peer_restarts"].as_u64(), s["peer_epoch"].as_u64()), (Some(1), Some(new_epoch)), "{s:#}");
    // The first run's datagram, replayed now: an old epoch.
    pair.send_sync_as(0, &captured).expect("replay after the restart");
    wait_for("the old run's datagram to be refused", Duration::from_secs(5), || (sync_status(&pair, 1)["old_epoch_datagrams"] == 2).then_some(()))
        .unwrap_or_else(|e| panic!("{e}: {:#}", sync_status(&pair, 1)));
    let s = sync_status(&pair, 1);
    assert_eq!((s["refused_datagrams"].as_u64(), s["replayed_datagrams"].as_u64(), s["stale_datagrams"].as_u64()), (Some(0), Some(1), Some(1)), "{s:#}");
    assert_eq!(flows_on(&pair, 1), Some(8));
}
