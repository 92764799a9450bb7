//! The kinds of object the server knows: their API group, version, names and scope.

/// A kind of object the fake API server stores and serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// core/v1 `Service`.
    Service,
    /// discovery.k8s.io/v1 `EndpointSlice`.
    EndpointSlice,
    /// core/v1 `Node` (cluster-scoped).
    Node,
}

impl Kind {
    pub(crate) const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    /// The `kind` field of an object, e.g. `"Service"`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    /// The `apiVersion` field of an object, e.g. `"discovery.k8s.io/v1"`.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        self != Kind::Node
    }

    /// The `kind` of a list response, e.g. `"ServiceList"`.
    pub(crate) fn list_kind(self) -> &'static str {
        match self {
            Kind::Service => "ServiceList",
            Kind::EndpointSlice => "EndpointSliceList",
            Kind::Node => "NodeList",
        }
    }

    /// The resource name in URL paths, e.g. `"endpointslices"`.
    pub(crate) fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
        }
    }

    /// Where the kind's group/version lives: `/api/v1` for the core group, `/apis/<group>/<version>`
    /// for the others.
    pub(crate) fn group_path(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "/api/v1",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1",
        }
    }

    /// The kind an object declares with its `apiVersion` and `kind` fields.
    pub(crate) fn of(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.name() == kind)
    }

    /// A dense index, for per-kind counters.
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}
