//! Everything this benchmark assumes about xlb itself, in one place: how
//! it is loaded and configured (its own library API, as `xlb-bench` and the
//! fixtures do it), what a flow's handshake looks like on the wire, what its
//! counters are called, and how its connection table is laid out. The
//! timing code uses only what is here, so when xlb's data plane changes
//! (the table, what a SYN writes, when a flow is promoted), this is the file
//! to adjust, and the functions marked "LAYOUT" are the ones that encode the
//! current layout.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
};

use anyhow::Context as _;
use aya::programs::Xdp;
use xlb::{
    api::Proto,
    controller::Controller,
    dataplane::{DataPlane as _, FlowTable as _, KernelDataPlane, LoadOptions},
};

use crate::{
    Checks,
    pkt::{self, Buf, FRAME_LEN, OUT_LEN, Seg, TCP_ACK, TCP_SYN, XDP_REDIRECT, rd16, rd32},
    rig::{self, BACKEND_ISN, CLIENT_ISN, CLIENT_MAC, ROUTER_MAC, T0_MAC, T1_MAC, VIP_PORT},
};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const BACKENDS: [Ipv4Addr; 3] = [Ipv4Addr::new(10, 1, 1, 2), Ipv4Addr::new(10, 1, 1, 3), Ipv4Addr::new(10, 1, 1, 4)];
pub const BACKEND_PORT: u16 = 8080;

/// The rig's permanent neighbour entry of a backend.
pub fn backend_mac(b: Ipv4Addr) -> [u8; 6] {
    [2, 0, 0, 0, 1, b.octets()[3]]
}

pub struct Xlb {
    ctl: Controller<KernelDataPlane>,
    t0: u32,
    t1: u32,
}

/// Loads xlb as the daemon does by default (1,048,576 flows; the half-open
/// capacity left to its default rule), makes t0 and t1 redirect targets,
/// and adds 10.99.0.1:80/tcp with default options (DNAT, Maglev) and three
/// backends 10.1.1.2-4:8080: the calls `xlb-bench` makes. No daemon runs, so
/// no expiry walk touches the tables while they are timed. The calling
/// thread must be in the rig's namespace.
pub fn load(t0: u32, t1: u32) -> anyhow::Result<Xlb> {
    let mut dp = KernelDataPlane::load(LoadOptions { conn_capacity: lb_common::maps::DEFAULT_CONN_CAPACITY, half_open_capacity: None, pin_dir: None })
        .context("loading xlb's data plane")?;
    dp.add_redirect_target(t0).context("t0 as a redirect target")?;
    dp.add_redirect_target(t1).context("t1 as a redirect target")?;
    let mut ctl = Controller::new(dp);
    let vip = SocketAddr::from((VIP, VIP_PORT));
    ctl.service_add(vip, Proto::Tcp, &Default::default()).context("adding xlb's service")?;
    for b in BACKENDS {
        ctl.backend_add(vip, Some(Proto::Tcp), SocketAddr::from((b, BACKEND_PORT)), None).with_context(|| format!("adding backend {b}"))?;
    }
    Ok(Xlb { ctl, t0, t1 })
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

/// Entries in xlb's tables.
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

impl Xlb {
    pub fn program(&mut self) -> anyhow::Result<&Xdp> {
        Ok(self.ctl.dataplane().program().context("xlb's program")?)
    }

    /// `xlb_pass` (returns XDP_PASS): the floor, timed like the others.
    pub fn floor(&mut self) -> anyhow::Result<&Xdp> {
        Ok(self.ctl.dataplane().pass_program().context("xlb's pass program")?)
    }

    pub fn counters(&mut self) -> anyhow::Result<Counters> {
        let v = self.ctl.dataplane().global_counters().context("reading xlb's counters")?;
        Ok(Counters(lb_common::stats::LABELS.iter().filter_map(|(i, l)| v.get(*i as usize).map(|n| (*l, *n))).collect()))
    }

    /// LAYOUT: xlb has an established table and a half-open one.
    pub fn table(&mut self) -> anyhow::Result<Table> {
        let (established, half_open) = self.ctl.dataplane().flow_entry_counts().context("counting xlb's flow entries")?;
        Ok(Table { established, half_open })
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
    /// (read from the SYN's output frame); the client's ACK of it. Returns
    /// that backend, or what was wrong: with `check`, every output frame is
    /// decoded; without, only the verdicts and the SYN's destination.
    pub fn handshake(&mut self, i: u64, check: bool) -> anyhow::Result<Result<Ipv4Addr, String>> {
        let (t0, t1) = (self.t0, self.t1);
        let prog = self.program()?;
        let mut out = [0u8; OUT_LEN];
        let syn = Self::segment(i, Step::ClientSyn, BACKENDS[0]).frame();
        let r = pkt::run(prog, t0, &syn, &mut out)?;
        let backend = if check {
            match check_to_backend(&syn, &out, r) {
                Ok(b) => b,
                Err(e) => return Ok(Err(format!("flow {i}, client SYN: {e}"))),
            }
        } else {
            let b = rd32(&out[30..34]);
            if r.verdict != XDP_REDIRECT || !BACKENDS.contains(&b) {
                return Ok(Err(format!("flow {i}, client SYN: {} to {b}", pkt::verdict_name(r.verdict))));
            }
            b
        };
        let syn_ack = Self::segment(i, Step::BackendSynAck, backend).frame();
        let r = pkt::run(prog, t1, &syn_ack, &mut out)?;
        let res = if check { check_to_client(&syn_ack, &out, r).map(|_| ()) } else { verdict_is(r, XDP_REDIRECT) };
        if let Err(e) = res {
            return Ok(Err(format!("flow {i}, backend SYN-ACK: {e}")));
        }
        let ack = Self::segment(i, Step::ClientAck, backend).frame();
        let r = pkt::run(prog, t0, &ack, &mut out)?;
        let res = if check { check_to_backend(&ack, &out, r) } else { verdict_is(r, XDP_REDIRECT).map(|()| rd32(&out[30..34])) };
        Ok(match res {
            Ok(b) if b == backend => Ok(backend),
            Ok(b) => Err(format!("flow {i}: the SYN went to {backend}, the ACK to {b}")),
            Err(e) => Err(format!("flow {i}, client ACK: {e}")),
        })
    }

    /// LAYOUT. Makes room for the `syn` case: removes every half-open
    /// flow (the table a SYN writes). Returns the entries removed.
    pub fn make_room_for_syns(&mut self) -> anyhow::Result<usize> {
        let mut keys = Vec::new();
        self.ctl
            .dataplane()
            .for_each_flow_tagged(|half_open, k, _| {
                if half_open {
                    keys.push(*k)
                }
            })
            .context("walking xlb's half-open table")?;
        let before = self.table()?;
        let removed = if keys.is_empty() { 0 } else { self.ctl.table().remove_keys(&keys).context("emptying xlb's half-open table")? };
        let after = self.table()?;
        anyhow::ensure!(after == Table { established: before.established, half_open: 0 }, "emptying the half-open table: {before:?} -> {after:?}");
        Ok(removed)
    }

    /// LAYOUT. How many fresh SYNs fill the table a SYN writes: the
    /// half-open table's capacity in flows, plus 10% (it is an LRU: past
    /// its capacity every new SYN evicts).
    pub fn syns_to_fill(&mut self) -> u64 {
        let (_, half_open_flows) = self.ctl.dataplane().capacity();
        u64::from(half_open_flows) + u64::from(half_open_flows) / 10
    }

    /// LAYOUT: what a flow leaves in the tables. Today: two entries (one per
    /// direction) in the established table once promoted, two in the
    /// half-open table from its SYN until then.
    pub const ENTRIES_PER_FLOW: u64 = 2;

    /// LAYOUT. After flow 0's handshake: one flow created and promoted.
    pub fn expect_flow0(&mut self, checks: &mut Checks, before: &Counters, after: &Counters, table: Table) {
        expect_delta(checks, before, after, "new_flows", 1);
        expect_delta(checks, before, after, "promoted", 1);
        checks.expect(table == Table { established: Self::ENTRIES_PER_FLOW, half_open: 0 }, || format!("xlb after flow 0's handshake: {table:?}"));
    }

    /// LAYOUT. After `flows` handshakes: all established, none half-open.
    pub fn expect_established(&mut self, checks: &mut Checks, flows: u64, table: Table) {
        checks.expect(table == Table { established: flows * Self::ENTRIES_PER_FLOW, half_open: 0 }, || {
            format!("xlb after establishing {flows} flows: {table:?}, want {} established entries and none half-open", flows * Self::ENTRIES_PER_FLOW)
        });
    }

    /// `calls` ACKs of established flows: every one found and redirected.
    pub fn expect_acks(&mut self, checks: &mut Checks, before: &Counters, after: &Counters, calls: u64) {
        for c in ["new_flows", "rst_miss", "pass_no_flow", "rehashed"] {
            expect_delta(checks, before, after, c, 0);
        }
        expect_delta(checks, before, after, "redirect", calls);
    }

    /// LAYOUT. `syns` fresh SYNs into a table with room: each made a flow
    /// (half-open), none refused; `last_run` SYNs since the room was made.
    pub fn expect_syns(&mut self, checks: &mut Checks, before: &Counters, after: &Counters, syns: u64, last_run: u64, table: Table) {
        expect_delta(checks, before, after, "new_flows", syns);
        expect_delta(checks, before, after, "drop_table_full", 0);
        checks.expect(table.half_open == last_run * Self::ENTRIES_PER_FLOW, || {
            format!("xlb's half-open table after a run of {last_run} SYNs: {} entries, want {}", table.half_open, last_run * Self::ENTRIES_PER_FLOW)
        });
    }

    /// LAYOUT. "Full": the half-open table is at capacity (within the LRU's
    /// slack), so each new SYN evicts the oldest half-open flow.
    pub fn expect_full(&mut self, checks: &mut Checks, table: Table) {
        let (_, half_open_flows) = self.ctl.dataplane().capacity();
        let cap = u64::from(half_open_flows) * Self::ENTRIES_PER_FLOW;
        checks.expect(table.half_open >= cap - cap / 25, || format!("xlb's half-open table is not full: {} of {cap} entries", table.half_open));
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
/// a backend (address, port 8080, its neighbour's MAC, t1's MAC as the
/// source), client address and port kept, TTL 63, valid IPv4 and TCP
/// checksums, sequence numbers and flags unchanged. Returns the backend.
pub fn check_to_backend(input: &Buf, out: &[u8; OUT_LEN], r: pkt::Ran) -> Result<Ipv4Addr, String> {
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
    if rd16(&out[36..38]) != BACKEND_PORT {
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
