//! Packet tests of the TC program through `BPF_PROG_TEST_RUN`: each case is (packet in + map
//! state) -> (verdict + packet out), and every output is parsed back with checksums verified, the
//! way a receiving TCP/IP stack would. Map state is written through the agent's own sync path.
//!
//! Needs root (CAP_BPF, CAP_SYS_ADMIN for bpffs); `cargo xtask test` runs it as root.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

use aya::maps::{HashMap, Map, MapData, PerCpuHashMap};
use aya::programs::{TestRun, TestRunOptions};
use etherparse::{
    IpHeaders, Ipv4Header, Ipv4Options, NetHeaders, PacketBuilder, PacketHeaders, TransportHeader,
};
use proxy_agent::dataplane::Dataplane;
use proxy_agent::dataplane::maps::Maps;
use proxy_agent::loader::{self, Datapath, MapSizes};
use proxy_agent::model::{
    BackendSet, DesiredState, EndpointInfo, Frontend, ObjectRef, Protocol, ServicePortName,
};
use proxy_common::{
    AffinityKey, AffinityValue, CT_FORWARD, CT_REPLY, Config, CtKey, CtValue, ServiceStats, ipv4,
    map_names, port,
};

/// TC_ACT_UNSPEC (-1), TCX_NEXT: the packet goes on to the device's next program and the stack.
const PASS: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 244, 1, 11),
    Ipv4Addr::new(10, 244, 1, 12),
    Ipv4Addr::new(10, 244, 2, 11),
];

/// A loaded datapath on its own pin directory, removed on drop.
struct Harness {
    dir: PathBuf,
    /// Taken by the drop, which must let go of it to remove it.
    datapath: Option<Datapath>,
    dataplane: Dataplane,
    /// What the maps were last synced to.
    desired: DesiredState,
}

impl Harness {
    fn new() -> Harness {
        Harness::with_sizes(MapSizes::default())
    }

    fn with_sizes(sizes: MapSizes) -> Harness {
        assert!(
            nix::unistd::geteuid().is_root(),
            "packet tests need root (CAP_BPF, CAP_SYS_ADMIN): run `cargo xtask test` as root"
        );
        // Each test runs on its own thread: a network namespace of its own for that thread makes
        // the program's FIB lookups see only the routes the test sets up (none by default, and
        // forwarding off, so translated packets are passed to the kernel as they are).
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        loader::ensure_bpffs().unwrap();
        let dir = proxy_testbed::scratch_bpf_dir("datapath");
        let datapath = Datapath::load(&dir, &sizes).unwrap();
        let mut maps = Maps::open_pinned(&dir).unwrap();
        maps.write_config(Config {
            hairpin_addr: ipv4(HAIRPIN),
            flags: 0,
        })
        .unwrap();
        let dataplane = Dataplane::adopt(maps).unwrap();
        Harness {
            dir,
            datapath: Some(datapath),
            dataplane,
            desired: DesiredState::default(),
        }
    }

    /// One Service port VIP:`port` -> `backends`:`target_port`.
    fn service(
        &mut self,
        protocol: Protocol,
        port: u16,
        target_port: u16,
        backends: &[Ipv4Addr],
        affinity: Option<u32>,
    ) {
        let set = BackendSet {
            frontends: BTreeSet::from([Frontend {
                addr: VIP,
                port,
                protocol,
            }]),
            endpoints: backends
                .iter()
                .map(|addr| {
                    (
                        SocketAddrV4::new(*addr, target_port),
                        EndpointInfo::default(),
                    )
                })
                .collect(),
            affinity_timeout_s: affinity,
        };
        let name = ServicePortName {
            service: ObjectRef {
                namespace: "default".into(),
                name: "kubia".into(),
            },
            port_name: String::new(),
            protocol,
        };
        let desired = DesiredState {
            backend_sets: BTreeMap::from([(name, set)]),
        };
        let changes = desired.changes_from(&self.desired);
        self.dataplane.sync(&desired, &changes).unwrap();
        self.desired = desired;
    }

    fn run(&mut self, packet: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; 2048];
        let options = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let datapath = self.datapath.as_mut().expect("taken only by the drop");
        let result = datapath.program().unwrap().test_run(options).unwrap();
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn backend_id(&self, addr: Ipv4Addr) -> u32 {
        let state = self.dataplane.state();
        *state
            .backends()
            .iter()
            .find(|(_, b)| b.addr == ipv4(addr))
            .unwrap()
            .0
    }

    fn conntrack(&self) -> HashMap<MapData, CtKey, CtValue> {
        let map = MapData::from_pin(self.dir.join(map_names::CONNTRACK)).unwrap();
        HashMap::try_from(Map::LruHashMap(map)).unwrap()
    }

    fn affinity(&self) -> HashMap<MapData, AffinityKey, AffinityValue> {
        let map = MapData::from_pin(self.dir.join(map_names::AFFINITY)).unwrap();
        HashMap::try_from(Map::LruHashMap(map)).unwrap()
    }

    /// The `STATS` entry of set `svc_id`, summed over the CPUs; `None` if there is none.
    fn stats(&self, svc_id: u32) -> Option<ServiceStats> {
        let map = MapData::from_pin(self.dir.join(map_names::STATS)).unwrap();
        let map = PerCpuHashMap::<_, u32, ServiceStats>::try_from(Map::PerCpuHashMap(map)).unwrap();
        let per_cpu = map.get(&svc_id, 0).ok()?;
        Some(
            per_cpu
                .iter()
                .fold(ServiceStats::default(), |sum, cpu| ServiceStats {
                    packets: sum.packets + cpu.packets,
                    bytes: sum.bytes + cpu.bytes,
                    flows: sum.flows + cpu.flows,
                    refused: sum.refused + cpu.refused,
                    affinity_hits: sum.affinity_hits + cpu.affinity_hits,
                }),
        )
    }

    fn svc_id(&self) -> u32 {
        self.dataplane
            .state()
            .services()
            .values()
            .next()
            .unwrap()
            .svc_id
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let removed = self.datapath.take().map(Datapath::uninstall);
        if let Some(Err(error)) = removed {
            let message = format!("cleaning up {}: {error:#}", self.dir.display());
            // A leftover's maps stay in kernel memory: fail the test, unless it already fails.
            if std::thread::panicking() {
                eprintln!("{message}");
            } else {
                panic!("{message}");
            }
        }
    }
}

/// Monotonic time as `bpf_ktime_get_ns` counts it.
fn now_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

enum Tcp {
    Syn,
    Ack,
    Fin,
}

fn tcp(src: SocketAddrV4, dst: SocketAddrV4, kind: Tcp, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .tcp(src.port(), dst.port(), 1000, 64240);
    let builder = match kind {
        Tcp::Syn => builder.syn(),
        Tcp::Ack => builder.ack(5000),
        Tcp::Fin => builder.ack(5000).fin(),
    };
    let mut out = Vec::new();
    builder.write(&mut out, payload).unwrap();
    out
}

fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .udp(src.port(), dst.port())
        .write(&mut out, payload)
        .unwrap();
    out
}

/// A parsed output packet whose IP and L4 checksums were verified.
struct Out {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    headers: PacketHeaders<'static>,
}

fn parse(packet: Vec<u8>) -> Out {
    let packet: &'static [u8] = packet.leak();
    let headers = PacketHeaders::from_ethernet_slice(packet).expect("output parses");
    let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
        panic!("not IPv4: {headers:?}")
    };
    assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "IP checksum");
    let payload = headers.payload.slice();
    let (sport, dport) = match &headers.transport {
        Some(TransportHeader::Tcp(t)) => {
            let expected = t.calc_checksum_ipv4(ip, payload).unwrap();
            assert_eq!(t.checksum, expected, "TCP checksum");
            (t.source_port, t.destination_port)
        }
        Some(TransportHeader::Udp(u)) => {
            if u.checksum != 0 {
                let expected = u.calc_checksum_ipv4(ip, payload).unwrap();
                assert_eq!(u.checksum, expected, "UDP checksum");
            }
            (u.source_port, u.destination_port)
        }
        Some(TransportHeader::Icmpv4(i)) => {
            let mut expected = i.clone();
            expected.update_checksum(payload);
            assert_eq!(i.checksum, expected.checksum, "ICMP checksum");
            (0, 0)
        }
        other => panic!("unexpected transport {other:?}"),
    };
    let src = SocketAddrV4::new(ip.source.into(), sport);
    let dst = SocketAddrV4::new(ip.destination.into(), dport);
    Out { src, dst, headers }
}

fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT, port)
}

fn vip(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(VIP, port)
}

fn backend(i: usize, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(BACKENDS[i], port)
}

#[test]
fn packets_not_for_a_frontend_pass_untouched() {
    let mut h = Harness::new();
    h.service(Protocol::Tcp, 80, 8080, &BACKENDS, None);
    let pod = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 11), 80);
    let cases = [
        ("other address", tcp(client(40000), pod, Tcp::Syn, b"")),
        ("other port", tcp(client(40000), vip(81), Tcp::Syn, b"")),
        ("other protocol", udp(client(40000), vip(80), b"x")),
    ];
    for (case, packet) in cases {
        let (verdict, out) = h.run(&packet);
        assert_eq!((verdict, &out), (PASS, &packet), "{case}");
    }
}

#[test]
fn a_new_flow_is_sent_to_a_backend_and_its_replies_come_from_the_frontend() {
    let mut h = Harness::new();
    h.service(Protocol::Tcp, 80, 8080, &BACKENDS, None);

    let (verdict, out) = h.run(&tcp(client(40000), vip(80), Tcp::Syn, b""));
    let out = parse(out);
    assert_eq!(verdict, PASS);
    assert_eq!(out.src, client(40000));
    let chosen = out.dst;
    assert!(
        BACKENDS.contains(chosen.ip()) && chosen.port() == 8080,
        "DNAT to a backend, got {chosen}"
    );

    // The established flow keeps its backend, payload and all.
    let request = b"GET / HTTP/1.1\r\n\r\n";
    for _ in 0..10 {
        let out = parse(h.run(&tcp(client(40000), vip(80), Tcp::Ack, request)).1);
        assert_eq!(out.dst, chosen);
        assert_eq!(out.headers.payload.slice(), request);
    }

    // The backend's reply is rewritten back to the frontend the client used.
    let (verdict, reply) = h.run(&tcp(
        chosen,
        client(40000),
        Tcp::Ack,
        b"HTTP/1.1 200 OK\r\n",
    ));
    let reply = parse(reply);
    assert_eq!(verdict, PASS);
    assert_eq!((reply.src, reply.dst), (vip(80), client(40000)));

    let ct = h.conntrack();
    assert_eq!(ct.iter().count(), 2, "one forward and one reply entry");
}

#[test]
fn new_flows_spread_over_every_backend() {
    let mut h = Harness::new();
    h.service(Protocol::Tcp, 80, 8080, &BACKENDS, None);
    let mut hits = BTreeMap::<Ipv4Addr, u32>::new();
    for port in 0..300 {
        let out = parse(h.run(&tcp(client(20000 + port), vip(80), Tcp::Syn, b"")).1);
        *hits.entry(*out.dst.ip()).or_default() += 1;
    }
    for addr in BACKENDS {
        let share = hits.get(&addr).copied().unwrap_or(0);
        assert!(share >= 45, "{addr} got {share} of 300 new flows: {hits:?}");
    }
}

#[test]
fn udp_is_translated_both_ways_and_a_zero_checksum_stays_zero() {
    let mut h = Harness::new();
    h.service(Protocol::Udp, 53, 5353, &BACKENDS[..1], None);

    let out = parse(h.run(&udp(client(40001), vip(53), b"query")).1);
    assert_eq!(out.dst, backend(0, 5353));
    let reply = parse(h.run(&udp(backend(0, 5353), client(40001), b"answer")).1);
    assert_eq!((reply.src, reply.dst), (vip(53), client(40001)));

    // A UDP checksum of 0 means "not computed" and must not become a wrong non-zero one.
    let mut packet = udp(client(40002), vip(53), b"query");
    packet[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    let out = parse(h.run(&packet).1);
    let Some(TransportHeader::Udp(header)) = &out.headers.transport else {
        panic!("not UDP")
    };
    assert_eq!((out.dst, header.checksum), (backend(0, 5353), 0));
}

#[test]
fn a_packet_with_ip_options_is_translated() {
    let mut h = Harness::new();
    h.service(Protocol::Tcp, 80, 8080, &BACKENDS[..1], None);
    let mut ip = Ipv4Header::new(
        0,
        64,
        etherparse::IpNumber::TCP,
        CLIENT.octets(),
        VIP.octets(),
    )
    .unwrap();
    ip.options = Ipv4Options::from([1, 1, 1, 0]); // NOP NOP NOP EOL
    let mut packet = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .tcp(40000, 80, 1, 64240)
        .syn()
        .write(&mut packet, b"")
        .unwrap();
    let out = parse(h.run(&packet).1);
    assert_eq!(out.dst, backend(0, 8080));
}

#[test]
fn a_frontend_without_backends_refuses_tcp_with_a_reset() {
    let mut h = Harness::new();
    h.service(Protocol::Tcp, 80, 8080, &[], None);
    // (case, segment, expected seq, expected ack number, expected (RST, ACK) flags)
    let cases = [
        (
            "SYN",
            tcp(client(40000), vip(80), Tcp::Syn, b""),
            0,
            1001,
            (true, true),
        ),
        (
            "data with ACK",
            tcp(client(40000), vip(80), Tcp::Ack, b"hello"),
            5000,
            0,
            (true, false),
        ),
    ];
    for (case, packet, seq, ack, flags) in cases {
        let (verdict, out) = h.run(&packet);
        assert_eq!(
            verdict, TC_ACT_REDIRECT,
            "{case}: sent back out of the device it came in on"
        );
        let out = parse(out);
        assert_eq!((out.src, out.dst), (vip(80), client(40000)), "{case}");
        let Some(etherparse::LinkHeader::Ethernet2(eth)) = &out.headers.link else {
            panic!("{case}: no Ethernet header")
        };
        assert_eq!(
            (eth.source, eth.destination),
            (NODE_MAC, CLIENT_MAC),
            "{case}: MACs swapped"
        );
        let Some(TransportHeader::Tcp(t)) = &out.headers.transport else {
            panic!("{case}: not TCP")
        };
        assert_eq!((t.rst, t.ack, t.syn), (flags.0, flags.1, false), "{case}");
        assert_eq!(t.sequence_number, seq, "{case}");
        if flags.1 {
            assert_eq!(t.acknowledgment_number, ack, "{case}");
        }
        assert!(
            out.headers.payload.slice().is_empty(),
            "{case}: a RST carries no data"
        );
    }
}

#[test]
fn a_frontend_without_backends_refuses_udp_with_port_unreachable() {
    let mut h = Harness::new();
    h.service(Protocol::Udp, 53, 5353, &[], None);
    let packet = udp(client(40001), vip(53), b"a query of some length");
    let (verdict, out) = h.run(&packet);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let out = parse(out);
    assert_eq!((*out.src.ip(), *out.dst.ip()), (VIP, CLIENT));
    let Some(TransportHeader::Icmpv4(icmp)) = &out.headers.transport else {
        panic!("not ICMP")
    };
    assert_eq!(
        icmp.icmp_type,
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port
        )
    );
    // The quote is the original IP header and the first 8 bytes after it: the client's kernel
    // finds its socket from it.
    assert_eq!(out.headers.payload.slice(), &packet[14..14 + 28]);
}

#[test]
fn client_ip_affinity_sticks_while_fresh_and_chooses_again_when_expired() {
    let mut h = Harness::new();
    h.service(Protocol::Tcp, 80, 8080, &BACKENDS, Some(3));
    let key = AffinityKey {
        svc_id: h.svc_id(),
        client_addr: ipv4(CLIENT),
    };
    let sticky = h.backend_id(BACKENDS[1]);
    let entry = |last_used_ns| AffinityValue {
        backend_id: sticky,
        _pad: 0,
        last_used_ns,
    };
    h.affinity().insert(key, entry(now_ns()), 0).unwrap();

    // Fresh: every new flow of this client goes to its backend.
    for port in 0..50 {
        let out = parse(h.run(&tcp(client(30000 + port), vip(80), Tcp::Syn, b"")).1);
        assert_eq!(out.dst, backend(1, 8080), "flow {port}");
    }

    // Expired (older than the 3 s timeout): each new flow chooses afresh and the entry records
    // the new choice.
    let mut chosen = BTreeSet::new();
    for port in 0..30 {
        h.affinity()
            .insert(key, entry(now_ns() - 4_000_000_000), 0)
            .unwrap();
        let before = now_ns();
        let out = parse(h.run(&tcp(client(31000 + port), vip(80), Tcp::Syn, b"")).1);
        let refreshed = h.affinity().get(&key, 0).unwrap();
        assert!(refreshed.last_used_ns >= before, "the entry was refreshed");
        assert_eq!(
            refreshed.backend_id,
            h.backend_id(*out.dst.ip()),
            "the entry names the new choice"
        );
        chosen.insert(*out.dst.ip());
    }
    assert!(
        chosen.len() > 1,
        "expired affinity must choose again, always got {chosen:?}"
    );
}

#[test]
fn a_pod_reaching_itself_is_hairpinned_through_the_link_local_address() {
    let mut h = Harness::new();
    // The client is the only backend.
    h.service(Protocol::Tcp, 80, 8080, &[CLIENT], None);
    let out = parse(h.run(&tcp(client(40000), vip(80), Tcp::Syn, b"")).1);
    let hairpin = SocketAddrV4::new(HAIRPIN, 40000);
    assert_eq!(
        (out.src, out.dst),
        (hairpin, client(8080)),
        "the pod must not see its own address as source"
    );

    let reply = parse(h.run(&tcp(client(8080), hairpin, Tcp::Ack, b"")).1);
    assert_eq!((reply.src, reply.dst), (vip(80), client(40000)));
}

#[test]
fn a_closed_tuple_or_a_removed_backend_makes_a_new_syn_choose_again() {
    let mut h = Harness::new();
    let syn = || tcp(client(40000), vip(80), Tcp::Syn, b"");
    h.service(Protocol::Tcp, 80, 8080, &BACKENDS[..1], None);
    assert_eq!(parse(h.run(&syn()).1).dst, backend(0, 8080));
    h.run(&tcp(client(40000), vip(80), Tcp::Fin, b""));

    // The set now has another backend: the closed tuple's new SYN goes there.
    h.service(Protocol::Tcp, 80, 8080, &BACKENDS[1..2], None);
    assert_eq!(parse(h.run(&syn()).1).dst, backend(1, 8080));

    // An established flow to a removed backend keeps going (the pod may be terminating)...
    h.service(Protocol::Tcp, 80, 8080, &BACKENDS[2..], None);
    let data = tcp(client(40000), vip(80), Tcp::Ack, b"x");
    assert_eq!(parse(h.run(&data).1).dst, backend(1, 8080));
    // ... but a new SYN on that tuple chooses among the current backends.
    assert_eq!(parse(h.run(&syn()).1).dst, backend(2, 8080));
}

#[test]
fn udp_to_a_removed_backend_moves_to_a_current_one() {
    let mut h = Harness::new();
    h.service(Protocol::Udp, 53, 5353, &BACKENDS[..1], None);
    let query = || udp(client(40001), vip(53), b"query");
    assert_eq!(parse(h.run(&query()).1).dst, backend(0, 5353));
    h.service(Protocol::Udp, 53, 5353, &BACKENDS[1..2], None);
    assert_eq!(parse(h.run(&query()).1).dst, backend(1, 5353));
}

/// Moves every conntrack entry of `direction` back in time by `age_ns`.
fn age_conntrack(h: &Harness, direction: u8, age_ns: u64) {
    let mut ct = h.conntrack();
    let entries: Vec<(CtKey, CtValue)> = ct.iter().map(Result::unwrap).collect();
    for (key, mut value) in entries {
        if key.direction == direction {
            value.last_seen_ns = value.last_seen_ns.saturating_sub(age_ns);
            ct.insert(key, value, 0).unwrap();
        }
    }
}

#[test]
fn conntrack_entries_expire_only_when_both_directions_are_idle() {
    let mut h = Harness::new();
    h.service(Protocol::Udp, 53, 5353, &BACKENDS[..1], None);
    parse(h.run(&udp(client(40001), vip(53), b"query")).1);
    let reply = || udp(backend(0, 5353), client(40001), b"answer");

    // The client went quiet for 10 minutes but the backend kept talking: still one flow.
    age_conntrack(&h, CT_FORWARD, 600_000_000_000);
    let out = parse(h.run(&reply()).1);
    assert_eq!(out.src, vip(53), "a live reply direction keeps the flow");

    // Both directions idle past the UDP timeout: the tuple is no longer the Service's, and a
    // datagram from the pod's address is passed as it is.
    age_conntrack(&h, CT_FORWARD, 600_000_000_000);
    age_conntrack(&h, CT_REPLY, 600_000_000_000);
    let packet = reply();
    assert_eq!(h.run(&packet), (PASS, packet));
}

#[test]
fn a_closed_flows_reply_entry_stops_translating_once_it_expires() {
    let mut h = Harness::new();
    h.service(Protocol::Tcp, 80, 8080, &BACKENDS[..1], None);
    parse(h.run(&tcp(client(40000), vip(80), Tcp::Syn, b"")).1);
    // The client closes: both directions are marked closing by the client's FIN.
    parse(h.run(&tcp(client(40000), vip(80), Tcp::Fin, b"")).1);
    let ct = h.conntrack();
    let closing: Vec<u16> = ct.iter().map(|entry| entry.unwrap().1.flags).collect();
    assert!(
        closing
            .iter()
            .all(|flags| flags & proxy_common::CT_F_CLOSING != 0),
        "{closing:?}"
    );

    // Past the closing timeout, the same tuple opened directly to the pod is left alone.
    age_conntrack(&h, CT_FORWARD, 61_000_000_000);
    age_conntrack(&h, CT_REPLY, 61_000_000_000);
    let direct = tcp(backend(0, 8080), client(40000), Tcp::Ack, b"");
    assert_eq!(h.run(&direct), (PASS, direct));
}

#[test]
fn an_affinity_entry_naming_another_sets_backend_is_not_followed() {
    let mut h = Harness::new();
    h.service(Protocol::Tcp, 80, 8080, &BACKENDS[..1], Some(10800));
    // An entry left by an earlier agent names a backend id that now belongs to another set.
    let key = AffinityKey {
        svc_id: h.svc_id(),
        client_addr: ipv4(CLIENT),
    };
    let stranger = 9999;
    let map = MapData::from_pin(h.dir.join(map_names::BACKENDS)).unwrap();
    let mut backends: HashMap<MapData, u32, proxy_common::Backend> =
        HashMap::try_from(Map::HashMap(map)).unwrap();
    let other_set = proxy_common::Backend {
        addr: ipv4(Ipv4Addr::new(10, 244, 9, 9)),
        port: port(8080),
        flags: 0,
        _pad: 0,
        svc_id: h.svc_id() + 1,
    };
    backends.insert(stranger, other_set, 0).unwrap();
    let entry = AffinityValue {
        backend_id: stranger,
        _pad: 0,
        last_used_ns: now_ns(),
    };
    h.affinity().insert(key, entry, 0).unwrap();
    let out = parse(h.run(&tcp(client(40000), vip(80), Tcp::Syn, b"")).1);
    assert_eq!(out.dst, backend(0, 8080));
}

#[test]
fn a_reset_to_a_frontend_without_backends_is_not_answered() {
    let mut h = Harness::new();
    h.service(Protocol::Tcp, 80, 8080, &[], None);
    let mut packet = tcp(client(40000), vip(80), Tcp::Ack, b"");
    packet[14 + 20 + 13] |= 0x04; // RST
    let (verdict, _) = h.run(&packet);
    assert_eq!(verdict, TC_ACT_SHOT);
}

#[test]
fn a_translated_packet_is_sent_to_its_backends_device_with_the_neighbours_mac() {
    let mut h = Harness::new();
    h.service(Protocol::Tcp, 80, 8080, &BACKENDS[..1], None);
    // This test's namespace gets a route to the backend and its neighbour, and forwards.
    let backend_mac = [0x02, 0, 0, 0, 0, 0x0b];
    let ip = |args: &str| {
        let status = std::process::Command::new("ip")
            .args(args.split(' '))
            .status()
            .unwrap();
        assert!(status.success(), "ip {args}");
    };
    ip("link add pod0 type veth peer name pod0-peer");
    ip("link set pod0-peer up");
    ip("link set pod0 up");
    ip("link set lo up");
    ip("addr add 10.244.1.1/24 dev pod0");
    ip("neigh add 10.244.1.11 lladdr 02:00:00:00:00:0b dev pod0 nud permanent");
    // /proc/sys/net follows the namespace of the thread that opens it.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();

    let (verdict, out) = h.run(&tcp(client(40000), vip(80), Tcp::Syn, b""));
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "sent to the egress device, not up the stack"
    );
    let out = parse(out);
    assert_eq!(out.dst, backend(0, 8080));
    let Some(etherparse::LinkHeader::Ethernet2(eth)) = &out.headers.link else {
        panic!("no Ethernet header")
    };
    assert_eq!(eth.destination, backend_mac);
    let Some(NetHeaders::Ipv4(ip_header, _)) = &out.headers.net else {
        panic!("not IPv4")
    };
    assert_eq!(ip_header.time_to_live, 63, "forwarding decrements the TTL");
}

#[test]
fn a_full_map_is_a_reported_error_and_a_later_sync_that_fits_recovers() {
    let mut h = Harness::with_sizes(MapSizes {
        services: 2,
        ..MapSizes::default()
    });
    let set = |last: u8| {
        let name = ServicePortName {
            service: ObjectRef {
                namespace: "default".into(),
                name: format!("svc-{last}"),
            },
            port_name: String::new(),
            protocol: Protocol::Tcp,
        };
        let frontend = Frontend {
            addr: Ipv4Addr::new(10, 96, 0, last),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let endpoint = (
            SocketAddrV4::new(BACKENDS[0], 8080),
            EndpointInfo::default(),
        );
        let set = BackendSet {
            frontends: BTreeSet::from([frontend]),
            endpoints: BTreeMap::from([endpoint]),
            affinity_timeout_s: None,
        };
        (name, set)
    };
    let three = DesiredState {
        backend_sets: [set(1), set(2), set(3)].into_iter().collect(),
    };
    let error = h
        .dataplane
        .sync(&three, &three.changes_from(&DesiredState::default()))
        .unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains("full map") && message.contains("flag"),
        "{message}"
    );

    // One Service fewer fits: the next sync plans from what was really written and recovers.
    let two = DesiredState {
        backend_sets: [set(1), set(2)].into_iter().collect(),
    };
    h.dataplane.sync(&two, &two.changes_from(&three)).unwrap();
    for last in [1, 2] {
        let to = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, last), 80);
        assert_eq!(
            parse(h.run(&tcp(client(40000), to, Tcp::Syn, b"")).1).dst,
            backend(0, 8080)
        );
    }
}

/// A Service port, the packets sent to it, and the counters they must leave.
struct CountCase {
    case: &'static str,
    protocol: Protocol,
    backends: &'static [Ipv4Addr],
    affinity: Option<u32>,
    packets: Vec<Vec<u8>>,
    /// packets, flows, refused, affinity hits
    counted: [u64; 4],
}

#[test]
fn every_packet_to_a_frontend_is_counted_in_its_sets_stats() {
    let other_pod = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 99), 80);
    let syn = |port| tcp(client(port), vip(80), Tcp::Syn, b"");
    let cases = [
        CountCase {
            case: "a new TCP flow and its packets",
            protocol: Protocol::Tcp,
            backends: &BACKENDS,
            affinity: None,
            packets: vec![
                syn(40000),
                tcp(client(40000), vip(80), Tcp::Ack, b"GET /"),
                tcp(client(40000), vip(80), Tcp::Fin, b""),
            ],
            counted: [3, 1, 0, 0],
        },
        CountCase {
            case: "traffic to other addresses and ports is not the Service's",
            protocol: Protocol::Tcp,
            backends: &BACKENDS,
            affinity: None,
            packets: vec![
                tcp(client(40000), vip(81), Tcp::Syn, b""),
                tcp(client(40000), other_pod, Tcp::Syn, b""),
            ],
            counted: [0, 0, 0, 0],
        },
        CountCase {
            case: "UDP datagrams of one flow",
            protocol: Protocol::Udp,
            backends: &BACKENDS,
            affinity: None,
            packets: vec![udp(client(5353), vip(80), b"a"); 3],
            counted: [3, 1, 0, 0],
        },
        CountCase {
            case: "no backend: every new flow refused",
            protocol: Protocol::Tcp,
            backends: &[],
            affinity: None,
            packets: vec![syn(40001), syn(40002)],
            counted: [2, 0, 2, 0],
        },
        CountCase {
            case: "ClientIP affinity: flows after the first hit the remembered backend",
            protocol: Protocol::Tcp,
            backends: &BACKENDS,
            affinity: Some(60),
            packets: vec![syn(40001), syn(40002), syn(40003)],
            counted: [3, 3, 0, 2],
        },
    ];
    for CountCase {
        case,
        protocol,
        backends,
        affinity,
        packets,
        counted: [sent, flows, refused, hits],
    } in cases
    {
        let mut h = Harness::new();
        h.service(protocol, 80, 8080, backends, affinity);
        let svc_id = h.svc_id();
        assert_eq!(
            h.stats(svc_id),
            Some(ServiceStats::default()),
            "{case}: a new set starts at zero"
        );
        let mut bytes = 0;
        for packet in &packets {
            h.run(packet);
            bytes += packet.len() as u64;
        }
        let expected = ServiceStats {
            packets: sent,
            bytes: if sent == 0 { 0 } else { bytes },
            flows,
            refused,
            affinity_hits: hits,
        };
        assert_eq!(h.stats(svc_id), Some(expected), "{case}");
    }
}

#[test]
fn a_removed_services_counters_go_with_it() {
    let mut h = Harness::new();
    h.service(Protocol::Tcp, 80, 8080, &BACKENDS, None);
    let old = h.svc_id();
    h.run(&tcp(client(40000), vip(80), Tcp::Syn, b""));
    assert_eq!(h.stats(old).map(|s| s.packets), Some(1));
    // The port changes: a new frontend, so a new set, with counters from zero.
    h.service(Protocol::Tcp, 81, 8080, &BACKENDS, None);
    let new = h.svc_id();
    assert_ne!(new, old);
    assert_eq!(h.stats(old), None, "the old set's counters are deleted");
    assert_eq!(h.stats(new), Some(ServiceStats::default()));
}
