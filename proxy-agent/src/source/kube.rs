//! The Kubernetes API as a source: kube-runtime watchers for Services, EndpointSlices and this
//! node's Node, applied to one [`Store`].
//!
//! ```text
//! watcher(Services)       --\
//! watcher(EndpointSlices) ----> mpsc (Update) --> KubeSource::next_change: apply every queued
//! watcher(Node)           --/                      update, then hand the store to a sync
//! ```
//!
//! Invariants:
//! - A kind is *ready* after its first complete list (`InitDone`); until every kind is ready,
//!   [`KubeSource::ready`] is false and the agent writes nothing, so a restarted agent never
//!   deletes what it has not yet been told about.
//! - A re-list (after a 410, an error or a stalled watch) is buffered and replaces the kind's
//!   objects only when complete: a half-listed kind is never seen, and objects deleted while the
//!   watch was down disappear at that swap (the mark-and-sweep of the restart rule).
//! - Updates are coalesced: after the first one, more are taken until the stream has been quiet
//!   for [`QUIET`] (at most [`MAX_BATCH`] in all), so a burst of changes costs a sync or two, not
//!   one each, and a lone change waits only [`QUIET`].
//! - The watchers retry forever with a backoff capped at [`MAX_BACKOFF`]: an API outage never
//!   ends the agent, and the first retry after the API returns is at most that far away.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::model::{Changes, ObjectRef, SliceRecord, Store};

/// How long a starting agent waits for the API to answer before giving up with an error. An
/// API server under load can be slow for seconds; the datapath serves meanwhile.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A batch of updates ends when none came for this long...
const QUIET: Duration = Duration::from_millis(5);
/// ...or when it has been gathering for this long.
const MAX_BATCH: Duration = Duration::from_millis(100);

/// Longest wait between two attempts to reach the API.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What kube-proxy also skips: Services of another proxy, and headless ones (with their slices).
const SERVICE_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
const SLICE_SELECTOR: &str = "!service.kubernetes.io/headless";

/// How the watches behave.
#[derive(Clone, Copy, Debug)]
pub struct WatchSettings {
    /// The server closes each watch after this long; a watch silent for this plus 5 s is taken
    /// for dead and replaced (kube-runtime's idle detection).
    pub timeout_s: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Services,
    EndpointSlices,
    Node,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Services => "Service",
            Kind::EndpointSlices => "EndpointSlice",
            Kind::Node => "Node",
        }
    }
}

/// Boxed: objects are large, and the channel's slots are as big as its largest message.
enum Update {
    Services(Box<Event<Service>>),
    EndpointSlices(Box<Event<EndpointSlice>>),
    Node(Box<Event<Node>>),
    WatchFailed(Kind, String),
}

/// One kind's progress: the re-list under way, and whether a list ever completed. The objects
/// themselves live in the map the events are applied to (the store's), never copied, as `V`:
/// the object itself, or the record the store keeps of it.
struct Listing<K, V = K> {
    relisting: Option<BTreeMap<ObjectRef, V>>,
    ready: bool,
    _kind: std::marker::PhantomData<K>,
}

impl<K, V> Default for Listing<K, V> {
    fn default() -> Self {
        Listing {
            relisting: None,
            ready: false,
            _kind: std::marker::PhantomData,
        }
    }
}

impl<K: Resource, V: From<K>> Listing<K, V> {
    fn apply(&mut self, objects: &mut BTreeMap<ObjectRef, V>, event: Event<K>) {
        match event {
            Event::Init => self.relisting = Some(BTreeMap::new()),
            Event::InitApply(object) => {
                if let (Some(relisting), Some(key)) = (self.relisting.as_mut(), key_of(&object)) {
                    relisting.insert(key, V::from(object));
                }
            }
            Event::InitDone => {
                if let Some(listed) = self.relisting.take() {
                    *objects = listed;
                }
                self.ready = true;
            }
            Event::Apply(object) => {
                if let Some(key) = key_of(&object) {
                    objects.insert(key, V::from(object));
                }
            }
            Event::Delete(object) => {
                if let Some(key) = key_of(&object) {
                    objects.remove(&key);
                }
            }
        }
    }
}

/// Records which object an event changes; a completed (re-)list changes a whole kind.
fn note_change<K: Resource>(
    event: &Event<K>,
    changed: &mut BTreeSet<ObjectRef>,
    relisted: &mut bool,
) {
    match event {
        Event::Apply(object) | Event::Delete(object) => changed.extend(key_of(object)),
        Event::InitDone => *relisted = true,
        // Buffered until InitDone.
        Event::Init | Event::InitApply(_) => {}
    }
}

/// Namespace/name; objects without a name cannot be addressed and are left out.
fn key_of<K: Resource>(object: &K) -> Option<ObjectRef> {
    let meta = object.meta();
    Some(ObjectRef {
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone()?,
    })
}

pub struct KubeSource {
    updates: mpsc::UnboundedReceiver<Update>,
    services: Listing<Service>,
    slices: Listing<EndpointSlice, SliceRecord>,
    node: Listing<Node>,
    /// This node's Node object (a field-selected watch: zero or one).
    nodes: BTreeMap<ObjectRef, Node>,
    node_name: String,
    /// Kinds whose watch is failing, so that an outage logs once, not once per retry.
    failing: Vec<Kind>,
    store: Store,
    /// What changed since [`KubeSource::take_changes`] was last called.
    changed_services: BTreeSet<ObjectRef>,
    changed_slices: BTreeSet<ObjectRef>,
    /// A kind was (re-)listed: it was replaced whole.
    relisted: bool,
    metrics: Arc<Metrics>,
}

impl KubeSource {
    /// Checks that the API answers, then starts the watchers.
    pub async fn connect(
        client: Client,
        node_name: &str,
        settings: WatchSettings,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<KubeSource> {
        let version = first_answer(&client).await.context(
            "the Kubernetes API does not answer: check --kubeconfig (or KUBECONFIG), or read \
             manifests with --manifests DIR",
        )?;
        info!(version = %version.git_version, "connected to the Kubernetes API");
        let (sender, updates) = mpsc::unbounded_channel();
        let config = watcher::Config::default().timeout(settings.timeout_s);
        spawn_watch(
            Kind::Services,
            Api::<Service>::all(client.clone()),
            config.clone().labels(SERVICE_SELECTOR),
            sender.clone(),
            |event| Update::Services(Box::new(event)),
        );
        spawn_watch(
            Kind::EndpointSlices,
            Api::<EndpointSlice>::all(client.clone()),
            config.clone().labels(SLICE_SELECTOR),
            sender.clone(),
            |event| Update::EndpointSlices(Box::new(event)),
        );
        spawn_watch(
            Kind::Node,
            Api::<Node>::all(client),
            config.fields(&format!("metadata.name={node_name}")),
            sender,
            |event| Update::Node(Box::new(event)),
        );
        Ok(KubeSource {
            updates,
            services: Listing::default(),
            slices: Listing::default(),
            node: Listing::default(),
            nodes: BTreeMap::new(),
            node_name: node_name.to_string(),
            failing: Vec::new(),
            store: Store::default(),
            changed_services: BTreeSet::new(),
            changed_slices: BTreeSet::new(),
            relisted: false,
            metrics,
        })
    }

    /// Every kind has been listed completely at least once.
    pub fn ready(&self) -> bool {
        self.services.ready && self.slices.ready && self.node.ready
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether anything changed since the last [`KubeSource::take_changes`].
    pub fn has_changes(&self) -> bool {
        self.relisted || !self.changed_services.is_empty() || !self.changed_slices.is_empty()
    }

    /// The objects changed since the last call (everything, after a re-list).
    pub fn take_changes(&mut self) -> Changes {
        let services = std::mem::take(&mut self.changed_services);
        let slices = std::mem::take(&mut self.changed_slices);
        if std::mem::take(&mut self.relisted) {
            Changes::All
        } else {
            Changes::Objects { services, slices }
        }
    }

    /// Waits for at least one update, then applies it and the rest of its batch. Cancel-safe:
    /// every update is applied (and noted for [`KubeSource::take_changes`]) as it is taken.
    pub async fn next_change(&mut self) {
        let Some(first) = self.updates.recv().await else {
            // The watchers never end (they retry forever); if they did, wait for the signals.
            return futures::future::pending().await;
        };
        let was_ready = self.ready();
        let batch_end = tokio::time::Instant::now() + MAX_BATCH;
        self.apply(first);
        while tokio::time::Instant::now() < batch_end {
            match tokio::time::timeout(QUIET, self.updates.recv()).await {
                Ok(Some(update)) => {
                    self.apply(update);
                }
                Ok(None) | Err(_) => break,
            }
        }
        if self.ready() && !was_ready {
            self.report_node();
        }
    }

    fn apply(&mut self, update: Update) {
        let kind = match update {
            Update::Services(event) => {
                note_change(&event, &mut self.changed_services, &mut self.relisted);
                self.services.apply(&mut self.store.services, *event);
                Kind::Services
            }
            Update::EndpointSlices(event) => {
                note_change(&event, &mut self.changed_slices, &mut self.relisted);
                self.slices.apply(&mut self.store.endpoint_slices, *event);
                Kind::EndpointSlices
            }
            Update::Node(event) => {
                self.node.apply(&mut self.nodes, *event);
                if self.node.ready {
                    self.report_node();
                }
                Kind::Node
            }
            Update::WatchFailed(kind, error) => {
                let label = Metrics::kind(kind.label());
                self.metrics.watch_failures.get_or_create(&label).inc();
                if !self.failing.contains(&kind) {
                    warn!(
                        ?kind,
                        "watch failed, retrying every {MAX_BACKOFF:?} at most: {error}"
                    );
                    self.failing.push(kind);
                }
                return;
            }
        };
        if let Some(position) = self.failing.iter().position(|k| *k == kind) {
            self.failing.remove(position);
            info!(?kind, "watch recovered");
        }
    }

    /// Says which addresses this node has in the API, or that the API does not know it, in which
    /// case no endpoint can be recognised as local.
    fn report_node(&self) {
        match self.nodes.values().next() {
            Some(node) => {
                let addresses: Vec<String> = node
                    .status
                    .as_ref()
                    .and_then(|status| status.addresses.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|address| format!("{}={}", address.type_, address.address))
                    .collect();
                info!(node = %node.name_any(), addresses = ?addresses, "this node in the API");
            }
            None => warn!(
                node = %self.node_name,
                "no Node of this name in the API: is --node-name (or NODE_NAME) right? No endpoint counts as local"
            ),
        }
    }
}

/// The API's version, asked again with the watchers' backoff until [`CONNECT_TIMEOUT`]: an agent
/// restarted during a brief API hiccup waits it out (its datapath serves meanwhile); one with no
/// API at all says so.
async fn first_answer(
    client: &Client,
) -> anyhow::Result<k8s_openapi::apimachinery::pkg::version::Info> {
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let mut backoff = CappedBackoff::default();
    loop {
        let error = match tokio::time::timeout_at(deadline, client.apiserver_version()).await {
            Ok(Ok(version)) => return Ok(version),
            Ok(Err(error)) => anyhow::Error::from(error),
            Err(_) => anyhow::anyhow!("no answer within {CONNECT_TIMEOUT:?}"),
        };
        let retry_at = tokio::time::Instant::now() + backoff.next().unwrap_or(MAX_BACKOFF);
        if retry_at >= deadline {
            return Err(error);
        }
        tokio::time::sleep_until(retry_at).await;
    }
}

/// Runs one kind's watcher forever, sending its events (and its failures) to the source.
fn spawn_watch<K>(
    kind: Kind,
    api: Api<K>,
    config: watcher::Config,
    sender: mpsc::UnboundedSender<Update>,
    wrap: fn(Event<K>) -> Update,
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    let stream = watcher::watcher(api, config).backoff(CappedBackoff::default());
    tokio::spawn(forward(kind, stream, sender, wrap));
}

async fn forward<K>(
    kind: Kind,
    stream: impl Stream<Item = Result<Event<K>, watcher::Error>>,
    sender: mpsc::UnboundedSender<Update>,
    wrap: fn(Event<K>) -> Update,
) {
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        let update = match item {
            Ok(event) => wrap(event),
            Err(error) => Update::WatchFailed(kind, error.to_string()),
        };
        if sender.send(update).is_err() {
            return; // the agent is stopping
        }
    }
}

/// Exponential from 100 ms, doubling up to [`MAX_BACKOFF`]. kube-runtime's default grows to
/// 30 s, which would leave changes made during an outage unapplied for that long after it ends.
struct CappedBackoff {
    next: Duration,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(100);

impl Default for CappedBackoff {
    fn default() -> Self {
        CappedBackoff {
            next: FIRST_BACKOFF,
        }
    }
}

impl Iterator for CappedBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        Some(delay)
    }
}

impl Backoff for CappedBackoff {
    fn reset(&mut self) {
        self.next = FIRST_BACKOFF;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn service(name: &str, version: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn names(objects: &BTreeMap<ObjectRef, Service>) -> Vec<(String, String)> {
        objects
            .iter()
            .map(|(key, s)| (key.name.clone(), s.resource_version().unwrap_or_default()))
            .collect()
    }

    #[test]
    fn a_relist_is_seen_only_when_complete_and_sweeps_what_was_deleted_meanwhile() {
        let mut listing = Listing::default();
        let mut objects = BTreeMap::new();
        for event in [
            Event::Init,
            Event::InitApply(service("a", "1")),
            Event::InitApply(service("b", "1")),
        ] {
            listing.apply(&mut objects, event);
            assert!(!listing.ready, "not ready before the first list completes");
        }
        listing.apply(&mut objects, Event::InitDone);
        assert!(listing.ready);
        assert_eq!(
            names(&objects),
            [("a".into(), "1".into()), ("b".into(), "1".into())]
        );

        // A re-list after the watch broke: `b` was deleted and `a` changed meanwhile.
        listing.apply(&mut objects, Event::Init);
        listing.apply(&mut objects, Event::InitApply(service("a", "7")));
        assert_eq!(
            names(&objects).len(),
            2,
            "the old state serves until the re-list is done"
        );
        listing.apply(&mut objects, Event::InitDone);
        assert_eq!(names(&objects), [("a".into(), "7".into())]);

        listing.apply(&mut objects, Event::Apply(service("c", "8")));
        listing.apply(&mut objects, Event::Delete(service("a", "9")));
        assert_eq!(names(&objects), [("c".into(), "8".into())]);
    }

    #[test]
    fn the_backoff_doubles_up_to_its_cap_and_resets() {
        let mut backoff = CappedBackoff::default();
        let delays: Vec<u64> = backoff
            .by_ref()
            .take(6)
            .map(|d| d.as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        backoff.reset();
        assert_eq!(backoff.next(), Some(FIRST_BACKOFF));
    }
}
