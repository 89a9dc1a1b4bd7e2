//! Project tasks: `cargo xtask setup | test | demo`.
//!
//! `setup` installs what the build and the tests need, idempotently, and
//! returns in seconds when everything is there; `test` and `demo` run it
//! first, so a fresh machine needs nothing but this repository.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain and system packages the project needs.
    Setup,
    /// Run every test: host unit tests, BPF_PROG_TEST_RUN tests, netns integration tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build a client/lb/3-backend netns topology and balance traffic through it.
    Demo,
    /// Run the benchmarks (release build; results under target/bench/).
    Bench,
}

/// Debian packages: LLVM 22 for bpf-linker; iproute2/ethtool/ping for the
/// netns test bed.
const APT_PACKAGES: &[&str] =
    &["llvm-22-dev", "libpolly-22-dev", "iproute2", "ethtool", "iputils-ping", "util-linux", "procps", "tmux", "dnsmasq-base", "keepalived", "bird2"];
/// The peers and load tools of the end-to-end benchmarks (`bench` only).
const BENCH_PACKAGES: &[&str] = &["nginx-light", "wrk", "haproxy", "nftables", "iperf3"];
const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Test { args } => setup().and_then(|()| test(&args)),
        Cmd::Demo => setup().and_then(|()| demo()),
        Cmd::Bench => setup_with(BENCH_PACKAGES).and_then(|()| bench()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let desc = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {desc}"))?;
    if !status.success() {
        bail!("{desc} failed ({status})");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    cmd.output().ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

fn setup() -> anyhow::Result<()> {
    setup_with(&[])
}

/// As [`setup`], plus `extra` Debian packages.
fn setup_with(extra: &[&str]) -> anyhow::Result<()> {
    // System packages.
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .chain(extra)
        .copied()
        .filter(|p| !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p])).is_some_and(|s| s.contains("install ok installed")))
        .collect();
    if !missing.is_empty() {
        eprintln!("setup: installing {}", missing.join(" "));
        if !is_root() {
            bail!("packages {} are missing and installing them needs root", missing.join(" "));
        }
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get").args(["install", "-y", "-q"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    // Nightly toolchain with rust-src (the eBPF crate builds core itself).
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("setup: installing the nightly toolchain");
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let comps = output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"])).unwrap_or_default();
    if !comps.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to nightly");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    // The lints CI runs (`.ci/run`) on the stable toolchain.
    let stable = output(Command::new("rustup").args(["component", "list", "--installed"])).unwrap_or_default();
    for c in ["rustfmt", "clippy"] {
        if !stable.lines().any(|l| l.starts_with(c)) {
            eprintln!("setup: adding {c}");
            run(Command::new("rustup").args(["component", "add", c]))?;
        }
    }
    // bpf-linker against Debian's LLVM 22.
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !have.contains(BPF_LINKER_VERSION) {
        eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes, once)");
        run(Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked", "--no-default-features", "--features", "llvm-22"])
            .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22")
            .env("RUSTFLAGS", "-L /usr/lib/llvm-22/lib -C link-args=-Wl,-rpath,/usr/lib/llvm-22/lib"))?;
    }
    // bpffs for the daemon's pins.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf ")) {
        eprintln!("setup: mounting bpffs at /sys/fs/bpf");
        if !is_root() {
            bail!("bpffs is not mounted at /sys/fs/bpf and mounting it needs root");
        }
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn xlb_bin() -> PathBuf {
    root().join("target/debug/xlb")
}

fn test(args: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the tests create network namespaces and load XDP programs: run them as root");
    }
    run(cargo().args(["build", "--package", "lb-userspace", "--bin", "xlb"]))?;
    // Stream the test output and total it, so the run ends with one line
    // saying how many tests ran (cargo's own last line is a doc-test
    // summary, often "0 passed").
    let mut child = cargo()
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(args)
        .env("XLB_BIN", xlb_bin())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let stdout = child.stdout.take().context("capturing cargo test output")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count_of(rest, " passed");
            failed += count_of(rest, " failed");
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("cargo test failed ({status})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// The number before `what` in a cargo test summary ("ok. 5 passed; 0 failed; ...").
fn count_of(summary: &str, what: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(what.trim_start()).map(str::trim))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn demo() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo creates network namespaces and loads XDP programs: run it as root");
    }
    run(cargo().args(["build", "--package", "lb-userspace", "--bin", "xlb", "--package", "xlb-tests", "--bin", "xlb-demo"]))?;
    run(Command::new(root().join("target/debug/xlb-demo")).env("XLB_BIN", xlb_bin()))
}

fn bench() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the benchmarks create network namespaces and load XDP programs: run them as root");
    }
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "lb-userspace",
        "--bin",
        "xlb",
        "--package",
        "xlb-tests",
        "--bin",
        "xlb-bench",
        "--bin",
        "xlb-bench-e2e",
        "--bin",
        "xlb-bench-control",
        "--bin",
        "xlb-bench-katran",
    ]))?;
    let xlb = root().join("target/release/xlb");
    run(Command::new(root().join("target/release/xlb-bench")).env("XLB_BIN", &xlb))?;
    run(Command::new(root().join("target/release/xlb-bench-e2e")).env("XLB_BIN", &xlb))?;
    let mut control = Command::new(root().join("target/release/xlb-bench-control"));
    control.env("XLB_BIN", &xlb);
    if let Ok(rev) = std::env::var("XLB_BENCH_BEFORE") {
        control.env("XLB_BIN_BEFORE", build_before(&rev)?);
    }
    run(&mut control)?;
    // Per packet against Katran, in the same run (KATRAN_OBJ, default
    // ../shared/peers/katran/balancer.bpf.o; without it, xlb alone).
    run(&mut Command::new(root().join("target/release/xlb-bench-katran")))
}

/// Builds `xlb` at revision `rev` (a worktree under target/bench-before/),
/// for benchmarks that compare it with this tree in one run.
fn build_before(rev: &str) -> anyhow::Result<PathBuf> {
    let dir = root().join("target/bench-before").join(rev.replace('/', "_"));
    if !dir.join("Cargo.toml").exists() {
        run(Command::new("git").current_dir(root()).args(["worktree", "add", "--detach", "--force"]).arg(&dir).arg(rev))?;
    }
    run(Command::new("cargo").current_dir(&dir).args(["build", "--release", "--package", "lb-userspace", "--bin", "xlb"]))?;
    Ok(dir.join("target/release/xlb"))
}
