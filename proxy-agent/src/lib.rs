//! The node agent of an eBPF service proxy that replaces kube-proxy.
//!
//! ```text
//! source (manifest dir)  ->  model::Store
//!   -> model::compile(store, node) -> DesiredState     pure
//!   -> dataplane::Dataplane::sync(desired)             diff against the maps, ordered writes
//!   -> kernel: proxy-ebpf reads the maps per packet    (loader attaches it to devices)
//! ```
pub mod dataplane;
pub mod devices;
pub mod list;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod run;
pub mod source;
pub mod stats;
