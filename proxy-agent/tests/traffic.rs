//! Real traffic through the agent on a testbed cluster: the kernel's own TCP/UDP stacks on both
//! ends, the agent started as a process from its manifest directory, as on a node.
//!
//! The cluster: node-1 runs the agent and hosts the client pods and two kubia pods; node-2
//! hosts the third kubia pod, so one backend in three is reached across the underlay and its
//! replies come back through node-1's uplink.
//!
//! Needs root (network namespaces, eBPF); `cargo xtask test` runs it as root.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use proxy_testbed::agent::Agent;
use proxy_testbed::{Pod, Testbed, io_error_kind};

const AGENT: &str = env!("CARGO_BIN_EXE_proxy-agent");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TIMEOUT: Duration = Duration::from_secs(3);

struct Cluster {
    testbed: Testbed,
    agent: Agent,
    clients: Vec<Pod>,
    kubia: Vec<Pod>,
}

/// `kubia` pods answer on 8080 (http) and 8443 (https) over TCP, and on 8080 over UDP.
fn cluster(clients: usize, manifests: &[(&str, String)]) -> Cluster {
    let mut testbed = Testbed::new().unwrap();
    let node1 = testbed.add_node("node-1").unwrap();
    let node2 = testbed.add_node("node-2").unwrap();
    let mut kubia = Vec::new();
    for (node, host, name) in [
        (&node1, 11, "kubia-1"),
        (&node1, 12, "kubia-2"),
        (&node2, 11, "kubia-3"),
    ] {
        let pod = testbed.add_pod(node, name, node.pod_addr(host)).unwrap();
        pod.serve(&[8080, 8443], &[8080]).unwrap();
        kubia.push(pod);
    }
    let clients = (0..clients)
        .map(|i| {
            let name = format!("client-{i}");
            testbed
                .add_pod(&node1, &name, node1.pod_addr(100 + i as u8))
                .unwrap()
        })
        .collect();
    for (name, yaml) in manifests {
        Agent::write_manifest(&node1, name, yaml).unwrap();
    }
    let agent = Agent::start(AGENT.as_ref(), &node1, &[]).unwrap();
    Cluster {
        testbed,
        agent,
        clients,
        kubia,
    }
}

/// A Service `name` on `cluster_ip` with ports (name, port, targetPort).
fn service_doc(
    name: &str,
    cluster_ip: Ipv4Addr,
    ports: &[(&str, u16, u16)],
    protocol: &str,
    extra_spec: &str,
) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  clusterIP: {cluster_ip}\n{extra_spec}  ports:\n"
    );
    for (port_name, port, target) in ports {
        yaml += &format!(
            "  - name: {port_name}\n    port: {port}\n    targetPort: {target}\n    protocol: {protocol}\n"
        );
    }
    yaml
}

/// An EndpointSlice `slice` of Service `service` with ports (name, port) and endpoints (address, node).
fn slice_doc(
    service: &str,
    slice: &str,
    ports: &[(&str, u16)],
    protocol: &str,
    endpoints: &[(Ipv4Addr, &str)],
) -> String {
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {slice}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n"
    );
    for (port_name, port) in ports {
        yaml += &format!("- name: {port_name}\n  port: {port}\n  protocol: {protocol}\n");
    }
    yaml += if endpoints.is_empty() {
        "endpoints: []\n"
    } else {
        "endpoints:\n"
    };
    for (addr, node) in endpoints {
        yaml += &format!(
            "- addresses: [\"{addr}\"]\n  conditions: {{ready: true}}\n  nodeName: {node}\n"
        );
    }
    yaml
}

/// A Service and the one EndpointSlice the controller would write for it.
fn service(
    name: &str,
    cluster_ip: Ipv4Addr,
    ports: &[(&str, u16, u16)],
    protocol: &str,
    extra_spec: &str,
    endpoints: &[(Ipv4Addr, &str)],
) -> String {
    let slice_ports: Vec<(&str, u16)> = ports
        .iter()
        .map(|(port_name, _, target)| (*port_name, *target))
        .collect();
    format!(
        "{}---\n{}",
        service_doc(name, cluster_ip, ports, protocol, extra_spec),
        slice_doc(
            name,
            &format!("{name}-1"),
            &slice_ports,
            protocol,
            endpoints
        )
    )
}

fn kubia_endpoints(cluster: &Cluster) -> Vec<(Ipv4Addr, &str)> {
    cluster
        .kubia
        .iter()
        .map(|pod| (pod.addr, pod.node.as_str()))
        .collect()
}

fn kubia(endpoints: &[(Ipv4Addr, &str)], extra_spec: &str) -> String {
    service(
        "kubia",
        VIP,
        &[("http", 80, 8080), ("https", 443, 8443)],
        "TCP",
        extra_spec,
        endpoints,
    )
}

fn seed_endpoints() -> Vec<(Ipv4Addr, &'static str)> {
    vec![
        (Ipv4Addr::new(10, 244, 1, 11), "node-1"),
        (Ipv4Addr::new(10, 244, 1, 12), "node-1"),
        (Ipv4Addr::new(10, 244, 2, 11), "node-2"),
    ]
}

fn vip(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(VIP, port)
}

/// Which pod answered each of `count` new connections.
fn spread(client: &Pod, to: SocketAddrV4, count: usize) -> BTreeMap<String, usize> {
    let mut hits = BTreeMap::new();
    for i in 0..count {
        let answer = client
            .tcp_request(to, TIMEOUT)
            .unwrap_or_else(|error| panic!("connection {i} to {to}: {error:#}"));
        *hits.entry(answer).or_default() += 1;
    }
    hits
}

#[test]
fn new_connections_spread_over_all_three_backends_on_both_nodes() {
    let c = cluster(1, &[("kubia.yaml", kubia(&seed_endpoints(), ""))]);
    let hits = spread(&c.clients[0], vip(80), 300);
    for pod in &c.kubia {
        let share = hits.get(&pod.name).copied().unwrap_or(0);
        assert!(
            share >= 45,
            "{} got {share} of 300 connections (< 15%): {hits:?}",
            pod.name
        );
    }
    let list = c.agent.cli(&["list"]).unwrap();
    assert!(
        list.contains("10.96.0.10:80") && list.contains("10.244.2.11:8080"),
        "{list}"
    );
    // The same, as JSON, and the flows the connections left in conntrack.
    let json: serde_json::Value =
        serde_json::from_str(&c.agent.cli(&["list", "--json"]).unwrap()).unwrap();
    let backends = json[0]["backends"].as_array().unwrap();
    assert_eq!(
        (json[0]["frontend"].as_str(), backends.len()),
        (Some("10.96.0.10:80"), 3),
        "{json}"
    );
    let flows: serde_json::Value =
        serde_json::from_str(&c.agent.cli(&["list", "conntrack", "--json"]).unwrap()).unwrap();
    let client = c.clients[0].addr.to_string();
    let forward = flows.as_array().unwrap().iter().filter(|flow| {
        flow["direction"] == "forward"
            && flow["destination"] == "10.96.0.10:80"
            && flow["source"].as_str().unwrap().starts_with(&client)
    });
    assert!(
        forward.count() >= 300,
        "a forward entry per connection: {flows}"
    );
    let table = c.agent.cli(&["list", "conntrack"]).unwrap();
    assert!(table.lines().next().unwrap().starts_with("DIR"), "{table}");
}

#[test]
fn both_ports_of_a_multi_port_service_reach_their_target_ports() {
    let mut c = cluster(1, &[]);
    // Each of these pods listens on one port only, so an answer proves which target port was
    // used; the Service's two ports are resolved through two slices, by port name.
    let node1 = c.testbed.nodes()[0].clone();
    let only_http = c
        .testbed
        .add_pod(&node1, "http-only", node1.pod_addr(21))
        .unwrap();
    only_http.serve(&[8080], &[]).unwrap();
    let only_https = c
        .testbed
        .add_pod(&node1, "https-only", node1.pod_addr(22))
        .unwrap();
    only_https.serve(&[8443], &[]).unwrap();
    let yaml = [
        service_doc(
            "web",
            VIP,
            &[("http", 80, 8080), ("https", 443, 8443)],
            "TCP",
            "",
        ),
        slice_doc(
            "web",
            "web-a",
            &[("http", 8080)],
            "TCP",
            &[(only_http.addr, "node-1")],
        ),
        slice_doc(
            "web",
            "web-b",
            &[("https", 8443)],
            "TCP",
            &[(only_https.addr, "node-1")],
        ),
    ]
    .join("---\n");
    c.agent.apply("web.yaml", &yaml).unwrap();
    let client = &c.clients[0];
    assert_eq!(client.tcp_request(vip(80), TIMEOUT).unwrap(), "http-only");
    assert_eq!(client.tcp_request(vip(443), TIMEOUT).unwrap(), "https-only");
}

#[test]
fn client_ip_affinity_sticks_and_expires_after_its_timeout() {
    let affinity = "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 3\n";
    let c = cluster(6, &[("kubia.yaml", kubia(&seed_endpoints(), affinity))]);
    // Each client sticks to one pod for 50 connections in a row.
    let mut first_choice = Vec::new();
    for client in &c.clients {
        let hits = spread(client, vip(80), 50);
        assert_eq!(hits.len(), 1, "{}: {hits:?}", client.name);
        first_choice.push(hits.into_keys().next().unwrap());
    }
    // Idle past the timeout: each client's next connection chooses again. Six clients choosing
    // again over two rounds all landing where they were has a chance of 3^-12.
    let mut moved = 0;
    for _round in 0..2 {
        std::thread::sleep(Duration::from_millis(3500));
        for (client, before) in c.clients.iter().zip(&mut first_choice) {
            let now = client.tcp_request(vip(80), TIMEOUT).unwrap();
            moved += usize::from(now != *before);
            *before = now;
        }
    }
    assert!(
        moved > 0,
        "no client changed pods after its affinity expired"
    );
    let affinity = c.agent.cli(&["list", "affinity"]).unwrap();
    for client in &c.clients {
        assert!(affinity.contains(&client.addr.to_string()), "{affinity}");
    }
}

#[test]
fn a_service_without_endpoints_refuses_at_once() {
    let c = cluster(
        1,
        &[
            ("kubia.yaml", kubia(&[], "")),
            (
                "dns.yaml",
                service(
                    "dns",
                    Ipv4Addr::new(10, 96, 0, 53),
                    &[("dns", 53, 5353)],
                    "UDP",
                    "",
                    &[],
                ),
            ),
        ],
    );
    let start = Instant::now();
    let error = c.clients[0].tcp_request(vip(80), TIMEOUT).unwrap_err();
    let elapsed = start.elapsed();
    assert_eq!(
        io_error_kind(&error),
        Some(std::io::ErrorKind::ConnectionRefused),
        "{error:#}"
    );
    assert!(
        elapsed < Duration::from_millis(100),
        "refused after {elapsed:?}"
    );

    let error = c.clients[0]
        .udp_request(SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 53), 53), TIMEOUT)
        .unwrap_err();
    assert_eq!(
        io_error_kind(&error),
        Some(std::io::ErrorKind::ConnectionRefused),
        "{error:#}"
    );
}

#[test]
fn udp_requests_are_answered_through_the_service() {
    let c = cluster(1, &[]);
    let endpoints = kubia_endpoints(&c);
    c.agent
        .apply(
            "dns.yaml",
            &service("udp", VIP, &[("dns", 53, 8080)], "UDP", "", &endpoints),
        )
        .unwrap();
    let names: BTreeSet<String> = c.kubia.iter().map(|pod| pod.name.clone()).collect();
    for _ in 0..20 {
        let answer = c.clients[0].udp_request(vip(53), TIMEOUT).unwrap();
        assert!(names.contains(&answer), "{answer}");
    }
}

#[test]
fn a_pod_reaching_its_own_service_gets_its_own_answer() {
    let c = cluster(0, &[]);
    let kubia1 = &c.kubia[0];
    c.agent
        .apply("kubia.yaml", &kubia(&[(kubia1.addr, "node-1")], ""))
        .unwrap();
    for _ in 0..5 {
        assert_eq!(kubia1.tcp_request(vip(80), TIMEOUT).unwrap(), "kubia-1");
    }
}

#[test]
fn a_removed_backend_gets_no_new_connection_after_the_next_sync() {
    let c = cluster(1, &[("kubia.yaml", kubia(&seed_endpoints(), ""))]);
    c.agent
        .apply("kubia.yaml", &kubia(&seed_endpoints()[..2], ""))
        .unwrap();
    let hits = spread(&c.clients[0], vip(80), 100);
    assert!(!hits.contains_key("kubia-3"), "{hits:?}");
    assert_eq!(hits.len(), 2, "{hits:?}");
}

#[test]
fn a_pod_created_after_the_agent_started_is_served() {
    let mut c = cluster(0, &[("kubia.yaml", kubia(&seed_endpoints(), ""))]);
    let node1 = c.testbed.nodes()[0].clone();
    let late = c
        .testbed
        .add_pod(&node1, "late-client", node1.pod_addr(200))
        .unwrap();
    // The agent attaches on the link event; the first connection may race it by a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match late.tcp_request(vip(80), Duration::from_millis(500)) {
            Ok(answer) => break assert!(answer.starts_with("kubia-"), "{answer}"),
            Err(error) if Instant::now() < deadline => eprintln!("not yet: {error:#}"),
            Err(error) => panic!("the new pod's veth was never served: {error:#}"),
        }
    }
    c.clients.push(late);
}

#[test]
fn connections_survive_agent_restarts_and_uninstall_removes_everything() {
    use std::io::{BufRead, BufReader, Write};
    let mut c = cluster(1, &[("kubia.yaml", kubia(&seed_endpoints(), ""))]);
    let stream = c.clients[0].netns.tcp_connect(vip(80), TIMEOUT).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let mut echo = |round: &str| {
        (&stream)
            .write_all(format!("{round}\n").as_bytes())
            .unwrap();
        let mut reply = String::new();
        reader
            .read_line(&mut reply)
            .unwrap_or_else(|error| panic!("{round}: {error}"));
        assert_eq!(reply.trim(), round);
    };
    echo("before");
    for (round, kill) in [("after SIGKILL", true), ("after SIGTERM", false)] {
        if kill {
            c.agent.process().sigkill().unwrap();
        } else {
            c.agent.process().sigterm().unwrap();
            let status = c
                .agent
                .process()
                .wait_timeout(TIMEOUT)
                .unwrap()
                .expect("the agent exits on SIGTERM");
            assert!(
                status.success(),
                "SIGTERM must end the agent with exit 0: {status:?}"
            );
        }
        // While no agent runs, the pinned datapath keeps serving old and new connections.
        echo(&format!("{round}, agent down"));
        assert!(
            c.clients[0]
                .tcp_request(vip(80), TIMEOUT)
                .unwrap()
                .starts_with("kubia-")
        );
        c.agent.restart().unwrap();
        echo(&format!("{round}, agent back"));
    }
    assert!(
        c.agent.process().log().unwrap().contains("Replaced"),
        "the restarted agent adopts the pinned links"
    );

    c.agent.process().sigterm().unwrap();
    c.agent.process().wait_timeout(TIMEOUT).unwrap();
    c.agent.cli(&["uninstall"]).unwrap();
    let node1 = &c.testbed.nodes()[0];
    assert!(
        !node1.bpf_dir.exists(),
        "uninstall removes the pin directory"
    );
    // Untranslated, the VIP is just an address nobody has: the router says so, or nothing does.
    let error = c.clients[0]
        .tcp_request(vip(80), Duration::from_millis(500))
        .unwrap_err();
    use std::io::ErrorKind::{NetworkUnreachable, TimedOut};
    assert!(
        matches!(io_error_kind(&error), Some(NetworkUnreachable | TimedOut)),
        "the VIP is no longer translated: {error:#}"
    );
}

#[test]
fn a_bad_object_is_skipped_with_one_log_line_and_the_rest_syncs() {
    let bad = service(
        "broken",
        Ipv4Addr::new(10, 96, 0, 99),
        &[("http", 80, 8080)],
        "TCP",
        "",
        &[],
    )
    .replace("10.96.0.99", "010.96.0.99");
    let c = cluster(
        1,
        &[
            ("kubia.yaml", kubia(&seed_endpoints(), "")),
            ("broken.yaml", bad),
        ],
    );
    assert!(
        c.clients[0]
            .tcp_request(vip(80), TIMEOUT)
            .unwrap()
            .starts_with("kubia-")
    );
    // A later unrelated change does not log the bad object again.
    c.agent
        .apply(
            "other.yaml",
            &service(
                "bar",
                Ipv4Addr::new(10, 96, 0, 13),
                &[("http", 80, 8080)],
                "TCP",
                "",
                &[],
            ),
        )
        .unwrap();
    let log = c.agent.process().log().unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("default/broken"))
        .collect();
    assert_eq!(lines.len(), 1, "one log line for the bad object: {lines:?}");
    assert!(
        lines[0].contains("010.96.0.99"),
        "the line says why: {}",
        lines[0]
    );
}

#[test]
fn strict_rp_filter_on_the_node_does_not_drop_replies_from_local_backends() {
    let c = cluster(1, &[("kubia.yaml", kubia(&seed_endpoints()[..2], ""))]);
    // A node whose distribution turns strict reverse-path filtering on. A reply from a local pod
    // carries the Service address as its source once translated, and that address's route is the
    // uplink: routed by the kernel, the reply would be dropped. The datapath forwards it itself.
    let node1 = &c.testbed.nodes()[0];
    node1
        .netns
        .set_sysctl("net/ipv4/conf/all/rp_filter", "1")
        .unwrap();
    let hits = spread(&c.clients[0], vip(80), 20);
    assert_eq!(hits.values().sum::<usize>(), 20, "{hits:?}");
}
