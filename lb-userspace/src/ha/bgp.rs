//! Announcing VIPs over BGP through BIRD (active/active behind ECMP): the
//! daemon writes an include file holding static protocols with the VIPs
//! while its data plane is healthy (attached), and an empty one otherwise,
//! then has BIRD re-read its configuration (`birdc configure`). BIRD does
//! the BGP; bird.conf exports `proto = "xlb_vips"` to the router.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

/// The include file for `vips` (announced) or none (withdrawn).
pub fn include_text(vips: &[IpAddr]) -> String {
    let mut v4: Vec<String> = vips.iter().filter(|a| a.is_ipv4()).map(|a| format!("  route {a}/32 blackhole;\n")).collect();
    let mut v6: Vec<String> = vips.iter().filter(|a| a.is_ipv6()).map(|a| format!("  route {a}/128 blackhole;\n")).collect();
    v4.sort();
    v4.dedup();
    v6.sort();
    v6.dedup();
    format!(
        "# Written by xlb: the VIPs this node announces while its data plane is healthy.\n\
         protocol static xlb_vips {{\n  ipv4;\n{}}}\nprotocol static xlb_vips6 {{\n  ipv6;\n{}}}\n",
        v4.concat(),
        v6.concat()
    )
}

/// Keeps BIRD's view in line with the data plane's health.
pub struct Announcer {
    include: PathBuf,
    socket: PathBuf,
    /// What BIRD last accepted.
    applied: Option<String>,
}

impl Announcer {
    pub fn new(include: PathBuf, socket: PathBuf) -> Announcer {
        Announcer { include, socket, applied: None }
    }

    /// Writes the include for `vips` and has BIRD reload it, if it changed
    /// (or the last reload failed). Returns whether BIRD has it.
    pub fn set(&mut self, vips: &[IpAddr]) -> bool {
        let text = include_text(vips);
        if self.applied.as_deref() == Some(text.as_str()) {
            return true;
        }
        match write_and_reload(&self.include, &self.socket, &text) {
            Ok(()) => {
                tracing::info!(vips = ?vips, "BIRD: announcing the VIPs listed (none: withdrawn)");
                self.applied = Some(text);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "BIRD did not take the VIP announcement (retrying)");
                false
            }
        }
    }
}

fn write_and_reload(include: &Path, socket: &Path, text: &str) -> Result<(), String> {
    let tmp = include.with_extension("tmp");
    std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, include)).map_err(|e| format!("writing {}: {e}", include.display()))?;
    let out =
        std::process::Command::new("birdc").arg("-s").arg(socket).arg("configure").output().map_err(|e| format!("running birdc: {e} (is BIRD installed?)"))?;
    let said = String::from_utf8_lossy(&out.stdout);
    if !out.status.success()
        || !(said.contains("Reconfigured") || said.contains("Reconfiguration in progress") || said.contains("Reconfiguration already in progress"))
    {
        return Err(format!("birdc configure: {} {}", said.trim(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_lists_each_vip_once_per_family_and_can_be_empty() {
        let v: Vec<IpAddr> = ["10.99.0.1", "fd99::1", "10.99.0.1"].iter().map(|a| a.parse().expect("ip")).collect();
        let t = include_text(&v);
        assert_eq!(t.matches("route 10.99.0.1/32 blackhole;").count(), 1, "{t}");
        assert!(t.contains("route fd99::1/128 blackhole;"), "{t}");
        let empty = include_text(&[]);
        assert!(empty.contains("protocol static xlb_vips {") && !empty.contains("route"), "{empty}");
    }
}
