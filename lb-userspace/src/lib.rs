//! xlb's controller: data-plane access, the service model, the control API,
//! and the CLI that drives it.
pub mod api;
pub mod cli;
pub mod controller;
pub mod daemon;
pub mod dataplane;
pub mod dns;
pub mod ha;
pub mod health;
pub mod host;
pub mod model;
pub mod resets;
