//! `xlb detach`: cleans up after a daemon that left its data plane
//! running. Refuses while a daemon serves the socket.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;

use super::{Cli, DEFAULT_PIN_DIR, DEFAULT_STATE_FILE, EXIT_RUNTIME};

#[derive(Debug, Args)]
pub struct DetachArgs {
    /// bpffs directory of the pins.
    #[arg(long, default_value = DEFAULT_PIN_DIR, value_name = "DIR")]
    pin_dir: PathBuf,
    /// The daemon's state file.
    #[arg(long, default_value = DEFAULT_STATE_FILE, value_name = "FILE")]
    state_file: PathBuf,
}

pub fn run(cli: &Cli, args: &DetachArgs) -> ExitCode {
    let DetachArgs { pin_dir, state_file } = args;
    if std::os::unix::net::UnixStream::connect(&cli.socket).is_ok() {
        eprintln!("xlb: a daemon is serving {}: stop it first (or run it with --detach-on-exit)", cli.socket.display());
        return ExitCode::from(EXIT_RUNTIME);
    }
    let links = crate::dataplane::pinned_links(pin_dir);
    let had_pins = pin_dir.exists();
    for iface in &links {
        if let Err(e) = crate::dataplane::unpin_link(pin_dir, iface) {
            eprintln!("xlb: detaching from {iface}: {e}");
        }
    }
    crate::dataplane::remove_pins(pin_dir);
    // The host settings the daemon changed go back as they were.
    let saved: Option<crate::controller::SavedState> = std::fs::read_to_string(state_file).ok().and_then(|t| serde_json::from_str(&t).ok());
    if let Some(state) = &saved {
        crate::host::sysctl::undo(&crate::host::sysctl::Sysctl::default(), &state.host_changes);
        crate::host::neighbours::forget_all(&state.managed_neighbours);
    }
    let had_state = std::fs::remove_file(state_file).is_ok();
    if pin_dir.exists() {
        eprintln!("xlb: {} still exists: remove what else is in it by hand", pin_dir.display());
        return ExitCode::from(EXIT_RUNTIME);
    }
    let msg = if had_pins || had_state {
        format!(
            "detached from {} interface(s); removed {}{}",
            links.len(),
            if had_pins { pin_dir.display().to_string() } else { String::new() },
            if had_state { format!(" and {}", state_file.display()) } else { String::new() }
        )
    } else {
        "nothing to detach".to_owned()
    };
    if cli.json {
        println!("{}", serde_json::json!({ "ok": true, "data": { "interfaces": links, "message": msg } }));
    } else {
        println!("{msg}");
    }
    ExitCode::SUCCESS
}
