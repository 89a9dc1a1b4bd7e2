//! Everything this benchmark assumes about xlb itself, in one place: how
//! it is loaded and configured (its own library API, as `xlb-bench` and the
//! fixtures do it), what a flow's handshake looks like on the wire, what its
//! counters are called, and how its flow table is laid out. The timing code
//! uses only what is here, so when xlb's data plane changes (the table,
//! what a SYN writes, when a flow is promoted), this is the file to adjust,
//! and the functions marked "LAYOUT" are the ones that encode the current
//! layout.
//!
//! Today's layout: one entry per flow (`FlowState`, 80 bytes, keyed by the
//! client → VIP `FlowKey`, 40 bytes), in `XLB_CONNS` once confirmed and in
//! `XLB_HALF_OPEN` before. A SYN of a Maglev DNAT service whose backends
//! are its own (`SVC_F_STATELESS_SYN`, the default service here) is
//! scheduled by hash and writes nothing (`stateless_syn`); the backend's
//! SYN-ACK creates the half-open entry and the client's ACK of it promotes
//! the flow. A SYN of a service that shares a backend with another one
//! (`SVC_F_SHARED_BACKENDS`) is checked for a collision and enters the
//! half-open table: the stateful SYN path, timed on its own row.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsFd as _,
};

use anyhow::Context as _;
use aya::{maps::MapData, programs::Xdp};
use lb_common::maps::{FlowKey, FlowState, names};
use testbed::flows;
use xlb::{
    api::Proto,
    controller::Controller,
    dataplane::{DataPlane as _, FlowTable as _, KernelDataPlane, LoadOptions, batch},
};

use crate::{
    Checks,
    pkt::{self, Buf, FRAME_LEN, OUT_LEN, Seg, TCP_ACK, TCP_SYN, XDP_REDIRECT, rd16, rd32},
    rig::{self, BACKEND_ISN, CLIENT_ISN, CLIENT_MAC, ROUTER_MAC, T0_MAC, T1_MAC, VIP_PORT},
};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const BACKENDS: [Ipv4Addr; 3] = [Ipv4Addr::new(10, 1, 1, 2), Ipv4Addr::new(10, 1, 1, 3), Ipv4Addr::new(10, 1, 1, 4)];
pub const BACKEND_PORT: u16 = 8080;
/// The stateful-SYN service (timed): Maglev DNAT like `VIP`'s, but its
/// backends (the same three hosts, port [`SHARED_BACKEND_PORT`]) also
/// serve [`VIP_SHARED_PEER`], so the controller marks both
/// `SVC_F_SHARED_BACKENDS` and their SYNs create half-open flows.
pub const VIP_SHARED: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// The other service of those backends (never timed).
pub const VIP_SHARED_PEER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 3);
pub const SHARED_BACKEND_PORT: u16 = 8081;

/// The rig's permanent neighbour entry of a backend.
pub fn backend_mac(b: Ipv4Addr) -> [u8; 6] {
    [2, 0, 0, 0, 1, b.octets()[3]]
}

pub struct Xlb {
    ctl: Controller<KernelDataPlane>,
    t0: u32,
    t1: u32,
    /// The controller's ids of `VIP`'s backends, in `BACKENDS` order.
    backend_ids: [u32; 3],
    /// Descriptors of the two flow tables (found through the program's
    /// maps): batched writes and walks of one table only.
    conns: MapData,
    half_open: MapData,
}

/// Loads xlb as the daemon does by default (1,048,576 flows; the half-open
/// capacity left to its default rule), makes t0 and t1 redirect targets,
/// and adds 10.99.0.1:80/tcp with default options (DNAT, Maglev) and three
/// backends 10.1.1.2-4:8080: the calls `xlb-bench` makes. Then the two
/// shared-backend services (10.99.0.2 and .3:80/tcp, backends
/// 10.1.1.2-4:8081) of the stateful SYN row. No daemon runs, so no expiry
/// walk touches the tables while they are timed. The calling thread must be
/// in the rig's namespace.
pub fn load(t0: u32, t1: u32) -> anyhow::Result<Xlb> {
    let mut dp = KernelDataPlane::load(LoadOptions { conn_capacity: lb_common::maps::DEFAULT_CONN_CAPACITY, half_open_capacity: None, pin_dir: None })
        .context("loading xlb's data plane")?;
    dp.add_redirect_target(t0).context("t0 as a redirect target")?;
    dp.add_redirect_target(t1).context("t1 as a redirect target")?;
    let mut ctl = Controller::new(dp);
    let vip = SocketAddr::from((VIP, VIP_PORT));
    ctl.service_add(vip, Proto::Tcp, &Default::default()).context("adding xlb's service")?;
    let mut backend_ids = [0u32; 3];
    for (i, b) in BACKENDS.into_iter().enumerate() {
        let (_, id) = ctl.backend_add(vip, Some(Proto::Tcp), SocketAddr::from((b, BACKEND_PORT)), None).with_context(|| format!("adding backend {b}"))?;
        backend_ids[i] = id;
    }
    for v in [VIP_SHARED, VIP_SHARED_PEER] {
        let vip = SocketAddr::from((v, VIP_PORT));
        ctl.service_add(vip, Proto::Tcp, &Default::default()).with_context(|| format!("adding the shared-backend service {v}"))?;
        for b in BACKENDS {
            ctl.backend_add(vip, Some(Proto::Tcp), SocketAddr::from((b, SHARED_BACKEND_PORT)), None)
                .with_context(|| format!("adding backend {b}:{SHARED_BACKEND_PORT} to {v}"))?;
        }
    }
    let (conns, half_open) = {
        // (The full program uses every map; the entry only the established path's.)
        let prog = ctl.dataplane().full_program().context("xlb's full program")?;
        let ids = prog.info().context("xlb's program info")?.map_ids().context("xlb's map ids")?.unwrap_or_default();
        let (mut conns, mut half_open) = (None, None);
        for id in ids {
            let m = MapData::from_id(id).with_context(|| format!("opening map {id}"))?;
            match m.info().context("map info")?.name_as_str() {
                Some(names::CONNS) => conns = Some(m),
                Some(names::HALF_OPEN) => half_open = Some(m),
                _ => {}
            }
        }
        (conns.context("xlb's program uses no XLB_CONNS")?, half_open.context("xlb's program uses no XLB_HALF_OPEN")?)
    };
    Ok(Xlb { ctl, t0, t1, backend_ids, conns, half_open })
}

/// xlb's global counters by label (`lb_common::stats::LABELS`).
#[derive(Clone, Debug, Default)]
pub struct Counters(BTreeMap<&'static str, u64>);

impl Counters {
    /// How much counter `label` moved since `before`; `None` if xlb has no
    /// such counter (any more).
    pub fn delta(&self, before: &Counters, label: &str) -> Option<u64> {
        Some(self.0.get(label)?.wrapping_sub(*before.0.get(label)?))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!(self.0)
    }
}

/// Flows in xlb's tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub established: u64,
    pub half_open: u64,
}

/// The sequence of a flow's handshake, as a real connection has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    ClientSyn,
    BackendSynAck,
    ClientAck,
}

/// The kernel memory of xlb's connection table, per flow.
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    /// `memlock` of `XLB_CONNS` (preallocated LRU hash).
    pub memlock: u64,
    /// Its capacity, in flows.
    pub capacity: u32,
    /// Key and value bytes of one flow.
    pub key_value: u32,
}

impl Xlb {
    pub fn program(&mut self) -> anyhow::Result<&Xdp> {
        Ok(self.ctl.dataplane().program().context("xlb's program")?)
    }

    /// `xlb_full`, the entry's tail-call target (sizes only: never timed
    /// alone, it is what the entry hands over).
    pub fn full_program(&mut self) -> anyhow::Result<&Xdp> {
        Ok(self.ctl.dataplane().full_program().context("xlb's full program")?)
    }

    /// `xlb_pass` (returns XDP_PASS): the floor, timed like the others.
    pub fn floor(&mut self) -> anyhow::Result<&Xdp> {
        Ok(self.ctl.dataplane().pass_program().context("xlb's pass program")?)
    }

    pub fn counters(&mut self) -> anyhow::Result<Counters> {
        let v = self.ctl.dataplane().global_counters().context("reading xlb's counters")?;
        Ok(Counters(lb_common::stats::LABELS.iter().filter_map(|(i, l)| v.get(*i as usize).map(|n| (*l, *n))).collect()))
    }

    /// LAYOUT: xlb has a connection table and a half-open one, one entry
    /// per flow (both walked).
    pub fn table(&mut self) -> anyhow::Result<Table> {
        let (established, half_open) = self.ctl.dataplane().flow_counts().context("counting xlb's flows")?;
        Ok(Table { established, half_open })
    }

    /// LAYOUT: flows in the half-open table (walked alone: it is the table
    /// a SYN writes, counted around every SYN run).
    pub fn half_open_flows(&self) -> anyhow::Result<u64> {
        let mut n = 0u64;
        batch::for_each::<FlowKey, FlowState>(self.half_open.fd().as_fd(), 4096, |_, _| n += 1).context("walking xlb's half-open table")?;
        Ok(n)
    }

    /// LAYOUT: the kernel memory of the connection table per flow.
    pub fn memory(&mut self) -> Option<Memory> {
        let dp = self.ctl.dataplane();
        let memlock = dp.map_memory(names::CONNS)?;
        let key_value = (std::mem::size_of::<FlowKey>() + std::mem::size_of::<FlowState>()) as u32;
        Some(Memory { memlock, capacity: dp.capacity().0, key_value })
    }

    /// The segment of `step` of client `i`'s flow to the VIP (`backend`:
    /// where its SYN went, for the backend's SYN-ACK).
    pub fn segment(i: u64, step: Step, backend: Ipv4Addr) -> Seg {
        let c = rig::client(i);
        match step {
            Step::ClientSyn => Seg { dst_mac: T0_MAC, src_mac: CLIENT_MAC, src: c, dst: (VIP, VIP_PORT), flags: TCP_SYN, seq: CLIENT_ISN, ack: 0 },
            Step::BackendSynAck => Seg {
                dst_mac: T1_MAC,
                src_mac: backend_mac(backend),
                src: (backend, BACKEND_PORT),
                dst: c,
                flags: TCP_SYN | TCP_ACK,
                seq: BACKEND_ISN,
                ack: CLIENT_ISN + 1,
            },
            Step::ClientAck => {
                Seg { dst_mac: T0_MAC, src_mac: CLIENT_MAC, src: c, dst: (VIP, VIP_PORT), flags: TCP_ACK, seq: CLIENT_ISN + 1, ack: BACKEND_ISN + 1 }
            }
        }
    }

    /// Establishes client `i`'s flow the way a connection does, valid for
    /// any table design: the client's SYN; the backend's SYN-ACK (its own
    /// ISN, acknowledging the client's), from the backend the SYN went to
    /// (read from the SYN's output frame); the client's ACK of it. Every
    /// output frame is decoded. Returns that backend, or what was wrong.
    pub fn handshake(&mut self, i: u64) -> anyhow::Result<Result<Ipv4Addr, String>> {
        let (t0, t1) = (self.t0, self.t1);
        let prog = self.program()?;
        let mut out = [0u8; OUT_LEN];
        let syn = Self::segment(i, Step::ClientSyn, BACKENDS[0]).frame();
        let r = pkt::run(prog, t0, &syn, &mut out)?;
        let backend = match check_to_backend(&syn, &out, r) {
            Ok(b) => b,
            Err(e) => return Ok(Err(format!("flow {i}, client SYN: {e}"))),
        };
        let syn_ack = Self::segment(i, Step::BackendSynAck, backend).frame();
        let r = pkt::run(prog, t1, &syn_ack, &mut out)?;
        if let Err(e) = check_to_client(&syn_ack, &out, r) {
            return Ok(Err(format!("flow {i}, backend SYN-ACK: {e}")));
        }
        let ack = Self::segment(i, Step::ClientAck, backend).frame();
        let r = pkt::run(prog, t0, &ack, &mut out)?;
        Ok(match check_to_backend(&ack, &out, r) {
            Ok(b) if b == backend => Ok(backend),
            Ok(b) => Err(format!("flow {i}: the SYN went to {backend}, the ACK to {b}")),
            Err(e) => Err(format!("flow {i}, client ACK: {e}")),
        })
    }

    /// LAYOUT. One SYN down each SYN path, decoded, with what it wrote:
    /// client `i`'s SYN to `VIP` (stateless: XDP_REDIRECT to a backend,
    /// `stateless_syn` +1, nothing created), then its SYN to `VIP_SHARED`
    /// (DNAT to a backend's port 8081, one new half-open flow). The
    /// half-open flow is removed again.
    pub fn verify_syn_paths(&mut self, checks: &mut Checks, i: u64) -> anyhow::Result<()> {
        let t0 = self.t0;
        let mut out = [0u8; OUT_LEN];
        for (vip, port) in [(VIP, BACKEND_PORT), (VIP_SHARED, SHARED_BACKEND_PORT)] {
            let stateless = vip == VIP;
            let (before, t_before) = (self.counters()?, self.table()?);
            let syn = Seg { dst_mac: T0_MAC, src_mac: CLIENT_MAC, src: rig::client(i), dst: (vip, VIP_PORT), flags: TCP_SYN, seq: CLIENT_ISN, ack: 0 }.frame();
            let r = pkt::run(self.program()?, t0, &syn, &mut out)?;
            let what = if stateless { "stateless SYN" } else { "stateful SYN (shared backends)" };
            match check_to_backend_port(&syn, &out, r, port) {
                Ok(b) => eprintln!("  xlb, {what} to {vip}: XDP_REDIRECT, DNAT to {b}:{port}, TTL 63, checksums valid"),
                Err(e) => checks.expect(false, || format!("xlb, {what} to {vip}: {e}")),
            }
            let (after, t_after) = (self.counters()?, self.table()?);
            let created = if stateless { 0 } else { 1 };
            expect_delta(checks, &before, &after, "stateless_syn", 1 - created);
            expect_delta(checks, &before, &after, "new_flows", created);
            expect_delta(checks, &before, &after, "entries_created", created);
            checks.expect(t_after == Table { established: t_before.established, half_open: t_before.half_open + created }, || {
                format!("xlb, {what}: tables {t_before:?} -> {t_after:?}, want +{created} half-open")
            });
        }
        self.make_room_for_syns()?;
        Ok(())
    }

    /// LAYOUT. Writes the established flows `1..flows` (flow 0 has had its
    /// handshake) straight into the connection table, batched: the entry
    /// `flows::established` makes (service id 0, the first service; flow
    /// `f` to backend `f % 3`, by the id the controller returned; the
    /// client sent up to `CLIENT_ISN + 1`, the backend up to `BACKEND_ISN +
    /// 1`, as after the handshake; stamped with the data plane's jiffies).
    /// Returns each flow's backend (index into `BACKENDS`; flow 0's: where
    /// its entry says).
    pub fn fill_established(&mut self, flows: u64) -> anyhow::Result<Vec<u8>> {
        let vip = SocketAddr::from((VIP, VIP_PORT));
        let client = |f: u64| SocketAddr::from(rig::client(f));
        let flow0 = self.ctl.dataplane().flow_get(&flows::key(client(0), vip, lb_common::maps::PROTO_TCP)).context("reading flow 0")?;
        let flow0 = flow0.filter(|f| !f.half_open).context("flow 0 is not established")?;
        let service_id = flow0.state.service_id as u32;
        anyhow::ensure!(service_id == 0, "flow 0's service id is {service_id}, want 0 (the first service)");
        let mut of = vec![u8::MAX; flows as usize];
        of[0] = self.backend_ids.iter().position(|id| *id == u32::from(flow0.state.backend_id)).unwrap_or(usize::MAX) as u8;
        let now = self.ctl.dataplane().now().context("the data plane's clock")?;
        let (mut keys, mut values) = (Vec::with_capacity(1 << 16), Vec::with_capacity(1 << 16));
        for f in 1..flows {
            let b = (f % 3) as usize;
            let (k, v) = flows::established(client(f), vip, service_id, self.backend_ids[b], (CLIENT_ISN + 1, BACKEND_ISN + 1), now);
            keys.push(k);
            values.push(v);
            of[f as usize] = b as u8;
            if keys.len() == 1 << 16 || f + 1 == flows {
                batch::update_many(self.conns.fd().as_fd(), &keys, &values).context("writing established flows")?;
                keys.clear();
                values.clear();
            }
        }
        Ok(of)
    }

    /// LAYOUT. Makes room for the SYN cases: removes every half-open flow
    /// (the table a stateful SYN writes; a stateless one writes none).
    /// Returns the flows removed.
    pub fn make_room_for_syns(&mut self) -> anyhow::Result<usize> {
        let mut keys = Vec::new();
        batch::for_each::<FlowKey, FlowState>(self.half_open.fd().as_fd(), 4096, |k, _| keys.push(*k)).context("walking xlb's half-open table")?;
        let removed = if keys.is_empty() { 0 } else { self.ctl.table().remove_keys(&keys).context("emptying xlb's half-open table")? };
        let left = self.half_open_flows()?;
        anyhow::ensure!(left == 0, "emptying the half-open table: {left} flows left");
        Ok(removed)
    }

    /// LAYOUT. How many fresh stateful SYNs (to `VIP_SHARED`) fill the
    /// half-open table: its capacity in flows, plus 10% (it is an LRU: past
    /// its capacity every new SYN evicts).
    pub fn syns_to_fill(&mut self) -> u64 {
        let (_, half_open_flows) = self.ctl.dataplane().capacity();
        u64::from(half_open_flows) + u64::from(half_open_flows) / 10
    }

    /// LAYOUT: what a flow leaves in the tables: one entry, in the
    /// half-open table until its handshake completes, then in the
    /// connection table.
    pub const ENTRIES_PER_FLOW: u64 = 1;

    /// LAYOUT. After flow 0's handshake: its SYN wrote nothing (stateless),
    /// the backend's SYN-ACK created the flow (half-open), the client's ACK
    /// promoted it.
    pub fn expect_flow0(&mut self, checks: &mut Checks, before: &Counters, after: &Counters, table: Table) {
        expect_delta(checks, before, after, "stateless_syn", 1);
        expect_delta(checks, before, after, "new_flows", 1);
        expect_delta(checks, before, after, "entries_created", 1);
        expect_delta(checks, before, after, "promoted", 1);
        checks.expect(table == Table { established: Self::ENTRIES_PER_FLOW, half_open: 0 }, || format!("xlb after flow 0's handshake: {table:?}"));
    }

    /// LAYOUT. After `flows` flows: all established, none half-open.
    pub fn expect_established(&mut self, checks: &mut Checks, flows: u64, table: Table) {
        checks.expect(table == Table { established: flows * Self::ENTRIES_PER_FLOW, half_open: 0 }, || {
            format!("xlb after establishing {flows} flows: {table:?}, want {} established entries and none half-open", flows * Self::ENTRIES_PER_FLOW)
        });
    }

    /// `calls` ACKs of established flows: every one found, in its window,
    /// and redirected; nothing created.
    pub fn expect_acks(&mut self, checks: &mut Checks, before: &Counters, after: &Counters, calls: u64) {
        for c in [
            "new_flows",
            "entries_created",
            "stateless_syn",
            "rst_miss",
            "pass_no_flow",
            "rehashed",
            "tcp_out_of_window",
            "tcp_invalid",
            "handshake_unverified",
        ] {
            expect_delta(checks, before, after, c, 0);
        }
        expect_delta(checks, before, after, "redirect", calls);
    }

    /// `calls` ACKs with partial checksums: as [`Xlb::expect_acks`], each
    /// one recognised as partial (and completed: decoded once, before).
    pub fn expect_partial_acks(&mut self, checks: &mut Checks, before: &Counters, after: &Counters, calls: u64) {
        self.expect_acks(checks, before, after, calls);
        expect_delta(checks, before, after, "csum_partial", calls);
        expect_delta(checks, before, after, "pass_csum_too_long", 0);
    }

    /// LAYOUT. A run of `calls` fresh SYNs to `VIP`: all stateless (each
    /// counted `stateless_syn`), nothing created, the half-open table
    /// unchanged (`counters`, `half`: the counters and the half-open table's
    /// flows before and after).
    pub fn expect_stateless_syns(&mut self, checks: &mut Checks, what: &str, counters: (&Counters, &Counters), calls: u64, half: (u64, u64)) {
        let (before, after) = counters;
        expect_delta(checks, before, after, "stateless_syn", calls);
        expect_delta(checks, before, after, "redirect", calls);
        for c in ["new_flows", "entries_created", "drop_table_full"] {
            expect_delta(checks, before, after, c, 0);
        }
        checks.expect(half.1 == half.0, || format!("{what}: xlb's stateless SYNs changed the half-open table: {} -> {} flows", half.0, half.1));
    }

    /// LAYOUT. A run of `calls` fresh SYNs to `VIP_SHARED`: each one new
    /// half-open flow, none refused; with room (`full` false) the
    /// half-open table grew by `calls`, full it stayed full (each SYN
    /// evicted one).
    pub fn expect_stateful_syns(&mut self, checks: &mut Checks, what: &str, counters: (&Counters, &Counters), calls: u64, half: (u64, u64), full: bool) {
        let (before, after) = counters;
        for c in ["new_flows", "entries_created", "redirect"] {
            expect_delta(checks, before, after, c, calls);
        }
        for c in ["stateless_syn", "drop_table_full", "refused_collision"] {
            expect_delta(checks, before, after, c, 0);
        }
        if full {
            self.expect_full(checks, half.1);
        } else {
            checks.expect(half.1 == half.0 + calls * Self::ENTRIES_PER_FLOW, || {
                format!("{what}: xlb's half-open table went {} -> {} flows over {calls} stateful SYNs", half.0, half.1)
            });
        }
    }

    /// LAYOUT. "Full": the half-open table is at capacity (within the LRU's
    /// slack), so each new stateful SYN evicts the oldest half-open flow.
    pub fn expect_full(&mut self, checks: &mut Checks, half_open: u64) {
        let (_, half_open_flows) = self.ctl.dataplane().capacity();
        let cap = u64::from(half_open_flows) * Self::ENTRIES_PER_FLOW;
        checks.expect(half_open >= cap - cap / 25, || format!("xlb's half-open table is not full: {half_open} of {cap} entries"));
    }

    /// LAYOUT. A SYN flood into the full table churns only the half-open
    /// table: the established flows stay, nothing is refused.
    pub fn expect_flood(&mut self, checks: &mut Checks, before: &Counters, after: &Counters, table_before: Table, table_after: Table) {
        expect_delta(checks, before, after, "drop_table_full", 0);
        checks.expect(table_after.established == table_before.established, || {
            format!("xlb's established table changed during the SYN flood: {} -> {} entries", table_before.established, table_after.established)
        });
    }
}

fn expect_delta(checks: &mut Checks, before: &Counters, after: &Counters, label: &str, want: u64) {
    match after.delta(before, label) {
        Some(d) => checks.expect(d == want, || format!("xlb counter {label} moved by {d}, want {want}")),
        None => checks.note(format!("xlb has no counter {label}: that check is skipped")),
    }
}

fn verdict_is(r: pkt::Ran, want: u32) -> Result<(), String> {
    if r.verdict == want { Ok(()) } else { Err(format!("verdict {}, want {}", pkt::verdict_name(r.verdict), pkt::verdict_name(want))) }
}

/// A client's segment to the VIP, as xlb sends it on: XDP_REDIRECT, DNAT to
/// a backend (address, port 8080 (`BACKEND_PORT`), its neighbour's MAC, t1's MAC as the
/// source), client address and port kept, TTL 63, valid IPv4 and TCP
/// checksums, sequence numbers and flags unchanged. Returns the backend.
pub fn check_to_backend(input: &Buf, out: &[u8; OUT_LEN], r: pkt::Ran) -> Result<Ipv4Addr, String> {
    check_to_backend_port(input, out, r, BACKEND_PORT)
}

/// As [`check_to_backend`], to the backends' port `port`.
pub fn check_to_backend_port(input: &Buf, out: &[u8; OUT_LEN], r: pkt::Ran, port: u16) -> Result<Ipv4Addr, String> {
    verdict_is(r, XDP_REDIRECT)?;
    if r.len != FRAME_LEN {
        return Err(format!("{} bytes out, want {FRAME_LEN}", r.len));
    }
    let dst = rd32(&out[30..34]);
    let mut bad = Vec::new();
    if !BACKENDS.contains(&dst) {
        bad.push(format!("destination {dst} is not a backend"));
    } else if out[0..6] != backend_mac(dst) {
        bad.push("destination MAC is not the backend's neighbour entry".to_owned());
    }
    if out[6..12] != T1_MAC {
        bad.push("source MAC is not t1's".to_owned());
    }
    if rd16(&out[36..38]) != port {
        bad.push(format!("destination port {}", rd16(&out[36..38])));
    }
    common_checks(input, out, &mut bad);
    if out[26..30] != input[26..30] || out[34..36] != input[34..36] {
        bad.push("the client's address or port changed".to_owned());
    }
    if bad.is_empty() { Ok(dst) } else { Err(bad.join("; ")) }
}

/// A backend's segment to a client, as xlb sends it on: XDP_REDIRECT, from
/// the VIP:80, to the client through the router (its MAC, t0's as the
/// source), TTL 63, valid checksums, sequence numbers and flags unchanged.
pub fn check_to_client(input: &Buf, out: &[u8; OUT_LEN], r: pkt::Ran) -> Result<(), String> {
    verdict_is(r, XDP_REDIRECT)?;
    if r.len != FRAME_LEN {
        return Err(format!("{} bytes out, want {FRAME_LEN}", r.len));
    }
    let mut bad = Vec::new();
    if rd32(&out[26..30]) != VIP || rd16(&out[34..36]) != VIP_PORT {
        bad.push(format!("source {}:{}, want the VIP", rd32(&out[26..30]), rd16(&out[34..36])));
    }
    if out[30..34] != input[30..34] || out[36..38] != input[36..38] {
        bad.push("the client's address or port changed".to_owned());
    }
    if out[0..6] != ROUTER_MAC {
        bad.push("destination MAC is not the router's".to_owned());
    }
    if out[6..12] != T0_MAC {
        bad.push("source MAC is not t0's".to_owned());
    }
    common_checks(input, out, &mut bad);
    if bad.is_empty() { Ok(()) } else { Err(bad.join("; ")) }
}

fn common_checks(input: &Buf, out: &[u8; OUT_LEN], bad: &mut Vec<String>) {
    if out[22] != 63 {
        bad.push(format!("TTL {}, want 63", out[22]));
    }
    if !testbed::packet::checksums_valid(&out[..FRAME_LEN], 14) {
        bad.push("IPv4 or TCP checksum".to_owned());
    }
    // Sequence, acknowledgement, data offset and flags.
    if out[38..48] != input[38..48] {
        bad.push("sequence numbers or flags changed".to_owned());
    }
}
