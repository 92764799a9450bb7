//! `proxy-agent run`: the agent's main loop.
//!
//! ```text
//! source (Kubernetes API watchers | manifest dir) --(changed)--> Store
//!   -> model::compile -> DesiredState -> Dataplane::sync -> pinned maps
//! netlink link events --> devices::select -> Datapath::attach (new veths served at once)
//! SIGTERM / SIGINT --> exit 0; the datapath stays attached and keeps serving
//! ```
//!
//! Start-up order: load the program against the pinned maps (adopting what a previous agent
//! left, conntrack included), wait until the source has listed everything once, sync, and only
//! then attach to devices. So a restarted agent deletes nothing it has not been told about, and
//! a fresh node never attaches a datapath that knows no Service. On a restart the attach is an
//! atomic program swap in the existing links, so traffic never stops.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use proxy_common::{Config, ipv4};
use rtnetlink::{Handle, MulticastGroup};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::dataplane::Dataplane;
use crate::dataplane::maps::Maps;
use crate::devices::{self, Uplinks};
use crate::loader::{self, Datapath, MapSizes};
use crate::metrics::{Metrics, OutcomeLabel};
use crate::model::{Changes, Compiler, Store};
use crate::source::directory::ManifestDir;
use crate::source::kube::{KubeSource, WatchSettings};
use crate::stats::DatapathMetrics;

/// Where the Services come from.
pub enum SourceConfig {
    Manifests(PathBuf),
    Kube {
        client: ::kube::Client,
        watch: WatchSettings,
    },
}

pub struct RunConfig {
    pub source: SourceConfig,
    /// `--devices`; `None` means the default route's device.
    pub uplinks: Option<Vec<String>>,
    pub node_name: String,
    pub bpf_dir: PathBuf,
    pub hairpin_address: Ipv4Addr,
    pub metrics_address: SocketAddr,
    pub map_sizes: MapSizes,
}

/// How soon a failed sync (a full map?) is tried again.
const SYNC_RETRY: Duration = Duration::from_secs(1);
/// A full device re-check besides link events, in case an event was lost (netlink may drop
/// notifications under load).
const DEVICE_RESYNC: Duration = Duration::from_secs(10);

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    let metrics_listener = crate::metrics::listen(config.metrics_address).await?;
    loader::ensure_bpffs()?;
    let mut datapath = Datapath::load(&config.bpf_dir, &config.map_sizes)?;
    let datapath_metrics = Arc::new(DatapathMetrics::open(&config.bpf_dir, &config.map_sizes)?);
    let metrics = Arc::new(Metrics::new(Some(datapath_metrics.clone())));
    tokio::spawn(crate::metrics::serve(metrics_listener, metrics.clone()));
    let mut maps = Maps::open_pinned(&config.bpf_dir)?;
    maps.write_config(Config {
        hairpin_addr: ipv4(config.hairpin_address),
        flags: 0,
    })?;
    let mut dataplane = Dataplane::adopt(maps)?;
    info!(
        frontends = dataplane.state().services().len(),
        backends = dataplane.state().backends().len(),
        pins = %config.bpf_dir.display(),
        "datapath loaded; adopted what the pinned maps hold"
    );

    let (connection, handle, mut link_events) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
            .context("opening a netlink socket")?;
    tokio::spawn(connection);
    if let Some(names) = &config.uplinks {
        let present = devices::list(&handle).await?;
        for name in names {
            if !present.iter().any(|device| &device.name == name) {
                bail!("--devices: no device named {name:?} in this network namespace");
            }
        }
    }

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut source = Source::open(config.source, &config.node_name, &metrics).await?;
    while !source.ready() {
        tokio::select! {
            _ = sigterm.recv() => return Ok(()),
            _ = sigint.recv() => return Ok(()),
            changed = source.next_change() => changed?,
        }
    }
    let mut syncer = Syncer::new(&config.node_name, metrics, datapath_metrics);
    // A failed sync (a full map) is reported and retried, never fatal: the maps hold a
    // consistent prefix of the plan, and traffic to what made it in is served.
    if let Err(error) = syncer.sync(&mut source, &mut dataplane) {
        warn!("{error:#}");
    }
    let mut attached = BTreeMap::new();
    refresh_devices(
        &handle,
        config.uplinks.as_deref(),
        &mut datapath,
        &mut attached,
    )
    .await?;
    info!(devices = attached.len(), node = %config.node_name, "ready");

    let mut device_resync = tokio::time::interval(DEVICE_RESYNC);
    let mut sync_retry = tokio::time::interval(SYNC_RETRY);
    loop {
        let mut retry = false;
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            // Cancel-safe: a batch cut short by another branch leaves its updates in the store,
            // and `has_changes` below still sees them.
            result = source.next_change() => result?,
            _ = sync_retry.tick(), if syncer.failed => retry = true,
            // A device problem is logged and retried on the next event or resync: the datapath
            // on every other device keeps being served.
            Some(_) = link_events.next() => {
                if let Err(error) = refresh_devices(&handle, config.uplinks.as_deref(), &mut datapath, &mut attached).await {
                    warn!("{error:#}");
                }
            }
            _ = device_resync.tick() => {
                if let Err(error) = refresh_devices(&handle, config.uplinks.as_deref(), &mut datapath, &mut attached).await {
                    warn!("{error:#}");
                }
            }
        }
        if (retry || source.has_changes())
            && source.ready()
            && let Err(error) = syncer.sync(&mut source, &mut dataplane)
        {
            warn!("{error:#}");
        }
    }
    info!("stopping; the datapath stays attached and keeps serving until `proxy-agent uninstall`");
    Ok(())
}

/// Attaches to every selected device not yet served, and lets go of devices that are gone.
///
/// A device that is still there keeps its link even when it is no longer selected: a default
/// route that flaps, or an attach that fails, must not take the datapath off a working uplink
/// (replies from other nodes' backends would reach clients untranslated).
async fn refresh_devices(
    handle: &Handle,
    uplink_names: Option<&[String]>,
    datapath: &mut Datapath,
    attached: &mut BTreeMap<u32, String>,
) -> anyhow::Result<()> {
    let present = devices::list(handle).await?;
    let uplinks = match uplink_names {
        Some(names) => Uplinks::Named(names.to_vec()),
        None => Uplinks::DefaultRoute(devices::default_route_device(handle).await?),
    };
    for (index, name) in devices::select(&present, &uplinks) {
        if attached.get(&index) == Some(&name) {
            continue;
        }
        // One device failing (it may vanish between the listing and the attach) must not keep
        // the others unserved.
        match datapath.attach(&name, index) {
            Ok(how) => {
                info!(device = %name, ifindex = index, ?how, "datapath attached");
                attached.insert(index, name);
            }
            Err(error) => warn!(device = %name, "{error:#}"),
        }
    }
    let present: BTreeSet<u32> = present.iter().map(|device| device.index).collect();
    attached.retain(|index, _| present.contains(index));
    for ifindex in datapath.forget_links_except(&present)? {
        info!(ifindex, "forgot the link of a device that is gone");
    }
    Ok(())
}

/// The source in use, behind one interface for the loop.
enum Source {
    Manifests(ManifestDir),
    Kube(KubeSource),
}

impl Source {
    async fn open(
        config: SourceConfig,
        node_name: &str,
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<Source> {
        Ok(match config {
            SourceConfig::Manifests(dir) => Source::Manifests(ManifestDir::open(dir)?),
            SourceConfig::Kube { client, watch } => {
                Source::Kube(KubeSource::connect(client, node_name, watch, metrics.clone()).await?)
            }
        })
    }

    /// Everything has been listed once: syncing now cannot delete what merely was not seen yet.
    fn ready(&self) -> bool {
        match self {
            Source::Manifests(_) => true,
            Source::Kube(kube) => kube.ready(),
        }
    }

    /// Waits until the store may have changed.
    async fn next_change(&mut self) -> anyhow::Result<()> {
        match self {
            Source::Manifests(dir) => dir.next_change().await,
            Source::Kube(kube) => {
                kube.next_change().await;
                Ok(())
            }
        }
    }

    /// Whether the store changed since the last [`Source::take_changes`].
    fn has_changes(&self) -> bool {
        match self {
            Source::Manifests(dir) => dir.reloaded(),
            Source::Kube(kube) => kube.has_changes(),
        }
    }

    /// What changed since the last call.
    fn take_changes(&mut self) -> Changes {
        match self {
            // A reload reads every file again: anything may have changed.
            Source::Manifests(dir) => {
                dir.take_reloaded();
                Changes::All
            }
            Source::Kube(kube) => kube.take_changes(),
        }
    }

    fn store(&self) -> &Store {
        match self {
            Source::Manifests(dir) => dir.store(),
            Source::Kube(kube) => kube.store(),
        }
    }

    /// What could not even be read as an object (manifest files only: the API serves objects).
    fn read_errors(&self) -> Vec<(&'static str, String)> {
        match self {
            Source::Manifests(dir) => {
                let errors = dir.errors().iter();
                errors
                    .map(|error| ("manifest", error.to_string()))
                    .collect()
            }
            Source::Kube(_) => Vec::new(),
        }
    }
}

/// Compiles what changed and syncs it, and reports each bad object once (not on every sync)
/// until it is fixed.
struct Syncer {
    compiler: Compiler,
    metrics: Arc<Metrics>,
    datapath_metrics: Arc<DatapathMetrics>,
    /// (kind, message) of every problem reported and not yet fixed.
    reported: BTreeSet<(&'static str, String)>,
    /// The last sync failed (a full map?): it is tried again even if nothing changed.
    failed: bool,
}

/// A sync this large (the first of a big cluster, a re-list) freed large transient buffers.
const RETURN_MEMORY_AFTER_WRITES: usize = 10_000;

/// Gives the heap's free pages back to the kernel. The allocator keeps what a large sync
/// allocated and freed (list pages, the first plan), and the agent's resident memory would stay
/// at that peak for its whole life.
fn return_freed_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe { libc::malloc_trim(0) };
}

/// The kinds a reported problem can be about, for the per-kind gauge.
const PROBLEM_KINDS: [&str; 3] = ["Service", "EndpointSlice", "manifest"];

impl Syncer {
    fn new(
        node_name: &str,
        metrics: Arc<Metrics>,
        datapath_metrics: Arc<DatapathMetrics>,
    ) -> Syncer {
        Syncer {
            compiler: Compiler::new(node_name),
            metrics,
            datapath_metrics,
            reported: BTreeSet::new(),
            failed: false,
        }
    }

    fn sync(&mut self, source: &mut Source, dataplane: &mut Dataplane) -> anyhow::Result<()> {
        let changes = source.take_changes();
        let store = source.store();
        let changed = self.compiler.update(store, &changes);
        let rejected = self
            .compiler
            .rejected()
            .map(|rejection| (rejection.kind, format!("skipping {rejection}")));
        let problems: BTreeSet<(&'static str, String)> =
            source.read_errors().into_iter().chain(rejected).collect();
        for (kind, problem) in problems.difference(&self.reported) {
            warn!("{problem}");
            self.metrics
                .rejections
                .get_or_create(&Metrics::kind(kind))
                .inc();
        }
        for kind in PROBLEM_KINDS {
            let now = problems.iter().filter(|(k, _)| *k == kind).count();
            self.metrics
                .rejected
                .get_or_create(&Metrics::kind(kind))
                .set(now as i64);
        }
        self.reported = problems;
        let desired = self.compiler.desired();
        self.metrics.services.set(store.services.len() as i64);
        self.metrics
            .endpoint_slices
            .set(store.endpoint_slices.len() as i64);
        self.metrics
            .backend_sets
            .set(desired.backend_sets.len() as i64);
        let result = dataplane.sync(desired, &changed);
        self.datapath_metrics
            .record_sync(&changed, dataplane.state());
        self.failed = result.is_err();
        let outcome = if self.failed { "failed" } else { "ok" };
        self.metrics
            .syncs
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        let report = result.inspect_err(|error| {
            // The writes before the failing one were made.
            self.metrics.map_writes.inc_by(error.applied as u64);
        })?;
        self.metrics
            .sync_seconds
            .observe(report.elapsed.as_secs_f64());
        self.metrics.map_writes.inc_by(report.writes as u64);
        if report.writes >= RETURN_MEMORY_AFTER_WRITES {
            return_freed_memory();
        }
        info!(
            services = store.services.len(),
            backend_sets = desired.backend_sets.len(),
            changed_sets = changed.len(),
            skipped = self.reported.len(),
            writes = report.writes,
            elapsed_us = report.elapsed.as_micros() as u64,
            "synced"
        );
        Ok(())
    }
}
