//! What the data plane needs from the host (sysctls, resolved next hops)
//! and what the kernel says runs on its interfaces.
pub mod links;
pub mod neighbours;
pub mod sysctl;
