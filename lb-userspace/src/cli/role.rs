//! `xlb role`: keepalived's notify hook switches the node's sync role.

use std::process::ExitCode;

use clap::Args;

use super::{Cli, exchange, text, values};
use crate::{api::Request, ha::Role};

#[derive(Debug, Args)]
pub struct RoleArgs {
    #[arg(value_parser = values::parser::<values::Role>())]
    role: Role,
}

pub fn run(cli: &Cli, args: &RoleArgs) -> ExitCode {
    exchange(cli, &Request::Role { role: args.role }, |data| {
        println!("role {} (was {})", text(&data, "role"), text(&data, "previous"));
        ExitCode::SUCCESS
    })
}
