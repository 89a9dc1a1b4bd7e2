//! `xlb-bench-katran` (run by `cargo xtask bench`): the per-packet BPF cost
//! of Katran's XDP program and xlb's, side by side, in one process and one
//! run, measured the same way (../shared/peers/katran/README.md, "Method").
//!
//! - Every call is one BPF_PROG_TEST_RUN with repeat=1 (both programs
//!   rewrite the buffer), a 54-byte Ethernet/IPv4/TCP frame arriving on
//!   the rig's t0; the kernel-reported duration of each call is kept.
//! - A run is `CALLS` calls (default 200,000) of one program; per run the
//!   median, the interquartile mean (IQM), the mean and the p99, and its
//!   stalls (calls of 5 µs or more: on the LRU refill phase or elsewhere,
//!   see [`Stalls`]).
//! - A case has `RUNS` rounds (default 5) of [floor, Katran, xlb], plus, in
//!   the SYN cases, Katran with its flood guard held off and xlb's stateful
//!   SYN path. A cell is the
//!   median of the run medians; net = cell − the floor's cell (the floor is
//!   `xlb_pass`, an XDP_PASS program, timed the same way).
//! - The thread doing all of it is pinned to one CPU (`CPU`, default 1).
//! - Before timing, one flow through each program is decoded byte by byte;
//!   the counters and table sizes of both are checked around every case.
//!
//! Cases: pass (SYN to a non-VIP → XDP_PASS), hot (the ACK of one
//! established flow), hot-partial (that ACK with only the pseudo-header
//! seed in its checksum, as a veth with TX offload delivers a local
//! stack's frame: xlb completes it), 1M (ACKs round-robin over `FLOWS`
//! established flows, default 1,000,000), syn (a fresh 5-tuple every call, table with room),
//! synfull (a fresh 5-tuple every call, table full). xlb's SYNs to its
//! default service (Maglev DNAT, backends of its own) are stateless: they
//! write nothing, so in both SYN cases the xlb column is the stateless SYN
//! path, and "full" does not reach it. A second xlb row per SYN case times
//! the stateful SYN path (a service sharing its backends with another:
//! collision check and one half-open entry per SYN), against Katran with
//! its guard held off (one LRU entry per SYN).
//!
//! `CASES` (comma-separated keys, e.g. `hot,1M`) times only those cases,
//! for A/B runs of one path; the SYN cases still fill the 1M table first.
//!
//! Katran is a peer, not part of the project: its object is
//! `KATRAN_OBJ` (default ../shared/peers/katran/balancer.bpf.o from the
//! repository root). Without it, xlb is timed alone and Katran's columns
//! stay empty. Results: a table on stdout and target/bench/katran.json.

// The harness's parts (a binary's root looks for modules beside it).
#[path = "bench_katran/katran.rs"]
mod katran;
#[path = "bench_katran/pkt.rs"]
mod pkt;
#[path = "bench_katran/rig.rs"]
mod rig;
#[path = "bench_katran/xlb_side.rs"]
mod xlb_side;

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::Context as _;
use aya::programs::Xdp;
use serde_json::{Value, json};
use testbed::in_netns;

use crate::{
    pkt::{Buf, FRAME_LEN, OUT_LEN, Seg, TCP_ACK, TCP_SYN, XDP_PASS, XDP_REDIRECT, XDP_TX},
    rig::{BACKEND_ISN, CLIENT_ISN, CLIENT_MAC, NON_VIP, ROUTER_MAC, T0_MAC, VIP_PORT, client},
    xlb_side::{Step, Xlb},
};

/// KatranLb's default LRU (8M) ÷ this machine's 2 cores, per CPU.
const KATRAN_LRU_SIZE: u32 = 4_000_000;
/// Katran's flood guard is read (and held off) every this many calls.
const GUARD_BATCH: u64 = 1000;
/// Durations histogram: 1 ns buckets up to 65 µs (longer calls count there).
const HIST: usize = 65_536;
/// A call at least this long is a stall (a table's free-list refill, an
/// interrupt, the hypervisor): counted by where it falls (see [`Stalls`]).
const STALL_NS: u32 = 5_000;
/// The kernel's LRU refills a CPU's free list this many nodes at a time
/// (`LOCAL_FREE_TARGET`): a program that inserts one entry per call stalls
/// on every 128th call, always on the same call index modulo 128.
const LRU_REFILL_BATCH: u64 = 128;

struct Config {
    calls: u64,
    runs: usize,
    flows: u64,
    cpu: usize,
    katran_obj: Option<PathBuf>,
    /// The cases to time (`CASES`, comma-separated keys; all by default).
    cases: Vec<&'static str>,
}

/// Every case's key, in the order they run.
const CASE_KEYS: [&str; 6] = ["pass", "hot", "hot-partial", "1M", "syn", "synfull"];

/// `CASES`: which cases to time, e.g. `hot,1M` (any case, order ignored).
/// The SYN cases run against the established table the 1M case fills, so
/// they fill it too when 1M itself is not timed.
fn selected_cases(v: Option<&str>) -> anyhow::Result<Vec<&'static str>> {
    let Some(v) = v else { return Ok(CASE_KEYS.to_vec()) };
    let mut chosen = Vec::new();
    for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let key = CASE_KEYS
            .iter()
            .find(|k| k.eq_ignore_ascii_case(name))
            .ok_or_else(|| anyhow::anyhow!("CASES={v}: no case {name:?} (cases: {})", CASE_KEYS.join(", ")))?;
        chosen.push(*key);
    }
    anyhow::ensure!(!chosen.is_empty(), "CASES={v:?} names no case (cases: {})", CASE_KEYS.join(", "));
    Ok(CASE_KEYS.iter().copied().filter(|k| chosen.contains(k)).collect())
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|e| anyhow::anyhow!("{name}={v}: {e}")),
        Err(_) => Ok(default),
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

fn config() -> anyhow::Result<Config> {
    // SAFETY: no preconditions.
    let online = usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).unwrap_or(1).max(1);
    let cfg = Config {
        calls: env_num("CALLS", 200_000)?,
        runs: env_num("RUNS", 5)?,
        flows: env_num("FLOWS", 1_000_000)?,
        cpu: env_num("CPU", 1usize.min(online - 1))?,
        cases: selected_cases(std::env::var("CASES").ok().as_deref())?,
        katran_obj: {
            let p = match std::env::var_os("KATRAN_OBJ") {
                Some(p) => PathBuf::from(p),
                None => repo_root().join("../shared/peers/katran/balancer.bpf.o"),
            };
            if p.as_os_str().is_empty() {
                println!("KATRAN_OBJ is empty: skipping the Katran comparison");
                None
            } else if p.is_file() {
                Some(p)
            } else {
                println!("Katran object not found at {}: skipping the Katran comparison", p.display());
                None
            }
        },
    };
    anyhow::ensure!(cfg.calls >= GUARD_BATCH && cfg.runs >= 1 && cfg.flows >= 2, "CALLS ≥ {GUARD_BATCH}, RUNS ≥ 1 and FLOWS ≥ 2, please");
    Ok(cfg)
}

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(testbed::have_privileges(), "the benchmark needs root (netns, BPF)");
    let cfg = config()?;
    let rig = rig::rig()?;
    eprintln!("xlb-bench-katran: CPU {}, {} calls per run, {} runs per case, {} flows, namespace {}", cfg.cpu, cfg.calls, cfg.runs, cfg.flows, rig.ns.name);
    let started = Instant::now();
    let result = in_netns(&rig.ns.name, || -> anyhow::Result<Bench> {
        rig::pin(cfg.cpu)?;
        let mut b = Bench::new(&cfg, &rig)?;
        b.all_cases()?;
        Ok(b)
    })??;
    let table = result.table();
    println!("{table}");
    let dir = repo_root().join("target/bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("katran.json");
    let mut doc = result.json();
    doc["wall_s"] = json!(started.elapsed().as_secs_f64());
    std::fs::write(&path, serde_json::to_string_pretty(&doc)?).with_context(|| format!("writing {}", path.display()))?;
    println!("written to target/bench/katran.json ({:.0} s)", started.elapsed().as_secs_f64());
    drop(rig);
    anyhow::ensure!(result.checks.failures.is_empty(), "{} verification failures (see above and katran.json)", result.checks.failures.len());
    Ok(())
}

/// Verification results: failures are collected (and printed), the run
/// goes on, and the benchmark fails at the end if there were any.
#[derive(Default)]
pub struct Checks {
    failures: Vec<String>,
    notes: Vec<String>,
    passed: u64,
}

impl Checks {
    pub fn expect(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if ok {
            self.passed += 1;
        } else {
            let w = what();
            eprintln!("  CHECK FAILED: {w}");
            self.failures.push(w);
        }
    }

    pub fn note(&mut self, what: String) {
        eprintln!("  note: {what}");
        if !self.notes.contains(&what) {
            self.notes.push(what);
        }
    }
}

// ---- timing ----

#[derive(Clone, Copy, Debug, Default)]
struct RunStats {
    median: f64,
    iqm: f64,
    mean: f64,
    p99: f64,
    min: u32,
    max: u32,
    calls: u64,
    bad_verdicts: u64,
    over_hist: u64,
    wall_s: f64,
    guard_tripped: u64,
    stalls: Stalls,
}

/// The calls of a run that took at least [`STALL_NS`], split by call index
/// modulo [`LRU_REFILL_BATCH`]: those on the phase with the most of them
/// (for a program inserting one LRU entry per call, its free-list refills)
/// and the rest (anything else: interrupts, the VM). A p99 sits where
/// these cross 1% of the calls, so they say what sets it.
#[derive(Clone, Copy, Debug, Default)]
struct Stalls {
    on_phase: u64,
    on_phase_median_ns: u32,
    other: u64,
    other_median_ns: u32,
}

impl Stalls {
    fn of(slow: &[(u64, u32)]) -> Stalls {
        let mut per_phase = [0u64; LRU_REFILL_BATCH as usize];
        for (i, _) in slow {
            per_phase[(*i % LRU_REFILL_BATCH) as usize] += 1;
        }
        let phase = (0..per_phase.len()).max_by_key(|p| per_phase[*p]).unwrap_or(0) as u64;
        let (mut on, mut other): (Vec<u32>, Vec<u32>) = (Vec::new(), Vec::new());
        for (i, ns) in slow {
            if i % LRU_REFILL_BATCH == phase { on.push(*ns) } else { other.push(*ns) }
        }
        let median = |v: &mut Vec<u32>| {
            v.sort_unstable();
            v.get(v.len() / 2).copied().unwrap_or(0)
        };
        Stalls { on_phase: on.len() as u64, on_phase_median_ns: median(&mut on), other: other.len() as u64, other_median_ns: median(&mut other) }
    }

    fn json(&self) -> Value {
        json!({
            "on_one_128_call_phase": self.on_phase, "on_phase_median_ns": self.on_phase_median_ns,
            "other": self.other, "other_median_ns": self.other_median_ns,
        })
    }
}

impl RunStats {
    fn json(&self) -> Value {
        json!({
            "median": self.median, "iqm": self.iqm, "mean": self.mean, "p99": self.p99, "min": self.min, "max": self.max,
            "calls": self.calls, "bad_verdicts": self.bad_verdicts, "over_65us": self.over_hist, "wall_s": self.wall_s,
            "guard_tripped": self.guard_tripped, "stalls_over_5us": self.stalls.json(),
        })
    }
}

/// What the timing loop does with Katran's flood guard every
/// [`GUARD_BATCH`] calls: it always reads it (the same syscall in every
/// run, whichever program), counts the calls that found it tripped when
/// every call is a new connection (`count`), and resets it (`hold_off`).
struct Guard<'a> {
    stats: &'a mut katran::Stats,
    count: bool,
    hold_off: bool,
}

/// `calls` test runs of `prog`, frame `i` written by `frame(i, ..)`.
fn time_run(prog: &Xdp, ifindex: u32, calls: u64, want: u32, frame: &mut dyn FnMut(u64, &mut Buf), mut guard: Option<Guard<'_>>) -> anyhow::Result<RunStats> {
    let mut hist = vec![0u32; HIST];
    let (mut buf, mut out) = ([0u8; FRAME_LEN], [0u8; OUT_LEN]);
    let mut r = RunStats { calls, ..Default::default() };
    let mut prev = match guard.as_mut() {
        // Held off from the first call: a run before may have left the
        // guard tripped for the rest of its window.
        Some(g) if g.hold_off => {
            g.stats.reset_conn_rate()?;
            g.stats.conn_rate()?
        }
        Some(g) => g.stats.conn_rate()?,
        None => (0, 0),
    };
    let mut sum = 0u64;
    // (index, ns) of every stall: a few thousand at most.
    let mut slow: Vec<(u64, u32)> = Vec::new();
    let start = Instant::now();
    for i in 0..calls {
        frame(i, &mut buf);
        let ran = pkt::run(prog, ifindex, &buf, &mut out)?;
        if ran.verdict != want {
            r.bad_verdicts += 1;
        }
        sum += u64::from(ran.ns);
        if ran.ns >= STALL_NS {
            slow.push((i, ran.ns));
        }
        if ran.ns as usize >= HIST {
            r.over_hist += 1;
        }
        hist[(ran.ns as usize).min(HIST - 1)] += 1;
        let done = i + 1;
        if let Some(g) = guard.as_mut().filter(|_| done % GUARD_BATCH == 0 || done == calls) {
            let now = g.stats.conn_rate()?;
            if g.count {
                let batch = if done % GUARD_BATCH == 0 { GUARD_BATCH } else { done % GUARD_BATCH };
                r.guard_tripped += katran::tripped_in_batch(prev, now, batch);
            }
            prev = now;
            if g.hold_off {
                g.stats.reset_conn_rate()?;
                prev.0 = 0;
            }
        }
    }
    r.wall_s = start.elapsed().as_secs_f64();
    r.stalls = Stalls::of(&slow);
    r.mean = sum as f64 / calls as f64;
    let rank = |q: f64| -> f64 {
        let target = (calls as f64 * q) as u64;
        let mut acc = 0u64;
        for (v, n) in hist.iter().enumerate() {
            acc += u64::from(*n);
            if acc > target {
                return v as f64;
            }
        }
        (HIST - 1) as f64
    };
    r.median = rank(0.5);
    r.p99 = rank(0.99);
    r.min = hist.iter().position(|n| *n > 0).unwrap_or(0) as u32;
    r.max = hist.iter().rposition(|n| *n > 0).unwrap_or(0) as u32;
    // The mean of the middle half. This VM's clock ticks in ~10 ns steps, so
    // medians sit on that grid; the IQM averages the dithered samples and
    // resolves below it.
    let (lo, hi) = (calls as f64 / 4.0, calls as f64 * 3.0 / 4.0);
    let (mut acc, mut s) = (0f64, 0f64);
    for (v, n) in hist.iter().enumerate().filter(|(_, n)| **n > 0) {
        let (b0, b1) = (acc, acc + f64::from(*n));
        let overlap = b1.min(hi) - b0.max(lo);
        if overlap > 0.0 {
            s += overlap * v as f64;
        }
        acc = b1;
    }
    r.iqm = s / (hi - lo);
    Ok(r)
}

/// Median (and min, max) of one statistic over runs.
fn across(runs: &[RunStats], f: impl Fn(&RunStats) -> f64) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = runs.iter().map(f).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let med = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Some((med, v[0], v[n - 1]))
}

#[derive(Default)]
struct Case {
    key: &'static str,
    title: &'static str,
    floor: Vec<RunStats>,
    katran: Vec<RunStats>,
    katran_held_off: Vec<RunStats>,
    xlb: Vec<RunStats>,
    /// SYN cases: xlb's stateful SYN path (`xlb_side::VIP_SHARED`).
    xlb_stateful: Vec<RunStats>,
}

// ---- the run ----

struct Katran {
    k: katran::Katran,
    stats: katran::Stats,
}

struct Bench<'c> {
    cfg: &'c Config,
    t0: u32,
    xlb: Xlb,
    katran: Option<Katran>,
    checks: Checks,
    cases: Vec<Case>,
    programs: Value,
    /// Kernel memory of each one's flow table, per flow.
    memory: Value,
    counters: Vec<Value>,
    /// Backend of each established xlb flow (index into BACKENDS).
    xlb_backend_of: Vec<u8>,
    kernel: String,
}

/// Client `i`'s segment to `vip`: its SYN (a new flow) or, once
/// established, the ACK of the backend's SYN-ACK (the same for every call).
fn to_vip(vip: std::net::Ipv4Addr, i: u64, flags: u8) -> Seg {
    let (seq, ack) = if flags & TCP_SYN != 0 { (CLIENT_ISN, 0) } else { (CLIENT_ISN + 1, BACKEND_ISN + 1) };
    Seg { dst_mac: T0_MAC, src_mac: CLIENT_MAC, src: client(i), dst: (vip, VIP_PORT), flags, seq, ack }
}

impl<'c> Bench<'c> {
    fn new(cfg: &'c Config, rig: &rig::Rig) -> anyhow::Result<Bench<'c>> {
        let t = Instant::now();
        let xlb = xlb_side::load(rig.t0, rig.t1)?;
        eprintln!("xlb loaded ({:.1} s)", t.elapsed().as_secs_f64());
        let katran = match &cfg.katran_obj {
            Some(p) => {
                let t = Instant::now();
                let (k, stats) = katran::load(p, KATRAN_LRU_SIZE, ROUTER_MAC, cfg.cpu)?;
                eprintln!("Katran loaded from {} and filled as KatranLb does ({:.1} s)", p.display(), t.elapsed().as_secs_f64());
                Some(Katran { k, stats })
            }
            None => None,
        };
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
        Ok(Bench {
            cfg,
            t0: rig.t0,
            xlb,
            katran,
            checks: Checks::default(),
            cases: Vec::new(),
            programs: json!({}),
            memory: json!({}),
            counters: Vec::new(),
            xlb_backend_of: Vec::new(),
            kernel,
        })
    }

    fn snapshot(&mut self, when: &str) -> anyhow::Result<()> {
        let x = self.xlb.counters()?.json();
        let t = self.xlb.table()?;
        let k = match &self.katran {
            Some(k) => Some(json!({ "counters": k.stats.snapshot()?, "lru_entries_this_cpu": k.k.lru_entries(self.cfg.cpu)? })),
            None => None,
        };
        self.counters.push(json!({ "when": when, "xlb": x, "xlb_table": { "established": t.established, "half_open": t.half_open }, "katran": k }));
        Ok(())
    }

    fn all_cases(&mut self) -> anyhow::Result<()> {
        self.program_sizes()?;
        self.verify()?;
        let cfg = self.cfg;
        let wants = |key: &str| cfg.cases.contains(&key);
        if wants("pass") {
            self.case_pass()?;
        }
        if wants("hot") {
            self.case_hot()?;
        }
        if wants("hot-partial") {
            self.case_hot_partial()?;
        }
        if wants("1M") {
            self.case_1m()?;
        } else if wants("syn") || wants("synfull") {
            self.establish()?;
        }
        if wants("syn") {
            self.case_syn()?;
        }
        if wants("synfull") {
            self.case_synfull()?;
        }
        Ok(())
    }

    fn program_sizes(&mut self) -> anyhow::Result<()> {
        let info = |p: &Xdp| -> anyhow::Result<Value> {
            let i = p.info().context("bpf_prog_info")?;
            let xlated = i.size_translated().unwrap_or(0);
            Ok(
                json!({ "id": i.id(), "xlated_bytes": xlated, "xlated_insns": xlated / 8, "jited_bytes": i.size_jitted(), "verified_insns": i.verified_instruction_count() }),
            )
        };
        let mut v = json!({ "xlb": info(self.xlb.program()?)?, "xlb_full": info(self.xlb.full_program()?)?, "floor": info(self.xlb.floor()?)? });
        if let Some(k) = &self.katran {
            v["katran"] = info(k.k.program()?)?;
        }
        self.programs = v;
        let per_flow = |memlock: u64, capacity: u32, kv: u32| json!({ "memlock": memlock, "capacity": capacity, "bytes_per_flow": memlock / u64::from(capacity.max(1)), "key_value_bytes": kv });
        let mut m = json!({ "xlb": self.xlb.memory().map(|x| per_flow(x.memlock, x.capacity, x.key_value)) });
        if let Some(k) = &self.katran {
            m["katran"] = json!(k.k.lru_memlock(self.cfg.cpu).map(|b| per_flow(b, KATRAN_LRU_SIZE, katran::FLOW_KEY + katran::REAL_POS_LRU)));
        }
        self.memory = m;
        Ok(())
    }

    // ---- one run of each program ----

    fn floor_run(&mut self, frame: &mut dyn FnMut(u64, &mut Buf)) -> anyhow::Result<RunStats> {
        let guard = self.katran.as_mut().map(|k| Guard { stats: &mut k.stats, count: false, hold_off: false });
        time_run(self.xlb.floor()?, self.t0, self.cfg.calls, XDP_PASS, frame, guard)
    }

    fn xlb_run(&mut self, want: u32, frame: &mut dyn FnMut(u64, &mut Buf)) -> anyhow::Result<RunStats> {
        let guard = self.katran.as_mut().map(|k| Guard { stats: &mut k.stats, count: false, hold_off: false });
        time_run(self.xlb.program()?, self.t0, self.cfg.calls, want, frame, guard)
    }

    /// `new_conns`: every call is a new connection to Katran (its guard
    /// counts them); `hold_off`: the guard is reset every batch.
    fn katran_run(&mut self, want: u32, new_conns: bool, hold_off: bool, frame: &mut dyn FnMut(u64, &mut Buf)) -> anyhow::Result<Option<RunStats>> {
        let Some(k) = self.katran.as_mut() else { return Ok(None) };
        let guard = Guard { stats: &mut k.stats, count: new_conns, hold_off };
        time_run(k.k.program()?, self.t0, self.cfg.calls, want, frame, Some(guard)).map(Some)
    }

    fn log_run(&mut self, case: &str, who: &str, round: usize, r: &RunStats) {
        let tripped = if r.guard_tripped > 0 { format!("  guard tripped on {}", r.guard_tripped) } else { String::new() };
        eprintln!(
            "  {case:<8} {who:<14} run {}: median {:>5.0}  iqm {:>6.1}  mean {:>6.1}  p99 {:>6.0}  >=5us {}+{}  bad {}  {:.2}s{tripped}",
            round + 1,
            r.median,
            r.iqm,
            r.mean,
            r.p99,
            r.stalls.on_phase,
            r.stalls.other,
            r.bad_verdicts,
            r.wall_s
        );
        self.checks.expect(r.bad_verdicts == 0, || format!("{case}: {who} run {}: {} calls got the wrong verdict", round + 1, r.bad_verdicts));
    }

    // ---- verification: one flow through each program, decoded ----

    fn verify(&mut self) -> anyhow::Result<()> {
        eprintln!("verification:");
        let mut out = [0u8; OUT_LEN];
        let t0 = self.t0;
        // A SYN for neither balancer: XDP_PASS, untouched, by all three.
        let frame = Seg { dst_mac: T0_MAC, src_mac: CLIENT_MAC, src: client(0), dst: NON_VIP, flags: TCP_SYN, seq: CLIENT_ISN, ack: 0 }.frame();
        let mut progs: Vec<(&str, pkt::Ran, Buf)> = Vec::new();
        let r = pkt::run(self.xlb.floor()?, t0, &frame, &mut out)?;
        progs.push(("floor", r, head(&out)));
        let r = pkt::run(self.xlb.program()?, t0, &frame, &mut out)?;
        progs.push(("xlb", r, head(&out)));
        if let Some(k) = &self.katran {
            let r = pkt::run(k.k.program()?, t0, &frame, &mut out)?;
            progs.push(("Katran", r, head(&out)));
        }
        for (who, r, o) in progs {
            self.checks.expect(r.verdict == XDP_PASS && r.len == FRAME_LEN && o == frame, || {
                format!("{who}, SYN to a non-VIP: {} with {} bytes out (want XDP_PASS, untouched)", pkt::verdict_name(r.verdict), r.len)
            });
        }
        eprintln!("  SYN to a non-VIP: XDP_PASS and untouched by the floor, xlb{}", if self.katran.is_some() { " and Katran" } else { "" });
        self.snapshot("start")?;

        // Katran: SYN and ACK of flow 0, both decoded; its LRU gains one entry.
        if let Some(k) = self.katran.as_mut() {
            let before = k.stats.snapshot()?;
            let lru0 = k.k.lru_entries(self.cfg.cpu)?;
            for flags in [TCP_SYN, TCP_ACK] {
                let input = to_vip(katran::VIP, 0, flags).frame();
                let r = pkt::run(k.k.program()?, t0, &input, &mut out)?;
                match k.k.check_output(&input, &out, r.verdict, r.len, ROUTER_MAC) {
                    Ok(real) => eprintln!(
                        "  Katran, flow 0 {}: XDP_TX, IPIP to {real} (the ring's pick), inner packet intact",
                        if flags == TCP_SYN { "SYN" } else { "ACK" }
                    ),
                    Err(e) => self.checks.expect(false, || format!("Katran, flow 0: {e}")),
                }
            }
            let after = k.stats.snapshot()?;
            let lru1 = k.k.lru_entries(self.cfg.cpu)?;
            let d = |f: &str| after[f].as_u64().unwrap_or(0).wrapping_sub(before[f].as_u64().unwrap_or(0));
            self.checks.expect(lru1 == lru0 + 1, || format!("Katran's LRU on CPU {} went {lru0} -> {lru1} entries, want +1", self.cfg.cpu));
            self.checks
                .expect(d("xdp_tx") == 2 && d("xdp_total") == 2, || format!("Katran's xdp_tx/total moved by {}/{}, want 2/2", d("xdp_tx"), d("xdp_total")));
            self.checks.expect(d("lru_miss_syn") == 1 && d("lru_miss_other") == 0, || {
                format!("Katran's LRU misses (SYN, other) moved by {}, {}; want 1, 0", d("lru_miss_syn"), d("lru_miss_other"))
            });
            self.checks.expect(d("vip0_packets") == 2, || format!("Katran's vip0 packets moved by {}", d("vip0_packets")));
        }

        // xlb: flow 0's whole handshake, every output decoded.
        let before = self.xlb.counters()?;
        match self.xlb.handshake(0)? {
            Ok(b) => eprintln!(
                "  xlb, flow 0: SYN (stateless), backend SYN-ACK (creates the half-open flow) and ACK (promotes it) all XDP_REDIRECT, NAT to/from {b}:8080, TTL 63, checksums valid"
            ),
            Err(e) => self.checks.expect(false, || format!("xlb: {e}")),
        }
        let after = self.xlb.counters()?;
        let table = self.xlb.table()?;
        self.xlb.expect_flow0(&mut self.checks, &before, &after, table);
        // Both SYN paths once, on a client no case uses.
        let spare = self.fresh_base() - 1;
        self.xlb.verify_syn_paths(&mut self.checks, spare)?;
        // The ACK of the hot case: decoded too.
        let input = Xlb::segment(0, Step::ClientAck, xlb_side::BACKENDS[0]).frame();
        let r = pkt::run(self.xlb.program()?, t0, &input, &mut out)?;
        if let Err(e) = xlb_side::check_to_backend(&input, &out, r) {
            self.checks.expect(false, || format!("xlb, flow 0's ACK again: {e}"));
        }
        self.snapshot("after flow 0")?;
        Ok(())
    }

    // ---- cases ----

    fn begin(&self, key: &'static str, title: &'static str) -> Case {
        eprintln!("case {key}: {title}");
        Case { key, title, ..Default::default() }
    }

    fn case_pass(&mut self) -> anyhow::Result<()> {
        let mut c = self.begin("pass", "SYN to a non-VIP address -> XDP_PASS");
        let mut gen_ = |i: u64, b: &mut Buf| {
            Seg { dst_mac: T0_MAC, src_mac: CLIENT_MAC, src: client(i % 1000), dst: NON_VIP, flags: TCP_SYN, seq: CLIENT_ISN, ack: 0 }.write(b)
        };
        for r in 0..self.cfg.runs {
            let f = self.floor_run(&mut gen_)?;
            self.log_run(c.key, "floor", r, &f);
            c.floor.push(f);
            if let Some(k) = self.katran_run(XDP_PASS, false, false, &mut gen_)? {
                self.log_run(c.key, "katran", r, &k);
                c.katran.push(k);
            }
            let x = self.xlb_run(XDP_PASS, &mut gen_)?;
            self.log_run(c.key, "xlb", r, &x);
            c.xlb.push(x);
        }
        self.cases.push(c);
        Ok(())
    }

    fn case_hot(&mut self) -> anyhow::Result<()> {
        let mut c = self.begin("hot", "ACK of one established flow, the same every call");
        let kf = to_vip(katran::VIP, 0, TCP_ACK).frame();
        let xf = to_vip(xlb_side::VIP, 0, TCP_ACK).frame();
        let before = self.xlb.counters()?;
        self.same_frame_rounds(&mut c, kf, xf)?;
        let after = self.xlb.counters()?;
        self.xlb.expect_acks(&mut self.checks, &before, &after, self.cfg.runs as u64 * self.cfg.calls);
        self.cases.push(c);
        Ok(())
    }

    /// `RUNS` rounds of floor, Katran (frame `kf`, XDP_TX) and xlb (frame
    /// `xf`, XDP_REDIRECT), the same frame every call.
    fn same_frame_rounds(&mut self, c: &mut Case, kf: Buf, xf: Buf) -> anyhow::Result<()> {
        for r in 0..self.cfg.runs {
            let f = self.floor_run(&mut |_, b| *b = kf)?;
            self.log_run(c.key, "floor", r, &f);
            c.floor.push(f);
            if let Some(k) = self.katran_run(XDP_TX, false, false, &mut |_, b| *b = kf)? {
                self.log_run(c.key, "katran", r, &k);
                c.katran.push(k);
            }
            let x = self.xlb_run(XDP_REDIRECT, &mut |_, b| *b = xf)?;
            self.log_run(c.key, "xlb", r, &x);
            c.xlb.push(x);
        }
        Ok(())
    }

    /// The hot ACK with only the pseudo-header seed in its TCP checksum,
    /// as a local stack sends it through a veth with TX offload (the rig's
    /// t0 is a veth): xlb completes it, since it leaves by redirect and
    /// nothing after XDP would. Katran encapsulates it as it is (its IPIP
    /// carries the seed on), so its column is its hot path again.
    fn case_hot_partial(&mut self) -> anyhow::Result<()> {
        let mut c = self.begin("hot-partial", "the same ACK with a partial checksum (a local stack's frame through a veth with TX offload)");
        let kf = pkt::partial(to_vip(katran::VIP, 0, TCP_ACK).frame());
        let full = to_vip(xlb_side::VIP, 0, TCP_ACK).frame();
        let xf = pkt::partial(full);
        // Decoded once: it leaves with the full checksum.
        let mut out = [0u8; OUT_LEN];
        let r = pkt::run(self.xlb.program()?, self.t0, &xf, &mut out)?;
        if let Err(e) = xlb_side::check_to_backend(&full, &out, r) {
            self.checks.expect(false, || format!("xlb, flow 0's ACK with a partial checksum: {e}"));
        }
        let before = self.xlb.counters()?;
        self.same_frame_rounds(&mut c, kf, xf)?;
        let after = self.xlb.counters()?;
        self.xlb.expect_partial_acks(&mut self.checks, &before, &after, self.cfg.runs as u64 * self.cfg.calls);
        self.cases.push(c);
        Ok(())
    }

    /// Establishes flows 1..FLOWS in both (flow 0 is), then checks them.
    fn establish(&mut self) -> anyhow::Result<()> {
        let flows = self.cfg.flows;
        eprintln!("establishing {flows} flows in each program (through test-run)");
        let t0 = self.t0;
        let mut out = [0u8; OUT_LEN];
        if let Some(k) = self.katran.as_mut() {
            // Katran needs the client's SYN and ACK (the backend answers
            // the client directly); its guard is held off meanwhile, so
            // every SYN writes its LRU.
            let t = Instant::now();
            let mut bad = 0u64;
            for f in 1..flows {
                for flags in [TCP_SYN, TCP_ACK] {
                    let r = pkt::run(k.k.program()?, t0, &to_vip(katran::VIP, f, flags).frame(), &mut out)?;
                    bad += u64::from(r.verdict != XDP_TX);
                }
                if f % GUARD_BATCH == 0 {
                    k.stats.reset_conn_rate()?;
                }
            }
            k.stats.reset_conn_rate()?;
            let lru = k.k.lru_entries(self.cfg.cpu)?;
            eprintln!("  Katran: {:.1} s, {bad} wrong verdicts; LRU of CPU {}: {lru} entries", t.elapsed().as_secs_f64(), self.cfg.cpu);
            self.checks.expect(bad == 0, || format!("Katran: {bad} wrong verdicts establishing the flows"));
            self.checks.expect(lru == flows, || format!("Katran's LRU holds {lru} entries, want {flows}"));
        }
        // xlb: flow 0 had its handshake; the others are written as the
        // entries a handshake leaves (one per flow), in batches.
        let t = Instant::now();
        self.xlb_backend_of = self.xlb.fill_established(flows)?;
        let table = self.xlb.table()?;
        eprintln!("  xlb: {:.1} s ({} flows written in batches); table {table:?}", t.elapsed().as_secs_f64(), flows - 1);
        self.xlb.expect_established(&mut self.checks, flows, table);

        // Spot checks across the set, fully decoded.
        let step = (flows / 997).max(1);
        let (mut kper, mut xper) = ([0u64; 3], [0u64; 3]);
        for f in (0..flows).step_by(step as usize) {
            if let Some(k) = &self.katran {
                let input = to_vip(katran::VIP, f, TCP_ACK).frame();
                let r = pkt::run(k.k.program()?, t0, &input, &mut out)?;
                match k.k.check_output(&input, &out, r.verdict, r.len, ROUTER_MAC) {
                    Ok(real) => kper[katran::REALS.iter().position(|x| *x == real).unwrap_or(0)] += 1,
                    Err(e) => self.checks.expect(false, || format!("Katran, flow {f}'s ACK: {e}")),
                }
            }
            let input = to_vip(xlb_side::VIP, f, TCP_ACK).frame();
            let r = pkt::run(self.xlb.program()?, t0, &input, &mut out)?;
            match xlb_side::check_to_backend(&input, &out, r) {
                Ok(b) => {
                    let i = xlb_side::BACKENDS.iter().position(|x| *x == b).unwrap_or(0);
                    xper[i] += 1;
                    let want = self.xlb_backend_of[f as usize];
                    self.checks.expect(i as u8 == want, || format!("xlb, flow {f}: its ACK went to backend #{i}, its entry says #{want}"));
                }
                Err(e) => self.checks.expect(false, || format!("xlb, flow {f}'s ACK: {e}")),
            }
        }
        eprintln!("  spot checks (every {step}th flow): Katran reals {kper:?}, xlb backends {xper:?}");
        self.snapshot("after establishing the flows")
    }

    fn case_1m(&mut self) -> anyhow::Result<()> {
        self.establish()?;
        let flows = self.cfg.flows;
        let mut c = self.begin("1M", "ACKs round-robin over the established flows");
        let kmiss0 = match &self.katran {
            Some(k) => Some(k.stats.sum(katran::LRU_MISS_CNTR)?),
            None => None,
        };
        let before = self.xlb.counters()?;
        // Cursors continue across runs: the runs touch different flows.
        let (mut kcur, mut xcur) = (0u64, 0u64);
        for r in 0..self.cfg.runs {
            let base = r as u64 * self.cfg.calls;
            let f = self.floor_run(&mut |i, b| to_vip(katran::VIP, (base + i) % flows, TCP_ACK).write(b))?;
            self.log_run(c.key, "floor", r, &f);
            c.floor.push(f);
            let k = self.katran_run(XDP_TX, false, false, &mut |_, b| {
                to_vip(katran::VIP, kcur % flows, TCP_ACK).write(b);
                kcur += 1;
            })?;
            if let Some(k) = k {
                self.log_run(c.key, "katran", r, &k);
                c.katran.push(k);
            }
            let x = self.xlb_run(XDP_REDIRECT, &mut |_, b| {
                to_vip(xlb_side::VIP, xcur % flows, TCP_ACK).write(b);
                xcur += 1;
            })?;
            self.log_run(c.key, "xlb", r, &x);
            c.xlb.push(x);
        }
        if let (Some(k), Some(m0)) = (&self.katran, kmiss0) {
            let m1 = k.stats.sum(katran::LRU_MISS_CNTR)?;
            self.checks.expect(m1 == m0, || format!("Katran had LRU misses during the 1M case: SYN {}, other {}", m1[0] - m0[0], m1[1] - m0[1]));
        }
        let after = self.xlb.counters()?;
        self.xlb.expect_acks(&mut self.checks, &before, &after, self.cfg.runs as u64 * self.cfg.calls);
        self.cases.push(c);
        self.snapshot("after the 1M case")
    }

    /// One round of a SYN case: floor, Katran (default guard), xlb
    /// (stateless SYNs), Katran (guard held off), xlb (stateful SYNs), each
    /// on fresh 5-tuples from its own base; each xlb run checked for what
    /// it wrote (`full`: the half-open table is full and stays so).
    fn syn_round(&mut self, c: &mut Case, r: usize, bases: [u64; 2], full: bool) -> anyhow::Result<()> {
        let [kx, k2] = bases;
        let calls = self.cfg.calls;
        let f = self.floor_run(&mut |i, b| to_vip(katran::VIP, kx + i, TCP_SYN).write(b))?;
        self.log_run(c.key, "floor", r, &f);
        c.floor.push(f);
        if let Some(k) = self.katran_run(XDP_TX, true, false, &mut |i, b| to_vip(katran::VIP, kx + i, TCP_SYN).write(b))? {
            self.log_run(c.key, "katran", r, &k);
            c.katran.push(k);
        }
        let (before, h0) = (self.xlb.counters()?, self.xlb.half_open_flows()?);
        let x = self.xlb_run(XDP_REDIRECT, &mut |i, b| to_vip(xlb_side::VIP, kx + i, TCP_SYN).write(b))?;
        self.log_run(c.key, "xlb", r, &x);
        c.xlb.push(x);
        let (after, h1) = (self.xlb.counters()?, self.xlb.half_open_flows()?);
        let what = format!("{} run {}, xlb stateless", c.key, r + 1);
        self.xlb.expect_stateless_syns(&mut self.checks, &what, (&before, &after), calls, (h0, h1));
        if let Some(k) = self.katran_run(XDP_TX, true, true, &mut |i, b| to_vip(katran::VIP, k2 + i, TCP_SYN).write(b))? {
            self.log_run(c.key, "katran-held-off", r, &k);
            self.checks.expect(k.guard_tripped == 0, || format!("{}: Katran's guard tripped on {} calls while held off", c.key, k.guard_tripped));
            c.katran_held_off.push(k);
        }
        let before = self.xlb.counters()?;
        let x = self.xlb_run(XDP_REDIRECT, &mut |i, b| to_vip(xlb_side::VIP_SHARED, kx + i, TCP_SYN).write(b))?;
        self.log_run(c.key, "xlb-stateful", r, &x);
        c.xlb_stateful.push(x);
        let (after, h2) = (self.xlb.counters()?, self.xlb.half_open_flows()?);
        let what = format!("{} run {}, xlb stateful", c.key, r + 1);
        self.xlb.expect_stateful_syns(&mut self.checks, &what, (&before, &after), calls, (h1, h2), full);
        Ok(())
    }

    /// First client index of fresh 5-tuples (never established).
    fn fresh_base(&self) -> u64 {
        self.cfg.flows + 1_000_000
    }

    fn case_syn(&mut self) -> anyhow::Result<()> {
        let mut c = self.begin("syn", "SYN with a new 5-tuple every call, table with room");
        let (calls, runs) = (self.cfg.calls, self.cfg.runs as u64);
        let base = self.fresh_base();
        let lru0 = match &self.katran {
            Some(k) => Some(k.k.lru_entries(self.cfg.cpu)?),
            None => None,
        };
        for r in 0..self.cfg.runs {
            // Room: each round starts with no half-open flow in xlb, so its
            // stateful run has room (Katran's LRU has room for all of its
            // SYNs: 1M + 2 × RUNS × CALLS of 4M). Each xlb run is checked
            // for what it wrote: nothing (stateless), a half-open flow per
            // SYN (stateful).
            self.xlb.make_room_for_syns()?;
            self.syn_round(&mut c, r, [base + r as u64 * calls, base + (runs + r as u64) * calls], false)?;
        }
        if let (Some(k), Some(lru0)) = (&self.katran, lru0) {
            // Every SYN writes the LRU but those that found the guard tripped.
            let lru1 = k.k.lru_entries(self.cfg.cpu)?;
            let tripped: u64 = c.katran.iter().chain(&c.katran_held_off).map(|r| r.guard_tripped).sum();
            let written = (c.katran.len() + c.katran_held_off.len()) as u64 * calls - tripped;
            eprintln!("  Katran's LRU grew by {} entries; the guard tripped on {tripped} calls -> {written} writes expected", lru1 - lru0);
            self.checks.expect(lru1 - lru0 == written, || format!("Katran's LRU grew by {}, {written} writes expected", lru1 - lru0));
        }
        self.cases.push(c);
        self.snapshot("after the syn case")
    }

    fn case_synfull(&mut self) -> anyhow::Result<()> {
        let (calls, runs) = (self.cfg.calls, self.cfg.runs as u64);
        let mut next = self.fresh_base() + 2 * runs * calls;
        let t0 = self.t0;
        let mut out = [0u8; OUT_LEN];
        if let Some(k) = self.katran.as_mut() {
            // Full: SYNs (guard held off) until every write evicts.
            let lru = k.k.lru_entries(self.cfg.cpu)?;
            let fill = u64::from(KATRAN_LRU_SIZE).saturating_sub(lru) + u64::from(KATRAN_LRU_SIZE) / 20 + calls;
            let t = Instant::now();
            let mut bad = 0u64;
            for i in 0..fill {
                let r = pkt::run(k.k.program()?, t0, &to_vip(katran::VIP, next + i, TCP_SYN).frame(), &mut out)?;
                bad += u64::from(r.verdict != XDP_TX);
                if (i + 1) % GUARD_BATCH == 0 {
                    k.stats.reset_conn_rate()?;
                }
            }
            next += fill;
            let lru = k.k.lru_entries(self.cfg.cpu)?;
            eprintln!("filling Katran's LRU: {fill} SYNs in {:.1} s, {bad} wrong verdicts; now {lru} of {KATRAN_LRU_SIZE} entries", t.elapsed().as_secs_f64());
            self.checks.expect(bad == 0, || format!("Katran: {bad} wrong verdicts filling its LRU"));
            self.checks.expect(lru >= u64::from(KATRAN_LRU_SIZE - KATRAN_LRU_SIZE / 50), || format!("Katran's LRU is not full: {lru} entries"));
        }
        // xlb: the table a stateful SYN writes (the half-open table),
        // filled from empty with stateful SYNs. Its stateless SYNs write
        // nothing: "full" does not reach them.
        self.xlb.make_room_for_syns()?;
        let fill = self.xlb.syns_to_fill();
        let t = Instant::now();
        let mut bad = 0u64;
        for i in 0..fill {
            let r = pkt::run(self.xlb.program()?, t0, &to_vip(xlb_side::VIP_SHARED, next + i, TCP_SYN).frame(), &mut out)?;
            bad += u64::from(r.verdict != XDP_REDIRECT);
        }
        next += fill;
        let table_before = self.xlb.table()?;
        eprintln!("filling xlb's half-open table: {fill} stateful SYNs in {:.1} s, {bad} wrong verdicts; now {table_before:?}", t.elapsed().as_secs_f64());
        self.checks.expect(bad == 0, || format!("xlb: {bad} wrong verdicts filling its table"));
        self.xlb.expect_full(&mut self.checks, table_before.half_open);
        self.snapshot("after filling")?;

        let mut c = self.begin("synfull", "SYN with a new 5-tuple every call into a full table");
        let before = self.xlb.counters()?;
        for r in 0..self.cfg.runs {
            self.syn_round(&mut c, r, [next + r as u64 * calls, next + (runs + r as u64) * calls], true)?;
        }
        let after = self.xlb.counters()?;
        let table_after = self.xlb.table()?;
        self.xlb.expect_flood(&mut self.checks, &before, &after, table_before, table_after);
        self.cases.push(c);
        self.snapshot("end")
    }

    // ---- report ----

    /// What sets each program's p99 in the SYN cases: its calls of 5 µs or
    /// more per run (median over runs), on one 128-call phase (an LRU
    /// free-list refill when the program inserts an entry per call) and
    /// elsewhere, with their median durations.
    fn stall_table(&self) -> String {
        let mut s = format!(
            "\ncalls of {} us or more per run of {} (median over runs): on one {LRU_REFILL_BATCH}-call phase (an LRU refilling a CPU's free list, when every call inserts) / elsewhere; median ns of each. A p99 sits where these pass 1% of the calls ({}).\n\n",
            STALL_NS / 1000,
            self.cfg.calls,
            self.cfg.calls / 100
        );
        s.push_str("| case | program | on the phase | its median ns | elsewhere | its median ns | p99 |\n|---|---|---|---|---|---|---|\n");
        let med = |runs: &[RunStats], f: &dyn Fn(&RunStats) -> f64| across(runs, f).map_or(0.0, |v| v.0);
        for c in self.cases.iter().filter(|c| c.key.starts_with("syn")) {
            for (who, runs) in [
                ("floor", &c.floor),
                ("Katran", &c.katran),
                ("Katran held off", &c.katran_held_off),
                ("xlb stateless", &c.xlb),
                ("xlb stateful", &c.xlb_stateful),
            ] {
                if runs.is_empty() {
                    continue;
                }
                s.push_str(&format!(
                    "| {} | {who} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
                    c.key,
                    med(runs, &|r| r.stalls.on_phase as f64),
                    med(runs, &|r| f64::from(r.stalls.on_phase_median_ns)),
                    med(runs, &|r| r.stalls.other as f64),
                    med(runs, &|r| f64::from(r.stalls.other_median_ns)),
                    med(runs, &|r| r.p99),
                ));
            }
        }
        s
    }

    fn table(&self) -> String {
        let mut s = String::new();
        let has_k = self.katran.is_some();
        s.push_str(&format!(
            "\nper packet, Katran and xlb in the same run (BPF_PROG_TEST_RUN, repeat=1; ns, median of {} run medians of {} calls, min-max over runs; net = raw - floor)\n\n",
            self.cfg.runs, self.cfg.calls
        ));
        s.push_str("| case | floor | Katran raw | Katran net | xlb raw | xlb net | xlb / Katran (IQM) | p99 Katran | p99 xlb |\n");
        s.push_str("|---|---|---|---|---|---|---|---|---|\n");
        let dash = || "—".to_owned();
        for c in &self.cases {
            let floor = across(&c.floor, |r| r.median);
            let floor_iqm = across(&c.floor, |r| r.iqm).map_or(0.0, |v| v.0);
            let fmt = |v: Option<(f64, f64, f64)>| v.map_or_else(dash, |(m, lo, hi)| format!("{m:.0} ({lo:.0}–{hi:.0})"));
            let f0 = floor.map_or(0.0, |v| v.0);
            // One row: Katran's runs `k_runs` against xlb's `x_runs` (`None`:
            // xlb's default runs, shown as "(as above)").
            let mut row = |label: String, k_runs: &[RunStats], x_runs: Option<&[RunStats]>| {
                let xr = x_runs.unwrap_or(&c.xlb);
                let x = across(xr, |r| r.median);
                let xnet = x.map(|v| v.0 - f0);
                let xnet_iqm = across(xr, |r| r.iqm).map(|v| v.0 - floor_iqm);
                let xp99 = across(xr, |r| r.p99).map_or_else(dash, |v| format!("{:.0}", v.0));
                let k = across(k_runs, |r| r.median);
                let knet = k.map(|v| v.0 - f0);
                let knet_iqm = across(k_runs, |r| r.iqm).map(|v| v.0 - floor_iqm);
                let ratio = match (xnet, knet, xnet_iqm, knet_iqm) {
                    (Some(x), Some(k), Some(xi), Some(ki)) if k > 0.0 && ki > 0.0 => format!("**{:.2}** ({:.2})", x / k, xi / ki),
                    _ => dash(),
                };
                let shown = x_runs.is_some();
                s.push_str(&format!(
                    "| {label} | {:.0} | {} | {} | {} | {} | {ratio} | {} | {} |\n",
                    f0,
                    fmt(k),
                    knet.map_or_else(dash, |v| format!("{v:.0}")),
                    if shown { fmt(x) } else { "(as above)".into() },
                    xnet.map_or_else(dash, |v| format!("{v:.0}")),
                    across(k_runs, |r| r.p99).map_or_else(dash, |v| format!("{:.0}", v.0)),
                    if shown { xp99 } else { "(as above)".into() },
                ));
            };
            if !c.key.starts_with("syn") {
                row(format!("{}: {}", c.key, c.title), &c.katran, Some(&c.xlb));
            } else {
                let tripped: u64 = c.katran.iter().map(|r| r.guard_tripped).sum();
                let total = (c.katran.len() as u64 * self.cfg.calls).max(1);
                let guard =
                    if has_k { format!(", Katran's default guard (tripped on {:.0}% of calls)", 100.0 * tripped as f64 / total as f64) } else { String::new() };
                row(format!("{}: {}{guard}; xlb stateless SYN (writes nothing)", c.key, c.title), &c.katran, Some(&c.xlb));
                if has_k {
                    row(format!("{}, Katran's guard held off (every SYN writes); xlb stateless", c.key), &c.katran_held_off, None);
                }
                if !c.xlb_stateful.is_empty() {
                    let what = if c.key == "synfull" { "a half-open entry per SYN, each evicting one" } else { "a half-open entry per SYN" };
                    row(format!("{}, Katran's guard held off; xlb stateful SYN (shared backends: {what})", c.key), &c.katran_held_off, Some(&c.xlb_stateful));
                }
            }
        }
        s.push_str(&self.stall_table());
        s.push_str(
            "\nprograms (bpf_prog_info; verifier-processed instructions from the kernel)\n\n| program | xlated | JIT | verified insns |\n|---|---|---|---|\n",
        );
        for (who, key) in [
            ("Katran balancer_ingress", "katran"),
            ("xlb (entry: established flows, the host's traffic)", "xlb"),
            ("xlb_full (the entry's tail call: everything else)", "xlb_full"),
            ("floor (xlb_pass)", "floor"),
        ] {
            let p = &self.programs[key];
            if p.is_null() {
                continue;
            }
            s.push_str(&format!(
                "| {who} | {} insns ({} B) | {} B | {} |\n",
                p["xlated_insns"],
                p["xlated_bytes"],
                p["jited_bytes"],
                p["verified_insns"].as_u64().map_or_else(|| "?".into(), |v| v.to_string())
            ));
        }
        if let Some(x) = self.memory.get("xlb").filter(|v| !v.is_null()) {
            s.push_str(&format!(
                "\nflow table memory (kernel memlock / capacity): xlb XLB_CONNS {} B per flow ({} flows, key + value {} B, one entry per flow)",
                x["bytes_per_flow"], x["capacity"], x["key_value_bytes"]
            ));
            if let Some(k) = self.memory.get("katran").filter(|v| !v.is_null()) {
                s.push_str(&format!(
                    "; Katran LRU of CPU {} {} B per flow ({} flows, key + value {} B)",
                    self.cfg.cpu, k["bytes_per_flow"], k["capacity"], k["key_value_bytes"]
                ));
            }
            s.push('\n');
        }
        s.push_str(
            "\nnotes: xlb's SYNs to its default service (Maglev DNAT, backends of its own) are stateless: scheduled by hash, nothing written \
             (the backend's SYN-ACK creates the half-open flow); checked per run (stateless_syn +1 per call, new_flows +0, half-open table \
             unchanged). In synfull the half-open table is full, which the stateless SYN never touches. The stateful rows time SYNs to a \
             service sharing its backends with another (collision check, one half-open entry per SYN; checked per run), against Katran \
             writing one LRU entry per SYN (guard held off). The 1M flows are written into xlb's table as handshake-completed entries \
             (one per flow); flow 0 had a real handshake.\n",
        );
        if !has_k {
            s.push_str("\n(Katran's object was not available: xlb alone)\n");
        }
        let verdict = if self.checks.failures.is_empty() {
            format!("all {} checks passed", self.checks.passed)
        } else {
            format!("{} CHECKS FAILED", self.checks.failures.len())
        };
        s.push_str(&format!("\n{verdict}\n"));
        s
    }

    fn json(&self) -> Value {
        let series = |v: &[RunStats]| -> Value {
            let m = |f: fn(&RunStats) -> f64| across(v, f).map(|(m, lo, hi)| json!({ "median": m, "min": lo, "max": hi }));
            json!({ "median": m(|r| r.median), "iqm": m(|r| r.iqm), "p99": m(|r| r.p99), "runs": v.iter().map(RunStats::json).collect::<Vec<_>>() })
        };
        let cases: Vec<Value> = self
            .cases
            .iter()
            .map(|c| {
                let f = across(&c.floor, |r| r.median).map_or(0.0, |v| v.0);
                let fi = across(&c.floor, |r| r.iqm).map_or(0.0, |v| v.0);
                let net = |v: &[RunStats]| across(v, |r| r.median).map(|m| m.0 - f);
                let net_iqm = |v: &[RunStats]| across(v, |r| r.iqm).map(|m| m.0 - fi);
                let ratio = |x: Option<f64>, k: Option<f64>| match (x, k) {
                    (Some(x), Some(k)) if k > 0.0 => Some(x / k),
                    _ => None,
                };
                let mut v = json!({
                    "case": c.key, "title": c.title,
                    "floor": series(&c.floor), "katran": series(&c.katran), "xlb": series(&c.xlb),
                    "katran_net": net(&c.katran), "xlb_net": net(&c.xlb),
                    "ratio_xlb_katran": ratio(net(&c.xlb), net(&c.katran)),
                    "ratio_xlb_katran_iqm": ratio(net_iqm(&c.xlb), net_iqm(&c.katran)),
                    "katran_guard_tripped_calls": c.katran.iter().map(|r| r.guard_tripped).sum::<u64>(),
                });
                if !c.xlb_stateful.is_empty() {
                    v["xlb_stateful_syn"] = series(&c.xlb_stateful);
                    v["xlb_stateful_syn_net"] = json!(net(&c.xlb_stateful));
                    v["ratio_xlb_stateful_katran_guard_held_off"] = json!(ratio(net(&c.xlb_stateful), net(&c.katran_held_off)));
                    v["ratio_xlb_stateful_katran_guard_held_off_iqm"] = json!(ratio(net_iqm(&c.xlb_stateful), net_iqm(&c.katran_held_off)));
                }
                if !c.katran_held_off.is_empty() {
                    v["katran_guard_held_off"] = series(&c.katran_held_off);
                    v["katran_guard_held_off_net"] = json!(net(&c.katran_held_off));
                    v["ratio_xlb_katran_guard_held_off"] = json!(ratio(net(&c.xlb), net(&c.katran_held_off)));
                    v["ratio_xlb_katran_guard_held_off_iqm"] = json!(ratio(net_iqm(&c.xlb), net_iqm(&c.katran_held_off)));
                }
                v
            })
            .collect();
        json!({
            "benchmark": "per_packet_against_katran",
            "method": "BPF_PROG_TEST_RUN repeat=1 loops; cell = median of run medians; net = cell - floor (xlb_pass)",
            "kernel": self.kernel,
            "cpu": self.cfg.cpu,
            "calls_per_run": self.cfg.calls,
            "runs": self.cfg.runs,
            "flows": self.cfg.flows,
            "katran_object": self.cfg.katran_obj.as_ref().map(|p| p.display().to_string()),
            "katran_lru_per_cpu": KATRAN_LRU_SIZE,
            "programs": self.programs,
            "flow_table_memory": self.memory,
            "cases": cases,
            "counters": self.counters,
            "checks": { "passed": self.checks.passed, "failures": self.checks.failures, "notes": self.checks.notes },
        })
    }
}

/// The first FRAME_LEN bytes of an output buffer.
fn head(out: &[u8; OUT_LEN]) -> Buf {
    let mut b = [0u8; FRAME_LEN];
    b.copy_from_slice(&out[..FRAME_LEN]);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_are_chosen_by_key_in_run_order_and_unknown_keys_are_refused() -> anyhow::Result<()> {
        assert_eq!(selected_cases(None)?, CASE_KEYS.to_vec());
        assert_eq!(selected_cases(Some("synfull, 1m,hot"))?, vec!["hot", "1M", "synfull"]);
        assert_eq!(selected_cases(Some("hot,hot"))?, vec!["hot"]);
        match selected_cases(Some("hot,warm")) {
            Err(e) => assert!(e.to_string().contains("\"warm\"") && e.to_string().contains("hot-partial"), "{e}"),
            Ok(c) => panic!("an unknown case was accepted: {c:?}"),
        }
        assert!(selected_cases(Some(" , ")).is_err());
        Ok(())
    }

    #[test]
    fn stalls_on_one_refill_phase_are_told_apart_from_the_rest() {
        // Ten refills, every 128th call from call 5, and two stalls elsewhere.
        let mut slow: Vec<(u64, u32)> = (0..10).map(|k| (5 + LRU_REFILL_BATCH * k, 30_000 + k as u32)).collect();
        slow.push((7, 9_000));
        slow.push((300, 11_000));
        slow.sort();
        let s = Stalls::of(&slow);
        assert_eq!((s.on_phase, s.other), (10, 2));
        assert_eq!(s.on_phase_median_ns, 30_005);
        assert_eq!(s.other_median_ns, 11_000);
        let none = Stalls::of(&[]);
        assert_eq!((none.on_phase, none.other, none.on_phase_median_ns, none.other_median_ns), (0, 0, 0, 0));
    }
}
