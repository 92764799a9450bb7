//! Scenario S3, the control plane: how fast the agent programs N Services from empty, how soon an
//! endpoint change reaches the datapath once N Services are programmed, and what the agent and
//! its maps cost in memory.
//!
//! # Set-up
//!
//! One testbed node, three pods answering on TCP 8080 with their name, and a client pod. The fake
//! API server (`proxy_testbed::apiserver`) listens on the node's loopback and, before the agent
//! starts, holds the Node and N Services `svc-00000`… (ClusterIP port 80 -> 8080), each with one
//! EndpointSlice of 10 ready endpoints at distinct made-up addresses that nothing ever connects
//! to. The last Service, last in list order too, is the measured one: its slice lists one real
//! pod at a time. Names and addresses are a function of the index, so every run sees the same
//! objects.
//!
//! # What is measured
//!
//! - Sync from empty: `elapsed_us` of the agent's first `synced` log line, the agent's own timing
//!   of planning and writing the maps for all N Services. It does not include listing the objects
//!   or compiling them.
//! - Spawn to first answer: wall time from just before the agent is spawned to the first TCP
//!   connection from the client pod to the measured ClusterIP that a pod answers. The agent
//!   attaches to devices only after its first sync, so this is load + list + compile + sync +
//!   attach. It includes up to 10 ms of the testbed polling the agent's log for `ready` before
//!   the first connection is tried.
//! - Endpoint change latency: the measured Service's slice is switched to the next pod (cycling
//!   through the three, so each change names a pod other than the one serving), timed from just
//!   before [`FakeApiServer::apply`] to the first connection answered by the new pod. The client
//!   polls every millisecond: connect, read the name. Each answer went through the TC program, so
//!   this is API event -> watch -> batch -> compile -> map writes -> first packet. The next sample
//!   starts once the agent has logged the sync, so samples never overlap.
//! - Memory, once everything is programmed: the agent's `VmRSS` (and `VmHWM`, the peak of the
//!   initial list and sync), and the sum of `bytes_memlock` over its pinned maps (`bpftool`).
//!
//! # What is not
//!
//! - The API server's own latency: the fake one runs in this process and answers lists and
//!   watch events from memory over loopback HTTP/1.1 and JSON. A real kube-apiserver (etcd, watch
//!   cache, TLS, priority and fairness) adds its own time to the list and to every event, so on a
//!   cluster both figures are larger; what is measured here is the agent's share.
//! - Isolation: the fake API server, the pods' echo servers and the client are threads of this
//!   process and share the cores with the agent (and with anything else the machine runs).
//! - Per-packet cost of the datapath, which other scenarios measure.

use std::fs;
use std::io::{self, BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use proxy_common::map_sizes;
use proxy_testbed::agent::Agent;
use proxy_testbed::apiserver::FakeApiServer;
use proxy_testbed::{Pod, Testbed};
use serde_json::{Value, json};

use super::report::{ControlPlane, Latency};
use crate::cmd;

pub const ENDPOINTS_PER_SERVICE: u32 = 10;

/// The most Services the address plan holds: ClusterIPs come from 10.96.0.0/12 and the made-up
/// endpoints from 10.200.0.0/13, [`HOSTS_PER_SECOND_OCTET`] per second octet.
pub const MAX_SERVICES: u32 = 50_000;
const _: () = assert!(MAX_SERVICES * ENDPOINTS_PER_SERVICE <= 8 * HOSTS_PER_SECOND_OCTET);
const _: () = assert!(MAX_SERVICES <= 16 * HOSTS_PER_SECOND_OCTET);
// [`map_size_args`] grows only the backend map: the frontend map's default must hold them all.
const _: () = assert!(MAX_SERVICES <= map_sizes::SERVICES);

/// 256 third octets × 250 hosts (.1 to .250, see [`plan_address`]).
const HOSTS_PER_SECOND_OCTET: u32 = 256 * 250;
const CLUSTER_IP_SECOND_OCTET: u8 = 96;
const ENDPOINT_SECOND_OCTET: u8 = 200;

const NODE: &str = "node-1";
const NAMESPACE: &str = "default";
const SERVICE_PORT: u16 = 80;
const POD_PORT: u16 = 8080;
/// The agent's default too; stated so that no watch ends in the middle of a short benchmark.
const WATCH_TIMEOUT_S: &str = "60";

/// Between two connection attempts while waiting for an answer: the resolution of the latencies.
const POLL: Duration = Duration::from_millis(1);
/// One connection attempt (connect and read); a lost SYN would otherwise stall the poll.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a change (or, after `ready`, the first answer) may take before the run fails.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the scenario with `services` Services and `samples` endpoint changes.
pub fn run(agent_binary: &Path, services: u32, samples: usize) -> Result<ControlPlane> {
    assert!(
        (1..=MAX_SERVICES).contains(&services),
        "{services} Services: the address plan holds 1 to {MAX_SERVICES}"
    );
    println!("S3, {services} Services: testbed, pods and API objects ...");
    let mut testbed = Testbed::new()?;
    let node = testbed.add_node(NODE)?;
    let pods = (1..=3)
        .map(|i| {
            let pod = testbed.add_pod(&node, &format!("pod-{i}"), node.pod_addr(10 + i))?;
            pod.serve(&[POD_PORT], &[])?;
            Ok(pod)
        })
        .collect::<Result<Vec<Pod>>>()?;
    let client = testbed.add_pod(&node, "client", node.pod_addr(100))?;
    let listener = node
        .netns
        .tcp_listen(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .context("listening for the fake API server in the node")?;
    let api = FakeApiServer::start(listener);
    api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
        "status": {"addresses": [{"type": "InternalIP", "address": node.underlay_addr.to_string()}]}}));
    let measured = services - 1;
    for index in 0..services {
        api.apply(service(index));
        let endpoints = if index == measured {
            vec![pods[0].addr]
        } else {
            made_up_endpoints(index)
        };
        api.apply(slice(index, &endpoints));
    }
    let kubeconfig = node.state_dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)
        .with_context(|| format!("writing {}", kubeconfig.display()))?;

    println!("S3, {services} Services: agent from empty ...");
    let mut args = vec![
        "--watch-timeout-seconds".to_owned(),
        WATCH_TIMEOUT_S.to_owned(),
    ];
    args.extend(map_size_args(services));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let vip = SocketAddrV4::new(cluster_ip(measured), SERVICE_PORT);
    let spawned = Instant::now();
    let agent = Agent::start_api(agent_binary, &node, &kubeconfig, &args)?;
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let answered = client
        .netns
        .run(|| wait_for_answer(vip, &pods[0].name, deadline))?;
    let spawn_to_first_answer = answered - spawned;
    let log = agent.process().log()?;
    let first = first_sync(&log).with_context(|| format!("no `synced` line in:\n{log}"))?;
    if first.services != u64::from(services) {
        bail!(
            "the first sync had {} Services, not {services}: it did not start from the complete \
             list; log:\n{log}",
            first.services
        );
    }
    let (rss, peak_rss) = resident_bytes(agent.process().pid())?;
    let bpf_map_bytes = pinned_map_bytes(&node.bpf_dir)?;

    println!("S3, {services} Services: {samples} endpoint changes ...");
    let mut latencies = Vec::with_capacity(samples);
    for sample in 1..=samples {
        let to = &pods[sample % pods.len()];
        let synced_before = agent.sync_count()?;
        let changed = slice(measured, &[to.addr]);
        let latency = client.netns.run(|| {
            let start = Instant::now();
            api.apply(changed);
            wait_for_answer(vip, &to.name, start + ANSWER_TIMEOUT).map(|answered| answered - start)
        })?;
        latencies.push(micros(latency));
        agent.wait_for_sync_after(synced_before)?;
    }

    Ok(ControlPlane {
        services,
        endpoints_per_service: ENDPOINTS_PER_SERVICE,
        first_sync_us: first.elapsed_us,
        first_sync_writes: first.writes,
        spawn_to_first_answer_us: micros(spawn_to_first_answer),
        change_latency: Latency::from_samples(latencies),
        agent_rss_bytes: rss,
        agent_peak_rss_bytes: peak_rss,
        bpf_map_bytes,
    })
}

/// Zero-padded, so that the API server's list order (by name) is the creation order and the
/// measured Service comes last.
fn service_name(index: u32) -> String {
    format!("svc-{index:05}")
}

fn cluster_ip(index: u32) -> Ipv4Addr {
    plan_address(CLUSTER_IP_SECOND_OCTET, index)
}

/// The `index`-th address from `10.<second_octet>.0.1` on, using hosts .1 to .250 of each /24:
/// no address looks like a network or broadcast address to a reader (or to a tool).
fn plan_address(second_octet: u8, index: u32) -> Ipv4Addr {
    let (subnet, host) = (index / 250, index % 250);
    let second = u32::from(second_octet) + subnet / 256;
    let octet = |value: u32| u8::try_from(value).expect("index beyond the address plan");
    Ipv4Addr::new(10, octet(second), octet(subnet % 256), octet(host + 1))
}

/// Service `index`'s endpoints: addresses of no pod, distinct across all Services, so the
/// backend map holds N × 10 entries as on a cluster with that many pods.
fn made_up_endpoints(index: u32) -> Vec<Ipv4Addr> {
    (0..ENDPOINTS_PER_SERVICE)
        .map(|i| plan_address(ENDPOINT_SECOND_OCTET, index * ENDPOINTS_PER_SERVICE + i))
        .collect()
}

fn service(index: u32) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": service_name(index), "namespace": NAMESPACE},
        "spec": {"clusterIP": cluster_ip(index).to_string(),
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": POD_PORT}]}})
}

fn slice(index: u32, endpoints: &[Ipv4Addr]) -> Value {
    let name = service_name(index);
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|addr| json!({"addresses": [addr.to_string()], "conditions": {"ready": true}, "nodeName": NODE}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": POD_PORT, "protocol": "TCP"}],
        "endpoints": endpoints})
}

/// The agent's defaults hold 26,214 Services × 10 endpoints; beyond that the backend map (and
/// with it the slot map) is sized to fit, rather than the run failing on a full map.
fn map_size_args(services: u32) -> Vec<String> {
    let backends = services * ENDPOINTS_PER_SERVICE;
    if backends <= map_sizes::BACKENDS {
        return Vec::new();
    }
    vec![
        "--map-size-backends".to_owned(),
        backends.next_power_of_two().to_string(),
    ]
}

/// Connects to `to` every [`POLL`] until `pod` answers, and returns when it did; fails once
/// `deadline` has passed. Runs inside the client's namespace ([`proxy_testbed::Netns::run`]) and
/// connects directly: `Pod::tcp_request` starts a thread per connection, which would add its own
/// cost to every attempt.
fn wait_for_answer(to: SocketAddrV4, pod: &str, deadline: Instant) -> Result<Instant> {
    loop {
        let last = match answer(to) {
            Ok(name) if name == pod => return Ok(Instant::now()),
            Ok(name) => format!("answered by {name}"),
            Err(err) => err.to_string(),
        };
        if Instant::now() >= deadline {
            bail!("{pod} did not answer on {to} in time; the last attempt: {last}");
        }
        std::thread::sleep(POLL);
    }
}

/// One connection: the first line the server writes is its pod's name.
fn answer(to: SocketAddrV4) -> io::Result<String> {
    let stream = TcpStream::connect_timeout(&to.into(), ATTEMPT_TIMEOUT)?;
    stream.set_read_timeout(Some(ATTEMPT_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line.trim().to_owned())
}

/// The numbers of the agent's first `synced` log line.
#[derive(Debug, PartialEq)]
pub(super) struct FirstSync {
    pub services: u64,
    pub writes: u64,
    pub elapsed_us: u64,
}

/// Parses the first line with ` synced ` (what `Agent::sync_count` counts), whose fields are
/// tracing's `key=value` pairs.
pub(super) fn first_sync(log: &str) -> Option<FirstSync> {
    let line = log.lines().find(|line| line.contains(" synced "))?;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
    };
    Some(FirstSync {
        services: field("services")?,
        writes: field("writes")?,
        elapsed_us: field("elapsed_us")?,
    })
}

/// `VmRSS` and `VmHWM` (the peak) of process `pid`, in bytes.
fn resident_bytes(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name| status_bytes(&status, name).with_context(|| format!("no {name} in {path}"));
    Ok((field("VmRSS")?, field("VmHWM")?))
}

/// A `/proc/<pid>/status` size field (`VmRSS:   12345 kB`) in bytes.
fn status_bytes(status: &str, field: &str) -> Option<u64> {
    let value = status.lines().find_map(|line| {
        line.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .strip_suffix(" kB")
    })?;
    value.trim().parse::<u64>().ok().map(|kib| kib * 1024)
}

/// Sums `bytes_memlock` over the maps pinned directly in `dir` (`links/` holds the TCX links).
fn pinned_map_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            continue;
        }
        let mut show = Command::new("bpftool");
        show.args(["-j", "map", "show", "pinned"]).arg(entry.path());
        let shown = cmd::output(&mut show)?;
        total += memlock(&shown)
            .with_context(|| format!("no bytes_memlock in `bpftool map show`: {shown}"))?;
    }
    Ok(total)
}

/// `bytes_memlock` from `bpftool -j map show` of one map.
fn memlock(bpftool_json: &str) -> Option<u64> {
    let map: Value = serde_json::from_str(bpftool_json).ok()?;
    map.get("bytes_memlock")?.as_u64()
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_plan_skips_network_and_broadcast_addresses() {
        assert_eq!(cluster_ip(0), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(cluster_ip(249), Ipv4Addr::new(10, 96, 0, 250));
        assert_eq!(cluster_ip(250), Ipv4Addr::new(10, 96, 1, 1));
        assert_eq!(
            cluster_ip(MAX_SERVICES - 1),
            Ipv4Addr::new(10, 96, 199, 250)
        );
        assert_eq!(
            plan_address(ENDPOINT_SECOND_OCTET, HOSTS_PER_SECOND_OCTET),
            Ipv4Addr::new(10, 201, 0, 1)
        );
        assert_eq!(
            plan_address(
                ENDPOINT_SECOND_OCTET,
                MAX_SERVICES * ENDPOINTS_PER_SERVICE - 1
            ),
            Ipv4Addr::new(10, 207, 207, 250)
        );
    }

    #[test]
    fn the_backend_map_grows_only_past_its_default() {
        assert!(map_size_args(1000).is_empty());
        assert!(map_size_args(map_sizes::BACKENDS / ENDPOINTS_PER_SERVICE).is_empty());
        assert_eq!(
            map_size_args(30_000),
            ["--map-size-backends", &(1u32 << 19).to_string()]
        );
    }

    #[test]
    fn the_first_sync_line_is_found_and_read() {
        let log = "\
2025-01-02T03:04:05.000001Z  INFO proxy_agent::run: datapath loaded; adopted what the pinned maps hold frontends=0 backends=0
2025-01-02T03:04:05.100000Z  INFO proxy_agent::run: synced services=1000 backend_sets=1000 changed_sets=1000 skipped=0 writes=13001 elapsed_us=51234
2025-01-02T03:04:06.100000Z  INFO proxy_agent::run: synced services=1000 backend_sets=1000 changed_sets=1 skipped=0 writes=3 elapsed_us=40
";
        assert_eq!(
            first_sync(log),
            Some(FirstSync {
                services: 1000,
                writes: 13001,
                elapsed_us: 51234
            })
        );
        assert_eq!(first_sync("... ready devices=4\n"), None);
    }

    #[test]
    fn proc_status_sizes_are_bytes() {
        let status = "Name:\tproxy-agent\nVmHWM:\t   90112 kB\nVmRSS:\t   81920 kB\nThreads:\t2\n";
        assert_eq!(status_bytes(status, "VmRSS"), Some(81920 * 1024));
        assert_eq!(status_bytes(status, "VmHWM"), Some(90112 * 1024));
        assert_eq!(status_bytes(status, "VmSwap"), None);
    }

    #[test]
    fn memlock_is_read_from_bpftool_json() {
        let shown = r#"{"id":884,"type":"hash","name":"SERVICES","flags":0,"bytes_key":8,"bytes_value":24,"max_entries":65536,"bytes_memlock":6292528,"frozen":0}"#;
        assert_eq!(memlock(shown), Some(6_292_528));
        assert_eq!(memlock("{}"), None);
    }
}
