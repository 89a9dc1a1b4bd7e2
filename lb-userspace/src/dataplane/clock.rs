//! The data plane's clock. Flow times in the table are jiffies (one load
//! in the program, where a nanosecond clock costs a helper call per
//! packet); the controller reads "now" in the same unit by running the
//! program's `xlb_clock` (`BPF_PROG_TEST_RUN`: it writes jiffies and the
//! coarse monotonic clock into its test frame), and learns the tick rate
//! (HZ) from two readings.

use std::{
    io, mem,
    os::fd::{AsRawFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr` (up to `ctx_out`).
#[repr(C)]
#[derive(Default)]
struct TestAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// A reading: jiffies (all 64 bits) and the coarse monotonic clock, at the
/// same instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    pub jiffies: u64,
    pub coarse_ns: u64,
}

/// The data plane's clock: a handle on the `xlb_clock` program (cheap to
/// clone onto other threads) and its tick rate.
#[derive(Clone)]
pub struct Clock {
    prog: Arc<OwnedFd>,
    hz: u32,
}

/// Tick rates Linux builds with (`CONFIG_HZ`).
const RATES: [u32; 5] = [100, 250, 300, 500, 1000];

impl Clock {
    /// Opens the clock on the loaded `xlb_clock` program (`prog`: its
    /// descriptor, duplicated) and measures HZ over `probe` (a few ticks
    /// at the slowest rate are enough to tell the rates apart).
    pub fn new(prog: OwnedFd, probe: Duration) -> io::Result<Clock> {
        let prog = Arc::new(prog);
        let first = read(&prog)?;
        std::thread::sleep(probe);
        let second = read(&prog)?;
        let ticks = second.jiffies.saturating_sub(first.jiffies) as f64;
        let secs = second.coarse_ns.saturating_sub(first.coarse_ns) as f64 / 1e9;
        if secs <= 0.0 || ticks <= 0.0 {
            return Err(io::Error::other("the data plane's clock did not move while it was measured"));
        }
        let measured = ticks / secs;
        let hz = RATES.iter().copied().min_by(|a, b| (*a as f64 - measured).abs().total_cmp(&(*b as f64 - measured).abs())).unwrap_or(250);
        Ok(Clock { prog, hz })
    }

    /// Jiffies per second (the kernel's `CONFIG_HZ`).
    pub fn hz(&self) -> u32 {
        self.hz
    }

    /// Jiffies now, as the program reads them.
    pub fn now(&self) -> io::Result<u64> {
        read(&self.prog).map(|r| r.jiffies)
    }

    /// A reading now.
    pub fn reading(&self) -> io::Result<Reading> {
        read(&self.prog)
    }
}

/// Runs `xlb_clock` once and returns what it wrote.
fn read(prog: &OwnedFd) -> io::Result<Reading> {
    // Ethernet-sized: XDP test runs need at least a header's worth.
    let data_in = [0u8; 64];
    let mut data_out = [0u8; 64];
    let mut attr = TestAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: data_in.len() as u32,
        data_size_out: data_out.len() as u32,
        data_in: data_in.as_ptr() as u64,
        data_out: data_out.as_mut_ptr() as u64,
        repeat: 1,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid bpf_attr prefix of the size passed; the
    // buffers outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &mut attr as *mut TestAttr, mem::size_of::<TestAttr>() as libc::c_uint) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let word = |i: usize| u64::from_ne_bytes(data_out[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    Ok(Reading { jiffies: word(0), coarse_ns: word(1) })
}
