//! BPF_PROG_TEST_RUN fixtures on the real XDP object: crafted frames in,
//! exact frames and map state out (katran-style: description, input,
//! expected verdict, expected output).
//!
//! Each rig runs in its own network namespace with a veth pair, addresses
//! and permanent neighbours, so the program's FIB lookups are deterministic:
//!   t0 10.0.0.1/24 fd00::1/64 (client side, client 10.0.0.2, fd00::2)
//!   t1 10.1.1.1/24 fd01:1::1/64 (backend side, backend 10.1.1.2, fd01:1::2)
//!   lo VIPs 10.99.0.1, fd99::1
//!
//! Services (id: VIP port → backend id, backend): 0: 80 → 0, 10.1.1.2:8080
//! (Maglev DNAT of its own backend: SYNs scheduled without state); 1: UDP
//! 53 → 1, :5353; 2: 81, no backends; 3: 82 → 2, hairpin 10.0.0.3:80; 4:
//! 83 → 3, unresolved 10.1.1.9:80; 5: [fd99::1]:80 → 4, [fd01:1::2]:8080;
//! 6: 84 → 5, full NAT to :8084; 7: 85 → 6, DSR to :85.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{
    maps::{FLOW_DSR, FLOW_FULLNAT, FLOW_PICKED_UP, IFACE_GENERIC, IFACE_VIRTUAL, addr_from_ip},
    stats, tcp,
};
use testbed::{
    Netns, flows, in_netns,
    netns::unique_prefix,
    packet::{Frame, L4, TCP_ACK, TCP_PSH, TCP_RST, TCP_SYN, checksums_valid},
};
use xlb::{
    api::Proto,
    controller::Controller,
    dataplane::FlowTable as _,
    dataplane::{Flow, KernelDataPlane, LoadOptions},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd01, 1, 0, 0, 0, 0, 0, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 1);
/// The full-NAT service's source address and its (tiny) port pool.
const SNAT: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 1);
const SNAT_PORTS: std::ops::RangeInclusive<u16> = 40000..=40003;
const T0_MAC: [u8; 6] = [2, 0, 0, 0, 0x10, 0];
const T1_MAC: [u8; 6] = [2, 0, 0, 0, 0x10, 1];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const BACKEND_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];

struct Rig {
    ctl: Controller,
    ns: Netns,
    t0: u32,
    t1: u32,
}

fn rig() -> Rig {
    assert!(testbed::have_privileges(), "BPF_PROG_TEST_RUN tests need root: run `cargo xtask test`");
    let ns = Netns::new(&format!("{}-tr", unique_prefix())).expect("netns");
    let ip = |a: &[&str]| ns.ip(a).expect("ip");
    ip(&["link", "add", "t0", "type", "veth", "peer", "name", "t1"]);
    ip(&["link", "set", "t0", "address", "02:00:00:00:10:00"]);
    ip(&["link", "set", "t1", "address", "02:00:00:00:10:01"]);
    ip(&["addr", "add", "10.0.0.1/24", "dev", "t0"]);
    ip(&["addr", "add", "10.1.1.1/24", "dev", "t1"]);
    ip(&["addr", "add", "10.99.0.1/32", "dev", "lo"]);
    ip(&["link", "set", "t0", "up"]);
    ip(&["link", "set", "t1", "up"]);
    ip(&["neigh", "add", "10.0.0.2", "lladdr", "02:00:00:00:00:02", "dev", "t0", "nud", "permanent"]);
    ip(&["neigh", "add", "10.1.1.2", "lladdr", "02:00:00:00:01:02", "dev", "t1", "nud", "permanent"]);
    ip(&["addr", "add", "fd00::1/64", "dev", "t0", "nodad"]);
    ip(&["addr", "add", "fd01:1::1/64", "dev", "t1", "nodad"]);
    ip(&["addr", "add", "fd99::1/128", "dev", "lo"]);
    ip(&["neigh", "add", "fd00::2", "lladdr", "02:00:00:00:00:02", "dev", "t0", "nud", "permanent"]);
    ip(&["neigh", "add", "fd01:1::2", "lladdr", "02:00:00:00:01:02", "dev", "t1", "nud", "permanent"]);
    // What the daemon would set up on these interfaces (FIB lookups need
    // forwarding on the input interface).
    in_netns(&ns.name, || xlb::host::sysctl::apply(&xlb::host::sysctl::Sysctl::default(), &["t0".into(), "t1".into()])).expect("netns").expect("host setup");
    let t0 = ns.ifindex("t0").expect("t0");
    let t1 = ns.ifindex("t1").expect("t1");
    let mut dp = KernelDataPlane::load(LoadOptions { conn_capacity: 32768, half_open_capacity: Some(32768), pin_dir: None }).expect("load");
    dp.add_redirect_target(t0).expect("devmap t0");
    dp.add_redirect_target(t1).expect("devmap t1");
    let mut ctl = Controller::new(dp);
    let vip = |p| SocketAddr::new(VIP.into(), p);
    let at = |a: Ipv4Addr, p| SocketAddr::new(a.into(), p);
    ctl.service_add(vip(80), Proto::Tcp, &Default::default()).expect("tcp service");
    ctl.backend_add(vip(80), Some(Proto::Tcp), at(BACKEND, 8080), None).expect("tcp backend");
    ctl.service_add(vip(53), Proto::Udp, &Default::default()).expect("udp service");
    ctl.backend_add(vip(53), Some(Proto::Udp), at(BACKEND, 5353), None).expect("udp backend");
    ctl.service_add(vip(81), Proto::Tcp, &Default::default()).expect("empty service");
    // A backend on the client's own link (hairpin: out of the NIC it came in on).
    ip(&["neigh", "add", "10.0.0.3", "lladdr", "02:00:00:00:00:03", "dev", "t0", "nud", "permanent"]);
    ctl.service_add(vip(82), Proto::Tcp, &Default::default()).expect("hairpin service");
    ctl.backend_add(vip(82), Some(Proto::Tcp), at(Ipv4Addr::new(10, 0, 0, 3), 80), None).expect("hairpin backend");
    // A backend whose neighbour is not resolved yet.
    ctl.service_add(vip(83), Proto::Tcp, &Default::default()).expect("unresolved service");
    ctl.backend_add(vip(83), Some(Proto::Tcp), at(Ipv4Addr::new(10, 1, 1, 9), 80), None).expect("unresolved backend");
    // IPv6: [fd99::1]:80 → [fd01:1::2]:8080 (backend id 4).
    let vip6 = SocketAddr::new(VIP6.into(), 80);
    ctl.service_add(vip6, Proto::Tcp, &Default::default()).expect("ipv6 service");
    ctl.backend_add(vip6, Some(Proto::Tcp), SocketAddr::new(BACKEND6.into(), 8080), None).expect("ipv6 backend");
    // Full NAT with a four-port pool: VIP:84 → 10.1.1.2:8084 (backend id 5).
    let full = xlb::model::settings::ServiceOptions {
        mode: Some(xlb::model::settings::NatMode::Fullnat),
        snat_ports: Some(xlb::model::settings::PortRange(*SNAT_PORTS.start(), *SNAT_PORTS.end())),
        snat_source: Some(xlb::model::settings::SnatSource::Addr(SNAT.into())),
        ..Default::default()
    };
    ctl.service_add(vip(84), Proto::Tcp, &full).expect("full-NAT service");
    ctl.backend_add(vip(84), Some(Proto::Tcp), at(BACKEND, 8084), None).expect("full-NAT backend");
    // DSR: VIP:85 → 10.1.1.2:85 in IPIP from 10.1.1.1 (backend id 6).
    let dsr = xlb::model::settings::ServiceOptions {
        mode: Some(xlb::model::settings::NatMode::Dsr),
        snat_source: Some(xlb::model::settings::SnatSource::Addr(SNAT.into())),
        ..Default::default()
    };
    ctl.service_add(vip(85), Proto::Tcp, &dsr).expect("DSR service");
    ctl.backend_add(vip(85), Some(Proto::Tcp), at(BACKEND, 85), None).expect("DSR backend");
    Rig { ctl, ns, t0, t1 }
}

/// Pins the calling thread to CPU 0.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity
    // act on this thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

impl Rig {
    /// Runs the program once on `frame` arriving on `ifindex`.
    fn run(&mut self, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let ns = self.ns.name.clone();
        let prog = self.ctl.dataplane().program().expect("program");
        let res = in_netns(&ns, || {
            // Always on CPU 0: per-CPU state (the next-hop cache, counters)
            // then behaves as one cache for the fixtures.
            pin_to_cpu0();
            prog.test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ctx_in: Some(&ctx), ..TestRunOptions::default() })
        })
        .expect("netns")
        .unwrap_or_else(|e| panic!("test_run on a {}-byte frame: {e}", frame.len()));
        out.truncate(res.data_size_out as usize);
        (res.return_value, out)
    }

    fn flow_count(&mut self) -> usize {
        let mut n = 0;
        self.ctl.dataplane().for_each_flow(|_, _| n += 1).expect("walk");
        n
    }

    /// The flow of client `src` → VIP `dst`, in either table.
    fn flow<A: Into<IpAddr>>(&mut self, src: (A, u16), dst: (A, u16), proto: u8) -> Option<Flow> {
        let key = flows::key(SocketAddr::new(src.0.into(), src.1), SocketAddr::new(dst.0.into(), dst.1), proto);
        self.ctl.dataplane().flow_get(&key).expect("lookup")
    }

    /// Flows in (connection table, half-open table).
    fn counts(&mut self) -> (u64, u64) {
        self.ctl.dataplane().flow_counts().expect("counts")
    }

    /// Runs the DSR backends' decapsulation program once on `frame`.
    fn run_decap(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let ns = self.ns.name.clone();
        let prog = self.ctl.dataplane().decap_program().expect("decap program");
        let res = in_netns(&ns, || prog.test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..TestRunOptions::default() }))
            .expect("netns")
            .expect("test_run");
        out.truncate(res.data_size_out as usize);
        (res.return_value, out)
    }

    /// Full-NAT ports held, as (balancer source, port, backend).
    fn ports(&mut self) -> Vec<(IpAddr, u16, SocketAddr)> {
        let mut held = Vec::new();
        self.ctl
            .table()
            .for_each_port(&mut |k, _| {
                let port = |p: u16| u16::from_be_bytes(p.to_ne_bytes());
                held.push((
                    lb_common::maps::addr_to_ip(&k.dst_addr),
                    port(k.dst_port),
                    SocketAddr::new(lb_common::maps::addr_to_ip(&k.src_addr), port(k.src_port)),
                ));
            })
            .expect("walk ports");
        held
    }

    /// Each (what, frame, verdict, counter): the frame gets the verdict,
    /// leaves unmodified, moves its counter by one and creates no state.
    fn assert_untouched(&mut self, cases: &[(&str, Vec<u8>, u32, u32)]) {
        for (what, frame, want, counter) in cases {
            let before = self.counter(*counter);
            let (verdict, out) = self.run(self.t0, frame);
            assert_eq!(verdict, *want, "{what}");
            assert_eq!(&out, frame, "{what}: the frame was modified");
            assert_eq!(self.counter(*counter), before + 1, "{what}: counter {counter} did not move");
            assert_eq!(self.flow_count(), 0, "{what} created state");
        }
    }

    fn counter(&mut self, idx: u32) -> u64 {
        self.ctl.dataplane().global_counters().expect("counters")[idx as usize]
    }
}

/// What a frame looks like after DNAT towards the backend.
fn to_backend(mut f: Frame, port: u16) -> Frame {
    f.dst = if f.dst.is_ipv4() { BACKEND.into() } else { BACKEND6.into() };
    f.ttl -= 1;
    f.src_mac = T1_MAC;
    f.dst_mac = BACKEND_MAC;
    match &mut f.l4 {
        L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = port,
    }
    f
}

#[test]
fn a_syn_is_scheduled_without_state_and_the_backends_syn_ack_starts_the_flow() {
    let mut r = rig();
    let syn = Frame::tcp((CLIENT, 40000), (VIP, 80), TCP_SYN, 1000, 0);
    let (verdict, out) = r.run(r.t0, &syn.build());
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out, to_backend(syn, 8080).build(), "rewritten SYN differs from the expected frame");
    assert!(checksums_valid(&out, 14));
    assert_eq!(r.flow_count(), 0, "a SYN of a Maglev service writes nothing");
    assert_eq!(r.counter(stats::STATELESS_SYN), 1);
    assert_eq!(r.counter(stats::NEW_FLOWS), 0);
    assert_eq!(r.counter(stats::REDIRECT), 1);

    // The backend's SYN-ACK creates the half-open flow, keyed client → VIP.
    let syn_ack = Frame::tcp((BACKEND, 8080), (CLIENT, 40000), TCP_SYN | TCP_ACK, 9000, 1001);
    assert_eq!(r.run(r.t1, &syn_ack.build()).0, XDP_REDIRECT);
    let f = r.flow((CLIENT, 40000), (VIP, 80), 6).expect("the flow");
    assert!(f.half_open, "waits for the client's ACK in the half-open table");
    assert_eq!((f.state.service_id, f.state.backend_id, f.state.flags), (0, 0, 0), "service 0, backend 0, plain DNAT");
    assert_eq!((f.state.reply.end, f.state.reply.state), (9001, tcp::STATE_SYN), "the SYN-ACK takes one sequence number");
    assert_eq!(f.state.orig.end, 1001, "the client's side, from what the backend acknowledged");
    assert_eq!(r.counts(), (0, 1));
    assert_eq!(r.counter(stats::NEW_FLOWS), 1);
}

#[test]
fn replies_are_rewritten_to_the_vip_and_sequence_numbers_are_tracked() {
    let mut r = rig();
    let syn = Frame::tcp((CLIENT, 40001), (VIP, 80), TCP_SYN, 5000, 0);
    assert_eq!(r.run(r.t0, &syn.build()).0, XDP_REDIRECT);

    let syn_ack = Frame::tcp((BACKEND, 8080), (CLIENT, 40001), TCP_SYN | TCP_ACK, 9000, 5001);
    let (verdict, out) = r.run(r.t1, &syn_ack.build());
    assert_eq!(verdict, XDP_REDIRECT);
    let mut want = syn_ack.clone();
    want.src = VIP.into();
    want.ttl -= 1;
    want.src_mac = T0_MAC;
    want.dst_mac = CLIENT_MAC;
    if let L4::Tcp { sport, .. } = &mut want.l4 {
        *sport = 80;
    }
    assert_eq!(out, want.build(), "rewritten SYN-ACK differs");
    assert_eq!(r.flow((CLIENT, 40001), (VIP, 80), 6).expect("flow").state.reply.end, 9001);

    let mut data = Frame::tcp((CLIENT, 40001), (VIP, 80), TCP_ACK | TCP_PSH, 5001, 9001);
    data.payload = b"hello".to_vec();
    let (verdict, out) = r.run(r.t0, &data.build());
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out, to_backend(data, 8080).build());
    let f = r.flow((CLIENT, 40001), (VIP, 80), 6).expect("flow");
    assert_eq!(f.state.orig.end, 5006, "the backend expects the byte after the payload");
    assert_eq!(f.state.orig.state, tcp::STATE_ESTABLISHED);
    assert!(!f.half_open, "the ACK of the SYN-ACK confirmed the flow");

    // An old retransmission does not move the expected sequence back.
    let mut old = Frame::tcp((CLIENT, 40001), (VIP, 80), TCP_ACK | TCP_PSH, 5001, 9001);
    old.payload = b"he".to_vec();
    assert_eq!(r.run(r.t0, &old.build()).0, XDP_REDIRECT);
    assert_eq!(r.flow((CLIENT, 40001), (VIP, 80), 6).expect("flow").state.orig.end, 5006);
}

/// Empties the entry program's tail-call slot (`XLB_FULL_PROG`): from then
/// on, what the entry does not take itself is passed, counted.
fn remove_full_program(r: &mut Rig) {
    let ids = r.ctl.dataplane().program().expect("program").info().expect("info").map_ids().expect("map ids").unwrap_or_default();
    let slots = ids
        .into_iter()
        .map(|id| aya::maps::MapData::from_id(id).expect("map"))
        .find(|m| m.info().expect("map info").name_as_str() == Some(lb_common::maps::names::FULL_PROGRAM))
        .expect("the entry uses XLB_FULL_PROG");
    let mut slots = aya::maps::ProgramArray::try_from(aya::maps::Map::ProgramArray(slots)).expect("program array");
    slots.clear_index(&0).expect("clearing slot 0");
}

/// A handshake from CLIENT:`port` to VIP:80 through both programs (client
/// ISN 5000, backend ISN 9000), which leaves the flow established and
/// both directions' next hops cached.
fn handshake_to_port_80(r: &mut Rig, port: u16) {
    assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, port), (VIP, 80), TCP_SYN, 5000, 0).build()).0, XDP_REDIRECT);
    assert_eq!(r.run(r.t1, &Frame::tcp((BACKEND, 8080), (CLIENT, port), TCP_SYN | TCP_ACK, 9000, 5001).build()).0, XDP_REDIRECT);
    assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, port), (VIP, 80), TCP_ACK, 5001, 9001).build()).0, XDP_REDIRECT);
    assert!(!r.flow((CLIENT, port), (VIP, 80), 6).expect("flow").half_open, "established");
}

#[test]
fn the_entry_program_forwards_established_flows_by_itself_and_hands_the_rest_over() {
    let mut r = rig();
    // A connection through both programs, and one round of data each way
    // (so both directions' next hops are cached).
    handshake_to_port_80(&mut r, 40101);
    remove_full_program(&mut r);
    let lost = r.counter(stats::PASS_NO_FULL_PROGRAM);

    // The entry alone: a client's data, exactly as the full program would
    // rewrite and track it.
    let mut data = Frame::tcp((CLIENT, 40101), (VIP, 80), TCP_ACK | TCP_PSH, 5001, 9001);
    data.payload = b"hello".to_vec();
    let (verdict, out) = r.run(r.t0, &data.build());
    assert_eq!(verdict, XDP_REDIRECT, "a client's segment of an established flow is the entry's");
    assert_eq!(out, to_backend(data, 8080).build());
    assert_eq!(r.flow((CLIENT, 40101), (VIP, 80), 6).expect("flow").state.orig.end, 5006);
    // ...and the backend's answer.
    let mut reply = Frame::tcp((BACKEND, 8080), (CLIENT, 40101), TCP_ACK | TCP_PSH, 9001, 5006);
    reply.payload = b"world".to_vec();
    let (verdict, out) = r.run(r.t1, &reply.build());
    assert_eq!(verdict, XDP_REDIRECT, "a backend's segment of an established flow is the entry's");
    assert_eq!(out, to_client(reply, VIP.into(), 80).build());
    assert_eq!(r.flow((CLIENT, 40101), (VIP, 80), 6).expect("flow").state.reply.end, 9006);
    // Traffic of no service: passed by the entry.
    let other = Frame::tcp((CLIENT, 40101), (Ipv4Addr::new(10, 0, 0, 1), 22), TCP_SYN, 1, 0).build();
    assert_eq!(r.run(r.t0, &other), (XDP_PASS, other.clone()));
    assert_eq!(r.counter(stats::PASS_NO_FULL_PROGRAM), lost, "nothing above needed the full program");

    // What only the full program does (a SYN, a RST, an unknown flow)
    // reaches it by the tail call: without it, passed untouched, counted,
    // and nothing is created or torn down.
    let before = r.counts();
    for (what, f) in [
        ("a SYN", Frame::tcp((CLIENT, 40102), (VIP, 80), TCP_SYN, 7000, 0)),
        ("a RST of the flow", Frame::tcp((CLIENT, 40101), (VIP, 80), TCP_RST, 5006, 0)),
        ("a segment of no flow", Frame::tcp((CLIENT, 40103), (VIP, 80), TCP_ACK, 1, 1)),
    ] {
        let frame = f.build();
        assert_eq!(r.run(r.t0, &frame), (XDP_PASS, frame.clone()), "{what}");
    }
    assert_eq!(r.counter(stats::PASS_NO_FULL_PROGRAM), lost + 3);
    assert_eq!(r.counts(), before);
    assert!(r.flow((CLIENT, 40101), (VIP, 80), 6).is_some(), "the RST never reached the tracking");
}

#[test]
fn udp_checksums_are_updated_and_a_zero_checksum_stays_zero() {
    let mut r = rig();
    let dgram = Frame::udp((CLIENT, 5000), (VIP, 53), b"query");
    let (verdict, out) = r.run(r.t0, &dgram.build());
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out, to_backend(dgram, 5353).build());
    assert!(checksums_valid(&out, 14));

    let mut none = Frame::udp((CLIENT, 5001), (VIP, 53), b"no checksum");
    none.l4 = L4::Udp { sport: 5001, dport: 53, no_csum: true };
    let (verdict, out) = r.run(r.t0, &none.build());
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(&out[14 + 20 + 6..14 + 20 + 8], &[0, 0], "a zero UDP checksum must stay zero");
    assert_eq!(out, to_backend(none, 5353).build());
}

#[test]
fn traffic_that_is_not_for_a_service_passes_unchanged_and_creates_nothing() {
    let mut r = rig();
    let cases = [
        ("to the lb's own address", Frame::tcp((CLIENT, 40000), (Ipv4Addr::new(10, 0, 0, 1), 22), TCP_SYN, 1, 0)),
        ("to a VIP port without a service", Frame::tcp((CLIENT, 40000), (VIP, 443), TCP_SYN, 1, 0)),
        ("to a service without backends", Frame::tcp((CLIENT, 40000), (VIP, 81), TCP_SYN, 1, 0)),
    ];
    for (what, f) in cases {
        let input = f.build();
        let (verdict, out) = r.run(r.t0, &input);
        assert_eq!(verdict, XDP_PASS, "{what}");
        assert_eq!(out, input, "{what}: the frame was modified");
    }
    assert_eq!(r.flow_count(), 0);
    assert_eq!(r.counter(stats::PASS_NOT_SERVICE), 2);
    assert_eq!(r.counter(stats::PASS_NO_BACKEND), 1);
}

#[test]
fn vlan_tagged_flows_are_natted_and_left_to_the_kernel_to_forward() {
    let mut r = rig();
    let mut syn = Frame::tcp((CLIENT, 40002), (VIP, 80), TCP_SYN, 1, 0);
    syn.vlan = Some(100);
    let (verdict, out) = r.run(r.t0, &syn.build());
    assert_eq!(verdict, XDP_PASS);
    let mut want = syn.clone();
    want.dst = BACKEND.into();
    if let L4::Tcp { dport, .. } = &mut want.l4 {
        *dport = 8080;
    }
    assert_eq!(out, want.build(), "tagged frame: addresses rewritten, tag/MACs/TTL left to the kernel");
    assert!(checksums_valid(&out, 18));
    assert_eq!(r.counter(stats::PASS_VLAN), 1);
    assert_eq!(r.counter(stats::STATELESS_SYN), 1, "scheduled like any SYN of the service");
}

#[test]
fn frames_truncated_at_every_offset_get_a_safe_verdict_and_create_no_state() {
    let mut r = rig();
    let mut vlan_syn = Frame::tcp((CLIENT, 40003), (VIP, 80), TCP_SYN, 1, 0);
    vlan_syn.vlan = Some(7);
    let mut with_data = Frame::tcp((CLIENT, 40004), (VIP, 80), TCP_SYN, 1, 0);
    with_data.payload = vec![0xab; 16];
    let frames = [
        ("tcp syn", Frame::tcp((CLIENT, 40005), (VIP, 80), TCP_SYN, 1, 0)),
        ("tcp syn with payload", with_data),
        ("vlan tcp syn", vlan_syn),
        ("udp", Frame::udp((CLIENT, 5002), (VIP, 53), b"abcdefgh")),
        ("backend reply", Frame::tcp((BACKEND, 8080), (CLIENT, 40006), TCP_SYN | TCP_ACK, 1, 2)),
    ];
    for (what, f) in frames {
        let full = f.build();
        // The kernel refuses frames shorter than an Ethernet header itself.
        for len in 14..full.len() {
            let (verdict, _) = r.run(r.t0, &full[..len]);
            assert!(verdict == XDP_PASS || verdict == XDP_DROP, "{what} cut at {len}: verdict {verdict}");
            assert_eq!(r.flow_count(), 0, "{what} cut at {len} created state");
        }
    }
}

#[test]
fn bad_headers_fragments_and_options_are_counted_and_never_natted() {
    let mut r = rig();
    let syn = || Frame::tcp((CLIENT, 40007), (VIP, 80), TCP_SYN, 1, 0);
    let mut cases: Vec<(&str, Vec<u8>, u32, u32)> = Vec::new();
    let mut f = syn().build();
    f[14] = 0x44; // IHL 4
    cases.push(("ihl 4", f, XDP_DROP, stats::DROP_MALFORMED));
    let mut f = syn().build();
    f[14] = 0x46; // IHL 6: options (the TCP header shifts; we never get there)
    cases.push(("ip options", f, XDP_PASS, stats::PASS_IP_OPTIONS));
    let mut f = syn().build();
    f[14 + 6] = 0x20; // MF
    cases.push(("first fragment", f, XDP_DROP, stats::DROP_FRAGMENT));
    let mut f = syn().build();
    f[14 + 7] = 0x10; // offset 16
    cases.push(("later fragment", f, XDP_DROP, stats::DROP_FRAGMENT));
    let mut f = syn().build();
    f[14 + 2..14 + 4].copy_from_slice(&200u16.to_be_bytes()); // tot_len past the frame
    cases.push(("tot_len too long", f, XDP_DROP, stats::DROP_MALFORMED));
    let mut f = syn().build();
    f[14 + 2..14 + 4].copy_from_slice(&19u16.to_be_bytes());
    cases.push(("tot_len below header", f, XDP_DROP, stats::DROP_MALFORMED));
    let mut f = syn().build();
    f[14 + 20 + 12] = 0x40; // doff 4
    cases.push(("tcp doff 4", f, XDP_DROP, stats::DROP_MALFORMED));
    let mut f = syn().build();
    f[14 + 20 + 12] = 0xf0; // doff 15: 60 bytes, frame has 20
    cases.push(("tcp doff past the end", f, XDP_DROP, stats::DROP_MALFORMED));
    let mut f = Frame::udp((CLIENT, 5003), (VIP, 53), b"x").build();
    f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&100u16.to_be_bytes());
    cases.push(("udp length past the end", f, XDP_DROP, stats::DROP_MALFORMED));
    let mut f = Frame::udp((CLIENT, 5004), (VIP, 53), b"x").build();
    f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&7u16.to_be_bytes());
    cases.push(("udp length below header", f, XDP_DROP, stats::DROP_MALFORMED));

    r.assert_untouched(&cases);
}

#[test]
fn a_backend_behind_the_ingress_nic_is_reached_with_xdp_tx() {
    let mut r = rig();
    let syn = Frame::tcp((CLIENT, 40010), (VIP, 82), TCP_SYN, 1, 0);
    let (verdict, out) = r.run(r.t0, &syn.build());
    assert_eq!(verdict, 3, "XDP_TX");
    let mut want = syn.clone();
    want.dst = Ipv4Addr::new(10, 0, 0, 3).into();
    want.ttl -= 1;
    want.src_mac = T0_MAC;
    want.dst_mac = [2, 0, 0, 0, 0, 3];
    if let L4::Tcp { dport, .. } = &mut want.l4 {
        *dport = 80;
    }
    assert_eq!(out, want.build());
    assert_eq!(r.counter(stats::TX), 1);
}

#[test]
fn an_unresolved_neighbour_hands_the_rewritten_packet_to_the_kernel() {
    let mut r = rig();
    let syn = Frame::tcp((CLIENT, 40011), (VIP, 83), TCP_SYN, 1, 0);
    let (verdict, out) = r.run(r.t0, &syn.build());
    assert_eq!(verdict, XDP_PASS);
    // Rewritten for the backend; TTL and MACs are the kernel's to set.
    let mut want = syn.clone();
    want.dst = Ipv4Addr::new(10, 1, 1, 9).into();
    if let L4::Tcp { dport, .. } = &mut want.l4 {
        *dport = 80;
    }
    assert_eq!(out, want.build());
    assert_eq!(r.counter(stats::PASS_NO_NEIGH), 1);
    assert_eq!(r.flow_count(), 0, "a SYN of a Maglev service writes nothing: its retransmission hashes alike");
}

/// The RST the program must emit in answer to `seg` (arrived on the NIC
/// whose MAC is `our_mac`, from `peer_mac`).
fn expected_rst(seg: &Frame, ack: Option<u32>, seg_end: u32) -> Vec<u8> {
    let (sport, dport) = match seg.l4 {
        L4::Tcp { sport, dport, .. } => (sport, dport),
        L4::Udp { .. } => unreachable!("tcp only"),
    };
    let r = lb_common::rst::answering(addr_from_ip(seg.src), addr_from_ip(seg.dst), sport.to_be_bytes(), dport.to_be_bytes(), ack, seg_end);
    let mut out = Vec::new();
    out.extend_from_slice(&seg.src_mac);
    out.extend_from_slice(&seg.dst_mac);
    if r.is_v6() {
        out.extend_from_slice(&0x86ddu16.to_be_bytes());
        out.extend_from_slice(&lb_common::rst::build_v6(&r));
    } else {
        out.extend_from_slice(&0x0800u16.to_be_bytes());
        out.extend_from_slice(&lb_common::rst::build_v4(&r));
    }
    out
}

/// A completed handshake client:`port` → VIP:80 (ISNs 100 and 700): the
/// flow is in the connection table.
fn establish(r: &mut Rig, port: u16) {
    let syn = Frame::tcp((CLIENT, port), (VIP, 80), TCP_SYN, 100, 0);
    assert_eq!(r.run(r.t0, &syn.build()).0, XDP_REDIRECT);
    let syn_ack = Frame::tcp((BACKEND, 8080), (CLIENT, port), TCP_SYN | TCP_ACK, 700, 101);
    assert_eq!(r.run(r.t1, &syn_ack.build()).0, XDP_REDIRECT);
    let ack = Frame::tcp((CLIENT, port), (VIP, 80), TCP_ACK, 101, 701);
    assert_eq!(r.run(r.t0, &ack.build()).0, XDP_REDIRECT);
    assert!(r.flow((CLIENT, port), (VIP, 80), 6).is_some_and(|f| !f.half_open), "the handshake confirmed the flow");
}

fn set_backend_state(r: &mut Rig, state: u8) {
    let b = lb_common::maps::Backend { addr: addr_from_ip(BACKEND.into()), port: flows::net_port(8080), state, weight: 1, ..Default::default() };
    // The TCP backend was the first one added: id 0.
    r.ctl.dataplane().backend_set(0, b).expect("backend state");
}

#[test]
fn a_mid_flow_segment_without_state_is_answered_with_an_exact_rst_where_it_cannot_be_hashed() {
    let mut r = rig();
    // Full NAT: without its flow the segment has no source port to go with.
    let mut data = Frame::tcp((CLIENT, 40020), (VIP, 84), TCP_ACK | TCP_PSH, 5000, 9000);
    data.payload = b"orphan".to_vec();
    let (verdict, out) = r.run(r.t0, &data.build());
    assert_eq!(verdict, 3, "XDP_TX");
    assert_eq!(out, expected_rst(&data, Some(9000), 5006), "RST from VIP:84 with seq = the segment's ack");
    assert_eq!(r.counter(stats::RST_MISS), 1);
    assert_eq!(r.flow_count(), 0, "a miss creates no state");
    // A RST without state is neither answered nor recorded.
    let rst = Frame::tcp((CLIENT, 40020), (VIP, 84), lb_common::tcp::FLAG_RST, 5006, 0);
    assert_eq!(r.run(r.t0, &rst.build()).0, XDP_PASS);
    assert_eq!(r.counter(stats::PASS_NO_FLOW), 1);
    assert_eq!(r.flow_count(), 0);
    // Round robin with the default miss policy: the same.
    let wrr = xlb::model::settings::ServiceOptions { scheduler: Some(xlb::model::settings::Scheduler::Wrr), ..Default::default() };
    r.ctl.service_set(SocketAddr::new(VIP.into(), 80), Some(Proto::Tcp), &wrr).expect("round robin");
    let data = Frame::tcp((CLIENT, 40021), (VIP, 80), TCP_ACK, 5000, 9000);
    let (verdict, out) = r.run(r.t0, &data.build());
    assert_eq!(verdict, 3, "XDP_TX");
    assert_eq!(out, expected_rst(&data, Some(9000), 5000));
    assert_eq!(r.counter(stats::RST_MISS), 2);
}

#[test]
fn a_mid_flow_segment_of_a_maglev_service_goes_where_the_hash_says_and_the_backends_answer_restores_the_flow() {
    let mut r = rig();
    // A flow this balancer never saw (another node's, or a lost table).
    let mut data = Frame::tcp((CLIENT, 40025), (VIP, 80), TCP_ACK | TCP_PSH, 5000, 9000);
    data.payload = b"mid-flow".to_vec();
    let (verdict, out) = r.run(r.t0, &data.build());
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out, to_backend(data, 8080).build());
    assert_eq!(r.counter(stats::REHASHED), 1);
    assert_eq!(r.flow_count(), 0, "what a client sends creates nothing by itself");
    // The backend has the connection and answers: the flow is re-created,
    // established, from the backend's side.
    let ack = Frame::tcp((BACKEND, 8080), (CLIENT, 40025), TCP_ACK, 9000, 5008);
    let (verdict, out) = r.run(r.t1, &ack.build());
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out, to_client(ack, VIP.into(), 80).build(), "from the VIP, never from the backend's address");
    let f = r.flow((CLIENT, 40025), (VIP, 80), 6).expect("re-created");
    assert!(f.half_open, "what a backend's address alone says waits in the half-open table");
    assert_eq!(f.state.flags & FLOW_PICKED_UP, FLOW_PICKED_UP);
    assert_eq!(r.counter(stats::REDERIVED), 1);
    // A client segment out of line with the backend's (acknowledging
    // data the backend never sent) confirms nothing...
    let wild = Frame::tcp((CLIENT, 40025), (VIP, 80), TCP_ACK, 5008, 9000 + (1 << 30));
    assert_eq!(r.run(r.t0, &wild.build()).0, XDP_REDIRECT);
    assert!(r.flow((CLIENT, 40025), (VIP, 80), 6).expect("flow").half_open);
    // ...the client's next real segment does.
    let next = Frame::tcp((CLIENT, 40025), (VIP, 80), TCP_ACK, 5008, 9000);
    assert_eq!(r.run(r.t0, &next.build()).0, XDP_REDIRECT);
    assert!(!r.flow((CLIENT, 40025), (VIP, 80), 6).expect("flow").half_open, "confirmed by the client");
    // The backend's end of a connection this balancer does not hold goes
    // back to the client from the VIP and creates nothing.
    let rst = Frame::tcp((BACKEND, 8080), (CLIENT, 40026), lb_common::tcp::FLAG_RST, 7000, 0);
    let (verdict, out) = r.run(r.t1, &rst.build());
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out, to_client(rst, VIP.into(), 80).build());
    assert_eq!(r.counter(stats::REPLY_STATELESS), 1);
    assert_eq!(r.flow_count(), 1);
}

#[test]
fn packets_of_a_flow_whose_backend_is_gone_get_a_rst_and_the_flow_goes() {
    let mut r = rig();
    establish(&mut r, 40021);
    assert_eq!(r.flow_count(), 1);
    set_backend_state(&mut r, lb_common::maps::BACKEND_REMOVED);
    let mut data = Frame::tcp((CLIENT, 40021), (VIP, 80), TCP_ACK | TCP_PSH, 101, 701);
    data.payload = b"into the void?".to_vec();
    let (verdict, out) = r.run(r.t0, &data.build());
    assert_eq!(verdict, 3, "XDP_TX");
    assert_eq!(out, expected_rst(&data, Some(701), 115));
    assert_eq!(r.counter(stats::RST_REACTIVE), 1);
    assert_eq!(r.flow_count(), 0, "the flow removed");
    // The client's next segment (e.g. a retransmission) finds no backend
    // to hash to: the kernel (which holds the VIP and no socket) answers.
    let (verdict, _) = r.run(r.t0, &data.build());
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(r.counter(stats::PASS_NO_BACKEND), 1);
    assert_eq!(r.flow_count(), 0);
}

#[test]
fn a_draining_backend_keeps_its_flows_and_gets_no_new_ones() {
    let mut r = rig();
    establish(&mut r, 40022);
    set_backend_state(&mut r, lb_common::maps::BACKEND_DRAINING);
    let data = Frame::tcp((CLIENT, 40022), (VIP, 80), TCP_ACK, 101, 701);
    assert_eq!(r.run(r.t0, &data.build()).0, XDP_REDIRECT, "existing flow still forwarded");
    let syn = Frame::tcp((CLIENT, 40023), (VIP, 80), TCP_SYN, 1, 0);
    assert_eq!(r.run(r.t0, &syn.build()).0, XDP_PASS, "no new flow to a draining backend");
    assert_eq!(r.counter(stats::PASS_NO_BACKEND), 1);
}

#[test]
fn only_a_rst_with_the_exact_expected_sequence_tears_a_flow_down() {
    let mut r = rig();
    establish(&mut r, 40024);
    // Spoofed: in the neighbourhood but not exact.
    for seq in [100u32, 102, 101 + 1000, 5] {
        let rst = Frame::tcp((CLIENT, 40024), (VIP, 80), lb_common::tcp::FLAG_RST, seq, 0);
        assert_eq!(r.run(r.t0, &rst.build()).0, XDP_REDIRECT, "forwarded: the backend decides (challenge ACK)");
        assert_eq!(r.flow_count(), 1, "RST with seq {seq} removed the flow");
    }
    assert_eq!(r.counter(stats::RST_IGNORED), 4);
    // From the backend's side, spoofed too.
    let rst = Frame::tcp((BACKEND, 8080), (CLIENT, 40024), lb_common::tcp::FLAG_RST, 9999, 0);
    assert_eq!(r.run(r.t1, &rst.build()).0, XDP_REDIRECT);
    assert_eq!(r.flow_count(), 1);
    // Blind: an ACK far outside the window does not move what "exact" is.
    for seq in [0x4000_0000u32, 0x4000_0000 + (1 << 31)] {
        let ack = Frame::tcp((CLIENT, 40024), (VIP, 80), TCP_ACK, seq, 701);
        assert_eq!(r.run(r.t0, &ack.build()).0, XDP_REDIRECT);
        let rst = Frame::tcp((CLIENT, 40024), (VIP, 80), lb_common::tcp::FLAG_RST, seq, 0);
        assert_eq!(r.run(r.t0, &rst.build()).0, XDP_REDIRECT);
        assert_eq!(r.flow_count(), 1, "a blind ACK and RST at {seq} tore the flow down");
    }
    assert_eq!(r.counter(stats::TCP_OUT_OF_WINDOW), 2);
    assert_eq!(r.flow((CLIENT, 40024), (VIP, 80), 6).expect("flow").state.orig.end, 101, "out-of-window segments moved nothing");
    // Exact: the backend's next sequence number.
    let rst = Frame::tcp((BACKEND, 8080), (CLIENT, 40024), lb_common::tcp::FLAG_RST, 701, 0);
    let (verdict, out) = r.run(r.t1, &rst.build());
    assert_eq!(verdict, XDP_REDIRECT, "the RST itself still reaches the client");
    assert!(checksums_valid(&out, 14));
    assert_eq!(r.counter(stats::RST_TEARDOWN), 1);
    assert_eq!(r.flow_count(), 0);
    // Packets after the RST recreate nothing: hashed to the backend, whose
    // stack resets them.
    let late = Frame::tcp((CLIENT, 40024), (VIP, 80), TCP_ACK, 101, 701);
    assert_eq!(r.run(r.t0, &late.build()).0, XDP_REDIRECT);
    assert_eq!(r.flow_count(), 0);
}

#[test]
fn udp_flows_of_a_gone_backend_are_rescheduled() {
    let mut r = rig();
    let dgram = Frame::udp((CLIENT, 5010), (VIP, 53), b"q1");
    assert_eq!(r.run(r.t0, &dgram.build()).0, XDP_REDIRECT);
    // Replace the only UDP backend (id 1) with another (added through the controller).
    let svc = SocketAddr::new(VIP.into(), 53);
    r.ctl.backend_add(svc, Some(Proto::Udp), SocketAddr::new(Ipv4Addr::new(10, 1, 1, 3).into(), 5353), None).expect("add");
    r.ctl.dataplane().backend_set(1, lb_common::maps::Backend { state: lb_common::maps::BACKEND_REMOVED, ..Default::default() }).expect("gone");
    r.ns.ip(&["neigh", "add", "10.1.1.3", "lladdr", "02:00:00:00:01:03", "dev", "t1", "nud", "permanent"]).expect("neigh");
    let (verdict, out) = r.run(r.t0, &dgram.build());
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(&out[14 + 16..14 + 20], &[10, 1, 1, 3], "rescheduled to the live backend");
    assert_eq!(r.counter(stats::UDP_RESCHEDULED), 1);
    assert_eq!(r.flow_count(), 1, "the old flow replaced by the new one");
    assert_eq!(r.flow((CLIENT, 5010), (VIP, 53), 17).expect("flow").state.backend_id, 7, "on the new backend (id 7)");
}

#[test]
fn rehash_policy_schedules_a_mid_flow_segment_by_hash_and_the_backends_answer_restores_it() {
    let mut r = rig();
    let svc = SocketAddr::new(VIP.into(), 80);
    let opts = xlb::model::settings::ServiceOptions {
        scheduler: Some(xlb::model::settings::Scheduler::Wrr),
        on_miss: Some(xlb::model::settings::MissPolicy::Rehash),
        ..Default::default()
    };
    r.ctl.service_set(svc, Some(Proto::Tcp), &opts).expect("set on_miss");
    let data = Frame::tcp((CLIENT, 40030), (VIP, 80), TCP_ACK, 42, 43);
    let (verdict, out) = r.run(r.t0, &data.build());
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out, to_backend(data, 8080).build());
    assert_eq!(r.counter(stats::REHASHED), 1);
    assert_eq!(r.flow_count(), 0, "a client's segment alone creates nothing");
    let ack = Frame::tcp((BACKEND, 8080), (CLIENT, 40030), TCP_ACK, 43, 42);
    assert_eq!(r.run(r.t1, &ack.build()).0, XDP_REDIRECT);
    let f = r.flow((CLIENT, 40030), (VIP, 80), 6).expect("entry created by the backend's answer");
    assert_eq!((f.half_open, f.state.orig.state, f.state.reply.state), (true, tcp::STATE_ESTABLISHED, tcp::STATE_ESTABLISHED));
    assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, 40030), (VIP, 80), TCP_ACK, 42, 43).build()).0, XDP_REDIRECT);
    assert!(!r.flow((CLIENT, 40030), (VIP, 80), 6).expect("flow").half_open, "the client's next segment confirms it");
}

#[test]
fn maglev_moves_only_the_removed_backends_flows() {
    let mut r = rig();
    let svc = SocketAddr::new(VIP.into(), 90);
    r.ctl.service_add(svc, Proto::Tcp, &Default::default()).expect("maglev service (the default)");
    let backends: Vec<SocketAddr> = (0..4).map(|i| SocketAddr::new(Ipv4Addr::new(10, 1, 1, 20 + i).into(), 80)).collect();
    for (i, b) in backends.iter().enumerate() {
        r.ns.ip(&["neigh", "add", &b.ip().to_string(), "lladdr", &format!("02:00:00:00:02:{i:02x}"), "dev", "t1", "nud", "permanent"]).expect("neigh");
        r.ctl.backend_add(svc, Some(Proto::Tcp), *b, None).expect("backend");
    }
    // 10k flows from distinct client ports; each SYN goes where the hash
    // sends it (read from the rewritten frame), and that backend's SYN-ACK
    // enters the flow in the table.
    let flows: Vec<(Ipv4Addr, u16)> = (0..10_000u32).map(|i| (Ipv4Addr::new(10, 0, 0, 2 + (i / 50_000) as u8), 10_000 + i as u16)).collect();
    let map_all = |r: &mut Rig| -> Vec<lb_common::maps::Addr> {
        flows
            .iter()
            .map(|&(ip, port)| {
                let syn = Frame::tcp((ip, port), (VIP, 90), TCP_SYN, 1, 0);
                let (verdict, out) = r.run(r.t0, &syn.build());
                assert_eq!(verdict, XDP_REDIRECT);
                addr_from_ip(Ipv4Addr::new(out[30], out[31], out[32], out[33]).into())
            })
            .collect()
    };
    let before = map_all(&mut r);
    let ip_of = |b: &lb_common::maps::Addr| lb_common::maps::addr_to_ip(b);
    let mut id_of = std::collections::HashMap::new();
    for (&(ip, port), b) in flows.iter().zip(&before) {
        let IpAddr::V4(b) = ip_of(b) else { panic!("an IPv4 backend") };
        let syn_ack = Frame::tcp((b, 80), (ip, port), TCP_SYN | TCP_ACK, 7, 2);
        assert_eq!(r.run(r.t1, &syn_ack.build()).0, XDP_REDIRECT);
        id_of.insert(IpAddr::V4(b), r.flow((ip, port), (VIP, 90), 6).expect("the SYN-ACK's flow").state.backend_id);
    }
    assert_eq!(id_of.len(), 4, "every backend got flows");
    let removed = addr_from_ip(backends[1].ip());
    let share = before.iter().filter(|b| **b == removed).count();
    assert!((2000..3000).contains(&share), "backend 1 has {share} of 10k flows");
    r.ctl.backend_remove(svc, Some(Proto::Tcp), backends[1]).expect("remove");
    // What the daemon's reset worker does with the job (no RSTs: removal only).
    let table = r.ctl.table();
    for job in r.ctl.take_jobs() {
        xlb::resets::run(&table, None, &job, &mut |_| {});
    }
    // In the table: the removed backend's flows are gone, every other flow
    // is still on its backend.
    let mut in_table = 0;
    for (&(ip, port), b) in flows.iter().zip(&before) {
        match r.flow((ip, port), (VIP, 90), 6) {
            Some(f) => {
                assert_eq!(Some(&f.state.backend_id), id_of.get(&ip_of(b)), "a flow of a remaining backend moved in the table");
                in_table += 1;
            }
            None => assert_eq!(*b, removed, "a flow of a remaining backend left the table"),
        }
    }
    assert_eq!(in_table, 10_000 - share);
    // Without state (another balancer, or a lost table), the same 5-tuples
    // hashed again: Maglev's minimal disruption keeps almost all of the
    // remaining backends' flows where they were.
    let keys: Vec<lb_common::maps::FlowKey> = {
        let mut k = Vec::new();
        r.ctl.dataplane().for_each_flow(|key, _| k.push(*key)).expect("walk");
        k
    };
    r.ctl.table().remove_keys(&keys).expect("clear");
    let after = map_all(&mut r);
    let mut moved_others = 0;
    for (b, a) in before.iter().zip(&after) {
        if *b == removed {
            assert_ne!(*a, removed, "a flow still maps to the removed backend");
        } else if b != a {
            moved_others += 1;
        }
    }
    assert!(moved_others * 100 <= 10_000 - share, "{moved_others} flows of remaining backends moved (> 1%)");
}

#[test]
fn a_tcp_flow_waits_in_the_half_open_table_until_its_handshake_completes() {
    let mut r = rig();
    let syn = Frame::tcp((CLIENT, 40040), (VIP, 80), TCP_SYN, 100, 0);
    assert_eq!(r.run(r.t0, &syn.build()).0, XDP_REDIRECT);
    assert_eq!(r.counts(), (0, 0), "SYN: nothing");
    let syn_ack = Frame::tcp((BACKEND, 8080), (CLIENT, 40040), TCP_SYN | TCP_ACK, 700, 101);
    assert_eq!(r.run(r.t1, &syn_ack.build()).0, XDP_REDIRECT);
    assert_eq!(r.counts(), (0, 1), "SYN-ACK: half-open");
    // An ACK that does not acknowledge the backend's ISN + 1 confirms
    // nothing (it is still forwarded: the backend's stack judges it).
    for ack_no in [700u32, 702, 5] {
        let bad = Frame::tcp((CLIENT, 40040), (VIP, 80), TCP_ACK, 101, ack_no);
        assert_eq!(r.run(r.t0, &bad.build()).0, XDP_REDIRECT);
        assert_eq!(r.counts(), (0, 1), "an ACK of {ack_no} promoted the flow");
    }
    assert_eq!(r.counter(stats::HANDSHAKE_UNVERIFIED), 3);
    let ack = Frame::tcp((CLIENT, 40040), (VIP, 80), TCP_ACK, 101, 701);
    let (verdict, out) = r.run(r.t0, &ack.build());
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out, to_backend(ack, 8080).build());
    assert_eq!(r.counts(), (1, 0), "ACK of the SYN-ACK: promoted to the connection table");
    assert_eq!(r.counter(stats::PROMOTED), 1);
    let f = r.flow((CLIENT, 40040), (VIP, 80), 6).expect("flow");
    assert_eq!((f.state.orig.state, f.state.orig.end), (tcp::STATE_ESTABLISHED, 101));
    assert_eq!(f.state.reply.end, 701, "the backend's side kept its tracking");
    // UDP: half-open until the backend answers.
    assert_eq!(r.run(r.t0, &Frame::udp((CLIENT, 5050), (VIP, 53), b"x").build()).0, XDP_REDIRECT);
    assert_eq!(r.counts(), (1, 1));
    assert_eq!(r.run(r.t1, &Frame::udp((BACKEND, 5353), (CLIENT, 5050), b"y").build()).0, XDP_REDIRECT);
    assert_eq!(r.counts(), (2, 0), "the answer confirmed the UDP flow");
}

#[test]
fn a_tcp_flow_is_reported_new_when_its_handshake_completes_not_at_its_syn() {
    let mut r = rig();
    let g = r.ctl.dataplane().globals().expect("globals");
    r.ctl.dataplane().globals_set(lb_common::maps::Globals { flags: lb_common::maps::GLOBAL_LOG_NEW_FLOWS, ..g }).expect("switch");
    let mut events = r.ctl.dataplane().take_flow_events().expect("ring buffer");
    let mut drain = || {
        let mut got = Vec::new();
        while let Some(item) = events.next() {
            assert!(item.len() >= std::mem::size_of::<lb_common::maps::FlowEnd>());
            // SAFETY: the program writes whole FlowEnd records.
            got.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<lb_common::maps::FlowEnd>()) });
        }
        got
    };
    // A SYN (what a flood is made of) is not reported...
    assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, 40060), (VIP, 80), TCP_SYN, 100, 0).build()).0, XDP_REDIRECT);
    assert_eq!(r.run(r.t1, &Frame::tcp((BACKEND, 8080), (CLIENT, 40060), TCP_SYN | TCP_ACK, 700, 101).build()).0, XDP_REDIRECT);
    assert!(drain().is_empty(), "nothing reported during the handshake");
    // ...the completed handshake is, with both directions.
    assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, 40060), (VIP, 80), TCP_ACK, 101, 701).build()).0, XDP_REDIRECT);
    let got = drain();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].reason, lb_common::maps::end_reason::NEW);
    assert_eq!(u16::from_be(got[0].key.src_port), 40060);
    assert_eq!((got[0].state.orig.state, got[0].state.reply.end), (tcp::STATE_ESTABLISHED, 701), "both directions are in the record");
    assert_eq!((got[0].backend, u16::from_be(got[0].backend_port)), (addr_from_ip(BACKEND.into()), 8080), "with its backend");
    // UDP: reported when the backend answers.
    assert_eq!(r.run(r.t0, &Frame::udp((CLIENT, 5060), (VIP, 53), b"x").build()).0, XDP_REDIRECT);
    assert!(drain().is_empty());
    assert_eq!(r.run(r.t1, &Frame::udp((BACKEND, 5353), (CLIENT, 5060), b"y").build()).0, XDP_REDIRECT);
    let got = drain();
    assert_eq!((got.len(), got.first().map(|e| e.key.proto)), (1, Some(17)));
}

/// An expiry decision made now for every flow of the rig's TCP service
/// (as if it had been idle for 10 s past a 1 s timeout), and the data
/// plane's clock when it was made.
fn expiry_plan(r: &mut Rig) -> (xlb::table::Decisions, u32) {
    use xlb::model::settings::{Dur, Timeouts};
    let one = Dur(std::time::Duration::from_secs(1));
    let sid = r.ctl.resolve(SocketAddr::from((VIP, 80)), Some(Proto::Tcp)).expect("service");
    let timeouts = Timeouts { syn: one, established: one, closing: one, udp: one };
    let rules = xlb::table::Rules { services: [(0, xlb::table::ServiceRules { sid, timeouts, reset_on_idle: false })].into(), totals: Default::default() };
    let table = r.ctl.table();
    let now = table.now().expect("clock");
    let (_, d) = xlb::table::walk(&table, &rules, now.wrapping_add(10 * table.hz()), &mut |_| {}).expect("walk");
    (d, now)
}

#[test]
fn a_flow_that_revives_or_is_replaced_after_an_expiry_plan_is_not_removed_by_it() {
    let mut r = rig();
    let handshake = |r: &mut Rig, port: u16| {
        assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, port), (VIP, 80), TCP_SYN, 100, 0).build()).0, XDP_REDIRECT);
        assert_eq!(r.run(r.t1, &Frame::tcp((BACKEND, 8080), (CLIENT, port), TCP_SYN | TCP_ACK, 700, 101).build()).0, XDP_REDIRECT);
        assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, port), (VIP, 80), TCP_ACK, 101, 701).build()).0, XDP_REDIRECT);
    };
    handshake(&mut r, 40070); // revives
    handshake(&mut r, 40071); // is replaced by a new connection on its tuple
    handshake(&mut r, 40072); // stays idle
    let (plan, planned) = expiry_plan(&mut r);
    assert_eq!(plan.forget.len(), 3, "all three look idle to the plan");
    // After the plan (a tick of the data plane's clock later, as anything
    // after an idle timeout is): 40070 sends a packet, 40071 ends and its
    // client connects again from the same port.
    let table = r.ctl.table();
    testbed::wait_for("the clock to tick", std::time::Duration::from_secs(1), || (table.now().ok()? != planned).then_some(())).expect("clock");
    assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, 40070), (VIP, 80), TCP_ACK, 101, 701).build()).0, XDP_REDIRECT);
    let old = r.flow((CLIENT, 40071), (VIP, 80), 6).expect("flow");
    let key = flows::key(SocketAddr::from((CLIENT, 40071)), SocketAddr::from((VIP, 80)), 6);
    assert_eq!(r.ctl.table().remove_keys(&[key]).expect("end"), 1);
    handshake(&mut r, 40071);
    assert_ne!(r.flow((CLIENT, 40071), (VIP, 80), 6).expect("new flow").state.created, old.state.created);
    let expired = xlb::table::expire(&r.ctl.table(), &plan).expect("expire");
    assert_eq!(expired.forgotten.len(), 1, "only the flow still as the plan saw it");
    assert!(r.flow((CLIENT, 40070), (VIP, 80), 6).is_some(), "the revived flow stays");
    assert!(r.flow((CLIENT, 40071), (VIP, 80), 6).is_some(), "the new connection on the same tuple stays");
    assert!(r.flow((CLIENT, 40072), (VIP, 80), 6).is_none(), "the idle one went");
}

#[test]
fn next_hops_are_cached_for_a_second_and_then_looked_up_again() {
    let mut r = rig();
    let syn = Frame::tcp((CLIENT, 40050), (VIP, 80), TCP_SYN, 1, 0);
    let (_, out) = r.run(r.t0, &syn.build());
    assert_eq!(&out[0..6], &BACKEND_MAC);
    // The backend's MAC changes (a replaced machine, a failover).
    r.ns.ip(&["neigh", "replace", "10.1.1.2", "lladdr", "02:00:00:00:01:99", "dev", "t1", "nud", "permanent"]).expect("neigh");
    let next = Frame::tcp((CLIENT, 40051), (VIP, 80), TCP_SYN, 1, 0);
    let (_, out) = r.run(r.t0, &next.build());
    assert_eq!(&out[0..6], &BACKEND_MAC, "within the second the cached next hop is used");
    let changed = testbed::wait_for("the new MAC to be used", Duration::from_secs(3), || {
        let f = Frame::tcp((CLIENT, 40052), (VIP, 80), TCP_SYN, 1, 0);
        let (_, out) = r.run(r.t0, &f.build());
        (out[0..6] == [2, 0, 0, 0, 1, 0x99]).then_some(())
    });
    assert!(changed.is_ok(), "the changed neighbour was never picked up");
}

#[test]
fn a_next_hop_expires_after_a_second_whichever_path_cached_it() {
    let mut r = rig();
    // The stateless SYN caches the backend's next hop; the flow's own
    // packets use it after.
    assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, 40060), (VIP, 80), TCP_SYN, 1, 0).build()).0, XDP_REDIRECT);
    assert_eq!(r.run(r.t1, &Frame::tcp((BACKEND, 8080), (CLIENT, 40060), TCP_SYN | TCP_ACK, 9, 2).build()).0, XDP_REDIRECT);
    let ack = Frame::tcp((CLIENT, 40060), (VIP, 80), TCP_ACK, 2, 10).build();
    let (verdict, out) = r.run(r.t0, &ack);
    assert_eq!((verdict, &out[0..6]), (XDP_REDIRECT, &BACKEND_MAC[..]));
    r.ns.ip(&["neigh", "replace", "10.1.1.2", "lladdr", "02:00:00:00:01:99", "dev", "t1", "nud", "permanent"]).expect("neigh");
    let changed = testbed::wait_for("the flow's packets to use the new MAC", Duration::from_secs(3), || {
        let (_, out) = r.run(r.t0, &ack);
        (out[0..6] == [2, 0, 0, 0, 1, 0x99]).then_some(())
    });
    assert!(changed.is_ok(), "a next hop cached by a SYN never expired for the flow's packets");
    // The slot the flow's path refreshed serves the SYN path as fresh.
    let lookups = r.counter(stats::FIB_LOOKUPS);
    for port in 40061..40071 {
        assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, port), (VIP, 80), TCP_SYN, 1, 0).build()).0, XDP_REDIRECT);
    }
    assert!(r.counter(stats::FIB_LOOKUPS) - lookups <= 1, "SYNs looked the next hop up again and again");
}

// ---- IPv6 ----

#[test]
fn clients_behind_one_gateway_share_its_next_hop() {
    let mut r = rig();
    // Routed clients: 10.77.0.0/16 behind gateway 10.0.0.254.
    r.ns.ip(&["neigh", "add", "10.0.0.254", "lladdr", "02:00:00:00:00:fe", "dev", "t0", "nud", "permanent"]).expect("neigh");
    r.ns.ip(&["route", "add", "10.77.0.0/16", "via", "10.0.0.254"]).expect("route");
    let clients: Vec<Ipv4Addr> = (1..=50).map(|i| Ipv4Addr::new(10, 77, i, 9)).collect();
    for (i, c) in clients.iter().enumerate() {
        let syn = Frame::tcp((*c, 41400 + i as u16), (VIP, 80), TCP_SYN, 1, 0);
        assert_eq!(r.run(r.t0, &syn.build()).0, XDP_REDIRECT);
    }
    // Each client's SYN-ACK enters its flow; the first reply of the flow
    // learns its next hop: the gateway.
    for (i, c) in clients.iter().enumerate() {
        for (flags, seq) in [(TCP_SYN | TCP_ACK, 9), (TCP_ACK, 10)] {
            let reply = Frame::tcp((BACKEND, 8080), (*c, 41400 + i as u16), flags, seq, 2);
            let (verdict, out) = r.run(r.t1, &reply.build());
            assert_eq!(verdict, XDP_REDIRECT);
            assert_eq!(&out[0..6], &[2, 0, 0, 0, 0, 0xfe], "sent to the gateway");
        }
        let f = r.flow((*c, 41400 + i as u16), (VIP, 80), 6).expect("flow");
        assert_eq!(f.state.hop, lb_common::maps::neighbour_hash(&addr_from_ip(Ipv4Addr::new(10, 0, 0, 254).into())), "the entry remembers the gateway");
    }
    // From then on every client's packets use the gateway's one slot: no
    // FIB lookup, however many clients there are.
    let lookups = r.counter(stats::FIB_LOOKUPS);
    for _ in 0..3 {
        for (i, c) in clients.iter().enumerate() {
            let data = Frame::tcp((BACKEND, 8080), (*c, 41400 + i as u16), TCP_ACK, 10, 2);
            assert_eq!(r.run(r.t1, &data.build()).0, XDP_REDIRECT);
        }
    }
    assert_eq!(r.counter(stats::FIB_LOOKUPS), lookups, "replies to 50 clients behind one gateway looked the route up again");
    // The gateway's MAC changes: every client follows within the slot's second.
    r.ns.ip(&["neigh", "replace", "10.0.0.254", "lladdr", "02:00:00:00:00:fd", "dev", "t0", "nud", "permanent"]).expect("neigh");
    testbed::wait_for("the gateway's new MAC", Duration::from_secs(3), || {
        let data = Frame::tcp((BACKEND, 8080), (clients[7], 41407), TCP_ACK, 10, 2);
        let (_, out) = r.run(r.t1, &data.build());
        (out[0..6] == [2, 0, 0, 0, 0, 0xfd]).then_some(())
    })
    .expect("the slot was refreshed");
    let data = Frame::tcp((BACKEND, 8080), (clients[31], 41431), TCP_ACK, 10, 2);
    assert_eq!(&r.run(r.t1, &data.build()).1[0..6], &[2, 0, 0, 0, 0, 0xfd], "another client behind the same gateway follows at once");
}

/// The "fragmentation needed" / "packet too big" xlb answers `frame`
/// (arrived from `mac`) with, from `vip`, quoting its IP header and first
/// 8 bytes: built here from scratch, checksums included.
fn too_big_answer(frame: &[u8], vip: IpAddr, mtu: u32) -> Vec<u8> {
    let (l3, v6) = (&frame[14..], frame[12] == 0x86);
    let mut out = Vec::new();
    out.extend_from_slice(&frame[6..12]);
    out.extend_from_slice(&frame[0..6]);
    out.extend_from_slice(&frame[12..14]);
    match vip {
        IpAddr::V4(vip) => {
            let sender = Ipv4Addr::new(l3[12], l3[13], l3[14], l3[15]);
            let icmp = testbed::attack::icmp4(3, 4, [0, 0, (mtu >> 8) as u8, mtu as u8], &l3[..28]);
            let mut ip = testbed::attack::ipv4_packet(vip, sender, 1, &icmp);
            ip[4..6].copy_from_slice(&[0, 0]);
            ip[10..12].copy_from_slice(&[0, 0]);
            let c = lb_common::csum::checksum(&ip[..20]);
            ip[10..12].copy_from_slice(&c.to_ne_bytes());
            out.extend_from_slice(&ip);
        }
        IpAddr::V6(vip) => {
            assert!(v6);
            let mut sender = [0u8; 16];
            sender.copy_from_slice(&l3[8..24]);
            let sender = Ipv6Addr::from(sender);
            let icmp = testbed::attack::icmp6(vip, sender, 2, 0, mtu.to_be_bytes(), &l3[..48]);
            out.extend_from_slice(&testbed::attack::ipv6_packet(vip, sender, 58, &icmp));
        }
    }
    out
}

#[test]
fn a_packet_larger_than_the_egress_mtu_is_answered_with_fragmentation_needed_from_the_vip() {
    let mut r = rig();
    r.ns.ip(&["link", "set", "t1", "mtu", "1400"]).expect("mtu");
    let mut small = Frame::tcp((CLIENT, 41500), (VIP, 80), TCP_SYN, 1, 0);
    small.payload = payload(1360);
    assert_eq!(r.run(r.t0, &small.build()).0, XDP_REDIRECT, "1400 bytes fit");
    // Cached or not, a larger one with DF is answered, quoting the packet
    // as the client sent it (to the VIP), with the MTU it may use.
    for _ in 0..2 {
        let mut big = Frame::tcp((CLIENT, 41500), (VIP, 80), TCP_ACK, 1, 1);
        big.payload = payload(1361);
        let input = big.build();
        let (verdict, out) = r.run(r.t0, &input);
        assert_eq!(verdict, 3, "XDP_TX");
        assert_eq!(out, too_big_answer(&input, VIP.into(), 1400));
    }
    assert_eq!(r.counter(stats::ICMP_TOO_BIG_SENT), 2);
    // IPv6: always (no fragmentation by routers), never below 1280.
    r.ns.ip(&["link", "set", "t1", "mtu", "1300"]).expect("mtu");
    let mut big6 = Frame::tcp((CLIENT6, 41501), (VIP6, 80), TCP_SYN, 1, 0);
    big6.payload = payload(1300);
    let input = big6.build();
    let (verdict, out) = r.run(r.t0, &input);
    assert_eq!(verdict, 3, "XDP_TX");
    assert_eq!(out, too_big_answer(&input, VIP6.into(), 1300));
    // The backend's packet too big for the client's link: answered to the
    // backend, from the VIP, quoting the backend's own segment.
    // (The MTU set before the flow's next hop is first cached: a changed
    // MTU is picked up when the slot is refreshed, within 256 jiffies.)
    r.ns.ip(&["link", "set", "t0", "mtu", "1400"]).expect("mtu");
    establish(&mut r, 41502);
    let mut reply = Frame::tcp((BACKEND, 8080), (CLIENT, 41502), TCP_ACK, 701, 101);
    reply.payload = payload(1400);
    let input = reply.build();
    let (verdict, out) = r.run(r.t1, &input);
    assert_eq!(verdict, 3, "XDP_TX");
    assert_eq!(out, too_big_answer(&input, VIP.into(), 1400));
    assert_eq!(r.counter(stats::ICMP_TOO_BIG_SENT), 4);
    // DF clear, or generic mode (a GSO frame the kernel segments): passed,
    // already rewritten, as before.
    let mut no_df = Frame::tcp((CLIENT, 41503), (VIP, 80), TCP_SYN, 1, 0);
    no_df.payload = payload(1400);
    let mut input = no_df.build();
    input[14 + 6] = 0;
    input[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let c = lb_common::csum::checksum(&input[14..34]);
    input[14 + 10..14 + 12].copy_from_slice(&c.to_ne_bytes());
    let (verdict, out) = r.run(r.t0, &input);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(&out[14 + 16..14 + 20], &BACKEND.octets(), "passed already rewritten");
    r.ctl.dataplane().iface_flags_set(r.t0, IFACE_VIRTUAL | IFACE_GENERIC).expect("flags");
    let mut big = Frame::tcp((CLIENT, 41504), (VIP, 80), TCP_SYN, 1, 0);
    big.payload = payload(1400);
    assert_eq!(r.run(r.t0, &big.build()).0, XDP_PASS);
    assert_eq!(r.counter(stats::PASS_TOO_BIG), 2);
}

/// What an IPv6 frame looks like after DNAT towards the v6 backend.
fn to_backend6(mut f: Frame) -> Frame {
    f.dst = BACKEND6.into();
    f.ttl -= 1;
    f.src_mac = T1_MAC;
    f.dst_mac = BACKEND_MAC;
    let (L4::Tcp { dport, .. } | L4::Udp { dport, .. }) = &mut f.l4;
    *dport = 8080;
    f
}

#[test]
fn ipv6_flows_are_rewritten_exactly_both_ways() {
    let mut r = rig();
    let syn = Frame::tcp((CLIENT6, 40100), (VIP6, 80), TCP_SYN, 1000, 0);
    let (verdict, out) = r.run(r.t0, &syn.build());
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out, to_backend6(syn).build(), "rewritten IPv6 SYN differs");
    assert!(checksums_valid(&out, 14));
    assert_eq!(r.flow_count(), 0);

    let syn_ack = Frame::tcp((BACKEND6, 8080), (CLIENT6, 40100), TCP_SYN | TCP_ACK, 9000, 1001);
    let (verdict, out) = r.run(r.t1, &syn_ack.build());
    assert_eq!(verdict, XDP_REDIRECT);
    let mut want = syn_ack.clone();
    want.src = VIP6.into();
    want.ttl -= 1;
    want.src_mac = T0_MAC;
    want.dst_mac = CLIENT_MAC;
    if let L4::Tcp { sport, .. } = &mut want.l4 {
        *sport = 80;
    }
    assert_eq!(out, want.build(), "rewritten IPv6 SYN-ACK differs");
    assert!(checksums_valid(&out, 14));
    assert_eq!(r.flow((CLIENT6, 40100), (VIP6, 80), 6).expect("flow").state.backend_id, 4);

    // A Hop-by-Hop Options header is skipped, the packet NATed behind it.
    let mut ack = Frame::tcp((CLIENT6, 40100), (VIP6, 80), TCP_ACK, 1001, 9001);
    ack.ext = vec![(0, 8)];
    let (verdict, out) = r.run(r.t0, &ack.build());
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out, to_backend6(ack).build());
    assert_eq!(r.counts(), (1, 0), "confirmed");
    assert_eq!(r.counter(stats::NEW_FLOWS), 1);
}

#[test]
fn an_ipv6_segment_without_state_is_answered_with_an_exact_ipv6_rst() {
    let mut r = rig();
    // Round robin with the default miss policy: reset (a Maglev service
    // would hash it).
    let wrr = xlb::model::settings::ServiceOptions { scheduler: Some(xlb::model::settings::Scheduler::Wrr), ..Default::default() };
    r.ctl.service_set(SocketAddr::new(VIP6.into(), 80), Some(Proto::Tcp), &wrr).expect("round robin");
    let mut data = Frame::tcp((CLIENT6, 40101), (VIP6, 80), TCP_ACK | TCP_PSH, 5000, 9000);
    data.payload = b"orphan".to_vec();
    let (verdict, out) = r.run(r.t0, &data.build());
    assert_eq!(verdict, 3, "XDP_TX");
    assert_eq!(out, expected_rst(&data, Some(9000), 5006));
    assert!(checksums_valid(&out, 14));
    assert_eq!(r.flow_count(), 0);
}

#[test]
fn malformed_ipv6_gets_a_safe_verdict_and_creates_no_state() {
    let mut r = rig();
    let syn = || Frame::tcp((CLIENT6, 40102), (VIP6, 80), TCP_SYN, 1, 0);
    let with_ext = |ext: Vec<(u8, usize)>| {
        let mut f = syn();
        f.ext = ext;
        f.build()
    };
    let mut cases: Vec<(&str, Vec<u8>, u32, u32)> = vec![
        // Longer chains than the program follows: passed untouched.
        ("five destination-options headers", with_ext(vec![(60, 8); 5]), XDP_PASS, stats::PASS_IPV6_EXT_HEADERS),
        ("a 264-byte options header", with_ext(vec![(60, 264)]), XDP_PASS, stats::PASS_IPV6_EXT_HEADERS),
        ("routing header", with_ext(vec![(43, 8)]), XDP_PASS, stats::PASS_IPV6_EXT_HEADERS),
        // Fragments of a VIP's traffic: dropped, as in IPv4.
        ("fragment header", with_ext(vec![(44, 8)]), XDP_DROP, stats::DROP_FRAGMENT),
        ("fragment after hop-by-hop", with_ext(vec![(0, 8), (44, 8)]), XDP_DROP, stats::DROP_FRAGMENT),
        (
            "icmpv6 (neighbour discovery)",
            {
                let mut f = syn().build();
                f[14 + 6] = 58;
                f
            },
            XDP_PASS,
            stats::PASS_OTHER_PROTO,
        ),
    ];
    let mut f = syn().build();
    f[14 + 4..14 + 6].copy_from_slice(&200u16.to_be_bytes());
    cases.push(("payload length past the frame", f, XDP_DROP, stats::DROP_MALFORMED));
    let mut f = syn().build();
    f[14 + 4..14 + 6].copy_from_slice(&0u16.to_be_bytes());
    cases.push(("payload length 0 (jumbogram)", f, XDP_DROP, stats::DROP_MALFORMED));
    let mut f = with_ext(vec![(0, 8)]);
    f[14 + 40 + 1] = 3; // the options header claims 32 bytes: past the payload
    cases.push(("extension header past the payload", f, XDP_DROP, stats::DROP_MALFORMED));
    let mut f = syn().build();
    f[14 + 40 + 12] = 0x40; // doff 4
    cases.push(("tcp doff 4", f, XDP_DROP, stats::DROP_MALFORMED));
    r.assert_untouched(&cases);
    // Truncated at every offset, with and without extension headers.
    for (what, full) in [("syn", syn().build()), ("syn behind two options headers", with_ext(vec![(0, 8), (60, 16)]))] {
        for len in 14..full.len() {
            let (verdict, _) = r.run(r.t0, &full[..len]);
            assert!(verdict == XDP_PASS || verdict == XDP_DROP, "{what} cut at {len}: verdict {verdict}");
            assert_eq!(r.flow_count(), 0, "{what} cut at {len} created state");
        }
    }
}

// ---- full NAT ----

#[test]
fn full_nat_rewrites_both_ends_with_a_pool_port_and_back() {
    let mut r = rig();
    let syn = Frame::tcp((CLIENT, 40200), (VIP, 84), TCP_SYN, 1000, 0);
    let (verdict, out) = r.run(r.t0, &syn.build());
    assert_eq!(verdict, XDP_REDIRECT);
    assert!(checksums_valid(&out, 14));
    let f = r.flow((CLIENT, 40200), (VIP, 84), 6).expect("the flow");
    assert!(f.half_open, "a full-NAT SYN holds a port: it has state from the start");
    assert_eq!(f.state.flags & FLOW_FULLNAT, FLOW_FULLNAT);
    let port = u16::from_be_bytes(f.state.snat_port.to_ne_bytes());
    assert!(SNAT_PORTS.contains(&port), "source port {port} is outside the pool");
    let mut want = to_backend(syn.clone(), 8084);
    want.src = SNAT.into();
    if let L4::Tcp { sport, .. } = &mut want.l4 {
        *sport = port;
    }
    assert_eq!(out, want.build(), "client → backend: both ends rewritten");
    assert_eq!(r.ports(), vec![(IpAddr::from(SNAT), port, SocketAddr::new(BACKEND.into(), 8084))], "the port is held for the flow");

    // The backend answers the balancer; the client gets it from the VIP.
    let syn_ack = Frame::tcp((BACKEND, 8084), (SNAT, port), TCP_SYN | TCP_ACK, 9000, 1001);
    let (verdict, out) = r.run(r.t1, &syn_ack.build());
    assert_eq!(verdict, XDP_REDIRECT);
    let mut want = syn_ack.clone();
    want.src = VIP.into();
    want.dst = CLIENT.into();
    want.ttl -= 1;
    want.src_mac = T0_MAC;
    want.dst_mac = CLIENT_MAC;
    if let L4::Tcp { sport, dport, .. } = &mut want.l4 {
        (*sport, *dport) = (84, 40200);
    }
    assert_eq!(out, want.build(), "backend → client: both ends rewritten back");
    // An exact RST tears the flow down; its port is free for the next
    // flow (taken over in place: the holder is gone).
    let rst = Frame::tcp((CLIENT, 40200), (VIP, 84), lb_common::tcp::FLAG_RST, 1001, 0);
    assert_eq!(r.run(r.t0, &rst.build()).0, XDP_REDIRECT);
    assert_eq!(r.flow_count(), 0);
    for i in 0..SNAT_PORTS.count() as u16 {
        let syn = Frame::tcp((CLIENT, 40210 + i), (VIP, 84), TCP_SYN, 1, 0);
        assert_eq!(r.run(r.t0, &syn.build()).0, XDP_REDIRECT, "flow {i}: the whole pool is free again");
    }
    assert_eq!(r.counter(stats::PORT_RECLAIMED), 1, "the ended flow's port was reclaimed");
    assert_eq!(r.counter(stats::REFUSED_NO_PORT), 0);
}

#[test]
fn full_nat_port_exhaustion_refuses_the_new_flow_and_leaves_the_others_alone() {
    let mut r = rig();
    let pool = SNAT_PORTS.count();
    for i in 0..pool as u16 {
        let syn = Frame::tcp((CLIENT, 40300 + i), (VIP, 84), TCP_SYN, 1, 0);
        assert_eq!(r.run(r.t0, &syn.build()).0, XDP_REDIRECT, "flow {i} within the pool");
    }
    let held: std::collections::HashSet<u16> = r.ports().into_iter().map(|(_, p, _)| p).collect();
    // The same in the table: one port per flow.
    assert_eq!(held.len(), pool, "every flow holds its own port");
    let before = r.flow_count();
    // One more: refused with a RST (the default policy), counted, no state.
    let extra = Frame::tcp((CLIENT, 40399), (VIP, 84), TCP_SYN, 77, 0);
    let (verdict, out) = r.run(r.t0, &extra.build());
    assert_eq!(verdict, 3, "XDP_TX: the client is refused at once");
    assert_eq!(out, expected_rst(&extra, None, 78));
    assert_eq!(r.counter(stats::REFUSED_NO_PORT), 1);
    assert_eq!(r.flow_count(), before, "the refused flow created state or removed some");
    assert_eq!(r.ctl.dataplane().backend_counters(5).expect("counters").no_port, 1, "counted on the backend");
    // Existing flows still go to their own ports.
    for i in 0..pool as u16 {
        let ack = Frame::tcp((CLIENT, 40300 + i), (VIP, 84), TCP_ACK, 2, 1);
        let (verdict, out) = r.run(r.t0, &ack.build());
        assert_eq!(verdict, XDP_REDIRECT);
        let sport = u16::from_be_bytes([out[14 + 20], out[14 + 21]]);
        let f = r.flow((CLIENT, 40300 + i), (VIP, 84), 6).expect("entry");
        assert_eq!(sport, u16::from_be_bytes(f.state.snat_port.to_ne_bytes()));
        assert!(held.contains(&sport));
    }
    // Drop policy: dropped instead of reset.
    let opts = xlb::model::settings::ServiceOptions { on_no_port: Some(xlb::model::settings::NoPortPolicy::Drop), ..Default::default() };
    r.ctl.service_set(SocketAddr::new(VIP.into(), 84), Some(Proto::Tcp), &opts).expect("policy");
    assert_eq!(r.run(r.t0, &extra.build()).0, XDP_DROP);
    assert_eq!(r.counter(stats::REFUSED_NO_PORT), 2);
}

// ---- direct server return ----

#[test]
fn dsr_encapsulates_the_untouched_packet_and_the_backend_side_strips_it() {
    let mut r = rig();
    let mut syn = Frame::tcp((CLIENT, 40500), (VIP, 85), TCP_SYN, 1000, 0);
    syn.payload = b"dsr".to_vec();
    let input = syn.build();
    let (verdict, out) = r.run(r.t0, &input);
    assert_eq!(verdict, XDP_REDIRECT);
    let inner = &input[14..];
    assert_eq!(out, encapsulated(&input), "encapsulated frame differs");
    assert_eq!(r.flow_count(), 0, "a DSR SYN is scheduled without state");
    // The backend side: the outer header goes, the client's packet stays.
    let (verdict, back) = r.run_decap(&out);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(&back[14..], inner, "decapsulated packet differs from what the client sent");
    assert_eq!(&back[..12], &out[..12], "MACs kept");
    // Anything else passes the decapsulation program untouched.
    let plain = Frame::tcp((CLIENT, 40501), (BACKEND, 85), TCP_SYN, 1, 0).build();
    assert_eq!(r.run_decap(&plain), (XDP_PASS, plain.clone()));
    // The client's handshake completes: its ACK (the backend's answers do
    // not come back through the balancer) enters the flow, established.
    let ack = Frame::tcp((CLIENT, 40500), (VIP, 85), TCP_ACK, 1004, 77);
    assert_eq!(r.run(r.t0, &ack.build()).0, XDP_REDIRECT);
    assert_eq!(r.counts(), (1, 0));
    let f = r.flow((CLIENT, 40500), (VIP, 85), 6).expect("flow");
    assert_eq!(f.state.flags & FLOW_DSR, FLOW_DSR);
    assert_eq!((f.state.orig.end, f.state.reply.end), (1004, 77), "the client's sequence and what it acknowledged");
}

/// What the balancer sends a backend for a DSR client frame `input`: new
/// MACs, an outer IPv4 header (TTL 64 - 1 hop, DF, IPIP) from the
/// balancer to the backend, then the client's packet as sent.
fn encapsulated(input: &[u8]) -> Vec<u8> {
    let inner = &input[14..];
    let mut outer = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 63, 4, 0, 0];
    outer[2..4].copy_from_slice(&((20 + inner.len()) as u16).to_be_bytes());
    outer.extend_from_slice(&SNAT.octets());
    outer.extend_from_slice(&BACKEND.octets());
    let c = lb_common::csum::checksum(&outer);
    outer[10..12].copy_from_slice(&c.to_ne_bytes());
    let mut want = Vec::new();
    want.extend_from_slice(&BACKEND_MAC);
    want.extend_from_slice(&T1_MAC);
    want.extend_from_slice(&0x0800u16.to_be_bytes());
    want.extend_from_slice(&outer);
    want.extend_from_slice(inner);
    want
}

#[test]
fn the_entry_program_forwards_full_nat_and_dsr_flows_by_itself() {
    let mut r = rig();
    // A full-NAT connection (client 40250 → VIP:84, held port P) and a DSR
    // one (client 40550 → VIP:85), both established through both programs.
    assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, 40250), (VIP, 84), TCP_SYN, 1000, 0).build()).0, XDP_REDIRECT);
    let port = u16::from_be_bytes(r.flow((CLIENT, 40250), (VIP, 84), 6).expect("full-NAT flow").state.snat_port.to_ne_bytes());
    assert_eq!(r.run(r.t1, &Frame::tcp((BACKEND, 8084), (SNAT, port), TCP_SYN | TCP_ACK, 9000, 1001).build()).0, XDP_REDIRECT);
    assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, 40250), (VIP, 84), TCP_ACK, 1001, 9001).build()).0, XDP_REDIRECT);
    assert!(!r.flow((CLIENT, 40250), (VIP, 84), 6).expect("full-NAT flow").half_open);
    assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, 40550), (VIP, 85), TCP_SYN, 1000, 0).build()).0, XDP_REDIRECT);
    assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, 40550), (VIP, 85), TCP_ACK, 1001, 77).build()).0, XDP_REDIRECT);
    remove_full_program(&mut r);

    // Full NAT, the client's data: both ends rewritten.
    let mut data = Frame::tcp((CLIENT, 40250), (VIP, 84), TCP_ACK | TCP_PSH, 1001, 9001);
    data.payload = b"hello".to_vec();
    let (verdict, out) = r.run(r.t0, &data.build());
    let mut want = to_backend(data, 8084);
    want.src = SNAT.into();
    if let L4::Tcp { sport, .. } = &mut want.l4 {
        *sport = port;
    }
    assert_eq!((verdict, out), (XDP_REDIRECT, want.build()), "full NAT, client → backend");
    // The backend's answer to the held port, back from the VIP.
    let mut reply = Frame::tcp((BACKEND, 8084), (SNAT, port), TCP_ACK | TCP_PSH, 9001, 1006);
    reply.payload = b"world".to_vec();
    let (verdict, out) = r.run(r.t1, &reply.build());
    let mut want = to_client(reply, VIP.into(), 84);
    want.dst = CLIENT.into();
    if let L4::Tcp { dport, .. } = &mut want.l4 {
        *dport = 40250;
    }
    assert_eq!((verdict, out), (XDP_REDIRECT, want.build()), "full NAT, backend → client");
    let f = r.flow((CLIENT, 40250), (VIP, 84), 6).expect("full-NAT flow");
    assert_eq!((f.state.orig.end, f.state.reply.end), (1006, 9006), "tracked both ways");

    // DSR, the client's data: encapsulated, tracked.
    let mut data = Frame::tcp((CLIENT, 40550), (VIP, 85), TCP_ACK | TCP_PSH, 1001, 77);
    data.payload = b"dsr data".to_vec();
    let input = data.build();
    assert_eq!(r.run(r.t0, &input), (XDP_REDIRECT, encapsulated(&input)), "DSR, client → backend");
    assert_eq!(r.flow((CLIENT, 40550), (VIP, 85), 6).expect("DSR flow").state.orig.end, 1009);
    assert_eq!(r.counter(stats::PASS_NO_FULL_PROGRAM), 0, "none of it needed the full program");
}

#[test]
fn dsr_is_refused_where_it_cannot_work() {
    let mut r = rig();
    let dsr = xlb::model::settings::ServiceOptions { mode: Some(xlb::model::settings::NatMode::Dsr), ..Default::default() };
    let e = r.ctl.service_add(SocketAddr::new(VIP6.into(), 86), Proto::Tcp, &dsr).expect_err("IPv6 DSR");
    assert!(e.to_string().contains("IPv4 only"), "{e}");
    let e = r.ctl.backend_add(SocketAddr::new(VIP.into(), 85), Some(Proto::Tcp), SocketAddr::new(BACKEND.into(), 8085), None).expect_err("port mismatch");
    assert!(e.to_string().contains("port must be 85"), "{e}");
}

// ---- partial checksums (senders with TX checksum offload) ----
//
// A local stack sending through a veth, tap or other virtual NIC with TX
// checksum offload on (the default) leaves only the pseudo-header seed in
// the L4 checksum field. Inputs below carry that seed; every expected
// output is built by the test's own packet builder with the checksums it
// computes from scratch, so an exact byte match proves them.

/// Payload lengths that reach every part of the in-XDP completion: none,
/// odd, a word pair short of a 512-byte chunk, one chunk, several.
const PARTIAL_PAYLOADS: [usize; 6] = [0, 1, 3, 471, 472, 1400];

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + 3) as u8).collect()
}

/// What a backend's (or anyone's) frame looks like after source NAT back
/// to the VIP, sent to the client.
fn to_client(mut f: Frame, vip: IpAddr, port: u16) -> Frame {
    f.src = vip;
    f.ttl -= 1;
    f.src_mac = T0_MAC;
    f.dst_mac = CLIENT_MAC;
    let (L4::Tcp { sport, .. } | L4::Udp { sport, .. }) = &mut f.l4;
    *sport = port;
    f
}

#[test]
fn partial_checksums_are_completed_when_the_frame_leaves_by_redirect() {
    let mut r = rig();
    let mut partial_frames = 0;
    for (i, n) in PARTIAL_PAYLOADS.iter().enumerate() {
        let port = 41000 + i as u16;
        // TCP over IPv4, both ways.
        let mut syn = Frame::tcp((CLIENT, port), (VIP, 80), TCP_SYN, 1000, 0);
        syn.payload = payload(*n);
        let (verdict, out) = r.run(r.t0, &syn.clone().partial().build());
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(out, to_backend(syn, 8080).build(), "TCP to the backend, {n}-byte payload");
        let mut syn_ack = Frame::tcp((BACKEND, 8080), (CLIENT, port), TCP_SYN | TCP_ACK, 5000, 1001 + *n as u32);
        syn_ack.payload = payload(*n);
        let (verdict, out) = r.run(r.t1, &syn_ack.clone().partial().build());
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(out, to_client(syn_ack, VIP.into(), 80).build(), "TCP to the client, {n}-byte payload");
        // UDP over IPv4.
        let dgram = Frame::udp((CLIENT, port), (VIP, 53), &payload(*n));
        let (verdict, out) = r.run(r.t0, &dgram.clone().partial().build());
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(out, to_backend(dgram, 5353).build(), "UDP, {n}-byte payload");
        // TCP over IPv6, both ways.
        let mut syn6 = Frame::tcp((CLIENT6, port), (VIP6, 80), TCP_SYN, 1000, 0);
        syn6.payload = payload(*n);
        let (verdict, out) = r.run(r.t0, &syn6.clone().partial().build());
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(out, to_backend6(syn6).build(), "IPv6 TCP to the backend, {n}-byte payload");
        let mut reply6 = Frame::tcp((BACKEND6, 8080), (CLIENT6, port), TCP_SYN | TCP_ACK, 7000, 1001 + *n as u32);
        reply6.payload = payload(*n);
        let (verdict, out) = r.run(r.t1, &reply6.clone().partial().build());
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(out, to_client(reply6, VIP6.into(), 80).build(), "IPv6 TCP to the client, {n}-byte payload");
        partial_frames += 5;
    }
    assert_eq!(r.counter(stats::CSUM_PARTIAL), partial_frames, "every partial frame is recognised");
    // A full checksum is left to the incremental update (and not counted).
    let full = Frame::tcp((CLIENT, 41999), (VIP, 80), TCP_SYN, 1, 0);
    let (_, out) = r.run(r.t0, &full.build());
    assert_eq!(out, to_backend(full, 8080).build());
    assert_eq!(r.counter(stats::CSUM_PARTIAL), partial_frames);
}

#[test]
fn partial_checksums_are_completed_in_full_nat_and_inside_dsr_encapsulation() {
    let mut r = rig();
    // Full NAT: both ends rewritten, the seed moved with both addresses.
    let mut syn = Frame::tcp((CLIENT, 41100), (VIP, 84), TCP_SYN, 1000, 0);
    syn.payload = payload(1400);
    let (verdict, out) = r.run(r.t0, &syn.clone().partial().build());
    assert_eq!(verdict, XDP_REDIRECT);
    let f = r.flow((CLIENT, 41100), (VIP, 84), 6).expect("the flow");
    let port = u16::from_be_bytes(f.state.snat_port.to_ne_bytes());
    let mut want = to_backend(syn, 8084);
    want.src = SNAT.into();
    if let L4::Tcp { sport, .. } = &mut want.l4 {
        *sport = port;
    }
    assert_eq!(out, want.build(), "full NAT towards the backend");
    let mut reply = Frame::tcp((BACKEND, 8084), (SNAT, port), TCP_SYN | TCP_ACK, 9000, 2401);
    reply.payload = payload(3);
    let (verdict, out) = r.run(r.t1, &reply.clone().partial().build());
    assert_eq!(verdict, XDP_REDIRECT);
    let mut want = to_client(reply, VIP.into(), 84);
    want.dst = CLIENT.into();
    if let L4::Tcp { dport, .. } = &mut want.l4 {
        *dport = 41100;
    }
    assert_eq!(out, want.build(), "full NAT back to the client");

    // DSR: the client's segment is not rewritten, but it reaches the
    // backend as an XDP frame: its checksum must be whole inside the tunnel.
    let mut syn = Frame::tcp((CLIENT, 41101), (VIP, 85), TCP_SYN, 1000, 0);
    syn.payload = payload(999);
    let (verdict, out) = r.run(r.t0, &syn.clone().partial().build());
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(&out[14 + 20..], &syn.build()[14..], "the inner packet is the client's, with its checksum completed");
    assert!(checksums_valid(&out, 14 + 20), "inner checksums");
    assert_eq!(r.counter(stats::CSUM_PARTIAL), 3);
}

#[test]
fn the_entry_program_completes_partial_checksums_of_established_flows_by_itself() {
    let mut r = rig();
    // A DNAT connection and a DSR one, established through both programs
    // with full checksums (both directions' next hops cached).
    handshake_to_port_80(&mut r, 40301);
    assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, 40551), (VIP, 85), TCP_SYN, 1000, 0).build()).0, XDP_REDIRECT);
    assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, 40551), (VIP, 85), TCP_ACK, 1001, 77).build()).0, XDP_REDIRECT);
    remove_full_program(&mut r);
    let partial = r.counter(stats::CSUM_PARTIAL);

    // The entry alone (no full program to hand over to): each frame with
    // only the seed leaves with the full checksum, both ways.
    let (mut client_seq, mut backend_seq, mut dsr_seq) = (5001u32, 9001u32, 1001u32);
    for n in PARTIAL_PAYLOADS {
        let mut data = Frame::tcp((CLIENT, 40301), (VIP, 80), TCP_ACK | TCP_PSH, client_seq, backend_seq);
        data.payload = payload(n);
        let (verdict, out) = r.run(r.t0, &data.clone().partial().build());
        assert_eq!((verdict, out), (XDP_REDIRECT, to_backend(data, 8080).build()), "client → backend, {n}-byte payload");
        client_seq += n as u32;
        let mut reply = Frame::tcp((BACKEND, 8080), (CLIENT, 40301), TCP_ACK | TCP_PSH, backend_seq, client_seq);
        reply.payload = payload(n);
        let (verdict, out) = r.run(r.t1, &reply.clone().partial().build());
        assert_eq!((verdict, out), (XDP_REDIRECT, to_client(reply, VIP.into(), 80).build()), "backend → client, {n}-byte payload");
        backend_seq += n as u32;
        // DSR: completed inside the outer header.
        let mut dsr = Frame::tcp((CLIENT, 40551), (VIP, 85), TCP_ACK | TCP_PSH, dsr_seq, 77);
        dsr.payload = payload(n);
        let (verdict, out) = r.run(r.t0, &dsr.clone().partial().build());
        assert_eq!((verdict, out), (XDP_REDIRECT, encapsulated(&dsr.build())), "DSR, {n}-byte payload");
        dsr_seq += n as u32;
    }
    assert_eq!(r.counter(stats::PASS_NO_FULL_PROGRAM), 0, "none of it needed the full program");
    assert_eq!(r.counter(stats::CSUM_PARTIAL), partial + 3 * PARTIAL_PAYLOADS.len() as u64, "each partial frame counted once");
    let f = r.flow((CLIENT, 40301), (VIP, 80), 6).expect("flow");
    assert_eq!((f.state.orig.end, f.state.reply.end), (client_seq, backend_seq), "tracked both ways");
}

#[test]
fn partial_checksums_stay_seeds_where_the_kernel_completes_them() {
    let mut r = rig();
    // Passed to the kernel (the backend's neighbour is unresolved): the
    // skb still says "partial", so the field must stay a seed, moved to
    // the new addresses, ports untouched.
    let mut syn = Frame::tcp((CLIENT, 41200), (VIP, 83), TCP_SYN, 1, 0);
    syn.payload = payload(101);
    let (verdict, out) = r.run(r.t0, &syn.clone().partial().build());
    assert_eq!(verdict, XDP_PASS);
    let mut want = syn.clone();
    want.dst = Ipv4Addr::new(10, 1, 1, 9).into();
    if let L4::Tcp { dport, .. } = &mut want.l4 {
        *dport = 80;
    }
    assert_eq!(out, want.clone().partial().build(), "passed: a seed for the rewritten addresses");
    assert_eq!(r.counter(stats::PASS_NO_NEIGH), 1);

    // Generic (skb) mode: the skb survives even a redirect, and whoever
    // sends it on completes the checksum: it stays a seed.
    r.ctl.dataplane().iface_flags_set(r.t0, IFACE_VIRTUAL | IFACE_GENERIC).expect("flags");
    r.ctl.dataplane().iface_flags_set(r.t1, IFACE_VIRTUAL | IFACE_GENERIC).expect("flags");
    let mut syn = Frame::tcp((CLIENT, 41201), (VIP, 80), TCP_SYN, 1, 0);
    syn.payload = payload(7);
    let (verdict, out) = r.run(r.t0, &syn.clone().partial().build());
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out, to_backend(syn, 8080).partial().build(), "generic mode: the seed of the rewritten addresses");
    let dgram = Frame::udp((CLIENT6, 41201), (VIP6, 80), b"not a service");
    assert_eq!(r.run(r.t0, &dgram.clone().partial().build()), (XDP_PASS, dgram.partial().build()), "not ours: untouched");
    let reply = Frame::tcp((BACKEND6, 8080), (CLIENT6, 41202), TCP_ACK, 1, 1);
    let (verdict, _) = r.run(r.t1, &reply.partial().build());
    assert_ne!(verdict, XDP_DROP);
}

/// `f` with a two-byte payload chosen so its full TCP checksum equals the
/// pseudo-header seed (1 in 65,536 frames do): the field then reads the
/// same as a partial one.
fn colliding(mut f: Frame) -> Frame {
    let field = f.l3_offset() + 20 + 16;
    // The seed depends on the length, not on the payload's bytes.
    f.payload = vec![0, 0];
    let seed = f.clone().partial().build()[field..field + 2].to_vec();
    for v in 0..=u16::MAX {
        f.payload = v.to_be_bytes().to_vec();
        if f.build()[field..field + 2] == seed[..] {
            return f;
        }
    }
    panic!("no payload makes the checksum collide with the seed");
}

#[test]
fn a_full_checksum_that_equals_the_seed_is_only_taken_for_one_on_virtual_interfaces() {
    let mut r = rig();
    // A physical NIC never delivers seeds: a colliding full checksum is
    // updated as the full checksum it is, also when passed to the kernel.
    r.ctl.dataplane().iface_flags_set(r.t0, 0).expect("flags");
    let syn = colliding(Frame::tcp((CLIENT, 41300), (VIP, 83), TCP_SYN, 1, 0));
    let (verdict, out) = r.run(r.t0, &syn.build());
    assert_eq!(verdict, XDP_PASS);
    let mut want = syn.clone();
    want.dst = Ipv4Addr::new(10, 1, 1, 9).into();
    if let L4::Tcp { dport, .. } = &mut want.l4 {
        *dport = 80;
    }
    assert_eq!(out, want.build(), "physical NIC: a full checksum, updated");
    assert_eq!(r.counter(stats::CSUM_PARTIAL), 0);
    // On a virtual interface the same kind of frame is taken for a seed;
    // leaving by redirect it is completed, which gives the same, correct,
    // checksum.
    r.ctl.dataplane().iface_flags_set(r.t0, IFACE_VIRTUAL).expect("flags");
    let syn = colliding(Frame::tcp((CLIENT, 41301), (VIP, 80), TCP_SYN, 1, 0));
    let (verdict, out) = r.run(r.t0, &syn.build());
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out, to_backend(syn, 8080).build(), "virtual NIC: completed, still correct");
    assert_eq!(r.counter(stats::CSUM_PARTIAL), 1);
}

// ---- the table under attack (issue: a connection table no packet can corrupt) ----

#[test]
fn a_client_port_reused_towards_two_vips_sharing_a_backend_is_refused_not_mixed_up() {
    let mut r = rig();
    // VIP:88 shares 10.1.1.2:8080 with VIP:80: both check for collisions
    // and schedule SYNs with state (the backend's answer alone could not
    // say which VIP it belongs to).
    let other = SocketAddr::new(VIP.into(), 88);
    r.ctl.service_add(other, Proto::Tcp, &Default::default()).expect("service");
    r.ctl.backend_add(other, Some(Proto::Tcp), SocketAddr::new(BACKEND.into(), 8080), None).expect("shared backend");
    let syn = Frame::tcp((CLIENT, 40700), (VIP, 80), TCP_SYN, 100, 0);
    assert_eq!(r.run(r.t0, &syn.build()).0, XDP_REDIRECT);
    assert_eq!(r.counter(stats::STATELESS_SYN), 0);
    assert_eq!(r.counts(), (0, 1), "a shared backend's SYN is entered at once");
    // The same client port towards the other VIP: to the backend that
    // would be the same connection.
    let clash = Frame::tcp((CLIENT, 40700), (VIP, 88), TCP_SYN, 5000, 0);
    let (verdict, out) = r.run(r.t0, &clash.build());
    assert_eq!(verdict, 3, "XDP_TX: refused with a RST");
    assert_eq!(out, expected_rst(&clash, None, 5001));
    assert_eq!(r.counter(stats::REFUSED_COLLISION), 1);
    assert_eq!(r.counts(), (0, 1), "the first flow is untouched");
    // The backend's SYN-ACK belongs to VIP:80's flow and leaves from it.
    let syn_ack = Frame::tcp((BACKEND, 8080), (CLIENT, 40700), TCP_SYN | TCP_ACK, 700, 101);
    let (verdict, out) = r.run(r.t1, &syn_ack.build());
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out, to_client(syn_ack, VIP.into(), 80).build());
    // Another client port towards VIP:88 is fine.
    assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, 40701), (VIP, 88), TCP_SYN, 1, 0).build()).0, XDP_REDIRECT);
    assert_eq!(r.counts(), (0, 2));
    // A backend's packet for neither flow, with two services to choose
    // from, is never forwarded with the backend's address: refused.
    let stray = Frame::tcp((BACKEND, 8080), (CLIENT, 40799), TCP_ACK, 1, 1);
    let (verdict, out) = r.run(r.t1, &stray.build());
    assert_eq!(verdict, 3, "XDP_TX: a RST back to the backend");
    assert_eq!(out, expected_rst(&stray, Some(1), 1));
    assert_eq!(r.counter(stats::DROP_REPLY_NO_FLOW), 1);
    // So a client's segment without a flow is not hashed to such a backend
    // (its answer could not be mapped back): it is reset.
    let miss = Frame::tcp((CLIENT, 40798), (VIP, 88), TCP_ACK, 5, 6);
    let (verdict, out) = r.run(r.t0, &miss.build());
    assert_eq!(verdict, 3, "XDP_TX");
    assert_eq!(out, expected_rst(&miss, Some(6), 5));
    assert_eq!(r.counter(stats::RST_MISS), 1);
}

#[test]
fn a_half_closed_flow_is_not_replaced_by_a_syn_on_its_tuple() {
    let mut r = rig();
    // Stateful SYNs (shared backend), where a SYN could reschedule.
    let other = SocketAddr::new(VIP.into(), 88);
    r.ctl.service_add(other, Proto::Tcp, &Default::default()).expect("service");
    r.ctl.backend_add(other, Some(Proto::Tcp), SocketAddr::new(BACKEND.into(), 8080), None).expect("shared backend");
    establish(&mut r, 40710);
    let fin = Frame::tcp((CLIENT, 40710), (VIP, 80), TCP_ACK | lb_common::tcp::FLAG_FIN, 101, 701);
    assert_eq!(r.run(r.t0, &fin.build()).0, XDP_REDIRECT);
    let syn = Frame::tcp((CLIENT, 40710), (VIP, 80), TCP_SYN, 90_000, 0);
    assert_eq!(r.run(r.t0, &syn.build()).0, XDP_REDIRECT);
    let f = r.flow((CLIENT, 40710), (VIP, 80), 6).expect("flow");
    assert!(!f.half_open, "the half-closed flow stays as it was");
    assert_eq!((f.state.orig.state, f.state.reply.end), (tcp::STATE_FIN, 701));
    assert_eq!(r.counts(), (1, 0), "a SYN on a half-closed tuple creates nothing");
}

#[test]
fn the_flow_hash_is_keyed() {
    let mut r = rig();
    let svc = SocketAddr::new(VIP.into(), 90);
    r.ctl.service_add(svc, Proto::Tcp, &Default::default()).expect("service");
    for i in 0..4u8 {
        let b = Ipv4Addr::new(10, 1, 1, 20 + i);
        r.ns.ip(&["neigh", "add", &b.to_string(), "lladdr", &format!("02:00:00:00:02:{i:02x}"), "dev", "t1", "nud", "permanent"]).expect("neigh");
        r.ctl.backend_add(svc, Some(Proto::Tcp), SocketAddr::new(b.into(), 80), None).expect("backend");
    }
    let backends = |r: &mut Rig| -> Vec<u8> {
        (0..200u16)
            .map(|i| {
                let (verdict, out) = r.run(r.t0, &Frame::tcp((CLIENT, 30_000 + i), (VIP, 90), TCP_SYN, 1, 0).build());
                assert_eq!(verdict, XDP_REDIRECT);
                out[33]
            })
            .collect()
    };
    let g = r.ctl.dataplane().globals().expect("globals");
    r.ctl.dataplane().globals_set(lb_common::maps::Globals { hash_key: [1, 2], ..g }).expect("key");
    let first = backends(&mut r);
    assert_eq!(backends(&mut r), first, "the same key schedules alike");
    r.ctl.dataplane().globals_set(lb_common::maps::Globals { hash_key: [3, 4], ..g }).expect("key");
    let other = backends(&mut r);
    let moved = first.iter().zip(&other).filter(|(a, b)| a != b).count();
    // With four backends a different key moves about 3/4 of the tuples.
    assert!(moved > 100, "only {moved} of 200 tuples moved with another key: the hash ignores it");
}

#[test]
fn fragments_of_a_backends_answer_are_dropped_in_both_families() {
    let mut r = rig();
    let mut v4 = Frame::tcp((BACKEND, 8080), (CLIENT, 40720), TCP_ACK, 1, 1).build();
    v4[14 + 6] = 0x20; // MF
    let mut v6 = Frame::tcp((BACKEND6, 8080), (CLIENT6, 40720), TCP_ACK, 1, 1);
    v6.ext = vec![(44, 8)];
    let cases = vec![
        ("an IPv4 fragment from a backend", v4, XDP_DROP, stats::DROP_FRAGMENT),
        ("an IPv6 fragment from a backend", v6.build(), XDP_DROP, stats::DROP_FRAGMENT),
    ];
    for (what, frame, want, counter) in &cases {
        let before = r.counter(*counter);
        let (verdict, _) = r.run(r.t1, frame);
        assert_eq!(verdict, *want, "{what}: never forwarded un-NATed");
        assert_eq!(r.counter(*counter), before + 1, "{what}");
    }
}

#[test]
fn a_new_connection_on_the_tuple_of_a_closed_one_gets_its_own_flow() {
    let mut r = rig();
    establish(&mut r, 40730);
    // FIN both ways: closed, lingering in the connection table.
    assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, 40730), (VIP, 80), TCP_ACK | lb_common::tcp::FLAG_FIN, 101, 701).build()).0, XDP_REDIRECT);
    assert_eq!(r.run(r.t1, &Frame::tcp((BACKEND, 8080), (CLIENT, 40730), TCP_ACK | lb_common::tcp::FLAG_FIN, 701, 102).build()).0, XDP_REDIRECT);
    assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, 40730), (VIP, 80), TCP_ACK, 102, 702).build()).0, XDP_REDIRECT);
    assert_eq!(r.counts(), (1, 0));
    // The client connects again from the same port.
    assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, 40730), (VIP, 80), TCP_SYN, 50_000, 0).build()).0, XDP_REDIRECT);
    assert_eq!(r.run(r.t1, &Frame::tcp((BACKEND, 8080), (CLIENT, 40730), TCP_SYN | TCP_ACK, 90_000, 50_001).build()).0, XDP_REDIRECT);
    assert_eq!(r.counts(), (1, 1), "the SYN-ACK starts a flow of its own beside the closed one");
    assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, 40730), (VIP, 80), TCP_ACK, 50_001, 90_001).build()).0, XDP_REDIRECT);
    let f = r.flow((CLIENT, 40730), (VIP, 80), 6).expect("flow");
    assert_eq!((f.half_open, f.state.orig.end, f.state.reply.end), (false, 50_001, 90_001), "the new connection replaced the closed one");
    assert_eq!(r.counter(stats::TCP_INVALID), 0);
}

#[test]
fn a_backends_segment_without_ack_and_without_a_flow_is_dropped() {
    let mut r = rig();
    let bogus = Frame::tcp((BACKEND, 8080), (CLIENT, 40740), TCP_PSH, 1, 0);
    assert_eq!(r.run(r.t1, &bogus.build()).0, XDP_DROP);
    assert_eq!(r.counter(stats::TCP_INVALID), 1);
    assert_eq!(r.flow_count(), 0);
}

// ---- ICMP errors ----

const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xfe);

/// An Ethernet frame `dst_mac` ← `src_mac` around an IPv4 or IPv6 packet.
fn eth(src_mac: [u8; 6], dst_mac: [u8; 6], v6: bool, l3: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&(if v6 { 0x86ddu16 } else { 0x0800 }).to_be_bytes());
    f.extend_from_slice(l3);
    f
}

/// An ICMP error (IPv4: `ty`/`code` from `src` to `dst`, hop limit `ttl`)
/// quoting the first `quoted` bytes of the IP packet `about`.
fn icmp4_error(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, ty: u8, code: u8, about: &Frame, quoted: usize) -> Vec<u8> {
    let inner = about.build();
    let icmp = testbed::attack::icmp4(ty, code, [0, 0, 0x05, 0x78], &inner[14..14 + quoted]);
    let mut ip = testbed::attack::ipv4_packet(src, dst, 1, &icmp);
    ip[8] = ttl;
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = lb_common::csum::checksum(&ip[..20]);
    ip[10..12].copy_from_slice(&c.to_ne_bytes());
    ip
}

fn icmp6_error(src: Ipv6Addr, dst: Ipv6Addr, hops: u8, ty: u8, code: u8, about: &Frame, quoted: usize) -> Vec<u8> {
    let inner = about.build();
    let icmp = testbed::attack::icmp6(src, dst, ty, code, [0, 0, 0x05, 0x78], &inner[14..14 + quoted]);
    let mut ip = testbed::attack::ipv6_packet(src, dst, 58, &icmp);
    ip[7] = hops;
    ip
}

/// A segment of `len` payload bytes, TTL 61 (as a router further on saw it).
fn seg(src: (IpAddr, u16), dst: (IpAddr, u16), len: usize) -> Frame {
    let mut f = Frame::tcp(src, dst, TCP_ACK | TCP_PSH, 701, 101);
    f.payload = payload(len);
    f.ttl = 61;
    f
}

#[test]
fn fragmentation_needed_from_the_clients_path_reaches_the_backend_quoting_its_own_segment() {
    let mut r = rig();
    establish(&mut r, 40800);
    let before = r.flow((CLIENT, 40800), (VIP, 80), 6).expect("flow").state;
    // What xlb sent the client (VIP:80 → client), and what the backend had
    // sent (backend:8080 → client): the same segment before the rewrite.
    let sent = seg((VIP.into(), 80), (CLIENT.into(), 40800), 1400);
    let original = seg((BACKEND.into(), 8080), (CLIENT.into(), 40800), 1400);
    // Quotes of 28 bytes (IP header + 8: ports, no TCP checksum) and of 48
    // (with the TCP checksum, which must be updated too).
    for quoted in [28usize, 48] {
        let err = icmp4_error(ROUTER, VIP, 64, 3, 4, &sent, quoted);
        let (verdict, out) = r.run(r.t0, &eth(CLIENT_MAC, T0_MAC, false, &err));
        assert_eq!(verdict, XDP_REDIRECT, "quote of {quoted} bytes");
        let want = icmp4_error(ROUTER, BACKEND, 63, 3, 4, &original, quoted);
        assert_eq!(out, eth(T1_MAC, BACKEND_MAC, false, &want), "quote of {quoted} bytes: every checksum recomputed");
    }
    assert_eq!(r.counter(stats::ICMP_TO_BACKEND), 2);
    assert_eq!(r.flow((CLIENT, 40800), (VIP, 80), 6).expect("flow").state, before, "ICMP changes no flow state");
}

#[test]
fn a_backends_port_unreachable_reaches_the_client_from_the_vip_quoting_the_vip() {
    let mut r = rig();
    // A UDP flow client:5070 → VIP:53 → backend:5353.
    let dgram = Frame::udp((CLIENT, 5070), (VIP, 53), b"anyone?");
    assert_eq!(r.run(r.t0, &dgram.build()).0, XDP_REDIRECT);
    let mut to_backend = to_backend(dgram.clone(), 5353);
    to_backend.ttl = 63;
    let mut as_sent = dgram;
    as_sent.ttl = 63;
    for quoted in [28usize, 35] {
        let err = icmp4_error(BACKEND, CLIENT, 64, 3, 3, &to_backend, quoted);
        let (verdict, out) = r.run(r.t1, &eth(BACKEND_MAC, T1_MAC, false, &err));
        assert_eq!(verdict, XDP_REDIRECT);
        let want = icmp4_error(VIP, CLIENT, 63, 3, 3, &as_sent, quoted);
        assert_eq!(out, eth(T0_MAC, CLIENT_MAC, false, &want), "from the VIP, quoting the client's own datagram (UDP checksum included)");
    }
    assert_eq!(r.counter(stats::ICMP_TO_CLIENT), 2);
    assert_eq!(r.counts(), (0, 1), "nothing created, nothing promoted");
}

#[test]
fn packet_too_big_over_ipv6_and_full_nat_errors_are_translated_both_ways() {
    let mut r = rig();
    // IPv6 DNAT: [fd99::1]:80 → [fd01:1::2]:8080.
    let syn = Frame::tcp((CLIENT6, 40810), (VIP6, 80), TCP_SYN, 100, 0);
    assert_eq!(r.run(r.t0, &syn.build()).0, XDP_REDIRECT);
    let syn_ack = Frame::tcp((BACKEND6, 8080), (CLIENT6, 40810), TCP_SYN | TCP_ACK, 700, 101);
    assert_eq!(r.run(r.t1, &syn_ack.build()).0, XDP_REDIRECT);
    let sent = seg((VIP6.into(), 80), (CLIENT6.into(), 40810), 1400);
    let original = seg((BACKEND6.into(), 8080), (CLIENT6.into(), 40810), 1400);
    for quoted in [48usize, 68] {
        let err = icmp6_error(ROUTER6, VIP6, 64, 2, 0, &sent, quoted);
        let (verdict, out) = r.run(r.t0, &eth(CLIENT_MAC, T0_MAC, true, &err));
        assert_eq!(verdict, XDP_REDIRECT);
        let want = icmp6_error(ROUTER6, BACKEND6, 63, 2, 0, &original, quoted);
        assert_eq!(out, eth(T1_MAC, BACKEND_MAC, true, &want), "ICMPv6 packet too big, quote of {quoted} bytes");
    }
    // Full NAT: VIP:84 → backend:8084 from SNAT:port.
    assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, 40811), (VIP, 84), TCP_SYN, 100, 0).build()).0, XDP_REDIRECT);
    let port = u16::from_be_bytes(r.flow((CLIENT, 40811), (VIP, 84), 6).expect("flow").state.snat_port.to_ne_bytes());
    // Towards the backend: quoted as backend:8084 → SNAT:port.
    let sent = seg((VIP.into(), 84), (CLIENT.into(), 40811), 1000);
    let original = seg((BACKEND.into(), 8084), (SNAT.into(), port), 1000);
    let (verdict, out) = r.run(r.t0, &eth(CLIENT_MAC, T0_MAC, false, &icmp4_error(ROUTER, VIP, 64, 3, 4, &sent, 48)));
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out, eth(T1_MAC, BACKEND_MAC, false, &icmp4_error(ROUTER, BACKEND, 63, 3, 4, &original, 48)), "full NAT, to the backend");
    // Towards the client: the backend's error about SNAT:port → backend,
    // quoted as client → VIP:84, from the VIP.
    let mut to_backend = Frame::tcp((SNAT, port), (BACKEND, 8084), TCP_ACK, 101, 701);
    to_backend.ttl = 63;
    let mut as_sent = Frame::tcp((CLIENT, 40811), (VIP, 84), TCP_ACK, 101, 701);
    as_sent.ttl = 63;
    let (verdict, out) = r.run(r.t1, &eth(BACKEND_MAC, T1_MAC, false, &icmp4_error(BACKEND, SNAT, 64, 3, 1, &to_backend, 40)));
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(out, eth(T0_MAC, CLIENT_MAC, false, &icmp4_error(VIP, CLIENT, 63, 3, 1, &as_sent, 40)), "full NAT, to the client");
    assert_eq!((r.counter(stats::ICMP_TO_BACKEND), r.counter(stats::ICMP_TO_CLIENT)), (3, 1));
}

#[test]
fn every_icmp_error_kind_is_translated_both_ways_in_both_families_and_counted_by_kind() {
    use lb_common::icmp as ic;
    let mut r = rig();
    establish(&mut r, 40840);
    // An IPv6 flow [client]:40841 → [VIP6]:80 → [backend6]:8080.
    let syn = Frame::tcp((CLIENT6, 40841), (VIP6, 80), TCP_SYN, 100, 0);
    assert_eq!(r.run(r.t0, &syn.build()).0, XDP_REDIRECT);
    let syn_ack = Frame::tcp((BACKEND6, 8080), (CLIENT6, 40841), TCP_SYN | TCP_ACK, 700, 101);
    assert_eq!(r.run(r.t1, &syn_ack.build()).0, XDP_REDIRECT);
    assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT6, 40841), (VIP6, 80), TCP_ACK, 101, 701).build()).0, XDP_REDIRECT);
    let states = (r.flow((CLIENT, 40840), (VIP, 80), 6).expect("v4 flow").state, r.flow((CLIENT6, 40841), (VIP6, 80), 6).expect("v6 flow").state);
    let kinds = [
        (ic::KIND_TOO_BIG, (3u8, 4u8), (2u8, 0u8)),
        (ic::KIND_UNREACHABLE, (3, 1), (1, 3)),
        (ic::KIND_TIME_EXCEEDED, (11, 0), (3, 0)),
        (ic::KIND_PARAM_PROBLEM, (12, 0), (4, 0)),
    ];
    // The segments as each end sent them and as the other end saw them
    // (the backend's as the client saw it is `seg` from the VIP).
    let client_seg = |src: (IpAddr, u16), dst: (IpAddr, u16)| {
        let mut f = Frame::tcp(src, dst, TCP_ACK, 101, 701);
        f.ttl = 63;
        f
    };
    for (kind, v4, v6) in kinds {
        // To the VIP from the client's path: to the backend, quoting its
        // own segment.
        let (sent, original) = (seg((VIP.into(), 80), (CLIENT.into(), 40840), 100), seg((BACKEND.into(), 8080), (CLIENT.into(), 40840), 100));
        let (verdict, out) = r.run(r.t0, &eth(CLIENT_MAC, T0_MAC, false, &icmp4_error(ROUTER, VIP, 64, v4.0, v4.1, &sent, 48)));
        assert_eq!(verdict, XDP_REDIRECT, "IPv4 {v4:?} to the VIP");
        assert_eq!(out, eth(T1_MAC, BACKEND_MAC, false, &icmp4_error(ROUTER, BACKEND, 63, v4.0, v4.1, &original, 48)), "IPv4 {v4:?} to the backend");
        let (sent, original) = (seg((VIP6.into(), 80), (CLIENT6.into(), 40841), 100), seg((BACKEND6.into(), 8080), (CLIENT6.into(), 40841), 100));
        let (verdict, out) = r.run(r.t0, &eth(CLIENT_MAC, T0_MAC, true, &icmp6_error(ROUTER6, VIP6, 64, v6.0, v6.1, &sent, 68)));
        assert_eq!(verdict, XDP_REDIRECT, "ICMPv6 {v6:?} to the VIP");
        assert_eq!(out, eth(T1_MAC, BACKEND_MAC, true, &icmp6_error(ROUTER6, BACKEND6, 63, v6.0, v6.1, &original, 68)), "ICMPv6 {v6:?} to the backend");
        // From the backend's side about the client's segment: to the
        // client, from the VIP, quoting the segment as the client sent it.
        let (to_backend, as_sent) = (client_seg((CLIENT.into(), 40840), (BACKEND.into(), 8080)), client_seg((CLIENT.into(), 40840), (VIP.into(), 80)));
        let (verdict, out) = r.run(r.t1, &eth(BACKEND_MAC, T1_MAC, false, &icmp4_error(BACKEND, CLIENT, 64, v4.0, v4.1, &to_backend, 40)));
        assert_eq!(verdict, XDP_REDIRECT, "IPv4 {v4:?} from the backend's side");
        assert_eq!(out, eth(T0_MAC, CLIENT_MAC, false, &icmp4_error(VIP, CLIENT, 63, v4.0, v4.1, &as_sent, 40)), "IPv4 {v4:?} to the client");
        let (to_backend, as_sent) = (client_seg((CLIENT6.into(), 40841), (BACKEND6.into(), 8080)), client_seg((CLIENT6.into(), 40841), (VIP6.into(), 80)));
        let (verdict, out) = r.run(r.t1, &eth(BACKEND_MAC, T1_MAC, true, &icmp6_error(BACKEND6, CLIENT6, 64, v6.0, v6.1, &to_backend, 60)));
        assert_eq!(verdict, XDP_REDIRECT, "ICMPv6 {v6:?} from the backend's side");
        assert_eq!(out, eth(T0_MAC, CLIENT_MAC, true, &icmp6_error(VIP6, CLIENT6, 63, v6.0, v6.1, &as_sent, 60)), "ICMPv6 {v6:?} to the client");
        let counts = (r.counter(stats::icmp_error(kind, ic::OUTCOME_TO_BACKEND)), r.counter(stats::icmp_error(kind, ic::OUTCOME_TO_CLIENT)));
        assert_eq!(counts, (2, 2), "kind {kind}: one per family and direction");
    }
    assert_eq!((r.counter(stats::ICMP_TO_BACKEND), r.counter(stats::ICMP_TO_CLIENT)), (8, 8));
    // ICMPv6 errors about the live flow cut at every length, both ways: a
    // safe verdict each time (a cut packet's length disagrees with its
    // header), no state.
    let sent = seg((VIP6.into(), 80), (CLIENT6.into(), 40841), 100);
    let to_vip = eth(CLIENT_MAC, T0_MAC, true, &icmp6_error(ROUTER6, VIP6, 64, 2, 0, &sent, 68));
    let to_backend = client_seg((CLIENT6.into(), 40841), (BACKEND6.into(), 8080));
    let from_backend = eth(BACKEND_MAC, T1_MAC, true, &icmp6_error(BACKEND6, CLIENT6, 64, 1, 4, &to_backend, 60));
    for (what, full, iface) in [("to the VIP", &to_vip, r.t0), ("from the backend's side", &from_backend, r.t1)] {
        for len in 14..full.len() {
            let (verdict, _) = r.run(iface, &full[..len]);
            assert!(verdict == XDP_PASS || verdict == XDP_DROP, "ICMPv6 {what} cut at {len}: verdict {verdict}");
        }
    }
    let after = (r.flow((CLIENT, 40840), (VIP, 80), 6).expect("v4 flow").state, r.flow((CLIENT6, 40841), (VIP6, 80), 6).expect("v6 flow").state);
    assert_eq!(after, states, "ICMP changes no flow state");
}

#[test]
fn icmp_errors_about_unknown_flows_or_with_bad_quotes_get_a_safe_verdict_and_create_nothing() {
    let mut r = rig();
    establish(&mut r, 40820);
    let before = r.flow((CLIENT, 40820), (VIP, 80), 6).expect("flow").state;
    let sent = seg((VIP.into(), 80), (CLIENT.into(), 40820), 100);
    // About no flow: to a VIP, passed (the kernel has no socket); about a
    // backend's packet of no flow, dropped (never shown to a client).
    let unknown = seg((VIP.into(), 80), (CLIENT.into(), 40821), 100);
    let frame = eth(CLIENT_MAC, T0_MAC, false, &icmp4_error(ROUTER, VIP, 64, 3, 4, &unknown, 28));
    assert_eq!(r.run(r.t0, &frame), (XDP_PASS, frame.clone()));
    assert_eq!(r.counter(stats::PASS_ICMP_NO_FLOW), 1);
    let stray = Frame::tcp((CLIENT, 40822), (BACKEND, 8080), TCP_ACK, 1, 1);
    let frame = eth(BACKEND_MAC, T1_MAC, false, &icmp4_error(BACKEND, CLIENT, 64, 3, 3, &stray, 28));
    assert_eq!(r.run(r.t1, &frame).0, XDP_DROP);
    assert_eq!(r.counter(stats::DROP_ICMP_NO_FLOW), 1);
    // A quote that is not an IPv4 header with ports: dropped.
    let mut bogus = icmp4_error(ROUTER, VIP, 64, 3, 4, &sent, 28);
    bogus[28] = 0x46; // quoted IHL 6
    assert_eq!(r.run(r.t0, &eth(CLIENT_MAC, T0_MAC, false, &bogus)).0, XDP_DROP);
    assert_eq!(r.counter(stats::DROP_ICMP_BAD_QUOTE), 1);
    // Each outcome counted under its kind too.
    use lb_common::icmp as ic;
    assert_eq!(r.counter(stats::icmp_error(ic::KIND_TOO_BIG, ic::OUTCOME_PASSED_NO_FLOW)), 1);
    assert_eq!(r.counter(stats::icmp_error(ic::KIND_UNREACHABLE, ic::OUTCOME_DROPPED_NO_FLOW)), 1);
    assert_eq!(r.counter(stats::icmp_error(ic::KIND_TOO_BIG, ic::OUTCOME_DROPPED_BAD_QUOTE)), 1);
    // Not an error (echo): the kernel's.
    let echo = testbed::attack::ipv4_packet(ROUTER, VIP, 1, &testbed::attack::icmp4(8, 0, [0, 1, 0, 1], b"ping"));
    assert_eq!(r.run(r.t0, &eth(CLIENT_MAC, T0_MAC, false, &echo)).0, XDP_PASS);
    // A real error cut at every length: a safe verdict, no state.
    let full = eth(CLIENT_MAC, T0_MAC, false, &icmp4_error(ROUTER, VIP, 64, 3, 4, &sent, 48));
    for len in 14..full.len() {
        let (verdict, _) = r.run(r.t0, &full[..len]);
        assert!(verdict == XDP_PASS || verdict == XDP_DROP, "cut at {len}: verdict {verdict}");
    }
    assert_eq!(r.counts(), (1, 0), "ICMP created nothing");
    assert_eq!(r.flow((CLIENT, 40820), (VIP, 80), 6).expect("flow").state, before, "and changed no flow");
}

#[test]
fn the_port_filter_is_read_before_the_service_and_endpoint_lookups() {
    let mut r = rig();
    let syn = Frame::tcp((CLIENT, 40900), (VIP, 80), TCP_SYN, 1, 0).build();
    assert_eq!(r.run(r.t0, &syn).0, XDP_REDIRECT, "the controller's filter has the service's bit");
    let reply = Frame::tcp((BACKEND, 8080), (CLIENT, 40900), TCP_SYN | TCP_ACK, 7, 2).build();
    // With every bit clear nothing is looked up: both pass untouched, as
    // the host's own traffic.
    r.ctl.dataplane().port_filter_set(&lb_common::maps::PortFilter::default()).expect("clear");
    assert_eq!(r.run(r.t0, &syn), (XDP_PASS, syn.clone()));
    assert_eq!(r.run(r.t1, &reply), (XDP_PASS, reply.clone()));
    assert_eq!(r.counter(stats::PASS_NOT_SERVICE), 2);
    assert_eq!(r.flow_count(), 0);
}

#[test]
fn an_icmp_error_about_a_dsr_flow_goes_to_its_backend_through_the_tunnel_untouched() {
    let mut r = rig();
    // A DSR flow VIP:85 → 10.1.1.2:85 (entered at the client's ACK).
    assert_eq!(r.run(r.t0, &Frame::tcp((CLIENT, 40830), (VIP, 85), TCP_ACK, 1000, 77).build()).0, XDP_REDIRECT);
    // The backend sent its segment from the VIP itself: the quote needs
    // no translation, the error just goes into the tunnel.
    for (what, client_port) in [("with its flow", 40830u16), ("without (by the hash)", 40831)] {
        let sent = seg((VIP.into(), 85), (CLIENT.into(), client_port), 1400);
        let err = icmp4_error(ROUTER, VIP, 64, 3, 4, &sent, 48);
        let (verdict, out) = r.run(r.t0, &eth(CLIENT_MAC, T0_MAC, false, &err));
        assert_eq!(verdict, XDP_REDIRECT, "{what}");
        assert_eq!(out, encapsulated(&eth(CLIENT_MAC, T0_MAC, false, &err)), "{what}: the error itself, inside IPIP");
    }
    assert_eq!(r.counter(stats::ICMP_TO_BACKEND), 2);
    assert_eq!(r.counts(), (1, 0), "nothing created");
}

#[test]
fn the_verifier_accepts_the_program_with_headroom() {
    use std::os::fd::{AsFd, AsRawFd};
    let mut r = rig();
    let verified = |prog: &mut aya::programs::Xdp| -> u64 {
        let fd = prog.fd().expect("fd").as_fd().as_raw_fd();
        let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).expect("fdinfo");
        fdinfo.lines().find_map(|l| l.strip_prefix("verified_insns:")).and_then(|v| v.trim().parse().ok()).expect("verified_insns")
    };
    let entry = verified(r.ctl.dataplane().program().expect("program"));
    let full = verified(r.ctl.dataplane().full_program().expect("full program"));
    eprintln!("verifier processed {entry} (entry) + {full} (full program) = {} instructions", entry + full);
    // The kernel refuses a program past 1,000,000; the goal is a quarter
    // of that for both together, leaving room for what is still to come.
    assert!(entry + full <= 250_000, "the verifier processed {entry} + {full} instructions: past the 250k goal");
}

// ---- The DSR backends' MSS clamp (TC egress) ----

/// A SYN-ACK `src` → `dst` whose TCP options are `opts` (a multiple of 4
/// bytes), every checksum computed from scratch.
fn syn_ack_with_options(src: (IpAddr, u16), dst: (IpAddr, u16), opts: &[u8]) -> Vec<u8> {
    let mut f = Frame::tcp(src, dst, TCP_SYN | TCP_ACK, 7000, 101);
    if let L4::Tcp { doff, .. } = &mut f.l4 {
        *doff = 5 + (opts.len() / 4) as u8;
    }
    let mut b = f.build();
    let l4 = if src.0.is_ipv6() { 54 } else { 34 };
    b[l4 + 20..l4 + 20 + opts.len()].copy_from_slice(opts);
    refresh_tcp_checksum(&mut b, l4);
    b
}

/// Recomputes the TCP checksum of `frame` (TCP header at `l4`) from
/// nothing but its bytes: the independent check of the program's update.
fn refresh_tcp_checksum(frame: &mut [u8], l4: usize) {
    let len = frame.len() - l4;
    let mut pseudo = Vec::new();
    if l4 == 54 {
        pseudo.extend_from_slice(&frame[22..54]);
        pseudo.extend_from_slice(&(len as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 6]);
    } else {
        pseudo.extend_from_slice(&frame[26..34]);
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(len as u16).to_be_bytes());
    }
    frame[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
    let c = !lb_common::csum::fold(lb_common::csum::sum_bytes(&frame[l4..], lb_common::csum::sum_bytes(&pseudo, 0)));
    frame[l4 + 16..l4 + 18].copy_from_slice(&c.to_ne_bytes());
}

#[test]
fn the_backends_mss_clamp_lowers_only_the_mss_of_syn_acks_from_a_vip_with_every_checksum_right() {
    assert!(testbed::have_privileges(), "needs root: run `cargo xtask test`");
    const TC_ACT_UNSPEC: u32 = -1i32 as u32;
    let vip: IpAddr = VIP.into();
    let vip6: IpAddr = VIP6.into();
    let mut ebpf = xlb::dataplane::load_mss_clamp(&[(vip, 1440), (vip6, 1420)]).expect("the clamp loads and verifies");
    let prog = xlb::dataplane::mss_clamp_program(&mut ebpf).expect("program");
    let run = |frame: &[u8]| {
        let mut out = vec![0u8; frame.len() + 64];
        let r = prog
            .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..TestRunOptions::default() })
            .unwrap_or_else(|e| panic!("test_run on {} bytes: {e}", frame.len()));
        out.truncate(r.data_size_out as usize);
        assert_eq!(r.return_value, TC_ACT_UNSPEC, "every packet is handed on");
        out
    };
    let client = (IpAddr::from(CLIENT), 40950u16);
    // Linux's SYN-ACK options (MSS first: at an even offset), and the MSS
    // behind a NOP (an odd offset: the value straddles two checksum words).
    let linux = |mss: u16| {
        let m = mss.to_be_bytes();
        vec![2, 4, m[0], m[1], 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7]
    };
    let odd = |mss: u16| {
        let m = mss.to_be_bytes();
        vec![1, 2, 4, m[0], m[1], 1, 3, 3, 7, 1, 1, 1]
    };
    for (what, opts, want) in [("even offset", linux(1460), linux(1440)), ("odd offset", odd(1460), odd(1440)), ("odd offset, 9000", odd(8960), odd(1440))] {
        let frame = syn_ack_with_options((vip, 80), client, &opts);
        assert_eq!(run(&frame), syn_ack_with_options((vip, 80), client, &want), "{what}: the MSS lowered, the checksum as if built so");
    }
    let client6 = (IpAddr::from(CLIENT6), 40951u16);
    let frame = syn_ack_with_options((vip6, 80), client6, &linux(1440));
    assert_eq!(run(&frame), syn_ack_with_options((vip6, 80), client6, &linux(1420)), "IPv6 (its pseudo-header in the checksum)");
    // Left alone: an MSS already small enough, a SYN-ACK from an address
    // that is no VIP here, a segment that is no SYN, a SYN+RST, no MSS
    // option at all.
    let untouched = [
        ("MSS below the limit", syn_ack_with_options((vip, 80), client, &linux(1400))),
        ("another source", syn_ack_with_options((IpAddr::from(BACKEND), 80), client, &linux(1460))),
        ("no MSS option", syn_ack_with_options((vip, 80), client, &[1, 3, 3, 7])),
        ("not a SYN", Frame::tcp((vip, 80), client, TCP_ACK, 1, 1).build()),
    ];
    for (what, frame) in untouched {
        assert_eq!(run(&frame), frame, "{what}");
    }
    let mut syn_rst = syn_ack_with_options((vip, 80), client, &linux(1460));
    syn_rst[34 + 13] |= 0x04;
    refresh_tcp_checksum(&mut syn_rst, 34);
    assert_eq!(run(&syn_rst), syn_rst, "SYN with RST");
    // Cut at every length from the end of the IP header (the kernel
    // makes no skb of less): handed on, nothing written past the cut.
    let full = syn_ack_with_options((vip, 80), client, &linux(1460));
    for len in 34..full.len() {
        assert_eq!(run(&full[..len]), full[..len].to_vec(), "cut at {len}");
    }
}

/// `f` (TCP, no payload) with TCP options `opts` (a multiple of 4 bytes),
/// its checksum computed from scratch, or left the pseudo-header seed
/// (`partial`: the seed does not depend on the segment's bytes).
fn with_options(f: &Frame, opts: &[u8], partial: bool) -> Vec<u8> {
    let mut f = f.clone();
    if let L4::Tcp { doff, .. } = &mut f.l4 {
        *doff = 5 + (opts.len() / 4) as u8;
    }
    let l4 = if f.src.is_ipv6() { 54 } else { 34 };
    let mut b = if partial { f.partial().build() } else { f.build() };
    b[l4 + 20..l4 + 20 + opts.len()].copy_from_slice(opts);
    if !partial {
        refresh_tcp_checksum(&mut b, l4);
    }
    b
}

#[test]
fn a_services_mss_clamp_lowers_its_syns_and_syn_acks_through_the_balancer() {
    let mut r = rig();
    // VIP:86 → 10.1.1.2:8086, MSS clamped to 1400.
    let clamped = xlb::model::settings::ServiceOptions { mss_clamp: Some(1400), ..Default::default() };
    let vip86 = SocketAddr::new(VIP.into(), 86);
    r.ctl.service_add(vip86, Proto::Tcp, &clamped).expect("clamped service");
    r.ctl.backend_add(vip86, Some(Proto::Tcp), SocketAddr::new(BACKEND.into(), 8086), None).expect("backend");
    let mss = |v: u16| {
        let m = v.to_be_bytes();
        [2, 4, m[0], m[1], 1, 3, 3, 7]
    };
    for (i, partial) in [false, true].into_iter().enumerate() {
        let port = 40960 + i as u16;
        let syn = Frame::tcp((CLIENT, port), (VIP, 86), TCP_SYN, 100, 0);
        let (verdict, out) = r.run(r.t0, &with_options(&syn, &mss(1460), partial));
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(out, with_options(&to_backend(syn, 8086), &mss(1400), false), "SYN to the backend (partial checksum: {partial})");
        let syn_ack = Frame::tcp((BACKEND, 8086), (CLIENT, port), TCP_SYN | TCP_ACK, 700, 101);
        let (verdict, out) = r.run(r.t1, &with_options(&syn_ack, &mss(8960), partial));
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(out, with_options(&to_client(syn_ack, VIP.into(), 86), &mss(1400), false), "SYN-ACK to the client (partial: {partial})");
    }
    // Below the clamp: untouched but for the NAT.
    let syn = Frame::tcp((CLIENT, 40962), (VIP, 86), TCP_SYN, 100, 0);
    let (_, out) = r.run(r.t0, &with_options(&syn, &mss(1200), false));
    assert_eq!(out, with_options(&to_backend(syn, 8086), &mss(1200), false));
    // Another service's SYN keeps its MSS.
    let syn = Frame::tcp((CLIENT, 40963), (VIP, 80), TCP_SYN, 100, 0);
    let (_, out) = r.run(r.t0, &with_options(&syn, &mss(1460), false));
    assert_eq!(out, with_options(&to_backend(syn, 8080), &mss(1460), false), "no clamp on VIP:80");
}

#[test]
fn a_retransmitted_syn_of_a_flow_in_its_handshake_goes_where_the_first_went_and_writes_nothing() {
    let mut r = rig();
    // Round robin over two backends: a fresh pick would alternate.
    let wrr = xlb::model::settings::ServiceOptions { scheduler: Some(xlb::model::settings::Scheduler::Wrr), ..Default::default() };
    let vip87 = SocketAddr::new(VIP.into(), 87);
    r.ctl.service_add(vip87, Proto::Tcp, &wrr).expect("round-robin service");
    for port in [8087, 8088] {
        r.ctl.backend_add(vip87, Some(Proto::Tcp), SocketAddr::new(BACKEND.into(), port), None).expect("backend");
    }
    let dport = |out: &[u8]| u16::from_be_bytes([out[36], out[37]]);
    let syn = Frame::tcp((CLIENT, 40970), (VIP, 87), TCP_SYN, 100, 0).build();
    let (verdict, first) = r.run(r.t0, &syn);
    assert_eq!(verdict, XDP_REDIRECT);
    let created = r.counter(stats::ENTRIES_CREATED);
    assert_eq!(r.flow_count(), 1, "the SYN entered the half-open table");
    for attempt in 1..=3 {
        let (verdict, again) = r.run(r.t0, &syn);
        assert_eq!(verdict, XDP_REDIRECT, "retransmission {attempt}");
        assert_eq!(again, first, "retransmission {attempt}: to the same backend, the same bytes");
    }
    assert_eq!(r.counter(stats::ENTRIES_CREATED), created, "no entry written for a retransmission");
    assert_eq!(r.flow_count(), 1);
    // Two new clients in a row get the two backends: a fresh pick for a
    // retransmission would have alternated too (picks for them advance the
    // cursor; the retransmissions above were not round robin's luck).
    let (_, c) = r.run(r.t0, &Frame::tcp((CLIENT, 40971), (VIP, 87), TCP_SYN, 100, 0).build());
    let (_, d) = r.run(r.t0, &Frame::tcp((CLIENT, 40972), (VIP, 87), TCP_SYN, 100, 0).build());
    assert_ne!(dport(&c), dport(&d), "round robin alternates");
}

#[test]
fn a_retransmitted_syn_reaches_its_flow_even_when_a_new_one_would_be_refused() {
    let mut r = rig();
    // Full NAT with a four-port pool: four handshakes under way take it all.
    let syns: Vec<Vec<u8>> = (0..4).map(|i| Frame::tcp((CLIENT, 40980 + i), (VIP, 84), TCP_SYN, 100, 0).build()).collect();
    let firsts: Vec<Vec<u8>> = syns
        .iter()
        .map(|s| {
            let (verdict, out) = r.run(r.t0, s);
            assert_eq!(verdict, XDP_REDIRECT);
            out
        })
        .collect();
    let (verdict, _) = r.run(r.t0, &Frame::tcp((CLIENT, 40990), (VIP, 84), TCP_SYN, 100, 0).build());
    assert_eq!(verdict, 3, "XDP_TX: a fifth flow is refused with a RST, the pool is empty");
    let refused = r.counter(stats::REFUSED_NO_PORT);
    assert_eq!(refused, 1);
    // Their retransmissions still reach their flows, through their ports.
    for (s, first) in syns.iter().zip(&firsts) {
        let (verdict, again) = r.run(r.t0, s);
        assert_eq!(verdict, XDP_REDIRECT, "a retransmitted SYN of a flow holding a port");
        assert_eq!(&again, first, "the same backend and source port as the first time");
    }
    assert_eq!(r.counter(stats::REFUSED_NO_PORT), refused, "no retransmission counted as refused");
}
