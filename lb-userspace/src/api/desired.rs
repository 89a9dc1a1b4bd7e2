//! Declarative configuration: `xlb export` prints the whole configuration,
//! `xlb apply -f FILE` makes the running balancer match a file of the same
//! form, changing only what differs.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::model::{Proto, settings::ServiceSettings};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Desired {
    #[serde(default)]
    pub services: Vec<DesiredService>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredService {
    pub service: SocketAddr,
    pub proto: Proto,
    #[serde(default)]
    pub settings: ServiceSettings,
    #[serde(default)]
    pub backends: Vec<DesiredBackend>,
    /// Backends given by DNS name (their current addresses are not listed
    /// under `backends`: they follow the name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub named_backends: Vec<DesiredNamed>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredNamed {
    /// `NAME:PORT`.
    #[serde(with = "host_port")]
    pub backend: crate::model::HostPort,
    #[serde(default = "one")]
    pub weight: u32,
}

/// `HostPort` as its `NAME:PORT` string.
mod host_port {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &crate::model::HostPort, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(h)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<crate::model::HostPort, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredBackend {
    pub backend: SocketAddr,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

impl Desired {
    /// Parses a file's text; errors say where (line, column, field).
    pub fn parse(text: &str) -> Result<Desired, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }
}
