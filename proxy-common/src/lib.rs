//! The ABI between the eBPF datapath (`proxy-ebpf`) and the agent (`proxy-agent`).
//!
//! Every map key and value is `#[repr(C)]` with its padding spelled out as named fields, so the
//! layout is the same for the BPF target and the host and no uninitialised byte ever reaches a
//! hash key. Addresses and ports are kept in network byte order, exactly as they appear in the
//! packet, so the datapath compares and copies them without converting; [`ipv4`] and [`port`]
//! convert on the userspace side.
//!
//! The maps are pinned and outlive the agent, so a layout change here is an upgrade that has to
//! migrate pinned maps: fields reserved for later features are part of the layout on purpose.
#![no_std]

use core::net::Ipv4Addr;

/// Names of the maps, as the kernel and the pin directory know them (at most 15 bytes).
pub mod map_names {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKEND_SLOTS: &str = "BACKEND_SLOTS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const REVNAT: &str = "REVNAT";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const AFFINITY: &str = "AFFINITY";
    pub const CONFIG: &str = "CONFIG";
    pub const STATS: &str = "STATS";
}

/// Default map capacities; the agent can override each one at load time.
pub mod map_sizes {
    pub const SERVICES: u32 = 65_536;
    /// Twice the backends: while a set is being replaced both generations are present.
    pub const BACKEND_SLOTS: u32 = 2 * BACKENDS;
    pub const BACKENDS: u32 = 262_144;
    pub const REVNAT: u32 = SERVICES;
    pub const CONNTRACK: u32 = 262_144;
    pub const AFFINITY: u32 = 65_536;
    /// One entry per backend set, and there are never more sets than frontends.
    pub const STATS: u32 = SERVICES;
}

/// Name of the TC program in the object file.
pub const TC_INGRESS_PROGRAM: &str = "tc_ingress";

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// An IPv4 address as the datapath stores it: the four octets in packet order.
pub const fn ipv4(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// The inverse of [`ipv4`].
pub const fn ipv4_addr(raw: u32) -> Ipv4Addr {
    let [a, b, c, d] = raw.to_ne_bytes();
    Ipv4Addr::new(a, b, c, d)
}

/// A port as the datapath stores it: network byte order.
pub const fn port(port: u16) -> u16 {
    port.to_be()
}

/// The inverse of [`port`].
pub const fn port_host(raw: u16) -> u16 {
    u16::from_be(raw)
}

/// Which backend set a frontend lookup selects. Traffic policies give a Service two sets: the
/// cluster-wide one and the node-local one (`internalTrafficPolicy`/`externalTrafficPolicy:
/// Local`). ClusterIP traffic from pods is looked up in the internal scope.
pub const SCOPE_INTERNAL: u8 = 0;

/// `SERVICES` key: one frontend (ClusterIP:port/protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// `SERVICES` value. `generation` names which half of the double-buffered `BACKEND_SLOTS` holds
/// the current backend set; the agent flips it in one update, so a lookup sees either the old set
/// or the new one, never a mix. `backend_count == 0` means "refuse" (RST / ICMP unreachable).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceValue {
    /// The backend set (a Service port in one scope); frontends of one Service port share it,
    /// and so share `sessionAffinity` state, as kube-proxy's per-port chains do.
    pub svc_id: u32,
    pub backend_count: u32,
    pub generation: u32,
    /// `sessionAffinity: ClientIP` timeout; 0 = no affinity.
    pub affinity_timeout_s: u32,
    /// Key of the `REVNAT` entry that rewrites replies back to this frontend.
    pub revnat_id: u32,
    /// Reserved for per-frontend feature bits (source ranges, traffic policy); 0 today.
    pub flags: u32,
}

/// `BACKEND_SLOTS` key -> backend id (`u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SlotKey {
    pub svc_id: u32,
    pub generation: u32,
    pub slot: u32,
}

/// The backend is terminating (serving only because no endpoint is ready).
pub const BACKEND_F_TERMINATING: u8 = 1 << 0;
/// The backend runs on this node.
pub const BACKEND_F_LOCAL: u8 = 1 << 1;

/// `BACKENDS` value, keyed by a backend id (`u32`). Each backend belongs to one backend set
/// (`svc_id`): conntrack and affinity entries outlive agents, and an id freed and handed out
/// again by a later agent must not send an old client to another Service's pod, so the datapath
/// checks the owner (and, for conntrack, the address) before trusting an id it remembered.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Backend {
    pub addr: u32,
    pub port: u16,
    pub flags: u8,
    pub _pad: u8,
    pub svc_id: u32,
}

/// `REVNAT` value, keyed by a revnat id (`u32`): the frontend a reply must appear to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RevNat {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Conntrack direction: client -> frontend, keyed by the tuple the client sent.
pub const CT_FORWARD: u8 = 0;
/// Conntrack direction: backend -> client, keyed by the tuple the backend sends.
pub const CT_REPLY: u8 = 1;

/// `CONNTRACK` key: the packet's own 5-tuple plus the direction it was recorded for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub direction: u8,
    pub _pad: u16,
}

/// The flow is a hairpin: the client is its own backend, so the source is rewritten to the
/// hairpin address on the way in and restored on the way back.
pub const CT_F_HAIRPIN: u16 = 1 << 0;
/// A FIN or RST was seen: a new SYN on this tuple is a new connection and picks a backend again.
pub const CT_F_CLOSING: u16 = 1 << 1;

/// How long a conntrack entry lives without a packet in either direction, by state: once idle
/// this long it is ignored, so a closed flow's tuple can be reused by a connection that has
/// nothing to do with the Service. Closing lasts a TIME_WAIT (60 s, during which the client's
/// kernel does not reuse the tuple anyway); UDP 120 s as the kernel's conntrack "stream" timeout;
/// established TCP 6 h (kube-proxy's conntrack keeps 24 h, Cilium's 6 h).
pub const CT_TIMEOUT_CLOSING_NS: u64 = 60 * 1_000_000_000;
pub const CT_TIMEOUT_TCP_NS: u64 = 6 * 3600 * 1_000_000_000;
pub const CT_TIMEOUT_UDP_NS: u64 = 120 * 1_000_000_000;

/// `CONNTRACK` value.
/// - forward entry: `nat_addr:nat_port` is the backend the flow was sent to.
/// - reply entry: `nat_addr:nat_port` is the client, restored as destination of hairpin replies;
///   `revnat_id` names the frontend the reply's source is rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct CtValue {
    pub nat_addr: u32,
    pub nat_port: u16,
    pub flags: u16,
    pub backend_id: u32,
    pub revnat_id: u32,
    /// `bpf_ktime_get_ns()` of the last packet seen in this direction.
    pub last_seen_ns: u64,
}

/// `AFFINITY` key: one client of one backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AffinityKey {
    pub svc_id: u32,
    pub client_addr: u32,
}

/// `AFFINITY` value: the backend a client sticks to, and when it last opened a flow to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_used_ns: u64,
}

/// `CONFIG[0]`: node-wide settings written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Config {
    /// Source address given to hairpin flows (a pod reaching itself through its Service): the pod
    /// must not see a packet from its own address. Link-local, so it never leaves the node.
    pub hairpin_addr: u32,
    /// Reserved for feature bits; 0 today.
    pub flags: u32,
}

/// `STATS` value (per CPU), keyed by a backend set's `svc_id`: what the datapath did for one
/// Service port, counted in the client-to-Service direction (replies are not counted). The agent
/// creates the entry, zeroed, before the set's first frontend and deletes it with the set, so the
/// datapath only ever updates entries and a counter never outlives its set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceStats {
    /// Packets addressed to one of the set's frontends, translated or refused.
    pub packets: u64,
    /// Their bytes, as the packet's length at TC (L2 header included).
    pub bytes: u64,
    /// Flows given a backend (new conntrack entries).
    pub flows: u64,
    /// New flows refused because the set had no backend (TCP RST / ICMP port unreachable).
    pub refused: u64,
    /// New flows sent to the client's remembered backend (`sessionAffinity: ClientIP`).
    pub affinity_hits: u64,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: each type is #[repr(C)], Copy, made only of integers, with its padding spelled out
    // as fields, so every bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for ServiceStats {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        // A hash key with a hole would hash uninitialised bytes: every size is the sum of fields.
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceValue>(), 24);
        assert_eq!(size_of::<SlotKey>(), 12);
        assert_eq!(size_of::<Backend>(), 12);
        assert_eq!(size_of::<RevNat>(), 8);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtValue>(), 24);
        assert_eq!(size_of::<AffinityKey>(), 8);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<Config>(), 8);
        assert_eq!(size_of::<ServiceStats>(), 40);
    }

    #[test]
    fn addresses_and_ports_round_trip_in_packet_order() {
        let addr = Ipv4Addr::new(10, 96, 0, 10);
        assert_eq!(ipv4(addr).to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(ipv4_addr(ipv4(addr)), addr);
        assert_eq!(port(8080).to_ne_bytes(), 8080u16.to_be_bytes());
        assert_eq!(port_host(port(443)), 443);
    }
}
