//! The daemon's DNS client for backends given by name (the names, answers
//! and rules are in `model::named`).

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

pub use crate::model::named::{BackendSpec, HostPort, Resolution, TtlLimits};

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
