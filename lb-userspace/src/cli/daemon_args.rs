//! `xlb daemon`'s flags and their parsers; `crate::daemon::run` takes them
//! as they are.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use clap::Args;

use super::{DEFAULT_PIN_DIR, DEFAULT_STATE_FILE, values};
use crate::{
    ha::Role,
    model::{AttachMode, settings::Dur},
};

#[derive(Clone, Debug, Args)]
pub struct DaemonArgs {
    /// Interface to attach to (repeat for several).
    #[arg(long = "iface", required = true, value_name = "IF")]
    pub ifaces: Vec<String>,
    /// XDP attach mode: native (driver), generic (skb) or auto (native, else generic).
    #[arg(long, value_parser = values::parser::<values::AttachMode>(), default_value = "auto")]
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
    pub metrics_addr: Option<SocketAddr>,
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
    /// [default: a quarter of --conn-capacity (at least 1024), plus one].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=(1 << 24)))]
    pub half_open_capacity: Option<u32>,
    /// Connection table capacity, in flows. The kernel gives the table's
    /// hash the next power of two of buckets: a capacity just above a power
    /// of two (the default, 2^20 + 1) keeps even a full table at most half
    /// loaded, with short chains on every lookup (16 bytes more per flow).
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
    pub withdraw_grace: Dur,
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
    #[arg(long, value_parser = values::parser::<values::Role>(), default_value = "backup")]
    pub role: Role,
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
    pub dns_min_ttl: Dur,
    /// Longest time a DNS answer is trusted (also: how long a failing DNS server keeps the last answer).
    #[arg(long, default_value = "5m", value_name = "DURATION")]
    pub dns_max_ttl: Dur,
    /// Answers in a row that must say a name has no address (NXDOMAIN, no
    /// record of the service's family) before its last addresses are
    /// removed: a DNS blip must not reset every flow. A failing server is
    /// not an answer: the last one holds up to --dns-max-ttl.
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub dns_misses: u32,
    /// ICMP and ICMPv6 errors about flows (fragmentation needed, packet
    /// too big, unreachables) translated to the flow's other end: `on`
    /// (default; path MTU discovery through the balancer needs it) or
    /// `off` (passed to the kernel untouched: a diagnostic switch).
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = ["on", "off"])]
    pub icmp_translation: String,
    /// The flow hash's secret key: 32 hex digits (128 bits) in a file. Give
    /// every balancer of a cluster the same one, so they schedule a flow
    /// alike (default: a running data plane's key, else a random one).
    #[arg(long, value_name = "FILE")]
    pub flow_hash_key_file: Option<PathBuf>,
}

fn parse_dns_server(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("invalid DNS server {s:?}: expected IP or IP:PORT"))
}
