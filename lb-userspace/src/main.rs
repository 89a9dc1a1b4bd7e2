use std::process::ExitCode;

use clap::Parser as _;
use xlb::cli::{Cli, Command, EXIT_RUNTIME};

fn main() -> ExitCode {
    // Usage errors exit 2 (clap's convention); --help/--version exit 0.
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("XLB_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).with_writer(std::io::stderr).init();

    match cli.command {
        Command::Daemon(args) => {
            let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("xlb: starting the async runtime: {e}");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            };
            match rt.block_on(xlb::daemon::run(args, cli.socket)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("xlb: {e:#}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
        _ => xlb::cli::run(&cli),
    }
}
