//! What the data plane needs to know about an interface it is attached to,
//! read from the kernel in the current network namespace.

use std::io;

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;

/// `struct ethtool_drvinfo` (include/uapi/linux/ethtool.h).
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// `struct ifreq` with the `ifr_data` member.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// The driver of an interface as ethtool reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Driver {
    /// e.g. "veth", "tun", "virtio_net", "mlx5_core".
    pub name: String,
    /// The bus address of the device ("0000:03:00.0"); empty for virtual
    /// devices (veth, tap, bridges, tunnels).
    pub bus_info: String,
}

impl Driver {
    /// A device with no bus: frames on it may come from a local stack, with
    /// partial checksums.
    pub fn is_virtual(&self) -> bool {
        self.bus_info.is_empty() || self.bus_info == "N/A"
    }
}

fn c_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Asks the kernel (ETHTOOL_GDRVINFO) which driver runs `iface`.
pub fn driver(iface: &str) -> io::Result<Driver> {
    if iface.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "interface name too long"));
    }
    // SAFETY: zeroed is a valid bit pattern for these plain C structs.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: (&mut info as *mut DrvInfo).cast(), _pad: [0; 16] };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: valid fd, request and out-buffer for SIOCETHTOOL.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req as *mut IfReq) };
    let err = io::Error::last_os_error();
    // SAFETY: our descriptor.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return Err(err);
    }
    Ok(Driver { name: c_str(&info.driver), bus_info: c_str(&info.bus_info) })
}
