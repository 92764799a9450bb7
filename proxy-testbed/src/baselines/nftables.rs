//! A replica of kube-proxy's nftables mode: the NAT part of the table `ip kube-proxy` that
//! `pkg/proxy/nftables/proxier.go` writes for ClusterIP Services, loaded with `nft -f`.
//!
//! # Layout (as kube-proxy's, per packet from a pod to a ClusterIP)
//!
//! ```text
//! nat-prerouting (hook prerouting, priority -100)      jump services    (nat-output likewise)
//! services
//!   ip daddr . meta l4proto . th dport vmap @service-ips       one map lookup, any Service count
//! service-ips: { <cluster ip> . tcp . <port> : goto service-<hash>-<ns>/<name>/tcp/<port name>, ... }
//! service-<hash>-<ns>/<name>/tcp/<port name>
//!   ip daddr <cluster ip> tcp dport <port> ip saddr != <cluster cidr> jump mark-for-masquerade
//!   numgen random mod <n> vmap { 0 : goto endpoint-..., 1 : goto endpoint-..., ... }
//! endpoint-<hash>-<ns>/<name>/tcp/<port name>__<ip>/<port>
//!   ip saddr <ip> jump mark-for-masquerade                                        (hairpin)
//!   meta l4proto tcp dnat to <ip>:<port>
//! nat-postrouting (hook postrouting, priority 100)     jump masquerading:
//!   return unless marked 0x4000, else clear the mark, masquerade fully-random
//! ```
//!
//! Chain names are kube-proxy's `hashAndTruncate`: the first 8 characters of base32(sha256(name))
//! before the name. kube-proxy truncates names longer than nft's 256 characters; Kubernetes' limits
//! on namespace, Service and port names keep real names below that, so this replica does not.
//!
//! # Load time
//!
//! Each `numgen ... vmap { ... }` is an anonymous set, one per Service, and the kernel (6.18)
//! finds a free name for a new set and binds it to its rule by walking the table's sets and the
//! transaction, so loading the whole table grows with the square of the Service count: about
//! 0.35 s for 1,000 Services and 20 s for 10,000 (with 3 endpoints each). That is kube-proxy's
//! layout, so its full syncs pay the same.
//!
//! # Differences from kube-proxy
//!
//! Besides those in the [module docs](super): only the NAT chains. kube-proxy's table also has
//! filter chains on the prerouting, input, forward and output hooks (`filter-*`, with the
//! `cluster-ips-check`, `service-endpoints-check` and `firewall-check` lookups), which every new
//! connection crosses in addition; and a NodePort rule in `services` that a ClusterIP packet never
//! reaches, since the map sends it on with `goto`. [`apply`] deletes and recreates the table in one
//! transaction, where kube-proxy deletes it once at start and then flushes and refills chains
//! (all of them in a full sync, those of changed Services otherwise); the rules that result are
//! the same.

use std::fmt::{self, Write};

use anyhow::{Context, Result};

use super::{CLUSTER_CIDR, ServiceSpec, chain_hash, run_with_input};
use crate::Netns;

/// kube-proxy's table (family `ip`, one per address family).
const TABLE: &str = "ip kube-proxy";
/// kube-proxy's `--masquerade-bit` 14, the default.
const MASQUERADE_MARK: &str = "0x4000";
/// How many characters of the hash `hashAndTruncate` puts before a chain's name.
const HASH_LEN: usize = 8;
/// `add` first so that `delete` also succeeds when the table does not exist (nft 1.0.6 has no
/// `destroy`).
const DELETE_TABLE: &str = "add table ip kube-proxy\ndelete table ip kube-proxy\n";

/// The `nft -f` input that kube-proxy's nftables mode would write for `services` (NAT chains
/// only, see the module docs). A Service without endpoints gets no chains and no map element
/// (kube-proxy only rejects its traffic, in a filter chain).
pub fn ruleset(services: &[ServiceSpec]) -> String {
    let mut out = String::new();
    write_ruleset(&mut out, services).expect("formatting into a String does not fail");
    out
}

/// Loads `ruleset` (from [`ruleset`]) into `netns`, replacing the table `ip kube-proxy` if it is
/// there: one `nft -f` transaction, so no packet sees a half-loaded table.
pub fn apply(netns: &Netns, ruleset: &str) -> Result<()> {
    nft(netns, &format!("{DELETE_TABLE}{ruleset}")).context("applying the nftables replica")
}

/// Removes what [`apply`] added: the table `ip kube-proxy`, and with it its hooks.
pub fn flush(netns: &Netns) -> Result<()> {
    nft(netns, DELETE_TABLE).context("flushing the nftables replica")
}

fn nft(netns: &Netns, input: &str) -> Result<()> {
    run_with_input(netns.command("nft").args(["-f", "-"]), input)
        .map(drop)
        .with_context(|| format!("in network namespace {}", netns.name()))
}

/// kube-proxy's `hashAndTruncate` (without the truncation, see the module docs).
fn hashed(name: &str) -> String {
    format!("{}-{name}", chain_hash(name, HASH_LEN))
}

fn write_ruleset(out: &mut String, services: &[ServiceSpec]) -> fmt::Result {
    writeln!(
        out,
        "add table {TABLE} {{ comment \"rules for kube-proxy\" ; }}"
    )?;

    writeln!(out, "add chain {TABLE} mark-for-masquerade")?;
    writeln!(
        out,
        "add rule {TABLE} mark-for-masquerade mark set mark or {MASQUERADE_MARK}"
    )?;
    writeln!(out, "add chain {TABLE} masquerading")?;
    writeln!(
        out,
        "add rule {TABLE} masquerading mark and {MASQUERADE_MARK} == 0 return"
    )?;
    // Cleared so that a packet that crosses the stack again is not masqueraded twice.
    writeln!(
        out,
        "add rule {TABLE} masquerading mark set mark xor {MASQUERADE_MARK}"
    )?;
    writeln!(out, "add rule {TABLE} masquerading masquerade fully-random")?;

    writeln!(out, "add chain {TABLE} services")?;
    // kube-proxy's dstnat (-100) and srcnat (100), as numbers: nft 1.0.6 (Debian 12) accepts the
    // name dstnat on the prerouting hook only.
    for (chain, hook, priority, target) in [
        ("nat-prerouting", "prerouting", "-100", "services"),
        ("nat-output", "output", "-100", "services"),
        ("nat-postrouting", "postrouting", "100", "masquerading"),
    ] {
        writeln!(
            out,
            "add chain {TABLE} {chain} {{ type nat hook {hook} priority {priority} ; }}"
        )?;
        writeln!(out, "add rule {TABLE} {chain} jump {target}")?;
    }
    writeln!(
        out,
        "add map {TABLE} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; \
         comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    )?;
    writeln!(
        out,
        "add rule {TABLE} services ip daddr . meta l4proto . th dport vmap @service-ips"
    )?;

    for spec in services.iter().filter(|spec| !spec.endpoints.is_empty()) {
        write_service(out, spec)?;
    }
    Ok(())
}

fn write_service(out: &mut String, spec: &ServiceSpec) -> fmt::Result {
    let protocol = spec.protocol.name();
    let (ip, port) = (spec.cluster_ip, spec.port);
    let (cidr, cidr_len) = CLUSTER_CIDR;
    // kube-proxy's servicePortChainNameBase and servicePortEndpointChainNameBase.
    let base = format!(
        "{}/{}/{protocol}/{}",
        spec.namespace,
        spec.name,
        spec.port_name()
    );
    let service_chain = format!("service-{}", hashed(&base));
    let endpoint_chains: Vec<String> = spec
        .endpoints
        .iter()
        .map(|(endpoint_ip, endpoint_port)| {
            format!(
                "endpoint-{}",
                hashed(&format!("{base}__{endpoint_ip}/{endpoint_port}"))
            )
        })
        .collect();

    // Every chain before the rules that jump to it: nft resolves a chain name when it adds the rule.
    for chain in std::iter::once(&service_chain).chain(&endpoint_chains) {
        writeln!(out, "add chain {TABLE} {chain}")?;
    }
    for (chain, &(endpoint_ip, endpoint_port)) in endpoint_chains.iter().zip(&spec.endpoints) {
        // A pod reaching itself through its Service: without SNAT it would answer itself directly.
        writeln!(
            out,
            "add rule {TABLE} {chain} ip saddr {endpoint_ip} jump mark-for-masquerade"
        )?;
        writeln!(
            out,
            "add rule {TABLE} {chain} meta l4proto {protocol} dnat to {endpoint_ip}:{endpoint_port}"
        )?;
    }
    // Traffic to the ClusterIP from outside the cluster CIDR is masqueraded, so that its replies
    // come back through this node.
    writeln!(
        out,
        "add rule {TABLE} {service_chain} ip daddr {ip} {protocol} dport {port} \
         ip saddr != {cidr}/{cidr_len} jump mark-for-masquerade"
    )?;
    let verdicts: Vec<String> = endpoint_chains
        .iter()
        .enumerate()
        .map(|(index, chain)| format!("{index} : goto {chain}"))
        .collect();
    writeln!(
        out,
        "add rule {TABLE} {service_chain} numgen random mod {} vmap {{ {} }}",
        endpoint_chains.len(),
        verdicts.join(" , ")
    )?;
    writeln!(
        out,
        "add element {TABLE} service-ips {{ {ip} . {protocol} . {port} : goto {service_chain} }}"
    )
}
