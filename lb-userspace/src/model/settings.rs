//! Per-service settings: what happens to a backend's flows when it is
//! removed or fails its health check, how a mass reset is paced, what a
//! mid-flow packet without state gets, and the health check itself.
//! All are set when the service is created and changeable at run time.

use std::{fmt, net::IpAddr, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};

/// Serde through the text form (`FromStr` / `Display`): settings files,
/// API requests and `export` all spell these values as the CLI does.
macro_rules! text_serde {
    ($($t:ty),* $(,)?) => {$(
        impl TryFrom<String> for $t {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                s.parse()
            }
        }

        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.to_string()
            }
        }
    )*};
}
pub(crate) use text_serde;

text_serde!(FlowPolicy, SnatSource, PortRange, Dur, Probe, StatusRange);

/// What happens to a backend's established flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum FlowPolicy {
    /// Reset every flow at once (client and backend get a RST).
    Reset,
    /// No new flows; existing ones go on until they end or the deadline,
    /// then the rest are reset.
    Drain(Duration),
    /// No new flows; existing ones go on until they end.
    Keep,
}

impl FromStr for FlowPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reset" => Ok(FlowPolicy::Reset),
            "keep" => Ok(FlowPolicy::Keep),
            _ => match s.strip_prefix("drain:") {
                Some(d) => parse_duration(d).map(FlowPolicy::Drain),
                None => Err(format!("invalid flow policy {s:?}: expected reset, keep or drain:DURATION (e.g. drain:30s)")),
            },
        }
    }
}

impl fmt::Display for FlowPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlowPolicy::Reset => f.write_str("reset"),
            FlowPolicy::Keep => f.write_str("keep"),
            FlowPolicy::Drain(d) => write!(f, "drain:{}", humantime::format_duration(*d)),
        }
    }
}

/// What a non-SYN TCP segment that matches no flow gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MissPolicy {
    /// A RST from the XDP program: the client reconnects at once.
    Reset,
    /// Scheduled by flow hash and given an entry (several balancers with the
    /// same backends then agree on the backend).
    Rehash,
}

impl fmt::Display for MissPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MissPolicy::Reset => "reset",
            MissPolicy::Rehash => "rehash",
        })
    }
}

/// How a service picks the backend of a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// Weighted Maglev consistent hashing (default): the same flow maps to
    /// the same backend on every balancer, and a backend change moves only
    /// about its own share of flows.
    Maglev,
    /// Smooth weighted round robin (per-CPU cursor).
    Wrr,
    /// Least connections (two random choices, weighted).
    LeastConn,
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheduler::Maglev => "maglev",
            Scheduler::Wrr => "wrr",
            Scheduler::LeastConn => "least-conn",
        })
    }
}

/// How a service's packets are rewritten.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NatMode {
    /// Destination NAT: backends see the client's address and must route
    /// their replies back through the balancer.
    #[default]
    Dnat,
    /// Full NAT: backends see one of the balancer's addresses and a port
    /// from the service's pool; replies come back without any routing.
    Fullnat,
    /// Direct server return: packets reach the backends IPIP-encapsulated,
    /// untouched; backends hold the VIP and answer clients directly
    /// (`xlb backend-setup`). IPv4; backend port = VIP port.
    Dsr,
}

impl fmt::Display for NatMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NatMode::Dnat => "dnat",
            NatMode::Fullnat => "fullnat",
            NatMode::Dsr => "dsr",
        })
    }
}

/// What a full-NAT flow that finds no free source port gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoPortPolicy {
    /// A TCP SYN is answered with a RST (the client fails at once);
    /// UDP is dropped.
    #[default]
    Reset,
    /// Dropped (the client retries its SYN).
    Drop,
}

/// The balancer's source address for full-NAT flows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SnatSource {
    /// Per backend, the address the kernel would use to reach it (from the
    /// routing table, looked up when the backend is added).
    #[default]
    Auto,
    Addr(IpAddr),
}

impl FromStr for SnatSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(SnatSource::Auto);
        }
        s.parse().map(SnatSource::Addr).map_err(|_| format!("invalid source address {s:?}: expected auto or an IP address"))
    }
}

impl fmt::Display for SnatSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnatSource::Auto => f.write_str("auto"),
            SnatSource::Addr(a) => a.fmt(f),
        }
    }
}

/// An inclusive port range, "1024-32767".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange(pub u16, pub u16);

impl Default for PortRange {
    fn default() -> Self {
        PortRange(lb_common::maps::DEFAULT_SNAT_PORT_LO, lb_common::maps::DEFAULT_SNAT_PORT_HI)
    }
}

impl PortRange {
    /// Ports in the range (a valid range is never empty: LOW <= HIGH).
    pub fn ports(&self) -> u32 {
        (self.1 as u32 + 1).saturating_sub(self.0 as u32)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let err = || format!("invalid port range {s:?}: expected LOW-HIGH within 1-65535 (e.g. 1024-32767)");
        let (lo, hi) = s.split_once('-').ok_or_else(err)?;
        let (lo, hi): (u16, u16) = (lo.trim().parse().map_err(|_| err())?, hi.trim().parse().map_err(|_| err())?);
        if lo == 0 || lo > hi {
            return Err(err());
        }
        Ok(PortRange(lo, hi))
    }
}

/// A duration given as text ("500ms", "2s", "1m 30s").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Dur(pub Duration);

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_duration(self.0).fmt(f)
    }
}

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_duration(s).map(Dur)
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e} (e.g. 500ms, 2s, 1m)"))
}

/// The probe of a health check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Probe {
    /// A TCP connect succeeds.
    Tcp,
    /// `GET path` answers with a status in the range.
    Http { path: String },
}

impl FromStr for Probe {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "tcp" {
            return Ok(Probe::Tcp);
        }
        match s.strip_prefix("http:") {
            Some(path) if path.starts_with('/') && !path.contains(char::is_whitespace) => Ok(Probe::Http { path: path.to_owned() }),
            _ => Err(format!("invalid health probe {s:?}: expected tcp or http:/PATH")),
        }
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Tcp => f.write_str("tcp"),
            Probe::Http { path } => write!(f, "http:{path}"),
        }
    }
}

/// An inclusive range of HTTP status codes, "200-399" or "204".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StatusRange(pub u16, pub u16);

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == self.1 { write!(f, "{}", self.0) } else { write!(f, "{}-{}", self.0, self.1) }
    }
}

impl FromStr for StatusRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let err = || format!("invalid status range {s:?}: expected e.g. 200-399 or 204");
        let (lo, hi) = match s.split_once('-') {
            Some((a, b)) => (a.parse().map_err(|_| err())?, b.parse().map_err(|_| err())?),
            None => {
                let v = s.parse().map_err(|_| err())?;
                (v, v)
            }
        };
        if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
            return Err(err());
        }
        Ok(StatusRange(lo, hi))
    }
}

/// A health check as configured on a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheck {
    pub probe: Probe,
    pub interval: Dur,
    pub timeout: Dur,
    /// Consecutive successes that bring a down backend back.
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    pub fall: u32,
    /// Accepted HTTP statuses (http probes).
    pub status: StatusRange,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            probe: Probe::Tcp,
            interval: Dur(Duration::from_secs(2)),
            timeout: Dur(Duration::from_secs(1)),
            rise: 2,
            fall: 3,
            status: StatusRange(200, 399),
        }
    }
}

/// Every per-service setting, resolved. Absent fields (in `xlb apply`
/// files) take their defaults; unknown ones are errors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceSettings {
    pub scheduler: Scheduler,
    /// Maglev table size (a prime, at most 65537).
    pub maglev_size: u32,
    pub on_remove: FlowPolicy,
    pub on_unhealthy: FlowPolicy,
    pub reset_spread: Dur,
    pub on_miss: MissPolicy,
    /// `None`: no health check (backends are up until removed).
    pub health: Option<HealthCheck>,
    /// Idle timeouts per flow state.
    pub timeouts: Timeouts,
    /// An established TCP flow that reaches its idle timeout is reset at
    /// both ends instead of silently forgotten.
    pub reset_on_idle: bool,
    /// A backend that joins or comes back up ramps its weight from 1 to its
    /// full weight over this period (0: at once).
    pub slow_start: Dur,
    /// DNAT or full NAT.
    pub mode: NatMode,
    /// Full NAT: the source port pool, per backend.
    pub snat_ports: PortRange,
    /// Full NAT: the balancer's source address.
    pub snat_source: SnatSource,
    /// Full NAT: what a new flow gets when its backend's pool is exhausted.
    pub on_no_port: NoPortPolicy,
    /// DNAT and full NAT: the largest MSS a SYN to a backend or a SYN-ACK
    /// to a client may announce (lowered in XDP); 0: left alone.
    pub mss_clamp: u16,
}

/// How long a flow may stay idle in each state before it leaves the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Handshake not completed.
    pub syn: Dur,
    /// Established (the largest cloud balancer's default: 350 s).
    pub established: Dur,
    /// One side has sent a FIN (half-closed).
    pub closing: Dur,
    pub udp: Dur,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            syn: Dur(Duration::from_secs(30)),
            established: Dur(Duration::from_secs(350)),
            closing: Dur(Duration::from_secs(30)),
            udp: Dur(Duration::from_secs(120)),
        }
    }
}

impl Default for ServiceSettings {
    fn default() -> Self {
        ServiceSettings {
            scheduler: Scheduler::Maglev,
            maglev_size: lb_common::sched::MAGLEV_DEFAULT_SIZE as u32,
            on_remove: FlowPolicy::Reset,
            on_unhealthy: FlowPolicy::Reset,
            reset_spread: Dur(Duration::ZERO),
            on_miss: MissPolicy::Reset,
            health: None,
            timeouts: Timeouts::default(),
            reset_on_idle: false,
            slow_start: Dur(Duration::ZERO),
            mode: NatMode::Dnat,
            snat_ports: PortRange::default(),
            snat_source: SnatSource::Auto,
            on_no_port: NoPortPolicy::Reset,
            mss_clamp: 0,
        }
    }
}

/// A partial update of [`ServiceSettings`] (API, CLI flags of `service add`
/// and `service set`, config file): absent fields keep their value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceOptions {
    /// How new flows pick a backend: maglev (default) or wrr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<Scheduler>,
    /// Maglev table size: a prime up to 65537 (default 65537).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maglev_size: Option<u32>,
    /// What a deregistered backend's flows get: reset (default), drain:DURATION, keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_remove: Option<FlowPolicy>,
    /// What an unhealthy backend's flows get: reset (default), drain:DURATION, keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_unhealthy: Option<FlowPolicy>,
    /// Spread a mass reset over this window (default 0: all at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_spread: Option<Dur>,
    /// Non-SYN TCP without a flow: reset (default) or rehash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_miss: Option<MissPolicy>,
    /// Health check: tcp, http:/PATH, or none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// Time between probes (default 2s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_interval: Option<Dur>,
    /// Probe timeout (default 1s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_timeout: Option<Dur>,
    /// Successes that bring a down backend back (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<u32>,
    /// Failures that take a backend down (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<u32>,
    /// Accepted HTTP statuses for http probes (default 200-399).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_status: Option<StatusRange>,
    /// Idle timeout of a TCP flow in its handshake (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_syn: Option<Dur>,
    /// Idle timeout of an established TCP flow (default 350s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_established: Option<Dur>,
    /// Idle timeout of a half-closed TCP flow (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_closing: Option<Dur>,
    /// Idle timeout of a UDP flow (default 120s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_udp: Option<Dur>,
    /// Reset established TCP flows at both ends when they time out: true or false (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_on_idle: Option<bool>,
    /// Ramp a joining or recovering backend's weight up over this period (default 0: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<Dur>,
    /// dnat (default: backends route replies through the balancer), fullnat, or dsr (IPIP, backends answer clients directly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<NatMode>,
    /// Full NAT: source port pool per backend (default 1024-32767; keep it clear of net.ipv4.ip_local_port_range).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat_ports: Option<PortRange>,
    /// Full NAT: the balancer's source address, or auto (default: the address the routing table picks per backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat_source: Option<SnatSource>,
    /// Full NAT: a new flow with no free source port gets reset (default; UDP is dropped) or drop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_no_port: Option<NoPortPolicy>,
    /// DNAT, full NAT: the largest MSS SYNs and SYN-ACKs through the balancer announce (0: off, the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mss_clamp: Option<u16>,
}

/// The least MSS a clamp may set (RFC 9293: every IPv4 host takes 536).
pub const MIN_MSS_CLAMP: u16 = 536;

/// Longest reset spread accepted (a mass reset should not take longer).
pub const MAX_RESET_SPREAD: Duration = Duration::from_secs(600);

impl ServiceSettings {
    /// Applies `o` to a copy of these settings and validates the result.
    pub fn patched(&self, o: &ServiceOptions) -> Result<ServiceSettings, String> {
        let mut s = self.clone();
        if let Some(sch) = o.scheduler {
            s.scheduler = sch;
        }
        if let Some(m) = o.maglev_size {
            if m as usize > lb_common::sched::MAGLEV_DEFAULT_SIZE || !lb_common::sched::is_prime(m as usize) {
                return Err(format!("maglev size {m} must be a prime no larger than 65537 (e.g. 65537, 4093, 251)"));
            }
            s.maglev_size = m;
        }
        if let Some(p) = o.on_remove {
            s.on_remove = p;
        }
        if let Some(p) = o.on_unhealthy {
            s.on_unhealthy = p;
        }
        if let Some(d) = o.reset_spread {
            if d.0 > MAX_RESET_SPREAD {
                return Err(format!("reset spread {} is longer than the maximum of 10m", String::from(d)));
            }
            s.reset_spread = d;
        }
        if let Some(m) = o.on_miss {
            s.on_miss = m;
        }
        for (value, slot, what) in [
            (o.timeout_syn, &mut s.timeouts.syn, "syn"),
            (o.timeout_established, &mut s.timeouts.established, "established"),
            (o.timeout_closing, &mut s.timeouts.closing, "closing"),
            (o.timeout_udp, &mut s.timeouts.udp, "udp"),
        ] {
            if let Some(v) = value {
                if v.0 < Duration::from_secs(1) || v.0 > Duration::from_secs(7 * 24 * 3600) {
                    return Err(format!("{what} timeout must be between 1s and 7 days"));
                }
                *slot = v;
            }
        }
        if let Some(r) = o.reset_on_idle {
            s.reset_on_idle = r;
        }
        if let Some(d) = o.slow_start {
            if d.0 > Duration::from_secs(3600) {
                return Err("slow start must be at most 1h".into());
            }
            s.slow_start = d;
        }
        if let Some(m) = o.mode {
            s.mode = m;
        }
        if let Some(r) = o.snat_ports {
            s.snat_ports = r;
        }
        if let Some(a) = o.snat_source {
            s.snat_source = a;
        }
        if let Some(p) = o.on_no_port {
            s.on_no_port = p;
        }
        if let Some(m) = o.mss_clamp {
            s.mss_clamp = m;
        }
        match o.health.as_deref() {
            Some("none") => s.health = None,
            Some(p) => {
                let probe: Probe = p.parse()?;
                s.health.get_or_insert_with(HealthCheck::default).probe = probe;
            }
            None => {}
        }
        let tuning = o.health_interval.is_some() || o.health_timeout.is_some() || o.rise.is_some() || o.fall.is_some() || o.health_status.is_some();
        if tuning {
            let Some(h) = s.health.as_mut() else {
                return Err("health check settings given but the service has no health check: add --health tcp or --health http:/PATH".into());
            };
            if let Some(v) = o.health_interval {
                h.interval = v;
            }
            if let Some(v) = o.health_timeout {
                h.timeout = v;
            }
            if let Some(v) = o.rise {
                h.rise = v;
            }
            if let Some(v) = o.fall {
                h.fall = v;
            }
            if let Some(v) = o.health_status {
                h.status = v;
            }
        }
        s.validate()?;
        Ok(s)
    }

    /// Checks every setting (for settings given whole, as `xlb apply` does).
    pub fn validate(&self) -> Result<(), String> {
        let m = self.maglev_size as usize;
        if m > lb_common::sched::MAGLEV_DEFAULT_SIZE || !lb_common::sched::is_prime(m) {
            return Err(format!("maglev_size {m} must be a prime no larger than 65537"));
        }
        if self.reset_spread.0 > MAX_RESET_SPREAD {
            return Err("reset_spread must be at most 10m".into());
        }
        if self.slow_start.0 > Duration::from_secs(3600) {
            return Err("slow_start must be at most 1h".into());
        }
        for (t, what) in [
            (self.timeouts.syn, "timeouts.syn"),
            (self.timeouts.established, "timeouts.established"),
            (self.timeouts.closing, "timeouts.closing"),
            (self.timeouts.udp, "timeouts.udp"),
        ] {
            if t.0 < Duration::from_secs(1) || t.0 > Duration::from_secs(7 * 24 * 3600) {
                return Err(format!("{what} must be between 1s and 7 days"));
            }
        }
        if self.snat_ports.0 == 0 || self.snat_ports.0 > self.snat_ports.1 {
            return Err("snat_ports must be LOW-HIGH with 1 <= LOW <= HIGH".into());
        }
        if let SnatSource::Addr(a) = self.snat_source
            && (a.is_unspecified() || a.is_multicast() || a.is_loopback())
        {
            return Err(format!("snat_source {a} must be a unicast, non-loopback address of this host"));
        }
        if self.mss_clamp != 0 && self.mss_clamp < MIN_MSS_CLAMP {
            return Err(format!("mss_clamp {} is below {MIN_MSS_CLAMP}, the least MSS every IPv4 host must take (0 turns the clamp off)", self.mss_clamp));
        }
        if self.mss_clamp != 0 && self.mode == NatMode::Dsr {
            return Err(
                "mss_clamp does not apply to DSR services: their SYN-ACKs never cross the balancer; clamp on the backends with `xlb backend-setup --mss-clamp`"
                    .into(),
            );
        }
        if let Some(h) = &self.health {
            if h.interval.0 < Duration::from_millis(50) || h.interval.0 > Duration::from_secs(3600) {
                return Err("health interval must be between 50ms and 1h".into());
            }
            if h.timeout.0.is_zero() || h.timeout.0 > h.interval.0 {
                return Err("health timeout must be positive and at most the interval".into());
            }
            if !(1..=100).contains(&h.rise) || !(1..=100).contains(&h.fall) {
                return Err("rise and fall must be between 1 and 100".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_print_round_trip() {
        for s in ["reset", "keep", "drain:30s", "drain:1m 30s"] {
            let p: FlowPolicy = s.parse().expect(s);
            assert_eq!(p.to_string().parse::<FlowPolicy>().expect("round trip"), p);
        }
        assert_eq!("drain:3s".parse::<FlowPolicy>(), Ok(FlowPolicy::Drain(Duration::from_secs(3))));
        assert!("drain".parse::<FlowPolicy>().is_err());
        assert!("drain:soon".parse::<FlowPolicy>().expect_err("must be refused").contains("invalid duration"));
        assert!("nuke".parse::<FlowPolicy>().expect_err("must be refused").contains("reset, keep or drain"));
    }

    #[test]
    fn probes_and_status_ranges_parse() {
        assert_eq!("tcp".parse::<Probe>(), Ok(Probe::Tcp));
        assert_eq!("http:/healthz".parse::<Probe>(), Ok(Probe::Http { path: "/healthz".into() }));
        assert!("http:healthz".parse::<Probe>().is_err());
        assert!("udp".parse::<Probe>().is_err());
        assert_eq!("200-399".parse::<StatusRange>(), Ok(StatusRange(200, 399)));
        assert_eq!("204".parse::<StatusRange>(), Ok(StatusRange(204, 204)));
        assert!("399-200".parse::<StatusRange>().is_err());
        assert!("99".parse::<StatusRange>().is_err());
    }

    #[test]
    fn the_mss_clamp_is_checked_and_refused_for_dsr() {
        let clamp = |m: u16| ServiceOptions { mss_clamp: Some(m), ..Default::default() };
        assert_eq!(ServiceSettings::default().patched(&clamp(1400)).expect("valid").mss_clamp, 1400);
        let s = ServiceSettings::default().patched(&clamp(1400)).expect("valid");
        assert_eq!(s.patched(&clamp(0)).expect("off").mss_clamp, 0, "0 turns it off");
        let err = ServiceSettings::default().patched(&clamp(500)).expect_err("too small");
        assert!(err.contains("536"), "{err}");
        let dsr = ServiceOptions { mode: Some(NatMode::Dsr), mss_clamp: Some(1400), ..Default::default() };
        let err = ServiceSettings::default().patched(&dsr).expect_err("DSR");
        assert!(err.contains("backend-setup --mss-clamp"), "{err}");
        // A settings file says it whole; an older one without it means off.
        let t: ServiceSettings = toml::from_str("mss_clamp = 1360").expect("toml");
        assert_eq!(t.mss_clamp, 1360);
        assert_eq!(toml::from_str::<ServiceSettings>("").expect("toml").mss_clamp, 0);
        let t: ServiceSettings = toml::from_str("mss_clamp = 100").expect("toml parses");
        assert!(t.validate().is_err(), "validated when applied");
    }

    #[test]
    fn full_nat_settings_parse_and_validate() {
        assert_eq!("1024-2047".parse::<PortRange>(), Ok(PortRange(1024, 2047)));
        assert_eq!(PortRange(40000, 40003).ports(), 4);
        for bad in ["0-10", "10-5", "1024", "a-b", "1-70000"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
        assert_eq!("auto".parse::<SnatSource>(), Ok(SnatSource::Auto));
        assert_eq!("fd00::1".parse::<SnatSource>(), Ok(SnatSource::Addr("fd00::1".parse().expect("ip"))));
        assert!("somewhere".parse::<SnatSource>().is_err());
        let s = ServiceSettings::default()
            .patched(&ServiceOptions { mode: Some(NatMode::Fullnat), snat_ports: Some(PortRange(5000, 5001)), ..Default::default() })
            .expect("valid");
        assert_eq!((s.mode, s.snat_ports, s.on_no_port), (NatMode::Fullnat, PortRange(5000, 5001), NoPortPolicy::Reset));
        let err = ServiceSettings::default()
            .patched(&ServiceOptions { snat_source: Some(SnatSource::Addr("127.0.0.1".parse().expect("ip"))), ..Default::default() })
            .expect_err("loopback source");
        assert!(err.contains("snat_source"), "{err}");
        // Settings files spell them as strings.
        let t: ServiceSettings =
            toml::from_str("mode = \"fullnat\"\nsnat_ports = \"2000-2999\"\nsnat_source = \"10.1.0.1\"\non_no_port = \"drop\"").expect("toml");
        assert_eq!((t.mode, t.snat_ports, t.on_no_port), (NatMode::Fullnat, PortRange(2000, 2999), NoPortPolicy::Drop));
    }

    #[test]
    fn patching_validates_and_keeps_unset_fields() {
        let base = ServiceSettings::default();
        let s = base.patched(&ServiceOptions { health: Some("http:/ok".into()), fall: Some(2), ..Default::default() }).expect("valid");
        let h = s.health.clone().expect("health");
        assert_eq!(h.fall, 2);
        assert_eq!(h.rise, 2, "default kept");
        assert_eq!(s.on_remove, FlowPolicy::Reset);
        let err = base.patched(&ServiceOptions { rise: Some(3), ..Default::default() }).expect_err("no health check");
        assert!(err.contains("no health check"), "{err}");
        let err = s.patched(&ServiceOptions { health_timeout: Some(Dur(Duration::from_secs(5))), ..Default::default() }).expect_err("timeout > interval");
        assert!(err.contains("timeout"), "{err}");
        let off = s.patched(&ServiceOptions { health: Some("none".into()), ..Default::default() }).expect("off");
        assert!(off.health.is_none());
        let err = base.patched(&ServiceOptions { reset_spread: Some(Dur(Duration::from_secs(3600))), ..Default::default() }).expect_err("too long");
        assert!(err.contains("maximum"), "{err}");
    }
}
