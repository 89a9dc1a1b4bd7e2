//! Indices of the global per-CPU counters in `XLB_STATS`: one per verdict
//! reason, so every packet the program does not forward is accounted for.

macro_rules! stats {
    ($($(#[$doc:meta])* $name:ident = $idx:literal, $label:literal;)*) => {
        $($(#[$doc])* pub const $name: u32 = $idx;)*
        /// Number of named counters (the per-ICMP-kind ones follow them).
        pub const NAMED: u32 = [$($idx),*].len() as u32;
        /// `(index, metric label)` of every named counter, for the
        /// controller.
        pub const LABELS: [(u32, &str); NAMED as usize] = [$(($name, $label)),*];
    };
}

stats! {
    /// Packets seen by the program. Not written by the program (one write
    /// less per packet): the controller sums the verdict counters
    /// ([`VERDICTS`]).
    RX = 0, "rx";
    /// Neither IPv4 nor IPv6 (ARP, QinQ, ...): passed to the kernel.
    PASS_NOT_IP = 1, "pass_not_ip";
    /// IP but not to a service nor from a backend (the host's own
    /// traffic): passed.
    PASS_NOT_SERVICE = 2, "pass_not_service";
    /// Frame too short for the headers it announces, before a VIP could be
    /// identified: passed (the kernel drops it).
    PASS_TRUNCATED = 3, "pass_truncated";
    /// IPv4 with options to a VIP address: passed, never NATed (rare; the
    /// kernel handles or rejects it; no state is created).
    PASS_IP_OPTIONS = 4, "pass_ip_options";
    /// A fragment (IPv4, or IPv6 with a Fragment header) to a VIP address or
    /// from a backend address: dropped, both families, both directions (a
    /// non-first fragment carries no ports, so it cannot be matched to a
    /// flow; NATing only the first one would corrupt the datagram, passing
    /// one from a backend would leak the backend's address).
    DROP_FRAGMENT = 5, "drop_fragment";
    /// Malformed packet to a VIP (bad IHL, TCP data offset, lengths): dropped.
    DROP_MALFORMED = 6, "drop_malformed";
    /// TCP to a VIP with no flow entry that starts nothing (a RST, or a
    /// non-SYN for a service that cannot schedule it statelessly under
    /// `--on-miss rehash`... see `RST_MISS`): passed, no state created.
    PASS_NO_FLOW = 7, "pass_no_flow";
    /// New flow for a service with no usable backend: passed.
    PASS_NO_BACKEND = 8, "pass_no_backend";
    /// The flow table refused an insert: dropped.
    DROP_TABLE_FULL = 9, "drop_table_full";
    /// Next hop not resolved yet: the rewritten packet goes to the kernel,
    /// which forwards it and resolves the neighbour.
    PASS_NO_NEIGH = 10, "pass_no_neigh";
    /// No route (or forwarding disabled) for the rewritten packet: passed.
    PASS_NO_ROUTE = 11, "pass_no_route";
    /// TTL would expire: passed so the kernel sends ICMP time exceeded.
    PASS_TTL = 12, "pass_ttl";
    /// Egress interface not managed by xlb: the rewritten packet is passed.
    PASS_NOT_MANAGED_IFACE = 13, "pass_not_managed_iface";
    /// Forwarded out of the interface it came in on.
    TX = 14, "tx";
    /// Forwarded to another interface.
    REDIRECT = 15, "redirect";
    /// Flows created (half-open ones included).
    NEW_FLOWS = 16, "new_flows";
    /// To a VIP address with another protocol (ICMP...): passed.
    PASS_OTHER_PROTO = 17, "pass_other_proto";
    /// 802.1Q-tagged flow packet: NATed in XDP, then passed so the kernel,
    /// which owns the VLAN devices, forwards it with the right tag.
    PASS_VLAN = 18, "pass_vlan";
    /// Packet of a TCP flow whose backend is down or removed: answered by
    /// the program with a RST (XDP_TX), the flow removed.
    RST_REACTIVE = 19, "rst_reactive";
    /// Non-SYN TCP to a service with no flow entry that cannot be scheduled
    /// by hash (policy `reset`, full NAT): answered with a RST.
    RST_MISS = 20, "rst_miss";
    /// A RST with exactly the expected sequence number passed through: the
    /// flow is torn down.
    RST_TEARDOWN = 21, "rst_teardown";
    /// A RST whose sequence number is not the expected one passed through
    /// without touching the flow (a spoofed or stale RST cannot kill it; the
    /// receiver answers with a challenge ACK, RFC 5961).
    RST_IGNORED = 22, "rst_ignored";
    /// UDP datagram of a flow whose backend is gone: rescheduled.
    UDP_RESCHEDULED = 23, "udp_rescheduled";
    /// UDP datagram from a backend that is gone: dropped.
    DROP_GONE_BACKEND = 24, "drop_gone_backend";
    /// Non-SYN TCP without a flow, forwarded to the backend its hash picks
    /// (Maglev services, or `--on-miss rehash`): no state is created from
    /// it (the backend's answer re-creates the flow, see `REDERIVED`).
    REHASHED = 25, "rehashed";
    /// TCP flows whose handshake completed (the client's ACK acknowledged
    /// the backend's SYN-ACK), and UDP flows the backend answered: moved
    /// from the half-open table to the connection table.
    PROMOTED = 26, "promoted";
    /// Flows removed by the program (RST teardown, reactive reset).
    ENTRIES_REMOVED = 27, "entries_removed";
    /// Flow-log records lost because the ring buffer was full (the packets
    /// were forwarded all the same).
    FLOW_LOG_DROPPED = 28, "flow_log_dropped";
    /// TCP segments outside the tracked window (sequence or
    /// acknowledgement): forwarded, but they change no state and tear
    /// nothing down (a blind attacker cannot move the flow's sequence).
    TCP_OUT_OF_WINDOW = 29, "tcp_out_of_window";
    /// IPv6 with extension headers the program does not follow (a Routing
    /// header, ESP/AH, or a chain longer than `MAX_IPV6_EXT_HDRS`): passed,
    /// no state.
    PASS_IPV6_EXT_HEADERS = 30, "pass_ipv6_ext_headers";
    /// Full-NAT: a new flow found no free source port towards its backend
    /// and was refused (a TCP SYN answered with a RST, or dropped by policy;
    /// UDP dropped). Existing flows are untouched.
    REFUSED_NO_PORT = 31, "refused_no_port";
    /// DSR: a packet that cannot be encapsulated (IPv6, 802.1Q, no
    /// headroom): passed unchanged.
    PASS_NO_ENCAP = 32, "pass_no_encap";
    /// Flows entered in a table (half-open and established): the
    /// controller's eviction count starts from it.
    ENTRIES_CREATED = 33, "entries_created";
    /// Frames whose L4 checksum was a partial seed (sent by a local stack
    /// with TX checksum offload through a virtual interface): NATed with
    /// the seed kept consistent, and completed before XDP_TX/redirect.
    CSUM_PARTIAL = 34, "csum_partial";
    /// A partial-checksum frame too long to complete in XDP: passed to the
    /// kernel, which completes it (already rewritten).
    PASS_CSUM_TOO_LONG = 35, "pass_csum_too_long";
    /// Larger than the egress MTU after NAT or encapsulation (in generic
    /// mode: a GSO frame of a sender with TSO): passed to the kernel
    /// rewritten, which segments it (GSO) or answers it.
    PASS_TOO_BIG = 36, "pass_too_big";
    /// FIB lookups (next-hop cache misses: a slot empty, stale or taken by
    /// another neighbour).
    FIB_LOOKUPS = 37, "fib_lookups";
    /// TCP segments the tracking refuses outright (a non-SYN without ACK, a
    /// SYN-ACK that does not acknowledge the client's SYN): forwarded
    /// unchanged in state.
    TCP_INVALID = 38, "tcp_invalid";
    /// ACKs of a half-open flow that do not acknowledge the backend's
    /// SYN-ACK: forwarded, not promoted.
    HANDSHAKE_UNVERIFIED = 39, "handshake_unverified";
    /// SYNs scheduled by hash without creating any state (Maglev DNAT and
    /// DSR services): a SYN flood creates nothing; the backend's SYN-ACK
    /// creates the half-open flow.
    STATELESS_SYN = 40, "stateless_syn";
    /// A packet from a backend that belongs to no flow: dropped (a TCP one
    /// answered with a RST to the backend), never forwarded with the
    /// backend's address visible.
    DROP_REPLY_NO_FLOW = 41, "drop_reply_no_flow";
    /// Flows re-created from a backend's packet after their entry was lost
    /// (evicted): the backend's own packet says where the flow goes.
    REDERIVED = 42, "rederived";
    /// New flows refused because their backend already has a flow from the
    /// same client address and port through another VIP (DNAT): answered
    /// with a RST, never mixed up.
    REFUSED_COLLISION = 43, "refused_collision";
    /// Full-NAT source ports taken back from flows that are gone (evicted,
    /// closed): by the program, daemon or not.
    PORT_RECLAIMED = 44, "port_reclaimed";
    /// Backend packets forwarded without a flow entry, reverse-NATed from
    /// the backend's service (a SYN-ACK of a stateless SYN, a RST or FIN of
    /// a flow already gone).
    REPLY_STATELESS = 45, "reply_stateless";
    /// ICMP/ICMPv6 errors to a VIP (fragmentation needed, packet too big,
    /// unreachable, time exceeded, parameter problem) quoting a flow:
    /// translated for its backend (outer destination, the quoted header
    /// and ports, every checksum) and forwarded to it.
    ICMP_TO_BACKEND = 46, "icmp_to_backend";
    /// ICMP/ICMPv6 errors about a flow's packets to its backend (the
    /// backend's port unreachable, a router's host unreachable in front of
    /// it): translated for the client (from the VIP, quoting the VIP) and
    /// forwarded to it.
    ICMP_TO_CLIENT = 47, "icmp_to_client";
    /// An ICMP error to a VIP quoting no flow: passed to the kernel (which
    /// has no socket for it), nothing created.
    PASS_ICMP_NO_FLOW = 48, "pass_icmp_no_flow";
    /// An ICMP error quoting a backend's packet of no flow: dropped
    /// (forwarding it would show the client a backend's address).
    DROP_ICMP_NO_FLOW = 49, "drop_icmp_no_flow";
    /// An ICMP error to a VIP whose quote is truncated or inconsistent (not
    /// an IPv4/IPv6 header with TCP/UDP ports): dropped.
    DROP_ICMP_BAD_QUOTE = 50, "drop_icmp_bad_quote";
    /// A packet larger than its egress MTU after NAT or encapsulation, with
    /// DF set (IPv6: always), answered in place with fragmentation needed
    /// / packet too big from the VIP carrying the usable MTU (XDP_TX).
    ICMP_TOO_BIG_SENT = 51, "icmp_too_big_sent";
    /// A packet the entry program could not hand to the full program (its
    /// slot in `XLB_FULL_PROG` empty: only a broken load leaves it so):
    /// passed to the kernel untouched.
    PASS_NO_FULL_PROGRAM = 52, "pass_no_full_program";
}

/// First of the ICMP error counters by kind and outcome
/// ([`icmp_error`]), after the named ones.
pub const ICMP_ERRORS: u32 = NAMED;
/// Number of counters in `XLB_STATS`.
pub const COUNT: u32 = ICMP_ERRORS + (crate::icmp::KINDS.len() * crate::icmp::OUTCOMES.len()) as u32;

/// The counter of ICMP errors of kind `kind` (`icmp::KIND_*`) that ended
/// with `outcome` (`icmp::OUTCOME_*`): one more per error xlb handles, next
/// to the per-direction totals above. Out-of-range arguments give an index
/// past the table (the bump is then a no-op).
pub const fn icmp_error(kind: u8, outcome: u8) -> u32 {
    ICMP_ERRORS + kind as u32 * crate::icmp::OUTCOMES.len() as u32 + outcome as u32
}

/// The counters that are verdicts: every packet the program sees adds one
/// to exactly one of them (their sum is [`RX`]).
pub const VERDICTS: [u32; 32] = [
    PASS_NOT_IP,
    PASS_NOT_SERVICE,
    PASS_TRUNCATED,
    PASS_IP_OPTIONS,
    DROP_FRAGMENT,
    DROP_MALFORMED,
    PASS_NO_FLOW,
    PASS_NO_BACKEND,
    DROP_TABLE_FULL,
    PASS_NO_NEIGH,
    PASS_NO_ROUTE,
    PASS_TTL,
    PASS_NOT_MANAGED_IFACE,
    TX,
    REDIRECT,
    PASS_OTHER_PROTO,
    PASS_VLAN,
    RST_REACTIVE,
    RST_MISS,
    DROP_GONE_BACKEND,
    PASS_IPV6_EXT_HEADERS,
    REFUSED_NO_PORT,
    PASS_NO_ENCAP,
    PASS_CSUM_TOO_LONG,
    PASS_TOO_BIG,
    DROP_REPLY_NO_FLOW,
    REFUSED_COLLISION,
    PASS_ICMP_NO_FLOW,
    DROP_ICMP_NO_FLOW,
    DROP_ICMP_BAD_QUOTE,
    ICMP_TOO_BIG_SENT,
    PASS_NO_FULL_PROGRAM,
];
