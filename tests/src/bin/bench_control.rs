//! `cargo xtask bench` (control plane): what a user of the API sees with
//! 1,000,000 flows in the table. A daemon runs in the test topology; the
//! flows are synthetic entries written into its pinned connection table
//! (established, fresh: none expires during the run). Measured from
//! outside, as keepalived, Prometheus and an orchestrator see it:
//!
//! - `xlb health` (the process, start to exit): goal under 10 ms;
//! - `xlb status --json` and a `GET /metrics` scrape: goal under 100 ms;
//! - `xlb backend add` issued while a scrape is in flight, and one every
//!   100 ms across the table walker's passes (snapshots, expiry): goal
//!   under 50 ms.
//!
//! With `XLB_BIN_BEFORE` (a build of an earlier revision: `cargo xtask
//! bench` makes one when `XLB_BENCH_BEFORE=REV` is set) the same cases run
//! against it in the same run, and the ratios are printed. JSON goes to
//! target/bench/control.json.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use testbed::{Daemon, Topology, TopologyOptions, flows, in_netns, wait_for};

const FLOWS: u32 = 1_000_000;
const METRICS: &str = "127.0.0.1:9100";

#[derive(Clone, Copy, Debug)]
struct Goal {
    ms: f64,
}

/// One case's samples, in ms.
struct Case {
    name: &'static str,
    goal: Goal,
    samples: Vec<f64>,
}

impl Case {
    fn sorted(&self) -> Vec<f64> {
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        s
    }
    fn median(&self) -> f64 {
        let s = self.sorted();
        s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
    }
    fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(testbed::have_privileges(), "the benchmarks need root (netns, BPF)");
    let after = testbed::daemon::xlb_bin();
    let before = std::env::var_os("XLB_BIN_BEFORE").map(PathBuf::from);
    let label_before = std::env::var("XLB_BENCH_BEFORE").unwrap_or_else(|_| "before".into());
    println!("control plane at {FLOWS} flows (synthetic established entries), from outside the daemon");
    let now = measure(&after)?;
    let then = match &before {
        Some(b) => match measure(b) {
            Ok(cases) => Some(cases),
            // An earlier build with another table layout cannot take
            // these synthetic flows.
            Err(e) => {
                println!("  (the build of {label_before} is not measured: {e:#})");
                None
            }
        },
        None => {
            println!("  (no earlier build to compare with: set XLB_BENCH_BEFORE=REV)");
            None
        }
    };
    println!();
    println!("  {:<44} {:>10} {:>10} {:>8}  met", "case (ms)", "median", "max", "goal");
    let mut json = Vec::new();
    for (i, c) in now.iter().enumerate() {
        // Goals on the median; the backend-add cases on the worst too.
        let worst = c.name.starts_with("backend add");
        let met = if worst { c.max() < c.goal.ms } else { c.median() < c.goal.ms };
        println!("  {:<44} {:>10.2} {:>10.2} {:>8}  {}", c.name, c.median(), c.max(), format!("<{}", c.goal.ms), if met { "met" } else { "NOT met" });
        let mut entry = serde_json::json!({ "case": c.name, "median_ms": c.median(), "max_ms": c.max(), "goal_ms": c.goal.ms, "goal_on": if worst { "max" } else { "median" }, "met": met, "samples": c.samples.len() });
        if let Some(b) = then.as_ref().and_then(|t| t.get(i)) {
            println!("  {:<44} {:>10.2} {:>10.2}  ({:.0}x faster now, median)", format!("  {label_before}"), b.median(), b.max(), b.median() / c.median());
            entry["before"] = serde_json::json!({ "rev": label_before, "median_ms": b.median(), "max_ms": b.max() });
        }
        json.push(entry);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("control.json"),
        serde_json::to_string_pretty(&serde_json::json!({ "benchmark": "control_plane", "flows": FLOWS, "results": json }))?,
    )?;
    println!("written to target/bench/control.json");
    Ok(())
}

/// The kernel's jiffies (low 32 bits), the data plane's clock, from
/// `/proc/timer_list`.
fn jiffies() -> anyhow::Result<u32> {
    let text = std::fs::read_to_string("/proc/timer_list").context("reading /proc/timer_list")?;
    let line = text.lines().find_map(|l| l.strip_prefix("jiffies: ")).context("no jiffies in /proc/timer_list")?;
    Ok(line.trim().parse::<u64>().context("jiffies in /proc/timer_list")? as u32)
}

/// Writes `FLOWS` established DNAT flows to `backend` (id `id`, of service
/// `service_id`) into the daemon's pinned connection table, in batches,
/// stamped `now` (the data plane's jiffies).
fn fill(pin_dir: &Path, vip: SocketAddr, service_id: u32, id: u32, now: u32) -> anyhow::Result<()> {
    let map = aya::maps::MapData::from_pin(pin_dir.join("XLB_CONNS")).context("opening the pinned connection table")?;
    let value_size = map.info().context("reading the connection table's layout")?.value_size() as usize;
    anyhow::ensure!(
        value_size == std::mem::size_of::<lb_common::maps::FlowState>(),
        "its connection table holds {value_size}-byte values, not this layout's flows"
    );
    let (mut keys, mut values) = (Vec::with_capacity(1 << 16), Vec::with_capacity(1 << 16));
    for i in 0..FLOWS {
        let client = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 200, 0, 0)) + i / 50_000);
        let client = SocketAddr::new(client.into(), 10_000 + (i % 50_000) as u16);
        let (k, e) = flows::established(client, vip, service_id, id, (i, i.wrapping_mul(7)), now);
        keys.push(k);
        values.push(e);
        if keys.len() >= 1 << 16 || i + 1 == FLOWS {
            xlb::dataplane::batch::update_many(map.fd().as_fd(), &keys, &values).context("writing synthetic flows")?;
            keys.clear();
            values.clear();
        }
    }
    Ok(())
}

use std::os::fd::AsFd as _;

/// One `GET /metrics` in the daemon's namespace; the time to the last byte.
fn scrape(ns: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let body = in_netns(ns, || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&METRICS.parse().map_err(std::io::Error::other)?, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })??;
    let took = started.elapsed();
    if !body.starts_with("HTTP/1.") || !body.contains("xlb_table_entries") {
        bail!("unexpected scrape answer: {}", body.lines().next().unwrap_or(""));
    }
    Ok(took)
}

/// Runs the CLI `args` against `d`; the time from start to exit.
fn timed_cli(d: &Daemon, args: &[&str]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let out = Command::new(&d.bin).arg("--socket").arg(&d.socket).args(args).output().context("running xlb")?;
    let took = started.elapsed();
    if !out.status.success() {
        bail!("xlb {} failed: {}{}", args.join(" "), String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    }
    Ok(took)
}

fn measure(bin: &Path) -> anyhow::Result<Vec<Case>> {
    println!("  {}", bin.display());
    let topo = Topology::new(TopologyOptions { backends: 1, ..Default::default() })?;
    let capacity = (FLOWS + FLOWS / 10).to_string();
    let d = Daemon::start_bin(bin, &topo.lb, &topo.lb_ifaces, &["--conn-capacity", &capacity, "--metrics-addr", METRICS])?;
    let vip = SocketAddr::from(topo.vip(80));
    let backend = SocketAddr::from(topo.backend(0, 8080));
    // Removed backends keep their (zero) flows: no reset job walks the
    // table behind the measurements.
    d.ok(&["service", "add", &vip.to_string(), "--on-remove", "keep"])?;
    d.ok(&["backend", "add", &vip.to_string(), &backend.to_string()])?;
    let status = d.json(&["status"])?;
    let id = status["services"][0]["backends"][0]["id"].as_u64().context("backend id")? as u32;
    let filled = Instant::now();
    fill(&d.pin_dir, vip, 0, id, jiffies()?)?;
    println!("    {FLOWS} flows written in {:.1} s", filled.elapsed().as_secs_f64());
    // Until the daemon's reports show the whole table.
    wait_for("status to show the whole table", Duration::from_secs(60), || {
        let s = d.json(&["status"]).ok()?;
        (s["table"]["entries"].as_u64()? >= FLOWS as u64).then_some(())
    })?;
    let mut cases = Vec::new();
    let mut run = |name: &'static str, goal: f64, n: usize, f: &mut dyn FnMut() -> anyhow::Result<Duration>| -> anyhow::Result<()> {
        let samples = (0..n).map(|_| f().map(ms)).collect::<anyhow::Result<Vec<f64>>>()?;
        cases.push(Case { name, goal: Goal { ms: goal }, samples });
        Ok(())
    };
    run("xlb health", 10.0, 30, &mut || timed_cli(&d, &["health"]))?;
    run("xlb status --json", 100.0, 15, &mut || timed_cli(&d, &["status", "--json"]))?;
    run("metrics scrape", 100.0, 15, &mut || scrape(&topo.lb.name))?;
    // A backend add while a scrape is in flight (the scrape is sent, its
    // answer not yet read).
    let extra = |i: usize| SocketAddr::from(([10, 1, 9, (i % 200 + 2) as u8], 8080)).to_string();
    let mut i = 0;
    run("backend add during a scrape", 50.0, 15, &mut || {
        let started = Arc::new(AtomicBool::new(false));
        let scraper = {
            let (ns, started) = (topo.lb.name.clone(), started.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let s = in_netns(&ns, || TcpStream::connect_timeout(&METRICS.parse().expect("address"), Duration::from_secs(5)))??;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                (&s).write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
                started.store(true, Ordering::Relaxed);
                let mut out = Vec::new();
                (&s).read_to_end(&mut out)?;
                Ok(())
            })
        };
        wait_for("the scrape to be sent", Duration::from_secs(5), || started.load(Ordering::Relaxed).then_some(()))?;
        i += 1;
        let took = timed_cli(&d, &["backend", "add", &vip.to_string(), &extra(i)]);
        scraper.join().map_err(|_| anyhow::anyhow!("scrape thread panicked"))??;
        d.ok(&["backend", "remove", &vip.to_string(), &extra(i)])?;
        took
    })?;
    // One every 100 ms for 8 s: the walker passes (every second, or five
    // times a walk's length at this size) fall among them.
    let mut j = 0;
    run("backend add across walker/expiry passes", 50.0, 80, &mut || {
        let t0 = Instant::now();
        j += 1;
        let took = timed_cli(&d, &["backend", "add", &vip.to_string(), &extra(1000 + j)]);
        d.ok(&["backend", "remove", &vip.to_string(), &extra(1000 + j)])?;
        let next = t0 + Duration::from_millis(100);
        let _ = wait_for("the next 100 ms step", Duration::from_secs(1), || (Instant::now() >= next).then_some(()));
        took
    })?;
    drop(d);
    Ok(cases)
}
