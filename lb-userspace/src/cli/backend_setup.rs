//! `xlb backend-setup`: prepares a DSR backend host (see the command's
//! help). It talks to no daemon: the backend runs none.

use std::{net::Ipv4Addr, path::PathBuf, process::ExitCode};

use clap::Args;

use super::{EXIT_RUNTIME, values};
use crate::model::AttachMode;

#[derive(Debug, Args)]
pub struct BackendSetupArgs {
    /// The interface the balancers' encapsulated packets arrive on.
    #[arg(long)]
    iface: String,
    /// A VIP this backend serves (repeatable).
    #[arg(long = "vip", value_name = "ADDR", required_unless_present = "remove")]
    vips: Vec<Ipv4Addr>,
    #[arg(long, value_parser = values::parser::<values::AttachMode>(), default_value = "auto")]
    xdp_mode: AttachMode,
    /// bpffs directory for the pinned link.
    #[arg(long, default_value = "/sys/fs/bpf/xlb-decap", value_name = "DIR")]
    pin_dir: PathBuf,
    /// Undo: detach the program and take the given VIPs off lo.
    #[arg(long)]
    remove: bool,
}

pub fn run(args: &BackendSetupArgs) -> ExitCode {
    let BackendSetupArgs { iface, vips, xdp_mode, pin_dir, remove } = args;
    let ip = |args: &[&str]| -> Result<(), String> {
        let out = std::process::Command::new("ip").args(args).output().map_err(|e| format!("running ip: {e} (is iproute2 installed?)"))?;
        if out.status.success() { Ok(()) } else { Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())) }
    };
    let link = pin_dir.join(format!("link_{iface}"));
    let result = (|| -> Result<String, String> {
        if *remove {
            if link.exists() {
                crate::dataplane::unpin_link(pin_dir, iface).map_err(|e| format!("detaching {}: {e}", link.display()))?;
            }
            for v in vips {
                let _ = ip(&["addr", "del", &format!("{v}/32"), "dev", "lo"]);
            }
            return Ok(format!("decapsulation detached from {iface}; {} VIP(s) taken off lo", vips.len()));
        }
        for v in vips {
            ip(&["addr", "replace", &format!("{v}/32"), "dev", "lo"])?;
        }
        // The VIPs live on lo: never answer ARP for them on the network
        // (the balancers own them there), nor announce them as sources.
        for (key, value) in [("all/arp_ignore", "1"), ("all/arp_announce", "2")] {
            std::fs::write(format!("/proc/sys/net/ipv4/conf/{key}"), value).map_err(|e| format!("setting net.ipv4.conf.{key}: {e}"))?;
        }
        if link.exists() {
            crate::dataplane::unpin_link(pin_dir, iface).map_err(|e| format!("replacing {}: {e}", link.display()))?;
        }
        let mode = crate::dataplane::attach_decap_pinned(iface, *xdp_mode, &link).map_err(|e| e.to_string())?;
        Ok(format!(
            "decapsulating IPIP on {iface} ({mode} XDP, link pinned at {}); VIPs on lo: {}",
            link.display(),
            vips.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")
        ))
    })();
    match result {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xlb: backend-setup: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}
