//! A replica of kube-proxy's iptables mode: the `nat` table that `pkg/proxy/iptables/proxier.go`
//! writes for ClusterIP Services, loaded with `iptables-restore`.
//!
//! # Layout (as kube-proxy's, per packet from a pod to a ClusterIP)
//!
//! ```text
//! PREROUTING  -j KUBE-SERVICES                  ("kubernetes service portals"; OUTPUT too)
//! KUBE-SERVICES                                 one rule per Service port, in the order given:
//!   -d <cluster ip> --dport <port> -j KUBE-SVC-<hash>      a packet tries them one by one
//! KUBE-SVC-<hash>
//!   -d <cluster ip> --dport <port> ! -s <cluster cidr> -j KUBE-MARK-MASQ
//!   -m statistic --mode random --probability 1/n      -j KUBE-SEP-<hash 1>
//!   -m statistic --mode random --probability 1/(n-1)  -j KUBE-SEP-<hash 2>
//!   ...                                               -j KUBE-SEP-<hash n>   (no condition)
//! KUBE-SEP-<hash>
//!   -s <endpoint ip> -j KUBE-MARK-MASQ                                       (hairpin)
//!   -j DNAT --to-destination <endpoint ip>:<port>
//! POSTROUTING -j KUBE-POSTROUTING: RETURN unless marked 0x4000, else clear the mark, MASQUERADE
//! ```
//!
//! Chain names are kube-proxy's: `KUBE-SVC-` and `KUBE-SEP-` followed by the first 16 characters
//! of base32(sha256(s)), where s is `<namespace>/<name>:<port name><protocol>` for a Service and
//! the same followed by `<ip>:<port>` for an endpoint. Comments are as kube-proxy writes them
//! (`"ns/name:p80 cluster IP"`, `"ns/name:p80 -> 10.244.1.10:8080"`).
//!
//! # Backend
//!
//! [`apply`] runs the `iptables-restore` on `PATH`, as kube-proxy runs whichever `iptables` the
//! node has. On Debian 12 that is iptables 1.8.9 with the nf_tables backend
//! (`iptables-nft-restore`): the rules become nf_tables rules in the table `ip nat`, most matches
//! translated to native expressions; [`backend`] says which one is in use.
//!
//! # Differences from kube-proxy
//!
//! Besides those in the [module docs](super): kube-proxy adds its rules to the tables with
//! `iptables-restore --noflush` and hooks them in with `iptables -I`, because on a real node other
//! software shares the `nat` table. A testbed node's `nat` table is the replica's alone, so
//! [`apply`] replaces the whole table in one restore: the same rules, atomically, and applying
//! twice replaces instead of duplicating the hooks. kube-proxy also only rewrites the chains of
//! the Services that changed (`MinimizeIPTablesRestore`); the time [`apply`] takes is that of its
//! full resyncs (at start and every `--iptables-sync-period`).

use std::fmt::{self, Write};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{CLUSTER_CIDR, ServiceSpec, chain_hash, run_with_input};
use crate::Netns;

/// kube-proxy's `--iptables-masquerade-bit` 14, the default.
const MASQUERADE_MARK: &str = "0x4000";
/// How many characters of the hash kube-proxy keeps in `KUBE-SVC-` and `KUBE-SEP-` names.
const HASH_LEN: usize = 16;
/// kube-proxy's `-w 5`: with the legacy backend every namespace shares one lock file, and parallel
/// tests would otherwise fail instead of waiting their turn.
const LOCK_WAIT_SECONDS: &str = "5";

/// Which kernel interface `iptables-restore` programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-nft`: nf_tables rules in the tables `ip nat`, `ip filter`, ...
    Nft,
    /// `iptables-legacy`: the x_tables interface.
    Legacy,
}

/// The `iptables-restore` input (the `nat` table) that kube-proxy's iptables mode would write for
/// `services`, Services in `KUBE-SERVICES` in the order given. A Service without endpoints gets no
/// rules (kube-proxy only rejects its traffic, in the filter table).
pub fn rules(services: &[ServiceSpec]) -> String {
    let mut out = String::new();
    write_rules(&mut out, services).expect("formatting into a String does not fail");
    out
}

/// Loads `rules` (from [`rules`]) into the `nat` table of `netns`, replacing whatever the table
/// held, in one transaction.
pub fn apply(netns: &Netns, rules: &str) -> Result<()> {
    restore(netns, rules).context("applying the iptables replica")
}

/// Removes what [`apply`] added. With the nf_tables backend the table itself goes, so that its
/// hooks, and with them conntrack, no longer cost anything in the node; the legacy backend cannot
/// unregister a table, so there the `nat` table stays, empty.
pub fn flush(netns: &Netns) -> Result<()> {
    match backend()? {
        // `add` first so that deleting a table that was never made is not an error.
        Backend::Nft => run_with_input(
            netns.command("nft").args(["-f", "-"]),
            "add table ip nat\ndelete table ip nat\n",
        )
        .map(drop),
        Backend::Legacy => restore(netns, &rules(&[])),
    }
    .with_context(|| format!("flushing the iptables replica in {}", netns.name()))
}

/// The backend of the `iptables-restore` that [`apply`] runs, from its `--version`.
pub fn backend() -> Result<Backend> {
    let output = Command::new("iptables-restore")
        .arg("--version")
        .output()
        .context("running iptables-restore --version")?;
    let version = String::from_utf8_lossy(&output.stdout);
    if version.contains("(nf_tables)") {
        Ok(Backend::Nft)
    } else if version.contains("(legacy)") {
        Ok(Backend::Legacy)
    } else {
        bail!("unknown iptables backend in {:?}", version.trim())
    }
}

fn restore(netns: &Netns, input: &str) -> Result<()> {
    run_with_input(
        netns
            .command("iptables-restore")
            .args(["-w", LOCK_WAIT_SECONDS]),
        input,
    )
    .map(drop)
    .with_context(|| format!("in network namespace {}", netns.name()))
}

/// The chains of one Service port.
struct ServiceChains<'a> {
    spec: &'a ServiceSpec,
    /// kube-proxy's `ServicePortName` string, which its comments show.
    port_name: String,
    svc: String,
    /// One per endpoint, in order.
    seps: Vec<String>,
}

impl<'a> ServiceChains<'a> {
    fn new(spec: &'a ServiceSpec) -> Self {
        let port_name = spec.service_port_name();
        let protocol = spec.protocol.name();
        // kube-proxy's servicePortPolicyClusterChain and servicePortEndpointChainName: the strings
        // are concatenated without separators.
        let svc = format!(
            "KUBE-SVC-{}",
            chain_hash(&format!("{port_name}{protocol}"), HASH_LEN)
        );
        let seps = spec
            .endpoints
            .iter()
            .map(|&(ip, port)| {
                let endpoint = format!("{port_name}{protocol}{ip}:{port}");
                format!("KUBE-SEP-{}", chain_hash(&endpoint, HASH_LEN))
            })
            .collect();
        ServiceChains {
            spec,
            port_name,
            svc,
            seps,
        }
    }
}

fn write_rules(out: &mut String, services: &[ServiceSpec]) -> fmt::Result {
    let chains: Vec<ServiceChains> = services
        .iter()
        .filter(|spec| !spec.endpoints.is_empty())
        .map(ServiceChains::new)
        .collect();

    writeln!(out, "*nat")?;
    // Declared, not only used: with the nf_tables backend the built-in chains exist only once
    // something creates them.
    for builtin in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
        writeln!(out, ":{builtin} ACCEPT [0:0]")?;
    }
    for chain in ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"] {
        writeln!(out, ":{chain} - [0:0]")?;
    }
    for service in &chains {
        writeln!(out, ":{} - [0:0]", service.svc)?;
        for sep in &service.seps {
            writeln!(out, ":{sep} - [0:0]")?;
        }
    }

    // kube-proxy's iptablesJumpChains for the nat table.
    for hook in ["PREROUTING", "OUTPUT"] {
        writeln!(
            out,
            "-A {hook} -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        )?;
    }
    writeln!(
        out,
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"
    )?;
    writeln!(
        out,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQUERADE_MARK}/{MASQUERADE_MARK} -j RETURN"
    )?;
    // Cleared so that a packet that crosses the stack again is not masqueraded twice.
    writeln!(
        out,
        "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQUERADE_MARK}"
    )?;
    writeln!(
        out,
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" \
         -j MASQUERADE --random-fully"
    )?;
    writeln!(out, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQUERADE_MARK}")?;

    for service in &chains {
        write_service(out, service)?;
    }
    writeln!(out, "COMMIT")
}

fn write_service(out: &mut String, service: &ServiceChains) -> fmt::Result {
    let ServiceChains {
        spec,
        port_name,
        svc,
        seps,
    } = service;
    let protocol = spec.protocol.name();
    let (ip, port) = (spec.cluster_ip, spec.port);
    let (cidr, cidr_len) = CLUSTER_CIDR;
    let matches = format!(
        "-m comment --comment \"{port_name} cluster IP\" -m {protocol} -p {protocol} -d {ip} \
         --dport {port}"
    );
    writeln!(out, "-A KUBE-SERVICES {matches} -j {svc}")?;
    // Traffic to the ClusterIP from outside the cluster CIDR is masqueraded, so that its replies
    // come back through this node.
    writeln!(
        out,
        "-A {svc} {matches} ! -s {cidr}/{cidr_len} -j KUBE-MARK-MASQ"
    )?;
    let count = seps.len();
    for (index, (sep, &(endpoint_ip, endpoint_port))) in
        seps.iter().zip(&spec.endpoints).enumerate()
    {
        write!(
            out,
            "-A {svc} -m comment --comment \"{port_name} -> {endpoint_ip}:{endpoint_port}\""
        )?;
        // Rule i of n matches 1/(n-i) of the packets that reach it, so every endpoint gets 1/n;
        // the last one takes everything left.
        if index + 1 < count {
            write!(
                out,
                " -m statistic --mode random --probability {}",
                probability(count - index)
            )?;
        }
        writeln!(out, " -j {sep}")?;
    }
    for (sep, &(endpoint_ip, endpoint_port)) in seps.iter().zip(&spec.endpoints) {
        // A pod reaching itself through its Service: without SNAT it would answer itself directly.
        writeln!(
            out,
            "-A {sep} -m comment --comment {port_name} -s {endpoint_ip} -j KUBE-MARK-MASQ"
        )?;
        writeln!(
            out,
            "-A {sep} -m comment --comment {port_name} -m {protocol} -p {protocol} -j DNAT \
             --to-destination {endpoint_ip}:{endpoint_port}"
        )?;
    }
    Ok(())
}

/// kube-proxy's `probability(n)`: `fmt.Sprintf("%0.10f", 1.0/float64(n))`.
fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}
