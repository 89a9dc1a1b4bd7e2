//! `xlb health`: keepalived's track script. Healthy means the controller
//! answers and the kernel runs the daemon's program on every managed
//! interface; it never walks the table, so it costs the same at a million
//! flows as at none. Exit 0 healthy, 1 not (also with `--json`).

use std::process::ExitCode;

use super::{Cli, EXIT_RUNTIME, exchange_judged};
use crate::api::{Liveness, Request};

pub fn run(cli: &Cli) -> ExitCode {
    let healthy = |d: &serde_json::Value| d["healthy"] == serde_json::Value::Bool(true);
    exchange_judged(cli, &Request::Health, healthy, |data| match serde_json::from_value::<Liveness>(data) {
        Ok(l) if l.healthy => {
            let ifaces: Vec<&str> = l.interfaces.iter().map(|a| a.iface.as_str()).collect();
            println!("healthy: attached to {} (the controller answered in {:.1} ms)", ifaces.join(", "), l.controller_ms);
            ExitCode::SUCCESS
        }
        Ok(l) => {
            eprintln!("xlb: unhealthy: {}", l.problems.join("; "));
            ExitCode::from(EXIT_RUNTIME)
        }
        Err(e) => {
            eprintln!("xlb: unhealthy: unexpected answer from the daemon: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    })
}
