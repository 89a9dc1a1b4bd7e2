//! `xlb flows`: the connection table, whole or for one service or backend.

use std::{net::SocketAddr, process::ExitCode};

use clap::Args;

use super::{Cli, exchange, values};
use crate::api::{FlowInfo, Proto, Request};

#[derive(Debug, Args)]
pub struct FlowsArgs {
    /// Only this service's flows.
    #[arg(long, value_name = "VIP:PORT")]
    service: Option<SocketAddr>,
    /// Protocol of --service, when both tcp and udp are served there.
    #[arg(long, requires = "service", value_parser = values::parser::<values::Proto>())]
    proto: Option<Proto>,
    /// Only this backend's flows (who would be reset if it went now).
    #[arg(long, value_name = "IP:PORT")]
    backend: Option<SocketAddr>,
}

pub fn run(cli: &Cli, args: &FlowsArgs) -> ExitCode {
    let req = Request::Flows { service: args.service, proto: args.proto, backend: args.backend };
    exchange(cli, &req, |data| {
        match serde_json::from_value::<Vec<FlowInfo>>(data) {
            Ok(f) => print!("{}", render_flows(&f)),
            Err(e) => eprintln!("xlb: unexpected flow list from the daemon: {e}"),
        }
        ExitCode::SUCCESS
    })
}

pub fn render_flows(flows: &[FlowInfo]) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    // Full-NAT flows also show the balancer address the backend sees.
    let snat = flows.iter().any(|f| f.snat.is_some());
    let _ = write!(o, "{:<22} {:<22} {:<5} {:<22} {:<12} {:>8} {:>8}", "CLIENT", "SERVICE", "PROTO", "BACKEND", "STATE", "AGE_S", "IDLE_S");
    let _ = writeln!(o, "{}", if snat { "  SNAT" } else { "" });
    for f in flows {
        let _ = write!(o, "{:<22} {:<22} {:<5} {:<22} {:<12} {:>8.1} {:>8.1}", f.client, f.service, f.proto, f.backend, f.state, f.age_s, f.idle_s);
        let _ = writeln!(o, "{}", f.snat.map(|a| format!("  {a}")).unwrap_or_default());
    }
    let _ = writeln!(o, "{} flows", flows.len());
    o
}
