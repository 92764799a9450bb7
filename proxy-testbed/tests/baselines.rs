//! The kube-proxy replicas (`proxy_testbed::baselines`) and the HTTP pod server they are measured
//! with: the generated rule text against kube-proxy's layout and names, and real traffic through
//! each replica in a testbed. The traffic tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and
//! fail, never skip, without it.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use proxy_testbed::baselines::{self, Protocol, ServiceSpec, iptables, nftables};
use proxy_testbed::{Netns, Node, Pod, Testbed};

const OK: Duration = Duration::from_secs(2);
/// For requests that must fail: long enough for an ICMP error to arrive, short enough to keep
/// tests fast.
const FAIL: Duration = Duration::from_millis(300);
/// As in the benchmark: the replicas are measured with this many Services, the target last.
const SERVICES: usize = 50;
const HTTP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;
const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn web(endpoints: Vec<(Ipv4Addr, u16)>) -> ServiceSpec {
    ServiceSpec {
        namespace: "bench".into(),
        name: "web".into(),
        cluster_ip: WEB_IP,
        port: 80,
        protocol: Protocol::Tcp,
        endpoints,
    }
}

fn three_endpoints() -> Vec<(Ipv4Addr, u16)> {
    (10..13)
        .map(|host| (Ipv4Addr::new(10, 244, 1, host), HTTP_PORT))
        .collect()
}

/// The Service of kube-proxy's own tests (`ns1/svc1`, port `p80`), whose chain names they spell
/// out.
fn kube_proxy_svc1() -> ServiceSpec {
    ServiceSpec {
        namespace: "ns1".into(),
        name: "svc1".into(),
        cluster_ip: Ipv4Addr::new(172, 30, 0, 41),
        port: 80,
        protocol: Protocol::Tcp,
        endpoints: vec![(Ipv4Addr::new(10, 180, 0, 1), 80)],
    }
}

fn lines_starting<'a>(text: &'a str, prefix: &'a str) -> Vec<&'a str> {
    text.lines()
        .filter(|line| line.starts_with(prefix))
        .collect()
}

// ---- the generated text ----

#[test]
fn with_fillers_puts_the_target_last_after_distinct_services_like_it() {
    let target = web(three_endpoints());
    let services = baselines::with_fillers(SERVICES, target.clone());
    assert_eq!(services.len(), SERVICES);
    assert_eq!(services.last(), Some(&target));
    let cluster_ips: BTreeSet<Ipv4Addr> = services.iter().map(|spec| spec.cluster_ip).collect();
    assert_eq!(cluster_ips.len(), SERVICES, "ClusterIPs must differ");
    let endpoints: BTreeSet<Ipv4Addr> = services
        .iter()
        .flat_map(|spec| spec.endpoints.iter().map(|&(ip, _)| ip))
        .collect();
    assert_eq!(endpoints.len(), SERVICES * 3, "endpoints must differ");
    for filler in &services[..SERVICES - 1] {
        assert_eq!(
            (filler.port, filler.protocol, filler.endpoints.len()),
            (80, Protocol::Tcp, 3)
        );
        assert!(
            filler
                .endpoints
                .iter()
                .all(|&(ip, port)| ip.octets()[..2] != [10, 244] && port == HTTP_PORT),
            "a filler endpoint is in the pod CIDRs: {filler:?}"
        );
    }
}

#[test]
fn iptables_rules_spread_three_endpoints_one_third_one_half_then_always() {
    let rules = iptables::rules(&[web(three_endpoints())]);
    let to_endpoints: Vec<&str> = lines_starting(&rules, "-A KUBE-SVC-")
        .into_iter()
        .filter(|line| line.contains(" -> "))
        .collect();
    assert_eq!(to_endpoints.len(), 3, "{rules}");
    assert!(
        to_endpoints[0]
            .contains("-m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-"),
        "{}",
        to_endpoints[0]
    );
    assert!(
        to_endpoints[1]
            .contains("-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-"),
        "{}",
        to_endpoints[1]
    );
    assert!(
        !to_endpoints[2].contains("statistic") && to_endpoints[2].contains(" -j KUBE-SEP-"),
        "the last endpoint must take everything left: {}",
        to_endpoints[2]
    );
    for (line, (ip, port)) in to_endpoints.iter().zip(three_endpoints()) {
        assert!(
            line.contains(&format!("--comment \"bench/web:p80 -> {ip}:{port}\"")),
            "{line}"
        );
    }
}

#[test]
fn iptables_rules_have_kube_proxys_chains_and_list_services_in_order() {
    let services = baselines::with_fillers(SERVICES, web(three_endpoints()));
    let rules = iptables::rules(&services);
    assert!(rules.starts_with("*nat\n") && rules.ends_with("COMMIT\n"));
    assert_eq!(lines_starting(&rules, ":KUBE-SVC-").len(), SERVICES);
    assert_eq!(lines_starting(&rules, ":KUBE-SEP-").len(), SERVICES * 3);
    // KUBE-SERVICES, KUBE-POSTROUTING, KUBE-MARK-MASQ, and one chain per Service and endpoint.
    assert_eq!(lines_starting(&rules, ":KUBE-").len(), 3 + SERVICES * 4);
    for hook in ["PREROUTING", "OUTPUT"] {
        assert_eq!(
            lines_starting(&rules, &format!("-A {hook} ")),
            [format!(
                "-A {hook} -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
            )]
        );
    }
    assert_eq!(
        lines_starting(&rules, "-A POSTROUTING "),
        [
            "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"
        ]
    );
    assert_eq!(
        lines_starting(&rules, "-A KUBE-MARK-MASQ "),
        ["-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000"]
    );
    assert_eq!(
        lines_starting(&rules, "-A KUBE-POSTROUTING "),
        [
            "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
            "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring \
             SNAT\" -j MASQUERADE --random-fully",
        ]
    );

    // One rule per Service, in the order given, so a packet to the target tries all of them.
    let portals = lines_starting(&rules, "-A KUBE-SERVICES ");
    assert_eq!(portals.len(), SERVICES);
    for (portal, spec) in portals.iter().zip(&services) {
        assert!(
            portal.contains(&format!(
                "--comment \"{}/{}:p80 cluster IP\" -m tcp -p tcp -d {} --dport 80 -j KUBE-SVC-",
                spec.namespace, spec.name, spec.cluster_ip
            )),
            "{portal}"
        );
    }
    // Per Service chain: the off-cluster masquerade check, then one rule per endpoint.
    let masquerade_checks = lines_starting(&rules, "-A KUBE-SVC-")
        .into_iter()
        .filter(|line| line.ends_with("! -s 10.244.0.0/16 -j KUBE-MARK-MASQ"))
        .count();
    assert_eq!(masquerade_checks, SERVICES);
    // Per endpoint chain: the hairpin check, then DNAT.
    assert_eq!(
        lines_starting(&rules, "-A KUBE-SEP-").len(),
        SERVICES * 3 * 2
    );
    assert_eq!(
        rules.matches(" -j DNAT --to-destination ").count(),
        SERVICES * 3
    );
}

#[test]
fn iptables_rules_skip_a_service_without_endpoints() {
    let rules = iptables::rules(&[web(Vec::new())]);
    assert!(
        !rules.contains("KUBE-SVC-") && !rules.contains("10.96.0.80"),
        "{rules}"
    );
}

#[test]
fn iptables_chain_names_and_comments_are_kube_proxys() {
    // Lines from kube-proxy's pkg/proxy/iptables/proxier_test.go for the same Service.
    let rules = iptables::rules(&[kube_proxy_svc1()]);
    for expected in [
        "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp \
         -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O",
        "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp \
         -p tcp -d 172.30.0.41 --dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ",
        "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.0.1:80\" \
         -j KUBE-SEP-SXIVWICOYRO3J4NJ",
        "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 \
         -j KUBE-MARK-MASQ",
        "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT \
         --to-destination 10.180.0.1:80",
    ] {
        assert!(
            rules.lines().any(|line| line == expected),
            "missing {expected:?} in\n{rules}"
        );
    }
    // A Service's names depend on it alone, not on the Services around it.
    let target = web(three_endpoints());
    let alone = iptables::rules(std::slice::from_ref(&target));
    let among_others = iptables::rules(&baselines::with_fillers(SERVICES, target));
    for chain in lines_starting(&alone, ":KUBE-S") {
        assert!(among_others.contains(chain), "{chain} moved");
    }
}

#[test]
fn nftables_ruleset_has_kube_proxys_hooks_map_and_chains() {
    let services = baselines::with_fillers(SERVICES, web(three_endpoints()));
    let ruleset = nftables::ruleset(&services);
    for expected in [
        "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }",
        "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }",
        "add rule ip kube-proxy nat-prerouting jump services",
        "add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }",
        "add rule ip kube-proxy nat-output jump services",
        "add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }",
        "add rule ip kube-proxy nat-postrouting jump masquerading",
        "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips",
        "add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000",
        "add rule ip kube-proxy masquerading mark and 0x4000 == 0 return",
        "add rule ip kube-proxy masquerading mark set mark xor 0x4000",
        "add rule ip kube-proxy masquerading masquerade fully-random",
    ] {
        assert!(
            ruleset.lines().any(|line| line == expected),
            "missing {expected:?}"
        );
    }
    assert!(ruleset.contains(
        "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict"
    ));
    assert_eq!(
        lines_starting(&ruleset, "add chain ip kube-proxy service-").len(),
        SERVICES
    );
    assert_eq!(
        lines_starting(&ruleset, "add chain ip kube-proxy endpoint-").len(),
        SERVICES * 3
    );
    assert_eq!(
        lines_starting(&ruleset, "add element ip kube-proxy service-ips ").len(),
        SERVICES
    );
    assert_eq!(ruleset.matches(" dnat to ").count(), SERVICES * 3);

    // The target's chain picks one of its three endpoint chains at random.
    let numgen: Vec<&str> = ruleset
        .lines()
        .filter(|line| line.contains("bench/web/tcp/p80 numgen"))
        .collect();
    assert_eq!(numgen.len(), 1, "{numgen:?}");
    let (_, vmap) = numgen[0]
        .split_once(" numgen random mod 3 vmap { ")
        .unwrap_or_else(|| panic!("{}", numgen[0]));
    let verdicts: Vec<&str> = vmap.trim_end_matches(" }").split(" , ").collect();
    assert_eq!(verdicts.len(), 3, "{vmap}");
    for (index, (verdict, (ip, port))) in verdicts.iter().zip(three_endpoints()).enumerate() {
        let prefix = format!("{index} : goto endpoint-");
        let suffix = format!("-bench/web/tcp/p80__{ip}/{port}");
        assert!(
            verdict.starts_with(&prefix) && verdict.ends_with(&suffix),
            "{verdict}"
        );
    }
    // The target is found by the map, wherever it is in the list.
    assert!(ruleset.lines().any(|line| line.starts_with(
        "add element ip kube-proxy service-ips { 10.96.0.80 . tcp . 80 : goto service-"
    ) && line.ends_with("-bench/web/tcp/p80 }")));
}

#[test]
fn nftables_chain_names_are_kube_proxys() {
    // Names from kube-proxy's pkg/proxy/nftables/proxier_test.go for the same Service.
    let ruleset = nftables::ruleset(&[kube_proxy_svc1()]);
    let service = "service-ULMVA6XW-ns1/svc1/tcp/p80";
    let endpoint = "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80";
    for expected in [
        format!("add chain ip kube-proxy {service}"),
        format!(
            "add rule ip kube-proxy {service} ip daddr 172.30.0.41 tcp dport 80 \
             ip saddr != 10.244.0.0/16 jump mark-for-masquerade"
        ),
        format!(
            "add rule ip kube-proxy {service} numgen random mod 1 vmap {{ 0 : goto {endpoint} }}"
        ),
        format!("add chain ip kube-proxy {endpoint}"),
        format!("add rule ip kube-proxy {endpoint} ip saddr 10.180.0.1 jump mark-for-masquerade"),
        format!("add rule ip kube-proxy {endpoint} meta l4proto tcp dnat to 10.180.0.1:80"),
        format!(
            "add element ip kube-proxy service-ips {{ 172.30.0.41 . tcp . 80 : goto {service} }}"
        ),
    ] {
        assert!(
            ruleset.lines().any(|line| line == expected),
            "missing {expected:?} in\n{ruleset}"
        );
    }
    let empty = nftables::ruleset(&[web(Vec::new())]);
    assert!(!empty.contains("bench/web"), "{empty}");
}

// ---- traffic through the replicas ----

/// A replica's three functions, so that both are put through the same checks.
struct Replica {
    name: &'static str,
    generate: fn(&[ServiceSpec]) -> String,
    apply: fn(&Netns, &str) -> Result<()>,
    flush: fn(&Netns) -> Result<()>,
}

const IPTABLES: Replica = Replica {
    name: "iptables",
    generate: iptables::rules,
    apply: iptables::apply,
    flush: iptables::flush,
};

const NFTABLES: Replica = Replica {
    name: "nftables",
    generate: nftables::ruleset,
    apply: nftables::apply,
    flush: nftables::flush,
};

/// One node with three backend pods (HTTP on 8080, UDP echo on 5353) and a client pod.
struct Cluster {
    node: Node,
    pods: Vec<Pod>,
    client: Pod,
    /// Owns what the handles above name; removes it all on drop.
    _testbed: Testbed,
}

fn cluster() -> Cluster {
    // The error says which privilege is missing ("needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) ...").
    let mut testbed = Testbed::new().unwrap_or_else(|err| panic!("{err:#}"));
    let node = testbed.add_node("node1").unwrap();
    let pods: Vec<Pod> = (0..3u8)
        .map(|index| {
            let pod = testbed
                .add_pod(&node, &format!("web-{index}"), node.pod_addr(10 + index))
                .unwrap();
            pod.serve_http(HTTP_PORT).unwrap();
            pod.serve(&[], &[UDP_PORT]).unwrap();
            pod
        })
        .collect();
    let client = testbed
        .add_pod(&node, "client", node.pod_addr(100))
        .unwrap();
    Cluster {
        node,
        pods,
        client,
        _testbed: testbed,
    }
}

impl Cluster {
    /// `SERVICES` Services: a UDP one first, the HTTP one last, fillers between them.
    fn services(&self) -> Vec<ServiceSpec> {
        let endpoints = |port| self.pods.iter().map(|pod| (pod.addr, port)).collect();
        let dns = ServiceSpec {
            namespace: "bench".into(),
            name: "dns".into(),
            cluster_ip: DNS_IP,
            port: 53,
            protocol: Protocol::Udp,
            endpoints: endpoints(UDP_PORT),
        };
        let mut services = baselines::with_fillers(SERVICES - 1, web(endpoints(HTTP_PORT)));
        services.insert(0, dns);
        services
    }

    fn pod_names(&self) -> BTreeSet<String> {
        self.pods.iter().map(|pod| pod.name.clone()).collect()
    }

    fn assert_untranslated(&self, when: &str) {
        let web = SocketAddrV4::new(WEB_IP, 80);
        let dns = SocketAddrV4::new(DNS_IP, 53);
        if let Ok(body) = http_get(&self.client, web, FAIL) {
            panic!("{when}: {web} answered {body:?}, but nothing should translate it");
        }
        if let Ok(reply) = self.client.udp_request(dns, FAIL) {
            panic!("{when}: {dns} answered {reply:?}, but nothing should translate it");
        }
        let ruleset = run(&self.node.netns, "nft", &["list", "ruleset"]);
        assert_eq!(
            ruleset.trim(),
            "",
            "{when}: nf_tables rules left in the node"
        );
        let saved = run(&self.node.netns, "iptables-save", &[]);
        assert!(
            !saved.contains("KUBE-"),
            "{when}: iptables rules left:\n{saved}"
        );
    }
}

/// Runs a tool inside `netns` and returns its stdout; panics with its stderr if it fails.
fn run(netns: &Netns, program: &str, args: &[&str]) -> String {
    let output = netns
        .command(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("starting {program}: {err}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// One `GET /` with `Connection: close` from `client`; the body of the `200 OK`.
fn http_get(client: &Pod, to: SocketAddrV4, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let mut stream = client
        .netns
        .tcp_connect(to, timeout)
        .with_context(|| format!("connecting to {to}"))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
    stream.set_read_timeout(Some(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1)),
    ))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("reading the response from {to}"))?;
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        bail!("no complete response from {to}: {response:?}");
    };
    ensure!(
        head.starts_with("HTTP/1.1 200 OK\r\n"),
        "{to} answered {head:?}"
    );
    Ok(body.to_owned())
}

fn translates_the_last_of_50_services_to_every_pod_until_flushed(replica: &Replica) {
    let cluster = cluster();
    for pod in &cluster.pods {
        let direct = SocketAddrV4::new(pod.addr, HTTP_PORT);
        assert_eq!(http_get(&cluster.client, direct, OK).unwrap(), pod.name);
    }
    cluster.assert_untranslated("before the replica");

    let rules = (replica.generate)(&cluster.services());
    (replica.apply)(&cluster.node.netns, &rules)
        .unwrap_or_else(|err| panic!("{}: {err:#}", replica.name));
    let web = SocketAddrV4::new(WEB_IP, 80);
    let first = http_get(&cluster.client, web, OK)
        .unwrap_or_else(|err| panic!("{}: {web}: {err:#}", replica.name));
    assert!(
        cluster.pod_names().contains(&first),
        "answered by {first:?}"
    );
    // Each connection is a new conntrack entry and a new random pick: in 60 the chance that
    // some pod is never picked is 3 * (2/3)^60, below 1e-10.
    let reached: BTreeSet<String> = (0..60)
        .map(|_| http_get(&cluster.client, web, OK).unwrap())
        .collect();
    assert_eq!(
        reached,
        cluster.pod_names(),
        "{}: pods reached",
        replica.name
    );
    let dns = SocketAddrV4::new(DNS_IP, 53);
    let reached: BTreeSet<String> = (0..60)
        .map(|_| cluster.client.udp_request(dns, OK).unwrap())
        .collect();
    assert_eq!(
        reached,
        cluster.pod_names(),
        "{}: pods reached over UDP",
        replica.name
    );

    // Applying again replaces the rules instead of adding to them.
    (replica.apply)(&cluster.node.netns, &rules).unwrap();
    assert!(
        cluster
            .pod_names()
            .contains(&http_get(&cluster.client, web, OK).unwrap())
    );

    (replica.flush)(&cluster.node.netns).unwrap();
    cluster.assert_untranslated("after the flush");
    // Flushing what is not there is no error, so a benchmark can flush before it starts.
    (replica.flush)(&cluster.node.netns).unwrap();
}

#[test]
fn iptables_replica_sends_the_last_of_50_services_to_every_pod_until_flushed() {
    println!("iptables backend: {:?}", iptables::backend().unwrap());
    translates_the_last_of_50_services_to_every_pod_until_flushed(&IPTABLES);
}

#[test]
fn nftables_replica_sends_the_last_of_50_services_to_every_pod_until_flushed() {
    translates_the_last_of_50_services_to_every_pod_until_flushed(&NFTABLES);
}

/// The benchmark's load generator, briefly: new connections to the target's ClusterIP.
fn wrk_gets_answers_through(replica: &Replica) {
    let cluster = cluster();
    let rules = (replica.generate)(&cluster.services());
    (replica.apply)(&cluster.node.netns, &rules).unwrap();
    let url = format!("http://{WEB_IP}/");
    let output = cluster
        .client
        .netns
        .command("wrk")
        .args(["-c4", "-t1", "-d1s", "-H", "Connection: close", &url])
        .output()
        .expect("starting wrk (is it installed?)");
    let summary = String::from_utf8_lossy(&output.stdout);
    println!("wrk through the {} replica:\n{summary}", replica.name);
    assert!(
        output.status.success(),
        "wrk failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let requests: u64 = summary
        .lines()
        .find_map(|line| line.trim().split_once(" requests in "))
        .and_then(|(count, _)| count.parse().ok())
        .unwrap_or_else(|| panic!("no request count in the wrk summary"));
    assert!(requests > 0, "wrk completed no request");
    assert!(
        !summary.contains("Non-2xx"),
        "some responses were not 200 OK"
    );
    (replica.flush)(&cluster.node.netns).unwrap();
}

#[test]
fn wrk_gets_answers_through_the_iptables_replica() {
    wrk_gets_answers_through(&IPTABLES);
}

#[test]
fn wrk_gets_answers_through_the_nftables_replica() {
    wrk_gets_answers_through(&NFTABLES);
}

// ---- the HTTP pod server ----

#[test]
fn serve_http_keeps_connections_alive_and_honours_connection_close() {
    let cluster = cluster();
    let pod = &cluster.pods[0];
    let to = SocketAddrV4::new(pod.addr, HTTP_PORT);
    let mut stream = cluster.client.netns.tcp_connect(to, OK).unwrap();
    stream.set_read_timeout(Some(OK)).unwrap();
    // Two requests on one connection: the first response must leave it open.
    for _ in 0..2 {
        stream
            .write_all(b"GET /any/path HTTP/1.1\r\nHost: test\r\n\r\n")
            .unwrap();
        let response = read_response(&mut stream);
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response:?}");
        assert!(
            response.ends_with(&format!("\r\n\r\n{}", pod.name)),
            "{response:?}"
        );
    }
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut rest = String::new();
    // read_to_string returns only once the server has closed the connection.
    stream.read_to_string(&mut rest).unwrap();
    assert!(rest.starts_with("HTTP/1.1 200 OK\r\n"), "{rest:?}");
    assert!(
        rest.to_ascii_lowercase().contains("connection: close"),
        "{rest:?}"
    );
    assert!(rest.ends_with(&pod.name), "{rest:?}");
}

/// Reads one response whose body is the pod name (the head says how long it is).
fn read_response(stream: &mut impl Read) -> String {
    let mut response = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        stream.read_exact(&mut byte).unwrap();
        response.push(byte[0]);
        if response.ends_with(b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8(response.clone()).unwrap();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .and_then(|length| length.trim().parse().ok())
        .unwrap_or_else(|| panic!("no content-length in {head:?}"));
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    response.extend(body);
    String::from_utf8(response).unwrap()
}
