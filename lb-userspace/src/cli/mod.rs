//! Command-line interface: argument definitions, and turning API responses
//! into text or JSON. Exit codes: 0 success, 1 runtime failure (daemon
//! unreachable, request refused), 2 bad usage.

pub mod client;
pub mod top;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use crate::dns::BackendSpec;

use clap::{Args, Parser, Subcommand};

use crate::{
    api::{ErrorCode, FlowInfo, Proto, Request, Response, Status},
    dataplane::AttachMode,
    model::settings::ServiceOptions,
};

pub const DEFAULT_SOCKET: &str = "/run/xlb/xlb.sock";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xlb";
pub const DEFAULT_STATE_FILE: &str = "/run/xlb/state.json";

pub const EXIT_RUNTIME: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(name = "xlb", version, about = "XDP layer-4 load balancer")]
pub struct Cli {
    /// Control socket of the daemon.
    #[arg(long, global = true, env = "XLB_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the XDP program, attach it and serve the control API.
    Daemon(DaemonArgs),
    /// Add or remove services (VIP:PORT/proto).
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Add or remove a service's backends.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Services, backends, counters and the connection table.
    Status,
    /// A live view of services and backends, refreshed every second (q quits).
    Top,
    /// Print the whole configuration as JSON (the form `apply` takes).
    Export,
    /// Make the running configuration match FILE (as written by `export`),
    /// printing what changes.
    Apply {
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Show the changes without applying them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove a data plane left running by a stopped daemon: detach its XDP
    /// program and delete its pins and state (its connections are lost).
    Detach {
        /// bpffs directory of the pins.
        #[arg(long, default_value = DEFAULT_PIN_DIR, value_name = "DIR")]
        pin_dir: PathBuf,
        /// The daemon's state file.
        #[arg(long, default_value = DEFAULT_STATE_FILE, value_name = "FILE")]
        state_file: PathBuf,
    },
    /// Set this node's role in an active/standby pair (keepalived's notify
    /// hook): master sends its flow state to the peer, backup installs it.
    Role {
        #[arg(value_enum)]
        role: crate::ha::Role,
    },
    /// Prepare this host as a DSR backend (`--mode dsr` services): attach
    /// the IPIP decapsulation program to IFACE (pinned: it stays), put the
    /// VIPs on lo and keep the host from answering ARP for them.
    BackendSetup {
        /// The interface the balancers' encapsulated packets arrive on.
        #[arg(long)]
        iface: String,
        /// A VIP this backend serves (repeatable).
        #[arg(long = "vip", value_name = "ADDR", required_unless_present = "remove")]
        vips: Vec<std::net::Ipv4Addr>,
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: AttachMode,
        /// bpffs directory for the pinned link.
        #[arg(long, default_value = "/sys/fs/bpf/xlb-decap", value_name = "DIR")]
        pin_dir: PathBuf,
        /// Undo: detach the program and take the given VIPs off lo.
        #[arg(long)]
        remove: bool,
    },
    /// Exit 0 when the daemon answers and its program is attached (for
    /// keepalived's track script), 1 otherwise.
    Health,
    /// List the flows in the connection table.
    Flows {
        /// Only this service's flows.
        #[arg(long, value_name = "VIP:PORT")]
        service: Option<SocketAddr>,
        /// Protocol of --service, when both tcp and udp are served there.
        #[arg(long, requires = "service")]
        proto: Option<Proto>,
        /// Only this backend's flows (who would be reset if it went now).
        #[arg(long, value_name = "IP:PORT")]
        backend: Option<SocketAddr>,
    },
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Interface to attach to (repeat for several).
    #[arg(long = "iface", required = true, value_name = "IF")]
    pub ifaces: Vec<String>,
    /// XDP attach mode: native (driver), generic (skb) or auto (native, else generic).
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp_mode: AttachMode,
    /// TOML file of services and backends to apply at start.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// bpffs directory where the maps and XDP links are pinned.
    #[arg(long, default_value = DEFAULT_PIN_DIR, value_name = "DIR")]
    pub pin_dir: PathBuf,
    /// Where the model (services, backends, settings) is saved, so a
    /// restarted daemon takes over the running data plane.
    #[arg(long, default_value = DEFAULT_STATE_FILE, value_name = "FILE")]
    pub state_file: PathBuf,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9100); off
    /// unless given.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Write one JSON line per finished flow to FILE ("-": stdout).
    #[arg(long, value_name = "FILE")]
    pub flow_log: Option<PathBuf>,
    /// Also write a record when a flow starts.
    #[arg(long, requires = "flow_log")]
    pub flow_log_new: bool,
    /// Log 1 in N flows (by a hash of the 5-tuple).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub flow_log_sample: u32,
    /// On SIGTERM/SIGINT, detach and remove the pins instead of leaving the
    /// data plane forwarding.
    #[arg(long)]
    pub detach_on_exit: bool,
    /// Test only: skip the proactive reset walk (the data plane still resets
    /// a flow of a gone backend on its next packet).
    #[arg(long, hide = true)]
    pub test_disable_proactive_reset: bool,
    /// Half-open table capacity (TCP flows in their handshake), in flows
    /// [default: a quarter of --conn-capacity, at least 1024].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=(1 << 24)))]
    pub half_open_capacity: Option<u32>,
    /// Connection table capacity, in flows.
    #[arg(long, default_value_t = lb_common::maps::DEFAULT_CONN_CAPACITY, value_parser = clap::value_parser!(u32).range(1..=(1 << 26)))]
    pub conn_capacity: u32,
    /// BGP through BIRD: the file (included by bird.conf) where the daemon
    /// writes a static protocol `xlb_vips` (`xlb_vips6`) with the VIPs, only
    /// while its data plane is attached; export it to your BGP peers.
    #[arg(long, value_name = "FILE", requires = "bird_socket")]
    pub bird_include: Option<PathBuf>,
    /// BIRD's control socket (`birdc -s`), to make it re-read the include.
    #[arg(long, value_name = "PATH", requires = "bird_include")]
    pub bird_socket: Option<PathBuf>,
    /// On shutdown, after withdrawing the VIPs, keep forwarding this long
    /// while routers converge (flows still arriving are not reset).
    #[arg(long, default_value = "2s", value_name = "DURATION")]
    pub withdraw_grace: crate::model::settings::Dur,
    /// State sync: where this node receives its peer's flow state (IP:PORT).
    #[arg(long, value_name = "ADDR", requires_all = ["sync_peer", "sync_key_file"])]
    pub sync_listen: Option<SocketAddr>,
    /// State sync: the peer's --sync-listen address; datagrams from any other source are refused.
    #[arg(long, value_name = "ADDR", requires_all = ["sync_listen", "sync_key_file"])]
    pub sync_peer: Option<SocketAddr>,
    /// State sync: file holding the shared key (HMAC-SHA256; at least 16 bytes).
    #[arg(long, value_name = "FILE", requires_all = ["sync_listen", "sync_peer"])]
    pub sync_key_file: Option<PathBuf>,
    /// State sync: role at start (keepalived's notify hook changes it with `xlb role`).
    #[arg(long, value_enum, default_value = "backup")]
    pub role: crate::ha::Role,
    /// Leave the host's settings alone (the daemon otherwise sets, per
    /// managed interface, what the data plane needs: forwarding,
    /// accept_local, loose rp_filter; see docs/operations.md). Without
    /// --force, refuses to start while one of them is missing.
    #[arg(long)]
    pub no_host_setup: bool,
    /// With --no-host-setup: start even though host settings are missing
    /// (packets the data plane passes to the kernel will be dropped).
    #[arg(long, requires = "no_host_setup")]
    pub force: bool,
    /// DNS server for backends given by name, IP or IP:PORT (repeatable; default: /etc/resolv.conf).
    #[arg(long = "dns-server", value_name = "ADDR", value_parser = parse_dns_server)]
    pub dns_servers: Vec<SocketAddr>,
    /// Shortest time a DNS answer is trusted (a record's TTL below it is raised to it).
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub dns_min_ttl: crate::model::settings::Dur,
    /// Longest time a DNS answer is trusted (also: how long a failing DNS server keeps the last answer).
    #[arg(long, default_value = "5m", value_name = "DURATION")]
    pub dns_max_ttl: crate::model::settings::Dur,
}

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Create a service on VIP:PORT.
    Add {
        #[arg(value_name = "VIP:PORT")]
        service: SocketAddr,
        #[arg(long, default_value = "tcp")]
        proto: Proto,
        #[command(flatten)]
        options: ServiceOptions,
    },
    /// Change a service's settings at run time (only the options given).
    Set {
        #[arg(value_name = "VIP:PORT")]
        service: SocketAddr,
        /// Needed only when both tcp and udp are served on VIP:PORT.
        #[arg(long)]
        proto: Option<Proto>,
        #[command(flatten)]
        options: ServiceOptions,
    },
    /// Remove a service, its backends and its flows.
    Remove {
        #[arg(value_name = "VIP:PORT")]
        service: SocketAddr,
        /// Needed only when both tcp and udp are served on VIP:PORT.
        #[arg(long)]
        proto: Option<Proto>,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackendCmd {
    /// Register a backend on a service.
    Add {
        #[arg(value_name = "VIP:PORT")]
        service: SocketAddr,
        /// IP:PORT, or NAME:PORT: resolved now and again on its record's TTL.
        #[arg(value_name = "BACKEND")]
        backend: BackendSpec,
        /// Relative share of new flows (1-10000).
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Needed only when both tcp and udp are served on VIP:PORT.
        #[arg(long)]
        proto: Option<Proto>,
    },
    /// Change a registered backend's weight.
    Set {
        #[arg(value_name = "VIP:PORT")]
        service: SocketAddr,
        #[arg(value_name = "BACKEND")]
        backend: BackendSpec,
        #[arg(long)]
        weight: u32,
        #[arg(long)]
        proto: Option<Proto>,
    },
    /// Deregister a backend; its flows are removed from the table.
    Remove {
        #[arg(value_name = "VIP:PORT")]
        service: SocketAddr,
        #[arg(value_name = "BACKEND")]
        backend: BackendSpec,
        #[arg(long)]
        proto: Option<Proto>,
    },
}

fn parse_dns_server(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("invalid DNS server {s:?}: expected IP or IP:PORT"))
}

/// Runs a client verb (everything but `daemon`).
pub fn run_client(cli: &Cli) -> ExitCode {
    let req = match &cli.command {
        // Not API verbs: main dispatches them before calling this.
        Command::Daemon(_) | Command::Detach { .. } | Command::Top | Command::BackendSetup { .. } => {
            eprintln!("xlb: internal error: this command is not a control API request");
            return ExitCode::from(EXIT_USAGE);
        }
        Command::Service(ServiceCmd::Add { service, proto, options }) => {
            Request::ServiceAdd { service: *service, proto: *proto, options: options.clone() }
        }
        Command::Service(ServiceCmd::Set { service, proto, options }) => {
            Request::ServiceSet { service: *service, proto: *proto, options: options.clone() }
        }
        Command::Service(ServiceCmd::Remove { service, proto }) => Request::ServiceRemove { service: *service, proto: *proto },
        Command::Backend(BackendCmd::Add { service, backend, weight, proto }) => Request::BackendAdd {
            service: *service,
            proto: *proto,
            backend: backend.clone(),
            weight: Some(*weight),
        },
        Command::Backend(BackendCmd::Remove { service, backend, proto }) => Request::BackendRemove {
            service: *service,
            proto: *proto,
            backend: backend.clone(),
        },
        Command::Backend(BackendCmd::Set { service, backend, weight, proto }) => Request::BackendSet {
            service: *service,
            proto: *proto,
            backend: backend.clone(),
            weight: *weight,
        },
        Command::Status | Command::Health => Request::Status,
        Command::Role { role } => Request::Role { role: *role },
        Command::Export => Request::Export,
        Command::Apply { file, dry_run } => {
            let text = match std::fs::read_to_string(file) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("xlb: reading {}: {e}", file.display());
                    return ExitCode::from(EXIT_RUNTIME);
                }
            };
            match crate::api::desired::Desired::parse(&text) {
                Ok(config) => Request::Apply { config, dry_run: *dry_run },
                Err(e) => {
                    eprintln!("xlb: {}: {e}", file.display());
                    return ExitCode::from(EXIT_USAGE);
                }
            }
        }
        Command::Flows { service, proto, backend } => Request::Flows { service: *service, proto: *proto, backend: *backend },
    };
    let resp = match client::call(&cli.socket, &req) {
        Ok(r) => r,
        Err(e) => {
            if cli.json {
                println!("{}", serde_json::json!({ "ok": false, "error": { "code": "unreachable", "message": format!("{e:#}") } }));
            } else {
                eprintln!("xlb: {e:#}");
            }
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    print_response(cli, &req, &resp)
}

/// `xlb detach`: refuses while a daemon serves the socket.
/// `xlb backend-setup`: see the command's help.
pub fn run_backend_setup(iface: &str, vips: &[std::net::Ipv4Addr], mode: AttachMode, pin_dir: &std::path::Path, remove: bool) -> ExitCode {
    let ip = |args: &[&str]| -> Result<(), String> {
        let out = std::process::Command::new("ip").args(args).output().map_err(|e| format!("running ip: {e} (is iproute2 installed?)"))?;
        if out.status.success() { Ok(()) } else { Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())) }
    };
    let link = pin_dir.join(format!("link_{iface}"));
    let result = (|| -> Result<String, String> {
        if remove {
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
        let mode = crate::dataplane::attach_decap_pinned(iface, mode, &link).map_err(|e| e.to_string())?;
        Ok(format!("decapsulating IPIP on {iface} ({mode} XDP, link pinned at {}); VIPs on lo: {}", link.display(), vips.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")))
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

pub fn run_detach(cli: &Cli, pin_dir: &std::path::Path, state_file: &std::path::Path) -> ExitCode {
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
        format!("detached from {} interface(s); removed {}{}", links.len(), if had_pins { pin_dir.display().to_string() } else { String::new() }, if had_state { format!(" and {}", state_file.display()) } else { String::new() })
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

fn print_response(cli: &Cli, req: &Request, resp: &Response) -> ExitCode {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(resp).unwrap_or_default());
    }
    if let Some(err) = &resp.error {
        if !cli.json {
            eprintln!("xlb: {}", err.message);
        }
        return ExitCode::from(if err.code == ErrorCode::BadRequest { EXIT_USAGE } else { EXIT_RUNTIME });
    }
    if cli.json {
        return ExitCode::SUCCESS;
    }
    let data = resp.data.clone().unwrap_or_default();
    let f = |k: &str| data[k].as_str().unwrap_or("?").to_owned();
    if matches!(cli.command, Command::Health) {
        return match serde_json::from_value::<Status>(data) {
            Ok(s) if !s.interfaces.is_empty() => {
                println!("healthy: attached to {}", s.interfaces.iter().map(|a| a.iface.as_str()).collect::<Vec<_>>().join(", "));
                ExitCode::SUCCESS
            }
            Ok(_) => {
                eprintln!("xlb: unhealthy: the program is attached to no interface");
                ExitCode::from(EXIT_RUNTIME)
            }
            Err(e) => {
                eprintln!("xlb: unhealthy: unexpected status: {e}");
                ExitCode::from(EXIT_RUNTIME)
            }
        };
    }
    match req {
        Request::Role { .. } => println!("role {} (was {})", f("role"), f("previous")),
        Request::Status => match serde_json::from_value::<Status>(data) {
            Ok(s) => print!("{}", render_status(&s)),
            Err(e) => eprintln!("xlb: unexpected status from the daemon: {e}"),
        },
        Request::Flows { .. } => match serde_json::from_value::<Vec<FlowInfo>>(data) {
            Ok(f) => print!("{}", render_flows(&f)),
            Err(e) => eprintln!("xlb: unexpected flow list from the daemon: {e}"),
        },
        Request::ServiceAdd { .. } => println!("service {}/{} added", f("service"), f("proto")),
        Request::ServiceRemove { .. } => println!("service {}/{} removed", f("service"), f("proto")),
        Request::BackendAdd { .. } => println!(
            "backend {} added to {}/{}",
            f("backend"),
            f("service"),
            f("proto")
        ),
        Request::BackendRemove { .. } => println!(
            "backend {} removed from {}/{} ({} active flows, policy {})",
            f("backend"),
            f("service"),
            f("proto"),
            data["active_flows"],
            f("policy")
        ),
        Request::BackendSet { .. } => println!(
            "backend {} on {}/{}: weight {} -> {}",
            f("backend"),
            f("service"),
            f("proto"),
            data["old_weight"],
            data["weight"]
        ),
        Request::Export => println!("{}", serde_json::to_string_pretty(&data).unwrap_or_default()),
        Request::Apply { dry_run, .. } => {
            let changes: Vec<String> = serde_json::from_value(data["changes"].clone()).unwrap_or_default();
            if changes.is_empty() {
                println!("nothing to change");
            }
            for c in changes {
                println!("{}{c}", if *dry_run { "would " } else { "" });
            }
        }
        Request::ServiceSet { .. } => println!(
            "service {}/{} settings: {}",
            f("service"),
            f("proto"),
            data["settings"]
        ),
    }
    ExitCode::SUCCESS
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
            "{:<22} mode {}, on-remove {}, on-unhealthy {}, reset-spread {}, on-miss {}, health {}; resets: removed {}, unhealthy {}, drain deadline {}, idle {}; expired {}",
            "",
            match st.mode {
                crate::model::settings::NatMode::Dnat => "dnat".to_string(),
                crate::model::settings::NatMode::Fullnat => format!("fullnat (source {}, ports {})", st.snat_source, String::from(st.snat_ports)),
                crate::model::settings::NatMode::Dsr => format!("dsr (IPIP from {})", st.snat_source),
            },
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
    o
}

pub fn render_flows(flows: &[FlowInfo]) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    // Full-NAT flows also show the balancer address the backend sees.
    let snat = flows.iter().any(|f| f.snat.is_some());
    let _ = write!(o, "{:<22} {:<22} {:<5} {:<22} {:<12} {:>8} {:>8}", "CLIENT", "SERVICE", "PROTO", "BACKEND", "STATE", "AGE_S", "IDLE_S");
    let _ = writeln!(o, "{}", if snat { "  SNAT" } else { "" });
    for f in flows {
        let _ = write!(
            o,
            "{:<22} {:<22} {:<5} {:<22} {:<12} {:>8.1} {:>8.1}",
            f.client, f.service, f.proto, f.backend, f.state, f.age_s, f.idle_s
        );
        let _ = writeln!(o, "{}", f.snat.map(|a| format!("  {a}")).unwrap_or_default());
    }
    let _ = writeln!(o, "{} flows", flows.len());
    o
}
