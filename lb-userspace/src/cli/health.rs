//! `xlb health`: keepalived's track script. Healthy means the daemon
//! answers and its program is attached somewhere.

use std::process::ExitCode;

use super::{Cli, EXIT_RUNTIME, exchange};
use crate::api::{Request, Status};

pub fn run(cli: &Cli) -> ExitCode {
    exchange(cli, &Request::Status, |data| match serde_json::from_value::<Status>(data) {
        Ok(s) if !s.interfaces.is_empty() => {
            println!("healthy: attached to {}", s.interfaces.iter().map(|a| a.iface.as_str()).collect::<Vec<_>>().join(", "));
            ExitCode::SUCCESS
        }
        Ok(_) => {
            eprintln!("xlb: unhealthy: the program is attached to no interface");
            ExitCode::from(EXIT_RUNTIME)
        }
        Err(e) => {
            eprintln!("xlb: unhealthy: unexpected status: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    })
}
