//! Builds a two-node cluster with four pods and an external client, and prints who reaches whom.
//!
//! ```text
//! cargo run -p proxy-testbed --example cluster            # as root
//! cargo run -p proxy-testbed --example cluster -- --hold  # keep it up to look around
//! ```
//!
//! With `--hold` the cluster stays until Enter is pressed, so it can be inspected with
//! `ip netns list`, `ip -n <namespace> route` and the like.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::Result;
use proxy_testbed::{Pod, Testbed, io_error_kind};

const TIMEOUT: Duration = Duration::from_secs(1);

fn main() -> Result<()> {
    let hold = std::env::args().skip(1).any(|arg| arg == "--hold");
    let mut testbed = Testbed::new()?;
    let nodes = [testbed.add_node("node1")?, testbed.add_node("node2")?];
    let mut pods = Vec::new();
    for node in &nodes {
        for k in 1..=2 {
            let name = format!("{}-pod{k}", node.name);
            pods.push(testbed.add_pod(node, &name, node.pod_addr(10 + k))?);
        }
    }
    let external = testbed.add_external("client", Ipv4Addr::new(172, 18, 1, 1))?;
    for pod in &pods {
        pod.serve(&[80], &[53])?;
    }

    println!(
        "testbed {}: router 172.18.0.1 on br0 in {}",
        testbed.id(),
        testbed.underlay().name()
    );
    for node in &nodes {
        let (network, len) = node.pod_cidr;
        println!(
            "  node {:<6} {:<12} pods {network}/{len}  netns {}",
            node.name,
            node.underlay_addr,
            node.netns.name()
        );
    }
    for pod in pods.iter().chain([&external]) {
        println!(
            "  pod  {:<12} {:<12} on {:<8} via {:<6} netns {}",
            pod.name,
            pod.addr,
            pod.node,
            pod.host_veth,
            pod.netns.name()
        );
    }

    println!(
        "\nTCP :80 and UDP :53 from each row to each column (the answer is the server's name):"
    );
    print!("{:<14}", "");
    for to in &pods {
        print!("{:<14}", to.name);
    }
    println!();
    for from in pods.iter().chain([&external]) {
        print!("{:<14}", from.name);
        for to in &pods {
            print!("{:<14}", reach(from, to));
        }
        println!();
    }

    if hold {
        println!("\nthe cluster stays up until Enter is pressed");
        std::io::stdin().read_line(&mut String::new())?;
    }
    Ok(())
}

/// "ok" when both requests came back with `to`'s name, else what went wrong.
fn reach(from: &Pod, to: &Pod) -> String {
    let tcp = from.tcp_request(SocketAddrV4::new(to.addr, 80), TIMEOUT);
    let udp = from.udp_request(SocketAddrV4::new(to.addr, 53), TIMEOUT);
    let show = |result: Result<String>| match result {
        Ok(name) if name == to.name => "ok".to_owned(),
        Ok(name) => format!("wrong:{name}"),
        Err(err) => io_error_kind(&err).map_or_else(|| "error".to_owned(), |kind| kind.to_string()),
    };
    match (show(tcp), show(udp)) {
        (tcp, udp) if tcp == "ok" && udp == "ok" => "ok".to_owned(),
        (tcp, udp) => format!("{tcp}/{udp}"),
    }
}
