//! Synthetic flow-table entries, as the data plane writes them, for tests
//! and benchmarks that need a populated table without traffic.

use std::net::SocketAddr;

use lb_common::{
    maps::{DIR_TO_BACKEND, DIR_TO_CLIENT, FlowEntry, FlowKey, NAT_DST, NAT_SRC, PROTO_TCP, addr_from_ip},
    tcp,
};

/// A port as the maps hold it (network byte order in a native integer).
pub fn net_port(p: u16) -> u16 {
    u16::from_ne_bytes(p.to_be_bytes())
}

/// The map key of a packet from `src` to `dst`.
pub fn key(src: SocketAddr, dst: SocketAddr, proto: u8) -> FlowKey {
    FlowKey {
        src_addr: addr_from_ip(src.ip()),
        dst_addr: addr_from_ip(dst.ip()),
        src_port: net_port(src.port()),
        dst_port: net_port(dst.port()),
        proto,
        _pad: [0; 3],
    }
}

/// Both entries of an established DNAT TCP flow client → VIP → backend:
/// (client → VIP key and entry, backend → client key and entry), with the
/// given next expected sequence numbers.
pub fn dnat_pair(client: SocketAddr, vip: SocketAddr, backend: SocketAddr, backend_id: u32, seq: (u32, u32)) -> [(FlowKey, FlowEntry); 2] {
    let fkey = key(client, vip, PROTO_TCP);
    let entry = |dir, to: (SocketAddr, SocketAddr), nat_flags, seq_next| FlowEntry {
        nat_src: addr_from_ip(to.0.ip()),
        nat_dst: addr_from_ip(to.1.ip()),
        nat_sport: net_port(to.0.port()),
        nat_dport: net_port(to.1.port()),
        direction: dir,
        tcp_state: tcp::STATE_ESTABLISHED,
        nat_flags,
        backend_id,
        seq_next,
        ..Default::default()
    };
    let fwd = entry(DIR_TO_BACKEND, (client, backend), NAT_DST, seq.0);
    let rev = entry(DIR_TO_CLIENT, (vip, client), NAT_SRC, seq.1);
    [(fkey, fwd), (fwd.peer_key(PROTO_TCP), rev)]
}
