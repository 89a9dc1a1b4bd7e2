//! Katran's default balancer object (`balancer.bpf.o`, built from
//! facebookincubator/katran `katran/lib/bpf/balancer.bpf.c` at 19f08fec82fb,
//! no feature defines; see ../shared/peers/katran/README.md), loaded with
//! aya and filled the way `KatranLb` fills it:
//!
//! - one `LRU_HASH` per possible CPU (`lru_size` entries each), plugged into
//!   the `lru_mapping` array of maps (`initLrus` + `attachLrus`);
//! - `ctl_array[0]` = the default router's MAC;
//! - `vip_map`: 10.200.1.1:80/tcp → vip_num 0, no flags;
//! - `reals[1..=3]` = 10.0.0.1-3 (index 0 means "no real");
//! - `ch_rings[0..65537]`: a Maglev ring for vip_num 0 over the three reals
//!   (Maglev's fill loop, equal weights; the permutations come from our own
//!   64-bit mix of the address, not Katran's MurmurHash, so the ring differs
//!   from KatranLb's but is as balanced).
//!
//! Katran is a peer, not part of the project: nothing here is built into
//! xlb. The constants and layouts are those of the commit above.

use std::{net::Ipv4Addr, path::Path};

use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, ArrayOfMaps, HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::Xdp,
};

use crate::pkt::{FRAME_LEN, OUT_LEN, XDP_TX, rd16, rd32};

pub const PROGRAM: &str = "balancer_ingress";
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 1);
pub const REALS: [Ipv4Addr; 3] = [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)];

// balancer_consts.h at 19f08fec82fb (default build).
const MAX_VIPS: u32 = 512;
const RING_SIZE: u32 = 65_537;
const CH_RINGS_SIZE: u32 = MAX_VIPS * RING_SIZE;
const MAX_SUPPORTED_CPUS: usize = 128;
/// Global counters: `stats[MAX_VIPS + X]`, each {v1, v2} per CPU.
pub const LRU_CNTRS: u32 = MAX_VIPS;
/// v1: LRU misses of SYNs, v2: of other segments.
pub const LRU_MISS_CNTR: u32 = MAX_VIPS + 1;
/// The flood guard: v1 new connections in the current window, v2 the
/// window's start (ns).
pub const NEW_CONN_RATE_CNTR: u32 = MAX_VIPS + 2;
pub const FALLBACK_LRU_CNTR: u32 = MAX_VIPS + 3;
pub const XDP_TOTAL_CNTR: u32 = MAX_VIPS + 16;
pub const XDP_TX_CNTR: u32 = MAX_VIPS + 17;
pub const XDP_DROP_CNTR: u32 = MAX_VIPS + 18;
pub const XDP_PASS_CNTR: u32 = MAX_VIPS + 19;
/// vip_num 0's packets (v1) and bytes (v2).
pub const VIP0_CNTR: u32 = 0;
/// New connections per second per CPU above which Katran stops writing its LRU.
pub const MAX_CONN_RATE: u64 = 125_000;
/// sizeof(struct flow_key), sizeof(struct real_pos_lru).
pub const FLOW_KEY: u32 = 40;
pub const REAL_POS_LRU: u32 = 16;

type VipDefinition = [u8; 20];
type VipMeta = [u8; 8];
type RealDefinition = [u8; 20];
type CtlValue = [u8; 8];

pub struct Katran {
    ebpf: Ebpf,
    /// `lru_mapping[cpu]`, by CPU.
    lrus: Vec<MapData>,
    /// Slot → real index, as written to `ch_rings`.
    ring: Vec<u32>,
    _lru_mapping: ArrayOfMaps<MapData>,
}

/// Katran's `stats` map: the counters and the flood guard's state.
pub struct Stats {
    map: PerCpuArray<MapData, [u64; 2]>,
    cpu: usize,
}

/// Loads `path` and fills its maps (see the module doc). `router_mac` goes
/// into `ctl_array[0]`; `cpu` is the CPU the benchmark runs on (the flood
/// guard and the LRU it reads are that CPU's).
pub fn load(path: &Path, lru_size: u32, router_mac: [u8; 6], cpu: usize) -> anyhow::Result<(Katran, Stats)> {
    let mut ebpf = EbpfLoader::new().load_file(path).with_context(|| format!("loading Katran's object {} with aya", path.display()))?;
    {
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .with_context(|| format!("{} has no program {PROGRAM}", path.display()))?
            .try_into()
            .with_context(|| format!("{PROGRAM} is not an XDP program"))?;
        prog.load().with_context(|| format!("loading {PROGRAM} (verifier)"))?;
    }
    let mut take = |name: &str| ebpf.take_map(name).with_context(|| format!("Katran's object has no map {name}"));

    // KatranLb::initLrus + attachLrus: one LRU_HASH per forwarding core.
    let ncpus = aya::util::nr_cpus().map_err(|(p, e)| anyhow::anyhow!("reading {p}: {e}"))?;
    ensure!(cpu < ncpus && ncpus <= MAX_SUPPORTED_CPUS, "CPU {cpu} of {ncpus}: Katran's lru_mapping holds {MAX_SUPPORTED_CPUS}");
    let mut lru_mapping: ArrayOfMaps<MapData> = ArrayOfMaps::try_from(take("lru_mapping")?).context("lru_mapping as an array of maps")?;
    let mut lrus = Vec::with_capacity(ncpus);
    for c in 0..ncpus {
        let def = aya_obj::Map::new_from_params(aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_LRU_HASH as u32, FLOW_KEY, REAL_POS_LRU, lru_size, 0);
        let lru = MapData::create(def, &format!("katran_lru_{c}"), None).with_context(|| format!("creating the {lru_size}-entry LRU of CPU {c}"))?;
        lru_mapping.set(c as u32, &lru, 0).with_context(|| format!("plugging CPU {c}'s LRU into lru_mapping"))?;
        lrus.push(lru);
    }

    let mut ctl: Array<MapData, CtlValue> = Array::try_from(take("ctl_array")?).context("ctl_array")?;
    let mut mac = [0u8; 8];
    mac[..6].copy_from_slice(&router_mac);
    ctl.set(0, mac, 0).context("writing ctl_array[0]")?;

    let mut vips: HashMap<MapData, VipDefinition, VipMeta> = HashMap::try_from(take("vip_map")?).context("vip_map")?;
    let mut vd = [0u8; 20];
    vd[0..4].copy_from_slice(&VIP.octets());
    vd[16..18].copy_from_slice(&80u16.to_be_bytes());
    vd[18] = 6;
    // vip_meta {flags 0, vip_num 0}.
    vips.insert(vd, [0u8; 8], 0).context("writing vip_map")?;

    let mut reals: Array<MapData, RealDefinition> = Array::try_from(take("reals")?).context("reals")?;
    for (i, r) in REALS.iter().enumerate() {
        let mut d = [0u8; 20];
        d[0..4].copy_from_slice(&r.octets());
        reals.set(i as u32 + 1, d, 0).with_context(|| format!("writing reals[{}]", i + 1))?;
    }

    let ring = maglev(&REALS.map(u32::from), RING_SIZE as usize);
    let mut rings: Array<MapData, u32> = Array::try_from(take("ch_rings")?).context("ch_rings")?;
    for (slot, real) in ring.iter().enumerate() {
        rings.set(slot as u32, real, 0).context("writing ch_rings")?;
    }

    let stats = Stats { map: PerCpuArray::try_from(take("stats")?).context("Katran's stats map")?, cpu };
    // The other maps' descriptors can go: the loaded program holds them.
    Ok((Katran { ebpf, lrus, ring, _lru_mapping: lru_mapping }, stats))
}

impl Katran {
    pub fn program(&self) -> anyhow::Result<&Xdp> {
        self.ebpf.program(PROGRAM).context("Katran's program")?.try_into().context("Katran's program as XDP")
    }

    /// Kernel memory charged to CPU `cpu`'s LRU (`memlock` in its fdinfo;
    /// read only, for the report).
    pub fn lru_memlock(&self, cpu: usize) -> Option<u64> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let fd = self.lrus.get(cpu)?.fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        info.lines().find_map(|l| l.strip_prefix("memlock:")).and_then(|v| v.trim().parse().ok())
    }

    /// Entries in CPU `cpu`'s LRU (one batched walk).
    pub fn lru_entries(&self, cpu: usize) -> anyhow::Result<u64> {
        let lru = self.lrus.get(cpu).with_context(|| format!("no LRU for CPU {cpu}"))?;
        let mut n = 0u64;
        xlb::dataplane::batch::for_each::<[u8; FLOW_KEY as usize], [u8; REAL_POS_LRU as usize]>(xlb::dataplane::batch::fd_of(lru), 8192, |_, _| n += 1)
            .with_context(|| format!("walking CPU {cpu}'s LRU"))?;
        Ok(n)
    }

    /// The real Katran picks for a new flow from `src` to the VIP's port
    /// `dport`: `jhash_2words(src, ports, CH_RINGS_SIZE) % RING_SIZE` into
    /// the ring (`get_packet_dst`), on the fields as the program loads them
    /// (network byte order, read as native words).
    pub fn expected_real(&self, src: (Ipv4Addr, u16), dport: u16) -> anyhow::Result<Ipv4Addr> {
        let a = u32::from_ne_bytes(src.0.octets());
        let mut p = [0u8; 4];
        p[0..2].copy_from_slice(&src.1.to_be_bytes());
        p[2..4].copy_from_slice(&dport.to_be_bytes());
        let slot = jhash_2words(a, u32::from_ne_bytes(p), CH_RINGS_SIZE) % RING_SIZE;
        let real = *self.ring.get(slot as usize).context("ring slot")?;
        REALS.get((real as usize).wrapping_sub(1)).copied().with_context(|| format!("ring slot {slot} holds real index {real}"))
    }

    /// Checks Katran's output for `input` (a client's frame to the VIP):
    /// XDP_TX, IPIP (proto 4) with a valid outer header from 172.16/16 to
    /// exactly the real the ring predicts, outer MACs router ← frame's
    /// destination, and the inner packet untouched. Returns the real.
    pub fn check_output(&self, input: &[u8; FRAME_LEN], out: &[u8; OUT_LEN], verdict: u32, len: usize, router_mac: [u8; 6]) -> Result<Ipv4Addr, String> {
        if verdict != XDP_TX {
            return Err(format!("verdict {}, want XDP_TX", crate::pkt::verdict_name(verdict)));
        }
        if len != FRAME_LEN + 20 {
            return Err(format!("{len} bytes out, want {} (IPIP)", FRAME_LEN + 20));
        }
        let ip = &out[14..34];
        let (src, dst) = (rd32(&ip[12..16]), rd32(&ip[16..20]));
        let client = (rd32(&input[26..30]), rd16(&input[34..36]));
        let want = self.expected_real(client, rd16(&input[36..38])).map_err(|e| format!("{e:#}"))?;
        let mut bad = Vec::new();
        if out[0..6] != router_mac {
            bad.push("outer destination MAC is not ctl_array's".to_owned());
        }
        if out[6..12] != input[0..6] {
            bad.push("outer source MAC is not the frame's destination MAC".to_owned());
        }
        if out[12..14] != [8, 0] || ip[0] != 0x45 || ip[9] != 4 {
            bad.push(format!("outer header is not IPv4/IPIP (version/IHL {:#x}, proto {})", ip[0], ip[9]));
        }
        if lb_common::csum::fold(lb_common::csum::sum_bytes(ip, 0)) != 0xffff {
            bad.push("outer IPv4 checksum".to_owned());
        }
        if rd16(&ip[2..4]) != 60 {
            bad.push(format!("outer total length {}", rd16(&ip[2..4])));
        }
        if src.octets()[..2] != [172, 16] {
            bad.push(format!("outer source {src} not in 172.16/16"));
        }
        if dst != want {
            bad.push(format!("outer destination {dst}, the ring says {want}"));
        }
        if out[34..34 + FRAME_LEN - 14] != input[14..] {
            bad.push("inner packet changed".to_owned());
        }
        if bad.is_empty() { Ok(dst) } else { Err(bad.join("; ")) }
    }
}

impl Stats {
    /// Counter `idx` summed over CPUs.
    pub fn sum(&self, idx: u32) -> anyhow::Result<[u64; 2]> {
        let v = self.map.get(&idx, 0).with_context(|| format!("reading Katran's stats[{idx}]"))?;
        Ok(v.iter().fold([0, 0], |a, s| [a[0] + s[0], a[1] + s[1]]))
    }

    /// The flood guard on our CPU: (new connections in the window, window start).
    pub fn conn_rate(&self) -> anyhow::Result<(u64, u64)> {
        let v = self.map.get(&NEW_CONN_RATE_CNTR, 0).context("reading Katran's new-connection rate")?;
        let s = v.get(self.cpu).context("no value for our CPU")?;
        Ok((s[0], s[1]))
    }

    /// Holds the guard off: our CPU's count back to 0 (the window stays).
    pub fn reset_conn_rate(&mut self) -> anyhow::Result<()> {
        let v = self.map.get(&NEW_CONN_RATE_CNTR, 0).context("reading Katran's new-connection rate")?;
        let mut all: Vec<[u64; 2]> = v.iter().copied().collect();
        let Some(mine) = all.get_mut(self.cpu) else { bail!("no value for CPU {}", self.cpu) };
        mine[0] = 0;
        let values = PerCpuValues::try_from(all).context("per-CPU values")?;
        self.map.set(NEW_CONN_RATE_CNTR, values, 0).context("resetting Katran's new-connection rate")
    }

    /// The counters worth watching, for the log and the JSON.
    pub fn snapshot(&self) -> anyhow::Result<serde_json::Value> {
        let [total, _] = self.sum(XDP_TOTAL_CNTR)?;
        let [tx, _] = self.sum(XDP_TX_CNTR)?;
        let [pass, _] = self.sum(XDP_PASS_CNTR)?;
        let [drop, _] = self.sum(XDP_DROP_CNTR)?;
        let [vip_pkts, vip_bytes] = self.sum(VIP0_CNTR)?;
        let [lru_pkts, lru_misses] = self.sum(LRU_CNTRS)?;
        let [miss_syn, miss_other] = self.sum(LRU_MISS_CNTR)?;
        let [fallback, _] = self.sum(FALLBACK_LRU_CNTR)?;
        Ok(serde_json::json!({
            "xdp_total": total, "xdp_tx": tx, "xdp_pass": pass, "xdp_drop": drop,
            "vip0_packets": vip_pkts, "vip0_bytes": vip_bytes, "lru_packets": lru_pkts, "lru_misses": lru_misses,
            "lru_miss_syn": miss_syn, "lru_miss_other": miss_other, "fallback_lru": fallback,
        }))
    }
}

/// Calls of one batch of `batch` new-connection events that found Katran's
/// guard tripped (and so skipped the LRU write), from the guard's state
/// before (`prev`) and after (`now`) the batch. In a window, a call trips
/// when its count exceeds [`MAX_CONN_RATE`]; a new window (its start
/// moved) restarts the count at 1, so the window's first `now.0` calls of
/// the batch belong to it and the rest to the old one.
pub fn tripped_in_batch(prev: (u64, u64), now: (u64, u64), batch: u64) -> u64 {
    let over = |from: u64, to: u64| to.saturating_sub(from.max(MAX_CONN_RATE));
    if now.1 == prev.1 { over(prev.0, now.0) } else { over(prev.0, prev.0 + batch.saturating_sub(now.0)) + over(0, now.0) }
}

/// Linux's `jhash_2words` (include/linux/jhash.h), as Katran's jhash.h has it.
pub fn jhash_2words(a: u32, b: u32, initval: u32) -> u32 {
    let iv = initval.wrapping_add(0xdead_beef).wrapping_add(2 << 2);
    let (mut a, mut b, mut c) = (a.wrapping_add(iv), b.wrapping_add(iv), iv);
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(24));
    c
}

fn mix64(mut x: u64) -> u64 {
    // splitmix64's finaliser.
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A Maglev table of `size` slots (prime) over `reals` (equal weights):
/// each real walks its own permutation (offset, skip) and takes its next
/// free slot, in turn, until every slot is taken. Values are real indices
/// from 1 (Katran's index 0 means "no real").
pub fn maglev(reals: &[u32], size: usize) -> Vec<u32> {
    let m = size as u64;
    let perm: Vec<(u64, u64)> = reals.iter().map(|&r| (mix64(u64::from(r) ^ 0x6b61_7472_616e) % m, mix64(u64::from(r) ^ 0x736b_6970) % (m - 1) + 1)).collect();
    let mut next = vec![0u64; reals.len()];
    let mut ring = vec![0u32; size];
    let mut filled = 0;
    // Each pass over the reals fills one slot per real; each real's walk is
    // a permutation of the slots (size prime), so it finds a free one
    // within `size` steps.
    'fill: for _ in 0..size {
        for (i, &(offset, skip)) in perm.iter().enumerate() {
            for _ in 0..size {
                let slot = ((offset + next[i] * skip) % m) as usize;
                next[i] += 1;
                if ring[slot] == 0 {
                    ring[slot] = i as u32 + 1;
                    filled += 1;
                    break;
                }
            }
            if filled == size {
                break 'fill;
            }
        }
    }
    ring
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maglev_fills_every_slot_evenly() {
        let ring = maglev(&REALS.map(u32::from), RING_SIZE as usize);
        let mut per = [0usize; 4];
        for r in &ring {
            per[*r as usize] += 1;
        }
        assert_eq!(per[0], 0, "empty slots");
        for n in &per[1..] {
            assert!(n.abs_diff(RING_SIZE as usize / 3) <= 1, "{per:?}");
        }
    }

    #[test]
    fn guard_trips_are_counted_per_window() {
        // Below the limit: none.
        assert_eq!(tripped_in_batch((1000, 7), (2000, 7), 1000), 0);
        // Crossing it within a window.
        assert_eq!(tripped_in_batch((124_500, 7), (125_500, 7), 1000), 500);
        // Above it all batch long.
        assert_eq!(tripped_in_batch((200_000, 7), (201_000, 7), 1000), 1000);
        // A new window began 300 calls before the batch ended: 700 calls in
        // the old, tripped window.
        assert_eq!(tripped_in_batch((200_000, 7), (300, 9), 1000), 700);
    }
}
