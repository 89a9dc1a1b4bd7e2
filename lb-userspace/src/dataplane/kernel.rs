//! The real data plane: loading the XDP object, attaching it, pinning its
//! maps, and typed reads and writes of every map ([`KernelDataPlane`]), and
//! the connection table through duplicated map descriptors
//! ([`KernelTable`]). Nothing here knows about services as the operator
//! sees them.

use std::{
    collections::HashMap as StdHashMap,
    fs, io,
    net::IpAddr,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, Map, MapData, PerCpuArray, PerCpuValues},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    maps::{
        Addr, Backend, EndpointEntry, EndpointKey, FlowKey, FlowState, Globals, IFACE_GENERIC, IFACE_VIRTUAL, PortFilter, PortOwner, RING_SLOTS, ServiceEntry,
        ServiceKey, TrafficCounters, names,
    },
    stats,
};
use thiserror::Error;

use super::{DataPlane, Flow, FlowRef, FlowTable, TableCounts, TrafficOf, batch, clock::Clock, iface};

/// The compiled XDP object (built by build.rs from lb-ebpf).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb"));

/// Name of the balancing program in the object.
pub const PROGRAM: &str = "xlb";
/// Name of the full program: the balancing program's tail-call target for
/// every packet its entry does not take.
pub const FULL_PROGRAM: &str = "xlb_full";
/// Name of the pass-only program (for veth peers in test topologies).
pub const PASS_PROGRAM: &str = "xlb_pass";
/// Name of the DSR backends' decapsulation program.
pub const DECAP_PROGRAM: &str = "xlb_decap";
/// Name of the clock program (run by the controller, never attached).
pub const CLOCK_PROGRAM: &str = "xlb_clock";

#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error("the XDP object is empty: this xlb was built with XLB_SKIP_EBPF; rebuild it with the BPF toolchain (`cargo xtask setup`)")]
    EmptyObject,
    #[error("loading the XDP object: {}", chain(.0))]
    Load(aya::EbpfError),
    #[error("the XDP object has no map {0} (object and controller out of sync)")]
    MissingMap(&'static str),
    #[error("the XDP object has no program {0}")]
    MissingProgram(&'static str),
    #[error("{op} on map {map}: {}", chain(.cause))]
    Map { op: &'static str, map: &'static str, cause: aya::maps::MapError },
    #[error("{op} on map {map}: {}", chain(.cause))]
    Syscall { op: &'static str, map: &'static str, cause: io::Error },
    #[error("{op} program {prog}: {}", chain(.cause))]
    Program { op: &'static str, prog: &'static str, cause: aya::programs::ProgramError },
    #[error("attaching XDP to {iface} in {mode} mode: {} (is the interface up? try --xdp-mode generic)", chain(.cause))]
    Attach { iface: String, mode: &'static str, cause: aya::programs::ProgramError },
    #[error("registering ifindex {ifindex} as a redirect target: {}", chain(.cause))]
    Devmap { ifindex: u32, cause: aya::maps::xdp::XdpMapError },
    #[error("interface {0} does not exist")]
    NoSuchInterface(String),
    #[error("pinning map {map} at {path}: {} (is bpffs mounted at /sys/fs/bpf? `cargo xtask setup` mounts it)", chain(.cause))]
    Pin { map: &'static str, path: PathBuf, cause: aya::pin::PinError },
    #[error(
        "the pinned data plane in {dir} has another layout than this xlb: {detail}. Its flows cannot be kept: stop here, or remove it with `xlb detach --pin-dir {dir}` and start again (existing connections will be reset)"
    )]
    LayoutMismatch { dir: PathBuf, detail: String },
    #[error("pinning the XDP link of {iface} at {path}: {}", chain(.cause))]
    PinLink { iface: String, path: PathBuf, cause: aya::pin::PinError },
    #[error("taking over the pinned XDP link {path}: {}", chain(.cause.as_ref()))]
    Relink { path: PathBuf, cause: Box<dyn std::error::Error + Send + Sync> },
    #[error("preparing pin directory {path}: {}", chain(.cause))]
    PinDir { path: PathBuf, cause: io::Error },
    #[error("attaching the MSS clamp to {iface}'s egress: {}", chain(.cause))]
    AttachTc { iface: String, cause: aya::programs::ProgramError },
}

type Result<T> = std::result::Result<T, DataplaneError>;

/// An error and its causes on one line ("a: b: c"), each once: the
/// variants above carry their cause in their message, not as a `source`
/// (which anyhow would print a second time).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = c.source();
    }
    out
}

pub use crate::model::AttachMode;

pub use crate::model::Attachment;

pub struct LoadOptions {
    /// Connection table capacity in flows (two entries each).
    pub conn_capacity: u32,
    /// Half-open table capacity in flows (two entries each); `None`: a
    /// quarter of the connection table, at least 1024.
    pub half_open_capacity: Option<u32>,
    /// Directory under a bpffs mount where the maps are pinned; `None`
    /// pins nothing (tests).
    pub pin_dir: Option<PathBuf>,
}

/// The loaded program and its maps. Dropping it detaches the program (its
/// links belong to this process) but leaves pins in place; call
/// [`KernelDataPlane::unpin`] to remove them.
pub struct KernelDataPlane {
    ebpf: Ebpf,
    maps: StdHashMap<&'static str, Map>,
    attachments: Vec<(Attachment, XdpLinkId)>,
    pin_dir: Option<PathBuf>,
    nr_cpus: usize,
    conn_capacity: u32,
    half_open_capacity: u32,
    restored: bool,
    persist: bool,
    /// The connection table's own handle (duplicated descriptors).
    table: Option<KernelTable>,
}

impl KernelDataPlane {
    pub fn load(opts: LoadOptions) -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            return Err(DataplaneError::EmptyObject);
        }
        // One entry per flow.
        let entries = opts.conn_capacity.max(1);
        let half_open = opts.half_open_capacity.unwrap_or(lb_common::maps::default_half_open_capacity(opts.conn_capacity));
        let half_open_entries = half_open.max(1);
        let mut restored = false;
        if let Some(dir) = &opts.pin_dir {
            prepare_pin_dir(dir)?;
            restored = names::ALL.iter().any(|n| dir.join(n).exists());
            if restored {
                check_layout(dir, entries, half_open_entries, ports_capacity(opts.conn_capacity, half_open))?;
            }
        }
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::CONNS, entries);
        loader.map_max_entries(names::HALF_OPEN, half_open_entries);
        // A full-NAT port per flow, whichever table the flow is in.
        loader.map_max_entries(names::PORTS, ports_capacity(opts.conn_capacity, half_open));
        let pin_paths: Vec<(&'static str, PathBuf)> = match &opts.pin_dir {
            Some(dir) => names::ALL.iter().map(|n| (*n, dir.join(n))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &pin_paths {
            // Existing pins are reused (their state survives); missing ones
            // are created and pinned.
            loader.map_pin_path(name, path.as_path());
        }
        let loaded = loader.load(EBPF_OBJECT).map_err(DataplaneError::Load).and_then(|mut ebpf| {
            for prog in [PROGRAM, FULL_PROGRAM, PASS_PROGRAM, DECAP_PROGRAM, CLOCK_PROGRAM] {
                load_program(&mut ebpf, prog)?;
            }
            install_full_program(&mut ebpf)?;
            Ok(ebpf)
        });
        let mut ebpf = match loaded {
            Ok(e) => e,
            Err(e) => {
                // Pins this attempt created (not restored ones) go away.
                if !restored {
                    for (_, path) in &pin_paths {
                        let _ = fs::remove_file(path);
                    }
                }
                return Err(e);
            }
        };
        let maps = take_maps(&mut ebpf)?;
        let nr_cpus = aya::util::nr_cpus().map_err(|(_, cause)| DataplaneError::Syscall { op: "counting CPUs", map: names::STATS, cause })?;
        Ok(KernelDataPlane {
            ebpf,
            maps,
            attachments: Vec::new(),
            pin_dir: opts.pin_dir,
            nr_cpus,
            conn_capacity: opts.conn_capacity,
            half_open_capacity: half_open,
            restored,
            persist: false,
            table: None,
        })
        .and_then(|mut dp| {
            dp.table = Some(KernelTable::open(&mut dp)?);
            Ok(dp)
        })
    }

    /// The kernel's id of the forwarding program: what the liveness check
    /// expects to find on every managed interface.
    pub fn program_id(&mut self) -> Result<u32> {
        self.xdp(PROGRAM)?.info().map(|i| i.id()).map_err(|cause| DataplaneError::Program { op: "reading the id of", prog: PROGRAM, cause })
    }

    /// Only the pass program, with minimal maps: for the peer ends of veth
    /// pairs in test and demo topologies (see `attach_pass`).
    pub fn load_pass_only() -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            return Err(DataplaneError::EmptyObject);
        }
        let mut ebpf = minimal_loader().load(EBPF_OBJECT).map_err(DataplaneError::Load)?;
        load_program(&mut ebpf, PASS_PROGRAM)?;
        let maps = take_maps(&mut ebpf)?;
        Ok(KernelDataPlane {
            ebpf,
            maps,
            attachments: Vec::new(),
            pin_dir: None,
            nr_cpus: 1,
            conn_capacity: 0,
            half_open_capacity: 0,
            restored: false,
            persist: false,
            table: None,
        })
    }

    /// Whether the maps were taken over from a previous run's pins.
    pub fn restored(&self) -> bool {
        self.restored
    }

    /// Keep forwarding after this process exits: attachments stay pinned and
    /// dropping the data plane detaches nothing.
    pub fn set_persist(&mut self, on: bool) {
        self.persist = on;
    }

    pub fn conn_capacity(&self) -> u32 {
        self.conn_capacity
    }

    pub fn half_open_capacity(&self) -> u32 {
        self.half_open_capacity
    }

    fn xdp(&mut self, prog: &'static str) -> Result<&mut Xdp> {
        self.ebpf.program_mut(prog).ok_or(DataplaneError::MissingProgram(prog))?.try_into().map_err(|cause| DataplaneError::Program {
            op: "finding",
            prog,
            cause,
        })
    }

    /// The balancing program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self) -> Result<&mut Xdp> {
        self.xdp(PROGRAM)
    }

    /// The full program (the entry's tail-call target): its size and
    /// verifier figures, the maps it uses.
    pub fn full_program(&mut self) -> Result<&mut Xdp> {
        self.xdp(FULL_PROGRAM)
    }

    /// The pass-only program (benchmark calibration).
    pub fn pass_program(&mut self) -> Result<&mut Xdp> {
        self.xdp(PASS_PROGRAM)
    }

    /// The DSR backends' decapsulation program (fixtures).
    pub fn decap_program(&mut self) -> Result<&mut Xdp> {
        self.xdp(DECAP_PROGRAM)
    }

    /// Kernel memory charged to a map (`memlock` in its fdinfo), in bytes.
    pub fn map_memory(&self, name: &'static str) -> Option<u64> {
        use std::os::fd::{AsFd, AsRawFd};
        let fd = match self.maps.get(name)? {
            Map::HashMap(d) | Map::LruHashMap(d) | Map::Array(d) | Map::PerCpuArray(d) | Map::DevMapHash(d) => d.fd().as_fd().as_raw_fd(),
            _ => return None,
        };
        let info = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        info.lines().find_map(|l| l.strip_prefix("memlock:")).and_then(|v| v.trim().parse().ok())
    }

    /// Attaches the balancer to `iface` and registers it as a redirect
    /// target. With a pin directory the XDP link is pinned (`link_IFACE`), so
    /// it outlives this process; a link pinned by a previous run is taken
    /// over in place (the new program replaces the old one atomically: no
    /// packet meets an interface without a program).
    /// `previous_mode` is what a restored link was attached as (from the
    /// controller's saved state), reported as is.
    pub fn attach(&mut self, iface: &str, mode: AttachMode, previous_mode: Option<&str>) -> Result<Attachment> {
        let ifindex = ifindex(iface)?;
        let link_pin = self.pin_dir.as_ref().map(|d| d.join(format!("link_{iface}")));
        if let Some(path) = link_pin.as_ref().filter(|p| p.exists()) {
            match self.take_over_link(path) {
                Ok(id) => {
                    let mode = previous_mode.unwrap_or("unknown");
                    let att = Attachment { iface: iface.to_owned(), ifindex, mode: mode.to_owned() };
                    self.devmap_insert(ifindex)?;
                    self.iface_register(iface, ifindex, mode == "generic")?;
                    self.attachments.push((att.clone(), id));
                    tracing::info!(iface, "took over the pinned XDP link: the new program replaced the old one in place");
                    return Ok(att);
                }
                Err(e) => {
                    // Severed (its interface was deleted, maybe re-created
                    // since: containers, a driver reload): the kernel frees
                    // it once unpinned; a fresh attachment takes its place.
                    tracing::warn!(iface, pin = %path.display(), error = %e, "the pinned XDP link of a previous run is severed: replacing it with a fresh attachment (the maps and their flows are kept)");
                    fs::remove_file(path).map_err(|cause| DataplaneError::PinDir { path: path.clone(), cause })?;
                }
            }
        }
        let veth = iface::driver(iface).is_ok_and(|d| d.name == "veth");
        let try_modes: &[(XdpMode, &str)] = match mode {
            AttachMode::Native => &[(XdpMode::Driver, "native")],
            AttachMode::Generic => &[(XdpMode::Skb, "generic")],
            // Native XDP on a veth delivers the frames it sends on only to a
            // peer that runs NAPI (an XDP program or GRO), which this host
            // may not control: generic mode always works there.
            AttachMode::Auto if veth => &[(XdpMode::Skb, "generic")],
            AttachMode::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
        };
        if veth && mode == AttachMode::Auto {
            tracing::info!(iface, "a veth: attaching in generic mode (--xdp-mode native needs an XDP program or GRO on its peer)");
        }
        let mut last_err = None;
        for &(m, name) in try_modes {
            match self.xdp(PROGRAM)?.attach_to_if_index(ifindex, m) {
                Ok(link) => {
                    if last_err.is_some() {
                        tracing::warn!(iface, "native XDP unavailable, attached in generic mode");
                    }
                    let att = Attachment { iface: iface.to_owned(), ifindex, mode: name.to_owned() };
                    self.devmap_insert(ifindex)?;
                    self.iface_register(iface, ifindex, m == XdpMode::Skb)?;
                    let id = match &link_pin {
                        Some(path) => self.pin_link(iface, link, path)?,
                        None => link,
                    };
                    self.attachments.push((att.clone(), id));
                    return Ok(att);
                }
                Err(cause) => last_err = Some((name, cause)),
            }
        }
        let (mode, cause) = last_err.expect("at least one mode was tried");
        Err(DataplaneError::Attach { iface: iface.to_owned(), mode, cause })
    }

    /// Replaces the program of the XDP link pinned at `path` by this one, in
    /// place (no packet meets the interface without a program). Fails when
    /// the link is severed (its interface is gone).
    fn take_over_link(&mut self, path: &Path) -> Result<XdpLinkId> {
        let relink = |cause: Box<dyn std::error::Error + Send + Sync>| DataplaneError::Relink { path: path.to_owned(), cause };
        let pinned = PinnedLink::from_pin(path).map_err(|e| relink(Box::new(e)))?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| relink(Box::new(e)))?;
        self.xdp(PROGRAM)?.attach_to_link(link).map_err(|e| relink(Box::new(e)))
    }

    /// Pins a fresh link and hands it back to the program.
    fn pin_link(&mut self, iface: &str, id: XdpLinkId, path: &Path) -> Result<XdpLinkId> {
        let prog = self.xdp(PROGRAM)?;
        let link = prog.take_link(id).map_err(|cause| DataplaneError::Program { op: "taking the link of", prog: PROGRAM, cause })?;
        let fd_link = match FdLink::try_from(link) {
            Ok(l) => l,
            Err(e) => {
                // Netlink attachments (old kernels) cannot be pinned.
                return Err(DataplaneError::Relink { path: path.to_owned(), cause: Box::new(e) });
            }
        };
        let pinned = fd_link.pin(path).map_err(|cause| DataplaneError::PinLink { iface: iface.to_owned(), path: path.to_owned(), cause })?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| DataplaneError::Relink { path: path.to_owned(), cause: Box::new(e) })?;
        self.xdp(PROGRAM)?.attach_to_link(link).map_err(|e| DataplaneError::Relink { path: path.to_owned(), cause: Box::new(e) })
    }

    /// Attaches the pass-only program (for veth peers in test topologies).
    pub fn attach_pass(&mut self, ifindex: u32) -> Result<()> {
        self.xdp(PASS_PROGRAM)?.attach_to_if_index(ifindex, XdpMode::Driver).map_err(|cause| DataplaneError::Attach {
            iface: format!("ifindex {ifindex}"),
            mode: "native",
            cause,
        })?;
        Ok(())
    }

    pub fn attachments(&self) -> Vec<Attachment> {
        self.attachments.iter().map(|(a, _)| a.clone()).collect()
    }

    /// Detaches from every interface for good (the pinned links go too).
    pub fn detach_all(&mut self) {
        let links: Vec<_> = self.attachments.drain(..).collect();
        for (att, link) in links {
            if let Some(dir) = &self.pin_dir {
                let _ = fs::remove_file(dir.join(format!("link_{}", att.iface)));
            }
            let res = self.xdp(PROGRAM).and_then(|p| p.detach(link).map_err(|cause| DataplaneError::Program { op: "detaching", prog: PROGRAM, cause }));
            match res {
                Ok(()) => tracing::info!(iface = att.iface, "detached"),
                Err(e) => tracing::warn!(iface = att.iface, error = %e, "detach failed"),
            }
        }
    }

    /// Removes the pinned maps and links (after which they die with this
    /// process).
    pub fn unpin(&self) {
        if let Some(dir) = &self.pin_dir {
            remove_pins(dir);
        }
    }

    fn map(&self, name: &'static str) -> Result<&Map> {
        self.maps.get(name).ok_or(DataplaneError::MissingMap(name))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map> {
        self.maps.get_mut(name).ok_or(DataplaneError::MissingMap(name))
    }

    fn map_data(&self, name: &'static str) -> Result<&MapData> {
        match self.map(name)? {
            Map::HashMap(d) | Map::LruHashMap(d) => Ok(d),
            _ => Err(DataplaneError::MissingMap(name)),
        }
    }

    // ---- configuration maps (controller → data plane) ----

    pub fn service_set(&mut self, key: ServiceKey, entry: ServiceEntry) -> Result<()> {
        let map = self.map_mut(names::SERVICES)?;
        let mut m: HashMap<_, ServiceKey, ServiceEntry> = HashMap::try_from(map).map_err(map_err("opening", names::SERVICES))?;
        m.insert(key, entry, 0).map_err(map_err("inserting into", names::SERVICES))
    }

    pub fn service_remove(&mut self, key: &ServiceKey) -> Result<()> {
        let map = self.map_mut(names::SERVICES)?;
        let mut m: HashMap<_, ServiceKey, ServiceEntry> = HashMap::try_from(map).map_err(map_err("opening", names::SERVICES))?;
        ignore_not_found(m.remove(key)).map_err(map_err("removing from", names::SERVICES))
    }

    /// Sets the role bits of an address; 0 removes it.
    pub fn addr_set(&mut self, addr: Addr, flags: u32) -> Result<()> {
        let map = self.map_mut(names::ADDRS)?;
        let mut m: HashMap<_, Addr, u32> = HashMap::try_from(map).map_err(map_err("opening", names::ADDRS))?;
        if flags == 0 {
            ignore_not_found(m.remove(&addr)).map_err(map_err("removing from", names::ADDRS))
        } else {
            m.insert(addr, flags, 0).map_err(map_err("inserting into", names::ADDRS))
        }
    }

    pub fn backend_set(&mut self, id: u32, b: Backend) -> Result<()> {
        let map = self.map_mut(names::BACKENDS)?;
        let mut m: Array<_, Backend> = Array::try_from(map).map_err(map_err("opening", names::BACKENDS))?;
        m.set(id, b, 0).map_err(map_err("writing", names::BACKENDS))
    }

    /// The ring buffer of flows the program removed (flow logs); taken once.
    pub fn take_flow_events(&mut self) -> Result<aya::maps::RingBuf<MapData>> {
        let map = self.maps.remove(names::FLOW_EVENTS).ok_or(DataplaneError::MissingMap(names::FLOW_EVENTS))?;
        aya::maps::RingBuf::try_from(map).map_err(map_err("opening", names::FLOW_EVENTS))
    }

    /// Sets the data plane's settings (`Globals`).
    pub fn globals_set(&mut self, g: Globals) -> Result<()> {
        let map = self.map_mut(names::GLOBALS)?;
        let mut m: Array<_, Globals> = Array::try_from(map).map_err(map_err("opening", names::GLOBALS))?;
        m.set(0, g, 0).map_err(map_err("writing", names::GLOBALS))
    }

    /// Sets the port filter (`PortFilter`: which ports may have a service
    /// or an endpoint).
    pub fn port_filter_set(&mut self, f: &PortFilter) -> Result<()> {
        let map = self.map_mut(names::PORT_FILTER)?;
        let mut m: Array<_, PortFilter> = Array::try_from(map).map_err(map_err("opening", names::PORT_FILTER))?;
        m.set(0, *f, 0).map_err(map_err("writing", names::PORT_FILTER))
    }

    /// The data plane's settings as they are (a taken-over data plane keeps
    /// its flow-hash key).
    pub fn globals(&self) -> Result<Globals> {
        let map = self.map(names::GLOBALS)?;
        let m: Array<_, Globals> = Array::try_from(map).map_err(map_err("opening", names::GLOBALS))?;
        m.get(&0, 0).map_err(map_err("reading", names::GLOBALS))
    }

    /// Sets (or with `None` removes) a backend endpoint's services.
    pub fn endpoint_set(&mut self, key: EndpointKey, entry: Option<EndpointEntry>) -> Result<()> {
        let map = self.map_mut(names::ENDPOINTS)?;
        let mut m: HashMap<_, EndpointKey, EndpointEntry> = HashMap::try_from(map).map_err(map_err("opening", names::ENDPOINTS))?;
        match entry {
            Some(e) => m.insert(key, e, 0).map_err(map_err("inserting into", names::ENDPOINTS)),
            None => ignore_not_found(m.remove(&key)).map_err(map_err("removing from", names::ENDPOINTS)),
        }
    }

    /// Sets a backend's active-flow count (least-connections input).
    pub fn backend_active_set(&mut self, id: u32, count: u64) -> Result<()> {
        let map = self.map_mut(names::BACKEND_ACTIVE)?;
        let mut m: Array<_, u64> = Array::try_from(map).map_err(map_err("opening", names::BACKEND_ACTIVE))?;
        m.set(id, count, 0).map_err(map_err("writing", names::BACKEND_ACTIVE))
    }

    /// Writes the slots of a service's ring that differ from `old`, in one
    /// batched update (a Maglev table is 65,537 slots).
    pub fn ring_write(&mut self, service_id: u32, old: &[u32], new: &[u32]) -> Result<()> {
        let base = service_id * RING_SLOTS;
        let (keys, values): (Vec<u32>, Vec<u32>) =
            new.iter().enumerate().filter(|(i, id)| old.get(*i) != Some(id)).map(|(i, id)| (base + i as u32, *id)).unzip();
        if keys.is_empty() {
            return Ok(());
        }
        let fd = batch::fd_of_any(self.map(names::RING)?).ok_or(DataplaneError::MissingMap(names::RING))?;
        batch::update_many(fd, &keys, &values).map_err(|cause| DataplaneError::Syscall { op: "writing", map: names::RING, cause })
    }

    /// Zeroes a service's or backend's per-CPU traffic counters (ids are reused).
    pub fn reset_traffic(&mut self, service_id: Option<u32>, backend_id: Option<u32>) -> Result<()> {
        let nr_cpus = self.nr_cpus;
        let zeros = || PerCpuValues::try_from(vec![TrafficCounters::default(); nr_cpus]);
        for (name, id) in [(names::SERVICE_STATS, service_id), (names::BACKEND_STATS, backend_id)] {
            let Some(id) = id else { continue };
            let values = zeros().map_err(|cause| DataplaneError::Syscall { op: "allocating", map: name, cause })?;
            let map = self.map_mut(name)?;
            let mut m: PerCpuArray<_, TrafficCounters> = PerCpuArray::try_from(map).map_err(map_err("opening", name))?;
            m.set(id, values, 0).map_err(map_err("zeroing", name))?;
        }
        Ok(())
    }

    fn devmap_insert(&mut self, ifindex: u32) -> Result<()> {
        let map = self.map_mut(names::DEVMAP)?;
        let mut m: DevMapHash<_> = DevMapHash::try_from(map).map_err(map_err("opening", names::DEVMAP))?;
        m.insert(ifindex, ifindex, None, 0).map_err(|e| DataplaneError::Devmap { ifindex, cause: e })
    }

    /// Makes `ifindex` a redirect target without attaching to it (tests),
    /// registered as a virtual interface in native mode (the tests' veths).
    pub fn add_redirect_target(&mut self, ifindex: u32) -> Result<()> {
        self.devmap_insert(ifindex)?;
        self.iface_flags_set(ifindex, IFACE_VIRTUAL)
    }

    /// Tells the data plane how to treat frames arriving on an interface it
    /// is attached to (`IFACE_*`: whether they may carry partial checksums,
    /// whether the skb survives the verdict).
    fn iface_register(&mut self, iface: &str, ifindex: u32, generic: bool) -> Result<()> {
        let virtual_ = match iface::driver(iface) {
            Ok(d) => {
                if d.name == "veth" && !generic {
                    tracing::info!(
                        iface,
                        "native XDP on a veth: frames it sends on (XDP_TX, redirects) reach the other end only if that end runs an XDP program or has GRO on (ethtool -K PEER gro on); otherwise use --xdp-mode generic"
                    );
                }
                d.is_virtual()
            }
            // Unknown: assume frames may be partial (the safe side: a seed
            // is then recognised and completed).
            Err(e) => {
                tracing::debug!(iface, error = %e, "no driver information: treating it as a virtual interface");
                true
            }
        };
        let flags = if virtual_ { IFACE_VIRTUAL } else { 0 } | if generic { IFACE_GENERIC } else { 0 };
        self.iface_flags_set(ifindex, flags)
    }

    /// Sets an interface's `IFACE_*` bits (fixtures test both modes).
    pub fn iface_flags_set(&mut self, ifindex: u32, flags: u32) -> Result<()> {
        let map = self.map_mut(names::IFACES)?;
        let mut m: HashMap<_, u32, u32> = HashMap::try_from(map).map_err(map_err("opening", names::IFACES))?;
        m.insert(ifindex, flags, 0).map_err(map_err("inserting into", names::IFACES))
    }

    // ---- connection table (tests and benchmarks; the controller uses `table()`) ----

    /// Calls `f` for every flow of the connection table and of the
    /// half-open table (batched walks).
    pub fn for_each_flow(&self, mut f: impl FnMut(&FlowKey, &FlowState)) -> Result<()> {
        self.for_each_flow_tagged(|_, k, v| f(k, v))
    }

    /// As [`KernelDataPlane::for_each_flow`], saying for each flow whether
    /// it is in the half-open table.
    pub fn for_each_flow_tagged(&self, mut f: impl FnMut(bool, &FlowKey, &FlowState)) -> Result<()> {
        for (half_open, name) in [(false, names::CONNS), (true, names::HALF_OPEN)] {
            let fd = batch::fd_of(self.map_data(name)?);
            batch::for_each::<FlowKey, FlowState>(fd, 4096, |k, v| f(half_open, k, v)).map_err(|cause| DataplaneError::Syscall {
                op: "walking",
                map: name,
                cause,
            })?;
        }
        Ok(())
    }

    /// Flows in (connection table, half-open table).
    pub fn flow_counts(&self) -> Result<(u64, u64)> {
        let mut counts = (0u64, 0u64);
        self.for_each_flow_tagged(|half_open, _, _| if half_open { counts.1 += 1 } else { counts.0 += 1 })?;
        Ok(counts)
    }

    /// The flow of `key` in either table.
    pub fn flow_get(&self, key: &FlowKey) -> Result<Option<Flow>> {
        self.table_ref()?.current(key)
    }

    /// The data plane's clock: jiffies, low 32 bits, as flows record them.
    pub fn now(&self) -> Result<u32> {
        self.table_ref()?.now()
    }

    /// Inserts a flow directly into the connection table (benchmarks and
    /// tests that need a populated table without traffic).
    pub fn flow_insert(&mut self, key: FlowKey, state: FlowState) -> Result<()> {
        let fd = batch::fd_of(self.map_data(names::CONNS)?);
        batch::update(fd, &key, &state).map_err(|cause| DataplaneError::Syscall { op: "inserting into", map: names::CONNS, cause })
    }

    /// Full-NAT port entries per backend (address and port as the maps hold
    /// them), holders gone or not, counted in one batched walk.
    pub fn port_entries(&self) -> Result<StdHashMap<(Addr, u16), u64>> {
        let mut n: StdHashMap<(Addr, u16), u64> = StdHashMap::new();
        self.table_ref()?.for_each_port(&mut |k, _| *n.entry((k.src_addr, k.src_port)).or_default() += 1)?;
        Ok(n)
    }

    fn table_ref(&self) -> Result<&KernelTable> {
        self.table.as_ref().ok_or(DataplaneError::MissingMap(names::CONNS))
    }

    // ---- counters ----

    /// Global counters summed over CPUs, indexed by `lb_common::stats`.
    /// `rx` is the sum of the verdicts (the program does not count it).
    pub fn global_counters(&self) -> Result<Vec<u64>> {
        let map = self.map(names::STATS)?;
        let m: PerCpuArray<_, u64> = PerCpuArray::try_from(map).map_err(map_err("opening", names::STATS))?;
        let mut c: Vec<u64> =
            (0..stats::COUNT).map(|i| m.get(&i, 0).map(|v| v.iter().sum()).map_err(map_err("reading", names::STATS))).collect::<Result<_>>()?;
        let rx = stats::VERDICTS.iter().map(|i| c.get(*i as usize).copied().unwrap_or(0)).sum();
        if let Some(r) = c.get_mut(stats::RX as usize) {
            *r = rx;
        }
        Ok(c)
    }

    pub fn service_counters(&self, id: u32) -> Result<TrafficCounters> {
        self.traffic_of(names::SERVICE_STATS, id)
    }

    pub fn backend_counters(&self, id: u32) -> Result<TrafficCounters> {
        self.traffic_of(names::BACKEND_STATS, id)
    }

    fn traffic_of(&self, name: &'static str, id: u32) -> Result<TrafficCounters> {
        let map = self.map(name)?;
        let m: PerCpuArray<_, TrafficCounters> = PerCpuArray::try_from(map).map_err(map_err("opening", name))?;
        let per_cpu = m.get(&id, 0).map_err(map_err("reading", name))?;
        let mut sum = TrafficCounters::default();
        for c in per_cpu.iter() {
            sum.add(c);
        }
        Ok(sum)
    }
}

impl DataPlane for KernelDataPlane {
    type Table = KernelTable;

    fn table(&self) -> KernelTable {
        // Always present after `load` (a pass-only data plane has no
        // controller): an empty handle would fail every operation.
        self.table.clone().unwrap_or_else(KernelTable::none)
    }
    fn service_set(&mut self, key: ServiceKey, entry: ServiceEntry) -> Result<()> {
        KernelDataPlane::service_set(self, key, entry)
    }
    fn service_remove(&mut self, key: &ServiceKey) -> Result<()> {
        KernelDataPlane::service_remove(self, key)
    }
    fn addr_set(&mut self, addr: Addr, flags: u32) -> Result<()> {
        KernelDataPlane::addr_set(self, addr, flags)
    }
    fn backend_set(&mut self, id: u32, b: Backend) -> Result<()> {
        KernelDataPlane::backend_set(self, id, b)
    }
    fn ring_write(&mut self, service_id: u32, old: &[u32], new: &[u32]) -> Result<()> {
        KernelDataPlane::ring_write(self, service_id, old, new)
    }
    fn globals_set(&mut self, g: Globals) -> Result<()> {
        KernelDataPlane::globals_set(self, g)
    }
    fn endpoint_set(&mut self, key: EndpointKey, entry: Option<EndpointEntry>) -> Result<()> {
        KernelDataPlane::endpoint_set(self, key, entry)
    }
    fn port_filter_set(&mut self, f: &PortFilter) -> Result<()> {
        KernelDataPlane::port_filter_set(self, f)
    }
    fn backend_active_set(&mut self, id: u32, count: u64) -> Result<()> {
        KernelDataPlane::backend_active_set(self, id, count)
    }
    fn reset_traffic(&mut self, service_id: Option<u32>, backend_id: Option<u32>) -> Result<()> {
        KernelDataPlane::reset_traffic(self, service_id, backend_id)
    }
    fn global_counters(&self) -> Result<Vec<u64>> {
        KernelDataPlane::global_counters(self)
    }
    fn traffic(&self, of: TrafficOf, ids: &[u32]) -> Result<Vec<TrafficCounters>> {
        let name = match of {
            TrafficOf::Services => names::SERVICE_STATS,
            TrafficOf::Backends => names::BACKEND_STATS,
        };
        ids.iter().map(|id| self.traffic_of(name, *id)).collect()
    }
    fn attachments(&self) -> Vec<Attachment> {
        KernelDataPlane::attachments(self)
    }
    fn capacity(&self) -> (u32, u32) {
        (self.conn_capacity, self.half_open_capacity)
    }
}

impl Drop for KernelDataPlane {
    fn drop(&mut self) {
        if !self.persist {
            self.detach_all();
        }
    }
}

/// The connection table through its own (duplicated) map descriptors: a
/// cheap handle for the threads that walk it and remove from it.
#[derive(Clone)]
pub struct KernelTable {
    fds: Option<Arc<TableFds>>,
    clock: Option<Clock>,
    removed: Arc<AtomicU64>,
}

struct TableFds {
    conns: OwnedFd,
    half_open: OwnedFd,
    ports: OwnedFd,
}

impl KernelTable {
    fn open(dp: &mut KernelDataPlane) -> Result<KernelTable> {
        let dup = |name: &'static str| -> Result<OwnedFd> {
            batch::fd_of(dp.map_data(name)?).try_clone_to_owned().map_err(|cause| DataplaneError::Syscall {
                op: "duplicating the descriptor of",
                map: name,
                cause,
            })
        };
        let fds = TableFds { conns: dup(names::CONNS)?, half_open: dup(names::HALF_OPEN)?, ports: dup(names::PORTS)? };
        let prog = dp.xdp(CLOCK_PROGRAM)?;
        let fd = prog
            .fd()
            .map_err(|cause| DataplaneError::Program { op: "opening", prog: CLOCK_PROGRAM, cause })?
            .as_fd()
            .try_clone_to_owned()
            .map_err(|cause| DataplaneError::Syscall { op: "duplicating the program descriptor for", map: CLOCK_PROGRAM, cause })?;
        // A few ticks at the slowest rate tell the rates apart.
        let clock = Clock::new(fd, std::time::Duration::from_millis(60)).map_err(|cause| DataplaneError::Syscall {
            op: "reading the data plane's clock through",
            map: CLOCK_PROGRAM,
            cause,
        })?;
        tracing::debug!(hz = clock.hz(), "data plane clock");
        Ok(KernelTable { fds: Some(Arc::new(fds)), clock: Some(clock), removed: Arc::new(AtomicU64::new(0)) })
    }

    fn none() -> KernelTable {
        KernelTable { fds: None, clock: None, removed: Arc::new(AtomicU64::new(0)) }
    }

    fn fds(&self) -> Result<&TableFds> {
        self.fds.as_deref().ok_or(DataplaneError::MissingMap(names::CONNS))
    }

    /// The flow of `key` as the table holds it now.
    pub fn current(&self, key: &FlowKey) -> Result<Option<Flow>> {
        let f = self.fds()?;
        for (half_open, name, fd) in [(false, names::CONNS, &f.conns), (true, names::HALF_OPEN, &f.half_open)] {
            if let Some(state) =
                batch::lookup::<FlowKey, FlowState>(fd.as_fd(), key).map_err(|cause| DataplaneError::Syscall { op: "reading", map: name, cause })?
            {
                return Ok(Some(Flow { key: *key, state, half_open }));
            }
        }
        Ok(None)
    }

    /// Deletes `keys` from whichever table holds them (batched). Returns
    /// the flows deleted.
    fn delete_keys(&self, keys: &[FlowKey]) -> Result<usize> {
        let f = self.fds()?;
        let (mut deleted, missing) =
            batch::delete(f.conns.as_fd(), keys).map_err(|cause| DataplaneError::Syscall { op: "deleting from", map: names::CONNS, cause })?;
        if !missing.is_empty() {
            deleted +=
                batch::delete(f.half_open.as_fd(), &missing).map_err(|cause| DataplaneError::Syscall { op: "deleting from", map: names::HALF_OPEN, cause })?.0;
        }
        self.removed.fetch_add(deleted as u64, Ordering::Relaxed);
        Ok(deleted)
    }
}

impl FlowTable for KernelTable {
    fn walk(&self, f: &mut dyn FnMut(&Flow)) -> Result<TableCounts> {
        let fds = self.fds()?;
        let mut counts = TableCounts::default();
        // The half-open table first: a flow promoted during the walk moves
        // to the connection table, walked after, so it is seen once or
        // twice, never missed (drains and eviction counts err safe).
        for (half_open, name, fd) in [(true, names::HALF_OPEN, &fds.half_open), (false, names::CONNS, &fds.conns)] {
            batch::for_each::<FlowKey, FlowState>(fd.as_fd(), 4096, |k, v| {
                if half_open {
                    counts.half_open += 1;
                } else {
                    counts.established += 1;
                }
                f(&Flow { key: *k, state: *v, half_open });
            })
            .map_err(|cause| DataplaneError::Syscall { op: "walking", map: name, cause })?;
        }
        Ok(counts)
    }

    fn remove_if_unchanged(&self, decided: &[FlowRef]) -> Result<Vec<Flow>> {
        let mut gone = Vec::new();
        let mut keys = Vec::new();
        for d in decided {
            // Read back just before the delete: what was decided about is
            // still what is there (a µs window remains, not the walk's).
            let Some(now) = self.current(&d.flow.key)? else { continue };
            if !d.flow.unchanged_in(&now, d.idle) {
                continue;
            }
            keys.push(now.key);
            gone.push(now);
        }
        if !keys.is_empty() {
            self.delete_keys(&keys)?;
        }
        Ok(gone)
    }

    fn remove_keys(&self, keys: &[FlowKey]) -> Result<usize> {
        self.delete_keys(keys)
    }

    fn install(&self, flow: &Flow, port: Option<FlowKey>) -> Result<()> {
        let f = self.fds()?;
        // The port first: the backend's first answer finds its flow.
        if let Some(p) = port {
            let owner = PortOwner { flow: flow.key, claimed: flow.state.created, _pad: 0 };
            batch::update(f.ports.as_fd(), &p, &owner).map_err(|cause| DataplaneError::Syscall { op: "inserting into", map: names::PORTS, cause })?;
        }
        batch::update(f.conns.as_fd(), &flow.key, &flow.state).map_err(|cause| DataplaneError::Syscall { op: "inserting into", map: names::CONNS, cause })
    }

    fn for_each_port(&self, f: &mut dyn FnMut(&FlowKey, &PortOwner)) -> Result<()> {
        batch::for_each::<FlowKey, PortOwner>(self.fds()?.ports.as_fd(), 4096, |k, v| f(k, v)).map_err(|cause| DataplaneError::Syscall {
            op: "walking",
            map: names::PORTS,
            cause,
        })
    }

    fn now(&self) -> Result<u32> {
        let c = self.clock.as_ref().ok_or(DataplaneError::MissingProgram(CLOCK_PROGRAM))?;
        c.now().map(|j| j as u32).map_err(|cause| DataplaneError::Syscall { op: "reading the clock through", map: CLOCK_PROGRAM, cause })
    }

    fn hz(&self) -> u32 {
        self.clock.as_ref().map_or(250, Clock::hz)
    }

    fn entries_removed(&self) -> u64 {
        self.removed.load(Ordering::Relaxed)
    }
}

/// Removes every pin of a data plane (maps and links) and the directory.
/// Pinned links are destroyed (detaching their program) once no process
/// holds them.
pub fn remove_pins(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("link_") || names::ALL.contains(&name.as_ref()) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Compares the pinned maps with this build's map definitions (type, key
/// and value sizes, capacity): a mismatch means the pins were made by an
/// xlb with another layout, and reading them would corrupt state.
fn check_layout(dir: &Path, conn_entries: u32, half_open_entries: u32, ports_entries: u32) -> Result<()> {
    let mismatch = |detail: String| DataplaneError::LayoutMismatch { dir: dir.to_owned(), detail };
    let obj = aya_obj::Object::parse(EBPF_OBJECT).map_err(|e| mismatch(format!("cannot parse this build's object: {e}")))?;
    for name in names::ALL {
        let path = dir.join(name);
        let Some(def) = obj.maps.get(name) else {
            return Err(mismatch(format!("this build has no map {name}")));
        };
        if !path.exists() {
            return Err(mismatch(format!("map {name} is not pinned")));
        }
        let data = MapData::from_pin(&path).map_err(|e| mismatch(format!("cannot open pinned {name}: {e}")))?;
        let info = data.info().map_err(|e| mismatch(format!("cannot read pinned {name}: {e}")))?;
        let want_entries = match name {
            names::CONNS => conn_entries,
            names::HALF_OPEN => half_open_entries,
            names::PORTS => ports_entries,
            _ => def.max_entries(),
        };
        let got = (info.key_size(), info.value_size(), info.max_entries());
        let want = (def.key_size(), def.value_size(), want_entries);
        if got != want {
            let hint = if name == names::CONNS && got.0 == want.0 && got.1 == want.1 {
                format!(" (the pinned table holds {} flows: start with --conn-capacity {})", got.2, got.2)
            } else if name == names::HALF_OPEN && got.0 == want.0 && got.1 == want.1 {
                format!(" (the pinned half-open table holds {} flows: start with --half-open-capacity {})", got.2, got.2)
            } else {
                String::new()
            };
            return Err(mismatch(format!(
                "map {name}: pinned key/value/entries {}/{}/{}, this build {}/{}/{}{hint}",
                got.0, got.1, got.2, want.0, want.1, want.2
            )));
        }
    }
    Ok(())
}

/// A loader that makes every map of the object as small as the kernel
/// allows: for programs that use none (pass, decapsulation), so loading
/// them costs no memory worth mentioning (the ring alone is 16 MiB).
fn minimal_loader() -> EbpfLoader<'static> {
    let mut loader = EbpfLoader::new();
    for name in names::ALL {
        loader.map_max_entries(name, if name == names::FLOW_EVENTS { 4096 } else { 1 });
    }
    loader
}

/// Finds, verifies and loads one XDP program of the object.
fn load_program<'a>(ebpf: &'a mut Ebpf, prog: &'static str) -> Result<&'a mut Xdp> {
    let p: &mut Xdp = ebpf.program_mut(prog).ok_or(DataplaneError::MissingProgram(prog))?.try_into().map_err(|cause| DataplaneError::Program {
        op: "finding",
        prog,
        cause,
    })?;
    load_retrying(p).map_err(|cause| DataplaneError::Program { op: "verifying and loading", prog, cause })?;
    Ok(p)
}

/// Puts the full program into the entry's tail-call slot, before anything
/// is attached (without it the entry would pass every packet it does not
/// take). A slot restored from a pin is overwritten: the full program
/// parses each packet again, so an entry of the previous build still
/// attached meanwhile hands it over correctly.
fn install_full_program(ebpf: &mut Ebpf) -> Result<()> {
    let prog: &Xdp = ebpf.program(FULL_PROGRAM).ok_or(DataplaneError::MissingProgram(FULL_PROGRAM))?.try_into().map_err(|cause| DataplaneError::Program {
        op: "finding",
        prog: FULL_PROGRAM,
        cause,
    })?;
    let fd =
        prog.fd().and_then(|fd| fd.try_clone().map_err(Into::into)).map_err(|cause| DataplaneError::Program { op: "opening", prog: FULL_PROGRAM, cause })?;
    let map = ebpf.map_mut(names::FULL_PROGRAM).ok_or(DataplaneError::MissingMap(names::FULL_PROGRAM))?;
    let mut slots = aya::maps::ProgramArray::try_from(map).map_err(|cause| DataplaneError::Map { op: "opening", map: names::FULL_PROGRAM, cause })?;
    slots.set(0, &fd, 0).map_err(|cause| DataplaneError::Map { op: "installing the full program in", map: names::FULL_PROGRAM, cause })
}

/// Takes every map the controller uses out of the loaded object.
fn take_maps(ebpf: &mut Ebpf) -> Result<StdHashMap<&'static str, Map>> {
    names::ALL.iter().map(|&name| ebpf.take_map(name).map(|m| (name, m)).ok_or(DataplaneError::MissingMap(name))).collect()
}

/// Loads a program, trying again when the kernel answers EAGAIN: it does
/// so under memory pressure (verifier allocations), transiently — libbpf
/// retries the same way.
fn load_retrying(p: &mut Xdp) -> std::result::Result<(), aya::programs::ProgramError> {
    const ATTEMPTS: u32 = 5;
    let mut attempt = 1;
    loop {
        match p.load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. }) if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < ATTEMPTS => {
                tracing::debug!(attempt, "loading the program: EAGAIN from the kernel, trying again");
                std::thread::sleep(std::time::Duration::from_millis(50 * u64::from(attempt)));
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Attaches the DSR decapsulation program to `iface` and pins its link at
/// `link_pin`, so it stays after this process exits (`xlb backend-setup`).
/// Returns the XDP mode obtained.
pub fn attach_decap_pinned(iface: &str, mode: AttachMode, link_pin: &Path) -> Result<&'static str> {
    if EBPF_OBJECT.is_empty() {
        return Err(DataplaneError::EmptyObject);
    }
    let idx = ifindex(iface)?;
    let mut ebpf = minimal_loader().load(EBPF_OBJECT).map_err(DataplaneError::Load)?;
    let prog = load_program(&mut ebpf, DECAP_PROGRAM)?;
    let tries: &[(XdpMode, &'static str)] = match mode {
        AttachMode::Native => &[(XdpMode::Driver, "native")],
        AttachMode::Generic => &[(XdpMode::Skb, "generic")],
        AttachMode::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
    };
    let mut last = None;
    for (m, name) in tries {
        match prog.attach_to_if_index(idx, *m) {
            Ok(id) => {
                let link = prog.take_link(id).map_err(|cause| DataplaneError::Program { op: "taking the link of", prog: DECAP_PROGRAM, cause })?;
                let fd = FdLink::try_from(link).map_err(|e| DataplaneError::Relink { path: link_pin.to_owned(), cause: Box::new(e) })?;
                if let Some(dir) = link_pin.parent() {
                    prepare_pin_dir(dir)?;
                }
                fd.pin(link_pin).map_err(|cause| DataplaneError::PinLink { iface: iface.to_owned(), path: link_pin.to_owned(), cause })?;
                return Ok(name);
            }
            Err(cause) => last = Some((name, cause)),
        }
    }
    let (mode, cause) = last.ok_or(DataplaneError::MissingProgram(DECAP_PROGRAM))?;
    Err(DataplaneError::Attach { iface: iface.to_owned(), mode, cause })
}

/// Name of the backend hosts' MSS clamp (TC egress, `xlb backend-setup`).
pub const MSS_CLAMP_PROGRAM: &str = "xlb_mss_clamp";

/// Attaches the MSS clamp to `iface`'s egress with `limits` (VIP → the
/// largest MSS its SYN-ACKs may announce) and pins its link at `link_pin`
/// (a TCX link, kernel 6.6 or later: it stays after this process exits).
pub fn attach_mss_clamp_pinned(iface: &str, limits: &[(IpAddr, u16)], link_pin: &Path) -> Result<()> {
    ifindex(iface)?;
    let mut ebpf = load_mss_clamp(limits)?;
    let prog = MSS_CLAMP_PROGRAM;
    let p = mss_clamp_program(&mut ebpf)?;
    let id = p.attach(iface, TcAttachType::Egress).map_err(|cause| DataplaneError::AttachTc { iface: iface.to_owned(), cause })?;
    let link = p.take_link(id).map_err(|cause| DataplaneError::Program { op: "taking the link of", prog, cause })?;
    // Only a TCX link can be pinned (a netlink filter cannot).
    let fd = FdLink::try_from(link).map_err(|e| DataplaneError::Relink {
        path: link_pin.to_owned(),
        cause: format!("{e} (the MSS clamp needs TCX links: Linux 6.6 or later; or run backend-setup with --mss-clamp off)").into(),
    })?;
    if let Some(dir) = link_pin.parent() {
        prepare_pin_dir(dir)?;
    }
    fd.pin(link_pin).map_err(|cause| DataplaneError::PinLink { iface: iface.to_owned(), path: link_pin.to_owned(), cause })?;
    Ok(())
}

/// The object with the MSS clamp verified and loaded (not attached) and
/// its map filled with `limits`: for [`attach_mss_clamp_pinned`] and the
/// fixtures (`mss_clamp_program` of it).
pub fn load_mss_clamp(limits: &[(IpAddr, u16)]) -> Result<Ebpf> {
    if EBPF_OBJECT.is_empty() {
        return Err(DataplaneError::EmptyObject);
    }
    let mut ebpf = minimal_loader().load(EBPF_OBJECT).map_err(DataplaneError::Load)?;
    {
        let map = ebpf.map_mut(names::MSS_CLAMP).ok_or(DataplaneError::MissingMap(names::MSS_CLAMP))?;
        let mut m: HashMap<_, Addr, u16> = HashMap::try_from(map).map_err(map_err("opening", names::MSS_CLAMP))?;
        for (vip, mss) in limits {
            m.insert(lb_common::maps::addr_from_ip(*vip), *mss, 0).map_err(map_err("writing", names::MSS_CLAMP))?;
        }
    }
    let prog = MSS_CLAMP_PROGRAM;
    mss_clamp_program(&mut ebpf)?.load().map_err(|cause| DataplaneError::Program { op: "verifying and loading", prog, cause })?;
    Ok(ebpf)
}

/// The MSS clamp program of a loaded object.
pub fn mss_clamp_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    let prog = MSS_CLAMP_PROGRAM;
    ebpf.program_mut(prog).ok_or(DataplaneError::MissingProgram(prog))?.try_into().map_err(|cause| DataplaneError::Program { op: "finding", prog, cause })
}

/// Interfaces with a pinned link in `dir` (from a previous run).
pub fn pinned_links(dir: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else { return Vec::new() };
    rd.flatten().filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("link_")).map(str::to_owned)).collect()
}

/// Detaches the pinned link of `iface` for good (a link this run does not
/// take over).
pub fn unpin_link(dir: &Path, iface: &str) -> std::io::Result<()> {
    let path = dir.join(format!("link_{iface}"));
    match PinnedLink::from_pin(&path) {
        Ok(p) => p.unpin().map(drop),
        Err(_) => fs::remove_file(&path),
    }
}

/// Capacity of `XLB_PORTS`: one port per flow of both tables.
fn ports_capacity(conn_capacity: u32, half_open_capacity: u32) -> u32 {
    conn_capacity.saturating_add(half_open_capacity).max(1)
}

fn map_err(op: &'static str, map: &'static str) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    move |cause| DataplaneError::Map { op, map, cause }
}

fn ignore_not_found(r: std::result::Result<(), aya::maps::MapError>) -> std::result::Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Interface index of `name` in the current network namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name).map_err(|_| DataplaneError::NoSuchInterface(name.to_owned()))?;
    // SAFETY: valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 { Err(DataplaneError::NoSuchInterface(name.to_owned())) } else { Ok(idx) }
}

/// Creates the pin directory, mounting bpffs at /sys/fs/bpf first if the
/// directory lives there and nothing is mounted.
fn prepare_pin_dir(dir: &Path) -> Result<()> {
    let pin_err = |cause| DataplaneError::PinDir { path: dir.to_owned(), cause };
    let bpffs = Path::new("/sys/fs/bpf");
    if dir.starts_with(bpffs) && !is_bpffs(bpffs) {
        mount_bpffs(bpffs).map_err(pin_err)?;
    }
    fs::create_dir_all(dir).map_err(pin_err)
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

fn mount_bpffs(path: &Path) -> io::Result<()> {
    fs::create_dir_all(path)?;
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: valid NUL-terminated strings.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
