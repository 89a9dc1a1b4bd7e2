//! `cargo xtask bench`: benchmarks that need no peers yet.
//!
//! Reset latency: time from `backend remove` (policy reset) to the last
//! RST sent, for 10k and 100k flows on the removed backend. The flows are
//! synthetic table entries (the netns tests prove the resets are right);
//! the RSTs really go out of a raw socket, inside a private namespace whose
//! only route leads into a veth pair within it (nothing leaves the namespace).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_common::{
    maps::{FlowEntry, FlowKey, DIR_TO_BACKEND, DIR_TO_CLIENT, PROTO_TCP},
    tcp,
};
use testbed::{Netns, in_netns, netns::unique_prefix};
use xlb::{
    api::Proto,
    controller::Controller,
    dataplane::{Dataplane, LoadOptions},
    resetter::RstSender,
};

const RUNS: usize = 3;

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(testbed::have_privileges(), "the benchmarks need root (netns, BPF)");
    let ns = Netns::new(&format!("{}-bench", unique_prefix()))?;
    // A veth pair inside the namespace: everything to 10/8 goes to a
    // gateway with a permanent neighbour entry, out of v0 into v1, where it
    // is dropped (not addressed to v1's MAC).
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"])?;
    ns.ip(&["addr", "add", "192.168.77.1/24", "dev", "v0"])?;
    ns.ip(&["link", "set", "v0", "up"])?;
    ns.ip(&["link", "set", "v1", "up"])?;
    ns.ip(&["neigh", "add", "192.168.77.2", "lladdr", "02:00:00:00:77:02", "dev", "v0", "nud", "permanent"])?;
    ns.ip(&["route", "add", "10.0.0.0/8", "via", "192.168.77.2"])?;
    ns.ip(&["addr", "add", "10.99.0.1/32", "dev", "lo"])?;

    let mut results = Vec::new();
    println!("reset latency: backend remove (policy reset) until its flows are reset and gone from the table");
    println!("(median of {RUNS}, min-max; \"table only\" skips sending the RSTs, to show where the time goes)");
    for (flows, send) in [(10_000u32, true), (100_000, true), (100_000, false)] {
        let mut samples = Vec::new();
        for _ in 0..RUNS {
            samples.push(reset_once(&ns, flows, send)?);
        }
        let mut rst: Vec<Duration> = samples.iter().map(|s| s.0).collect();
        let mut clean: Vec<Duration> = samples.iter().map(|s| s.1).collect();
        rst.sort();
        clean.sort();
        let (r, c) = (rst[RUNS / 2], clean[RUNS / 2]);
        if send {
            println!(
                "  {flows:>7} flows: last RST sent after {:>7.1} ms ({:.1}-{:.1}), table clean after {:>7.1} ms{}",
                ms(r),
                ms(rst[0]),
                ms(rst[RUNS - 1]),
                ms(c),
                if flows == 100_000 { if r < Duration::from_secs(1) { "  [goal < 1 s: met]" } else { "  [goal < 1 s: NOT met]" } } else { "" }
            );
        } else {
            println!("  {flows:>7} flows, table work only (no RSTs sent): {:>7.1} ms ({:.1}-{:.1})", ms(c), ms(clean[0]), ms(clean[RUNS - 1]));
        }
        results.push(serde_json::json!({
            "flows": flows,
            "rsts_sent": send,
            "last_rst_ms_median": ms(r),
            "table_clean_ms_median": ms(c),
            "table_clean_ms_min": ms(clean[0]),
            "table_clean_ms_max": ms(clean[RUNS - 1]),
        }));
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    let out = serde_json::json!({ "benchmark": "reset_latency", "results": results });
    std::fs::write(dir.join("reset.json"), serde_json::to_string_pretty(&out)?)?;
    println!("written to target/bench/reset.json");
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Loads a fresh data plane, fills `flows` synthetic flows on one backend,
/// and times its removal.
/// Returns (time to the last RST sent, time until the table is clean).
fn reset_once(ns: &Netns, flows: u32, send_rsts: bool) -> anyhow::Result<(Duration, Duration)> {
    in_netns(&ns.name, || -> anyhow::Result<(Duration, Duration)> {
        let dp = Dataplane::load(LoadOptions { conn_capacity: flows * 2, half_open_capacity: None, pin_dir: None })?;
        let mut ctl = if send_rsts { Controller::new(dp).with_resets(RstSender::new().context("raw socket")?) } else { Controller::new(dp) };
        let vip = SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 1), 80);
        let backend = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 2), 8080);
        ctl.service_add(vip, Proto::Tcp, &Default::default())?;
        let (_, id) = ctl.backend_add(vip, Some(Proto::Tcp), backend, None)?;
        let ne = |a: Ipv4Addr| u32::from_ne_bytes(a.octets());
        let np = |p: u16| u16::from_ne_bytes(p.to_be_bytes());
        for i in 0..flows {
            let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + i / 50_000);
            let cport = 10_000 + (i % 50_000) as u16;
            let key = FlowKey { src_addr: ne(client), dst_addr: ne(*vip.ip()), src_port: np(cport), dst_port: np(80), proto: PROTO_TCP, _pad: [0; 3] };
            let entry = |dir, nat_addr, nat_port, seq| FlowEntry {
                nat_addr,
                nat_port,
                direction: dir,
                tcp_state: tcp::STATE_ESTABLISHED,
                backend_id: id,
                service_id: 0,
                seq_next: seq,
                ..Default::default()
            };
            ctl.dataplane().flow_insert(key, entry(DIR_TO_BACKEND, ne(*backend.ip()), np(8080), i))?;
            let rkey = FlowKey { src_addr: ne(*backend.ip()), dst_addr: ne(client), src_port: np(8080), dst_port: np(cport), proto: PROTO_TCP, _pad: [0; 3] };
            ctl.dataplane().flow_insert(rkey, entry(DIR_TO_CLIENT, ne(*vip.ip()), np(80), i.wrapping_mul(7)))?;
        }
        let start = Instant::now();
        ctl.backend_remove(vip, Some(Proto::Tcp), backend)?;
        let took = start.elapsed();
        let last_rst = ctl.last_rst_sent().map(|t| t.duration_since(start)).unwrap_or(Duration::ZERO);
        let left = { let mut n = 0; ctl.dataplane().for_each_flow(|_, _| n += 1)?; n };
        anyhow::ensure!(left == 0, "{left} entries left after the reset");
        let status = ctl.status()?;
        let reset = status.services[0].resets.removed;
        anyhow::ensure!(!send_rsts || reset == flows as u64, "{reset} flows reset, expected {flows}");
        anyhow::ensure!(status.counters.get("rst_send_errors") == Some(&0), "RSTs failed to send: {:?}", status.counters.get("rst_send_errors"));
        Ok((last_rst, took))
    })?
}
