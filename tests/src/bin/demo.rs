//! `cargo xtask demo`: builds client → lb → 3 backends in network
//! namespaces, starts `xlb daemon` on the lb, registers a service through
//! the CLI, sends a few hundred requests through the VIP, prints where they
//! went and `xlb status`, and removes everything it created.

use std::{collections::BTreeMap, net::SocketAddr, time::Instant};

use anyhow::Context as _;
use testbed::{Daemon, LineClient, TcpNameServer, Topology, TopologyOptions};

const REQUESTS: usize = 300;

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(testbed::have_privileges(), "the demo needs root (network namespaces, XDP)");
    let started = Instant::now();
    println!("== building the topology: client ns → lb ns (xlb, native XDP) → 3 backend ns");
    let topo = Topology::new(TopologyOptions { backends: 3, ..Default::default() })?;
    println!("   namespaces: {}, {}, {}", topo.client.name, topo.lb.name, topo.backends.iter().map(|b| b.name.as_str()).collect::<Vec<_>>().join(", "));
    let daemon = Daemon::start(&topo.lb, &topo.lb_ifaces, &[])?;
    println!("== xlb daemon running in {} on {} (socket {})", topo.lb.name, topo.lb_ifaces.join(", "), daemon.socket.display());
    let _servers: Vec<TcpNameServer> = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| TcpNameServer::start(&b.name, &format!("backend-{i}"), "0.0.0.0:8080".parse().expect("literal address")))
        .collect::<anyhow::Result<_>>()?;

    let vip = topo.vip(80).to_string();
    let weights = [1, 2, 1];
    let mut cmds: Vec<Vec<String>> = vec![vec!["service".into(), "add".into(), vip.clone()]];
    for (i, w) in weights.iter().enumerate() {
        cmds.push(vec!["backend".into(), "add".into(), vip.clone(), topo.backend(i, 8080).to_string(), "--weight".into(), w.to_string()]);
    }
    for c in &cmds {
        let args: Vec<&str> = c.iter().map(String::as_str).collect();
        println!("$ xlb {}", args.join(" "));
        print!("  {}", daemon.ok(&args)?);
    }

    println!("== {REQUESTS} requests from the client to {vip}, one TCP connection each (weighted Maglev: shares follow weights statistically)");
    let target: SocketAddr = topo.vip_sock(80);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..REQUESTS {
        let mut c = LineClient::connect(&topo.client.name, target).context("connecting to the VIP")?;
        let who = c.ask(&format!("request {i}"))?;
        *counts.entry(who).or_default() += 1;
    }
    let total: u32 = weights.iter().sum();
    for (i, w) in weights.iter().enumerate() {
        let name = format!("backend-{i}");
        let n = counts.get(&name).copied().unwrap_or(0);
        println!(
            "   {name} ({}, weight {w}): {n:>4} requests ({:.0}%; weight share {:.0}%)",
            topo.backend(i, 8080),
            100.0 * n as f64 / REQUESTS as f64,
            100.0 * *w as f64 / total as f64
        );
    }
    println!("\n$ xlb status");
    print!("{}", daemon.ok(&["status"])?);
    println!("\n== done in {:.1} s; removing namespaces and detaching", started.elapsed().as_secs_f64());
    Ok(())
}
