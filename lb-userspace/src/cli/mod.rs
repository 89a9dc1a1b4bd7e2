//! Command-line interface: the verbs (one module each) and the output they
//! share. The clap types live only here, so the model and API types they
//! turn into stay serde-only. Exit codes: 0 success, 1 runtime failure
//! (daemon unreachable, request refused), 2 bad usage (also a request the
//! daemon calls bad).

pub mod apply;
pub mod backend;
pub mod backend_setup;
pub mod client;
pub mod daemon_args;
pub mod detach;
pub mod export;
pub mod flows;
pub mod health;
pub mod role;
pub mod service;
pub mod status;
pub mod top;
pub mod values;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::api::{ErrorCode, Request};

pub use daemon_args::DaemonArgs;

pub const DEFAULT_SOCKET: &str = "/run/xlb/xlb.sock";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xlb";
pub const DEFAULT_STATE_FILE: &str = "/run/xlb/state.json";

pub const EXIT_RUNTIME: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(name = "xlb", version, about = "XDP layer-4 load balancer")]
pub struct Cli {
    /// Control socket of the daemon.
    #[arg(long, global = true, env = "XLB_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the XDP program, attach it and serve the control API.
    Daemon(DaemonArgs),
    /// Add or remove services (VIP:PORT/proto).
    #[command(subcommand)]
    Service(service::ServiceCmd),
    /// Add or remove a service's backends.
    #[command(subcommand)]
    Backend(backend::BackendCmd),
    /// Services, backends, counters and the connection table.
    Status,
    /// A live view of services and backends, refreshed every second (q quits).
    Top,
    /// Print the whole configuration as JSON (the form `apply` takes).
    Export,
    /// Make the running configuration match FILE (as written by `export`),
    /// printing what changes.
    Apply(apply::ApplyArgs),
    /// Remove a data plane left running by a stopped daemon: detach its XDP
    /// program and delete its pins and state (its connections are lost).
    Detach(detach::DetachArgs),
    /// Set this node's role in an active/standby pair (keepalived's notify
    /// hook): master sends its flow state to the peer, backup installs it.
    Role(role::RoleArgs),
    /// Prepare this host as a DSR backend (`--mode dsr` services): attach
    /// the IPIP decapsulation program to IFACE (pinned: it stays), put the
    /// VIPs on lo and keep the host from answering ARP for them.
    BackendSetup(backend_setup::BackendSetupArgs),
    /// Exit 0 when the daemon answers and its program is attached (for
    /// keepalived's track script), 1 otherwise.
    Health,
    /// List the flows in the connection table.
    Flows(flows::FlowsArgs),
}

/// Runs every verb but `daemon` (main starts that one: it needs a runtime).
pub fn run(cli: &Cli) -> ExitCode {
    match &cli.command {
        Command::Daemon(_) => {
            eprintln!("xlb: internal error: this command is not a control API request");
            ExitCode::from(EXIT_USAGE)
        }
        Command::Service(cmd) => service::run(cli, cmd),
        Command::Backend(cmd) => backend::run(cli, cmd),
        Command::Status => status::run(cli),
        Command::Top => match top::run(&cli.socket) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("xlb: {e:#}");
                ExitCode::from(EXIT_RUNTIME)
            }
        },
        Command::Export => export::run(cli),
        Command::Apply(args) => apply::run(cli, args),
        Command::Detach(args) => detach::run(cli, args),
        Command::Role(args) => role::run(cli, args),
        Command::BackendSetup(args) => backend_setup::run(args),
        Command::Health => health::run(cli),
        Command::Flows(args) => flows::run(cli, args),
    }
}

/// Sends `req` and reports the answer: with `--json` the whole response;
/// otherwise an error on stderr, or `human` given the response's data
/// (null when it has none). Exit code 2 when the daemon calls the request
/// bad, 1 for any other refusal or when the daemon cannot be reached.
pub(crate) fn exchange(cli: &Cli, req: &Request, human: impl FnOnce(Value) -> ExitCode) -> ExitCode {
    exchange_judged(cli, req, |_| true, human)
}

/// As [`exchange`], for answers that can say "no" without being errors
/// (`health`): with `--json`, `success` judges the data for the exit code.
pub(crate) fn exchange_judged(cli: &Cli, req: &Request, success: impl FnOnce(&Value) -> bool, human: impl FnOnce(Value) -> ExitCode) -> ExitCode {
    let resp = match client::call(&cli.socket, req) {
        Ok(r) => r,
        Err(e) => {
            if cli.json {
                println!("{}", serde_json::json!({ "ok": false, "error": { "code": "unreachable", "message": format!("{e:#}") } }));
            } else {
                eprintln!("xlb: {e:#}");
            }
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&resp).unwrap_or_default());
    }
    if let Some(err) = &resp.error {
        if !cli.json {
            eprintln!("xlb: {}", err.message);
        }
        return ExitCode::from(if err.code == ErrorCode::BadRequest { EXIT_USAGE } else { EXIT_RUNTIME });
    }
    let data = resp.data.unwrap_or_default();
    if cli.json {
        return if success(&data) { ExitCode::SUCCESS } else { ExitCode::from(EXIT_RUNTIME) };
    }
    human(data)
}

/// `data[key]` as text, `?` when it is missing or not a string.
pub(crate) fn text(data: &Value, key: &str) -> String {
    data[key].as_str().unwrap_or("?").to_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn clap_definitions_are_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
