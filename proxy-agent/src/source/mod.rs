//! Sources of truth: where the agent's [`Store`](crate::model::Store) of Kubernetes objects comes
//! from. Each source only fills the store; deciding what the objects mean is `model::compile`'s
//! job, so every source feeds the datapath the same way.
//!
//! - [`kube`]: the Kubernetes API, watched (the normal case, in a cluster).
//! - [`directory`] over [`manifests`]: a directory of YAML manifests, for running without an API
//!   server (demo, tests, bootstrapping).
pub mod directory;
pub mod kube;
pub mod manifests;
