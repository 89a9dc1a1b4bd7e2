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
//! entries go through the same controller operations as API requests.

use std::{net::SocketAddr, path::Path};

use anyhow::Context as _;
use serde::Deserialize;

use crate::{api::Proto, controller::Controller};

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
    pub addr: crate::dns::BackendSpec,
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

    /// Applies every entry; the first failure names the entry.
    pub fn apply(&self, ctl: &mut Controller) -> anyhow::Result<()> {
        let mut res = Ok(());
        // One ring build per service, not one per backend.
        let built = ctl.batch(|ctl| {
            res = self.apply_all(ctl);
            Ok(())
        });
        res?;
        built.context("config: building the scheduling rings")
    }

    fn apply_all(&self, ctl: &mut Controller) -> anyhow::Result<()> {
        for (i, s) in self.services.iter().enumerate() {
            ctl.service_add(s.vip, s.proto, &s.settings)
                .with_context(|| format!("config: service[{i}] {}/{}", s.vip, s.proto))?;
            for (j, b) in s.backends.iter().enumerate() {
                let res = match &b.addr {
                    crate::dns::BackendSpec::Addr(a) => ctl.backend_add(s.vip, Some(s.proto), *a, b.weight).map(drop),
                    crate::dns::BackendSpec::Name(n) => {
                        let sid = crate::controller::ServiceId { addr: s.vip, proto: s.proto };
                        ctl.named_register(sid, n.clone(), b.weight.unwrap_or(1))
                    }
                };
                res.with_context(|| format!("config: service[{i}] {}/{}: backend[{j}] {}", s.vip, s.proto, b.addr))?;
            }
        }
        Ok(())
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
