//! Replicas of kube-proxy's iptables and nftables modes, for benchmarks that compare this project's
//! eBPF datapath with what it replaces.
//!
//! A replica is the NAT rule set kube-proxy would write for a list of [`ServiceSpec`]s, applied to
//! a testbed node's namespace. A pod on that node that connects to a ClusterIP then goes through
//! the node's netfilter hooks exactly as it would on a kube-proxy node: the node's PREROUTING
//! translates the connection's first packet, conntrack the rest of it and its replies.
//!
//! ```no_run
//! # use std::net::Ipv4Addr;
//! # use proxy_testbed::baselines::{self, Protocol, ServiceSpec, iptables};
//! fn thousand_services_through_iptables(node: &proxy_testbed::Node) -> anyhow::Result<()> {
//! let target = ServiceSpec {
//!     namespace: "bench".into(),
//!     name: "web".into(),
//!     cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
//!     port: 80,
//!     protocol: Protocol::Tcp,
//!     endpoints: vec![(node.pod_addr(10), 8080), (node.pod_addr(11), 8080)],
//! };
//! iptables::apply(&node.netns, &iptables::rules(&baselines::with_fillers(1000, target)))?;
//! // ... measure connections from a pod on `node` to 10.96.0.10:80 ...
//! iptables::flush(&node.netns)?;
//! # Ok(()) }
//! # fn main() {}
//! ```
//!
//! # What a benchmark must keep in mind
//!
//! - Only one translator at a time: the agent's TC ingress program runs before netfilter's
//!   PREROUTING, so with the agent attached the replica would only ever see translated packets.
//!   Flush a replica before measuring the agent, and detach the agent before applying a replica.
//! - Netfilter translates the first packet of a connection only; the rest follow its conntrack
//!   entry. The rule layout therefore shows in the cost of new connections (`Connection: close`),
//!   much less in the throughput of long ones.
//! - kube-proxy orders its Services by Go map iteration, which is random and changes between
//!   syncs, so in iptables mode a Service sits on average halfway down `KUBE-SERVICES`.
//!   [`with_fillers`] puts the measured Service last: the worst case, to be reported as such.
//!   nftables mode looks Services up in a map, so position does not matter there.
//! - Kernel conntrack is what both replicas rest on; the eBPF datapath does not use it. Loading a
//!   replica turns conntrack on in the node, and flushing it (nf_tables backends) turns it off
//!   again, so a replica measured first does not slow the agent measured after it. Conntrack
//!   entries outlive a flush, though (a closed TCP connection stays in TIME_WAIT for 120 s), and
//!   a namespace holds at most `nf_conntrack_max` of them (262144 on a host with this much
//!   memory): runs back to back in one node add up, a fresh testbed starts from zero.
//!
//! # Differences from kube-proxy, common to both modes
//!
//! Each difference leaves the path of a pod-to-ClusterIP connection through the rules the same or
//! shorter than on a kube-proxy node, so none of them makes the replicas look slower than the real
//! thing:
//! - Only ClusterIP translation. No NodePort, external IP, LoadBalancer or firewall rules
//!   (`KUBE-NODEPORTS`, `KUBE-EXT-*`, `KUBE-FW-*`, `KUBE-PROXY-FIREWALL`): kube-proxy checks them
//!   only after every ClusterIP rule failed to match, or for traffic to other addresses.
//! - No filter-table rules (`KUBE-FORWARD`, the REJECT rules for Services without endpoints, the
//!   nftables `filter-*` chains): on a kube-proxy node every forwarded packet also crosses those.
//!   A Service without endpoints gets no rules at all, so its traffic is not rejected here.
//! - No session affinity, no traffic policies (`KUBE-SVL-*`), one address family (IPv4).
//! - No conntrack tuning (kube-proxy raises `nf_conntrack_max` and shortens some timeouts): the
//!   host's defaults stay, which changes nothing for the short runs of a benchmark.
//! - The masquerade rules are kube-proxy's, with [`CLUSTER_CIDR`] as `--cluster-cidr`: traffic to a
//!   ClusterIP from outside the cluster CIDR, and a pod reaching itself (hairpin), are marked and
//!   masqueraded; pod-to-pod traffic crosses the same checks and is not masqueraded, like on a
//!   kube-proxy node.

pub mod iptables;
pub mod nftables;

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// The cluster CIDR the replicas hand to their masquerade rules (kube-proxy's `--cluster-cidr`):
/// every node's pod CIDR (10.244.i.0/24) lies in it.
pub const CLUSTER_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 244, 0, 0), 16);

/// Where [`with_fillers`] numbers its ClusterIPs from: inside kubeadm's default Service CIDR
/// 10.96.0.0/12, away from the low addresses a test is likely to give its own Services.
const FILLER_CLUSTER_IPS: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
/// Where [`with_fillers`] numbers its endpoints from: outside every node's pod CIDR, so no pod
/// has these addresses. Filler rules are loaded and crossed, never taken.
const FILLER_ENDPOINTS: Ipv4Addr = Ipv4Addr::new(10, 245, 0, 1);

/// The transport protocol of a Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The lowercase name kube-proxy hashes into chain names and writes into rules.
    fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One port of one Service, with the endpoints it forwards to, as the replicas see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    /// Pod address and target port of each ready endpoint, in the order the rules list them.
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

impl ServiceSpec {
    /// The name of the Service port, which kube-proxy writes into chain names and comments. A
    /// `ServiceSpec` has none of its own; `p<port>` is what kube-proxy's own tests use, so that
    /// the names made here can be checked against theirs.
    fn port_name(&self) -> String {
        format!("p{}", self.port)
    }

    /// kube-proxy's `ServicePortName` string, `<namespace>/<name>:<port name>`.
    fn service_port_name(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name())
    }
}

/// `count` Services in all, `target` last. The others ("fillers", `filler/svc-<i>`) use
/// `target`'s port and protocol, so that every rule before the target's differs from it only in
/// the ClusterIP, and they have as many endpoints as `target`, so that the rule sets grow like a
/// cluster's would. Their ClusterIPs (from 10.100.0.1, skipping `target`'s) and endpoints (from
/// 10.245.0.1) are distinct, and no pod has those endpoint addresses.
///
/// # Panics
///
/// If `count` is 0 (there would be no room for `target`).
pub fn with_fillers(count: usize, target: ServiceSpec) -> Vec<ServiceSpec> {
    assert!(count > 0, "with_fillers needs room for the target Service");
    let mut cluster_ips = (u32::from(FILLER_CLUSTER_IPS)..)
        .map(Ipv4Addr::from)
        .filter(|&ip| ip != target.cluster_ip);
    let per_service = target.endpoints.len();
    let mut services: Vec<ServiceSpec> = (0..count - 1)
        .map(|index| ServiceSpec {
            namespace: "filler".into(),
            name: format!("svc-{index}"),
            cluster_ip: cluster_ips.next().expect("the address range is unbounded"),
            port: target.port,
            protocol: target.protocol,
            endpoints: (0..per_service)
                .map(|k| {
                    let offset = u32::try_from(index * per_service + k)
                        .expect("filler endpoints fit in IPv4");
                    (
                        Ipv4Addr::from(u32::from(FILLER_ENDPOINTS) + offset),
                        target.endpoints[k].1,
                    )
                })
                .collect(),
        })
        .collect();
    services.push(target);
    services
}

/// The first `len` characters of the standard base32 encoding of the SHA-256 of `input`: how
/// kube-proxy derives the unique part of its chain names.
fn chain_hash(input: &str, len: usize) -> String {
    let digest = Sha256::digest(input.as_bytes());
    base32(&digest).chars().take(len).collect()
}

/// RFC 4648 base32 (standard alphabet) without padding; [`chain_hash`] keeps fewer characters
/// than a padded encoding would ever need to pad.
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u16, 0u32);
    for &byte in bytes {
        buffer = (buffer << 8) | u16::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[usize::from((buffer >> bits) & 0x1f)]));
        }
        // Only the `bits` low bits are still to be encoded; dropping the rest keeps the shift
        // above within 16 bits.
        buffer &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(char::from(
            ALPHABET[usize::from((buffer << (5 - bits)) & 0x1f)],
        ));
    }
    out
}

/// Runs `command` with `input` on its stdin; its stdout on success, an error with its stderr
/// otherwise.
fn run_with_input(command: &mut Command, input: &str) -> Result<String> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let mut stdin = child.stdin.take().context("the child's stdin is piped")?;
    // Written from another thread: a tool that reports an error for every one of 100,000 lines
    // would fill its stderr pipe and stop reading stdin while this thread was still writing.
    let output = std::thread::scope(|scope| {
        let writer = scope.spawn(move || stdin.write_all(input.as_bytes()));
        let output = child.wait_with_output();
        let written = writer
            .join()
            .expect("writing a child's stdin does not panic");
        (output, written)
    });
    let (output, written) = output;
    let output = output.with_context(|| format!("waiting for {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    // Checked after the exit status: when the tool fails early, writing to it fails too (broken
    // pipe), and its stderr is what says why. A tool that succeeded without reading all of its
    // input did not apply all of it.
    written.with_context(|| format!("writing the input of {command:?}"))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_rfc_4648() {
        // The test vectors of RFC 4648 section 10, padding removed.
        for (input, encoded) in [
            ("", ""),
            ("f", "MY"),
            ("fo", "MZXQ"),
            ("foo", "MZXW6"),
            ("foob", "MZXW6YQ"),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI"),
        ] {
            assert_eq!(base32(input.as_bytes()), encoded, "{input:?}");
        }
    }
}
