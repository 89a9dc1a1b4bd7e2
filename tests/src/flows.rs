//! Synthetic flow-table entries, as the data plane writes them, for tests
//! and benchmarks that need a populated table without traffic.

use std::net::SocketAddr;

use lb_common::{
    maps::{FlowKey, FlowState, PROTO_TCP, TCPD_SEEN, TcpDir, addr_from_ip},
    tcp,
};

/// A port as the maps hold it (network byte order in a native integer).
pub fn net_port(p: u16) -> u16 {
    u16::from_ne_bytes(p.to_be_bytes())
}

/// The map key of a packet from `src` to `dst`.
pub fn key(src: SocketAddr, dst: SocketAddr, proto: u8) -> FlowKey {
    FlowKey::new(addr_from_ip(src.ip()), addr_from_ip(dst.ip()), net_port(src.port()), net_port(dst.port()), proto)
}

/// One side of an established TCP flow: it sent up to `end`, the peer
/// allows a 64 KiB window past it.
fn side(end: u32) -> TcpDir {
    TcpDir { end, maxend: end.wrapping_add(65_535), maxwin: 65_535, state: tcp::STATE_ESTABLISHED, flags: TCPD_SEEN, ..Default::default() }
}

/// The one entry of an established DNAT TCP flow client → VIP → backend
/// `backend_id` of service `service_id`, at jiffies `now`, where the client
/// sent up to `seq.0` and the backend up to `seq.1`.
pub fn established(client: SocketAddr, vip: SocketAddr, service_id: u32, backend_id: u32, seq: (u32, u32), now: u32) -> (FlowKey, FlowState) {
    let state = FlowState {
        backend_id: backend_id as u16,
        service_id: service_id as u8,
        created: now,
        last_seen: now,
        packets_orig: 2,
        packets_reply: 1,
        orig: side(seq.0),
        reply: side(seq.1),
        ..Default::default()
    };
    (key(client, vip, PROTO_TCP), state)
}
