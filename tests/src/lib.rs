//! Test bed for xlb: network namespaces joined by veth pairs, small servers
//! that name themselves, and a handle on a running `xlb daemon`.
//!
//! Rules every user gets for free: names are unique per process and call,
//! only namespaces created here carry traffic, and everything is removed on
//! drop (also when a test panics). Waiting is always on a condition with a
//! deadline, never a bare sleep.

pub mod attack;
pub mod daemon;
pub mod ecmp;
pub mod flows;
pub mod ha;
pub mod netns;
pub mod packet;
pub mod servers;
pub mod topology;

pub use daemon::Daemon;
pub use netns::{Netns, in_netns};
pub use servers::{BulkServer, HttpStatusServer, LineClient, Outcome, PushServer, TcpNameServer, UdpNameServer, download, watch_idle};
pub use topology::{Topology, TopologyOptions};

use std::time::{Duration, Instant};

/// Polls `cond` every 20 ms until it returns `Some`, or fails after `timeout`
/// with `what` in the message.
pub fn wait_for<T>(what: &str, timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether this process may create namespaces and load BPF (root).
pub fn have_privileges() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}
