//! `compile`: the objects of a [`Store`] -> the [`DesiredState`](super::DesiredState) of one node.
//!
//! The semantics are kube-proxy's (its IPv4 proxier), one Service at a time in [`ObjectRef`] order:
//!
//! 1. Services kube-proxy does not proxy are skipped silently: `ExternalName`, headless
//!    (`clusterIP: None`), no ClusterIP, IPv6-only (the IPv6 datapath does not exist yet), and those
//!    labelled `service.kubernetes.io/service-proxy-name` (they belong to another proxy).
//! 2. Service-wide fields (ClusterIP, type, session affinity, internal traffic policy) are checked;
//!    a bad one rejects the whole Service.
//! 3. Each port is checked; a bad one rejects that port only.
//! 4. The Service's EndpointSlices (same namespace, label `kubernetes.io/service-name`, IPv4) are
//!    checked once each: a bad endpoint or slice port is rejected, the rest of the slice counts.
//! 5. Per port: claim the ClusterIP frontend (a frontend claimed twice goes to the Service that
//!    sorts first), take the union of the slices' endpoints for the port (deduplicated by
//!    address:port), keep the ready ones, or when none is ready the serving+terminating ones.
//!
//! Why validate here rather than trust the objects: the manifest source has no API server in front
//! of it, and even a real API server's objects are only as valid as the version that stored them.
//! Each check says which field failed, so one log line per [`Rejection`] is enough to fix it.
//!
//! Invariants: no I/O, clock or randomness; the output depends only on the store's contents (its
//! maps iterate in key order); no input panics (no indexing, every number is range-checked before
//! it is narrowed).

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};

use super::{
    BackendSet, Compiled, EndpointInfo, Frontend, ObjectRef, Protocol, Rejection, ServicePortName,
    SliceRecord, Store,
};

const SERVICE: &str = "Service";
const ENDPOINT_SLICE: &str = "EndpointSlice";

/// A Service with this label is handled by another proxy; kube-proxy ignores it, so do we.
const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// `sessionAffinityConfig.clientIP.timeoutSeconds`: the API's default and maximum.
const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// Compiles the store into the desired datapath state for node `node_name`: every Service, as
/// [`Compiler`](super::Compiler) does on its first update.
pub fn compile(store: &Store, node_name: &str) -> Compiled {
    let mut compiler = super::Compiler::new(node_name);
    compiler.update(store, &super::Changes::All);
    Compiled {
        desired: compiler.desired().clone(),
        rejected: compiler.rejected().cloned().collect(),
    }
}

/// One backend set a Service asks for, before frontends are shared out between Services.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Claim {
    pub name: ServicePortName,
    pub frontend: Frontend,
    /// Position in `spec.ports`, to name the field when the claim loses its frontend.
    pub port_index: usize,
    pub set: BackendSet,
}

/// What one Service compiles to on its own: the sets it claims and what was wrong with it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct ServiceOutput {
    pub claims: Vec<Claim>,
    pub rejected: Vec<Rejection>,
}

/// Compiles one Service with its EndpointSlices (steps 1 to 4 and the endpoint half of step 5).
pub(super) fn compile_service<'a>(
    svc_ref: &ObjectRef,
    svc: &Service,
    slices: impl Iterator<Item = (&'a ObjectRef, &'a SliceRecord)>,
    node_name: &str,
) -> ServiceOutput {
    let mut out = ServiceOutput::default();
    let Some(plan) = plan_service(svc_ref, svc, &mut out.rejected) else {
        return out;
    };
    if plan.ports.is_empty() {
        return out;
    }
    let parsed: Vec<ParsedSlice> = slices
        .filter_map(|(slice_ref, slice)| {
            parse_slice(slice_ref, slice, node_name, &mut out.rejected)
        })
        .collect();
    for port in &plan.ports {
        out.claims.push(Claim {
            name: ServicePortName {
                service: svc_ref.clone(),
                port_name: port.name.clone(),
                protocol: port.protocol,
            },
            frontend: Frontend {
                addr: plan.cluster_ip,
                port: port.port,
                protocol: port.protocol,
            },
            port_index: port.index,
            set: BackendSet {
                frontends: BTreeSet::new(),
                endpoints: select_endpoints(&parsed, port, plan.local_only),
                affinity_timeout_s: plan.affinity_timeout_s,
            },
        });
    }
    out
}

/// The rejection of a claim whose frontend went to `owner` (step 5: the Service that sorts first).
pub(super) fn lost_frontend(claim: &Claim, owner: &ServicePortName) -> Rejection {
    Rejection {
        kind: SERVICE,
        object: claim.name.service.clone(),
        reason: format!(
            "spec.ports[{}]: {}:{}/{} is already the frontend of Service {} port {:?}",
            claim.port_index,
            claim.frontend.addr,
            claim.frontend.port,
            protocol_name(claim.frontend.protocol),
            owner.service,
            owner.port_name,
        ),
    }
}

/// The Service an EndpointSlice belongs to: its label, in its namespace. A slice without the
/// label belongs to no Service (kube-proxy ignores it too).
pub(super) fn owner_of(slice_ref: &ObjectRef, slice: &SliceRecord) -> Option<ObjectRef> {
    Some(ObjectRef {
        namespace: slice_ref.namespace.clone(),
        name: slice.service.clone()?,
    })
}

/// What a proxied Service compiles from, once its fields are checked.
struct ServicePlan {
    cluster_ip: Ipv4Addr,
    affinity_timeout_s: Option<u32>,
    /// `internalTrafficPolicy: Local`: ClusterIP traffic only goes to this node's endpoints.
    local_only: bool,
    ports: Vec<PlannedPort>,
}

struct PlannedPort {
    /// Position in `spec.ports`, to name the field in a rejection.
    index: usize,
    name: String,
    protocol: Protocol,
    port: u16,
}

/// `None` when the Service is skipped (silently) or rejected (recorded in `rejected`).
fn plan_service(
    svc_ref: &ObjectRef,
    svc: &Service,
    rejected: &mut Vec<Rejection>,
) -> Option<ServicePlan> {
    let delegated = svc
        .metadata
        .labels
        .as_ref()
        .is_some_and(|labels| labels.contains_key(SERVICE_PROXY_NAME_LABEL));
    if delegated {
        return None;
    }
    let reject = |reason| Rejection {
        kind: SERVICE,
        object: svc_ref.clone(),
        reason,
    };
    let spec = svc.spec.as_ref()?;
    let mut plan = match service_settings(spec) {
        Ok(plan) => plan?,
        Err(reason) => {
            rejected.push(reject(reason));
            return None;
        }
    };
    let mut seen = BTreeSet::new();
    for (index, port) in spec.ports.iter().flatten().enumerate() {
        match plan_port(index, port) {
            Ok(port) if !seen.insert((port.name.clone(), port.protocol)) => {
                rejected.push(reject(format!(
                    "spec.ports[{index}].name: {:?} is already the name of an earlier {} port",
                    port.name,
                    protocol_name(port.protocol),
                )));
            }
            Ok(port) => plan.ports.push(port),
            Err(reason) => rejected.push(reject(reason)),
        }
    }
    Some(plan)
}

/// The Service-wide part of the plan (no ports yet). `Ok(None)`: not proxied, skip silently.
fn service_settings(spec: &ServiceSpec) -> Result<Option<ServicePlan>, String> {
    match non_empty(&spec.type_) {
        None | Some("ClusterIP" | "NodePort" | "LoadBalancer") => {}
        Some("ExternalName") => return Ok(None),
        Some(other) => {
            return Err(format!(
                "spec.type: {other:?} is not one of ClusterIP, NodePort, LoadBalancer, ExternalName"
            ));
        }
    }
    let Some(cluster_ip) = cluster_ipv4(spec)? else {
        return Ok(None);
    };
    let affinity_timeout_s = affinity_timeout(spec)?;
    let local_only = match non_empty(&spec.internal_traffic_policy) {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            return Err(format!(
                "spec.internalTrafficPolicy: {other:?} is not one of Cluster, Local"
            ));
        }
    };
    Ok(Some(ServicePlan {
        cluster_ip,
        affinity_timeout_s,
        local_only,
        ports: Vec::new(),
    }))
}

/// The Service's IPv4 ClusterIP. `Ok(None)` when it has none: headless, not allocated, or
/// IPv6-only. Dual-stack Services list their addresses in `clusterIPs` (whose first entry is
/// `clusterIP`); kube-proxy's IPv4 proxier takes the IPv4 one, and so do we.
fn cluster_ipv4(spec: &ServiceSpec) -> Result<Option<Ipv4Addr>, String> {
    let primary = non_empty(&spec.cluster_ip);
    let all = spec.cluster_ips.as_deref().unwrap_or_default();
    // The API server keeps clusterIPs[0] == clusterIP; when a hand-written object breaks that,
    // there is no telling which address its author meant.
    if let (Some(primary), Some(first)) = (primary, all.first())
        && primary != first
    {
        return Err(format!(
            "spec.clusterIP: {primary:?} differs from spec.clusterIPs[0]: {first:?}"
        ));
    }
    if primary == Some("None") || all.first().is_some_and(|first| first == "None") {
        return Ok(None);
    }
    let candidates: Vec<(Option<usize>, &str)> = if all.is_empty() {
        primary.map(|ip| (None, ip)).into_iter().collect()
    } else {
        all.iter()
            .enumerate()
            .map(|(i, ip)| (Some(i), ip.as_str()))
            .collect()
    };
    let mut found = None;
    // Every address is checked, not only the IPv4 one: garbage in a dual-stack Service is as
    // much a sign of a broken object as garbage in a single-stack one.
    for (index, value) in candidates {
        let field = || match index {
            None => "spec.clusterIP".to_owned(),
            Some(i) => format!("spec.clusterIPs[{i}]"),
        };
        match value.parse::<IpAddr>() {
            Ok(IpAddr::V4(addr)) => {
                if !usable(addr) {
                    return Err(format!("{}: {value:?} {RESERVED}", field()));
                }
                found.get_or_insert(addr);
            }
            // Not proxied until the IPv6 maps exist.
            Ok(IpAddr::V6(_)) => {}
            Err(_) => return Err(format!("{}: {value:?} is not a valid IP address", field())),
        }
    }
    Ok(found)
}

/// `sessionAffinity: ClientIP` -> its timeout in seconds; `None` without affinity.
fn affinity_timeout(spec: &ServiceSpec) -> Result<Option<u32>, String> {
    match non_empty(&spec.session_affinity) {
        None | Some("None") => Ok(None),
        Some("ClientIP") => {
            let configured = spec
                .session_affinity_config
                .as_ref()
                .and_then(|config| config.client_ip.as_ref())
                .and_then(|client_ip| client_ip.timeout_seconds);
            let Some(timeout) = configured else {
                return Ok(Some(DEFAULT_AFFINITY_TIMEOUT_S));
            };
            u32::try_from(timeout)
                .ok()
                .filter(|t| (1..=MAX_AFFINITY_TIMEOUT_S).contains(t))
                .map(Some)
                .ok_or_else(|| {
                    format!(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds: {timeout} is out of \
                         range 1-{MAX_AFFINITY_TIMEOUT_S}"
                    )
                })
        }
        Some(other) => Err(format!(
            "spec.sessionAffinity: {other:?} is not one of None, ClientIP"
        )),
    }
}

fn plan_port(index: usize, port: &ServicePort) -> Result<PlannedPort, String> {
    let protocol = match parse_protocol(&port.protocol) {
        Ok(Some(protocol)) => protocol,
        Ok(None) => {
            return Err(format!(
                "spec.ports[{index}].protocol: SCTP is not supported"
            ));
        }
        Err(why) => return Err(format!("spec.ports[{index}].protocol: {why}")),
    };
    let number = port_number(port.port).ok_or_else(|| {
        format!(
            "spec.ports[{index}].port: {} is out of range 1-65535",
            port.port
        )
    })?;
    Ok(PlannedPort {
        index,
        name: port.name.clone().unwrap_or_default(),
        protocol,
        port: number,
    })
}

/// An EndpointSlice's endpoints and ports, checked once however many Service ports read them.
struct ParsedSlice {
    ports: Vec<SlicePort>,
    endpoints: Vec<SliceEndpoint>,
}

struct SlicePort {
    name: String,
    protocol: Protocol,
    port: u16,
}

struct SliceEndpoint {
    addr: Ipv4Addr,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
}

/// EndpointSlices grouped by the Service they name, each group in slice-name order.
/// The API server refuses EndpointSlices with more endpoints than this (the field's maxItems);
/// a larger one did not come from a real API server and is refused whole.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 1000;

/// `None` for slices of another address family (ignored) or an unknown one (rejected).
fn parse_slice(
    slice_ref: &ObjectRef,
    slice: &SliceRecord,
    node_name: &str,
    rejected: &mut Vec<Rejection>,
) -> Option<ParsedSlice> {
    let mut reject = |reason| {
        rejected.push(Rejection {
            kind: ENDPOINT_SLICE,
            object: slice_ref.clone(),
            reason,
        });
    };
    match slice.address_type.as_str() {
        "IPv4" => {}
        // Valid, but the IPv6 datapath does not exist yet and FQDN slices are not for proxies.
        "IPv6" | "FQDN" => return None,
        other => {
            reject(format!(
                "addressType: {other:?} is not one of IPv4, IPv6, FQDN"
            ));
            return None;
        }
    }
    if slice.endpoints.len() > MAX_ENDPOINTS_PER_SLICE {
        reject(format!(
            "endpoints: {} entries, more than the {MAX_ENDPOINTS_PER_SLICE} an EndpointSlice may hold",
            slice.endpoints.len()
        ));
        return None;
    }

    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, port) in slice.ports.iter().enumerate() {
        let protocol = match parse_protocol(&port.protocol) {
            Ok(Some(protocol)) => protocol,
            // Valid SCTP: no Service port can match it, since those are rejected.
            Ok(None) => continue,
            Err(why) => {
                reject(format!("ports[{i}].protocol: {why}"));
                continue;
            }
        };
        let number = match port.port {
            None => {
                reject(format!("ports[{i}].port: missing"));
                continue;
            }
            Some(n) => match port_number(n) {
                Some(number) => number,
                None => {
                    reject(format!("ports[{i}].port: {n} is out of range 1-65535"));
                    continue;
                }
            },
        };
        let name = port.name.clone().unwrap_or_default();
        if !seen.insert((name.clone(), protocol)) {
            reject(format!(
                "ports[{i}].name: {name:?} is already the name of an earlier {} port",
                protocol_name(protocol)
            ));
            continue;
        }
        ports.push(SlicePort {
            name,
            protocol,
            port: number,
        });
    }

    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        // kube-proxy uses the first address only; the API requires exactly one anyway.
        let addr = match &endpoint.address {
            None => {
                reject(format!("endpoints[{i}].addresses: empty"));
                continue;
            }
            Some(Err(text)) => {
                reject(format!(
                    "endpoints[{i}].addresses[0]: {text:?} is not a valid IPv4 address"
                ));
                continue;
            }
            Some(Ok(addr)) => *addr,
        };
        if !usable(addr) {
            reject(format!(
                "endpoints[{i}].addresses[0]: {:?} {RESERVED}",
                addr.to_string()
            ));
            continue;
        }
        // The API's reading of absent conditions: ready unless said otherwise, serving "defers
        // to ready", not terminating. (kube-proxy reads an absent serving as true; the EndpointSlice
        // controller always sets it, so the two only differ on hand-written objects.)
        let ready = endpoint.ready.unwrap_or(true);
        let serving = endpoint.serving.unwrap_or(ready);
        let terminating = endpoint.terminating.unwrap_or(false);
        let local = !node_name.is_empty() && endpoint.node_name.as_deref() == Some(node_name);
        endpoints.push(SliceEndpoint {
            addr,
            ready,
            serving,
            terminating,
            local,
        });
    }
    Some(ParsedSlice { ports, endpoints })
}

/// The endpoints of one Service port, as kube-proxy's `CategorizeEndpoints` picks them.
fn select_endpoints(
    slices: &[ParsedSlice],
    port: &PlannedPort,
    local_only: bool,
) -> BTreeMap<SocketAddrV4, EndpointInfo> {
    // The union of all slices. The slice port that carries the Service port's name (and
    // protocol) gives the backend port: that is how the EndpointSlice controller resolves a
    // named targetPort.
    let mut union: BTreeMap<SocketAddrV4, &SliceEndpoint> = BTreeMap::new();
    for slice in slices {
        let Some(target) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            match union.entry(SocketAddrV4::new(endpoint.addr, target.port)) {
                Entry::Vacant(slot) => {
                    slot.insert(endpoint);
                }
                // The same address twice: an endpoint caught moving between slices, or a pod IP
                // reused before the old pod is gone. Like kube-proxy, prefer the live copy.
                Entry::Occupied(mut slot) => {
                    if slot.get().terminating && !endpoint.terminating {
                        slot.insert(endpoint);
                    }
                }
            }
        }
    }

    // With internalTrafficPolicy Local the ready/terminating choice is made among the local
    // endpoints only (kube-proxy: a local terminating endpoint beats a remote ready one), and no
    // local endpoint means an empty set: the datapath refuses, as kube-proxy drops.
    let candidates = union
        .iter()
        .filter(|(_, endpoint)| !local_only || endpoint.local);
    let any_ready = candidates.clone().any(|(_, endpoint)| endpoint.ready);
    candidates
        .filter(|(_, endpoint)| {
            if any_ready {
                endpoint.ready
            } else {
                endpoint.serving && endpoint.terminating
            }
        })
        .map(|(&addr, endpoint)| {
            let info = EndpointInfo {
                terminating: !any_ready,
                local: endpoint.local,
            };
            (addr, info)
        })
        .collect()
}

/// `Ok(None)` for SCTP: valid Kubernetes, not proxied (yet). `Err` names what is wrong.
fn parse_protocol(value: &Option<String>) -> Result<Option<Protocol>, String> {
    match non_empty(value) {
        None | Some("TCP") => Ok(Some(Protocol::Tcp)),
        Some("UDP") => Ok(Some(Protocol::Udp)),
        Some("SCTP") => Ok(None),
        Some(other) => Err(format!("{other:?} is not one of TCP, UDP, SCTP")),
    }
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&n| n != 0)
}

/// An optional string field, with `""` read as absent: Go clients cannot tell the two apart, and
/// the API server defaults both the same way (e.g. protocol `""` -> TCP).
fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|s| !s.is_empty())
}

const RESERVED: &str = "is reserved (unspecified, loopback, link-local, multicast or broadcast)";

/// Whether `addr` can be a ClusterIP or an endpoint. The API server refuses these for endpoints,
/// and the datapath reads 0.0.0.0 as "any address of this node" (NodePort frontends), so a
/// Service there would capture every NodePort.
fn usable(addr: Ipv4Addr) -> bool {
    !(addr.is_unspecified()
        || addr.is_loopback()
        || addr.is_link_local()
        || addr.is_multicast()
        || addr.is_broadcast())
}

#[cfg(test)]
mod tests;
