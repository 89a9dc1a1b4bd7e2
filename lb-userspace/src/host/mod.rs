//! What the data plane needs from the host: sysctls, resolved next hops.
pub mod neighbours;
pub mod sysctl;
