//! `xlb backend add|set|remove`.

use std::{net::SocketAddr, process::ExitCode};

use clap::Subcommand;

use super::{Cli, exchange, text, values};
use crate::{
    api::{Proto, Request},
    dns::BackendSpec,
};

#[derive(Debug, Subcommand)]
pub enum BackendCmd {
    /// Register a backend on a service.
    Add {
        #[arg(value_name = "VIP:PORT")]
        service: SocketAddr,
        /// IP:PORT, or NAME:PORT: resolved now and again on its record's TTL.
        #[arg(value_name = "BACKEND")]
        backend: BackendSpec,
        /// Relative share of new flows (1-10000).
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Needed only when both tcp and udp are served on VIP:PORT.
        #[arg(long, value_parser = values::parser::<values::Proto>())]
        proto: Option<Proto>,
    },
    /// Change a registered backend's weight.
    Set {
        #[arg(value_name = "VIP:PORT")]
        service: SocketAddr,
        #[arg(value_name = "BACKEND")]
        backend: BackendSpec,
        #[arg(long)]
        weight: u32,
        #[arg(long, value_parser = values::parser::<values::Proto>())]
        proto: Option<Proto>,
    },
    /// Deregister a backend; its flows are removed from the table.
    Remove {
        #[arg(value_name = "VIP:PORT")]
        service: SocketAddr,
        #[arg(value_name = "BACKEND")]
        backend: BackendSpec,
        #[arg(long, value_parser = values::parser::<values::Proto>())]
        proto: Option<Proto>,
    },
}

pub fn run(cli: &Cli, cmd: &BackendCmd) -> ExitCode {
    let req = match cmd {
        BackendCmd::Add { service, backend, weight, proto } => {
            Request::BackendAdd { service: *service, proto: *proto, backend: backend.clone(), weight: Some(*weight) }
        }
        BackendCmd::Set { service, backend, weight, proto } => {
            Request::BackendSet { service: *service, proto: *proto, backend: backend.clone(), weight: *weight }
        }
        BackendCmd::Remove { service, backend, proto } => Request::BackendRemove { service: *service, proto: *proto, backend: backend.clone() },
    };
    exchange(cli, &req, |data| {
        let (backend, service, proto) = (text(&data, "backend"), text(&data, "service"), text(&data, "proto"));
        match cmd {
            BackendCmd::Add { .. } => println!("backend {backend} added to {service}/{proto}"),
            BackendCmd::Set { .. } => println!("backend {backend} on {service}/{proto}: weight {} -> {}", data["old_weight"], data["weight"]),
            BackendCmd::Remove { .. } => {
                println!("backend {backend} removed from {service}/{proto} ({} active flows, policy {})", data["active_flows"], text(&data, "policy"))
            }
        }
        ExitCode::SUCCESS
    })
}
