//! xlb's controller: data-plane access, the service model, the control API,
//! and the CLI that drives it.
//!
//! The arrows point one way: `cli` → `api` → `model`; `daemon` →
//! `controller` → (`plan`, `table`, `resets`, `ha`, `host`, `dns`) →
//! `dataplane` → `lb_common`. `model` knows no tokio, clap or aya.
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
pub mod plan;
pub mod resets;
pub mod table;
