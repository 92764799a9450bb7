//! The desired state of the datapath, computed from Kubernetes objects by a pure function.
//!
//! Data flow: `source` fills a [`Store`] with typed objects; [`compile()`] turns the store into a
//! [`DesiredState`] (no I/O, no clock, no randomness: the same store always compiles to the same
//! state); `dataplane::sync` diffs that state against the maps and writes the difference.
//! Nothing here knows about map ids, generations or byte order: those belong to the sync step.
//!
//! Invariants of a compiled state:
//! - every frontend appears in exactly one backend set;
//! - a backend set's endpoints are deduplicated by address:port;
//! - a backend set with no endpoints is kept (its frontends must refuse, not disappear).

mod compile;
mod incremental;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};

pub use compile::{MAX_ENDPOINTS_PER_SLICE, compile};
pub use incremental::{Changes, Compiler, SetChange};

/// Namespace and name of an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The objects the agent knows, keyed by namespace/name. Filled by a source, read by compile.
#[derive(Clone, Debug, Default)]
pub struct Store {
    pub services: BTreeMap<ObjectRef, Service>,
    pub endpoint_slices: BTreeMap<ObjectRef, SliceRecord>,
}

/// What the proxy reads of an EndpointSlice, kept instead of the whole object. A cluster's
/// endpoints outnumber its Services tenfold, and a k8s-openapi `Endpoint` is 352 bytes before
/// its strings: at 10,000 Services x 10 endpoints the whole objects were a quarter of the agent's
/// memory. Nothing is validated here; compile does that, with the same field names.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceRecord {
    /// The `kubernetes.io/service-name` label: the Service the slice belongs to.
    pub service: Option<String>,
    pub address_type: String,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<EndpointRecord>,
}

/// One endpoint, without a heap allocation of its own in the common case: 10^5 of them at
/// 10,000 Services, and small strings stranded among the parse's freed buffers kept resident.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointRecord {
    /// The first of `addresses` (kube-proxy uses no other), parsed; the text when it is not an
    /// IPv4 address, for the rejection; `None` when the list is empty.
    pub address: Option<Result<Ipv4Addr, String>>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    /// Shared by the endpoints of a slice that name the same node.
    pub node_name: Option<Arc<str>>,
}

/// How an EndpointSlice names the Service it belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

impl From<EndpointSlice> for SliceRecord {
    fn from(slice: EndpointSlice) -> SliceRecord {
        let mut nodes: Vec<Arc<str>> = Vec::new();
        let mut node = |name: String| match nodes.iter().find(|known| ***known == *name) {
            Some(known) => known.clone(),
            None => {
                let name: Arc<str> = name.into();
                nodes.push(name.clone());
                name
            }
        };
        let endpoints = slice.endpoints.into_iter().map(|endpoint| {
            let conditions = endpoint.conditions.unwrap_or_default();
            let address = endpoint.addresses.into_iter().next();
            EndpointRecord {
                address: address.map(|text| text.parse().map_err(|_| text)),
                ready: conditions.ready,
                serving: conditions.serving,
                terminating: conditions.terminating,
                node_name: endpoint.node_name.map(&mut node),
            }
        });
        SliceRecord {
            service: slice
                .metadata
                .labels
                .and_then(|mut labels| labels.remove(SERVICE_NAME_LABEL)),
            address_type: slice.address_type,
            ports: slice.ports.unwrap_or_default(),
            endpoints: endpoints.collect(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// One Service port: the unit kube-proxy programs (a `KUBE-SVC-*` chain), and ours (a backend set).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub service: ObjectRef,
    /// The Service port's `name` ("" when the Service has a single unnamed port).
    pub port_name: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{:?}", self.service, self.port_name, self.protocol)
    }
}

/// An address:port/protocol that clients send to and the datapath translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

/// What the datapath needs to know about one endpoint besides its address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointInfo {
    /// Serving while terminating: used only because no endpoint of the set is ready.
    pub terminating: bool,
    /// The endpoint's `nodeName` is this node.
    pub local: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendSet {
    pub frontends: BTreeSet<Frontend>,
    pub endpoints: BTreeMap<SocketAddrV4, EndpointInfo>,
    /// `sessionAffinity: ClientIP` timeout in seconds; `None` without affinity.
    pub affinity_timeout_s: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub backend_sets: BTreeMap<ServicePortName, BackendSet>,
}

/// An object, or a part of one, that compile refused. The rest of the store still compiles.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rejection {
    /// "Service" or "EndpointSlice".
    pub kind: &'static str,
    pub object: ObjectRef,
    /// Why, naming the field: `spec.ports[1].port: 0 is out of range 1-65535`.
    pub reason: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.object, self.reason)
    }
}

/// The result of compiling a store: the state to program, and what was skipped and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub desired: DesiredState,
    pub rejected: Vec<Rejection>,
}

impl DesiredState {
    /// The sets that differ from `old`, as [`Compiler::update`] reports them; for callers that
    /// build desired states themselves.
    pub fn changes_from(&self, old: &DesiredState) -> BTreeMap<ServicePortName, SetChange> {
        let names: BTreeSet<&ServicePortName> = old
            .backend_sets
            .keys()
            .chain(self.backend_sets.keys())
            .collect();
        names
            .into_iter()
            .filter_map(|name| {
                let change = SetChange {
                    old: old.backend_sets.get(name).cloned(),
                    new: self.backend_sets.get(name).cloned(),
                };
                (change.old != change.new).then(|| (name.clone(), change))
            })
            .collect()
    }
}
