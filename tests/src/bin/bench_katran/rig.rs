//! The rig: a private network namespace laid out as xlb's bench and
//! fixtures lay theirs out, and the addresses every frame uses.
//!
//!   t0 10.0.0.1/24 (ingress, the clients' side; the default router
//!      10.0.0.254 is a permanent neighbour, and 10.100.0.0/16, where the
//!      clients are, is routed through it)
//!   t1 10.1.1.1/24 (the backends' side, 10.1.1.2-4 permanent neighbours)
//!   lo xlb's VIPs (10.99.0.1, and .2-.3 of the stateful SYN row)
//!
//! Katran needs none of it (it returns XDP_TX), but both programs get the
//! same ingress ifindex (t0), so they are timed on the same footing.

use std::net::Ipv4Addr;

use anyhow::Context as _;
use testbed::{Netns, in_netns, netns::unique_prefix};

use crate::xlb_side;

pub const T0_MAC: [u8; 6] = [2, 0, 0, 0, 0x10, 0];
pub const T1_MAC: [u8; 6] = [2, 0, 0, 0, 0x10, 1];
pub const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
/// The default router: Katran's `ctl_array[0]`, and xlb's next hop
/// towards the clients.
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
pub const ROUTER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];
/// A destination that is neither balancer's VIP (the `pass` case).
pub const NON_VIP: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 0, 0, 1), 22);
pub const VIP_PORT: u16 = 80;
/// Sequence numbers of every handshake (the client's and the backend's ISN).
pub const CLIENT_ISN: u32 = 1000;
pub const BACKEND_ISN: u32 = 5000;

/// Client of flow `i`: 10.100.0.1 + i / 50,000, port 10,000 + i % 50,000.
pub fn client(i: u64) -> (Ipv4Addr, u16) {
    (Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 1)) + (i / 50_000) as u32), 10_000 + (i % 50_000) as u16)
}

pub struct Rig {
    pub ns: Netns,
    pub t0: u32,
    pub t1: u32,
}

pub fn rig() -> anyhow::Result<Rig> {
    let ns = Netns::new(&format!("{}-katran", unique_prefix()))?;
    let mac = |m: [u8; 6]| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let router = ROUTER.to_string();
    let mut cmds: Vec<Vec<String>> = vec![
        vec!["link".into(), "add".into(), "t0".into(), "type".into(), "veth".into(), "peer".into(), "name".into(), "t1".into()],
        vec!["link".into(), "set".into(), "t0".into(), "address".into(), mac(T0_MAC)],
        vec!["link".into(), "set".into(), "t1".into(), "address".into(), mac(T1_MAC)],
        vec!["addr".into(), "add".into(), "10.0.0.1/24".into(), "dev".into(), "t0".into()],
        vec!["addr".into(), "add".into(), "10.1.1.1/24".into(), "dev".into(), "t1".into()],
        vec!["link".into(), "set".into(), "t0".into(), "up".into()],
        vec!["link".into(), "set".into(), "t1".into(), "up".into()],
        vec!["neigh".into(), "add".into(), router.clone(), "lladdr".into(), mac(ROUTER_MAC), "dev".into(), "t0".into(), "nud".into(), "permanent".into()],
        vec!["route".into(), "add".into(), "10.100.0.0/16".into(), "via".into(), router],
    ];
    for v in [xlb_side::VIP, xlb_side::VIP_SHARED, xlb_side::VIP_SHARED_PEER] {
        cmds.push(vec!["addr".into(), "add".into(), format!("{v}/32"), "dev".into(), "lo".into()]);
    }
    for b in xlb_side::BACKENDS {
        cmds.push(vec![
            "neigh".into(),
            "add".into(),
            b.to_string(),
            "lladdr".into(),
            mac(xlb_side::backend_mac(b)),
            "dev".into(),
            "t1".into(),
            "nud".into(),
            "permanent".into(),
        ]);
    }
    for c in &cmds {
        let args: Vec<&str> = c.iter().map(String::as_str).collect();
        ns.ip(&args)?;
    }
    // What the daemon sets up on its interfaces (forwarding, for the FIB
    // lookups of xlb's program).
    in_netns(&ns.name, || xlb::host::sysctl::apply(&xlb::host::sysctl::Sysctl::default(), &["t0".into(), "t1".into()]))?
        .map_err(anyhow::Error::msg)
        .context("host settings in the rig")?;
    let t0 = ns.ifindex("t0")?;
    let t1 = ns.ifindex("t1")?;
    Ok(Rig { ns, t0, t1 })
}

/// Pins the calling thread to `cpu` and checks it runs there.
pub fn pin(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity
    // act on this thread only.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    anyhow::ensure!(rc == 0, "pinning to CPU {cpu}: {}", std::io::Error::last_os_error());
    // SAFETY: no preconditions.
    let now = unsafe { libc::sched_getcpu() };
    anyhow::ensure!(now == cpu as i32, "pinned to CPU {cpu} but running on {now}");
    Ok(())
}
