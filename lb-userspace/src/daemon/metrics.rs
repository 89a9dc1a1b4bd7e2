//! Prometheus metrics of the controller's view (`--metrics-addr`): per
//! service and backend traffic, flows and state, resets by cause, the data
//! plane's reason counters, and the connection table. Exposed in the
//! OpenMetrics text format through `prometheus-client`.
//!
//! Every value is an absolute figure read from the data plane (or the
//! controller) at scrape time, so nothing here keeps metric state between
//! scrapes: each scrape hands one status report to a collector that
//! encodes it as const metrics.

use std::{fmt, net::SocketAddr, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{TypedMetric, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::sync::Mutex;

use crate::{
    api::{ServiceStatus, Status},
    controller::Controller,
};

/// The OpenMetrics text format's content type, as `prometheus-client`
/// documents it (Prometheus asks for it and accepts it).
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds the metrics address (at start, so a bad address fails the daemon).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context as _;
    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the metrics address {addr}"))
}

/// Serves `GET /metrics` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, ctl: Arc<Mutex<Controller>>) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let addr = listener.local_addr().context("metrics address")?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let ctl = ctl.clone();
            async move {
                let status = ctl.lock().await.status();
                match status {
                    Ok(s) => (axum::http::StatusCode::OK, [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], render(&s)),
                    Err(e) => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        [(axum::http::header::CONTENT_TYPE, "text/plain")],
                        format!("reading the data plane failed: {e}\n"),
                    ),
                }
            }
        }),
    );
    tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    axum::serve(listener, app).await.context("serving metrics")
}

/// Resets by cause: the controller's, and the data plane's reactive ones.
fn by_cause(r: &crate::controller::ResetCounts, t: &crate::api::Traffic) -> [(&'static str, u64); 5] {
    [
        ("removed", r.removed),
        ("unhealthy", r.unhealthy),
        ("drain_deadline", r.drain_deadline),
        ("idle", r.idle),
        ("reactive", t.reactive_resets),
    ]
}

/// A sample's labels, in the order they are written (the encoder escapes
/// the values).
type Labels = Vec<(&'static str, String)>;

/// `labels` and one more.
fn with(labels: &Labels, key: &'static str, value: impl Into<String>) -> Labels {
    let mut l = labels.clone();
    l.push((key, value.into()));
    l
}

/// One metric family: its HELP and TYPE, then a sample per label set. A
/// counter's name is given without `_total`: the encoder appends it to the
/// samples (and names the family without it, as OpenMetrics does).
fn family<M: EncodeMetric + TypedMetric>(enc: &mut DescriptorEncoder, name: &str, help: &str, samples: Vec<(Labels, M)>) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, M::TYPE)?;
    for (labels, metric) in &samples {
        metric.encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn gauge(v: u64) -> ConstGauge<u64> {
    ConstGauge::new(v)
}

/// One scrape's status report. The registry wants a `'static` collector,
/// so it owns its copy.
#[derive(Debug)]
struct Snapshot(Status);

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        encode(&self.0, &mut enc)
    }
}

/// Renders a status report in the OpenMetrics text format (ending with
/// `# EOF`).
pub fn render(s: &Status) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot(s.clone())));
    let mut text = String::new();
    // Writing to a String does not fail, nor does encoding these labels
    // and values; were it to, the text lacks its `# EOF` and Prometheus
    // refuses the scrape instead of taking part of it.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        tracing::error!(%e, "encoding the metrics failed");
    }
    text
}

/// Every family of a status report, in a fixed order.
fn encode(s: &Status, enc: &mut DescriptorEncoder) -> fmt::Result {
    let svc_labels = |svc: &ServiceStatus| -> Labels { vec![("service", svc.service.to_string()), ("proto", svc.proto.to_string())] };
    let mut packets = Vec::new();
    let mut bytes = Vec::new();
    let mut new_flows = Vec::new();
    let mut active = Vec::new();
    let mut state = Vec::new();
    let mut weight = Vec::new();
    let mut resets = Vec::new();
    let mut backend_resets = Vec::new();
    let mut svc_packets = Vec::new();
    let mut svc_bytes = Vec::new();
    let mut no_port = Vec::new();
    let mut ports_in_use = Vec::new();
    let mut ports_pool = Vec::new();
    for svc in &s.services {
        let sl = svc_labels(svc);
        for (dir, p, b) in [("in", svc.traffic.packets_in, svc.traffic.bytes_in), ("out", svc.traffic.packets_out, svc.traffic.bytes_out)] {
            svc_packets.push((with(&sl, "direction", dir), counter(p)));
            svc_bytes.push((with(&sl, "direction", dir), counter(b)));
        }
        for (cause, n) in by_cause(&svc.resets, &svc.traffic) {
            resets.push((with(&sl, "cause", cause), counter(n)));
        }
        for b in &svc.backends {
            let bl = with(&sl, "backend", b.backend.to_string());
            for (dir, p, by) in [("in", b.traffic.packets_in, b.traffic.bytes_in), ("out", b.traffic.packets_out, b.traffic.bytes_out)] {
                packets.push((with(&bl, "direction", dir), counter(p)));
                bytes.push((with(&bl, "direction", dir), counter(by)));
            }
            new_flows.push((bl.clone(), counter(b.traffic.new_flows)));
            for (cause, n) in by_cause(&b.resets, &b.traffic) {
                backend_resets.push((with(&bl, "cause", cause), counter(n)));
            }
            active.push((bl.clone(), gauge(b.active_flows)));
            no_port.push((bl.clone(), counter(b.traffic.refused_no_port)));
            if let Some(p) = b.snat_ports {
                ports_in_use.push((bl.clone(), gauge(p.in_use)));
                ports_pool.push((bl.clone(), gauge(p.pool)));
            }
            weight.push((bl.clone(), gauge(b.weight.into())));
            for st in ["up", "down", "draining", "removed"] {
                state.push((with(&bl, "state", st), gauge((b.state == st).into())));
            }
        }
    }
    family(enc, "xlb_backend_packets", "Packets forwarded to (in) and from (out) a backend.", packets)?;
    family(enc, "xlb_backend_bytes", "IP bytes forwarded to (in) and from (out) a backend.", bytes)?;
    family(enc, "xlb_backend_new_flows", "Flows scheduled to a backend.", new_flows)?;
    family(enc, "xlb_backend_active_flows", "Flows of a backend in the table that neither side has closed.", active)?;
    family(enc, "xlb_backend_weight", "Configured weight of a backend.", weight)?;
    family(enc, "xlb_backend_state", "1 for the backend's current state (up, down, draining, removed).", state)?;
    family(enc, "xlb_service_packets", "Packets of a service, client to backend (in) and back (out).", svc_packets)?;
    family(enc, "xlb_service_bytes", "IP bytes of a service, client to backend (in) and back (out).", svc_bytes)?;
    family(enc, "xlb_resets", "Flows reset, by cause (reactive: by the data plane on a packet of a gone backend's flow).", resets)?;
    family(enc, "xlb_backend_resets", "A backend's flows reset, by cause.", backend_resets)?;
    family(enc, "xlb_backend_snat_ports_in_use", "Full NAT: source ports held by a backend's flows.", ports_in_use)?;
    family(enc, "xlb_backend_snat_ports_pool", "Full NAT: size of a backend's source port pool.", ports_pool)?;
    family(enc, "xlb_backend_refused_no_port", "Full NAT: new flows to a backend refused because its source port pool was exhausted.", no_port)?;
    let mut reasons = Vec::new();
    let mut other = Vec::new();
    for (k, v) in &s.counters {
        if k.starts_with("pass_") || k.starts_with("drop_") {
            reasons.push((vec![("reason", k.clone())], counter(*v)));
        } else {
            other.push((k, *v));
        }
    }
    family(enc, "xlb_dataplane_verdicts", "Packets the program passed to the kernel or dropped, by reason.", reasons)?;
    for (k, v) in other {
        family(enc, &format!("xlb_dataplane_{k}"), &format!("Data-plane counter {k} (see docs/architecture.md)."), vec![(Vec::new(), counter(v))])?;
    }
    if let Some(y) = &s.sync {
        family(enc, "xlb_sync_lag_seconds", "State sync: send-to-apply delay of the last datagram from the peer (wall clocks).", vec![(Vec::new(), ConstGauge::new(y.lag_s))])?;
        let role = ["master", "backup"].map(|r| (vec![("role", r.to_owned())], gauge((y.role.to_string() == r).into())));
        family(enc, "xlb_sync_role", "State sync: 1 for this node's role.", role.into())?;
        let events = |e: &[(&str, u64)]| -> Vec<(Labels, ConstCounter<u64>)> { e.iter().map(|(e, n)| (vec![("event", (*e).to_owned())], counter(*n))).collect() };
        family(
            enc,
            "xlb_sync_datagrams",
            "State sync datagrams, by what happened to them.",
            events(&[
                ("sent", y.sent_datagrams),
                ("received", y.received_datagrams),
                ("refused", y.refused_datagrams),
                ("ignored_as_master", y.ignored_as_master),
            ]),
        )?;
        family(
            enc,
            "xlb_sync_records",
            "State sync flow records, by what happened to them.",
            events(&[
                ("sent", y.sent_records),
                ("applied", y.applied_records),
                ("unknown_service_or_backend", y.unknown_records),
                ("stale", y.stale_ignored),
            ]),
        )?;
        family(enc, "xlb_sync_sequence_gaps", "State sync datagrams the peer sent that never arrived (healed by its refreshes).", vec![(Vec::new(), counter(y.sequence_gaps))])?;
    }
    let tables = |established: u64, half_open: u64| vec![(vec![("table", "established".to_owned())], gauge(established)), (vec![("table", "half_open".to_owned())], gauge(half_open))];
    family(enc, "xlb_table_entries", "Entries in the flow tables (two per flow).", tables(s.table.entries, s.table.half_open_entries))?;
    family(
        enc,
        "xlb_table_capacity_flows",
        "Flows each table holds before the least recently used are recycled.",
        tables(s.table.capacity_flows, s.table.half_open_capacity_flows),
    )?;
    Ok(())
}
