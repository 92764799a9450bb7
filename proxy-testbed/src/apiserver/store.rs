//! The objects, the one resourceVersion counter, and the history of changes that watches replay.
//!
//! As with etcd under the real server, every change to any object bumps one counter, and the
//! counter's new value is the changed object's `metadata.resourceVersion`. The history keeps every
//! change after the compaction point; a watch that resumes from before that point is too old.
//! Unlike etcd, only the newest version of each object is kept, so a list always shows the
//! present whatever resourceVersion it names.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::resource::Kind;

/// uids are unique in the process, not only in one server, as they are in a cluster.
static NEXT_UID: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    Added,
    Modified,
    Deleted,
}

impl Change {
    /// The watch event `type` for this change.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Added => "ADDED",
            Change::Modified => "MODIFIED",
            Change::Deleted => "DELETED",
        }
    }
}

/// One change to one object.
#[derive(Debug)]
pub(crate) struct Event {
    pub rv: u64,
    pub kind: Kind,
    pub change: Change,
    /// The object after the change; for a deletion, its last state carrying the deletion's
    /// resourceVersion, which is where a client resumes from.
    pub object: Arc<Value>,
    /// The object before the change, so that a watch with a selector can send an object that
    /// stopped matching as DELETED and one that began to as ADDED, as the real server does.
    pub previous: Option<Arc<Value>>,
}

/// What a watch's subscription receives.
#[derive(Debug)]
pub(crate) enum Delivery {
    Event(Arc<Event>),
    /// The server expired this watch: send 410 and close.
    Expire,
}

/// Where a new watch starts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Start {
    /// Synthetic ADDED events for every current object, then every later change.
    State,
    /// Every change after now.
    Now,
    /// Every change after this resourceVersion.
    After(u64),
}

pub(crate) struct Subscription {
    /// Events to send before the live ones, in order.
    pub backlog: Vec<Arc<Event>>,
    /// Every change after `rv`, as it happens.
    pub live: mpsc::UnboundedReceiver<Delivery>,
    /// The resourceVersion when the subscription was made.
    pub rv: u64,
}

/// A watch asked to resume from before the compaction point.
#[derive(Debug)]
pub(crate) struct TooOld {
    pub requested: u64,
    pub compacted: u64,
}

/// Objects are keyed by kind, namespace ("" when cluster-scoped) and name, so a kind's objects are
/// a contiguous range in the order lists return them.
type Key = (Kind, String, String);

#[derive(Default)]
pub(crate) struct Store {
    objects: BTreeMap<Key, Arc<Value>>,
    /// Every change after `compacted`, in resourceVersion order.
    history: Vec<Arc<Event>>,
    rv: u64,
    compacted: u64,
    subscribers: Vec<(Kind, mpsc::UnboundedSender<Delivery>)>,
}

impl Store {
    /// The resourceVersion of the latest change.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// Changes up to here are forgotten.
    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    /// Creates or replaces an object; returns its resourceVersion. An object equal to the stored
    /// one is not a change (no new resourceVersion, no event), as on the real server.
    pub fn apply(&mut self, object: Value) -> Result<u64, String> {
        let Value::Object(mut object) = object else {
            return Err("an object must be a JSON object".into());
        };
        let text = |object: &Map<String, Value>, field| {
            object
                .get(field)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let (api_version, kind_name) = (text(&object, "apiVersion"), text(&object, "kind"));
        let kind = Kind::of(&api_version, &kind_name)
            .ok_or_else(|| format!("unsupported apiVersion {api_version:?} kind {kind_name:?}"))?;
        let metadata = object
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
            .ok_or("metadata must be a JSON object")?;
        let name = text(metadata, "name");
        if name.is_empty() {
            return Err("metadata.name is missing".into());
        }
        let namespace = if kind.namespaced() {
            let namespace = Some(text(metadata, "namespace"))
                .filter(|ns| !ns.is_empty())
                .unwrap_or_else(|| "default".into());
            metadata.insert("namespace".into(), namespace.clone().into());
            namespace
        } else {
            // The real server ignores a namespace on a cluster-scoped object.
            metadata.remove("namespace");
            String::new()
        };
        let key = (kind, namespace, name);
        let previous = self.objects.get(&key).cloned();

        // Fields the server owns: kept from the stored object on an update, set on a create
        // unless the caller chose them.
        let previous_metadata = previous.as_ref().and_then(|p| p.get("metadata"));
        for field in ["uid", "creationTimestamp"] {
            if let Some(value) = previous_metadata.and_then(|m| m.get(field)) {
                metadata.insert(field.into(), value.clone());
            } else if !metadata.contains_key(field) {
                let value = match field {
                    "uid" => new_uid(),
                    _ => now_rfc3339(),
                };
                metadata.insert(field.into(), value.into());
            }
        }
        if let Some(previous) = &previous {
            let previous_rv = previous_metadata.and_then(|m| m.get("resourceVersion"));
            metadata.insert(
                "resourceVersion".into(),
                previous_rv.cloned().unwrap_or_default(),
            );
            if previous.as_object() == Some(&object) {
                return Ok(object_rv(previous));
            }
        }

        self.rv += 1;
        let rv = self.rv;
        set_rv(&mut object, rv);
        let object = Arc::new(Value::Object(object));
        self.objects.insert(key, Arc::clone(&object));
        let change = if previous.is_some() {
            Change::Modified
        } else {
            Change::Added
        };
        self.record(Event {
            rv,
            kind,
            change,
            object,
            previous,
        });
        Ok(rv)
    }

    /// Deletes an object; returns the deletion's resourceVersion, or `None` if there was no such
    /// object. `namespace` is ignored for cluster-scoped kinds.
    pub fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> Option<u64> {
        let namespace = if kind.namespaced() { namespace } else { "" };
        let key = (kind, namespace.to_owned(), name.to_owned());
        let previous = self.objects.remove(&key)?;
        self.rv += 1;
        let rv = self.rv;
        let mut last = Value::clone(&previous);
        if let Value::Object(last) = &mut last {
            set_rv(last, rv);
        }
        self.record(Event {
            rv,
            kind,
            change: Change::Deleted,
            object: Arc::new(last),
            previous: Some(previous),
        });
        Some(rv)
    }

    /// A kind's objects as `(namespace, name, object)`, sorted by namespace and name, starting
    /// after `after` if given.
    pub fn objects(
        &self,
        kind: Kind,
        after: Option<(&str, &str)>,
    ) -> impl Iterator<Item = (&str, &str, &Arc<Value>)> {
        let start = match after {
            Some((namespace, name)) => {
                Bound::Excluded((kind, namespace.to_owned(), name.to_owned()))
            }
            None => Bound::Included((kind, String::new(), String::new())),
        };
        self.objects
            .range((start, Bound::Unbounded))
            .take_while(move |((k, _, _), _)| *k == kind)
            .map(|((_, namespace, name), object)| (namespace.as_str(), name.as_str(), object))
    }

    /// Subscribes a new watch of `kind` from `start`.
    pub fn subscribe(&mut self, kind: Kind, start: Start) -> Result<Subscription, TooOld> {
        let backlog = match start {
            Start::State => self
                .objects(kind, None)
                .map(|(_, _, object)| {
                    Arc::new(Event {
                        rv: object_rv(object),
                        kind,
                        change: Change::Added,
                        object: Arc::clone(object),
                        previous: None,
                    })
                })
                .collect(),
            Start::Now => Vec::new(),
            Start::After(rv) if rv < self.compacted => {
                return Err(TooOld {
                    requested: rv,
                    compacted: self.compacted,
                });
            }
            Start::After(rv) => {
                let from = self.history.partition_point(|event| event.rv <= rv);
                self.history[from..]
                    .iter()
                    .filter(|event| event.kind == kind)
                    .cloned()
                    .collect()
            }
        };
        let (sender, live) = mpsc::unbounded_channel();
        self.subscribers.push((kind, sender));
        Ok(Subscription {
            backlog,
            live,
            rv: self.rv,
        })
    }

    /// Takes what is waiting in `live` and returns it with the current resourceVersion. Called
    /// with the store locked, so nothing up to that resourceVersion can still be on its way: a
    /// bookmark at it is truthful.
    pub fn catch_up(&self, live: &mut mpsc::UnboundedReceiver<Delivery>) -> (Vec<Delivery>, u64) {
        let mut pending = Vec::new();
        while let Ok(delivery) = live.try_recv() {
            pending.push(delivery);
        }
        (pending, self.rv)
    }

    /// Forgets the history: watches resuming from before now are too old.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    /// Tells every open watch to end with 410.
    pub fn expire_watches(&mut self) {
        for (_, sender) in self.subscribers.drain(..) {
            // A watch whose client is gone has nothing left to expire.
            let _ = sender.send(Delivery::Expire);
        }
    }

    /// Lets go of every open watch, which then sends nothing more: their connections are being
    /// dropped.
    pub fn disconnect_watches(&mut self) {
        self.subscribers.clear();
    }

    fn record(&mut self, event: Event) {
        let event = Arc::new(event);
        self.history.push(Arc::clone(&event));
        // Watches whose client went away are dropped here.
        self.subscribers.retain(|(kind, sender)| {
            *kind != event.kind || sender.send(Delivery::Event(Arc::clone(&event))).is_ok()
        });
    }
}

/// The resourceVersion of a stored object (always set by [`Store::apply`]).
fn object_rv(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or_default()
}

fn set_rv(object: &mut Map<String, Value>, rv: u64) {
    if let Some(Value::Object(metadata)) = object.get_mut("metadata") {
        metadata.insert("resourceVersion".into(), rv.to_string().into());
    }
}

fn new_uid() -> String {
    let n = NEXT_UID.fetch_add(1, Ordering::Relaxed);
    format!("{:08x}-0000-4000-8000-{n:012x}", std::process::id())
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (year, month, day) = civil_from_days(secs / 86_400);
    let time = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        time / 3600,
        time % 3600 / 60,
        time % 60
    )
}

/// The date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`, for days >= 0).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dates_from_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn an_unchanged_object_is_not_a_change() {
        let mut store = Store::default();
        let service = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}});
        assert_eq!(store.apply(service.clone()), Ok(1));
        assert_eq!(store.apply(service), Ok(1));
        let changed = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"},
                             "spec": {"type": "ClusterIP"}});
        assert_eq!(store.apply(changed), Ok(2));
        assert_eq!(store.history.len(), 2);
    }

    #[test]
    fn rejects_objects_it_cannot_store() {
        let mut store = Store::default();
        for bad in [
            json!([]),
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}}),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {}}),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": 1}),
        ] {
            assert!(store.apply(bad.clone()).is_err(), "{bad}");
        }
        assert_eq!(store.rv(), 0);
    }
}
