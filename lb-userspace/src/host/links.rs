//! What the kernel says runs on an interface: the liveness check (`xlb
//! health`) asks it rather than trusting the controller's own records, so
//! an interface that was deleted, re-created or had its program replaced
//! shows up at once.

use std::io;

use netlink_packet_core::NLM_F_DUMP;
use netlink_packet_route::{
    RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkMessage, LinkXdp},
};

use super::neighbours::Netlink;

/// The XDP program attached to an interface, as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpOnLink {
    /// The program's id (`None`: no XDP program on the interface).
    pub program_id: Option<u32>,
}

impl Netlink {
    /// The XDP program on interface `ifindex`; `NotFound` when there is no
    /// such interface.
    pub fn xdp_program(&mut self, ifindex: u32) -> io::Result<XdpOnLink> {
        let mut m = LinkMessage::default();
        m.header.index = ifindex;
        let answers = match self.request(RouteNetlinkMessage::GetLink(m), 0) {
            Ok(a) => a,
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
                return Err(io::Error::new(io::ErrorKind::NotFound, format!("no interface with index {ifindex}")));
            }
            Err(e) => return Err(e),
        };
        for a in answers {
            if let RouteNetlinkMessage::NewLink(l) = a {
                let mut program_id = None;
                for attr in &l.attributes {
                    if let LinkAttribute::Xdp(xdp) = attr {
                        for x in xdp {
                            // One program per interface here: whichever
                            // mode reports it.
                            if let LinkXdp::ProgId(id) | LinkXdp::DrvProgId(id) | LinkXdp::SkbProgId(id) = x
                                && *id != 0
                            {
                                program_id = Some(*id);
                            }
                        }
                    }
                }
                return Ok(XdpOnLink { program_id });
            }
        }
        Err(io::Error::new(io::ErrorKind::NotFound, format!("no interface with index {ifindex}")))
    }

    /// Every address of this host (in the current network namespace), both
    /// families.
    pub fn local_addresses(&mut self) -> io::Result<Vec<std::net::IpAddr>> {
        let mut out = Vec::new();
        for a in self.request(RouteNetlinkMessage::GetAddress(AddressMessage::default()), NLM_F_DUMP)? {
            if let RouteNetlinkMessage::NewAddress(m) = a {
                for attr in &m.attributes {
                    if let AddressAttribute::Local(ip) | AddressAttribute::Address(ip) = attr
                        && !out.contains(ip)
                    {
                        out.push(*ip);
                    }
                }
            }
        }
        Ok(out)
    }
}
