//! Declarative configuration: `xlb export` prints the whole configuration,
//! `xlb apply -f FILE` makes the running balancer match a file of the same
//! form, changing only what differs.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::{api::Proto, policy::ServiceSettings};

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
