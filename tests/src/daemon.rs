//! A running `xlb daemon` inside a test namespace, plus the CLI to drive it.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{netns::Netns, wait_for};

/// Path of the `xlb` binary: `XLB_BIN`, else the workspace's debug build.
pub fn xlb_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("XLB_BIN") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/xlb")
}

pub struct Daemon {
    child: Option<Child>,
    /// The `xlb` binary it runs (its CLI too).
    pub bin: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub state_file: PathBuf,
    pub log: PathBuf,
    dir: PathBuf,
    /// Command line (after `nsenter`), for restarts.
    args: Vec<String>,
    /// Started without --detach-on-exit: the data plane outlives it.
    persistent: bool,
}

impl Daemon {
    /// Starts `xlb daemon --detach-on-exit` in `ns` on `ifaces` and waits
    /// until it answers.
    pub fn start(ns: &Netns, ifaces: &[String], extra: &[&str]) -> anyhow::Result<Daemon> {
        Daemon::start_bin(&xlb_bin(), ns, ifaces, extra)
    }

    /// As [`Daemon::start`], with another `xlb` binary (benchmarks compare
    /// builds in one run).
    pub fn start_bin(bin: &Path, ns: &Netns, ifaces: &[String], extra: &[&str]) -> anyhow::Result<Daemon> {
        let mut with = extra.to_vec();
        with.push("--detach-on-exit");
        let mut d = Daemon::spawn_bin(bin, ns, ifaces, &with)?;
        d.wait_ready()?;
        Ok(d)
    }

    /// Starts a daemon whose data plane keeps forwarding after it stops
    /// (the production default); dropping it runs `xlb detach`.
    pub fn start_persistent(ns: &Netns, ifaces: &[String], extra: &[&str]) -> anyhow::Result<Daemon> {
        let mut d = Daemon::spawn(ns, ifaces, extra)?;
        d.persistent = true;
        d.wait_ready()?;
        Ok(d)
    }

    /// Starts the daemon again with the same command line (after `stop`),
    /// plus `extra`, and waits until it answers.
    pub fn restart(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "stop the daemon before restarting it");
        let mut args = self.args.clone();
        args.extend(extra.iter().map(|s| s.to_string()));
        self.child = Some(self.spawn_args(&args)?);
        self.wait_ready()
    }

    /// Runs the daemon's command line plus `extra`, expecting it to exit;
    /// returns the status and the log.
    /// `extra` flags that the command line already has replace its values.
    pub fn run_variant_expecting_exit(&mut self, extra: &[&str]) -> anyhow::Result<(std::process::ExitStatus, String)> {
        anyhow::ensure!(self.child.is_none(), "stop the daemon first");
        let mut args = self.args.clone();
        let mut rest = extra.iter();
        while let Some(flag) = rest.next() {
            match (args.iter().position(|a| a == flag), flag.starts_with("--")) {
                (Some(i), true) if i + 1 < args.len() && !args[i + 1].starts_with("--") => {
                    if let Some(v) = rest.next() {
                        args[i + 1] = v.to_string();
                    }
                }
                _ => args.push(flag.to_string()),
            }
        }
        let child = self.spawn_args(&args)?;
        let status = wait_exit(child, Duration::from_secs(20))?;
        Ok((status, self.log_text()))
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let d = self;
        let ready = wait_for("the daemon to answer on its socket", Duration::from_secs(20), || {
            if let Some(c) = d.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                return Some(false);
            }
            d.cli(&["status"]).ok().filter(|o| o.status.success()).map(|_| true)
        });
        match ready {
            Ok(true) => Ok(()),
            Ok(false) => {
                d.child = None;
                bail!("xlb daemon exited during start:\n{}", d.log_text())
            }
            Err(e) => bail!("{e}:\n{}", d.log_text()),
        }
    }

    /// Starts a daemon that is expected to fail, and returns its exit status
    /// and log once it has exited.
    pub fn run_expecting_exit(ns: &Netns, ifaces: &[String], extra: &[&str]) -> anyhow::Result<(std::process::ExitStatus, String, Daemon)> {
        let mut with = extra.to_vec();
        with.push("--detach-on-exit");
        let mut d = Daemon::spawn(ns, ifaces, &with)?;
        let child = d.child.take().ok_or_else(|| anyhow::anyhow!("no child"))?;
        let status = wait_exit(child, Duration::from_secs(20)).map_err(|e| anyhow::anyhow!("{e}:\n{}", d.log_text()))?;
        let log = d.log_text();
        Ok((status, log, d))
    }

    fn spawn(ns: &Netns, ifaces: &[String], extra: &[&str]) -> anyhow::Result<Daemon> {
        Daemon::spawn_bin(&xlb_bin(), ns, ifaces, extra)
    }

    fn spawn_bin(bin: &Path, ns: &Netns, ifaces: &[String], extra: &[&str]) -> anyhow::Result<Daemon> {
        if !bin.exists() {
            bail!("{} does not exist: build it first (`cargo xtask test` does)", bin.display());
        }
        let dir = std::env::temp_dir().join(format!("{}-xlb", ns.name));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("xlb.sock");
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", ns.name));
        let state_file = dir.join("state.json");
        let log = dir.join("daemon.log");
        let mut args: Vec<String> = vec![format!("--net={}", ns.path()), bin.display().to_string(), "daemon".into()];
        for i in ifaces {
            args.push("--iface".into());
            args.push(i.clone());
        }
        // Defaults the caller may override.
        for (flag, value) in [("--xdp-mode", "native"), ("--conn-capacity", "65536")] {
            if !extra.contains(&flag) {
                args.extend([flag.to_string(), value.to_string()]);
            }
        }
        args.extend(
            ["--socket", &socket.display().to_string(), "--pin-dir", &pin_dir.display().to_string(), "--state-file", &state_file.display().to_string()]
                .iter()
                .map(|s| s.to_string()),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut d = Daemon { child: None, bin: bin.to_path_buf(), socket, pin_dir, state_file, log, dir, args: args.clone(), persistent: false };
        d.child = Some(d.spawn_args(&args)?);
        Ok(d)
    }

    fn spawn_args(&self, args: &[String]) -> anyhow::Result<Child> {
        // Each run appends to the log.
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        Command::new("nsenter")
            .args(args)
            .env("XLB_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("spawning xlb daemon")
    }

    /// `xlb detach` for this daemon's pins and state, run in the daemon's
    /// namespace (it puts back the host settings the daemon changed there).
    pub fn detach(&self) -> anyhow::Result<Output> {
        Command::new("nsenter")
            .arg(&self.args[0])
            .arg(xlb_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(["detach", "--pin-dir", &self.pin_dir.display().to_string(), "--state-file", &self.state_file.display().to_string()])
            .output()
            .context("running xlb detach")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(&self.bin).arg("--socket").arg(&self.socket).args(args).output().context("running xlb")
    }

    /// Runs the CLI and fails unless it exits 0; returns stdout.
    pub fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!("xlb {} failed ({}): {}{}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a verb with `--json` and returns the response's `data`.
    pub fn json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ok(&a)?;
        let v: serde_json::Value = serde_json::from_str(&out).with_context(|| format!("parsing {out}"))?;
        Ok(v["data"].clone())
    }

    /// Kills the daemon with SIGKILL (a crash, the OOM killer): it cleans
    /// nothing up.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else { bail!("already stopped") };
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let Some(child) = self.child.take() else { bail!("already stopped") };
        // SAFETY: plain kill(2) on our child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        wait_exit(child, Duration::from_secs(10)).map_err(|e| anyhow::anyhow!("after SIGTERM: {e}:\n{}", self.log_text()))
    }
}

/// Waits for `child` to exit; kills it if it is still running at the deadline.
fn wait_exit(mut child: Child, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
    let mut status = None;
    let res = wait_for("the daemon to exit", timeout, || {
        status = child.try_wait().ok().flatten();
        status.map(|_| ())
    });
    if let Err(e) = res {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    status.ok_or_else(|| anyhow::anyhow!("no exit status"))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some()
            && let Err(e) = self.stop()
        {
            eprintln!("warning: {e:#}");
        }
        if self.persistent {
            let _ = self.detach();
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
