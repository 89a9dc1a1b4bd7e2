//! `xlb service add|set|remove`. The flags of `add` and `set` are
//! `ServiceArgs`, the clap twin of `ServiceOptions` (the API body and the
//! settings table, which stays serde-only).

use std::{net::SocketAddr, process::ExitCode};

use clap::{Args, Subcommand};

use super::{Cli, exchange, text, values};
use crate::{
    api::{Proto, Request},
    model::settings::{Dur, FlowPolicy, MissPolicy, NatMode, NoPortPolicy, PortRange, Scheduler, ServiceOptions, SnatSource, StatusRange},
};

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Create a service on VIP:PORT.
    Add {
        #[arg(value_name = "VIP:PORT")]
        service: SocketAddr,
        #[arg(long, default_value = "tcp", value_parser = values::parser::<values::Proto>())]
        proto: Proto,
        #[command(flatten)]
        options: ServiceArgs,
    },
    /// Change a service's settings at run time (only the options given).
    Set {
        #[arg(value_name = "VIP:PORT")]
        service: SocketAddr,
        /// Needed only when both tcp and udp are served on VIP:PORT.
        #[arg(long, value_parser = values::parser::<values::Proto>())]
        proto: Option<Proto>,
        #[command(flatten)]
        options: ServiceArgs,
    },
    /// Remove a service, its backends and its flows.
    Remove {
        #[arg(value_name = "VIP:PORT")]
        service: SocketAddr,
        /// Needed only when both tcp and udp are served on VIP:PORT.
        #[arg(long, value_parser = values::parser::<values::Proto>())]
        proto: Option<Proto>,
    },
}

/// One flag per `ServiceOptions` field, same name; the conversion below
/// fails to compile when the two differ.
#[derive(Clone, Debug, Default, Args)]
pub struct ServiceArgs {
    /// How new flows pick a backend: maglev (default) or wrr.
    #[arg(long, value_parser = values::parser::<values::Scheduler>())]
    pub scheduler: Option<Scheduler>,
    /// Maglev table size: a prime up to 65537 (default 65537).
    #[arg(long)]
    pub maglev_size: Option<u32>,
    /// What a deregistered backend's flows get: reset (default), drain:DURATION, keep.
    #[arg(long, value_name = "POLICY")]
    pub on_remove: Option<FlowPolicy>,
    /// What an unhealthy backend's flows get: reset (default), drain:DURATION, keep.
    #[arg(long, value_name = "POLICY")]
    pub on_unhealthy: Option<FlowPolicy>,
    /// Spread a mass reset over this window (default 0: all at once).
    #[arg(long, value_name = "DURATION")]
    pub reset_spread: Option<Dur>,
    /// Non-SYN TCP without a flow: reset (default) or rehash.
    #[arg(long, value_parser = values::parser::<values::MissPolicy>())]
    pub on_miss: Option<MissPolicy>,
    /// Health check: tcp, http:/PATH, or none.
    #[arg(long, value_name = "PROBE")]
    pub health: Option<String>,
    /// Time between probes (default 2s).
    #[arg(long, value_name = "DURATION")]
    pub health_interval: Option<Dur>,
    /// Probe timeout (default 1s).
    #[arg(long, value_name = "DURATION")]
    pub health_timeout: Option<Dur>,
    /// Successes that bring a down backend back (default 2).
    #[arg(long)]
    pub rise: Option<u32>,
    /// Failures that take a backend down (default 3).
    #[arg(long)]
    pub fall: Option<u32>,
    /// Accepted HTTP statuses for http probes (default 200-399).
    #[arg(long, value_name = "RANGE")]
    pub health_status: Option<StatusRange>,
    /// Idle timeout of a TCP flow in its handshake (default 30s).
    #[arg(long, value_name = "DURATION")]
    pub timeout_syn: Option<Dur>,
    /// Idle timeout of an established TCP flow (default 350s).
    #[arg(long, value_name = "DURATION")]
    pub timeout_established: Option<Dur>,
    /// Idle timeout of a half-closed TCP flow (default 30s).
    #[arg(long, value_name = "DURATION")]
    pub timeout_closing: Option<Dur>,
    /// Idle timeout of a UDP flow (default 120s).
    #[arg(long, value_name = "DURATION")]
    pub timeout_udp: Option<Dur>,
    /// Reset established TCP flows at both ends when they time out: true or false (default false).
    #[arg(long, value_name = "BOOL")]
    pub reset_on_idle: Option<bool>,
    /// Ramp a joining or recovering backend's weight up over this period (default 0: off).
    #[arg(long, value_name = "DURATION")]
    pub slow_start: Option<Dur>,
    /// dnat (default: backends route replies through the balancer), fullnat, or dsr (IPIP, backends answer clients directly).
    #[arg(long, value_parser = values::parser::<values::NatMode>())]
    pub mode: Option<NatMode>,
    /// Full NAT: source port pool per backend (default 1024-32767; keep it clear of net.ipv4.ip_local_port_range).
    #[arg(long, value_name = "LOW-HIGH")]
    pub snat_ports: Option<PortRange>,
    /// Full NAT: the balancer's source address, or auto (default: the address the routing table picks per backend).
    #[arg(long, value_name = "ADDR")]
    pub snat_source: Option<SnatSource>,
    /// Full NAT: a new flow with no free source port gets reset (default; UDP is dropped) or drop.
    #[arg(long, value_parser = values::parser::<values::NoPortPolicy>())]
    pub on_no_port: Option<NoPortPolicy>,
    /// DNAT, full NAT: lower the MSS that SYNs to backends and SYN-ACKs to clients announce to BYTES (for a path narrower than the endpoints think, or clients that never get ICMP), or off (default).
    #[arg(long, value_name = "BYTES|off", value_parser = parse_mss_clamp)]
    pub mss_clamp: Option<u16>,
}

/// `--mss-clamp`: a number of bytes, or off (0). The range is checked
/// with the other settings.
fn parse_mss_clamp(s: &str) -> Result<u16, String> {
    if s == "off" {
        return Ok(0);
    }
    s.parse().map_err(|_| format!("expected a number of bytes or off, got {s:?}"))
}

impl From<ServiceArgs> for ServiceOptions {
    fn from(a: ServiceArgs) -> Self {
        let ServiceArgs {
            scheduler,
            maglev_size,
            on_remove,
            on_unhealthy,
            reset_spread,
            on_miss,
            health,
            health_interval,
            health_timeout,
            rise,
            fall,
            health_status,
            timeout_syn,
            timeout_established,
            timeout_closing,
            timeout_udp,
            reset_on_idle,
            slow_start,
            mode,
            snat_ports,
            snat_source,
            on_no_port,
            mss_clamp,
        } = a;
        ServiceOptions {
            scheduler,
            maglev_size,
            on_remove,
            on_unhealthy,
            reset_spread,
            on_miss,
            health,
            health_interval,
            health_timeout,
            rise,
            fall,
            health_status,
            timeout_syn,
            timeout_established,
            timeout_closing,
            timeout_udp,
            reset_on_idle,
            slow_start,
            mode,
            snat_ports,
            snat_source,
            on_no_port,
            mss_clamp,
        }
    }
}

pub fn run(cli: &Cli, cmd: &ServiceCmd) -> ExitCode {
    let req = match cmd {
        ServiceCmd::Add { service, proto, options } => Request::ServiceAdd { service: *service, proto: *proto, options: options.clone().into() },
        ServiceCmd::Set { service, proto, options } => Request::ServiceSet { service: *service, proto: *proto, options: options.clone().into() },
        ServiceCmd::Remove { service, proto } => Request::ServiceRemove { service: *service, proto: *proto },
    };
    exchange(cli, &req, |data| {
        let (service, proto) = (text(&data, "service"), text(&data, "proto"));
        match cmd {
            ServiceCmd::Add { .. } => println!("service {service}/{proto} added"),
            ServiceCmd::Set { .. } => println!("service {service}/{proto} settings: {}", data["settings"]),
            ServiceCmd::Remove { .. } => println!("service {service}/{proto} removed"),
        }
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::Command;

    fn parse(args: &[&str]) -> ServiceCmd {
        match crate::cli::Cli::try_parse_from(args).map(|c| c.command) {
            Ok(Command::Service(cmd)) => cmd,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn flags_become_service_options() {
        let cmd = parse(&[
            "xlb",
            "service",
            "add",
            "10.0.0.1:80",
            "--proto",
            "udp",
            "--scheduler",
            "least-conn",
            "--on-remove",
            "drain:30s",
            "--on-miss",
            "rehash",
            "--health",
            "http:/ok",
            "--rise",
            "4",
            "--reset-on-idle",
            "true",
            "--mode",
            "fullnat",
            "--snat-ports",
            "2000-2999",
            "--on-no-port",
            "drop",
            "--mss-clamp",
            "1400",
        ]);
        let ServiceCmd::Add { proto, options, .. } = cmd else { panic!("not add") };
        assert_eq!(proto, Proto::Udp);
        let o = ServiceOptions::from(options);
        assert_eq!(o.scheduler, Some(Scheduler::LeastConn));
        assert_eq!(o.on_remove, Some(FlowPolicy::Drain(std::time::Duration::from_secs(30))));
        assert_eq!(o.on_miss, Some(MissPolicy::Rehash));
        assert_eq!((o.health.as_deref(), o.rise, o.reset_on_idle), (Some("http:/ok"), Some(4), Some(true)));
        assert_eq!((o.mode, o.snat_ports, o.on_no_port), (Some(NatMode::Fullnat), Some(PortRange(2000, 2999)), Some(NoPortPolicy::Drop)));
        assert_eq!(o.mss_clamp, Some(1400));
        assert_eq!(o.fall, None, "absent flags stay absent");
        let ServiceCmd::Set { options, .. } = parse(&["xlb", "service", "set", "10.0.0.1:80", "--mss-clamp", "off"]) else { panic!("not set") };
        assert_eq!(ServiceOptions::from(options).mss_clamp, Some(0));
        assert!(crate::cli::Cli::try_parse_from(["xlb", "service", "set", "10.0.0.1:80", "--mss-clamp", "big"]).is_err());
    }

    #[test]
    fn proto_defaults_to_tcp_on_add_only() {
        let ServiceCmd::Add { proto, .. } = parse(&["xlb", "service", "add", "10.0.0.1:80"]) else { panic!("not add") };
        assert_eq!(proto, Proto::Tcp);
        let ServiceCmd::Set { proto, options, .. } = parse(&["xlb", "service", "set", "10.0.0.1:80"]) else { panic!("not set") };
        assert_eq!((proto, ServiceOptions::from(options)), (None, ServiceOptions::default()));
        assert!(crate::cli::Cli::try_parse_from(["xlb", "service", "add", "10.0.0.1:80", "--mode", "DNAT"]).is_err());
    }
}
