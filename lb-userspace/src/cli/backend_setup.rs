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
    /// Largest MSS this host's SYN-ACKs from the VIPs announce, so that
    /// clients' segments still fit the balancer's link once encapsulated:
    /// `auto` (the interface's MTU less the 20-byte IPIP header and 40
    /// bytes of IPv4 and TCP headers: 1440 at MTU 1500), a number of
    /// bytes, or `off`. A TC egress program on --iface (Linux 6.6+).
    #[arg(long, value_name = "auto|off|BYTES", default_value = "auto", value_parser = parse_mss_clamp)]
    mss_clamp: MssClamp,
    /// Undo: detach the programs and take the given VIPs off lo.
    #[arg(long)]
    remove: bool,
}

/// `--mss-clamp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MssClamp {
    Auto,
    Off,
    Bytes(u16),
}

/// IPIP, IPv4 and TCP headers: what a client's segment carries on the
/// balancer's link besides its MSS worth of payload.
const TUNNEL_OVERHEAD: u32 = 20 + 20 + 20;
/// The smallest MSS an IPv4 host must accept (RFC 9293, 576-byte datagrams).
const MIN_MSS: u16 = 536;

fn parse_mss_clamp(s: &str) -> Result<MssClamp, String> {
    match s {
        "auto" => Ok(MssClamp::Auto),
        "off" => Ok(MssClamp::Off),
        n => match n.parse::<u16>() {
            Ok(b) if b >= MIN_MSS => Ok(MssClamp::Bytes(b)),
            _ => Err(format!("expected auto, off or a number of bytes from {MIN_MSS} to 65535, got {n:?}")),
        },
    }
}

/// The MSS `clamp` comes to on an interface of `mtu` bytes (`None`: off).
fn mss_limit(clamp: MssClamp, mtu: u32) -> Result<Option<u16>, String> {
    match clamp {
        MssClamp::Off => Ok(None),
        MssClamp::Bytes(b) => Ok(Some(b)),
        MssClamp::Auto => match mtu.checked_sub(TUNNEL_OVERHEAD).and_then(|m| u16::try_from(m).ok()) {
            Some(m) if m >= MIN_MSS => Ok(Some(m)),
            _ => Err(format!("an interface MTU of {mtu} leaves no usable MSS once encapsulated: give --mss-clamp BYTES or off")),
        },
    }
}

/// `iface`'s MTU, from `ip -o link show`.
fn iface_mtu(iface: &str) -> Result<u32, String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show", "dev", iface])
        .output()
        .map_err(|e| format!("running ip: {e} (is iproute2 installed?)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    words
        .by_ref()
        .find(|w| *w == "mtu")
        .and(words.next())
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| format!("reading the MTU of {iface}: {}", String::from_utf8_lossy(&out.stderr).trim()))
}

pub fn run(args: &BackendSetupArgs) -> ExitCode {
    let BackendSetupArgs { iface, vips, xdp_mode, pin_dir, mss_clamp, remove } = args;
    let ip = |args: &[&str]| -> Result<(), String> {
        let out = std::process::Command::new("ip").args(args).output().map_err(|e| format!("running ip: {e} (is iproute2 installed?)"))?;
        if out.status.success() { Ok(()) } else { Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())) }
    };
    let link = pin_dir.join(format!("link_{iface}"));
    let mss_link = pin_dir.join(format!("mss_{iface}"));
    let unpin_mss = || -> Result<(), String> {
        match std::fs::remove_file(&mss_link) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("detaching the MSS clamp ({}): {e}", mss_link.display())),
        }
    };
    let result = (|| -> Result<String, String> {
        if *remove {
            if link.exists() {
                crate::dataplane::unpin_link(pin_dir, iface).map_err(|e| format!("detaching {}: {e}", link.display()))?;
            }
            unpin_mss()?;
            for v in vips {
                let _ = ip(&["addr", "del", &format!("{v}/32"), "dev", "lo"]);
            }
            return Ok(format!("decapsulation detached from {iface}; {} VIP(s) taken off lo", vips.len()));
        }
        // Decided before anything changes: a bad MTU leaves the host as it was.
        let limit = mss_limit(*mss_clamp, if *mss_clamp == MssClamp::Auto { iface_mtu(iface)? } else { 0 })?;
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
        // The clamp is replaced whole (a pinned TCX link detaches when its
        // pin goes): a moment without it costs at most a too-big answer.
        unpin_mss()?;
        let clamp = match limit {
            Some(mss) => {
                let limits: Vec<_> = vips.iter().map(|v| (std::net::IpAddr::V4(*v), mss)).collect();
                match crate::dataplane::attach_mss_clamp_pinned(iface, &limits, &mss_link) {
                    Ok(()) => format!("SYN-ACKs from the VIPs announce an MSS of at most {mss} (TC egress, link pinned at {})", mss_link.display()),
                    // Asked for: an error. The default: the decapsulation
                    // works without it (clients' full-size segments get
                    // too-big answers from the balancer instead), so say
                    // so and go on.
                    Err(e) if *mss_clamp != MssClamp::Auto => return Err(e.to_string()),
                    Err(e) => {
                        eprintln!("xlb: backend-setup: warning: no MSS clamp ({e}); clients' full-size segments will need the balancer's too-big answers");
                        format!("no MSS clamp ({e})")
                    }
                }
            }
            None => "no MSS clamp".to_owned(),
        };
        Ok(format!(
            "decapsulating IPIP on {iface} ({mode} XDP, link pinned at {}); VIPs on lo: {}; {clamp}",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clamp_parses_and_auto_leaves_room_for_the_tunnel() {
        assert_eq!(parse_mss_clamp("auto"), Ok(MssClamp::Auto));
        assert_eq!(parse_mss_clamp("off"), Ok(MssClamp::Off));
        assert_eq!(parse_mss_clamp("1400"), Ok(MssClamp::Bytes(1400)));
        for bad in ["", "0", "535", "65536", "-1", "1e3", "on"] {
            let e = parse_mss_clamp(bad).expect_err(bad);
            assert!(e.contains("auto, off or a number"), "{bad}: {e}");
        }
        assert_eq!(mss_limit(MssClamp::Auto, 1500), Ok(Some(1440)));
        assert_eq!(mss_limit(MssClamp::Auto, 9000), Ok(Some(8940)));
        assert_eq!(mss_limit(MssClamp::Bytes(1300), 1500), Ok(Some(1300)));
        assert_eq!(mss_limit(MssClamp::Off, 1500), Ok(None));
        for tiny in [0, 60, 595] {
            assert!(mss_limit(MssClamp::Auto, tiny).is_err(), "MTU {tiny}");
        }
    }
}
