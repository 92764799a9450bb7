//! Real traffic through testbeds. These need root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and fail, never
//! skip, without it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::process::ExitStatusExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::Command;
use std::time::Duration;

use proxy_testbed::{Testbed, io_error_kind};

const OK: Duration = Duration::from_secs(2);
/// For requests that must fail: long enough for a refusal to arrive, short enough to keep tests fast.
const FAIL: Duration = Duration::from_millis(300);

fn testbed() -> Testbed {
    // The error says which privilege is missing ("needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) ...").
    Testbed::new().unwrap_or_else(|err| panic!("{err:#}"))
}

fn at(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}

/// Names in `ip netns list` (lines are "<name>" or "<name> (id: N)").
fn netns_list() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(out.status.success(), "ip netns list: {out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn pods_on_one_node_reach_each_other_over_tcp_and_udp() {
    let mut tb = testbed();
    let node = tb.add_node("node1").unwrap();
    let a = tb.add_pod(&node, "pod-a", node.pod_addr(10)).unwrap();
    let b = tb.add_pod(&node, "pod-b", node.pod_addr(11)).unwrap();
    a.serve(&[8080], &[5353]).unwrap();
    b.serve(&[8080], &[5353]).unwrap();

    assert_eq!(a.tcp_request(at(b.addr, 8080), OK).unwrap(), "pod-b");
    assert_eq!(b.tcp_request(at(a.addr, 8080), OK).unwrap(), "pod-a");
    assert_eq!(a.udp_request(at(b.addr, 5353), OK).unwrap(), "pod-b");
    assert_eq!(b.udp_request(at(a.addr, 5353), OK).unwrap(), "pod-a");
}

#[test]
fn pods_on_different_nodes_reach_each_other_also_on_a_node_added_later() {
    let mut tb = testbed();
    let node1 = tb.add_node("node1").unwrap();
    let node2 = tb.add_node("node2").unwrap();
    let a = tb.add_pod(&node1, "a", node1.pod_addr(5)).unwrap();
    let b = tb.add_pod(&node2, "b", node2.pod_addr(5)).unwrap();
    // Added after a and b: node1 and node2 must have gained routes to its pod CIDR.
    let node3 = tb.add_node("node3").unwrap();
    let c = tb.add_pod(&node3, "c", node3.pod_addr(5)).unwrap();
    for pod in [&a, &b, &c] {
        pod.serve(&[80], &[53]).unwrap();
    }

    for (from, to) in [(&a, &b), (&b, &a), (&a, &c), (&c, &a), (&b, &c), (&c, &b)] {
        assert_eq!(from.tcp_request(at(to.addr, 80), OK).unwrap(), to.name);
        assert_eq!(from.udp_request(at(to.addr, 53), OK).unwrap(), to.name);
    }
    assert_eq!(
        tb.nodes()
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>(),
        ["node1", "node2", "node3"]
    );
}

#[test]
fn an_external_client_reaches_a_node_and_a_pod() {
    let mut tb = testbed();
    let node1 = tb.add_node("node1").unwrap();
    let node2 = tb.add_node("node2").unwrap();
    let pod = tb.add_pod(&node2, "web", node2.pod_addr(7)).unwrap();
    pod.serve(&[80], &[53]).unwrap();
    let client = tb
        .add_external("client", Ipv4Addr::new(172, 18, 1, 1))
        .unwrap();

    // A server in the node's own namespace, as a NodePort would be reached.
    let listener = node1
        .netns
        .tcp_listen(at(node1.underlay_addr, 30080))
        .unwrap();
    let accepted = std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept().unwrap();
        stream.write_all(b"node1\n").unwrap();
        peer
    });
    assert_eq!(
        client
            .tcp_request(at(node1.underlay_addr, 30080), OK)
            .unwrap(),
        "node1"
    );
    assert_eq!(accepted.join().unwrap().ip(), client.addr);

    // Through the router, which routes 10.244.2.0/24 to node2.
    assert_eq!(client.tcp_request(at(pod.addr, 80), OK).unwrap(), "web");
    assert_eq!(client.udp_request(at(pod.addr, 53), OK).unwrap(), "web");
}

#[test]
fn dropping_a_testbed_removes_its_namespaces_and_directories_also_on_panic() {
    for panic in [false, true] {
        let mut made = Vec::new();
        let result = catch_unwind(AssertUnwindSafe(|| {
            let mut tb = testbed();
            let node = tb.add_node("node1").unwrap();
            let pod = tb.add_pod(&node, "pod", node.pod_addr(2)).unwrap();
            let external = tb
                .add_external("ext", Ipv4Addr::new(172, 18, 1, 9))
                .unwrap();
            pod.serve(&[80], &[53]).unwrap();
            let mut sleep = Command::new("sleep");
            sleep.arg("600");
            node.spawn(sleep).unwrap();
            made = [tb.underlay(), &node.netns, &pod.netns, &external.netns]
                .map(|ns| ns.name().to_owned())
                .to_vec();
            assert!(node.state_dir.is_dir());
            made.push(node.state_dir.display().to_string());
            let listed = netns_list();
            assert!(
                made[..4].iter().all(|name| listed.contains(name)),
                "{listed:?}"
            );
            if panic {
                panic!("a test failing inside a testbed (on purpose)");
            }
        }));
        assert_eq!(result.is_err(), panic);
        let listed = netns_list();
        for name in &made[..4] {
            assert!(
                !listed.contains(name),
                "{name} left behind (panic: {panic})"
            );
        }
        assert!(
            !std::path::Path::new(&made[4]).exists(),
            "state dir left behind"
        );
    }
}

#[test]
fn a_spawned_process_runs_in_its_node_and_dies_with_the_testbed() {
    let mut tb = testbed();
    let node = tb.add_node("node1").unwrap();
    let mut command = Command::new("sh");
    command.args([
        "-c",
        "ip -o -4 addr show dev eth0; echo ready; echo oops >&2; exec sleep 600",
    ]);
    let process = node.spawn(command).unwrap();
    process.wait_for_log("ready", OK).unwrap();
    let log = process.log().unwrap();
    assert!(log.contains(&format!("{}/16", node.underlay_addr)), "{log}");
    assert!(log.contains("oops"), "stderr goes to the log too: {log}");
    assert!(process.log_path().starts_with(&node.state_dir));
    assert_eq!(process.try_wait().unwrap(), None);

    let mut sleep = Command::new("sleep");
    sleep.arg("600");
    let stopped = node.spawn(sleep).unwrap();
    let status = stopped.stop(OK).unwrap();
    assert_eq!(status.signal(), Some(nix::libc::SIGTERM));

    let pid = process.pid();
    drop(tb);
    let status = process.try_wait().unwrap().expect("reaped by the drop");
    assert_eq!(status.signal(), Some(nix::libc::SIGKILL));
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(
        node.spawn(Command::new("true")).is_err(),
        "a node handle that outlived its testbed must not start processes"
    );
}

#[test]
fn request_errors_tell_refused_from_timed_out() {
    use std::io::ErrorKind::{ConnectionRefused, TimedOut};
    let mut tb = testbed();
    let node = tb.add_node("node1").unwrap();
    let client = tb.add_pod(&node, "client", node.pod_addr(2)).unwrap();
    let server = tb.add_pod(&node, "server", node.pod_addr(3)).unwrap();
    server.serve(&[80], &[53]).unwrap();
    // No pod has this address: the node's blackhole route for its own CIDR drops the packets.
    let nobody = node.pod_addr(99);

    let kind = |result: anyhow::Result<String>| io_error_kind(&result.unwrap_err());
    assert_eq!(
        kind(client.tcp_request(at(server.addr, 81), FAIL)),
        Some(ConnectionRefused)
    );
    assert_eq!(
        kind(client.udp_request(at(server.addr, 54), FAIL)),
        Some(ConnectionRefused)
    );
    assert_eq!(
        kind(client.tcp_request(at(nobody, 80), FAIL)),
        Some(TimedOut)
    );
    assert_eq!(
        kind(client.udp_request(at(nobody, 53), FAIL)),
        Some(TimedOut)
    );
}

#[test]
fn long_lived_connections_from_a_pod_echo_concurrently() {
    let mut tb = testbed();
    let node1 = tb.add_node("node1").unwrap();
    let node2 = tb.add_node("node2").unwrap();
    let client = tb.add_pod(&node1, "client", node1.pod_addr(2)).unwrap();
    let server = tb.add_pod(&node2, "server", node2.pod_addr(2)).unwrap();
    server.serve(&[9000], &[]).unwrap();

    let mut streams: Vec<_> = (0..50)
        .map(|_| {
            let stream = client.netns.tcp_connect(at(server.addr, 9000), OK).unwrap();
            stream.set_read_timeout(Some(OK)).unwrap();
            assert_eq!(stream.local_addr().unwrap().ip(), client.addr);
            let mut reader = BufReader::new(stream);
            let mut greeting = String::new();
            reader.read_line(&mut greeting).unwrap();
            assert_eq!(greeting, "server\n");
            reader.into_inner()
        })
        .collect();
    // All 50 are open at once; each gets back exactly its own bytes.
    for (i, stream) in streams.iter_mut().enumerate() {
        write!(stream, "message {i}").unwrap();
    }
    for (i, stream) in streams.iter_mut().enumerate() {
        let expected = format!("message {i}");
        let mut echoed = vec![0; expected.len()];
        stream.read_exact(&mut echoed).unwrap();
        assert_eq!(echoed, expected.as_bytes());
    }
}

#[test]
fn nodes_and_pods_are_wired_like_calico() {
    let mut tb = testbed();
    let node1 = tb.add_node("node1").unwrap();
    let node2 = tb.add_node("node2").unwrap();
    let pod = tb.add_pod(&node1, "pod", node1.pod_addr(5)).unwrap();
    assert!(pod.host_veth.len() <= 15 && pod.host_veth.starts_with("veth"));
    assert_eq!(pod.node, "node1");
    assert_eq!(node2.pod_cidr, (Ipv4Addr::new(10, 244, 2, 0), 24));
    assert_eq!(node2.underlay_addr, Ipv4Addr::new(172, 18, 0, 3));

    // Read by a separate process, to check what the thread-based writes did to the namespace.
    let veth = &pod.host_veth;
    let keys = [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        ("net.ipv4.conf.eth0.rp_filter", "0"),
        ("net.ipv4.conf.all.send_redirects", "0"),
        ("net.ipv4.conf.default.send_redirects", "0"),
        (&format!("net.ipv4.conf.{veth}.proxy_arp"), "1"),
        (&format!("net.ipv4.neigh.{veth}.proxy_delay"), "0"),
    ];
    let out = node1
        .netns
        .command("sysctl")
        .args(keys.iter().map(|(key, _)| *key))
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    for (key, value) in keys {
        assert!(
            shown.contains(&format!("{key} = {value}\n")),
            "{key}: {shown}"
        );
    }
    assert_eq!(node1.netns.sysctl("net/ipv4/ip_forward").unwrap(), "1");

    let node_routes = node1.netns.ip(&["route"]).unwrap();
    for route in [
        "default via 172.18.0.1 dev eth0",
        "blackhole 10.244.1.0/24",
        "10.244.2.0/24 via 172.18.0.3 dev eth0",
        &format!("10.244.1.5 dev {veth} scope link"),
    ] {
        assert!(
            node_routes.contains(route),
            "{route:?} missing in:\n{node_routes}"
        );
    }
    let pod_routes = pod.netns.ip(&["route"]).unwrap();
    for route in [
        "default via 169.254.1.1 dev eth0",
        "169.254.1.1 dev eth0 scope link",
    ] {
        assert!(
            pod_routes.contains(route),
            "{route:?} missing in:\n{pod_routes}"
        );
    }
    let router_routes = tb.underlay().ip(&["route"]).unwrap();
    assert!(
        router_routes.contains("10.244.1.0/24 via 172.18.0.2 dev br0"),
        "{router_routes}"
    );
    assert!(
        pod.netns.ip(&["-6", "addr"]).unwrap().is_empty(),
        "IPv6 is off"
    );
}

#[test]
fn bad_names_and_addresses_are_refused() {
    let mut tb = testbed();
    let node = tb.add_node("node1").unwrap();
    tb.add_pod(&node, "pod", node.pod_addr(2)).unwrap();
    for refused in [
        tb.add_node("node1").map(drop),
        tb.add_node("underlay").map(drop),
        tb.add_node("a/b").map(drop),
        tb.add_pod(&node, "pod", node.pod_addr(3)).map(drop),
        tb.add_pod(&node, "other", node.pod_addr(2)).map(drop),
        tb.add_pod(&node, "far", Ipv4Addr::new(10, 244, 9, 9))
            .map(drop),
        tb.add_external("ext", node.underlay_addr).map(drop),
        tb.add_external("ext", Ipv4Addr::new(10, 0, 0, 1)).map(drop),
    ] {
        assert!(refused.is_err());
    }
    // An external where the next node would go: the node is refused, not silently doubled.
    tb.add_external("ext", Ipv4Addr::new(172, 18, 0, 3))
        .unwrap();
    let err = tb.add_node("node2").unwrap_err();
    assert!(
        format!("{err:#}").contains("taken by external client ext"),
        "{err:#}"
    );
}

#[test]
fn testbeds_in_parallel_use_the_same_names_and_addresses_apart() {
    std::thread::scope(|scope| {
        let runs: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    let mut tb = testbed();
                    let node = tb.add_node("node1").unwrap();
                    let a = tb.add_pod(&node, "a", node.pod_addr(2)).unwrap();
                    let b = tb.add_pod(&node, "b", node.pod_addr(3)).unwrap();
                    b.serve(&[80], &[]).unwrap();
                    assert_eq!(a.tcp_request(at(b.addr, 80), OK).unwrap(), "b");
                    tb.id().to_owned()
                })
            })
            .collect();
        let ids: Vec<String> = runs.into_iter().map(|run| run.join().unwrap()).collect();
        assert_ne!(ids[0], ids[1]);
    });
}

#[test]
fn leftovers_of_a_dead_test_process_are_swept() {
    // A first testbed makes sure /run/netns is set up before this test calls `ip netns add` itself.
    let first = testbed();
    // pid_max is never handed out (pids are below it), so this owner is certainly dead.
    let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap();
    let leftover = format!("ptb{}-1-leftover", pid_max.trim());
    let status = Command::new("ip")
        .args(["netns", "add", &leftover])
        .status()
        .unwrap();
    assert!(status.success());
    let leftover_dir = std::env::temp_dir().join(&leftover);
    std::fs::create_dir_all(leftover_dir.join("node1")).unwrap();

    let second = testbed();
    assert!(!netns_list().contains(&leftover));
    assert!(!leftover_dir.exists());
    // Live testbeds of this process are not leftovers.
    for tb in [&first, &second] {
        assert!(netns_list().contains(&tb.underlay().name().to_owned()));
    }
}
