//! The agent against a Kubernetes API: the testbed's fake API server, spoken to through the real
//! kube client as on a cluster, with real traffic checking that the datapath follows the API and
//! keeps serving through agent restarts and API faults.
//!
//! Needs root (network namespaces, eBPF); `cargo xtask test` runs it as root.
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use proxy_testbed::agent::Agent;
use proxy_testbed::apiserver::{FakeApiServer, Kind};
use proxy_testbed::{Pod, Testbed, io_error_kind};
use serde_json::{Value, json};

const AGENT: &str = env!("CARGO_BIN_EXE_proxy-agent");
const TIMEOUT: Duration = Duration::from_secs(3);
/// The bound for changes to reach the datapath after an API fault ends.
const RECOVERY: Duration = Duration::from_secs(2);
/// Short, so a stalled watch is noticed within seconds (timeout + 5 s).
const WATCH_TIMEOUT_S: &str = "2";

struct Cluster {
    _testbed: Testbed,
    api: FakeApiServer,
    agent: Agent,
    client: Pod,
    pods: Vec<Pod>,
}

/// Tests share the machine's two cores; the one that loads them on purpose runs alone (it takes
/// this exclusively, every other test shares it), so that its agent restarts are not starved by
/// another test's traffic and the API server answers them in time.
static MACHINE: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn shared_machine() -> std::sync::RwLockReadGuard<'static, ()> {
    MACHINE
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One node running the agent against an API server listening on the node's loopback, three
/// pods answering on 8080, and a client.
fn cluster() -> Cluster {
    let mut testbed = Testbed::new().unwrap();
    let node = testbed.add_node("node-1").unwrap();
    let pods: Vec<Pod> = (1..=3)
        .map(|i| {
            let pod = testbed
                .add_pod(&node, &format!("pod-{i}"), node.pod_addr(10 + i))
                .unwrap();
            pod.serve(&[8080], &[8080]).unwrap();
            pod
        })
        .collect();
    let client = testbed
        .add_pod(&node, "client", node.pod_addr(100))
        .unwrap();
    let listener = node
        .netns
        .tcp_listen(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .unwrap();
    let api = FakeApiServer::start(listener);
    api.set_bookmark_interval(Duration::from_millis(500));
    api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
        "status": {"addresses": [{"type": "InternalIP", "address": node.underlay_addr.to_string()}]}}));
    let kubeconfig = node.state_dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let agent = Agent::start_api(
        AGENT.as_ref(),
        &node,
        &kubeconfig,
        &["--watch-timeout-seconds", WATCH_TIMEOUT_S],
    )
    .unwrap();
    Cluster {
        _testbed: testbed,
        api,
        agent,
        client,
        pods,
    }
}

impl Cluster {
    /// Service `web` on 10.96.0.10 with `pod` as its endpoint, waited for until it answers.
    fn serve_web(&self, pod: &Pod) {
        self.api.apply(service("web", vip(10)));
        self.api.apply(slice("web", &[pod]));
        eventually(RECOVERY, "served", || {
            answered_by(&self.client, vip(10), pod)
        });
    }

    fn metrics(&self) -> String {
        self.agent.metrics().unwrap()
    }
}

/// The value of the sample `name` (with its labels) in Prometheus text.
fn sample(metrics: &str, name: &str) -> f64 {
    let line = metrics
        .lines()
        .find(|line| line.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"));
    line[name.len()..].trim().parse().unwrap()
}

fn vip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, last)
}

fn service(name: &str, cluster_ip: Ipv4Addr) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": cluster_ip.to_string(), "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
}

fn slice(service: &str, endpoints: &[&Pod]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|pod| json!({"addresses": [pod.addr.to_string()], "conditions": {"ready": true}, "nodeName": "node-1"}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-1"), "namespace": "default",
            "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints})
}

/// Who answers on `addr` now: a pod name, or the error kind.
fn answer(client: &Pod, addr: Ipv4Addr) -> Result<String, std::io::ErrorKind> {
    client
        .tcp_request(SocketAddrV4::new(addr, 80), Duration::from_millis(300))
        .map_err(|error| io_error_kind(&error).unwrap_or(std::io::ErrorKind::Other))
}

/// Waits up to `within` for `check` to hold, returning how long it took.
fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

fn answered_by(client: &Pod, addr: Ipv4Addr, pod: &Pod) -> bool {
    answer(client, addr).as_deref() == Ok(pod.name.as_str())
}

fn refused(client: &Pod, addr: Ipv4Addr) -> bool {
    answer(client, addr) == Err(std::io::ErrorKind::ConnectionRefused)
}

/// An echo connection that must keep working: `check` sends a line and expects it back.
struct LongLived {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl LongLived {
    fn open(client: &Pod, addr: Ipv4Addr) -> LongLived {
        let stream = client
            .netns
            .tcp_connect(SocketAddrV4::new(addr, 80), TIMEOUT)
            .unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut greeting = String::new();
        reader.read_line(&mut greeting).unwrap();
        LongLived { stream, reader }
    }

    fn check(&mut self, what: &str) {
        (&self.stream)
            .write_all(format!("{what}\n").as_bytes())
            .unwrap();
        let mut reply = String::new();
        self.reader
            .read_line(&mut reply)
            .unwrap_or_else(|error| panic!("{what}: {error}"));
        assert_eq!(reply.trim(), what);
    }
}

#[test]
fn the_datapath_follows_the_api() {
    let _shared = shared_machine();
    let c = cluster();
    let [a, b, _] = [&c.pods[0], &c.pods[1], &c.pods[2]];
    c.api.apply(service("web", vip(10)));
    c.api.apply(slice("web", &[a]));
    eventually(RECOVERY, "the new Service answers", || {
        answered_by(&c.client, vip(10), a)
    });

    // Endpoints change: the new backend answers, the old one no longer does.
    c.api.apply(slice("web", &[b]));
    eventually(RECOVERY, "the new endpoint answers", || {
        answered_by(&c.client, vip(10), b)
    });

    // ClusterIP -> ExternalName: kube-proxy programs nothing for it.
    let mut external = service("web", vip(10));
    external["spec"] = json!({"type": "ExternalName", "externalName": "example.com"});
    c.api.apply(external);
    eventually(RECOVERY, "the VIP is no longer translated", || {
        answer(&c.client, vip(10)).is_err() && !refused(&c.client, vip(10))
    });

    // Back to ClusterIP on a new address: served there, the old one stays free.
    c.api.apply(service("web", vip(20)));
    eventually(RECOVERY, "the recreated clusterIP answers", || {
        answered_by(&c.client, vip(20), b)
    });
    assert!(answer(&c.client, vip(10)).is_err());

    // No endpoints left: refused. Deleted: untranslated.
    c.api.apply(slice("web", &[]));
    eventually(RECOVERY, "an empty Service refuses", || {
        refused(&c.client, vip(20))
    });
    c.api.delete(Kind::Service, "default", "web");
    eventually(RECOVERY, "a deleted Service is gone", || {
        answer(&c.client, vip(20)).is_err() && !refused(&c.client, vip(20))
    });
}

#[test]
fn the_metrics_count_each_services_flows_refusals_and_map_entries() {
    let _shared = shared_machine();
    let c = cluster();
    c.serve_web(&c.pods[0]);
    let web = "namespace=\"default\",service=\"web\",port=\"http\",protocol=\"TCP\"";
    let flows_before = sample(&c.metrics(), &format!("proxy_service_flows_total{{{web}}}"));
    for _ in 0..20 {
        assert!(answered_by(&c.client, vip(10), &c.pods[0]));
    }
    let metrics = c.metrics();
    // Each connection is one flow, whatever its packets; a retransmitted SYN is not a new one.
    assert_eq!(
        sample(&metrics, &format!("proxy_service_flows_total{{{web}}}")) - flows_before,
        20.0
    );
    // At least SYN, ACK, request and FIN per connection, in the client-to-Service direction.
    assert!(sample(&metrics, &format!("proxy_service_packets_total{{{web}}}")) >= 80.0);
    assert!(sample(&metrics, &format!("proxy_service_bytes_total{{{web}}}")) >= 80.0 * 54.0);
    assert_eq!(
        sample(
            &metrics,
            &format!("proxy_service_affinity_hits_total{{{web}}}")
        ),
        0.0
    );
    assert_eq!(sample(&metrics, "proxy_map_entries{map=\"SERVICES\"}"), 1.0);
    assert_eq!(sample(&metrics, "proxy_map_entries{map=\"BACKENDS\"}"), 1.0);
    assert_eq!(sample(&metrics, "proxy_map_entries{map=\"STATS\"}"), 1.0);
    // Two entries per flow, until they expire (60 s after the FIN).
    assert!(sample(&metrics, "proxy_map_entries{map=\"CONNTRACK\"}") >= 40.0);
    assert_eq!(
        sample(&metrics, "proxy_map_capacity{map=\"SERVICES\"}"),
        65536.0
    );

    // Without endpoints every connection is refused, and counted as such.
    c.api.apply(slice("web", &[]));
    eventually(RECOVERY, "an empty Service refuses", || {
        refused(&c.client, vip(10))
    });
    let refused_before = sample(
        &c.metrics(),
        &format!("proxy_service_refused_flows_total{{{web}}}"),
    );
    for _ in 0..5 {
        assert!(refused(&c.client, vip(10)));
    }
    assert_eq!(
        sample(
            &c.metrics(),
            &format!("proxy_service_refused_flows_total{{{web}}}")
        ) - refused_before,
        5.0
    );

    // A deleted Service's series goes with it.
    c.api.delete(Kind::Service, "default", "web");
    eventually(RECOVERY, "the deleted Service's counters are gone", || {
        !c.metrics().contains("service=\"web\"")
    });
}

#[test]
fn a_restarted_agent_deletes_nothing_before_its_lists_complete_and_sweeps_after() {
    let _shared = shared_machine();
    let mut c = cluster();
    let [a, b, _] = [&c.pods[0], &c.pods[1], &c.pods[2]];
    for (name, ip, pod) in [("kept", vip(10), a), ("doomed", vip(11), b)] {
        c.api.apply(service(name, ip));
        c.api.apply(slice(name, &[pod]));
    }
    eventually(RECOVERY, "both Services answer", || {
        answered_by(&c.client, vip(10), a) && answered_by(&c.client, vip(11), b)
    });
    let mut open = LongLived::open(&c.client, vip(10));

    // The agent dies; meanwhile a Service is deleted and the API fails every list.
    c.agent.process().sigkill().unwrap();
    c.api.delete(Kind::Service, "default", "doomed");
    c.api.fail_requests(Some(500));
    c.agent.restart_unready().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // Not ready: nothing was deleted, and both Services and the open connection are served.
    open.check("while the lists fail");
    assert!(
        answered_by(&c.client, vip(11), b),
        "nothing is swept before the lists complete"
    );
    assert!(!c.agent.process().log().unwrap().contains(" synced "));

    // The API answers again: the deleted Service goes within the bound, the rest stays.
    c.api.fail_requests(None);
    let took = eventually(
        RECOVERY,
        "the Service deleted while the agent was down is gone",
        || answer(&c.client, vip(11)).is_err() && !refused(&c.client, vip(11)),
    );
    eprintln!("swept {took:?} after the API answered");
    open.check("after the sweep");
    assert!(answered_by(&c.client, vip(10), a));
}

#[test]
fn an_api_outage_keeps_traffic_flowing_and_changes_apply_soon_after_it_ends() {
    let _shared = shared_machine();
    let c = cluster();
    let [a, b, _] = [&c.pods[0], &c.pods[1], &c.pods[2]];
    c.serve_web(a);
    let mut open = LongLived::open(&c.client, vip(10));

    c.api.refuse_connections(true);
    let outage = Instant::now();
    c.api.apply(slice("web", &[b]));
    while outage.elapsed() < Duration::from_secs(60) {
        open.check("during the outage");
        assert!(
            answered_by(&c.client, vip(10), a),
            "new connections keep the last known state"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    c.api.refuse_connections(false);
    let took = eventually(
        RECOVERY,
        "the change made during the outage is applied",
        || answered_by(&c.client, vip(10), b),
    );
    eprintln!("applied {took:?} after the API came back");
    open.check("after the outage");
}

#[test]
fn a_410_mid_watch_relists_once_and_loses_nothing_changed_in_the_gap() {
    let _shared = shared_machine();
    let c = cluster();
    let [a, b, _] = [&c.pods[0], &c.pods[1], &c.pods[2]];
    c.serve_web(a);

    let lists_before = c.api.list_count(Kind::EndpointSlice);
    // History is compacted and every open watch gets a 410; a change lands in the gap.
    c.api.compact();
    c.api.expire_watches();
    c.api.apply(slice("web", &[b]));
    eventually(RECOVERY, "the change made in the gap is applied", || {
        answered_by(&c.client, vip(10), b)
    });
    assert_eq!(
        c.api.list_count(Kind::EndpointSlice),
        lists_before + 1,
        "one re-list"
    );
}

#[test]
fn a_stalled_watch_is_detected_and_replaced() {
    let _shared = shared_machine();
    let c = cluster();
    let [a, b, _] = [&c.pods[0], &c.pods[1], &c.pods[2]];
    c.serve_web(a);

    // Every watch goes silent, new ones included, like a dead peer.
    c.api.stall_watches(true);
    let watches_before = c.api.watch_count(Kind::EndpointSlice);
    c.api.apply(slice("web", &[b]));
    std::thread::sleep(Duration::from_secs(1));
    c.api.stall_watches(false);
    // Detected within the watch timeout + 5 s, then a new watch brings the change.
    let took = eventually(
        Duration::from_secs(12),
        "the change behind the stalled watch",
        || answered_by(&c.client, vip(10), b),
    );
    eprintln!("recovered {took:?} after the stall ended");
    assert!(
        c.api.watch_count(Kind::EndpointSlice) > watches_before,
        "the watch was replaced"
    );
}

#[test]
fn a_burst_of_a_thousand_changes_is_a_few_syncs() {
    let _shared = shared_machine();
    let c = cluster();
    let a = &c.pods[0];
    let syncs_before = c.agent.sync_count().unwrap();
    for i in 0..1000u32 {
        let ip = Ipv4Addr::new(10, 97, (i / 250) as u8, (i % 250 + 1) as u8);
        c.api.apply(service(&format!("svc-{i}"), ip));
    }
    c.api.apply(slice("svc-999", &[a]));
    eventually(Duration::from_secs(10), "the last Service answers", || {
        answered_by(&c.client, Ipv4Addr::new(10, 97, 3, 250), a)
    });
    let syncs = c.agent.sync_count().unwrap() - syncs_before;
    assert!(syncs <= 20, "{syncs} syncs for 1001 changes");
    eprintln!("1001 changes took {syncs} syncs");
}

/// A Service `name` on `ip`, changed by `patch`.
fn bad_service(name: &str, ip: u8, patch: impl Fn(&mut Value)) -> (String, Value) {
    let mut object = service(name, vip(ip));
    patch(&mut object);
    (format!("Service default/{name}:"), object)
}

/// An extra slice `name` of Service `good`, changed by `patch`.
fn bad_slice(name: &str, endpoint: &Pod, patch: impl Fn(&mut Value)) -> (String, Value) {
    let mut object = slice("good", &[endpoint]);
    object["metadata"]["name"] = json!(name);
    patch(&mut object);
    (format!("EndpointSlice default/{name}:"), object)
}

#[test]
fn bad_objects_are_skipped_one_log_line_each_and_the_rest_syncs() {
    let _shared = shared_machine();
    let c = cluster();
    let good = &c.pods[0];
    c.api.apply(service("good", vip(10)));
    c.api.apply(slice("good", &[good]));
    let set = |field: &'static str, value: Value| {
        move |object: &mut Value| object["spec"][field] = value.clone()
    };
    let port = |field: &'static str, value: Value| {
        move |object: &mut Value| object["spec"]["ports"][0][field] = value.clone()
    };
    let slice_port = |field: &'static str, value: Value| {
        move |object: &mut Value| object["ports"][0][field] = value.clone()
    };
    let address = |value: &'static str| {
        move |object: &mut Value| object["endpoints"][0]["addresses"][0] = json!(value)
    };
    // (what the log line names, the object)
    let bad = vec![
        bad_service(
            "leading-zero-ip",
            31,
            set("clusterIP", json!("010.96.0.31")),
        ),
        bad_service("garbage-ip", 32, set("clusterIP", json!("10.96.0.x"))),
        bad_service(
            "out-of-range-ip",
            33,
            set("clusterIP", json!("10.96.0.300")),
        ),
        bad_service("short-ip", 34, set("clusterIP", json!("10.96.0"))),
        bad_service("loopback-ip", 35, set("clusterIP", json!("127.0.0.1"))),
        bad_service("type-unknown", 36, set("type", json!("Magic"))),
        bad_service(
            "affinity-unknown",
            37,
            set("sessionAffinity", json!("Cookie")),
        ),
        bad_service("affinity-timeout-0", 38, |object| {
            object["spec"]["sessionAffinity"] = json!("ClientIP");
            object["spec"]["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 0}});
        }),
        bad_service("port-0", 39, port("port", json!(0))),
        bad_service("port-65536", 40, port("port", json!(65536))),
        bad_service("protocol-http", 41, port("protocol", json!("HTTP"))),
        bad_service("protocol-sctp", 42, port("protocol", json!("SCTP"))),
        bad_service("duplicate-port", 43, |object| {
            let first = object["spec"]["ports"][0].clone();
            object["spec"]["ports"] = json!([first.clone(), first]);
        }),
        // Sorts after default/good, so it is the one that loses the frontend.
        bad_service("zz-duplicate-frontend", 10, |_| {}),
        bad_slice("good-leading-zero", good, address("010.244.1.11")),
        bad_slice("good-wrong-family", good, address("fd00::1")),
        bad_slice("good-garbage", good, address("not-an-ip")),
        bad_slice("good-port-0", good, slice_port("port", json!(0))),
        bad_slice("good-port-65536", good, slice_port("port", json!(65536))),
        bad_slice("good-protocol", good, slice_port("protocol", json!("QUIC"))),
        bad_slice("good-address-type", good, |object| {
            object["addressType"] = json!("Banana")
        }),
        bad_slice("good-no-addresses", good, |object| {
            object["endpoints"][0]["addresses"] = json!([])
        }),
        // Several MiB: more endpoints than the API lets a slice hold.
        bad_slice("good-huge", good, |object| {
            let endpoints = (0..40_000u32).map(|i| {
                json!({"addresses": [format!("10.200.{}.{}", i / 250, i % 250 + 1)], "conditions": {"ready": true}})
            });
            object["endpoints"] = Value::Array(endpoints.collect());
        }),
    ];
    for (_, object) in &bad {
        c.api.apply(object.clone());
    }
    // Deletes of what never existed, or twice, change nothing.
    c.api.delete(Kind::Service, "default", "never-existed");
    c.api.delete(Kind::Service, "default", "port-0");
    c.api.delete(Kind::Service, "default", "port-0");

    // The good Service is served, with its good endpoint only.
    eventually(RECOVERY, "the good Service answers", || {
        answered_by(&c.client, vip(10), good)
    });
    for _ in 0..10 {
        assert!(answered_by(&c.client, vip(10), good));
    }
    // An unrelated change later: nothing already reported is reported again.
    let synced = c.agent.sync_count().unwrap();
    c.api.apply(service("later", vip(50)));
    c.agent.wait_for_sync_after(synced).unwrap();
    assert!(
        c.agent.process().try_wait().unwrap().is_none(),
        "the agent is still running"
    );
    // The counters say the same: every kind of bad object is counted.
    let metrics = c.metrics();
    let services = bad
        .iter()
        .filter(|(object, _)| object.starts_with("Service"))
        .count()
        - 1;
    let slices = bad.len() - services - 1;
    assert_eq!(
        sample(&metrics, "proxy_rejected_objects{kind=\"Service\"}"),
        services as f64,
        "port-0 was deleted"
    );
    assert!(sample(&metrics, "proxy_rejected_objects{kind=\"EndpointSlice\"}") >= slices as f64);
    assert!(sample(&metrics, "proxy_rejections_total{kind=\"Service\"}") >= services as f64);
    let log = c.agent.process().log().unwrap();
    let skips: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("WARN") && line.contains("skipping"))
        .collect();
    for (object, _) in &bad {
        let lines = skips
            .iter()
            .filter(|line| line.contains(object.as_str()))
            .count();
        // port-0 was deleted: at most once, before its delete.
        let expected = if object.contains("port-0") {
            0..=1
        } else {
            1..=1
        };
        assert!(
            expected.contains(&lines),
            "{object} logged {lines} times; skips:\n{}",
            skips.join("\n")
        );
    }
}

#[test]
fn ten_agent_kills_under_load_reset_nothing_and_fail_no_new_connection() {
    let _alone = MACHINE
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

    let mut c = cluster();
    let pods: Vec<&Pod> = c.pods.iter().collect();
    c.api.apply(service("web", vip(10)));
    c.api.apply(slice("web", &pods));
    eventually(RECOVERY, "served", || answer(&c.client, vip(10)).is_ok());

    let stop = Arc::new(AtomicBool::new(false));
    let (round_trips, connections) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    // 200 long-lived connections, each echoing without pause.
    for i in 0..200 {
        let mut open = LongLived::open(&c.client, vip(10));
        let (stop, round_trips, failures) = (stop.clone(), round_trips.clone(), failures.clone());
        workers.push(std::thread::spawn(move || {
            background_priority();
            let payload = format!("connection {i}\n");
            let mut reply = String::new();
            while !stop.load(Relaxed) {
                reply.clear();
                let result = (&open.stream)
                    .write_all(payload.as_bytes())
                    .and_then(|()| open.reader.read_line(&mut reply).map(|_| ()));
                if result.is_err() || reply != payload {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("connection {i}: {result:?} {reply:?}"));
                    return;
                }
                round_trips.fetch_add(1, Relaxed);
            }
        }));
    }
    // A new connection every 10 ms.
    {
        let (stop, connections, failures, client) = (
            stop.clone(),
            connections.clone(),
            failures.clone(),
            c.client.clone(),
        );
        workers.push(std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                match client.tcp_request(SocketAddrV4::new(vip(10), 80), TIMEOUT) {
                    Ok(_) => drop(connections.fetch_add(1, Relaxed)),
                    Err(error) => failures
                        .lock()
                        .unwrap()
                        .push(format!("new connection: {error:#}")),
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }));
    }

    let load_start = Instant::now();
    let mut restarts = Vec::new();
    for _ in 0..10 {
        let start = Instant::now();
        c.agent.process().sigkill().unwrap();
        c.agent.restart().unwrap();
        restarts.push(start.elapsed().as_millis());
    }
    eprintln!("restarts took {restarts:?} ms");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Relaxed);
    for worker in workers {
        worker.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        failures.first()
    );
    eprintln!(
        "10 kills: {} echo round trips on 200 connections, {} new connections, 0 failures",
        round_trips.load(Relaxed),
        connections.load(Relaxed)
    );
    // One every 10 ms (plus the connection's own time): at least half that many must have run.
    let expected = load_start.elapsed().as_millis() as u64 / 20;
    let made = connections.load(Relaxed);
    assert!(
        made >= expected,
        "only {made} new connections, {expected} expected"
    );
}

/// The echo load runs at the lowest priority: on two cores, 200 connections echoing without
/// pause would otherwise starve the agent and the API server whose restarts the test is about.
fn background_priority() {
    // SAFETY: plain syscalls on the calling thread.
    unsafe {
        let thread = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, thread, 19);
    }
}
