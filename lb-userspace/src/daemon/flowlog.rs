//! Flow logs: one JSON line per finished flow (and, with
//! `--flow-log-new`, per new flow: `"event":"new"`) (5-tuple, VIP, backend,
//! packets and bytes each way, start, duration, why it ended), to a file or
//! stdout, sampled 1 in N by a hash of the 5-tuple (so a sampled flow is
//! the same on every balancer). Records come from the data plane's ring
//! buffer (flows it removed: RSTs, reactive resets) and from the
//! controller's own removals (resets, idle expiry, FIN-closed flows).
//! Flows the LRU evicts are not seen by anyone (`table_evictions` counts
//! them).

use std::{
    io::Write,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use lb_common::maps::{Addr, FLOW_FULLNAT, FlowEnd, FlowKey, addr_to_ip, end_reason};
use serde::Serialize;

use crate::api::Proto;

pub struct FlowLog {
    /// Buffered: flushed when no record came for a moment (one flush per
    /// burst, not per line).
    out: std::io::BufWriter<Box<dyn Write + Send>>,
    sample: u32,
    /// Log new-flow records (`--flow-log-new`); the data plane may emit them
    /// for state sync alone.
    new_flows: bool,
    /// Records written and records lost to write errors.
    pub written: u64,
    pub write_errors: u64,
    /// The data plane's clock: (now in jiffies, jiffies per second).
    clock: Box<dyn FnMut() -> Option<(u32, u32)> + Send>,
}

#[derive(Serialize)]
struct Record {
    ts: f64,
    event: &'static str,
    proto: Proto,
    client: SocketAddr,
    vip: SocketAddr,
    backend: SocketAddr,
    /// Full NAT: the balancer's address and port the backend saw.
    #[serde(skip_serializing_if = "Option::is_none")]
    snat: Option<SocketAddr>,
    packets_in: u64,
    bytes_in: u64,
    packets_out: u64,
    bytes_out: u64,
    start: f64,
    duration_s: f64,
    #[serde(skip_serializing_if = "str::is_empty")]
    reason: &'static str,
}

fn addr(a: &Addr, p: u16) -> SocketAddr {
    SocketAddr::new(addr_to_ip(a), u16::from_be_bytes(p.to_ne_bytes()))
}

/// Wall seconds now.
fn wall_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The sampling hash's key: fixed, so every balancer samples the same
/// flows (nothing secret about which flows are logged).
const SAMPLE_KEY: [u64; 2] = [0x5851_f42d_4c95_7f2d, 0x1405_7b7e_f767_814f];

impl FlowLog {
    /// `path` "-" is stdout; a file is appended to. `sample`: 1 in N (≥ 1).
    pub fn open(path: &Path, sample: u32) -> anyhow::Result<FlowLog> {
        let out: Box<dyn Write + Send> = if path == Path::new("-") {
            Box::new(std::io::stdout())
        } else {
            Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("opening the flow log {}", path.display()))?)
        };
        Ok(FlowLog::to_writer(out, sample))
    }

    pub fn to_writer(out: Box<dyn Write + Send>, sample: u32) -> FlowLog {
        FlowLog { out: std::io::BufWriter::new(out), sample: sample.max(1), new_flows: true, written: 0, write_errors: 0, clock: Box::new(|| None) }
    }

    fn sampled(&self, k: &FlowKey) -> bool {
        self.sample == 1 || lb_common::sched_hash::flow_hash(&SAMPLE_KEY, &k.src_addr, &k.dst_addr, k.src_port, k.dst_port, k.proto).is_multiple_of(self.sample)
    }

    /// Reads the data plane's clock with `clock` (flow times are jiffies).
    pub fn with_clock(mut self, clock: Box<dyn FnMut() -> Option<(u32, u32)> + Send>) -> FlowLog {
        self.clock = clock;
        self
    }

    /// Whether new-flow records are logged (default: yes).
    pub fn with_new_flows(mut self, on: bool) -> FlowLog {
        self.new_flows = on;
        self
    }

    /// Logs one finished flow.
    pub fn record(&mut self, ev: &FlowEnd) {
        if (ev.reason == end_reason::NEW && !self.new_flows) || !self.sampled(&ev.key) {
            return;
        }
        let Some(proto) = Proto::from_number(ev.key.proto) else { return };
        let wall = wall_now();
        let st = &ev.state;
        // The flow's age, from the data plane's clock.
        let age = (self.clock)().map_or(0.0, |(now, hz)| now.wrapping_sub(st.created) as f64 / hz.max(1) as f64);
        let r = Record {
            ts: wall,
            event: if ev.reason == end_reason::NEW { "new" } else { "end" },
            proto,
            // The key is the client's own tuple in both modes.
            client: addr(&ev.key.src_addr, ev.key.src_port),
            vip: addr(&ev.key.dst_addr, ev.key.dst_port),
            backend: addr(&ev.backend, ev.backend_port),
            snat: (st.flags & FLOW_FULLNAT != 0).then(|| addr(&ev.snat, st.snat_port)),
            packets_in: st.packets_orig as u64,
            bytes_in: st.bytes_orig,
            packets_out: st.packets_reply as u64,
            bytes_out: st.bytes_reply,
            start: wall - age,
            duration_s: age,
            reason: if ev.reason == end_reason::NEW { "" } else { end_reason::name(ev.reason) },
        };
        let line = serde_json::to_string(&r).map(|mut l| {
            l.push('\n');
            l
        });
        match line.map_err(std::io::Error::other).and_then(|l| self.out.write_all(l.as_bytes())) {
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

impl FlowLog {
    /// Writes what is buffered.
    pub fn flush(&mut self) {
        if let Err(e) = self.out.flush() {
            self.write_errors += 1;
            tracing::warn!(error = %e, "writing the flow log failed");
        }
    }
}

/// Records queued for the writer at most; past this they are dropped
/// (counted as `flow_log_dropped_records`), never the controller's time.
const QUEUE: usize = 65_536;

/// Where records for the flow log go (cheap to clone).
#[derive(Clone)]
pub struct Sender {
    tx: mpsc::SyncSender<FlowEnd>,
    dropped: Arc<AtomicU64>,
}

impl Sender {
    pub fn send(&self, ev: FlowEnd) {
        if self.tx.try_send(ev).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The writer's counters, for `status` and the metrics.
pub struct Counters {
    pub written: Arc<AtomicU64>,
    pub write_errors: Arc<AtomicU64>,
    pub dropped: Arc<AtomicU64>,
}

impl Counters {
    pub fn shared(&self) -> Vec<crate::controller::SharedCounter> {
        vec![
            ("flow_log_written".into(), self.written.clone()),
            ("flow_log_write_errors".into(), self.write_errors.clone()),
            ("flow_log_dropped_records".into(), self.dropped.clone()),
        ]
    }
}

/// Starts the writer thread: it writes records as they come and flushes
/// when none came for 100 ms; it ends when every sender is dropped.
pub fn start(mut log: FlowLog) -> std::io::Result<(Sender, Counters)> {
    let (tx, rx) = mpsc::sync_channel::<FlowEnd>(QUEUE);
    let counters = Counters { written: Arc::new(AtomicU64::new(0)), write_errors: Arc::new(AtomicU64::new(0)), dropped: Arc::new(AtomicU64::new(0)) };
    let (written, errors) = (counters.written.clone(), counters.write_errors.clone());
    std::thread::Builder::new().name("xlb-flowlog".into()).spawn(move || {
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(ev) => log.record(&ev),
                Err(mpsc::RecvTimeoutError::Timeout) => log.flush(),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    log.flush();
                    return;
                }
            }
            written.store(log.written, Ordering::Relaxed);
            errors.store(log.write_errors, Ordering::Relaxed);
        }
    })?;
    Ok((Sender { tx, dropped: counters.dropped.clone() }, counters))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::maps::{FlowState, PROTO_TCP, addr_v4};

    fn ev(port: u16) -> FlowEnd {
        FlowEnd {
            key: FlowKey::new(addr_v4(0x0200000a), addr_v4(0x0100630a), port.to_be(), 80u16.to_be(), PROTO_TCP),
            reason: end_reason::IDLE,
            backend_port: 8080u16.to_be(),
            _pad: 0,
            backend: addr_v4(0x0201010a),
            snat: [0; 4],
            state: FlowState { packets_orig: 3, bytes_orig: 180, packets_reply: 2, bytes_reply: 120, created: 1000, ..Default::default() },
        }
    }

    #[test]
    fn records_are_json_lines_and_sampling_is_deterministic() {
        let mut all = FlowLog::to_writer(Box::new(std::io::sink()), 1);
        let mut quarter = FlowLog::to_writer(Box::new(std::io::sink()), 4);
        let mut again = FlowLog::to_writer(Box::new(std::io::sink()), 4);
        for p in 0..4000 {
            all.record(&ev(10_000 + p));
            quarter.record(&ev(10_000 + p));
            again.record(&ev(10_000 + p));
        }
        assert_eq!(all.written, 4000);
        assert!((800..1200).contains(&quarter.written), "{}", quarter.written);
        assert_eq!(quarter.written, again.written, "the same flows are sampled every time");
        // The line itself.
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        struct W(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        // The flow was created 1.5 s before the clock reading (1000 Hz).
        let mut one = FlowLog::to_writer(Box::new(W(buf.clone())), 1).with_clock(Box::new(|| Some((2500, 1000))));
        one.record(&ev(40000));
        one.flush();
        let text = String::from_utf8(buf.lock().expect("lock").clone()).expect("utf8");
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).expect("one JSON line");
        assert_eq!(v["client"], "10.0.0.2:40000");
        assert_eq!(v["vip"], "10.99.0.1:80");
        assert_eq!(v["backend"], "10.1.1.2:8080");
        assert!(v.get("snat").is_none(), "DNAT records name no balancer source");
        assert_eq!((v["packets_in"].as_u64(), v["bytes_in"].as_u64(), v["bytes_out"].as_u64()), (Some(3), Some(180), Some(120)));
        assert_eq!(v["reason"], "idle");
        assert!((v["duration_s"].as_f64().unwrap_or(0.0) - 1.5).abs() < 1e-9, "{v}");
        assert!(text.ends_with('\n'));
    }
}
