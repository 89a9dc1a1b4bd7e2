//! Prometheus metrics of the controller's view (`--metrics-addr`): per
//! service and backend traffic, flows and state, resets by cause, the data
//! plane's reason counters, and the connection table. Exposed in the
//! OpenMetrics text format through `prometheus-client`.
//!
//! Every value is an absolute figure read from the data plane (or the
//! controller) at scrape time, so nothing here keeps metric state between
//! scrapes: each scrape hands one status report to a collector that
//! encodes it as const metrics.

use std::{fmt, net::SocketAddr};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{TypedMetric, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use super::actor::Handle;
use crate::api::{ServiceStatus, Status};

/// The OpenMetrics text format's content type, as `prometheus-client`
/// documents it (Prometheus asks for it and accepts it).
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds the metrics address (at start, so a bad address fails the daemon).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context as _;
    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the metrics address {addr}"))
}

/// Serves `GET /metrics` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, ctl: Handle) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let addr = listener.local_addr().context("metrics address")?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let ctl = ctl.clone();
            async move {
                let status = ctl.call(|c| c.status()).await;
                match status {
                    None => {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, [(axum::http::header::CONTENT_TYPE, "text/plain")], "the daemon is stopping\n".to_owned())
                    }
                    Some(Ok(s)) => (axum::http::StatusCode::OK, [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], render(&s)),
                    Some(Err(e)) => (
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
fn by_cause(r: &crate::model::ResetCounts, t: &crate::api::Traffic) -> [(&'static str, u64); 5] {
    [("removed", r.removed), ("unhealthy", r.unhealthy), ("drain_deadline", r.drain_deadline), ("idle", r.idle), ("reactive", t.reactive_resets)]
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
    let icmp: Vec<_> = s
        .icmp_errors
        .iter()
        .flat_map(|(kind, outcomes)| outcomes.iter().map(move |(o, n)| (vec![("kind", kind.clone()), ("outcome", o.clone())], counter(*n))))
        .collect();
    family(
        enc,
        "xlb_icmp_errors",
        "ICMP/ICMPv6 errors about flows, by kind and what became of them (translated to the backend or client, passed, dropped).",
        icmp,
    )?;
    for (k, v) in other {
        family(enc, &format!("xlb_dataplane_{k}"), &format!("Data-plane counter {k} (see docs/architecture.md)."), vec![(Vec::new(), counter(v))])?;
    }
    if let Some(y) = &s.sync {
        family(
            enc,
            "xlb_sync_lag_seconds",
            "State sync: send-to-apply delay of the last datagram from the peer (wall clocks).",
            vec![(Vec::new(), ConstGauge::new(y.lag_s))],
        )?;
        let role = ["master", "backup"].map(|r| (vec![("role", r.to_owned())], gauge((y.role.to_string() == r).into())));
        family(enc, "xlb_sync_role", "State sync: 1 for this node's role.", role.into())?;
        let events =
            |e: &[(&str, u64)]| -> Vec<(Labels, ConstCounter<u64>)> { e.iter().map(|(e, n)| (vec![("event", (*e).to_owned())], counter(*n))).collect() };
        family(
            enc,
            "xlb_sync_datagrams",
            "State sync datagrams, by what happened to them.",
            events(&[
                ("sent", y.sent_datagrams),
                ("received", y.received_datagrams),
                ("refused", y.refused_datagrams),
                ("replayed", y.replayed_datagrams),
                ("old_epoch", y.old_epoch_datagrams),
                ("stale_send_time", y.stale_datagrams),
                ("ignored_as_master", y.ignored_as_master),
            ]),
        )?;
        family(
            enc,
            "xlb_sync_records",
            "State sync flow records, by what happened to them.",
            events(&[
                ("sent", y.sent_records),
                ("dropped_queue_full", y.dropped_records),
                ("applied", y.applied_records),
                ("unknown_service_or_backend", y.unknown_records),
                ("stale", y.stale_ignored),
            ]),
        )?;
        family(
            enc,
            "xlb_sync_sequence_gaps",
            "State sync datagrams the peer sent that never arrived (healed by its refreshes).",
            vec![(Vec::new(), counter(y.sequence_gaps))],
        )?;
        family(enc, "xlb_sync_peer_restarts", "Times the sync peer's epoch grew (its daemon restarted).", vec![(Vec::new(), counter(y.peer_restarts))])?;
    }
    let tables = |established: u64, half_open: u64| {
        vec![(vec![("table", "established".to_owned())], gauge(established)), (vec![("table", "half_open".to_owned())], gauge(half_open))]
    };
    family(enc, "xlb_table_entries", "Entries in the flow tables (two per flow).", tables(s.table.entries, s.table.half_open_entries))?;
    family(
        enc,
        "xlb_table_capacity_flows",
        "Flows each table holds before the least recently used are recycled.",
        tables(s.table.capacity_flows, s.table.half_open_capacity_flows),
    )?;
    if let Some(age) = s.table.snapshot_age_s {
        family(
            enc,
            "xlb_table_snapshot_age_seconds",
            "Age of the table figures (flows per backend, table entries): they come from the latest walk of the table.",
            vec![(Vec::new(), ConstGauge::new(age))],
        )?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::{BTreeMap, HashSet};

    use super::*;
    use crate::{
        api::{BackendStatus, PortUse, Proto, TableStatus, Traffic},
        ha::{Role, SyncStatus},
        model::ResetCounts,
        model::settings::{NatMode, ServiceSettings},
    };

    fn traffic(packets_in: u64, packets_out: u64) -> Traffic {
        Traffic { packets_in, bytes_in: packets_in * 60, packets_out, bytes_out: packets_out * 63, new_flows: 4, reactive_resets: 2, refused_no_port: 0 }
    }

    fn backend(addr: &str, state: &str, weight: u32, traffic: Traffic, snat_ports: Option<PortUse>) -> BackendStatus {
        BackendStatus {
            backend: addr.parse().expect("addr"),
            id: 1,
            weight,
            state: state.into(),
            registered: state != "removed",
            healthy: state == "up",
            last_health_error: None,
            resets: ResetCounts { removed: 1, unhealthy: 2, drain_deadline: 3, idle: 4, expired: 9 },
            drain_remaining_s: None,
            snat_ports,
            active_flows: 3,
            traffic,
        }
    }

    /// One full-NAT service with two backends: one holding source ports
    /// (and having refused flows), one draining without a port report.
    pub(crate) fn status(sync: bool) -> Status {
        let b0 = Traffic { refused_no_port: 5, ..traffic(10, 8) };
        let svc = ServiceStatus {
            service: "10.99.0.1:80".parse().expect("addr"),
            proto: Proto::Tcp,
            id: 1,
            scheduler: "wrr".into(),
            settings: ServiceSettings { mode: NatMode::Fullnat, ..Default::default() },
            active_flows: 6,
            resets: ResetCounts { removed: 7, ..Default::default() },
            traffic: Traffic { reactive_resets: 11, ..traffic(30, 20) },
            backends: vec![
                backend("10.1.1.2:8080", "up", 3, b0, Some(PortUse { in_use: 17, pool: 64 })),
                backend("[fd00::2]:8080", "draining", 1, traffic(20, 12), None),
            ],
            named_backends: Vec::new(),
        };
        let counters: BTreeMap<String, u64> = [("rx", 1000), ("tx", 900), ("pass_not_service", 40), ("drop_malformed", 2), ("entries_created", 12)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        Status {
            interfaces: Vec::new(),
            table: TableStatus { entries: 12, capacity_flows: 65536, half_open_entries: 2, half_open_capacity_flows: 8192, snapshot_age_s: Some(0.5) },
            counters,
            icmp_errors: [("too_big".to_owned(), [("to_backend".to_owned(), 4), ("dropped_bad_quote".to_owned(), 1)].into_iter().collect())]
                .into_iter()
                .collect(),
            services: vec![svc],
            sync: sync.then(|| SyncStatus {
                role: Role::Master,
                peer: "10.0.0.2:7000".into(),
                sent_datagrams: 100,
                sent_records: 250,
                received_datagrams: 3,
                refused_datagrams: 1,
                ignored_as_master: 3,
                applied_records: 0,
                unknown_records: 4,
                sequence_gaps: 6,
                stale_ignored: 8,
                lag_s: 0.25,
                dropped_records: 9,
                replayed_datagrams: 2,
                peer_restarts: 1,
                ..Default::default()
            }),
        }
    }

    fn assert_lines(text: &str, lines: &[&str]) {
        let have: HashSet<&str> = text.lines().collect();
        for l in lines {
            assert!(have.contains(l), "missing line {l:?} in:\n{text}");
        }
    }

    /// A label set `{k="v",...}` as OpenMetrics writes it (values escaped).
    fn parse_labels(s: &str) -> Result<Vec<(String, String)>, String> {
        let mut out = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            let (key, after) = rest.split_once("=\"").ok_or(format!("no =\" in {rest:?}"))?;
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || key.starts_with(|c: char| c.is_ascii_digit()) {
                return Err(format!("bad label name {key:?}"));
            }
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => return Err(format!("bad escape {other:?} in {s:?}")),
                    },
                    Some((i, '"')) => break i,
                    Some((_, '\n')) => return Err(format!("raw newline in {s:?}")),
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("unterminated value in {s:?}")),
                }
            };
            out.push((key.to_owned(), value));
            rest = &after[end + 1..];
            if let Some(r) = rest.strip_prefix(',') {
                rest = r;
            } else if !rest.is_empty() {
                return Err(format!("junk after a label: {rest:?}"));
            }
        }
        Ok(out)
    }

    /// (sample name, labels) -> value.
    type Samples = BTreeMap<(String, Vec<(String, String)>), f64>;

    fn is_metric_name(n: &str) -> bool {
        !n.is_empty() && !n.starts_with(|c: char| c.is_ascii_digit()) && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    /// Checks the OpenMetrics text framing: one `# EOF` at the end; each
    /// family once, HELP then TYPE; each sample `name{labels} value` of
    /// the family above it (a counter's with `_total`), its label set not
    /// repeated.
    fn parse_openmetrics(text: &str) -> Result<Samples, String> {
        let body = text.strip_suffix("# EOF\n").ok_or("does not end with # EOF")?;
        let mut families = HashSet::new();
        let mut current: Option<(String, String)> = None; // (family, type)
        let mut help: Option<String> = None;
        let mut samples = BTreeMap::new();
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, _) = rest.split_once(' ').ok_or(format!("HELP without text: {line:?}"))?;
                help = Some(name.to_owned());
                current = None;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or(format!("bad TYPE: {line:?}"))?;
                if help.as_deref() != Some(name) {
                    return Err(format!("TYPE {name} not after its HELP"));
                }
                if !is_metric_name(name) || !["counter", "gauge"].contains(&kind) {
                    return Err(format!("bad TYPE: {line:?}"));
                }
                if !families.insert(name.to_owned()) {
                    return Err(format!("family {name} twice"));
                }
                current = Some((name.to_owned(), kind.to_owned()));
            } else if line.starts_with('#') {
                return Err(format!("unexpected comment {line:?}"));
            } else {
                let (series, value) = line.rsplit_once(' ').ok_or(format!("no value: {line:?}"))?;
                let value: f64 = value.parse().map_err(|e| format!("{line:?}: {e}"))?;
                let (name, labels) = match series.split_once('{') {
                    Some((n, l)) => (n, parse_labels(l.strip_suffix('}').ok_or(format!("unclosed labels: {line:?}"))?)?),
                    None => (series, Vec::new()),
                };
                let (family, kind) = current.as_ref().ok_or(format!("sample before any TYPE: {line:?}"))?;
                let want = if kind == "counter" { format!("{family}_total") } else { family.clone() };
                if name != want {
                    return Err(format!("sample {name} in family {family} ({kind})"));
                }
                if samples.insert((name.to_owned(), labels), value).is_some() {
                    return Err(format!("repeated series {series}"));
                }
            }
        }
        Ok(samples)
    }

    #[test]
    fn renders_every_family_with_its_help_type_labels_and_values() {
        let text = render(&status(true));
        let bl = |b: &str| format!("service=\"10.99.0.1:80\",proto=\"tcp\",backend=\"{b}\"");
        let (b0, b1) = (bl("10.1.1.2:8080"), bl("[fd00::2]:8080"));
        let lines = [
            "# HELP xlb_backend_packets Packets forwarded to (in) and from (out) a backend.".to_owned(),
            "# TYPE xlb_backend_packets counter".to_owned(),
            format!("xlb_backend_packets_total{{{b0},direction=\"in\"}} 10"),
            format!("xlb_backend_packets_total{{{b0},direction=\"out\"}} 8"),
            format!("xlb_backend_packets_total{{{b1},direction=\"in\"}} 20"),
            "# TYPE xlb_backend_bytes counter".to_owned(),
            format!("xlb_backend_bytes_total{{{b0},direction=\"in\"}} 600"),
            format!("xlb_backend_bytes_total{{{b1},direction=\"out\"}} 756"),
            "# TYPE xlb_backend_new_flows counter".to_owned(),
            format!("xlb_backend_new_flows_total{{{b0}}} 4"),
            "# HELP xlb_backend_active_flows Flows of a backend in the table that neither side has closed.".to_owned(),
            "# TYPE xlb_backend_active_flows gauge".to_owned(),
            format!("xlb_backend_active_flows{{{b1}}} 3"),
            "# TYPE xlb_backend_weight gauge".to_owned(),
            format!("xlb_backend_weight{{{b0}}} 3"),
            format!("xlb_backend_weight{{{b1}}} 1"),
            "# TYPE xlb_backend_state gauge".to_owned(),
            format!("xlb_backend_state{{{b0},state=\"up\"}} 1"),
            format!("xlb_backend_state{{{b0},state=\"draining\"}} 0"),
            format!("xlb_backend_state{{{b1},state=\"draining\"}} 1"),
            format!("xlb_backend_state{{{b1},state=\"removed\"}} 0"),
            "# TYPE xlb_service_packets counter".to_owned(),
            "xlb_service_packets_total{service=\"10.99.0.1:80\",proto=\"tcp\",direction=\"in\"} 30".to_owned(),
            "xlb_service_packets_total{service=\"10.99.0.1:80\",proto=\"tcp\",direction=\"out\"} 20".to_owned(),
            "# TYPE xlb_service_bytes counter".to_owned(),
            "xlb_service_bytes_total{service=\"10.99.0.1:80\",proto=\"tcp\",direction=\"in\"} 1800".to_owned(),
            "# HELP xlb_resets Flows reset, by cause (reactive: by the data plane on a packet of a gone backend's flow).".to_owned(),
            "# TYPE xlb_resets counter".to_owned(),
            "xlb_resets_total{service=\"10.99.0.1:80\",proto=\"tcp\",cause=\"removed\"} 7".to_owned(),
            "xlb_resets_total{service=\"10.99.0.1:80\",proto=\"tcp\",cause=\"reactive\"} 11".to_owned(),
            "xlb_resets_total{service=\"10.99.0.1:80\",proto=\"tcp\",cause=\"idle\"} 0".to_owned(),
            "# TYPE xlb_backend_resets counter".to_owned(),
            format!("xlb_backend_resets_total{{{b0},cause=\"drain_deadline\"}} 3"),
            format!("xlb_backend_resets_total{{{b1},cause=\"reactive\"}} 2"),
            "# TYPE xlb_backend_snat_ports_in_use gauge".to_owned(),
            format!("xlb_backend_snat_ports_in_use{{{b0}}} 17"),
            "# TYPE xlb_backend_snat_ports_pool gauge".to_owned(),
            format!("xlb_backend_snat_ports_pool{{{b0}}} 64"),
            "# TYPE xlb_backend_refused_no_port counter".to_owned(),
            format!("xlb_backend_refused_no_port_total{{{b0}}} 5"),
            format!("xlb_backend_refused_no_port_total{{{b1}}} 0"),
            "# HELP xlb_dataplane_verdicts Packets the program passed to the kernel or dropped, by reason.".to_owned(),
            "# TYPE xlb_dataplane_verdicts counter".to_owned(),
            "xlb_dataplane_verdicts_total{reason=\"pass_not_service\"} 40".to_owned(),
            "xlb_dataplane_verdicts_total{reason=\"drop_malformed\"} 2".to_owned(),
            "# TYPE xlb_icmp_errors counter".to_owned(),
            "xlb_icmp_errors_total{kind=\"too_big\",outcome=\"dropped_bad_quote\"} 1".to_owned(),
            "xlb_icmp_errors_total{kind=\"too_big\",outcome=\"to_backend\"} 4".to_owned(),
            "# HELP xlb_dataplane_rx Data-plane counter rx (see docs/architecture.md).".to_owned(),
            "# TYPE xlb_dataplane_rx counter".to_owned(),
            "xlb_dataplane_rx_total 1000".to_owned(),
            "xlb_dataplane_tx_total 900".to_owned(),
            "xlb_dataplane_entries_created_total 12".to_owned(),
            "# HELP xlb_sync_lag_seconds State sync: send-to-apply delay of the last datagram from the peer (wall clocks).".to_owned(),
            "# TYPE xlb_sync_lag_seconds gauge".to_owned(),
            "xlb_sync_lag_seconds 0.25".to_owned(),
            "# TYPE xlb_sync_role gauge".to_owned(),
            "xlb_sync_role{role=\"master\"} 1".to_owned(),
            "xlb_sync_role{role=\"backup\"} 0".to_owned(),
            "# TYPE xlb_sync_datagrams counter".to_owned(),
            "xlb_sync_datagrams_total{event=\"sent\"} 100".to_owned(),
            "xlb_sync_datagrams_total{event=\"ignored_as_master\"} 3".to_owned(),
            "xlb_sync_datagrams_total{event=\"replayed\"} 2".to_owned(),
            "xlb_sync_records_total{event=\"dropped_queue_full\"} 9".to_owned(),
            "xlb_sync_peer_restarts_total 1".to_owned(),
            "# TYPE xlb_sync_records counter".to_owned(),
            "xlb_sync_records_total{event=\"unknown_service_or_backend\"} 4".to_owned(),
            "xlb_sync_records_total{event=\"stale\"} 8".to_owned(),
            "# TYPE xlb_sync_sequence_gaps counter".to_owned(),
            "xlb_sync_sequence_gaps_total 6".to_owned(),
            "# HELP xlb_table_entries Entries in the flow tables (two per flow).".to_owned(),
            "# TYPE xlb_table_entries gauge".to_owned(),
            "xlb_table_entries{table=\"established\"} 12".to_owned(),
            "xlb_table_entries{table=\"half_open\"} 2".to_owned(),
            "# TYPE xlb_table_capacity_flows gauge".to_owned(),
            "xlb_table_capacity_flows{table=\"established\"} 65536".to_owned(),
            "xlb_table_capacity_flows{table=\"half_open\"} 8192".to_owned(),
            "# TYPE xlb_table_snapshot_age_seconds gauge".to_owned(),
            "xlb_table_snapshot_age_seconds 0.5".to_owned(),
        ];
        assert_lines(&text, &lines.iter().map(String::as_str).collect::<Vec<_>>());
        // Only the backend that reports its ports has port gauges.
        assert!(!text.contains(&format!("xlb_backend_snat_ports_in_use{{{b1}}}")), "{text}");
        assert!(text.ends_with("\n# EOF\n"), "{text}");
    }

    #[test]
    fn the_sample_names_are_those_of_the_text_format_before() {
        let samples = parse_openmetrics(&render(&status(true))).expect("OpenMetrics");
        let names: HashSet<&str> = samples.keys().map(|(n, _)| n.as_str()).collect();
        let want: HashSet<&str> = [
            "xlb_backend_packets_total",
            "xlb_backend_bytes_total",
            "xlb_backend_new_flows_total",
            "xlb_backend_active_flows",
            "xlb_backend_weight",
            "xlb_backend_state",
            "xlb_service_packets_total",
            "xlb_service_bytes_total",
            "xlb_resets_total",
            "xlb_backend_resets_total",
            "xlb_backend_snat_ports_in_use",
            "xlb_backend_snat_ports_pool",
            "xlb_backend_refused_no_port_total",
            "xlb_dataplane_verdicts_total",
            "xlb_icmp_errors_total",
            "xlb_dataplane_rx_total",
            "xlb_dataplane_tx_total",
            "xlb_dataplane_entries_created_total",
            "xlb_sync_lag_seconds",
            "xlb_sync_role",
            "xlb_sync_datagrams_total",
            "xlb_sync_records_total",
            "xlb_sync_sequence_gaps_total",
            "xlb_sync_peer_restarts_total",
            "xlb_table_entries",
            "xlb_table_capacity_flows",
            "xlb_table_snapshot_age_seconds",
        ]
        .into();
        assert_eq!(names, want);
        // Two backends × two directions, five causes, four states.
        let count = |n: &str| samples.keys().filter(|(k, _)| k == n).count();
        assert_eq!(count("xlb_backend_packets_total"), 4);
        assert_eq!(count("xlb_resets_total"), 5);
        assert_eq!(count("xlb_backend_resets_total"), 10);
        assert_eq!(count("xlb_backend_state"), 8);
        assert_eq!(count("xlb_backend_snat_ports_pool"), 1);
    }

    #[test]
    fn without_sync_there_are_no_sync_families() {
        let text = render(&status(false));
        parse_openmetrics(&text).expect("OpenMetrics");
        assert!(!text.contains("xlb_sync_"), "{text}");
        assert!(text.contains("\nxlb_table_entries{table=\"established\"} 12\n"), "{text}");
    }

    #[test]
    fn parses_as_openmetrics_with_and_without_services() {
        for s in [status(true), status(false), Status { services: Vec::new(), counters: BTreeMap::new(), ..status(false) }] {
            let text = render(&s);
            let samples = parse_openmetrics(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
            assert!(!samples.is_empty());
            assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut s = status(false);
        s.counters.insert("pass_odd\"quote\\slash\nline".into(), 1);
        let text = render(&s);
        assert_lines(&text, &[r#"xlb_dataplane_verdicts_total{reason="pass_odd\"quote\\slash\nline"} 1"#]);
        let samples = parse_openmetrics(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
        let key = ("xlb_dataplane_verdicts_total".to_owned(), vec![("reason".to_owned(), "pass_odd\"quote\\slash\nline".to_owned())]);
        assert_eq!(samples.get(&key), Some(&1.0));
    }

    #[test]
    fn counters_keep_every_bit_of_a_u64() {
        let mut s = status(false);
        s.counters.insert("rx".into(), u64::MAX);
        assert_lines(&render(&s), &["xlb_dataplane_rx_total 18446744073709551615"]);
    }
}
