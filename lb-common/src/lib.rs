//! Types and pure logic shared by the xlb XDP program (`lb-ebpf`) and its
//! controller (`lb-userspace`).
//!
//! Everything that crosses the kernel/user boundary through a BPF map is
//! defined in [`maps`]: `#[repr(C)]`, explicit padding, integers only, with a
//! compile-time size check. The pure logic (checksum arithmetic, TCP state
//! transitions, the weighted round-robin ring) lives here so it is unit-tested
//! on the host and used unchanged by both sides.
#![no_std]

#[cfg(any(test, feature = "user"))]
extern crate alloc;

pub mod csum;
pub mod icmp;
pub mod maps;
pub mod rst;
/// Ring building runs in the controller only (it allocates).
#[cfg(any(test, feature = "user"))]
pub mod sched;
pub mod sched_hash;
pub mod stats;
pub mod tcp;
