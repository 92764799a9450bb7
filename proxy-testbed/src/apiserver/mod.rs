//! A fake Kubernetes API server for control-plane tests: the agent talks to it with the real kube
//! client (list, watch, reflectors) exactly as it would to a cluster, and the test changes the
//! objects and injects the failures a real control plane has.
//!
//! # What it models
//!
//! - core/v1 Services and Nodes and discovery.k8s.io/v1 EndpointSlices, listed and watched at the
//!   real paths, in one namespace or all of them (`/api/v1/services`,
//!   `/api/v1/namespaces/{ns}/services`, `/apis/discovery.k8s.io/v1/endpointslices`,
//!   `/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices`, `/api/v1/nodes`), and
//!   `/version`.
//! - One global resourceVersion counter, bumped by every change as etcd's revision is, and a
//!   history of changes that watches replay from any resourceVersion after the compaction point.
//! - Lists: items sorted by namespace and name, without `kind`/`apiVersion` (as the real server
//!   sends them), paged with `limit`/`continue`; a continue token from before the compaction point
//!   is answered 410 Expired.
//! - Watches: `ADDED`/`MODIFIED`/`DELETED` events, `BOOKMARK`s every
//!   [`FakeApiServer::set_bookmark_interval`] when `allowWatchBookmarks=true`, `timeoutSeconds`,
//!   the real server's resourceVersion semantics ("" and "0" send the current state as ADDED
//!   first, N replays changes after N), `sendInitialEvents=true` with its
//!   `k8s.io/initial-events-end` bookmark (kube-runtime's streaming lists), and a 200 answer with
//!   one `ERROR` 410 "too old resource version" event for a resourceVersion from before the
//!   compaction point, which is what makes kube-runtime re-list.
//! - Label selectors (`k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`) and field
//!   selectors on `metadata.name` and `metadata.namespace` (`=`, `==`, `!=`); anything else is
//!   answered 400, as are other malformed parameters.
//! - Faults, switched from the test at any time: stalled watches (a dead peer), refused
//!   connections, failing requests, mid-watch 410, a restart that forgets the history, and
//!   compaction; and counters of list and watch requests.
//!
//! # What it does not
//!
//! No etcd semantics beyond the one counter: only the newest version of each object is kept, so
//! a list shows the present whatever resourceVersion it names, and its later pages are not a
//! snapshot (a watch from the list's resourceVersion still converges). No writes over HTTP (the
//! test changes objects with [`FakeApiServer::apply`] and [`FakeApiServer::delete`]), no
//! admission or validation beyond what storing needs, no defaulting, no `generation`, no
//! finalizers or graceful deletion, no auth, no TLS, no HTTP/2, no protobuf, no API discovery
//! (`/api`, `/apis`: the kube client does not need it to list and watch typed resources). No
//! compaction on its own either: the history grows until [`FakeApiServer::compact`] or
//! [`FakeApiServer::restart`].
//!
//! # Use
//!
//! ```no_run
//! use proxy_testbed::apiserver::{FakeApiServer, Kind};
//! use serde_json::json;
//! # fn main() -> std::io::Result<()> {
//! let server = FakeApiServer::start_local();
//! server.write_kubeconfig("/tmp/kubeconfig")?; // for the agent: KUBECONFIG=/tmp/kubeconfig
//! server.apply(json!({
//!     "apiVersion": "v1", "kind": "Service",
//!     "metadata": {"name": "web", "namespace": "default"},
//!     "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]},
//! }));
//! server.expire_watches(); // every open watch gets ERROR 410 and has to re-list
//! assert_eq!(server.list_count(Kind::Service), 0);
//! server.delete(Kind::Service, "default", "web");
//! # Ok(()) }
//! ```
//!
//! The server runs on its own thread with a single-threaded tokio runtime; every method here is
//! synchronous and may be called from any thread, inside a tokio runtime or not. It stops, and
//! every connection is closed, when the [`FakeApiServer`] drops.

mod http;
mod list;
mod listener;
mod request;
mod resource;
mod selectors;
mod status;
mod store;
mod watch;

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use serde_json::Value;
use tokio::sync::{oneshot, watch as channel};

pub use resource::Kind;

use listener::{Control, Listening};
use store::Store;

/// The default time between BOOKMARK events: much shorter than the real server's minute, so that
/// tests see bookmarks without waiting.
const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// How long [`FakeApiServer::refuse_connections`] waits for the listening socket to close or open.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// A fake kube-apiserver serving plain HTTP on one address. See the [module docs](self).
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// What the server's tasks and the test's handle share.
pub(crate) struct Shared {
    store: Mutex<Store>,
    /// Watches send nothing more, and new ones get no answer.
    stalled: AtomicBool,
    /// The status every request is answered with; 0 for none.
    fail_status: AtomicU16,
    bookmark_interval_ms: AtomicU64,
    control: channel::Sender<Control>,
    listening: Listening,
    /// Per [`Kind::index`].
    lists: [AtomicU64; Kind::ALL.len()],
    watches: [AtomicU64; Kind::ALL.len()],
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // Store methods check everything before they change anything, so whatever panicked while
        // holding the lock left the store whole: a poisoned lock is still good to use.
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn failing(&self) -> Option<u16> {
        Some(self.fail_status.load(Ordering::Relaxed)).filter(|&code| code != 0)
    }

    fn bookmark_interval(&self) -> Duration {
        Duration::from_millis(self.bookmark_interval_ms.load(Ordering::Relaxed))
    }
}

impl FakeApiServer {
    /// Serves on `listener`, which may have been made inside a network namespace: the server
    /// thread enters the listener's namespace, so that listening again after
    /// [`refuse_connections`](Self::refuse_connections) happens there too.
    ///
    /// # Panics
    ///
    /// If the server thread cannot be started: no address on the listener, no thread, no tokio
    /// runtime, or entering the listener's namespace fails.
    pub fn start(listener: TcpListener) -> FakeApiServer {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|err| panic!("fake API server: listener address: {err}"));
        let netns = listener::foreign_netns(&listener);
        let shared = Arc::new(Shared {
            store: Mutex::default(),
            stalled: AtomicBool::new(false),
            fail_status: AtomicU16::new(0),
            bookmark_interval_ms: AtomicU64::new(millis(DEFAULT_BOOKMARK_INTERVAL)),
            control: channel::Sender::new(Control {
                listening: true,
                epoch: 0,
            }),
            listening: Listening::new(true),
            lists: Default::default(),
            watches: Default::default(),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || run(listener, addr, netns, shared, ready_tx, stopped)
            })
            .unwrap_or_else(|err| panic!("fake API server: spawning its thread: {err}"));
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => panic!("fake API server: starting on {addr}: {err}"),
            Err(_) => panic!("fake API server: its thread died while starting"),
        }
        FakeApiServer {
            shared,
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Serves on 127.0.0.1 at a free port.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start), and if no port can be bound.
    pub fn start_local() -> FakeApiServer {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|err| panic!("fake API server: binding 127.0.0.1:0: {err}"));
        Self::start(listener)
    }

    /// The address it serves on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, the cluster URL for a kube `Config`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig whose current context points at this server, without credentials, for
    /// `KUBECONFIG` or `kube::Config::from_custom_kubeconfig`.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> io::Result<()> {
        let kubeconfig = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {url}
users:
- name: fake
  user: {{}}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: default
current-context: fake
",
            url = self.url()
        );
        std::fs::write(path, kubeconfig)
    }

    /// Creates or replaces the object named by its `apiVersion`, `kind`, `metadata.namespace`
    /// (`default` if absent; ignored for Nodes) and `metadata.name`, and returns its new
    /// resourceVersion. Sets `metadata.uid` and `metadata.creationTimestamp` if absent, keeping
    /// the stored ones on an update. Watches see ADDED or MODIFIED; an object equal to the stored
    /// one is not a change and returns the stored resourceVersion.
    ///
    /// # Panics
    ///
    /// If the object is not a Service, EndpointSlice or Node with a name: that is a bug in the
    /// test.
    pub fn apply(&self, object: Value) -> u64 {
        let applied = self.shared.store().apply(object);
        applied.unwrap_or_else(|err| panic!("FakeApiServer::apply: {err}"))
    }

    /// Deletes an object and returns the deletion's resourceVersion, or `None` if there was no
    /// such object. Watches see DELETED with its last state. `namespace` is ignored for Nodes.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Option<u64> {
        self.shared.store().delete(kind, namespace, name)
    }

    /// The resourceVersion of the latest change (0 before the first).
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv()
    }

    /// Sets the time between BOOKMARK events (default 1 s, at least 1 ms) for watches opened from
    /// now on.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        let ms = millis(interval).max(1);
        self.shared
            .bookmark_interval_ms
            .store(ms, Ordering::Relaxed);
    }

    /// While on, open watch streams send nothing more (no events, no bookmarks, no end at their
    /// timeout) and new watch requests get no answer at all, while their connections stay open:
    /// a dead peer. A stalled stream never recovers, also after this is turned off; it ends when
    /// its connection does (the client gives up, [`restart`](Self::restart),
    /// [`refuse_connections`](Self::refuse_connections), drop).
    pub fn stall_watches(&self, on: bool) {
        self.shared.stalled.store(on, Ordering::Relaxed);
    }

    /// While on, nothing listens on the address, so connect() is refused; turning it on also
    /// drops every open connection. Turning it off listens again on the same address. Returns
    /// once that has happened.
    ///
    /// # Panics
    ///
    /// If the server cannot listen on the address again (say another socket took it) within 5 s.
    pub fn refuse_connections(&self, on: bool) {
        if on {
            self.drop_connections(self.shared.store());
        }
        self.shared
            .control
            .send_modify(|control| control.listening = !on);
        if let Err(err) = self.shared.listening.wait(!on, LISTEN_TIMEOUT) {
            let what = if on { "closing" } else { "listening again" };
            panic!("fake API server: {what} on {}: {err}", self.addr);
        }
    }

    /// While `Some(code)`, every request is answered with that HTTP status and a `Status` body
    /// (the real server's reason for the code, e.g. `InternalError` for 500). Note that the kube
    /// client itself retries 429, 503 and 504 before reporting them.
    ///
    /// # Panics
    ///
    /// If the code is not an HTTP error status (400..=599).
    pub fn fail_requests(&self, status: Option<u16>) {
        let code = status.unwrap_or(0);
        assert!(
            code == 0 || (400..=599).contains(&code),
            "fail_requests: {code} is not an HTTP error status"
        );
        self.shared.fail_status.store(code, Ordering::Relaxed);
    }

    /// Ends every open watch with an in-stream ERROR 410 Expired event, as the real server does to
    /// a watcher that fell out of its window. The connections stay open.
    pub fn expire_watches(&self) {
        self.shared.store().expire_watches();
    }

    /// An apiserver restart whose watch cache starts empty: every connection is dropped and the
    /// history is forgotten, so a watch resuming from an older resourceVersion gets 410. The
    /// objects and the resourceVersion counter stay, as they do in etcd.
    pub fn restart(&self) {
        let mut store = self.shared.store();
        store.compact();
        self.drop_connections(store);
    }

    /// Forgets the history up to now, as etcd's compaction does, without touching connections:
    /// open watches go on; new ones resuming from before now get 410.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Drops every open connection. Their watches stop at once, so no change made after this
    /// returns reaches a client through them; the sockets close as soon as their tasks run.
    ///
    /// Takes the store locked, so that no watch starts on a dropped connection in between (see
    /// watch::watch).
    fn drop_connections(&self, mut store: MutexGuard<'_, Store>) {
        store.disconnect_watches();
        self.shared
            .control
            .send_modify(|control| control.epoch += 1);
    }

    /// How many well-formed list requests of `kind` the server received, not counting those failed
    /// by [`fail_requests`](Self::fail_requests); each page counts.
    pub fn list_count(&self, kind: Kind) -> u64 {
        self.shared.lists[kind.index()].load(Ordering::Relaxed)
    }

    /// How many well-formed watch requests of `kind` the server received, counted as
    /// [`list_count`](Self::list_count) counts lists.
    pub fn watch_count(&self, kind: Kind) -> u64 {
        self.shared.watches[kind.index()].load(Ordering::Relaxed)
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // An error means the thread has already ended.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("fake API server on {}: its thread panicked", self.addr);
        }
    }
}

/// The server thread: enters the listener's namespace, reports whether it could start, and
/// serves until told to stop. Dropping the runtime at the end drops every connection.
fn run(
    listener: TcpListener,
    addr: SocketAddr,
    netns: Option<std::os::fd::OwnedFd>,
    shared: Arc<Shared>,
    ready: std::sync::mpsc::Sender<io::Result<()>>,
    stopped: oneshot::Receiver<()>,
) {
    let started = (|| {
        if let Some(netns) = &netns {
            setns(netns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        listener.set_nonblocking(true)?;
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        io::Result::Ok((runtime, listener))
    })();
    let (runtime, listener) = match started {
        Ok(started) => {
            // The caller waits for this; it cannot have gone away.
            let _ = ready.send(Ok(()));
            started
        }
        Err(err) => {
            let _ = ready.send(Err(err));
            return;
        }
    };
    runtime.block_on(async {
        tokio::select! {
            () = listener::serve(listener, addr, shared) => {}
            _ = stopped => {}
        }
    });
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
