#![no_std]
//! Nothing here: the XDP program is the `xlb` binary. This empty library lets
//! lb-userspace name lb-ebpf as a build dependency.
