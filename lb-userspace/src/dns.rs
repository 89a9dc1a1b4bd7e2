//! Backends given by DNS name (`xlb backend add VIP:PORT app.internal:8080`).
//!
//! The controller keeps, per name, the addresses it registered for it; the
//! daemon re-resolves each name when its record's TTL runs out (clamped to
//! `--dns-min-ttl`..`--dns-max-ttl`, so never cached forever) and turns the
//! difference into ordinary backend adds and removes, under the service's
//! usual `on-remove` policy. An authoritative "no such name" (or no address
//! of the service's family) removes every address; a failed lookup
//! (timeout, server failure) keeps the last answer until `--dns-max-ttl`
//! after the last good one, then removes it: no stale address is served
//! forever because the DNS server went away.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// `host:port` with a DNS name (not an address).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl FromStr for HostPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let err = |why: &str| format!("invalid backend {s:?}: {why} (expected IP:PORT, [IPv6]:PORT or NAME:PORT)");
        let (host, port) = s.rsplit_once(':').ok_or_else(|| err("no port"))?;
        let port: u16 = port.parse().map_err(|_| err("bad port"))?;
        if port == 0 {
            return Err(err("port must be 1-65535"));
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty() && l.len() <= 63 && !l.starts_with('-') && !l.ends_with('-') && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(err("not a DNS name"));
        }
        if host.parse::<IpAddr>().is_ok() || host.split('.').all(|l| l.chars().all(|c| c.is_ascii_digit())) {
            return Err(err("an address needs no resolving; give it as IP:PORT"));
        }
        Ok(HostPort { host, port })
    }
}

/// A backend as the operator names it: an address, or a DNS name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum BackendSpec {
    Addr(SocketAddr),
    Name(HostPort),
}

impl FromStr for BackendSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.parse::<SocketAddr>() {
            Ok(a) => Ok(BackendSpec::Addr(a)),
            Err(_) => s.parse().map(BackendSpec::Name),
        }
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSpec::Addr(a) => a.fmt(f),
            BackendSpec::Name(n) => n.fmt(f),
        }
    }
}

crate::model::settings::text_serde!(BackendSpec);

impl From<SocketAddr> for BackendSpec {
    fn from(a: SocketAddr) -> Self {
        BackendSpec::Addr(a)
    }
}

/// What one lookup said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// The addresses and how long the answer may be trusted.
    Addrs { addrs: Vec<IpAddr>, ttl: Duration },
    /// Authoritatively no such name, or no address record.
    NoSuchName,
    /// The lookup failed (timeout, server failure): nothing is known.
    Failed(String),
}

/// How long answers are trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TtlLimits {
    pub min: Duration,
    pub max: Duration,
}

impl Default for TtlLimits {
    fn default() -> Self {
        TtlLimits { min: Duration::from_secs(1), max: Duration::from_secs(300) }
    }
}

impl TtlLimits {
    /// When to ask again after an answer with `ttl` (or after a failure).
    pub fn next(&self, now: Instant, r: &Resolution) -> Instant {
        match r {
            Resolution::Addrs { ttl, .. } => now + (*ttl).clamp(self.min, self.max),
            // Ask again soon: the name may come (back).
            Resolution::NoSuchName | Resolution::Failed(_) => now + self.min.max(Duration::from_secs(1)),
        }
    }
}

/// The daemon's DNS client (hickory): no cache of its own, so every lookup
/// asks the server and sees the record's current TTL.
pub struct Resolver {
    inner: hickory_resolver::TokioResolver,
}

impl Resolver {
    /// `servers` empty: the system's /etc/resolv.conf.
    pub fn new(servers: &[SocketAddr]) -> anyhow::Result<Resolver> {
        use anyhow::Context as _;
        use hickory_resolver::{
            config::{LookupIpStrategy, NameServerConfigGroup, ResolverConfig, ResolverOpts},
            name_server::TokioConnectionProvider,
        };
        let (config, mut opts) = if servers.is_empty() {
            hickory_resolver::system_conf::read_system_conf().context("reading /etc/resolv.conf (or give --dns-server)")?
        } else {
            let mut group = NameServerConfigGroup::new();
            for s in servers {
                group.merge(NameServerConfigGroup::from_ips_clear(&[s.ip()], s.port(), true));
            }
            (ResolverConfig::from_parts(None, vec![], group), ResolverOpts::default())
        };
        opts.cache_size = 0;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        let mut b = hickory_resolver::Resolver::builder_with_config(config, TokioConnectionProvider::default());
        *b.options_mut() = opts;
        Ok(Resolver { inner: b.build() })
    }

    pub async fn resolve(&self, host: &str) -> Resolution {
        // A trailing dot: the name is absolute (no search domains).
        match self.inner.lookup_ip(format!("{host}.")).await {
            Ok(l) => {
                let ttl = l.valid_until().saturating_duration_since(Instant::now());
                let mut addrs: Vec<IpAddr> = l.iter().collect();
                addrs.sort();
                addrs.dedup();
                if addrs.is_empty() { Resolution::NoSuchName } else { Resolution::Addrs { addrs, ttl } }
            }
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => Resolution::NoSuchName,
            Err(e) => Resolution::Failed(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_specs_parse_as_addresses_or_names() {
        assert_eq!("10.1.1.2:80".parse::<BackendSpec>(), Ok(BackendSpec::Addr("10.1.1.2:80".parse().expect("addr"))));
        assert_eq!("[fd01::2]:80".parse::<BackendSpec>(), Ok(BackendSpec::Addr("[fd01::2]:80".parse().expect("addr"))));
        assert_eq!(
            "App.Internal.:8080".parse::<BackendSpec>(),
            Ok(BackendSpec::Name(HostPort { host: "app.internal".into(), port: 8080 }))
        );
        for bad in ["app.internal", "app.internal:0", "app..internal:80", "-app:80", "10.1.1:80", "a b:80", "app.internal:http"] {
            assert!(bad.parse::<BackendSpec>().is_err(), "{bad}");
        }
        // JSON form is the string (so requests from before names still parse).
        let v: BackendSpec = serde_json::from_str("\"10.1.1.2:80\"").expect("json");
        assert_eq!(v, BackendSpec::Addr("10.1.1.2:80".parse().expect("addr")));
    }

    #[test]
    fn ttls_are_clamped_and_failures_retry_soon() {
        let l = TtlLimits { min: Duration::from_secs(2), max: Duration::from_secs(60) };
        let now = Instant::now();
        let ans = |s| Resolution::Addrs { addrs: vec![], ttl: Duration::from_secs(s) };
        assert_eq!(l.next(now, &ans(0)), now + Duration::from_secs(2), "a zero TTL is not a busy loop");
        assert_eq!(l.next(now, &ans(30)), now + Duration::from_secs(30));
        assert_eq!(l.next(now, &ans(86_400)), now + Duration::from_secs(60), "never trusted past the maximum");
        assert_eq!(l.next(now, &Resolution::Failed("timeout".into())), now + Duration::from_secs(2));
    }
}
