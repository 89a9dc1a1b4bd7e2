//! ICMP errors through the balancer, with real kernel stacks: a router
//! between the client and the balancer whose link to the client has an
//! MTU of 1400 (every endpoint has 1500), so the backends' full-size
//! segments need path MTU discovery through the VIP; and a backend's port
//! unreachable reaching a UDP client. In DSR mode, the same narrow path
//! (the router's error reaches the backend through the tunnel) and the
//! backends' MSS clamp (clients' segments fit the tunnel without ICMP).
//!
//! ```text
//!  client2 k0 10.60.0.2 (1500) ── r1 10.60.0.1 (MTU 1400) router (the
//!  topology's client namespace, forwarding) c0 10.0.0.2 ── l0 lb ── backend
//! ```

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

use testbed::{BulkServer, Daemon, Netns, Topology, TopologyOptions, download, in_netns, netns::unique_prefix};

/// The topology with a router in front: its client namespace forwards to
/// a second client behind a 1400-byte link.
struct Path {
    topo: Topology,
    client: Netns,
}

fn path() -> Path {
    path_to(TopologyOptions { backends: 1, ..Default::default() })
}

/// [`path`] with backends as `opts` say (DSR backends sit behind a switch:
/// their own XDP program, the decapsulation, is on their link).
fn path_to(opts: TopologyOptions) -> Path {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let topo = Topology::new(opts).expect("topology");
    let client = Netns::new(&format!("{}-c2", unique_prefix())).expect("netns");
    let router = &topo.client;
    router.ip(&["link", "add", "r1", "type", "veth", "peer", "name", "k0", "netns", &client.name]).expect("veth");
    router.ip(&["addr", "add", "10.60.0.1/24", "dev", "r1"]).expect("addr");
    router.ip(&["addr", "add", "fd60::1/64", "dev", "r1", "nodad"]).expect("addr");
    // The bottleneck: the router's side of the client's link.
    router.ip(&["link", "set", "r1", "mtu", "1400", "up"]).expect("up");
    router.sysctl("net.ipv4.ip_forward", "1").expect("forwarding");
    router.sysctl("net.ipv6.conf.all.forwarding", "1").expect("forwarding");
    client.ip(&["addr", "add", "10.60.0.2/24", "dev", "k0"]).expect("addr");
    client.ip(&["addr", "add", "fd60::2/64", "dev", "k0", "nodad"]).expect("addr");
    client.ip(&["link", "set", "k0", "up"]).expect("up");
    client.ip(&["link", "set", "lo", "up"]).expect("lo");
    client.ip(&["route", "add", "default", "via", "10.60.0.1"]).expect("route");
    client.ip(&["-6", "route", "add", "default", "via", "fd60::1", "dev", "k0", "onlink"]).expect("route");
    // The balancer and the backend reach the second client via the router.
    topo.lb.ip(&["route", "add", "10.60.0.0/24", "via", "10.0.0.2"]).expect("route");
    topo.lb.ip(&["-6", "route", "add", "fd60::/64", "via", "fd00::2", "dev", "l0"]).expect("route");
    Path { topo, client }
}

/// Services: VIP:80 DNAT, VIP:81 full NAT, [VIP6]:80 DNAT, all to the
/// backend's bulk server on 8080.
fn services(d: &Daemon, topo: &Topology) {
    for (vip, extra) in [
        (topo.vip_of(false, 80), vec![]),
        (topo.vip_of(false, 81), vec!["--mode", "fullnat"]),
        (topo.vip_of(true, 80), vec![]),
        (topo.vip_of(true, 81), vec!["--mode", "fullnat"]),
    ] {
        let v = vip.to_string();
        let mut args = vec!["service", "add", v.as_str()];
        args.extend(extra);
        d.ok(&args).expect("service");
        d.ok(&["backend", "add", &v, &topo.backend_of(vip.is_ipv6(), 0, 8080).to_string()]).expect("backend");
    }
}

const SIZE: usize = 200_000;

#[test]
fn downloads_through_a_smaller_path_mtu_complete_in_dnat_and_full_nat_over_ipv4_and_ipv6() {
    let p = path();
    let d = Daemon::start(&p.topo.lb, &p.topo.lb_ifaces, &[]).expect("daemon");
    let _server = BulkServer::start(&p.topo.backends[0].name, "[::]:8080".parse().expect("addr")).expect("server");
    services(&d, &p.topo);
    let downloads = [
        ("IPv4 DNAT", p.topo.vip_of(false, 80)),
        ("IPv4 full NAT", p.topo.vip_of(false, 81)),
        ("IPv6 DNAT", p.topo.vip_of(true, 80)),
        ("IPv6 full NAT", p.topo.vip_of(true, 81)),
    ];
    for (what, vip) in downloads {
        download(&p.client.name, vip, SIZE, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    }
    let s = d.json(&["status"]).expect("status");
    let to_backend = s["counters"]["icmp_to_backend"].as_u64().unwrap_or(0);
    assert!(to_backend >= 4, "each download needed the router's error translated: {:#}", s["counters"]);
    assert!(s["icmp_errors"]["too_big"]["to_backend"].as_u64().unwrap_or(0) >= 4, "counted as too big: {:#}", s["icmp_errors"]);
}

#[test]
fn without_translation_the_same_download_stalls() {
    let p = path();
    let d = Daemon::start(&p.topo.lb, &p.topo.lb_ifaces, &["--icmp-translation", "off"]).expect("daemon");
    let _server = BulkServer::start(&p.topo.backends[0].name, "[::]:8080".parse().expect("addr")).expect("server");
    services(&d, &p.topo);
    let got = download(&p.client.name, p.topo.vip_of(false, 80), SIZE, Duration::from_secs(8));
    assert!(got.is_err(), "the download completed without ICMP translation: the test would prove nothing");
    let s = d.json(&["status"]).expect("status");
    assert_eq!(s["counters"]["icmp_to_backend"], 0, "{:#}", s["counters"]);
}

/// The balancer's own link to the client narrower than the endpoints'
/// (the far end, the client's, and the backend's links stay at 1500): the
/// backend's full-size segments do not fit it after NAT.
fn narrow_lb_link(extra: &[&str]) -> (Topology, Daemon, BulkServer) {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let topo = Topology::new(TopologyOptions { backends: 1, ..Default::default() }).expect("topology");
    topo.lb.ip(&["link", "set", "l0", "mtu", "1400"]).expect("mtu");
    let d = Daemon::start(&topo.lb, &topo.lb_ifaces, extra).expect("daemon");
    let server = BulkServer::start(&topo.backends[0].name, "[::]:8080".parse().expect("addr")).expect("server");
    for v6 in [false, true] {
        let vip = topo.vip_of(v6, 80).to_string();
        d.ok(&["service", "add", &vip]).expect("service");
        d.ok(&["backend", "add", &vip, &topo.backend_of(v6, 0, 8080).to_string()]).expect("backend");
    }
    (topo, d, server)
}

#[test]
fn a_segment_too_big_for_the_balancers_egress_is_answered_from_the_vip_and_the_download_completes() {
    let (topo, d, _server) = narrow_lb_link(&[]);
    for v6 in [false, true] {
        download(&topo.client.name, topo.vip_of(v6, 80), SIZE, Duration::from_secs(20)).unwrap_or_else(|e| panic!("IPv6 {v6}: {e:#}"));
    }
    let s = d.json(&["status"]).expect("status");
    assert!(s["counters"]["icmp_too_big_sent"].as_u64().unwrap_or(0) >= 2, "{:#}", s["counters"]);
    // Without the answer the kernel gets the rewritten segment and its
    // error goes to the VIP, itself: the download stalls.
    drop(d);
    let (topo, _d, _server) = narrow_lb_link(&["--icmp-translation", "off"]);
    assert!(
        download(&topo.client.name, topo.vip_of(false, 80), SIZE, Duration::from_secs(8)).is_err(),
        "completed without the answer: the test proves nothing"
    );
}

#[test]
fn a_udp_datagram_to_a_closed_backend_port_gets_connection_refused_from_the_vip() {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let topo = Topology::new(TopologyOptions { backends: 1, ..Default::default() }).expect("topology");
    let d = Daemon::start(&topo.lb, &topo.lb_ifaces, &[]).expect("daemon");
    let vip = topo.vip_sock(9999);
    d.ok(&["service", "add", &vip.to_string(), "--proto", "udp"]).expect("service");
    d.ok(&["backend", "add", &vip.to_string(), &topo.backend(0, 9999).to_string()]).expect("backend");
    let refused = in_netns(&topo.client.name, || -> std::io::Result<std::io::ErrorKind> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(vip)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.send(b"anyone there?")?;
        let mut buf = [0u8; 64];
        // The error arrives as ECONNREFUSED on the connected socket (its
        // quote names VIP:9999, the socket's peer).
        match s.recv(&mut buf) {
            Ok(_) => Ok(std::io::ErrorKind::Other),
            Err(e) => Ok(e.kind()),
        }
    })
    .expect("netns")
    .expect("socket");
    assert_eq!(refused, std::io::ErrorKind::ConnectionRefused);
    let s = d.json(&["status"]).expect("status");
    assert!(s["counters"]["icmp_to_client"].as_u64().unwrap_or(0) >= 1, "{:#}", s["counters"]);
}

/// Backend 0 as a DSR backend: set up by `xlb backend-setup` with `clamp`
/// (`--mss-clamp`), a bulk server on port 80; dropped, the setup undone.
struct DsrBackend<'a> {
    topo: &'a Topology,
    pins: String,
    _server: BulkServer,
}

impl<'a> DsrBackend<'a> {
    fn start(topo: &'a Topology, clamp: &str) -> DsrBackend<'a> {
        let vip = topo.vip_of(false, 80);
        let pins = format!("/sys/fs/bpf/{}-dsr", topo.prefix);
        let b = &topo.backends[0];
        b.exec(
            &testbed::daemon::xlb_bin().to_string_lossy(),
            &["backend-setup", "--iface", "b0", "--vip", &vip.ip().to_string(), "--pin-dir", &pins, "--mss-clamp", clamp],
        )
        .expect("backend-setup");
        let server = BulkServer::start(&b.name, "0.0.0.0:80".parse().expect("addr")).expect("server");
        DsrBackend { topo, pins, _server: server }
    }
}

fn dsr_service(d: &Daemon, topo: &Topology) {
    let vip = topo.vip_of(false, 80).to_string();
    d.ok(&["service", "add", &vip, "--mode", "dsr"]).expect("service");
    d.ok(&["backend", "add", &vip, &topo.backend_of(false, 0, 80).to_string()]).expect("backend");
}

impl Drop for DsrBackend<'_> {
    fn drop(&mut self) {
        let _ =
            self.topo.backends[0].exec(&testbed::daemon::xlb_bin().to_string_lossy(), &["backend-setup", "--iface", "b0", "--remove", "--pin-dir", &self.pins]);
        let _ = std::fs::remove_dir(&self.pins);
    }
}

fn too_big_to_backend(d: &Daemon) -> u64 {
    let s = d.json(&["status"]).expect("status");
    s["icmp_errors"]["too_big"]["to_backend"].as_u64().unwrap_or(0)
}

#[test]
fn dsr_downloads_through_a_smaller_path_mtu_complete_the_routers_error_reaching_the_backend_in_the_tunnel() {
    for translate in [true, false] {
        let p = path_to(TopologyOptions { backends: 1, switched: true, ..Default::default() });
        let extra: &[&str] = if translate { &[] } else { &["--icmp-translation", "off"] };
        let d = Daemon::start(&p.topo.lb, &p.topo.lb_ifaces, extra).expect("daemon");
        dsr_service(&d, &p.topo);
        let _backend = DsrBackend::start(&p.topo, "auto");
        // The backend answers the client itself (through the balancer's
        // kernel, then the router): its full-size segments meet the
        // 1400-byte link, and the router's error goes to the VIP.
        let got = download(&p.client.name, p.topo.vip_of(false, 80), SIZE, Duration::from_secs(if translate { 20 } else { 8 }));
        if translate {
            got.unwrap_or_else(|e| panic!("DSR download: {e:#}\n{}", d.log_text()));
            assert!(too_big_to_backend(&d) >= 1, "the router's error went to the backend: {:#}", d.json(&["status"]).expect("status")["icmp_errors"]);
        } else {
            assert!(got.is_err(), "the DSR download completed without the error reaching the backend: the test would prove nothing");
            assert_eq!(too_big_to_backend(&d), 0);
        }
    }
}

/// The MSS the client's stack uses on a connection (TCP_MAXSEG: what the
/// peer announced, less the options every segment carries).
fn client_mss(s: &TcpStream) -> u32 {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket and an int-sized buffer.
    let rc = unsafe { libc::getsockopt(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_MAXSEG, (&mut v as *mut libc::c_int).cast(), &mut len) };
    assert_eq!(rc, 0, "getsockopt TCP_MAXSEG: {}", std::io::Error::last_os_error());
    v as u32
}

/// Sends `n` bytes to the bulk server at `to` (a line of zeros it reads
/// whole, ending in the size it should answer), then reads the answer:
/// full-size segments from the client, through the tunnel. The client's
/// MSS on the connection.
fn upload(ns: &str, to: SocketAddr, n: usize) -> anyhow::Result<u32> {
    let mut s = in_netns(ns, || TcpStream::connect_timeout(&to, Duration::from_secs(5)))??;
    let mss = client_mss(&s);
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = vec![b'0'; n];
    line.extend_from_slice(b"64\n");
    s.write_all(&line)?;
    let mut answer = [0u8; 64];
    s.read_exact(&mut answer).map_err(|e| anyhow::anyhow!("the answer to an upload of {n} bytes: {e}"))?;
    anyhow::ensure!(answer.iter().enumerate().all(|(i, b)| *b == testbed::servers::bulk_byte(i)), "corrupted answer");
    Ok(mss)
}

#[test]
fn a_dsr_backend_announces_an_mss_that_fits_the_tunnel_so_uploads_need_no_too_big() {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    let topo = Topology::new(TopologyOptions { backends: 1, switched: true, ..Default::default() }).expect("topology");
    let d = Daemon::start(&topo.lb, &topo.lb_ifaces, &[]).expect("daemon");
    let vip = topo.vip_of(false, 80);
    let sent = |d: &Daemon| d.json(&["status"]).expect("status")["counters"]["icmp_too_big_sent"].as_u64().unwrap_or(0);
    dsr_service(&d, &topo);
    {
        let _b = DsrBackend::start(&topo, "auto");
        let mss = upload(&topo.client.name, vip, 200_000).unwrap_or_else(|e| panic!("upload with the clamp: {e:#}\n{}", d.log_text()));
        // 1500 - 20 (IPIP) - 40, less 12 bytes of timestamps.
        assert!(mss <= 1440, "the client may send {mss}-byte segments: they do not fit the tunnel");
        assert_eq!(sent(&d), 0, "no segment needed a too-big answer");
    }
    // Without the clamp the client's full-size segments do not fit once
    // encapsulated: the balancer answers too big (and path MTU discovery
    // saves the upload), which is what the clamp spares.
    let _b = DsrBackend::start(&topo, "off");
    let mss = upload(&topo.client.name, vip, 200_000).unwrap_or_else(|e| panic!("upload without the clamp: {e:#}"));
    assert!(mss > 1440, "without the clamp the client's MSS is {mss}: the test would prove nothing");
    assert!(sent(&d) >= 1, "without the clamp a segment was too big for the tunnel");
}
