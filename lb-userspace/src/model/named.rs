//! Backends given by DNS name (`xlb backend add VIP:PORT app.internal:8080`):
//! the names, what a lookup said, how long answers are trusted, and what a
//! name's addresses become after each answer.
//!
//! Per name, the model keeps the addresses it registered for it; the daemon
//! re-resolves each name when its record's TTL runs out (clamped to
//! `--dns-min-ttl`..`--dns-max-ttl`, so never cached forever) and the
//! difference becomes ordinary backend adds and removes, under the
//! service's usual `on-remove` policy. An answer that would remove every
//! address (no such name, no address of the service's family, or lookups
//! failing for longer than the maximum TTL) must come `--dns-misses` times
//! in a row first: one lost or wrong answer (a DNS blip) resets nobody.

use std::{
    collections::BTreeSet,
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

/// A backend given by DNS name: its current addresses are ordinary
/// backends (registered on the name's port).
#[derive(Clone, Debug)]
pub struct NamedBackend {
    pub weight: u32,
    /// Addresses this name registered (not those registered by hand or by
    /// another name that happen to be the same).
    pub addrs: BTreeSet<IpAddr>,
    pub next_resolve: Instant,
    /// The last answer that said something (addresses or no such name).
    pub last_answer: Instant,
    pub ttl: Duration,
    pub last_error: Option<String>,
    /// Answers in a row that would have removed every address.
    pub misses: u32,
}

impl NamedBackend {
    /// A name to be looked up at once (holding `addrs` meanwhile).
    pub fn due(weight: u32, addrs: BTreeSet<IpAddr>, now: Instant) -> NamedBackend {
        NamedBackend { weight, addrs, next_resolve: now, last_answer: now, ttl: Duration::ZERO, last_error: None, misses: 0 }
    }

    /// Takes a lookup's answer: what the name's addresses should now be
    /// (`None`: keep them as they are). `v4`: the service's family. An
    /// answer that would leave no address counts as a miss and takes effect
    /// only at the `miss_limit`-th in a row.
    pub fn take_answer(&mut self, answer: &Resolution, v4: bool, now: Instant, limits: &TtlLimits, miss_limit: u32) -> Option<BTreeSet<IpAddr>> {
        self.next_resolve = limits.next(now, answer);
        let miss = |me: &mut NamedBackend, why: String| {
            me.misses = me.misses.saturating_add(1);
            me.last_error = Some(why);
            (me.misses >= miss_limit.max(1)).then(BTreeSet::new)
        };
        match answer {
            Resolution::Addrs { addrs, ttl } => {
                self.last_answer = now;
                self.ttl = *ttl;
                let want: BTreeSet<IpAddr> = addrs.iter().copied().filter(|a| a.is_ipv4() == v4).collect();
                if want.is_empty() {
                    return miss(self, "no address of the service's family".into());
                }
                self.misses = 0;
                self.last_error = None;
                Some(want)
            }
            Resolution::NoSuchName => {
                self.last_answer = now;
                miss(self, "no such name".into())
            }
            Resolution::Failed(e) => {
                if now.saturating_duration_since(self.last_answer) < limits.max {
                    // A dead server keeps the last answer, up to the
                    // maximum TTL.
                    self.last_error = Some(e.clone());
                    return None;
                }
                miss(self, format!("{e} (failing for longer than --dns-max-ttl)"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(v: &[&str]) -> Resolution {
        Resolution::Addrs { addrs: v.iter().map(|a| a.parse().expect("ip")).collect(), ttl: Duration::from_secs(5) }
    }

    #[test]
    fn one_missing_answer_changes_nothing_three_remove_the_addresses() {
        let now = Instant::now();
        let limits = TtlLimits::default();
        let mut n = NamedBackend::due(1, BTreeSet::new(), now);
        assert_eq!(n.take_answer(&addrs(&["10.1.1.2", "10.1.1.3"]), true, now, &limits, 3).map(|s| s.len()), Some(2));
        assert_eq!(n.take_answer(&Resolution::NoSuchName, true, now, &limits, 3), None, "one NXDOMAIN is a blip");
        assert_eq!(n.take_answer(&Resolution::NoSuchName, true, now, &limits, 3), None);
        assert_eq!(n.take_answer(&Resolution::NoSuchName, true, now, &limits, 3), Some(BTreeSet::new()), "the third in a row removes them");
        // A good answer resets the count.
        n.take_answer(&addrs(&["10.1.1.2"]), true, now, &limits, 3);
        assert_eq!(n.misses, 0);
        assert_eq!(n.take_answer(&addrs(&["fd01::2"]), true, now, &limits, 3), None, "only the other family: a miss");
        assert_eq!(
            n.take_answer(&addrs(&["10.1.1.9"]), true, now, &limits, 3).map(|s| s.into_iter().collect::<Vec<_>>()),
            Some(vec!["10.1.1.9".parse().expect("ip")]),
            "a changed answer takes effect at once"
        );
    }

    #[test]
    fn a_dead_server_keeps_the_last_answer_until_the_maximum_ttl() {
        let now = Instant::now();
        let limits = TtlLimits { min: Duration::from_secs(1), max: Duration::from_secs(60) };
        let mut n = NamedBackend::due(1, BTreeSet::new(), now);
        n.take_answer(&addrs(&["10.1.1.2"]), true, now, &limits, 2);
        let failed = Resolution::Failed("timeout".into());
        assert_eq!(n.take_answer(&failed, true, now + Duration::from_secs(30), &limits, 2), None);
        assert_eq!(n.take_answer(&failed, true, now + Duration::from_secs(61), &limits, 2), None, "past the maximum: a miss, one of two");
        assert_eq!(n.take_answer(&failed, true, now + Duration::from_secs(62), &limits, 2), Some(BTreeSet::new()));
    }

    #[test]
    fn backend_specs_parse_as_addresses_or_names() {
        assert_eq!("10.1.1.2:80".parse::<BackendSpec>(), Ok(BackendSpec::Addr("10.1.1.2:80".parse().expect("addr"))));
        assert_eq!("[fd01::2]:80".parse::<BackendSpec>(), Ok(BackendSpec::Addr("[fd01::2]:80".parse().expect("addr"))));
        assert_eq!("App.Internal.:8080".parse::<BackendSpec>(), Ok(BackendSpec::Name(HostPort { host: "app.internal".into(), port: 8080 })));
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
