//! `xlb export`: the whole configuration, in the form `xlb apply` takes.

use std::process::ExitCode;

use super::{Cli, exchange};
use crate::api::Request;

pub fn run(cli: &Cli) -> ExitCode {
    exchange(cli, &Request::Export, |data| {
        println!("{}", serde_json::to_string_pretty(&data).unwrap_or_default());
        ExitCode::SUCCESS
    })
}
