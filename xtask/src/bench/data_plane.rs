//! Scenarios S1 and S2, the data plane: what a connection to a ClusterIP costs through this proxy,
//! next to a pod reached directly and to replicas of kube-proxy's iptables and nftables modes.
//!
//! # Set-up
//!
//! Every measurement gets a fresh testbed: one node, three pods serving HTTP on 8080
//! (`Pod::serve_http`, one event-driven thread each) and a client pod, all on that node. Fresh
//! matters for the replicas: every `Connection: close` request leaves a conntrack entry in
//! TIME_WAIT for 120 s, and a node measured twice would carry the first run's hundred thousand
//! entries into the second. It also guarantees that only one translator is attached: the agent
//! dies with its testbed, so it never sees the replicas' traffic and they never see its.
//!
//! The N Services are [`baselines::with_fillers`]`(N, target)` for every mode: the target
//! `bench/web` (10.96.0.10:80 -> the three pods' 8080) last, and N - 1 fillers whose three
//! endpoints are addresses no pod has. The modes:
//!
//! - direct: wrk connects to the first pod's address, no Service, nothing loaded in the node: the
//!   most the testbed does. One pod's server thread serves everything here, where the other
//!   modes spread the connections over three; on two cores wrk's threads and the servers share
//!   the CPUs either way.
//! - proxy: the agent (release build) started from a manifest directory holding the same N
//!   Services and their EndpointSlices, in name order so the target comes last.
//! - iptables, nftables: the replicas ([`iptables::rules`], [`nftables::ruleset`]) applied into
//!   the node's namespace. How they differ from kube-proxy (only the NAT rules, no filter chains,
//!   one address family, ...) is in the [`baselines`] module docs: every difference makes the
//!   replicas' path shorter than a real kube-proxy node's, not longer.
//!
//! # What is measured
//!
//! - S1, new connections per second: `wrk -t2 -c32 -d5s -H 'Connection: close'` from the client
//!   pod, so every request is a new TCP connection (handshake, translation of its first packet,
//!   teardown). The figure is wrk's `Requests/sec`. For each N the mode list runs twice, whole
//!   (direct, proxy, iptables, nftables, then again: ABAB), each run after a 1 s warm-up run of
//!   the same wrk in the same testbed; the table shows the minimum and the median of the runs and
//!   the median's ratio to direct's at the same N in the same benchmark run.
//! - S2, latency on established connections: `wrk -t1 -c4 -d5s --latency` (keep-alive, so only
//!   the first packet of each of the 4 connections is translated by the replicas, then conntrack
//!   carries it; the agent translates every packet) at one N; p50 and p99 from wrk's latency
//!   distribution, the median over the runs, and their ratio to direct's.
//! - Load times: how long `iptables-restore` and `nft -f` take to apply the replica for N Services
//!   (a full resync of kube-proxy), and `elapsed_us` of the agent's first `synced` log line (its
//!   planning and map writes for N Services, as in S3), once per proxy or replica run of S1.
//!
//! `--quick` runs N = 1 and 100, S2 at 100, once each, for 1 s: a check that the scenarios work,
//! not figures to compare.
//!
//! # What is not measured
//!
//! - Anything across nodes: client, pods and translator share one node, so no packet crosses the
//!   underlay.
//! - A real network: veth pairs in one kernel. The costs are the CPU's; wrk and the pods' servers
//!   run on the same two cores as the kernel's packet processing.
//! - kube-proxy itself: the replicas are its rule layouts, not the program.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use proxy_common::map_sizes;
use proxy_testbed::agent::Agent;
use proxy_testbed::baselines::{self, Protocol, ServiceSpec, iptables, nftables};
use proxy_testbed::{Pod, Testbed};

use super::report::{
    ConnectionRate, DataPlane, EstablishedLatency, LoadTime, Mode, WrkRun, median, ratio,
};
use crate::cmd;

const NODE: &str = "node-1";
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 80;
const POD_PORT: u16 = 8080;
/// Services per manifest file: a file for 10,000 stays far below the agent's 16 MiB limit.
const SERVICES_PER_FILE: usize = 1000;
const WARM_UP: &str = "1s";
/// The target's pods, and so the endpoints of every Service ([`baselines::with_fillers`] gives
/// each filler as many as the target).
const PODS: u8 = 3;

/// How much of the scenarios to run.
pub struct Plan {
    /// The Service counts of S1.
    pub services: &'static [u32],
    /// The Service count of S2.
    pub latency_services: u32,
    /// How many times the whole mode list runs (2: ABAB).
    pub rounds: usize,
    /// wrk's `-d` of a measured run, in seconds.
    pub duration_s: u32,
}

impl Plan {
    /// Whether every Service count of the plan fits the agent's default map sizes, which the
    /// proxy mode runs with.
    pub const fn fits_default_maps(&self) -> bool {
        let mut index = 0;
        while index < self.services.len() {
            if !fits_default_maps(self.services[index]) {
                return false;
            }
            index += 1;
        }
        fits_default_maps(self.latency_services)
    }
}

/// The frontend map holds one entry per Service and the backend map one per endpoint; the
/// others are sized from these two (`map_sizes`).
const fn fits_default_maps(services: u32) -> bool {
    services <= map_sizes::SERVICES && services * PODS as u32 <= map_sizes::BACKENDS
}

pub fn run(agent_binary: &Path, plan: &Plan) -> Result<DataPlane> {
    let duration = format!("{}s", plan.duration_s);
    let mut connections = Vec::new();
    let mut load = Vec::new();
    for &services in plan.services {
        let mut runs: Vec<(Mode, Vec<WrkRun>)> = Mode::ALL.iter().map(|&m| (m, vec![])).collect();
        let mut times = LoadTime {
            services,
            iptables_us: Vec::new(),
            nftables_us: Vec::new(),
            agent_sync_us: Vec::new(),
        };
        for round in 1..=plan.rounds {
            for (mode, mode_runs) in &mut runs {
                println!("S1, {services} Services, {} (run {round}) ...", mode.name());
                let bed = Bed::new(agent_binary, *mode, services)?;
                match mode {
                    Mode::Direct => {}
                    Mode::Proxy => times.agent_sync_us.push(bed.load_us),
                    Mode::Iptables => times.iptables_us.push(bed.load_us),
                    Mode::Nftables => times.nftables_us.push(bed.load_us),
                }
                let args = ["-t2", "-c32", "-H", "Connection: close"];
                bed.wrk(&args, WARM_UP)?;
                mode_runs.push(bed.wrk(&args, &duration)?);
            }
        }
        let direct = median_rate(&runs[0].1);
        connections.extend(runs.into_iter().map(|(mode, runs)| {
            let rates: Vec<f64> = runs.iter().map(|run| run.requests_per_s).collect();
            ConnectionRate {
                services,
                mode,
                min_per_s: rates.iter().copied().fold(f64::INFINITY, f64::min),
                median_per_s: median(&rates),
                vs_direct: ratio(median(&rates), direct),
                runs,
            }
        }));
        load.push(times);
    }

    let services = plan.latency_services;
    let mut runs: Vec<(Mode, Vec<WrkRun>)> = Mode::ALL.iter().map(|&m| (m, vec![])).collect();
    for round in 1..=plan.rounds {
        for (mode, mode_runs) in &mut runs {
            println!("S2, {services} Services, {} (run {round}) ...", mode.name());
            let bed = Bed::new(agent_binary, *mode, services)?;
            bed.wrk(&["-t1", "-c4"], WARM_UP)?;
            let run = bed.wrk(&["-t1", "-c4", "--latency"], &duration)?;
            if run.p50_ns.is_none() || run.p99_ns.is_none() {
                bail!("wrk --latency printed no 50% or 99% line");
            }
            mode_runs.push(run);
        }
    }
    let percentile = |runs: &[WrkRun], pick: fn(&WrkRun) -> Option<u64>| {
        let values: Vec<f64> = runs.iter().filter_map(pick).map(|ns| ns as f64).collect();
        median(&values).round() as u64
    };
    let (direct_p50, direct_p99) = (
        percentile(&runs[0].1, |run| run.p50_ns),
        percentile(&runs[0].1, |run| run.p99_ns),
    );
    let latency = runs
        .into_iter()
        .map(|(mode, runs)| {
            let p50_ns = percentile(&runs, |run| run.p50_ns);
            let p99_ns = percentile(&runs, |run| run.p99_ns);
            EstablishedLatency {
                services,
                mode,
                p50_ns,
                p99_ns,
                p50_vs_direct: ratio(p50_ns as f64, direct_p50 as f64),
                p99_vs_direct: ratio(p99_ns as f64, direct_p99 as f64),
                runs,
            }
        })
        .collect();

    Ok(DataPlane {
        rounds: plan.rounds,
        duration_s: plan.duration_s,
        iptables_backend: match iptables::backend()? {
            iptables::Backend::Nft => "nf_tables",
            iptables::Backend::Legacy => "legacy",
        }
        .to_owned(),
        connections,
        latency,
        load,
    })
}

fn median_rate(runs: &[WrkRun]) -> f64 {
    let rates: Vec<f64> = runs.iter().map(|run| run.requests_per_s).collect();
    median(&rates)
}

/// One measurement's testbed, with the mode's translator in place.
struct Bed {
    /// Before the testbed, so that it is dropped first; the testbed's drop would also stop it.
    _agent: Option<Agent>,
    _testbed: Testbed,
    client: Pod,
    url: String,
    /// Applying the replica, or the agent's first sync; 0 for direct.
    load_us: u64,
}

impl Bed {
    fn new(agent_binary: &Path, mode: Mode, services: u32) -> Result<Bed> {
        let mut testbed = Testbed::new()?;
        let node = testbed.add_node(NODE)?;
        let pods = (1..=PODS)
            .map(|i| {
                let pod = testbed.add_pod(&node, &format!("web-{i}"), node.pod_addr(10 + i))?;
                pod.serve_http(POD_PORT)?;
                Ok(pod)
            })
            .collect::<Result<Vec<Pod>>>()?;
        let client = testbed.add_pod(&node, "client", node.pod_addr(100))?;
        let target = target(pods.iter().map(|pod| (pod.addr, POD_PORT)).collect());
        let specs = baselines::with_fillers(services as usize, target);
        let vip = SocketAddrV4::new(CLUSTER_IP, SERVICE_PORT);
        let (agent, to, load_us) = match mode {
            Mode::Direct => (None, SocketAddrV4::new(pods[0].addr, POD_PORT), 0),
            Mode::Proxy => {
                for (index, chunk) in specs.chunks(SERVICES_PER_FILE).enumerate() {
                    Agent::write_manifest(
                        &node,
                        &format!("services-{index:03}.yaml"),
                        &manifests(chunk),
                    )?;
                }
                let agent = Agent::start(agent_binary, &node, &[])?;
                let log = agent.process().log()?;
                let sync_us = first_sync_us(&log, services).with_context(|| {
                    format!("no `synced` line for {services} Services in:\n{log}")
                })?;
                (Some(agent), vip, sync_us)
            }
            Mode::Iptables => {
                let rules = iptables::rules(&specs);
                let start = Instant::now();
                iptables::apply(&node.netns, &rules)?;
                (None, vip, micros(start))
            }
            Mode::Nftables => {
                let ruleset = nftables::ruleset(&specs);
                let start = Instant::now();
                nftables::apply(&node.netns, &ruleset)?;
                (None, vip, micros(start))
            }
        };
        Ok(Bed {
            _agent: agent,
            _testbed: testbed,
            client,
            url: format!("http://{to}/"),
            load_us,
        })
    }

    /// Runs wrk with `args` for `duration` from the client pod.
    fn wrk(&self, args: &[&str], duration: &str) -> Result<WrkRun> {
        let mut wrk = self.client.netns.command("wrk");
        wrk.args(args).arg(format!("-d{duration}")).arg(&self.url);
        let out = cmd::output(&mut wrk)?;
        let run =
            parse_wrk(&out).with_context(|| format!("no Requests/sec in wrk's output:\n{out}"))?;
        if run.requests_per_s <= 0.0 {
            bail!("no request through {} succeeded:\n{out}", self.url);
        }
        Ok(run)
    }
}

/// The Services and their EndpointSlices as the YAML documents the agent reads. Every spec is
/// TCP with one port ([`baselines::with_fillers`] copies the target's).
fn manifests(specs: &[ServiceSpec]) -> String {
    let mut yaml = String::new();
    for spec in specs {
        let target_port = spec.endpoints.first().map_or(POD_PORT, |&(_, port)| port);
        // Writing to a String cannot fail.
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\n\
             spec:\n  clusterIP: {ip}\n  ports:\n  - name: http\n    port: {port}\n    \
             targetPort: {target_port}\n    protocol: TCP\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
             name: {name}-1\n  namespace: {ns}\n  labels:\n    \
             kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n- name: http\n  \
             port: {target_port}\n  protocol: TCP\nendpoints:\n",
            name = spec.name,
            ns = spec.namespace,
            ip = spec.cluster_ip,
            port = spec.port,
        );
        for (addr, _) in &spec.endpoints {
            let _ = writeln!(
                yaml,
                "- addresses: [\"{addr}\"]\n  conditions: {{ready: true}}"
            );
        }
    }
    yaml
}

/// `elapsed_us` of the agent's first `synced` line, if that sync had all `services`.
fn first_sync_us(log: &str, services: u32) -> Option<u64> {
    let sync = super::control_plane::first_sync(log)?;
    (sync.services == u64::from(services)).then_some(sync.elapsed_us)
}

/// What a benchmark reads from wrk's output: `Requests/sec`, the errors it counted (socket
/// errors and non-2xx/3xx answers) and, with `--latency`, the 50 % and 99 % lines.
fn parse_wrk(out: &str) -> Option<WrkRun> {
    let mut run = WrkRun {
        requests_per_s: 0.0,
        errors: 0,
        p50_ns: None,
        p99_ns: None,
    };
    let mut rate = None;
    for line in out.lines().map(str::trim) {
        if let Some(value) = line.strip_prefix("Requests/sec:") {
            rate = value.trim().parse().ok();
        } else if let Some(counts) = line.strip_prefix("Socket errors:") {
            // `connect 0, read 0, write 0, timeout 0`
            run.errors += counts
                .split(',')
                .filter_map(|count| count.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(count) = line.strip_prefix("Non-2xx or 3xx responses:") {
            run.errors += count.trim().parse::<u64>().ok()?;
        } else if let Some(value) = line.strip_prefix("50%") {
            run.p50_ns = Some(wrk_ns(value.trim())?);
        } else if let Some(value) = line.strip_prefix("99%") {
            run.p99_ns = Some(wrk_ns(value.trim())?);
        }
    }
    run.requests_per_s = rate?;
    Some(run)
}

/// A wrk duration (`87.00us`, `1.25ms`, `2.00s`, `1.00m`) in nanoseconds.
fn wrk_ns(value: &str) -> Option<u64> {
    let split = value.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match unit {
        "us" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "m" => 60e9,
        "h" => 3600e9,
        _ => return None,
    };
    Some((number * scale).round() as u64)
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// The measured Service, `bench/web` on the ClusterIP every mode is measured through.
fn target(endpoints: Vec<(Ipv4Addr, u16)>) -> ServiceSpec {
    ServiceSpec {
        namespace: "bench".into(),
        name: "web".into(),
        cluster_ip: CLUSTER_IP,
        port: SERVICE_PORT,
        protocol: Protocol::Tcp,
        endpoints,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLOSE: &str = "\
Running 5s test @ http://10.96.0.10:80/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.52ms  412.10us   9.87ms   85.00%
    Req/Sec    10.50k   500.00     11.20k    70.00%
  104512 requests in 5.00s, 9.87MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
Requests/sec:  20902.40
Transfer/sec:      1.97MB
";

    const LATENCY: &str = "\
Running 5s test @ http://10.244.1.11:8080/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    95.12us   20.00us   2.10ms   90.00%
    Req/Sec    40.00k     1.00k    42.00k    80.00%
  Latency Distribution
     50%   87.53us
     75%  100.00us
     90%  120.00us
     99%    1.25ms
  200000 requests in 5.00s, 18.00MB read
  Non-2xx or 3xx responses: 1
Requests/sec:  40000.00
Transfer/sec:      3.60MB
";

    #[test]
    fn wrk_output_is_read() {
        assert_eq!(
            parse_wrk(CLOSE),
            Some(WrkRun {
                requests_per_s: 20902.4,
                errors: 5,
                p50_ns: None,
                p99_ns: None,
            })
        );
        assert_eq!(
            parse_wrk(LATENCY),
            Some(WrkRun {
                requests_per_s: 40000.0,
                errors: 1,
                p50_ns: Some(87_530),
                p99_ns: Some(1_250_000),
            })
        );
        assert_eq!(parse_wrk("unable to connect to 10.96.0.10:80"), None);
    }

    #[test]
    fn wrk_durations_are_nanoseconds() {
        assert_eq!(wrk_ns("87.53us"), Some(87_530));
        assert_eq!(wrk_ns("2.00s"), Some(2_000_000_000));
        assert_eq!(wrk_ns("1.00m"), Some(60_000_000_000));
        assert_eq!(wrk_ns("12"), None);
    }

    #[test]
    fn the_first_sync_counts_only_with_every_service() {
        let log = "\
2025-01-02T03:04:05.100000Z  INFO proxy_agent::run: synced services=1000 backend_sets=1000 changed_sets=1000 skipped=0 writes=4001 elapsed_us=51234
2025-01-02T03:04:06.100000Z  INFO proxy_agent::run: synced services=1000 backend_sets=1000 changed_sets=1 skipped=0 writes=3 elapsed_us=40
";
        assert_eq!(first_sync_us(log, 1000), Some(51234));
        assert_eq!(first_sync_us(log, 10), None);
        assert_eq!(first_sync_us("... ready devices=4\n", 1), None);
    }

    #[test]
    fn manifests_put_every_endpoint_in_a_slice() {
        let target = target(vec![(Ipv4Addr::new(10, 244, 1, 11), POD_PORT)]);
        let yaml = manifests(&baselines::with_fillers(2, target));
        assert_eq!(yaml.matches("kind: Service\n").count(), 2);
        assert_eq!(yaml.matches("kind: EndpointSlice\n").count(), 2);
        assert!(yaml.ends_with(
            "  name: web-1\n  namespace: bench\n  labels:\n    kubernetes.io/service-name: web\n\
             addressType: IPv4\nports:\n- name: http\n  port: 8080\n  protocol: TCP\nendpoints:\n\
             - addresses: [\"10.244.1.11\"]\n  conditions: {ready: true}\n"
        ));
    }
}
