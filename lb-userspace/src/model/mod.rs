//! The service model the operator manages: services (`VIP:port/proto`),
//! their backends and per-service settings, a backend's lifecycle, and
//! backends given by DNS name. Pure data and rules: no tokio, no clap, no
//! aya. The controller turns changes of the model into map writes; the
//! planner validates whole configurations against it.

pub mod backend;
pub mod named;
pub mod service;
pub mod settings;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

pub use backend::{BackendSlot, Drain, Lifecycle, Tracker};
pub use named::{BackendSpec, HostPort, NamedBackend, Resolution, TtlLimits};
pub use service::Service;

/// Requested XDP attach mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Driver mode; fails where the driver has no XDP support.
    Native,
    /// Generic (skb) mode: works everywhere, slower.
    Generic,
    /// Native, falling back to generic (the mode used is reported).
    Auto,
}

/// Where the program runs.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Attachment {
    pub iface: String,
    pub ifindex: u32,
    /// "native" or "generic": what was actually obtained.
    pub mode: String,
}

/// Largest backend weight.
pub const MAX_WEIGHT: u32 = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => lb_common::maps::PROTO_TCP,
            Proto::Udp => lb_common::maps::PROTO_UDP,
        }
    }
    pub const fn from_number(n: u8) -> Option<Proto> {
        match n {
            lb_common::maps::PROTO_TCP => Some(Proto::Tcp),
            lb_common::maps::PROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(format!("invalid protocol {s:?}: expected tcp or udp")),
        }
    }
}

/// `VIP:port/proto`, the identity of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId {
    pub addr: SocketAddr,
    pub proto: Proto,
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.proto)
    }
}

/// Why flows were reset (counted per service and backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetCause {
    /// The backend was deregistered (policy reset).
    Removed,
    /// The backend failed its health check (policy reset).
    Unhealthy,
    /// A drain reached its deadline.
    DrainDeadline,
    /// An established flow reached its idle timeout (`reset_on_idle`).
    Idle,
    /// Its service was removed.
    ServiceRemoved,
}

impl ResetCause {
    /// The flow-log reason of a flow reset for this cause.
    pub const fn end_reason(self) -> u32 {
        use lb_common::maps::end_reason;
        match self {
            ResetCause::Removed => end_reason::REMOVED,
            ResetCause::Unhealthy => end_reason::UNHEALTHY,
            ResetCause::DrainDeadline => end_reason::DRAIN_DEADLINE,
            ResetCause::Idle => end_reason::IDLE,
            ResetCause::ServiceRemoved => end_reason::SERVICE_REMOVED,
        }
    }
}

/// Flows reset by the controller, per cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetCounts {
    pub removed: u64,
    pub unhealthy: u64,
    pub drain_deadline: u64,
    pub idle: u64,
    /// Flows that left the table on their idle timeout (reset or not).
    #[serde(default)]
    pub expired: u64,
}

impl ResetCounts {
    pub fn add(&mut self, cause: ResetCause, n: u64) {
        match cause {
            // A removed service's flows count as removed backends' flows.
            ResetCause::Removed | ResetCause::ServiceRemoved => self.removed += n,
            ResetCause::Unhealthy => self.unhealthy += n,
            ResetCause::DrainDeadline => self.drain_deadline += n,
            ResetCause::Idle => self.idle += n,
        }
    }
}

/// Why a request is refused (the API's error codes map from these).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    BadRequest(String),
    NotFound(String),
    Conflict(String),
    Ambiguous(String),
    Capacity(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::BadRequest(m) | Refusal::NotFound(m) | Refusal::Conflict(m) | Refusal::Ambiguous(m) | Refusal::Capacity(m) => f.write_str(m),
        }
    }
}

pub fn check_weight(weight: u32) -> Result<(), Refusal> {
    if weight == 0 || weight > MAX_WEIGHT {
        return Err(Refusal::BadRequest(format!("weight {weight} is out of range 1-{MAX_WEIGHT}")));
    }
    Ok(())
}

/// A service or backend address must be a unicast, non-loopback address
/// with a port.
pub fn check_unicast(what: &str, a: SocketAddr) -> Result<(), Refusal> {
    let ip = a.ip();
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    let mapped = matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some());
    if ip.is_unspecified() || ip.is_multicast() || broadcast || ip.is_loopback() || mapped {
        return Err(Refusal::BadRequest(format!(
            "{what} {a}: address must be a unicast, non-loopback IPv4 or IPv6 address (IPv4-mapped IPv6 is written as IPv4)"
        )));
    }
    if a.port() == 0 {
        return Err(Refusal::BadRequest(format!("{what} {a}: port must be 1-65535")));
    }
    Ok(())
}

/// A port in map form (network byte order in a native integer).
pub fn be_port(p: u16) -> u16 {
    u16::from_ne_bytes(p.to_be_bytes())
}

/// A port from map form.
pub fn port_from(p: u16) -> u16 {
    u16::from_be_bytes(p.to_ne_bytes())
}

/// The data plane's key of a service.
pub fn service_key(id: &ServiceId) -> lb_common::maps::ServiceKey {
    lb_common::maps::ServiceKey { addr: lb_common::maps::addr_from_ip(id.addr.ip()), port: be_port(id.addr.port()), proto: id.proto.number(), _pad: 0 }
}
