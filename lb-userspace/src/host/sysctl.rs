//! What xlb needs from the host's kernel, per managed interface, and
//! setting it up (the daemon does unless `--no-host-setup`).
//!
//! Whatever XDP cannot finish itself (a next hop not resolved yet, a VLAN
//! tag, TTL expiry) it hands to the kernel already rewritten, and the
//! kernel must forward it: its source may be one of this host's own
//! addresses (the VIP on replies, the balancer's address in full NAT). And
//! `bpf_fib_lookup` answers only for interfaces with forwarding on. Each
//! setting is the narrowest the kernel offers, on the managed interfaces
//! only (kernel facts in docs/operations.md):
//!
//! | setting (per interface IF) | why |
//! |---|---|
//! | `net.ipv4.conf.IF.forwarding = 1` | IPv4 FIB lookups from XDP, and the kernel forwarding what XDP passes (both check the input interface) |
//! | `net.ipv4.conf.IF.accept_local = 1` | passed packets with a local source address are otherwise dropped as martians |
//! | `net.ipv4.conf.IF.rp_filter = 2` when the effective value (max of `all` and IF) is 1 | strict reverse-path filtering drops the same packets even with `accept_local` |
//! | `net.ipv6.conf.IF.forwarding = 1` | IPv6 FIB lookups from XDP (per interface) |
//! | `net.ipv6.conf.IF.accept_ra = 2` when it was 1 | forwarding on an interface makes the kernel ignore router advertisements unless this is 2: the host keeps its autoconfiguration as it was |
//! | `net.ipv6.conf.IF.force_forwarding = 1` (kernel 6.17+; older: `net.ipv6.conf.all.forwarding = 1`, host-wide) | the kernel forwarding what XDP passes |
//!
//! Every change is logged and recorded with the value it replaced (in the
//! state file, so a restarted daemon still knows), and undone on
//! `--detach-on-exit` or `xlb detach`.

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// One sysctl xlb changed: where, what it was, what xlb set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The sysctl, e.g. `net.ipv4.conf.eth0.accept_local`.
    pub key: String,
    pub before: String,
    pub after: String,
}

/// A setting the data plane needs that is not in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    pub key: String,
    pub have: String,
    pub want: String,
    pub why: &'static str,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is {} (needs {}: {})", self.key, self.have, self.want, self.why)
    }
}

/// The `/proc/sys` tree of the current network namespace (a test can point
/// it elsewhere).
#[derive(Clone, Debug)]
pub struct Sysctl {
    root: PathBuf,
}

impl Default for Sysctl {
    fn default() -> Self {
        Sysctl { root: PathBuf::from("/proc/sys") }
    }
}

impl Sysctl {
    pub fn at(root: &Path) -> Sysctl {
        Sysctl { root: root.to_owned() }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key.replace('.', "/"))
    }

    pub fn exists(&self, key: &str) -> bool {
        self.path(key).exists()
    }

    pub fn read(&self, key: &str) -> std::io::Result<String> {
        fs::read_to_string(self.path(key)).map(|v| v.trim().to_owned())
    }

    pub fn write(&self, key: &str, value: &str) -> std::io::Result<()> {
        fs::write(self.path(key), value)
    }
}

/// What `iface` needs, as (key, wanted value, why), given the current
/// values (some needs depend on them: rp_filter, accept_ra).
pub fn needs(sys: &Sysctl, iface: &str) -> Vec<(String, String, &'static str)> {
    let mut out = Vec::new();
    let v4 = |k: &str| format!("net.ipv4.conf.{iface}.{k}");
    let v6 = |k: &str| format!("net.ipv6.conf.{iface}.{k}");
    out.push((v4("forwarding"), "1".into(), "XDP's FIB lookups and the kernel forwarding what XDP passes to it"));
    out.push((
        v4("accept_local"),
        "1".into(),
        "packets passed to the kernel with a local source address (the VIP, the full-NAT source) are dropped as martians otherwise",
    ));
    let rp = |k: &str| sys.read(k).ok().and_then(|v| v.parse::<u32>().ok()).unwrap_or(0);
    if rp("net.ipv4.conf.all.rp_filter").max(rp(&v4("rp_filter"))) == 1 {
        // The kernel uses the larger of `all` and the interface's value:
        // 2 (loose) on the interface wins over a strict `all`.
        out.push((v4("rp_filter"), "2".into(), "strict reverse-path filtering drops passed packets with a local source even with accept_local"));
    }
    if sys.exists(&v6("forwarding")) {
        out.push((v6("forwarding"), "1".into(), "XDP's IPv6 FIB lookups"));
        // Only with the change to forwarding it goes with.
        if sys.read(&v6("forwarding")).is_ok_and(|v| v != "1") && sys.read(&v6("accept_ra")).is_ok_and(|v| v == "1") {
            out.push((
                v6("accept_ra"),
                "2".into(),
                "with forwarding on, router advertisements are ignored unless accept_ra is 2: the host's IPv6 autoconfiguration stays as it was",
            ));
        }
        if sys.exists(&v6("force_forwarding")) {
            out.push((v6("force_forwarding"), "1".into(), "the kernel forwarding IPv6 packets XDP passes to it"));
        } else {
            out.push((
                "net.ipv6.conf.all.forwarding".into(),
                "1".into(),
                "the kernel forwarding IPv6 packets XDP passes to it (this kernel has no per-interface force_forwarding)",
            ));
        }
    }
    out
}

/// The settings of `ifaces` that are not as the data plane needs them.
pub fn missing(sys: &Sysctl, ifaces: &[String]) -> Vec<Missing> {
    let mut out: Vec<Missing> = Vec::new();
    for iface in ifaces {
        for (key, want, why) in needs(sys, iface) {
            let have = sys.read(&key).unwrap_or_else(|_| "unreadable".into());
            if have != want && !out.iter().any(|m| m.key == key) {
                out.push(Missing { key, have, want, why });
            }
        }
    }
    out
}

/// Sets what `ifaces` need. Returns the changes made (already-right values
/// are left alone and not listed); each is logged. Stops at the first
/// write that fails (after undoing the ones it made), naming the setting.
pub fn apply(sys: &Sysctl, ifaces: &[String]) -> Result<Vec<Change>, String> {
    let mut done: Vec<Change> = Vec::new();
    for m in missing(sys, ifaces) {
        if let Err(e) = sys.write(&m.key, &m.want) {
            undo(sys, &done);
            return Err(format!("setting {} to {}: {e} (set it yourself, or start with --no-host-setup to be told what is missing)", m.key, m.want));
        }
        tracing::info!(setting = m.key, before = m.have, after = m.want, why = m.why, "host setting changed");
        done.push(Change { key: m.key, before: m.have, after: m.want });
    }
    Ok(done)
}

/// Puts back what [`apply`] changed, newest first. A setting someone
/// changed again since is left as they set it; an interface that is gone
/// took its settings with it.
pub fn undo(sys: &Sysctl, changes: &[Change]) {
    for c in changes.iter().rev() {
        match sys.read(&c.key) {
            Ok(now) if now == c.after => match sys.write(&c.key, &c.before) {
                Ok(()) => tracing::info!(setting = c.key, value = c.before, "host setting restored"),
                Err(e) => tracing::warn!(setting = c.key, error = %e, "restoring a host setting failed"),
            },
            Ok(now) => tracing::info!(setting = c.key, value = now, "host setting changed by someone else since: left alone"),
            Err(_) => tracing::debug!(setting = c.key, "host setting gone (its interface was removed)"),
        }
    }
}

/// Records `new` changes into `all` (a setting changed twice keeps its
/// first `before`).
pub fn merge(all: &mut Vec<Change>, new: Vec<Change>) {
    for c in new {
        match all.iter_mut().find(|a| a.key == c.key) {
            Some(a) => a.after = c.after,
            None => all.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `/proc/sys` with the kernel's defaults for the given
    /// interfaces.
    fn fake(ifaces: &[&str], force_forwarding: bool) -> (tempdir::Dir, Sysctl) {
        let dir = tempdir::Dir::new();
        let sys = Sysctl::at(dir.path());
        let set = |k: &str, v: &str| {
            let p = sys.path(k);
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            fs::write(p, format!("{v}\n")).expect("write");
        };
        set("net.ipv4.conf.all.rp_filter", "0");
        set("net.ipv6.conf.all.forwarding", "0");
        for i in ifaces {
            for (k, v) in [("forwarding", "0"), ("accept_local", "0"), ("rp_filter", "0")] {
                set(&format!("net.ipv4.conf.{i}.{k}"), v);
            }
            set(&format!("net.ipv6.conf.{i}.forwarding"), "0");
            set(&format!("net.ipv6.conf.{i}.accept_ra"), "1");
            if force_forwarding {
                set(&format!("net.ipv6.conf.{i}.force_forwarding"), "0");
            }
        }
        (dir, sys)
    }

    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir().join(format!("xlb-host-test-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&p);
                std::fs::create_dir_all(&p).expect("temp dir");
                Dir(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn ifaces(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_fresh_host_gets_per_interface_settings_and_undo_restores_them() {
        let (_d, sys) = fake(&["l0", "l1"], true);
        let want = ifaces(&["l0", "l1"]);
        let missing = missing(&sys, &want);
        let keys: Vec<&str> = missing.iter().map(|m| m.key.as_str()).collect();
        assert!(keys.contains(&"net.ipv4.conf.l0.accept_local") && keys.contains(&"net.ipv6.conf.l1.force_forwarding"), "{keys:?}");
        assert!(!keys.iter().any(|k| k.contains(".all.")), "nothing host-wide when the kernel allows per-interface: {keys:?}");
        let changes = apply(&sys, &want).expect("apply");
        assert_eq!(changes.len(), missing.len());
        assert!(super::missing(&sys, &want).is_empty(), "everything in place after apply");
        assert_eq!(sys.read("net.ipv6.conf.l0.accept_ra").expect("read"), "2", "router advertisements still accepted");
        assert_eq!(apply(&sys, &want).expect("again"), vec![], "a second apply changes nothing");
        undo(&sys, &changes);
        assert_eq!(sys.read("net.ipv4.conf.l1.accept_local").expect("read"), "0");
        assert_eq!(sys.read("net.ipv6.conf.l1.accept_ra").expect("read"), "1");
        assert_eq!(super::missing(&sys, &want).len(), missing.len(), "back to the defaults");
    }

    #[test]
    fn strict_rp_filter_is_loosened_on_the_interface_and_old_kernels_need_global_ipv6_forwarding() {
        let (_d, sys) = fake(&["l0"], false);
        sys.write("net.ipv4.conf.all.rp_filter", "1").expect("write");
        let changes = apply(&sys, &ifaces(&["l0"])).expect("apply");
        assert_eq!(sys.read("net.ipv4.conf.l0.rp_filter").expect("read"), "2", "loose beats a strict `all`");
        assert_eq!(sys.read("net.ipv4.conf.all.rp_filter").expect("read"), "1", "`all` left alone");
        assert!(changes.iter().any(|c| c.key == "net.ipv6.conf.all.forwarding"), "no force_forwarding: the host-wide switch");
    }

    #[test]
    fn undo_leaves_values_someone_changed_since() {
        let (_d, sys) = fake(&["l0"], true);
        let changes = apply(&sys, &ifaces(&["l0"])).expect("apply");
        sys.write("net.ipv6.conf.l0.accept_ra", "0").expect("the operator's change");
        undo(&sys, &changes);
        assert_eq!(sys.read("net.ipv6.conf.l0.accept_ra").expect("read"), "0", "the operator's value stays");
        assert_eq!(sys.read("net.ipv4.conf.l0.forwarding").expect("read"), "0", "ours: restored");
    }

    #[test]
    fn merge_keeps_the_first_before() {
        let mut all = vec![Change { key: "a".into(), before: "0".into(), after: "1".into() }];
        merge(
            &mut all,
            vec![Change { key: "a".into(), before: "1".into(), after: "2".into() }, Change { key: "b".into(), before: "x".into(), after: "y".into() }],
        );
        assert_eq!(all[0], Change { key: "a".into(), before: "0".into(), after: "2".into() });
        assert_eq!(all.len(), 2);
    }
}
