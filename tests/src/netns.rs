//! Named network namespaces (`ip netns add`) removed on drop, and running
//! code inside one from a scoped thread (setns changes only that thread, so
//! the test process itself never leaves its namespace).

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique prefix for this process and call: `xt<pid>n<k>`.
pub fn unique_prefix() -> String {
    format!("xt{}n{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

pub struct Netns {
    pub name: String,
}

/// A process started in a namespace; killed and reaped on drop.
pub struct Spawned(pub std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Netns> {
        run("ip", &["netns", "add", name])?;
        let ns = Netns { name: name.to_owned() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Starts a program inside the namespace (as `exec` does), output
    /// discarded; it is killed when the handle is dropped.
    pub fn spawn(&self, prog: &str, args: &[&str]) -> anyhow::Result<Spawned> {
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.path()))
            .arg(prog)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting {prog} (installed by `cargo xtask setup`)"))?;
        Ok(Spawned(child))
    }

    /// `ip -n NAME args...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a program inside the namespace (network only: bpffs stays visible,
    /// unlike `ip netns exec`, which remounts /sys).
    pub fn exec(&self, prog: &str, args: &[&str]) -> anyhow::Result<String> {
        let net = format!("--net={}", self.path());
        let mut full = vec![net.as_str(), prog];
        full.extend_from_slice(args);
        run("nsenter", &full)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")]).map(|_| ())
    }

    pub fn ifindex(&self, iface: &str) -> anyhow::Result<u32> {
        in_netns(&self.name, || xlb::dataplane::ifindex(iface))?.with_context(|| format!("ifindex of {iface} in {}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("warning: removing netns {}: {e:#}", self.name);
        }
    }
}

/// Runs `f` in a new thread that has joined namespace `ns`; returns its result.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: valid fd; affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns into {path}: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns {ns} panicked"))?
    })
}

pub fn run(prog: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(prog).args(args).output().with_context(|| format!("running {prog} (is it installed? `cargo xtask setup`)"))?;
    if !out.status.success() {
        bail!("{prog} {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
