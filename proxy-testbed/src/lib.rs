//! Simulated Kubernetes clusters made of network namespaces, for the proxy's tests, benchmarks and
//! demo.
//!
//! A [`Testbed`] is one cluster. Nodes are namespaces joined by an underlay bridge; pods are
//! namespaces wired to their node the way Calico does it; external clients sit on the underlay.
//! Static routes play the CNI. Every address lives only inside these namespaces, so the host's own
//! network is never touched, and any number of testbeds (parallel tests) use the same addresses
//! side by side.
//!
//! ```text
//!                       underlay namespace ("router")
//!        +----------------------------------------------------------------+
//!        |  br0  172.18.0.1/16   ip_forward=1                             |
//!        |  routes: 10.244.i.0/24 via 172.18.0.(1+i)   (for externals)     |
//!        +---node1-----------------node2------------------ext<k>----------+
//!               | veth                 | veth                  | veth
//!   +-----------eth0-----------+  +----eth0--------------+  +--eth0--------------+
//!   | node1  172.18.0.2/16     |  | node2  172.18.0.3/16 |  | external client    |
//!   | default via 172.18.0.1   |  |  ...                 |  | 172.18.x.y/16      |
//!   | 10.244.2.0/24 via .0.3   |  |                      |  | default via        |
//!   | blackhole 10.244.1.0/24  |  |                      |  |   172.18.0.1       |
//!   | 10.244.1.5/32 dev veth1  |  |                      |  +--------------------+
//!   +---veth1 (proxy_arp=1)----+  +----------------------+
//!         |  no address
//!   +-----eth0-----------------------------+
//!   | pod  10.244.1.5/32                   |
//!   | 169.254.1.1 dev eth0 scope link      |
//!   | default via 169.254.1.1 dev eth0     |
//!   +--------------------------------------+
//! ```
//!
//! - Node `i` (from 1) has `eth0` = 172.18.0.(1+i)/16 and pod CIDR 10.244.i.0/24, with
//!   `ip_forward=1`, `rp_filter=0` and `send_redirects=0` (`all` and `default`). Every node and the
//!   router have a route to every other node's pod CIDR via that node.
//! - A pod's only route is via the link-local gateway 169.254.1.1, which nobody has: the node's end
//!   of the veth answers ARP for it by proxy ARP, so every packet from a pod goes to its node,
//!   which routes it. This is what makes a node's TC program see all pod traffic.
//! - IPv6 is off in every namespace, so no link-local chatter crosses the programs under test.
//!
//! # Use
//!
//! ```no_run
//! use std::net::{Ipv4Addr, SocketAddrV4};
//! use std::time::Duration;
//! # fn main() -> anyhow::Result<()> {
//! let mut testbed = proxy_testbed::Testbed::new()?;
//! let node1 = testbed.add_node("node1")?;
//! let node2 = testbed.add_node("node2")?;
//! let web = testbed.add_pod(&node1, "web", node1.pod_addr(5))?;
//! let client = testbed.add_pod(&node2, "client", node2.pod_addr(5))?;
//! web.serve(&[80], &[53])?;
//! let to = SocketAddrV4::new(web.addr, 80);
//! assert_eq!(client.tcp_request(to, Duration::from_secs(1))?, "web");
//! // The agent under test runs in the node's namespace and is killed when `testbed` drops.
//! let agent = node1.spawn(std::process::Command::new("proxy-agent"))?;
//! agent.wait_for_log("ready", Duration::from_secs(5))?;
//! # Ok(()) }
//! ```
//!
//! # Ownership and cleanup
//!
//! [`Node`], [`Pod`] and [`Netns`] are cheap handles; the [`Testbed`] owns what they name. Its drop,
//! also during a panic unwind, SIGKILLs and reaps the children, stops and joins the servers,
//! deletes the namespaces, and removes each node's [`Node::bpf_dir`] and [`Node::state_dir`]. When
//! it drops during a panic, it first prints the tail of every child's log. Errors on the way are
//! logged (`tracing`) and the rest still runs.
//!
//! Names are `ptb<pid>-<n>-<name>` ([`Testbed::id`] is `ptb<pid>-<n>`). A test binary killed
//! without running its drops leaves them behind, and its children die with it (parent-death
//! signal); the next [`Testbed::new`] removes names whose pid is gone.
//!
//! # Entering namespaces
//!
//! Only the network namespace is ever entered (`setns(CLONE_NEWNET)`), never the mount namespace:
//! `ip netns exec` remounts `/sys`, which would hide the bpffs at `/sys/fs/bpf` and the agent's
//! pins. One consequence: `/sys/class/net` inside a child still shows the host's devices; use
//! netlink (or `ip`) to list devices. [`Netns::run`] runs a closure on a thread inside a
//! namespace; sockets made there stay there, which is how [`Netns::tcp_connect`] hands a test a
//! long-lived connection from a pod.
//!
//! Privileges: root, or CAP_NET_ADMIN and CAP_SYS_ADMIN; [`Testbed::new`] says which is missing.

pub mod agent;
pub mod apiserver;
pub mod baselines;
mod naming;
mod netns;
mod pod_server;
mod process;
mod topology;

pub use naming::scratch_bpf_dir;
pub use netns::Netns;
pub use pod_server::io_error_kind;
pub use process::Process;
pub use topology::{Node, POD_GATEWAY, Pod, Testbed, UNDERLAY_GATEWAY, UNDERLAY_PREFIX_LEN};
