//! The simulated cluster: an underlay bridge with a router, nodes on it, Calico-style pods on the
//! nodes, external clients on the underlay, and the drop that removes all of it.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};

use crate::naming::{Names, sweep_leftovers};
use crate::netns::{Netns, check_privileges};
use crate::pod_server::ServerSet;
use crate::process::{Process, ProcessSet};

/// The router's address on the underlay bridge: every node's and external's default gateway.
pub const UNDERLAY_GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 1);
/// The underlay is 172.18.0.0/16; node `i` is 172.18.0.(1+i).
pub const UNDERLAY_PREFIX_LEN: u8 = 16;
/// The link-local gateway every pod routes through (Calico's): nobody has this address, the node
/// answers ARP for it on the pod's host veth by proxy ARP.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The namespace role of the underlay, which therefore is no node, pod or external name.
const UNDERLAY: &str = "underlay";
const BRIDGE: &str = "br0";
/// A bridge without an address of its own takes the lowest MAC of its ports, so it would change as
/// nodes join, and ARP caches holding the gateway's old MAC would black-hole traffic until they
/// expire. A fixed, locally administered MAC (spelling 172.18.0.1) keeps the gateway's MAC stable.
const BRIDGE_MAC: &str = "02:00:ac:12:00:01";
/// Node `i` gets 172.18.0.(1+i) and 10.244.i.0/24, so `i` fits in one octet after the gateway.
const MAX_NODES: usize = 254;
/// Keeps namespace names (`ptb<pid>-<n>-<name>`) short enough to read in `ip netns list`.
const MAX_NAME_LEN: usize = 24;

/// A simulated cluster made of network namespaces. It owns every namespace, thread and child
/// process it makes; dropping it (also while a panic unwinds) removes all of them.
///
/// See the [crate docs](crate) for the topology.
#[derive(Debug)]
pub struct Testbed {
    names: Names,
    underlay: Netns,
    /// Every namespace made so far, the underlay first, so that a half-built testbed (an `add_*`
    /// that failed midway) still removes all of them.
    namespaces: Vec<Netns>,
    nodes: Vec<Node>,
    /// Pods and externals.
    pods: Vec<Pod>,
    processes: Arc<ProcessSet>,
    servers: Arc<ServerSet>,
}

/// A node: a namespace with `eth0` on the underlay, routing for its pods, and room for one agent.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub netns: Netns,
    /// The address of `eth0`, 172.18.0.(1+i)/16.
    pub underlay_addr: Ipv4Addr,
    /// 10.244.i.0/24.
    pub pod_cidr: (Ipv4Addr, u8),
    /// Where this node's agent should pin its maps and programs (`/sys/fs/bpf/ptb<pid>-<n>-<name>`).
    /// Not created here (bpffs may not be mounted yet; the agent mounts it); removed, with whatever
    /// is pinned in it, when the testbed drops.
    pub bpf_dir: PathBuf,
    /// A directory for this node's files (manifests, process logs); removed when the testbed drops.
    pub state_dir: PathBuf,
    processes: Arc<ProcessSet>,
}

/// A pod (or an external client): a namespace with one `eth0`.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub addr: Ipv4Addr,
    pub netns: Netns,
    /// The other end of `eth0`: the host veth in the node (`veth<k>`), or for an external client its
    /// port on the underlay bridge (`ext<k>`).
    pub host_veth: String,
    /// The node's name, or `"underlay"` for an external client.
    pub node: String,
    pub(crate) servers: Arc<ServerSet>,
}

impl Testbed {
    /// Creates the underlay: a namespace with the bridge `br0`, and 172.18.0.1/16 on it as the
    /// router every node and external uses as its gateway.
    ///
    /// First removes what earlier test processes that died without dropping their testbed left
    /// behind. Fails with a clear message without root (CAP_NET_ADMIN, CAP_SYS_ADMIN).
    pub fn new() -> Result<Testbed> {
        check_privileges()?;
        sweep_leftovers();
        let names = Names::next();
        let underlay = Netns::create(&names.netns(UNDERLAY))?;
        // From here on an error drops `testbed`, which removes whatever has been made.
        let testbed = Testbed {
            underlay: underlay.clone(),
            namespaces: vec![underlay],
            names,
            nodes: Vec::new(),
            pods: Vec::new(),
            processes: Arc::default(),
            servers: Arc::default(),
        };
        let state_root = testbed.names.state_root();
        std::fs::create_dir(&state_root)
            .with_context(|| format!("creating {}", state_root.display()))?;
        testbed
            .set_up_underlay()
            .context("setting up the underlay")?;
        Ok(testbed)
    }

    /// The prefix of every name this testbed creates (`ptb<pid>-<n>`): its namespaces are
    /// `<id>-<name>`, its bpffs directories `/sys/fs/bpf/<id>-<node>`, its state directory
    /// `$TMPDIR/<id>`.
    pub fn id(&self) -> &str {
        self.names.prefix()
    }

    /// The underlay namespace: the bridge `br0` and the router (for example to watch the wire).
    pub fn underlay(&self) -> &Netns {
        &self.underlay
    }

    /// The nodes, in the order they were added.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Adds node `i` (counting from 1): `eth0` = 172.18.0.(1+i)/16 on the underlay with a default
    /// route via the router, pod CIDR 10.244.i.0/24, forwarding on, no reverse-path filter, no ICMP
    /// redirects. Routes to its pod CIDR are added on every other node and on the router, and
    /// routes to theirs on it (static routes play the CNI).
    ///
    /// If this fails, the testbed is left half-built: drop it.
    pub fn add_node(&mut self, name: &str) -> Result<Node> {
        self.add_node_inner(name)
            .with_context(|| format!("adding node {name}"))
    }

    /// Adds a Calico-style pod on `node`: `eth0` with `addr/32`, a route to the link-local
    /// [`POD_GATEWAY`] on `eth0` and the default route via it. The node side is the veth
    /// [`Pod::host_veth`], without an address, with proxy ARP on (so it answers for the gateway),
    /// and a route `addr/32 dev <host veth>`. `addr` must be in the node's pod CIDR.
    ///
    /// If this fails, the testbed is left half-built: drop it.
    pub fn add_pod(&mut self, node: &Node, name: &str, addr: Ipv4Addr) -> Result<Pod> {
        self.add_pod_inner(node, name, addr)
            .with_context(|| format!("adding pod {name} ({addr}) on node {}", node.name))
    }

    /// Adds a client outside the cluster: `eth0` with `addr/16` on the underlay bridge, default
    /// route via the router. `addr` must be in 172.18.0.0/16 and not a node's: node `i` takes
    /// 172.18.0.(1+i), so addresses from 172.18.1.0 on never collide with a node added later.
    ///
    /// If this fails, the testbed is left half-built: drop it.
    pub fn add_external(&mut self, name: &str, addr: Ipv4Addr) -> Result<Pod> {
        self.add_external_inner(name, addr)
            .with_context(|| format!("adding external client {name} ({addr})"))
    }

    fn set_up_underlay(&self) -> Result<()> {
        let ns = &self.underlay;
        // Before any device exists, so that the new devices take these settings from `default`.
        ipv4_only(ns)?;
        router_sysctls(ns)?;
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.ip(&[
            "link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge",
        ])?;
        ns.ip(&[
            "addr",
            "add",
            &underlay_cidr(UNDERLAY_GATEWAY),
            "dev",
            BRIDGE,
        ])?;
        ns.ip(&["link", "set", BRIDGE, "up"])?;
        Ok(())
    }

    fn add_node_inner(&mut self, name: &str) -> Result<Node> {
        self.check_new_name(name)?;
        ensure!(
            self.nodes.len() < MAX_NODES,
            "a testbed holds at most {MAX_NODES} nodes"
        );
        let index = u8::try_from(self.nodes.len() + 1)?;
        let underlay_addr = Ipv4Addr::new(172, 18, 0, 1 + index);
        if let Some(external) = self.pods.iter().find(|pod| pod.addr == underlay_addr) {
            bail!(
                "its underlay address {underlay_addr} is taken by external client {}: \
                 put externals at 172.18.1.0 and above",
                external.name
            );
        }
        let pod_cidr = (Ipv4Addr::new(10, 244, index, 0), 24);
        let cidr = format!("{}/{}", pod_cidr.0, pod_cidr.1);

        let netns = self.create_netns(name)?;
        ipv4_only(&netns)?;
        router_sysctls(&netns)?;
        netns.ip(&["link", "set", "lo", "up"])?;
        let port = format!("node{index}");
        self.join_underlay(&netns, &port, underlay_addr)?;
        // Calico does the same for its blocks: without it a packet to an unused address of this
        // node's CIDR would follow the default route to the router, which routes it back here,
        // until its TTL runs out.
        netns.ip(&["route", "add", "blackhole", &cidr])?;

        let via = underlay_addr.to_string();
        for other in &self.nodes {
            let other_cidr = format!("{}/{}", other.pod_cidr.0, other.pod_cidr.1);
            netns.ip(&[
                "route",
                "add",
                &other_cidr,
                "via",
                &other.underlay_addr.to_string(),
            ])?;
            other.netns.ip(&["route", "add", &cidr, "via", &via])?;
        }
        // For traffic from externals, which know only their default gateway.
        self.underlay.ip(&["route", "add", &cidr, "via", &via])?;

        let state_dir = self.names.state_root().join(name);
        std::fs::create_dir(&state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let node = Node {
            name: name.to_owned(),
            netns,
            underlay_addr,
            pod_cidr,
            bpf_dir: self.names.bpf_dir(name),
            state_dir,
            processes: Arc::clone(&self.processes),
        };
        self.nodes.push(node.clone());
        Ok(node)
    }

    fn add_pod_inner(&mut self, node: &Node, name: &str, addr: Ipv4Addr) -> Result<Pod> {
        ensure!(
            self.nodes
                .iter()
                .any(|ours| ours.netns.name() == node.netns.name()),
            "node {} belongs to another testbed",
            node.name
        );
        let (network, prefix_len) = node.pod_cidr;
        ensure!(
            in_subnet(addr, network, prefix_len),
            "{addr} is outside the node's pod CIDR {network}/{prefix_len}: other nodes route only \
             that CIDR to it"
        );
        self.check_new_addr(addr)?;
        self.check_new_name(name)?;

        let netns = self.create_netns(name)?;
        ipv4_only(&netns)?;
        let host_veth = format!("veth{}", self.pods.len() + 1);
        let host = &node.netns;
        veth_to_eth0(host, &host_veth, &netns)?;
        host.set_sysctl(&format!("net/ipv4/conf/{host_veth}/proxy_arp"), "1")?;
        // Proxy ARP replies to broadcast requests wait a random time up to proxy_delay (0.8 s by
        // default); Calico sets 0 so that a pod's first packet is not held back.
        host.set_sysctl(&format!("net/ipv4/neigh/{host_veth}/proxy_delay"), "0")?;
        host.ip(&["link", "set", &host_veth, "up"])?;

        netns.ip(&["link", "set", "lo", "up"])?;
        netns.ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        let gateway = POD_GATEWAY.to_string();
        netns.ip(&["route", "add", &gateway, "dev", "eth0", "scope", "link"])?;
        netns.ip(&["route", "add", "default", "via", &gateway, "dev", "eth0"])?;

        host.ip(&["route", "add", &format!("{addr}/32"), "dev", &host_veth])?;
        let pod = Pod {
            name: name.to_owned(),
            addr,
            netns,
            host_veth,
            node: node.name.clone(),
            servers: Arc::clone(&self.servers),
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    fn add_external_inner(&mut self, name: &str, addr: Ipv4Addr) -> Result<Pod> {
        ensure!(
            in_subnet(addr, UNDERLAY_GATEWAY, UNDERLAY_PREFIX_LEN)
                && ![
                    UNDERLAY_GATEWAY,
                    Ipv4Addr::new(172, 18, 0, 0),
                    Ipv4Addr::new(172, 18, 255, 255)
                ]
                .contains(&addr),
            "{addr} is not a free host address of the underlay 172.18.0.0/16"
        );
        if let Some(node) = self.nodes.iter().find(|node| node.underlay_addr == addr) {
            bail!("{addr} is node {}'s underlay address", node.name);
        }
        self.check_new_addr(addr)?;
        self.check_new_name(name)?;

        let netns = self.create_netns(name)?;
        ipv4_only(&netns)?;
        let port = format!("ext{}", self.pods.len() + 1);
        netns.ip(&["link", "set", "lo", "up"])?;
        self.join_underlay(&netns, &port, addr)?;
        let external = Pod {
            name: name.to_owned(),
            addr,
            netns,
            host_veth: port,
            node: UNDERLAY.to_owned(),
            servers: Arc::clone(&self.servers),
        };
        self.pods.push(external.clone());
        Ok(external)
    }

    /// Gives `netns` an `eth0` with `addr` on the underlay bridge (its other end is `port` there)
    /// and a default route through the router.
    fn join_underlay(&self, netns: &Netns, port: &str, addr: Ipv4Addr) -> Result<()> {
        veth_to_eth0(&self.underlay, port, netns)?;
        self.underlay
            .ip(&["link", "set", port, "master", BRIDGE, "up"])?;
        netns.ip(&["addr", "add", &underlay_cidr(addr), "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        let gateway = UNDERLAY_GATEWAY.to_string();
        netns.ip(&["route", "add", "default", "via", &gateway, "dev", "eth0"])?;
        Ok(())
    }

    /// Creates a namespace and records it at once, so that the drop removes it whatever fails next.
    fn create_netns(&mut self, role: &str) -> Result<Netns> {
        let netns = Netns::create(&self.names.netns(role))?;
        self.namespaces.push(netns.clone());
        Ok(netns)
    }

    /// Node, pod and external names share one namespace of names, as their netns names do.
    fn check_new_name(&self, name: &str) -> Result<()> {
        ensure!(
            !name.is_empty()
                && name.len() <= MAX_NAME_LEN
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
            "name {name:?} must be 1 to {MAX_NAME_LEN} characters of [A-Za-z0-9._-]"
        );
        ensure!(
            name != UNDERLAY,
            "the name {UNDERLAY:?} is the testbed's own"
        );
        let taken = self.nodes.iter().map(|node| &node.name);
        ensure!(
            !taken
                .chain(self.pods.iter().map(|pod| &pod.name))
                .any(|n| n == name),
            "the name {name:?} is taken"
        );
        Ok(())
    }

    fn check_new_addr(&self, addr: Ipv4Addr) -> Result<()> {
        if let Some(pod) = self.pods.iter().find(|pod| pod.addr == addr) {
            bail!("{addr} is taken by {}", pod.name);
        }
        Ok(())
    }
}

impl Node {
    /// Starts `command` inside this node's namespace as a child owned by the testbed: stdout and
    /// stderr go to a log file in [`Node::state_dir`], stdin is /dev/null, and the testbed kills it
    /// when it drops. Any `Command` works; it need not come from [`Netns::command`].
    pub fn spawn(&self, command: Command) -> Result<Process> {
        self.processes
            .spawn(&self.netns, &self.name, command, &self.state_dir)
    }

    /// The address `host` in this node's pod CIDR: `node.pod_addr(5)` is 10.244.i.5.
    pub fn pod_addr(&self, host: u8) -> Ipv4Addr {
        let [a, b, c, _] = self.pod_cidr.0.octets();
        Ipv4Addr::new(a, b, c, host)
    }
}

impl Drop for Testbed {
    /// Children first (they may hold sockets and pins), then server threads, then namespaces, then
    /// directories. Every step logs its errors and goes on: a drop that stopped at the first error
    /// would leave the rest behind, and a panic here during an unwind would abort the test binary.
    fn drop(&mut self) {
        self.processes.shutdown();
        self.servers.shutdown();
        for netns in self.namespaces.iter().rev() {
            if let Err(err) = netns.delete() {
                tracing::warn!("{err:#}");
            }
        }
        for node in &self.nodes {
            remove_dir_all_if_present(&node.bpf_dir);
        }
        remove_dir_all_if_present(&self.names.state_root());
    }
}

fn remove_dir_all_if_present(path: &Path) {
    match std::fs::remove_dir_all(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!("removing {}: {err}", path.display());
        }
        _ => {}
    }
}

/// Settings of every namespace that routes (the underlay's router and the nodes).
fn router_sysctls(ns: &Netns) -> Result<()> {
    ns.set_sysctl("net/ipv4/ip_forward", "1")?;
    for conf in ["all", "default"] {
        // The kernel applies the larger of `all` and the device's value, so both must be 0. Off
        // because a proxy's DNATed and asymmetric flows (a reply leaving by another path than the
        // request came in) are exactly what a strict reverse-path filter drops.
        ns.set_sysctl(&format!("net/ipv4/conf/{conf}/rp_filter"), "0")?;
        // Redirects are sent if `all` or the device asks for them. The router forwards external
        // traffic back out of the bridge it came from; a redirect would teach the client to bypass
        // the router and with it the route under test.
        ns.set_sysctl(&format!("net/ipv4/conf/{conf}/send_redirects"), "0")?;
    }
    Ok(())
}

/// Turns IPv6 off in a new namespace, before its devices exist. The testbed is IPv4-only, and
/// link-local IPv6 chatter (router solicitations, MLD reports on every link-up) would otherwise
/// pass through the programs under test and show up in their packet counters.
fn ipv4_only(ns: &Netns) -> Result<()> {
    // Without IPv6 in the kernel there is nothing to turn off.
    if !Path::new("/proc/sys/net/ipv6").exists() {
        return Ok(());
    }
    for conf in ["all", "default"] {
        ns.set_sysctl(&format!("net/ipv6/conf/{conf}/disable_ipv6"), "1")?;
    }
    Ok(())
}

/// A veth pair: `name` in `host`, its peer `eth0` in `netns`.
fn veth_to_eth0(host: &Netns, name: &str, netns: &Netns) -> Result<()> {
    host.ip(&[
        "link",
        "add",
        name,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        netns.name(),
    ])?;
    Ok(())
}

fn underlay_cidr(addr: Ipv4Addr) -> String {
    format!("{addr}/{UNDERLAY_PREFIX_LEN}")
}

fn in_subnet(addr: Ipv4Addr, network: Ipv4Addr, prefix_len: u8) -> bool {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0);
    u32::from(addr) & mask == u32::from(network) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_can_move_to_other_threads() {
        // Tests hand nodes and pods to threads and async tasks.
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Testbed>();
        send_sync::<Node>();
        send_sync::<Pod>();
        send_sync::<crate::Process>();
    }

    #[test]
    fn in_subnet_masks_the_prefix() {
        let net = Ipv4Addr::new(10, 244, 1, 0);
        assert!(in_subnet(Ipv4Addr::new(10, 244, 1, 200), net, 24));
        assert!(!in_subnet(Ipv4Addr::new(10, 244, 2, 1), net, 24));
        assert!(in_subnet(
            Ipv4Addr::new(172, 18, 9, 9),
            UNDERLAY_GATEWAY,
            16
        ));
        assert!(in_subnet(Ipv4Addr::new(1, 2, 3, 4), net, 0));
    }
}
