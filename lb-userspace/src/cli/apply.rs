//! `xlb apply`: sends a whole configuration; the daemon works out and
//! reports the changes. The file is read and checked here, so a bad file
//! is bad usage before anything is sent.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;

use super::{Cli, EXIT_RUNTIME, EXIT_USAGE, exchange};
use crate::api::{Request, desired::Desired};

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: PathBuf,
    /// Show the changes without applying them.
    #[arg(long)]
    dry_run: bool,
}

pub fn run(cli: &Cli, args: &ApplyArgs) -> ExitCode {
    let text = match std::fs::read_to_string(&args.file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("xlb: reading {}: {e}", args.file.display());
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let config = match Desired::parse(&text) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("xlb: {}: {e}", args.file.display());
            return ExitCode::from(EXIT_USAGE);
        }
    };
    exchange(cli, &Request::Apply { config, dry_run: args.dry_run }, |data| {
        let changes: Vec<String> = serde_json::from_value(data["changes"].clone()).unwrap_or_default();
        if changes.is_empty() {
            println!("nothing to change");
        }
        for c in changes {
            println!("{}{c}", if args.dry_run { "would " } else { "" });
        }
        ExitCode::SUCCESS
    })
}
