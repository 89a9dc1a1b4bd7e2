//! The TOML configuration file applied at start:
//!
//! ```toml
//! [[service]]
//! vip = "10.99.0.1:80"
//! proto = "tcp"            # default tcp
//!
//! [service.settings]      # all optional
//! on_remove = "drain:30s"  # reset | keep | drain:DURATION
//! health = "http:/healthz" # tcp | http:/PATH
//! fall = 2
//!
//! [[service.backend]]
//! addr = "10.1.1.2:8080"
//! weight = 2               # default 1
//! ```
//!
//! Unknown keys are errors (a typo must not silently drop a setting). The
//! file becomes a whole desired configuration, checked and applied as
//! `xlb apply` does.

use std::{net::SocketAddr, path::Path};

use anyhow::Context as _;
use serde::Deserialize;

use crate::{
    api::desired::{Desired, DesiredBackend, DesiredNamed, DesiredService},
    model::{BackendSpec, Proto, settings::ServiceSettings},
};

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub vip: SocketAddr,
    #[serde(default = "default_proto")]
    pub proto: Proto,
    /// Policies and health check (see `xlb service add --help`).
    #[serde(default)]
    pub settings: crate::model::settings::ServiceOptions,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// `IP:PORT`, or `NAME:PORT` (resolved by the daemon, and again on the
    /// record's TTL).
    pub addr: BackendSpec,
    pub weight: Option<u32>,
}

fn default_proto() -> Proto {
    Proto::Tcp
}

impl Config {
    pub fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("config file {}", path.display()))
    }

    /// The file as a whole desired configuration: the daemon applies it as
    /// `xlb apply` does (every check before the first map write).
    pub fn desired(&self) -> anyhow::Result<Desired> {
        let mut services = Vec::with_capacity(self.services.len());
        for (i, s) in self.services.iter().enumerate() {
            let settings = ServiceSettings::default()
                .patched(&s.settings)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("config: service[{i}] {}/{}: settings", s.vip, s.proto))?;
            let (mut backends, mut named_backends) = (Vec::new(), Vec::new());
            for b in &s.backends {
                let weight = b.weight.unwrap_or(1);
                match &b.addr {
                    BackendSpec::Addr(a) => backends.push(DesiredBackend { backend: *a, weight }),
                    BackendSpec::Name(n) => named_backends.push(DesiredNamed { backend: n.clone(), weight }),
                }
            }
            services.push(DesiredService { service: s.vip, proto: s.proto, settings, backends, named_backends });
        }
        Ok(Desired { services })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_services_and_backends_with_defaults() {
        let c = Config::parse(
            r#"
            [[service]]
            vip = "10.99.0.1:80"
            [[service.backend]]
            addr = "10.1.1.2:8080"
            weight = 3
            [[service]]
            vip = "10.99.0.1:53"
            proto = "udp"
            "#,
        )
        .expect("valid config");
        assert_eq!(c.services.len(), 2);
        assert_eq!(c.services[0].proto, Proto::Tcp);
        assert_eq!(c.services[0].backends[0].weight, Some(3));
        assert_eq!(c.services[1].proto, Proto::Udp);
        assert!(c.services[1].backends.is_empty());
    }

    #[test]
    fn rejects_unknown_keys_bad_addresses_and_protocols() {
        let typo = Config::parse("[[service]]\nvip = \"10.0.0.1:80\"\nbackends = []\n").expect_err("must be refused");
        assert!(typo.to_string().contains("unknown field `backends`"), "{typo}");
        let bad_addr = Config::parse("[[service]]\nvip = \"10.0.0.999:80\"\n").expect_err("must be refused");
        assert!(bad_addr.to_string().contains("vip"), "{bad_addr}");
        let bad_proto = Config::parse("[[service]]\nvip = \"10.0.0.1:80\"\nproto = \"sctp\"\n").expect_err("must be refused");
        assert!(bad_proto.to_string().contains("sctp"), "{bad_proto}");
        let no_port = Config::parse("[[service]]\nvip = \"10.0.0.1\"\n").expect_err("must be refused");
        assert!(no_port.to_string().contains("vip"), "{no_port}");
    }
}

#[cfg(test)]
mod example {
    /// The example shipped in packaging/ parses.
    #[test]
    fn the_packaged_example_config_is_valid() {
        let text = include_str!("../../../packaging/xlb.toml");
        let c = super::Config::parse(text).expect("packaging/xlb.toml must parse");
        assert_eq!(c.services.len(), 2);
        let s = crate::model::settings::ServiceSettings::default().patched(&c.services[0].settings).expect("valid settings");
        assert_eq!(s.health.map(|h| h.fall), Some(3));
    }
}
