//! The control API: newline-delimited JSON over a Unix socket. One request
//! per line, one response per line. Shared by the daemon and the CLI.
//!
//! Request:  `{"op":"backend_add","service":"10.0.0.1:80","proto":"tcp","backend":"10.1.0.2:8080","weight":2}`
//! Response: `{"ok":true,"data":...}` or
//!           `{"ok":false,"error":{"code":"not_found","message":"..."}}`

use std::{collections::BTreeMap, net::SocketAddr};

use serde::{Deserialize, Serialize};

pub mod desired;

/// Longest request line the daemon reads; longer ones are rejected. An
/// `apply` of 10,000 backends (what `export` prints for them) is ~1 MiB;
/// this leaves room for far more, and bounds what a client can make the
/// daemon buffer.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

pub use crate::model::Proto;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    ServiceAdd {
        service: SocketAddr,
        proto: Proto,
        #[serde(default)]
        options: crate::model::settings::ServiceOptions,
    },
    /// Changes settings of an existing service; absent options keep their value.
    ServiceSet {
        service: SocketAddr,
        proto: Option<Proto>,
        options: crate::model::settings::ServiceOptions,
    },
    /// `proto` may be omitted when only one protocol is served on the VIP:port.
    ServiceRemove {
        service: SocketAddr,
        proto: Option<Proto>,
    },
    /// `backend`: `IP:PORT`, or `NAME:PORT` (resolved now and again on
    /// its record's TTL).
    BackendAdd {
        service: SocketAddr,
        proto: Option<Proto>,
        backend: crate::model::BackendSpec,
        weight: Option<u32>,
    },
    BackendRemove {
        service: SocketAddr,
        proto: Option<Proto>,
        backend: crate::model::BackendSpec,
    },
    /// Changes a registered backend's weight.
    BackendSet {
        service: SocketAddr,
        proto: Option<Proto>,
        backend: crate::model::BackendSpec,
        weight: u32,
    },
    /// The whole configuration, in the form `apply` takes.
    Export,
    /// Makes the configuration match `config`; `dry_run` only lists changes.
    Apply {
        config: crate::api::desired::Desired,
        #[serde(default)]
        dry_run: bool,
    },
    Status,
    /// Liveness, for keepalived's track script and orchestrators: the
    /// controller answers and the kernel runs the program on every managed
    /// interface. Never walks the table: as fast at a million flows as at
    /// none. Answered with a [`Liveness`].
    Health,
    /// The node's role in an active/standby pair (keepalived's notify
    /// hook): `master` sends its flow state to the peer, `backup` installs
    /// what the peer sends.
    Role {
        role: crate::ha::Role,
    },
    Flows {
        service: Option<SocketAddr>,
        proto: Option<Proto>,
        /// Only this backend's flows (who would be reset if it went now).
        #[serde(default)]
        backend: Option<SocketAddr>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request itself is wrong (syntax, values out of range).
    BadRequest,
    NotFound,
    /// Already exists.
    Conflict,
    /// A VIP:port without protocol matches both a TCP and a UDP service.
    Ambiguous,
    /// A fixed limit (services, backends) is reached.
    Capacity,
    /// The data plane refused an operation.
    Internal,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Response { ok: true, data: Some(data), error: None }
    }
    pub fn err(code: ErrorCode, message: impl Into<String>) -> Self {
        Response { ok: false, data: None, error: Some(ApiError { code, message: message.into() }) }
    }
}

/// Traffic counters as reported (sums over CPUs). "In" is client → backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub new_flows: u64,
    /// RSTs the data plane sent on its own for flows whose backend was gone.
    pub reactive_resets: u64,
    /// Full NAT: new flows refused because no source port was free.
    #[serde(default)]
    pub refused_no_port: u64,
}

impl From<lb_common::maps::TrafficCounters> for Traffic {
    fn from(c: lb_common::maps::TrafficCounters) -> Self {
        Traffic {
            packets_in: c.packets_in,
            bytes_in: c.bytes_in,
            packets_out: c.packets_out,
            bytes_out: c.bytes_out,
            new_flows: c.new_flows,
            reactive_resets: c.reactive_resets,
            refused_no_port: c.no_port,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub backend: SocketAddr,
    pub id: u32,
    pub weight: u32,
    /// up, draining (no new flows), down (unhealthy), removed (deregistered,
    /// flows being reset).
    pub state: String,
    /// False once deregistered (it is listed while it still has flows).
    pub registered: bool,
    pub healthy: bool,
    pub last_health_error: Option<String>,
    /// Flows of this backend the controller reset, by cause.
    pub resets: crate::model::ResetCounts,
    /// Seconds until a draining backend's remaining flows are reset.
    pub drain_remaining_s: Option<f64>,
    /// Full NAT: source ports this backend's flows hold, of the pool's
    /// size (watch it before `refused_no_port` starts to count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat_ports: Option<PortUse>,
    pub active_flows: u64,
    pub traffic: Traffic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortUse {
    pub in_use: u64,
    pub pool: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub service: SocketAddr,
    pub proto: Proto,
    pub id: u32,
    pub scheduler: String,
    pub settings: crate::model::settings::ServiceSettings,
    pub active_flows: u64,
    /// Flows reset by the controller, by cause (the data plane's own resets
    /// are the `rst_*` counters).
    pub resets: crate::model::ResetCounts,
    pub traffic: Traffic,
    pub backends: Vec<BackendStatus>,
    /// Backends given by DNS name.
    #[serde(default)]
    pub named_backends: Vec<NamedStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamedStatus {
    /// `NAME:PORT`.
    pub backend: String,
    pub weight: u32,
    /// The addresses it registered (listed under `backends` too).
    pub addresses: Vec<SocketAddr>,
    /// TTL of the last answer, and seconds until the next lookup.
    pub ttl_s: f64,
    pub next_lookup_s: f64,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TableStatus {
    /// Entries in the connection table (two per flow).
    pub entries: u64,
    /// Flows the table holds before the least recently used are recycled.
    pub capacity_flows: u64,
    /// Entries of TCP flows still in their handshake (two per flow).
    pub half_open_entries: u64,
    pub half_open_capacity_flows: u64,
    /// How old these table figures are: they come from the latest walk of
    /// the table (reports never walk it themselves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_age_s: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub interfaces: Vec<crate::model::Attachment>,
    pub table: TableStatus,
    /// Data-plane counters by reason (see docs/architecture.md).
    pub counters: BTreeMap<String, u64>,
    /// ICMP/ICMPv6 errors about flows, by kind (`too_big`, `unreachable`,
    /// `time_exceeded`, `parameter_problem`) and outcome (`to_backend`,
    /// `to_client`, `passed_no_flow`, `dropped_no_flow`,
    /// `dropped_bad_quote`); every pair present, zeros included.
    #[serde(default)]
    pub icmp_errors: BTreeMap<String, BTreeMap<String, u64>>,
    pub services: Vec<ServiceStatus>,
    /// State sync with an active/standby peer, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<crate::ha::SyncStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowInfo {
    pub client: SocketAddr,
    pub service: SocketAddr,
    pub proto: Proto,
    pub backend: SocketAddr,
    /// Full NAT: the balancer's address and port the backend sees this
    /// flow from (how a backend-side connection maps back to its client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat: Option<SocketAddr>,
    /// syn, established, fin, closed (none for UDP).
    pub state: String,
    pub age_s: f64,
    pub idle_s: f64,
}

/// The answer to [`Request::Health`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Liveness {
    pub healthy: bool,
    /// How long the controller took to answer.
    pub controller_ms: f64,
    /// What is wrong, one line each (empty when healthy).
    pub problems: Vec<String>,
    pub interfaces: Vec<LinkLiveness>,
}

/// One managed interface, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkLiveness {
    pub iface: String,
    pub ifindex: u32,
    pub mode: String,
    /// The kernel runs this daemon's program on it.
    pub attached: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}
