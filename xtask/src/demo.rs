//! `cargo xtask demo`: the seed article's cluster, simulated on this machine with real eBPF and
//! real traffic, and a table of who answered what.
//!
//! Two nodes, each running the agent as a DaemonSet would; the article's pods (three `kubia`
//! on two nodes, one `bar`); two client pods. The agents read `examples/seed.yaml`. Every answer
//! in the table is a real TCP connection from a client pod to a Service address, translated by
//! the TC program on the client's node; the answering pod writes its name.
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use proxy_testbed::agent::Agent;
use proxy_testbed::{Pod, Testbed, io_error_kind};

const TIMEOUT: Duration = Duration::from_secs(3);
const KUBIA: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const KUBIA_NODEPORT: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const KUBIA_LOADBALANCER: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const BAR: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);

/// One row of the table.
struct Row {
    behaviour: String,
    frontend: SocketAddrV4,
    client: String,
    outcome: String,
}

pub fn demo(agent_binary: &Path, seed: &Path) -> Result<()> {
    let seed_yaml =
        std::fs::read_to_string(seed).with_context(|| format!("reading {}", seed.display()))?;
    println!("Building the cluster: 2 nodes, 4 pods, 2 clients, one agent per node ...");
    let mut testbed = Testbed::new()?;
    let node1 = testbed.add_node("node-1")?;
    let node2 = testbed.add_node("node-2")?;
    for (node, name, addr, ports) in [
        (&node1, "kubia-1", node1.pod_addr(11), &[8080, 8443][..]),
        (&node1, "kubia-2", node1.pod_addr(12), &[8080, 8443]),
        (&node2, "kubia-3", node2.pod_addr(11), &[8080, 8443]),
        (&node2, "bar-1", node2.pod_addr(21), &[8080]),
    ] {
        testbed.add_pod(node, name, addr)?.serve(ports, &[])?;
    }
    let client_a = testbed.add_pod(&node1, "client-a", node1.pod_addr(100))?;
    let client_b = testbed.add_pod(&node2, "client-b", node2.pod_addr(100))?;
    let mut agents = Vec::new();
    for node in [&node1, &node2] {
        Agent::write_manifest(node, "seed.yaml", &seed_yaml)?;
        agents.push(Agent::start(agent_binary, node, &[])?);
    }

    let mut rows = Vec::new();
    let spread_to = SocketAddrV4::new(KUBIA_NODEPORT, 80);
    rows.push(Row {
        behaviour: "ClusterIP, no affinity: random pod".into(),
        frontend: spread_to,
        client: client_a.name.clone(),
        outcome: tally(&client_a, spread_to, 60)?,
    });
    for client in [&client_a, &client_b] {
        let to = SocketAddrV4::new(KUBIA, 80);
        rows.push(Row {
            behaviour: "sessionAffinity: ClientIP".into(),
            frontend: to,
            client: client.name.clone(),
            outcome: tally(client, to, 20)?,
        });
    }
    for (port, target) in [(80, 8080), (443, 8443)] {
        let to = SocketAddrV4::new(KUBIA, port);
        rows.push(Row {
            behaviour: format!("multi-port: {port} -> pod {target}"),
            frontend: to,
            client: client_b.name.clone(),
            outcome: tally(&client_b, to, 5)?,
        });
    }
    let to = SocketAddrV4::new(KUBIA_LOADBALANCER, 80);
    rows.push(Row {
        behaviour: "kubia-loadbalancer's ClusterIP".into(),
        frontend: to,
        client: client_a.name.clone(),
        outcome: tally(&client_a, to, 30)?,
    });
    let to = SocketAddrV4::new(BAR, 80);
    rows.push(Row {
        behaviour: "bar (its pod is on node-2)".into(),
        frontend: to,
        client: client_a.name.clone(),
        outcome: tally(&client_a, to, 10)?,
    });

    println!("\nkubia scaled to zero: its EndpointSlice now lists no endpoint ...");
    let emptied = empty_slice(&seed_yaml, "kubia-abc12");
    for agent in &agents {
        agent.apply("seed.yaml", &emptied)?;
    }
    let to = SocketAddrV4::new(KUBIA, 80);
    rows.push(Row {
        behaviour: "no endpoints: refused at once".into(),
        frontend: to,
        client: client_a.name.clone(),
        outcome: refusal(&client_a, to),
    });

    print_table(&rows);
    println!(
        "\nAffinity is kept per Service port, as kube-proxy keeps it: a client's :80 and :443 may stick to \
         different pods."
    );
    println!("\n`proxy-agent list` on node-1, read from the pinned maps (kubia still empty):\n");
    print!("{}", agents[0].cli(&["list"])?);
    println!(
        "\nPer-Service counters of node-1's datapath, from its metrics endpoint (flows from \
         client-a, which lives there):\n"
    );
    print!("{}", service_counters(&agents[0].metrics()?));
    println!("\nCleaning up: agents, namespaces and pins go with the testbed.");
    drop(agents);
    drop(testbed);
    Ok(())
}

/// The per-Service flow counters of a Prometheus text as a table, one row per Service port.
fn service_counters(metrics: &str) -> String {
    const COLUMNS: [(&str, &str); 3] = [
        ("proxy_service_flows_total", "FLOWS"),
        ("proxy_service_affinity_hits_total", "AFFINITY HITS"),
        ("proxy_service_refused_flows_total", "REFUSED"),
    ];
    // "name{labels} value" -> labels -> one value per column, in the order the agent lists them.
    let mut rows: Vec<(String, [String; 3])> = Vec::new();
    for line in metrics.lines() {
        let Some((column, rest)) = COLUMNS
            .iter()
            .position(|(name, _)| line.starts_with(&format!("{name}{{")))
            .and_then(|column| Some((column, line.split_once('{')?.1)))
        else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let label = |key: &str| {
            labels
                .split(',')
                .find_map(|pair| pair.strip_prefix(&format!("{key}=\"")))
                .map_or("", |value| value.trim_end_matches('"'))
                .to_owned()
        };
        let port = format!("{}:{}", label("service"), label("port"));
        let row = match rows.iter().position(|(name, _)| *name == port) {
            Some(row) => row,
            None => {
                rows.push((port, Default::default()));
                rows.len() - 1
            }
        };
        rows[row].1[column] = value.to_owned();
    }
    let mut table = format!(
        "  {:<28} {:>6} {:>14} {:>8}\n",
        "SERVICE:PORT", COLUMNS[0].1, COLUMNS[1].1, COLUMNS[2].1
    );
    for (port, [flows, hits, refused]) in rows {
        table += &format!("  {port:<28} {flows:>6} {hits:>14} {refused:>8}\n");
    }
    table
}

/// Opens `count` connections and counts the answering pods: "kubia-1 x21  kubia-3 x19".
fn tally(client: &Pod, to: SocketAddrV4, count: usize) -> Result<String> {
    let mut hits = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..count {
        let pod = client.tcp_request(to, TIMEOUT)?;
        *hits.entry(pod).or_default() += 1;
    }
    let cells: Vec<String> = hits.iter().map(|(pod, n)| format!("{pod} x{n}")).collect();
    Ok(format!("{}  ({count} connections)", cells.join("  ")))
}

fn refusal(client: &Pod, to: SocketAddrV4) -> String {
    let start = Instant::now();
    match client.tcp_request(to, TIMEOUT) {
        Ok(pod) => format!("answered by {pod} (expected a refusal!)"),
        Err(error) => {
            let what =
                io_error_kind(&error).map_or_else(|| format!("{error:#}"), |kind| kind.to_string());
            format!(
                "{what} after {:.1} ms",
                start.elapsed().as_secs_f64() * 1000.0
            )
        }
    }
}

/// The seed file with the endpoints of one EndpointSlice removed.
fn empty_slice(seed: &str, slice: &str) -> String {
    seed.split("\n---\n")
        .map(|doc| {
            if doc.contains(&format!("name: {slice}")) {
                let head = doc.split("\nendpoints:").next().unwrap_or(doc);
                format!("{head}\nendpoints: []")
            } else {
                doc.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n---\n")
}

fn print_table(rows: &[Row]) {
    let width = rows
        .iter()
        .map(|row| row.behaviour.len())
        .max()
        .unwrap_or(0);
    println!(
        "\n{:<width$}  {:<16}  {:<9}  WHO ANSWERED",
        "BEHAVIOUR", "FRONTEND", "CLIENT"
    );
    for row in rows {
        println!(
            "{:<width$}  {:<16}  {:<9}  {}",
            row.behaviour,
            row.frontend.to_string(),
            row.client,
            row.outcome
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counters_table_has_a_row_per_service_port() {
        let metrics = "\
# TYPE proxy_service_flows counter
proxy_service_flows_total{namespace=\"default\",service=\"kubia\",port=\"http\",protocol=\"TCP\"} 20
proxy_service_flows_total{namespace=\"default\",service=\"bar\",port=\"\",protocol=\"TCP\"} 10
proxy_service_packets_total{namespace=\"default\",service=\"bar\",port=\"\",protocol=\"TCP\"} 99
proxy_service_refused_flows_total{namespace=\"default\",service=\"kubia\",port=\"http\",protocol=\"TCP\"} 1
proxy_service_refused_flows_total{namespace=\"default\",service=\"bar\",port=\"\",protocol=\"TCP\"} 0
proxy_service_affinity_hits_total{namespace=\"default\",service=\"kubia\",port=\"http\",protocol=\"TCP\"} 19
proxy_service_affinity_hits_total{namespace=\"default\",service=\"bar\",port=\"\",protocol=\"TCP\"} 0
";
        let table = service_counters(metrics);
        let rows: Vec<Vec<&str>> = table
            .lines()
            .map(|line| line.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            [
                vec!["SERVICE:PORT", "FLOWS", "AFFINITY", "HITS", "REFUSED"],
                vec!["kubia:http", "20", "19", "1"],
                vec!["bar:", "10", "0", "0"],
            ]
        );
    }
}
