//! Flow logs: one JSON line per finished flow (5-tuple, VIP, backend,
//! packets and bytes each way, start, duration, why it ended), to a file or
//! stdout, sampled 1 in N by a hash of the 5-tuple (so a sampled flow is
//! the same on every balancer). Records come from the data plane's ring
//! buffer (flows it removed: RSTs, reactive resets) and from the
//! controller's own removals (resets, idle expiry, FIN-closed flows).
//! Flows the LRU evicts are not seen by anyone (`table_evictions` counts
//! them).

use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use lb_common::maps::{end_reason, FlowEnd, FlowKey};
use serde::Serialize;

use crate::api::Proto;

pub struct FlowLog {
    out: Box<dyn Write + Send>,
    sample: u32,
    /// Records written and records lost to write errors.
    pub written: u64,
    pub write_errors: u64,
}

#[derive(Serialize)]
struct Record {
    ts: f64,
    event: &'static str,
    proto: Proto,
    client: SocketAddrV4,
    vip: SocketAddrV4,
    backend: SocketAddrV4,
    packets_in: u64,
    bytes_in: u64,
    packets_out: u64,
    bytes_out: u64,
    start: f64,
    duration_s: f64,
    reason: &'static str,
}

fn addr(a: u32, p: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(a.to_ne_bytes()), u16::from_be_bytes(p.to_ne_bytes()))
}

/// (CLOCK_MONOTONIC ns, wall seconds) now, to turn data-plane times into
/// wall-clock times.
fn clocks() -> (u64, f64) {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let mono = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    let wall = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    (mono, wall)
}

impl FlowLog {
    /// `path` "-" is stdout; a file is appended to. `sample`: 1 in N (≥ 1).
    pub fn open(path: &Path, sample: u32) -> anyhow::Result<FlowLog> {
        let out: Box<dyn Write + Send> = if path == Path::new("-") {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening the flow log {}", path.display()))?,
            )
        };
        Ok(FlowLog { out, sample: sample.max(1), written: 0, write_errors: 0 })
    }

    fn sampled(&self, k: &FlowKey) -> bool {
        self.sample == 1 || lb_common::sched_hash::flow_hash(k.src_addr, k.dst_addr, k.src_port, k.dst_port, k.proto) % self.sample == 0
    }

    /// Logs one finished flow.
    pub fn record(&mut self, ev: &FlowEnd) {
        if !self.sampled(&ev.key) {
            return;
        }
        let Some(proto) = Proto::from_number(ev.key.proto) else { return };
        let (mono, wall) = clocks();
        let to_wall = |t: u64| wall - (mono.saturating_sub(t) as f64 / 1e9);
        let start = ev.to_backend.created_ns;
        let r = Record {
            ts: wall,
            event: "end",
            proto,
            client: addr(ev.key.src_addr, ev.key.src_port),
            vip: addr(ev.key.dst_addr, ev.key.dst_port),
            backend: addr(ev.to_backend.nat_addr, ev.to_backend.nat_port),
            packets_in: ev.to_backend.packets,
            bytes_in: ev.to_backend.bytes,
            packets_out: ev.to_client.packets,
            bytes_out: ev.to_client.bytes,
            start: to_wall(start),
            duration_s: mono.saturating_sub(start) as f64 / 1e9,
            reason: end_reason::name(ev.reason),
        };
        let line = serde_json::to_string(&r).map(|mut l| {
            l.push('\n');
            l
        });
        match line.map_err(std::io::Error::other).and_then(|l| self.out.write_all(l.as_bytes()).and_then(|()| self.out.flush())) {
            Ok(()) => self.written += 1,
            Err(e) => {
                self.write_errors += 1;
                if self.write_errors == 1 {
                    tracing::warn!(error = %e, "writing the flow log failed");
                }
            }
        }
    }
}
