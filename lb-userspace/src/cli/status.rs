//! `xlb status`: the daemon's status as a table (`top` is its live form).

use std::process::ExitCode;

use super::{Cli, exchange};
use crate::api::{Request, Status};

pub fn run(cli: &Cli) -> ExitCode {
    exchange(cli, &Request::Status, |data| {
        match serde_json::from_value::<Status>(data) {
            Ok(s) => print!("{}", render_status(&s)),
            Err(e) => eprintln!("xlb: unexpected status from the daemon: {e}"),
        }
        ExitCode::SUCCESS
    })
}

pub fn render_status(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let ifs: Vec<String> = s.interfaces.iter().map(|a| format!("{} ({})", a.iface, a.mode)).collect();
    let _ = writeln!(o, "interfaces: {}", if ifs.is_empty() { "none".into() } else { ifs.join(", ") });
    let _ = writeln!(
        o,
        "connection table: {} entries ({} flows capacity); half-open: {} entries ({} flows capacity)",
        s.table.entries, s.table.capacity_flows, s.table.half_open_entries, s.table.half_open_capacity_flows
    );
    let _ = writeln!(
        o,
        "\n{:<22} {:<22} {:<8} {:>6} {:>7} {:>10} {:>12} {:>10} {:>12} {:>9}",
        "SERVICE", "BACKEND", "STATE", "WEIGHT", "ACTIVE", "PKTS_IN", "BYTES_IN", "PKTS_OUT", "BYTES_OUT", "NEW"
    );
    for svc in &s.services {
        let t = &svc.traffic;
        let _ = writeln!(
            o,
            "{:<22} {:<22} {:<8} {:>6} {:>7} {:>10} {:>12} {:>10} {:>12} {:>9}",
            format!("{}/{}", svc.service, svc.proto),
            format!("({} backends)", svc.backends.len()),
            svc.scheduler,
            "",
            svc.active_flows,
            t.packets_in,
            t.bytes_in,
            t.packets_out,
            t.bytes_out,
            t.new_flows
        );
        for b in &svc.backends {
            let t = &b.traffic;
            let _ = writeln!(
                o,
                "{:<22} {:<22} {:<8} {:>6} {:>7} {:>10} {:>12} {:>10} {:>12} {:>9}",
                "", b.backend, b.state, b.weight, b.active_flows, t.packets_in, t.bytes_in, t.packets_out, t.bytes_out, t.new_flows
            );
            if let Some(r) = b.drain_remaining_s {
                let _ = writeln!(o, "{:<45} draining: {} flows left, reset in {:.1}s", "", b.active_flows, r);
            }
            if let Some(p) = &b.snat_ports {
                let _ = writeln!(o, "{:<45} full-NAT source ports in use: {} of {}", "", p.in_use, p.pool);
            }
            if let Some(e) = &b.last_health_error {
                let _ = writeln!(o, "{:<45} last health check: {e}", "");
            }
        }
        for n in &svc.named_backends {
            let addrs: Vec<String> = n.addresses.iter().map(|a| a.to_string()).collect();
            let _ = writeln!(
                o,
                "{:<22} {} (weight {}) → {} [ttl {:.0}s, next lookup in {:.0}s{}]",
                "",
                n.backend,
                n.weight,
                if addrs.is_empty() { "no address".into() } else { addrs.join(" ") },
                n.ttl_s,
                n.next_lookup_s,
                n.last_error.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default()
            );
        }
        let st = &svc.settings;
        let _ = writeln!(
            o,
            "{:<22} mode {}{}, on-remove {}, on-unhealthy {}, reset-spread {}, on-miss {}, health {}; resets: removed {}, unhealthy {}, drain deadline {}, idle {}; expired {}",
            "",
            match st.mode {
                crate::model::settings::NatMode::Dnat => "dnat".to_string(),
                crate::model::settings::NatMode::Fullnat => format!("fullnat (source {}, ports {})", st.snat_source, String::from(st.snat_ports)),
                crate::model::settings::NatMode::Dsr => format!("dsr (IPIP from {})", st.snat_source),
            },
            if st.mss_clamp != 0 { format!(", mss-clamp {}", st.mss_clamp) } else { String::new() },
            st.on_remove,
            st.on_unhealthy,
            String::from(st.reset_spread),
            st.on_miss,
            st.health.as_ref().map(|h| format!("{} every {}", h.probe, String::from(h.interval))).unwrap_or_else(|| "none".into()),
            svc.resets.removed,
            svc.resets.unhealthy,
            svc.resets.drain_deadline,
            svc.resets.idle,
            svc.resets.expired
        );
    }
    if let Some(y) = &s.sync {
        let _ = writeln!(
            o,
            "\nsync: role {} peer {}; sent {} datagrams ({} records, {} dropped), received {} (refused {}, replayed {}, old epoch {}, stale {}, ignored as master {}), applied {} records ({} unknown), gaps {}, peer restarts {}, lag {:.1} ms",
            y.role,
            y.peer,
            y.sent_datagrams,
            y.sent_records,
            y.dropped_records,
            y.received_datagrams,
            y.refused_datagrams,
            y.replayed_datagrams,
            y.old_epoch_datagrams,
            y.stale_datagrams,
            y.ignored_as_master,
            y.applied_records,
            y.unknown_records,
            y.sequence_gaps,
            y.peer_restarts,
            y.lag_s * 1e3
        );
    }
    let nonzero: Vec<String> = s.counters.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(o, "\ncounters: {}", if nonzero.is_empty() { "all zero".into() } else { nonzero.join(" ") });
    let icmp: Vec<String> =
        s.icmp_errors.iter().flat_map(|(kind, outcomes)| outcomes.iter().filter(|(_, n)| **n > 0).map(move |(o, n)| format!("{kind}/{o}={n}"))).collect();
    if !icmp.is_empty() {
        let _ = writeln!(o, "icmp errors: {}", icmp.join(" "));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_shows_a_services_mss_clamp_and_the_icmp_errors_seen() {
        let mut s = crate::daemon::metrics::tests::status(false);
        let text = render_status(&s);
        assert!(!text.contains("mss-clamp"), "no clamp, no mention: {text}");
        assert!(text.contains("icmp errors: too_big/dropped_bad_quote=1 too_big/to_backend=4"), "{text}");
        s.services[0].settings.mss_clamp = 1400;
        s.icmp_errors.clear();
        let text = render_status(&s);
        assert!(text.contains(", mss-clamp 1400, on-remove"), "{text}");
        assert!(!text.contains("icmp errors"), "nothing seen, no line: {text}");
    }
}
