//! The controller against the in-memory data plane: no root, no kernel.
//! Each test drives the controller as the daemon would (requests, ticks,
//! snapshots, finished resets) and checks both the model (`status`) and
//! what reached the maps.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lb_common::{
    maps::{BACKEND_DOWN, BACKEND_DRAINING, BACKEND_REMOVED, BACKEND_UNUSED, BACKEND_UP, addr_from_ip},
    tcp,
};

use super::{Controller, ControllerError, DnsSettings};
use crate::{
    api::{
        ErrorCode,
        desired::{Desired, DesiredBackend, DesiredNamed, DesiredService},
    },
    dataplane::{BackendRef, DataPlane, FlowTable, fake::FakeDataPlane},
    model::{
        HostPort, Proto, ResetCause, Resolution, ServiceId,
        settings::{FlowPolicy, ServiceOptions, ServiceSettings},
    },
    resets::{Outcome, Target},
    table::{self, tests_support::flow},
};

type Ctl = Controller<FakeDataPlane>;

const VIP: &str = "10.99.0.1:80";
const SNAT: &str = "10.1.1.1";

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn be(n: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::from([10, 1, 1, n]), 8080)
}

fn sid() -> ServiceId {
    ServiceId { addr: sa(VIP), proto: Proto::Tcp }
}

/// The fake data plane's clock in these tests (jiffies, 1000 a second).
const NOW: u32 = 10_000_000;

/// The backend 10.1.1.2:8080 as records name it.
fn backend_ref(n: u8) -> BackendRef {
    BackendRef { addr: addr_from_ip(IpAddr::from([10, 1, 1, n])), port: 8080u16.to_be(), snat: [0; 4] }
}

/// A controller on a fresh fake, finding every source address at `SNAT`.
fn controller() -> (Ctl, FakeDataPlane) {
    let dp = FakeDataPlane::new(1 << 16, 1 << 14);
    dp.table().set_now(NOW);
    let snat: IpAddr = SNAT.parse().expect("address");
    let c = Controller::new(dp.clone()).with_snat_resolver(Box::new(move |_| Ok(snat)));
    (c, dp)
}

fn options(f: impl FnOnce(&mut ServiceOptions)) -> ServiceOptions {
    let mut o = ServiceOptions::default();
    f(&mut o);
    o
}

fn settings(f: impl FnOnce(&mut ServiceOptions)) -> ServiceSettings {
    ServiceSettings::default().patched(&options(f)).expect("valid settings")
}

fn desired(s: ServiceSettings, backends: &[SocketAddr]) -> Desired {
    Desired {
        services: vec![DesiredService {
            service: sa(VIP),
            proto: Proto::Tcp,
            settings: s,
            backends: backends.iter().map(|b| DesiredBackend { backend: *b, weight: 1 }).collect(),
            named_backends: Vec::new(),
        }],
    }
}

/// The data plane's state of backend `id`.
fn state_of(dp: &FakeDataPlane, id: u32) -> u8 {
    dp.state().backends.get(&id).map_or(BACKEND_UNUSED, |b| b.state)
}

/// The backend ids service 0's ring schedules to (deduplicated, sorted).
fn ring_ids(dp: &FakeDataPlane) -> Vec<u32> {
    let mut r = dp.ring(0);
    r.sort_unstable();
    r.dedup();
    r
}

/// A table walk as the walker makes it, handed to the controller.
fn snapshot(c: &mut Ctl) -> table::Decisions {
    let (snap, d) = table::walk(&c.table(), &c.walk_rules(), c.table().now().expect("clock"), &mut |_| {}).expect("walk");
    c.on_snapshot(snap).expect("snapshot applied");
    d
}

fn backend_id(c: &Ctl, b: SocketAddr) -> u32 {
    let s = c.status().expect("status");
    s.services.iter().flat_map(|s| &s.backends).find(|x| x.backend == b).map(|x| x.id).expect("backend in status")
}

fn registered(c: &Ctl) -> Vec<SocketAddr> {
    c.export().services.iter().flat_map(|s| s.backends.iter().map(|b| b.backend)).collect()
}

#[test]
fn red_black_through_apply_writes_the_new_ring_before_anything_is_marked_gone() {
    let (mut c, dp) = controller();
    let s = settings(|_| {});
    c.apply(&desired(s.clone(), &[be(1), be(2)]), false).expect("first apply");
    let (old1, old2) = (backend_id(&c, be(1)), backend_id(&c, be(2)));
    dp.state().log.clear();
    c.apply(&desired(s, &[be(3)]), false).expect("red/black apply");
    let new = backend_id(&c, be(3));
    let log = dp.state().log.clone();
    let pos = |needle: &str| log.iter().position(|l| l == needle).unwrap_or_else(|| panic!("{needle:?} not in {log:?}"));
    let up = pos(&format!("backend_set {new} state {BACKEND_UP}"));
    let ring = log.iter().position(|l| l.starts_with("ring_write 0")).expect("a ring write");
    let gone1 = pos(&format!("backend_set {old1} state {BACKEND_REMOVED}"));
    let gone2 = pos(&format!("backend_set {old2} state {BACKEND_REMOVED}"));
    assert!(up < ring, "the new backend's entry comes before the ring that points at it: {log:?}");
    assert!(ring < gone1 && ring < gone2, "the new ring comes before the old backends are marked gone: {log:?}");
    assert_eq!(log.iter().filter(|l| l.starts_with("ring_write 0")).count(), 1, "one ring write for the whole apply: {log:?}");
    assert_eq!(ring_ids(&dp), vec![new]);
    // Their flows are reset once the ring no longer has them.
    let jobs = c.take_jobs();
    let mut targets: Vec<u32> = jobs.iter().filter_map(|j| if let Target::Backend(id) = j.target { Some(id) } else { None }).collect();
    targets.sort_unstable();
    assert_eq!(targets, vec![old1, old2]);
    assert!(jobs.iter().all(|j| j.cause == ResetCause::Removed));
}

#[test]
fn apply_checks_everything_before_the_first_write_and_names_the_field() {
    let (mut c, dp) = controller();
    let mut want = desired(settings(|_| {}), &[be(1)]);
    // A second service, with an IPv6 backend behind an IPv4 VIP.
    want.services.push(DesiredService {
        service: sa("10.99.0.2:80"),
        proto: Proto::Tcp,
        settings: settings(|_| {}),
        backends: vec![DesiredBackend { backend: sa("[fd00::2]:8080"), weight: 1 }],
        named_backends: Vec::new(),
    });
    let e = c.apply(&want, false).expect_err("a family mismatch is refused");
    assert_eq!(e.code(), ErrorCode::BadRequest);
    assert!(e.to_string().contains("[fd00::2]:8080"), "{e}");
    assert!(dp.state().log.is_empty(), "nothing written: {:?}", dp.state().log);
    assert!(c.export().services.is_empty());
    // DSR needs the backend's port to be the VIP's.
    let dsr = desired(settings(|o| o.mode = Some(crate::model::settings::NatMode::Dsr)), &[be(1)]);
    let e = c.apply(&dsr, false).expect_err("a DSR port change is refused");
    assert!(e.to_string().contains("port"), "{e}");
    assert!(dp.state().log.is_empty());
    // A dry run lists the changes and writes nothing.
    let changes = c.apply(&desired(settings(|_| {}), &[be(1), be(2)]), true).expect("dry run");
    assert_eq!(changes.len(), 3, "{changes:?}");
    assert!(dp.state().log.is_empty());
}

#[test]
fn dnat_changed_to_full_nat_through_apply_gets_its_source_address() {
    let (mut c, dp) = controller();
    c.apply(&desired(settings(|_| {}), &[be(1)]), false).expect("dnat");
    let id = backend_id(&c, be(1));
    let full = settings(|o| o.mode = Some(crate::model::settings::NatMode::Fullnat));
    c.apply(&desired(full, &[be(1)]), false).expect("to full NAT");
    let snat: IpAddr = SNAT.parse().expect("address");
    assert_eq!(dp.state().backends[&id].snat_addr, addr_from_ip(snat), "the backend's entry has the balancer's source");
}

#[test]
fn removal_policies_reset_keep_or_drain_until_the_deadline() {
    let (mut c, dp) = controller();
    let drain = FlowPolicy::Drain(Duration::from_secs(10));
    for (policy, n) in [(FlowPolicy::Reset, 1), (FlowPolicy::Keep, 2), (drain, 3)] {
        let sid = ServiceId { addr: SocketAddr::new(IpAddr::from([10, 99, 0, n]), 80), proto: Proto::Tcp };
        c.service_add(sid.addr, sid.proto, &options(|o| o.on_remove = Some(policy))).expect("service");
        c.backend_add(sid.addr, None, be(n), None).expect("backend");
    }
    let ids: Vec<u32> = (1..=3).map(|n| backend_id(&c, be(n))).collect();
    // Each has one live flow.
    let now = NOW;
    for (i, id) in ids.iter().enumerate() {
        let mut f = flow(1000 + i as u16, *id, tcp::STATE_ESTABLISHED, now);
        f.state.service_id = i as u8;
        c.table().put(f);
    }
    snapshot(&mut c);
    for n in 1..=3u8 {
        let (_, policy, active) = c.backend_remove(SocketAddr::new(IpAddr::from([10, 99, 0, n]), 80), None, be(n)).expect("remove");
        assert_eq!(active, 1, "{policy}: the flows it had, from the snapshot");
    }
    let jobs = c.take_jobs();
    assert_eq!(jobs.len(), 1, "only the reset policy resets at once");
    assert_eq!(jobs[0].target, Target::Backend(ids[0]));
    assert_eq!(state_of(&dp, ids[0]), BACKEND_REMOVED);
    assert_eq!(state_of(&dp, ids[1]), BACKEND_DRAINING, "keep: no new flows, existing ones go on (no deadline)");
    assert_eq!(state_of(&dp, ids[2]), BACKEND_DRAINING);
    // Before the deadline nothing happens; after it the rest is reset.
    c.tick(Instant::now() + Duration::from_secs(5)).expect("tick");
    assert!(c.take_jobs().is_empty());
    c.tick(Instant::now() + Duration::from_secs(11)).expect("tick");
    let jobs = c.take_jobs();
    assert_eq!(jobs.len(), 1);
    assert_eq!((jobs[0].target.clone(), jobs[0].cause), (Target::Backend(ids[2]), ResetCause::DrainDeadline));
    assert_eq!(state_of(&dp, ids[2]), BACKEND_REMOVED);
}

#[test]
fn a_drain_ends_when_its_last_flow_does() {
    let (mut c, dp) = controller();
    c.service_add(sa(VIP), Proto::Tcp, &options(|o| o.on_remove = Some(FlowPolicy::Drain(Duration::from_secs(600))))).expect("service");
    c.backend_add(sa(VIP), None, be(1), None).expect("backend");
    let id = backend_id(&c, be(1));
    let f = flow(1000, id, tcp::STATE_ESTABLISHED, NOW);
    c.table().put(f);
    snapshot(&mut c);
    c.backend_remove(sa(VIP), None, be(1)).expect("remove");
    snapshot(&mut c);
    assert_eq!(state_of(&dp, id), BACKEND_DRAINING, "a flow is left");
    // The flow closes (both FINs): the drain is over, nothing to reset.
    let mut closed = f;
    closed.state.orig.state = tcp::STATE_FIN;
    closed.state.reply.state = tcp::STATE_FIN;
    c.table().put(closed);
    snapshot(&mut c);
    assert_eq!(state_of(&dp, id), BACKEND_REMOVED);
    assert!(c.take_jobs().is_empty());
}

#[test]
fn failing_health_checks_take_a_backend_out_and_passing_ones_bring_it_back() {
    let (mut c, dp) = controller();
    c.service_add(
        sa(VIP),
        Proto::Tcp,
        &options(|o| {
            o.health = Some("tcp".into());
            o.fall = Some(2);
            o.rise = Some(2);
        }),
    )
    .expect("service");
    c.backend_add(sa(VIP), None, be(1), None).expect("be1");
    c.backend_add(sa(VIP), None, be(2), None).expect("be2");
    let (a, b) = (backend_id(&c, be(1)), backend_id(&c, be(2)));
    assert_eq!(c.health_targets().len(), 2);
    c.health_result(a, Err("refused".into())).expect("result");
    assert_eq!(ring_ids(&dp), vec![a, b], "one failure is not enough (fall 2)");
    c.health_result(a, Err("refused".into())).expect("result");
    assert_eq!(ring_ids(&dp), vec![b]);
    assert_eq!(state_of(&dp, a), BACKEND_DOWN);
    let jobs = c.take_jobs();
    assert_eq!((jobs.len(), jobs[0].cause), (1, ResetCause::Unhealthy));
    let st = c.status().expect("status");
    let s = &st.services[0].backends.iter().find(|x| x.id == a).expect("be1");
    assert_eq!((s.healthy, s.last_health_error.as_deref()), (false, Some("refused")));
    c.health_result(a, Ok(())).expect("result");
    c.health_result(a, Ok(())).expect("result");
    assert_eq!(ring_ids(&dp), vec![a, b]);
    assert_eq!(state_of(&dp, a), BACKEND_UP);
}

#[test]
fn slow_start_ramps_a_joining_backends_share_of_the_ring() {
    let (mut c, dp) = controller();
    c.service_add(
        sa(VIP),
        Proto::Tcp,
        &options(|o| {
            o.slow_start = Some(crate::model::settings::Dur(Duration::from_secs(10)));
            o.scheduler = Some(crate::model::settings::Scheduler::Wrr);
        }),
    )
    .expect("service");
    c.backend_add(sa(VIP), None, be(1), None).expect("be1");
    c.backend_add(sa(VIP), None, be(2), None).expect("be2");
    // be1 has been up for a minute (its whole weight); be2 joins now.
    if let Some(b) = c.services.get_mut(&sid()).and_then(|s| s.backends.get_mut(&be(1))) {
        b.up_since = Instant::now() - Duration::from_secs(60);
    }
    let (a, b) = (backend_id(&c, be(1)), backend_id(&c, be(2)));
    let share = |dp: &FakeDataPlane, id: u32| {
        let r = dp.ring(0);
        r.iter().filter(|x| **x == id).count() as f64 / r.len() as f64
    };
    // Seen 2 s later and 20 s later.
    c.tick(Instant::now() + Duration::from_secs(2)).expect("tick");
    let early = share(&dp, b);
    assert!(early > 0.0 && early < 0.3, "be2 takes a small share at first: {early}");
    c.tick(Instant::now() + Duration::from_secs(20)).expect("tick");
    let full = share(&dp, b);
    assert!((full - 0.5).abs() < 0.02, "then its whole weight: {full}");
    assert!(share(&dp, a) > 0.45);
}

#[test]
fn ids_are_freed_after_two_empty_snapshots_never_while_a_reset_runs() {
    let (mut c, dp) = controller();
    c.service_add(sa(VIP), Proto::Tcp, &ServiceOptions::default()).expect("service");
    c.backend_add(sa(VIP), None, be(1), None).expect("be1");
    let id = backend_id(&c, be(1));
    c.table().put(flow(1000, id, tcp::STATE_ESTABLISHED, NOW));
    c.backend_remove(sa(VIP), None, be(1)).expect("remove");
    assert_eq!(c.take_jobs().len(), 1);
    // The reset runs: the table empties, but the id stays while it runs.
    c.table().remove_keys(&[flow(1000, id, 0, 0).key]).expect("remove");
    snapshot(&mut c);
    snapshot(&mut c);
    assert_eq!(state_of(&dp, id), BACKEND_REMOVED, "still held: its reset job is under way");
    c.on_reset(
        Outcome { service: Some(sid()), cause: Some(ResetCause::Removed), done: true, reset_by_backend: [(id, 1)].into(), ..Default::default() },
        Some(id),
    );
    snapshot(&mut c);
    assert_eq!(state_of(&dp, id), BACKEND_REMOVED, "one empty snapshot is not enough");
    // A flow seen again (it moved between tables during a walk) restarts the count.
    c.table().put(flow(1001, id, tcp::STATE_ESTABLISHED, NOW));
    snapshot(&mut c);
    c.table().remove_keys(&[flow(1001, id, 0, 0).key]).expect("remove");
    snapshot(&mut c);
    assert_eq!(state_of(&dp, id), BACKEND_REMOVED);
    snapshot(&mut c);
    assert_eq!(state_of(&dp, id), BACKEND_UNUSED, "freed");
    let st = c.status().expect("status");
    assert!(st.services[0].backends.is_empty());
    assert_eq!(st.services[0].resets.removed, 1);
}

#[test]
fn least_connections_counts_and_status_come_from_the_snapshot_without_a_walk() {
    let (mut c, dp) = controller();
    c.service_add(sa(VIP), Proto::Tcp, &ServiceOptions::default()).expect("service");
    c.backend_add(sa(VIP), None, be(1), None).expect("be1");
    let id = backend_id(&c, be(1));
    let now = NOW;
    for p in 0..5 {
        c.table().put(flow(2000 + p, id, tcp::STATE_ESTABLISHED, now));
    }
    snapshot(&mut c);
    assert_eq!(dp.state().active.get(&id), Some(&5));
    let walks = dp.state().walks;
    for _ in 0..3 {
        let st = c.status().expect("status");
        assert_eq!(st.services[0].backends[0].active_flows, 5);
        assert_eq!(st.table.entries, 5, "one entry per flow");
        assert!(st.table.snapshot_age_s.is_some());
    }
    assert_eq!(dp.state().walks, walks, "status never walks the table");
}

#[test]
fn partial_failures_leave_the_model_and_the_maps_as_they_were() {
    let (mut c, dp) = controller();
    // A service whose address role cannot be written is not added.
    dp.fail_next("addr_set");
    let e = c.service_add(sa(VIP), Proto::Tcp, &ServiceOptions::default()).expect_err("injected");
    assert!(matches!(e, ControllerError::Dataplane(_)));
    assert!(dp.state().services.is_empty());
    c.service_add(sa(VIP), Proto::Tcp, &ServiceOptions::default()).expect("the retry is not a conflict");
    // A backend whose ring cannot be written is not registered.
    dp.fail_next("ring_write");
    c.backend_add(sa(VIP), None, be(1), None).expect_err("injected");
    assert!(registered(&c).is_empty());
    assert!(dp.state().backends.values().all(|b| b.state == BACKEND_UNUSED));
    c.backend_add(sa(VIP), None, be(1), None).expect("the retry is not 'already registered'");
    c.backend_add(sa(VIP), None, be(2), None).expect("be2");
    // A removal whose ring cannot be written leaves the backend serving.
    dp.fail_next("ring_write");
    c.backend_remove(sa(VIP), None, be(1)).expect_err("injected");
    assert_eq!(registered(&c).len(), 2);
    assert_eq!(state_of(&dp, backend_id(&c, be(1))), BACKEND_UP);
    assert!(c.take_jobs().is_empty(), "nothing reset");
    // A service whose entry cannot be removed stays.
    dp.fail_next("service_remove");
    c.service_remove(sa(VIP), None).expect_err("injected");
    assert!(c.resolve(sa(VIP), None).is_ok());
    assert_eq!(dp.state().services.len(), 1);
    c.service_remove(sa(VIP), None).expect("retry");
    assert!(dp.state().services.is_empty());
}

#[test]
fn an_apply_that_fails_part_way_leaves_a_consistent_state_that_a_retry_completes() {
    let (mut c, dp) = controller();
    let want = desired(settings(|_| {}), &[be(1), be(2), be(3)]);
    dp.fail_next("backend_set");
    c.apply(&want, false).expect_err("injected");
    // Whatever was applied is in the maps as the model has it.
    let st = c.status().expect("status");
    for b in st.services.iter().flat_map(|s| &s.backends) {
        assert_ne!(state_of(&dp, b.id), BACKEND_UNUSED, "{} is registered and in the maps", b.backend);
    }
    let ring = ring_ids(&dp);
    assert!(ring.iter().all(|id| st.services[0].backends.iter().any(|b| b.id == *id)), "the ring names registered backends only");
    c.apply(&want, false).expect("the retry completes it");
    assert_eq!(registered(&c).len(), 3);
    assert_eq!(ring_ids(&dp).len(), 3);
}

#[test]
fn a_named_backend_loses_its_addresses_only_after_consecutive_misses() {
    let (mut c, dp) = controller();
    c = c.with_dns(DnsSettings { enabled: true, misses: 3, ..Default::default() });
    c.service_add(sa(VIP), Proto::Tcp, &ServiceOptions::default()).expect("service");
    let name: HostPort = "app.example:8080".parse().expect("name");
    let addrs = |ips: &[u8]| Resolution::Addrs { addrs: ips.iter().map(|n| IpAddr::from([10, 1, 1, *n])).collect(), ttl: Duration::from_secs(30) };
    let (_, got) = c.named_add(sa(VIP), None, &name, None, addrs(&[1, 2])).expect("named add");
    assert_eq!(got, vec![be(1), be(2)]);
    assert_eq!(ring_ids(&dp).len(), 2);
    // The answer changes: 1 leaves, 3 joins, in one ring write.
    dp.state().log.clear();
    c.dns_apply(sid(), &name, addrs(&[2, 3]), Instant::now()).expect("answer");
    let regs = registered(&c);
    assert!(regs.is_empty(), "backends of a name are not exported as addresses: {regs:?}");
    let st = c.status().expect("status");
    assert_eq!(st.services[0].named_backends[0].addresses, vec![be(2), be(3)]);
    assert_eq!(dp.state().log.iter().filter(|l| l.starts_with("ring_write")).count(), 1);
    // NXDOMAIN twice: nothing changes; the third removes them.
    for _ in 0..2 {
        c.dns_apply(sid(), &name, Resolution::NoSuchName, Instant::now()).expect("answer");
        assert_eq!(c.status().expect("status").services[0].named_backends[0].addresses.len(), 2);
    }
    // An answer in between starts the count again; a failing server is
    // no miss at all (the last answer holds up to --dns-max-ttl).
    c.dns_apply(sid(), &name, addrs(&[2, 3]), Instant::now()).expect("answer");
    for _ in 0..5 {
        c.dns_apply(sid(), &name, Resolution::Failed("timeout".into()), Instant::now()).expect("answer");
    }
    for _ in 0..2 {
        c.dns_apply(sid(), &name, Resolution::NoSuchName, Instant::now()).expect("answer");
    }
    assert_eq!(c.status().expect("status").services[0].named_backends[0].addresses.len(), 2);
    c.dns_apply(sid(), &name, Resolution::NoSuchName, Instant::now()).expect("answer");
    assert!(c.status().expect("status").services[0].named_backends[0].addresses.is_empty());
    assert!(ring_ids(&dp).is_empty());
}

#[test]
fn synced_flows_are_installed_with_this_nodes_ids() {
    use crate::ha::{Kind, Record, Role};
    let (mut c, _dp) = controller();
    c = c.with_sync(Role::Backup, sa("192.0.2.2:7000"));
    // Ids differ from the peer's: a service and a backend first.
    c.service_add(sa("10.99.0.9:80"), Proto::Tcp, &ServiceOptions::default()).expect("other service");
    c.service_add(sa(VIP), Proto::Tcp, &ServiceOptions::default()).expect("service");
    c.backend_add(sa(VIP), None, be(9), None).expect("other backend");
    c.backend_add(sa(VIP), None, be(2), None).expect("backend");
    let (local_svc, local_be) = (1, backend_id(&c, SocketAddr::new(IpAddr::from([10, 1, 1, 2]), 8080)));
    // The peer's record: 10.1.1.2:8080 is its backend 0 of service 0.
    let f = flow(3000, 0, tcp::STATE_ESTABLISHED, 5);
    let peer_backend = backend_ref(2);
    let known = Record { kind: Kind::Live, idle: Duration::from_secs(1), flow: f.end_record(lb_common::maps::end_reason::NEW, &peer_backend) };
    let mut other = f;
    other.key.src_port = 3001u16.to_be();
    let unknown_backend = BackendRef { port: 9999u16.to_be(), ..peer_backend };
    let unknown = Record { kind: Kind::Live, idle: Duration::ZERO, flow: other.end_record(lb_common::maps::end_reason::NEW, &unknown_backend) };
    c.sync_install(&[known, unknown]).expect("install");
    let got = c.table().get(&f.key).expect("installed");
    assert_eq!((got.state.service_id as u32, got.state.backend_id as u32), (local_svc, local_be));
    assert_eq!(got.state.orig.end, f.state.orig.end, "the peer's tracking is kept");
    assert!(c.table().get(&other.key).is_none());
    let s = c.status().expect("status").sync.expect("sync status");
    assert_eq!((s.applied_records, s.unknown_records), (1, 1));
    // The peer says it ended.
    let end = Record { kind: Kind::End, idle: Duration::ZERO, flow: f.end_record(lb_common::maps::end_reason::FIN, &peer_backend) };
    c.sync_install(&[end]).expect("end");
    assert!(c.table().get(&f.key).is_none());
}

#[test]
fn named_backends_in_apply_are_registered_for_lookup() {
    let (mut c, _dp) = controller();
    let mut want = desired(settings(|_| {}), &[]);
    want.services[0].named_backends.push(DesiredNamed { backend: "app.example:8080".parse().expect("name"), weight: 2 });
    let e = c.apply(&want, false).expect_err("no resolver");
    assert!(e.to_string().contains("named_backends"), "names the field: {e}");
    c = c.with_dns(DnsSettings { enabled: true, ..Default::default() });
    c.apply(&want, false).expect("apply");
    let due = c.dns_due(Instant::now());
    assert_eq!(due.len(), 1, "looked up at once");
    assert_eq!(c.export(), want, "export gives back what was applied");
}

#[test]
fn a_replayed_sync_datagram_installs_nothing() {
    use crate::ha::{Kind, Receiver, Record, Role, Sender, decode};
    let (mut c, _dp) = controller();
    c = c.with_sync(Role::Backup, sa("192.0.2.2:7000"));
    c.service_add(sa(VIP), Proto::Tcp, &ServiceOptions::default()).expect("service");
    c.backend_add(sa(VIP), None, be(2), None).expect("backend");
    let key = b"0123456789abcdef0123456789abcdef";
    let f = flow(4000, 0, tcp::STATE_ESTABLISHED, 5);
    let peer_backend = backend_ref(2);
    let live = Record { kind: Kind::Live, idle: Duration::ZERO, flow: f.end_record(lb_common::maps::end_reason::NEW, &peer_backend) };
    let end = Record { kind: Kind::End, idle: Duration::ZERO, flow: f.end_record(lb_common::maps::end_reason::FIN, &peer_backend) };
    let mut peer = Sender::start();
    let (first, second) = (peer.seal(key, &[live]), peer.seal(key, &[end]));
    // The daemon's receiving path: decode, admit, install what was admitted.
    let mut receiver = Receiver::default();
    let mut deliver = |c: &mut Ctl, bytes: &[u8]| {
        let d = decode(key, bytes).expect("authentic");
        if let Ok(records) = receiver.admit(&d, Instant::now(), crate::ha::unix_ns()) {
            c.sync_install(&records).expect("install");
        }
    };
    deliver(&mut c, &first);
    assert!(c.table().get(&f.key).is_some(), "installed");
    deliver(&mut c, &second);
    assert!(c.table().get(&f.key).is_none(), "ended");
    // The first datagram again (captured and replayed): refused, so the
    // ended flow does not come back.
    deliver(&mut c, &first);
    assert!(c.table().get(&f.key).is_none(), "a replay must not resurrect the flow");
    let mut figures = crate::ha::SyncStatus::default();
    receiver.report(&mut figures);
    assert_eq!(figures.replayed_datagrams, 1);
}

#[test]
fn the_port_filter_has_a_bit_for_every_service_and_endpoint_before_its_entry() {
    use lb_common::maps::{FILTER_ENDPOINT, FILTER_SERVICE, PROTO_TCP};
    let (mut c, dp) = controller();
    let port = |p: u16| u16::from_ne_bytes(p.to_be_bytes());
    c.service_add(sa(VIP), Proto::Tcp, &ServiceOptions::default()).expect("service");
    assert!(dp.state().port_filter.contains(FILTER_SERVICE, PROTO_TCP, port(sa(VIP).port())), "the service's port");
    assert!(!dp.state().port_filter.contains(FILTER_SERVICE, PROTO_TCP, port(sa(VIP).port() + 1)));
    c.backend_add(sa(VIP), Some(Proto::Tcp), be(1), None).expect("backend");
    assert!(dp.state().port_filter.contains(FILTER_ENDPOINT, PROTO_TCP, port(be(1).port())), "the backend's port");
    // Removed and freed (no flows): the bit goes with the endpoint.
    let id = backend_id(&c, be(1));
    c.backend_remove(sa(VIP), Some(Proto::Tcp), be(1)).expect("remove");
    // What the reset worker does with the (empty) job, then two snapshots
    // with no flow of it: the id is freed.
    let table = c.table();
    for job in c.take_jobs() {
        let mut outcomes = Vec::new();
        crate::resets::run(&table, None, &job, &mut |o| outcomes.push(o));
        for o in outcomes {
            c.on_reset(o, Some(id));
        }
    }
    for _ in 0..3 {
        let _ = snapshot(&mut c);
    }
    assert!(dp.state().endpoints.is_empty(), "the backend was freed: its endpoint went");
    assert!(!dp.state().port_filter.contains(FILTER_ENDPOINT, PROTO_TCP, port(be(1).port())), "and its bit with it");
    assert!(dp.state().port_filter.contains(FILTER_SERVICE, PROTO_TCP, port(sa(VIP).port())), "the service's stays");
}

#[test]
fn status_reports_every_icmp_kind_and_outcome_from_its_own_counter() {
    use lb_common::icmp;
    let (c, dp) = controller();
    let too_big_in = lb_common::stats::icmp_error(icmp::KIND_TOO_BIG, icmp::OUTCOME_TO_BACKEND);
    let unreach_out = lb_common::stats::icmp_error(icmp::KIND_UNREACHABLE, icmp::OUTCOME_TO_CLIENT);
    dp.state().counters[too_big_in as usize] = 3;
    dp.state().counters[unreach_out as usize] = 7;
    let s = c.status().expect("status");
    assert_eq!(s.icmp_errors.len(), icmp::KINDS.len());
    assert!(s.icmp_errors.values().all(|o| o.len() == icmp::OUTCOMES.len()), "{:?}", s.icmp_errors);
    assert_eq!(s.icmp_errors["too_big"]["to_backend"], 3);
    assert_eq!(s.icmp_errors["unreachable"]["to_client"], 7);
    let total: u64 = s.icmp_errors.values().flat_map(|o| o.values()).sum();
    assert_eq!(total, 10, "no other pair reads these counters: {:?}", s.icmp_errors);
}

#[test]
fn evictions_are_counted_as_of_the_last_walk_so_a_burst_since_is_not_taken_for_them() {
    let (mut c, dp) = controller();
    c.service_add(sa(VIP), Proto::Tcp, &options(|_| {})).expect("service");
    c.backend_add(sa(VIP), None, be(1), None).expect("backend");
    let id = backend_id(&c, be(1));
    let evictions = |c: &Ctl| c.status().expect("status").counters["table_evictions"];
    let created = lb_common::stats::ENTRIES_CREATED as usize;
    snapshot(&mut c);
    // A burst of 300 new entries after that walk: the table has them, the
    // snapshot does not yet.
    for i in 0..300u16 {
        c.table().put(flow(2000 + i, id, tcp::STATE_ESTABLISHED, NOW));
    }
    dp.state().counters[created] += 300;
    assert_eq!(evictions(&c), 0, "the burst is not evictions before the next walk");
    snapshot(&mut c);
    assert_eq!(evictions(&c), 0, "the walk found all 300");
    // 120 of them leave without anyone removing them: the LRU's doing.
    {
        let mut st = dp.state();
        let gone: Vec<_> = st.flows.keys().take(120).cloned().collect();
        for k in gone {
            st.flows.remove(&k);
        }
    }
    assert_eq!(evictions(&c), 0, "not seen before a walk");
    snapshot(&mut c);
    assert_eq!(evictions(&c), 120);
}

#[test]
fn an_mss_clamp_on_a_udp_service_is_refused_and_changes_nothing() {
    let (mut c, _dp) = controller();
    let clamp = options(|o| o.mss_clamp = Some(1400));
    let err = c.service_add(sa(VIP), Proto::Udp, &clamp).expect_err("UDP with a clamp");
    assert!(err.to_string().contains("TCP services only"), "{err}");
    assert!(c.status().expect("status").services.is_empty(), "nothing added");
    c.service_add(sa(VIP), Proto::Udp, &options(|_| {})).expect("plain UDP");
    let err = c.service_set(sa(VIP), Some(Proto::Udp), &clamp).expect_err("set on UDP");
    assert!(err.to_string().contains("TCP services only"), "{err}");
    c.service_add(sa(VIP), Proto::Tcp, &clamp).expect("TCP with a clamp");
}
