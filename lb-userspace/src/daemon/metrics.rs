//! Prometheus text exposition of the controller's view (`--metrics-addr`):
//! per service and backend traffic, flows and state, resets by cause, the
//! data plane's reason counters, and the connection table.

use std::{fmt::Write as _, net::SocketAddr, sync::Arc};

use tokio::sync::Mutex;

use crate::{api::Status, controller::Controller};

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
                    Ok(s) => (
                        axum::http::StatusCode::OK,
                        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        render(&s),
                    ),
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

/// Label values are addresses and fixed words; escape anyway.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
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

/// Renders a status report in the Prometheus text format.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(o, "# HELP {name} {help}");
        let _ = writeln!(o, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            if labels.is_empty() {
                let _ = writeln!(o, "{name} {v}");
            } else {
                let _ = writeln!(o, "{name}{{{labels}}} {v}");
            }
        }
    };
    let svc_labels = |svc: &crate::api::ServiceStatus| format!("service=\"{}\",proto=\"{}\"", esc(&svc.service.to_string()), svc.proto);
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
            svc_packets.push((format!("{sl},direction=\"{dir}\""), p as f64));
            svc_bytes.push((format!("{sl},direction=\"{dir}\""), b as f64));
        }
        for (cause, n) in by_cause(&svc.resets, &svc.traffic) {
            resets.push((format!("{sl},cause=\"{cause}\""), n as f64));
        }
        for b in &svc.backends {
            let bl = format!("{sl},backend=\"{}\"", esc(&b.backend.to_string()));
            for (dir, p, by) in [("in", b.traffic.packets_in, b.traffic.bytes_in), ("out", b.traffic.packets_out, b.traffic.bytes_out)] {
                packets.push((format!("{bl},direction=\"{dir}\""), p as f64));
                bytes.push((format!("{bl},direction=\"{dir}\""), by as f64));
            }
            new_flows.push((bl.clone(), b.traffic.new_flows as f64));
            for (cause, n) in by_cause(&b.resets, &b.traffic) {
                backend_resets.push((format!("{bl},cause=\"{cause}\""), n as f64));
            }
            active.push((bl.clone(), b.active_flows as f64));
            no_port.push((bl.clone(), b.traffic.refused_no_port as f64));
            if let Some(p) = b.snat_ports {
                ports_in_use.push((bl.clone(), p.in_use as f64));
                ports_pool.push((bl.clone(), p.pool as f64));
            }
            weight.push((bl.clone(), b.weight as f64));
            for st in ["up", "down", "draining", "removed"] {
                state.push((format!("{bl},state=\"{st}\""), if b.state == st { 1.0 } else { 0.0 }));
            }
        }
    }
    family("xlb_backend_packets_total", "counter", "Packets forwarded to (in) and from (out) a backend.", packets);
    family("xlb_backend_bytes_total", "counter", "IP bytes forwarded to (in) and from (out) a backend.", bytes);
    family("xlb_backend_new_flows_total", "counter", "Flows scheduled to a backend.", new_flows);
    family("xlb_backend_active_flows", "gauge", "Flows of a backend in the table that neither side has closed.", active);
    family("xlb_backend_weight", "gauge", "Configured weight of a backend.", weight);
    family("xlb_backend_state", "gauge", "1 for the backend's current state (up, down, draining, removed).", state);
    family("xlb_service_packets_total", "counter", "Packets of a service, client to backend (in) and back (out).", svc_packets);
    family("xlb_service_bytes_total", "counter", "IP bytes of a service, client to backend (in) and back (out).", svc_bytes);
    family("xlb_resets_total", "counter", "Flows reset, by cause (reactive: by the data plane on a packet of a gone backend's flow).", resets);
    family("xlb_backend_resets_total", "counter", "A backend's flows reset, by cause.", backend_resets);
    family("xlb_backend_snat_ports_in_use", "gauge", "Full NAT: source ports held by a backend's flows.", ports_in_use);
    family("xlb_backend_snat_ports_pool", "gauge", "Full NAT: size of a backend's source port pool.", ports_pool);
    family("xlb_backend_refused_no_port_total", "counter", "Full NAT: new flows to a backend refused because its source port pool was exhausted.", no_port);
    let mut reasons = Vec::new();
    let mut other = Vec::new();
    for (k, v) in &s.counters {
        if let Some(r) = k.strip_prefix("pass_").map(|r| format!("pass_{r}")).or_else(|| k.strip_prefix("drop_").map(|r| format!("drop_{r}"))) {
            reasons.push((format!("reason=\"{}\"", esc(&r)), *v as f64));
        } else {
            other.push((k.clone(), *v));
        }
    }
    family("xlb_dataplane_verdicts_total", "counter", "Packets the program passed to the kernel or dropped, by reason.", reasons);
    for (k, v) in other {
        let name = format!("xlb_dataplane_{k}_total");
        family(&name, "counter", &format!("Data-plane counter {k} (see docs/architecture.md)."), vec![(String::new(), v as f64)]);
    }
    if let Some(y) = &s.sync {
        family("xlb_sync_lag_seconds", "gauge", "State sync: send-to-apply delay of the last datagram from the peer (wall clocks).", vec![(String::new(), y.lag_s)]);
        family(
            "xlb_sync_role",
            "gauge",
            "State sync: 1 for this node's role.",
            ["master", "backup"].iter().map(|r| (format!("role=\"{r}\""), if y.role.to_string() == *r { 1.0 } else { 0.0 })).collect(),
        );
        family(
            "xlb_sync_datagrams_total",
            "counter",
            "State sync datagrams, by what happened to them.",
            vec![
                ("event=\"sent\"".into(), y.sent_datagrams as f64),
                ("event=\"received\"".into(), y.received_datagrams as f64),
                ("event=\"refused\"".into(), y.refused_datagrams as f64),
                ("event=\"replayed\"".into(), y.replayed_datagrams as f64),
                ("event=\"old_epoch\"".into(), y.old_epoch_datagrams as f64),
                ("event=\"stale_send_time\"".into(), y.stale_datagrams as f64),
                ("event=\"ignored_as_master\"".into(), y.ignored_as_master as f64),
            ],
        );
        family(
            "xlb_sync_records_total",
            "counter",
            "State sync flow records, by what happened to them.",
            vec![
                ("event=\"sent\"".into(), y.sent_records as f64),
                ("event=\"dropped_queue_full\"".into(), y.dropped_records as f64),
                ("event=\"applied\"".into(), y.applied_records as f64),
                ("event=\"unknown_service_or_backend\"".into(), y.unknown_records as f64),
                ("event=\"stale\"".into(), y.stale_ignored as f64),
            ],
        );
        family("xlb_sync_sequence_gaps_total", "counter", "State sync datagrams the peer sent that never arrived (healed by its refreshes).", vec![(String::new(), y.sequence_gaps as f64)]);
        family("xlb_sync_peer_restarts_total", "counter", "Times the sync peer's epoch grew (its daemon restarted).", vec![(String::new(), y.peer_restarts as f64)]);
    }
    family(
        "xlb_table_entries",
        "gauge",
        "Entries in the flow tables (two per flow).",
        vec![("table=\"established\"".into(), s.table.entries as f64), ("table=\"half_open\"".into(), s.table.half_open_entries as f64)],
    );
    family(
        "xlb_table_capacity_flows",
        "gauge",
        "Flows each table holds before the least recently used are recycled.",
        vec![
            ("table=\"established\"".into(), s.table.capacity_flows as f64),
            ("table=\"half_open\"".into(), s.table.half_open_capacity_flows as f64),
        ],
    );
    o
}
