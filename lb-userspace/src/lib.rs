//! xlb's controller: data-plane access, the service model, the control API,
//! and the CLI that drives it.
pub mod api;
pub mod bgp;
pub mod cli;
pub mod client;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod dataplane;
pub mod flowlog;
pub mod declarative;
pub mod dns;
pub mod health;
pub mod host;
pub mod metrics;
pub mod neighbours;
pub mod policy;
pub mod resetter;
pub mod server;
pub mod sync;
pub mod top;
