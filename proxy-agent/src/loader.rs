//! Loads the datapath, pins it, and attaches it to devices so that it outlives the agent.
//!
//! Layout of the pin directory (default `/sys/fs/bpf/proxy-agent`, mode 0700, files 0600):
//!
//! ```text
//! <dir>/SERVICES, BACKEND_SLOTS, ...   maps, pinned by name (reused by the next agent)
//! <dir>/links/tc_ingress_if<ifindex>   one TCX link per device
//! ```
//!
//! Restart and upgrade without touching traffic: a starting agent loads its program against the
//! pinned maps, then for each device atomically swaps its program into the pinned link
//! (`BPF_LINK_UPDATE`); a packet sees the old program or the new one, never none. Stopping the
//! agent leaves links and maps in place. Only `uninstall` removes them. Links are named by
//! ifindex, not by name: an index is not reused while the namespace lives, a name can be.
//!
//! Pinned maps are reused only if their shape matches this build's: aya would otherwise reuse a
//! map of another layout silently.
//!
//! One agent at a time owns a pin directory (an exclusive `flock` on it, released by the kernel
//! when the agent dies, even by SIGKILL): two agents writing one set of maps would each trust
//! their own mirror and hand out the same ids. A starting agent waits for the previous one, as
//! a DaemonSet's rolling update may start the new pod before the old one is gone.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use aya::maps::{MapData, MapType};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use proxy_common::{
    AffinityKey, AffinityValue, Backend, Config, CtKey, CtValue, RevNat, ServiceKey, ServiceStats,
    ServiceValue, SlotKey, TC_INGRESS_PROGRAM, map_names, map_sizes,
};

/// The eBPF object, built by build.rs from `proxy-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// Where bpffs is mounted when the agent finds it unmounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
const LINKS_DIR: &str = "links";

/// Capacities of the maps that grow with the cluster.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub conntrack: u32,
    pub affinity: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            services: map_sizes::SERVICES,
            backends: map_sizes::BACKENDS,
            conntrack: map_sizes::CONNTRACK,
            affinity: map_sizes::AFFINITY,
        }
    }
}

struct MapShape {
    name: &'static str,
    kind: MapType,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
}

impl MapSizes {
    fn shapes(&self) -> [MapShape; 8] {
        use std::mem::size_of;
        let shape = |name, kind, key_size, value_size, max_entries| MapShape {
            name,
            kind,
            key_size,
            value_size,
            max_entries,
        };
        [
            shape(
                map_names::SERVICES,
                MapType::Hash,
                size_of::<ServiceKey>(),
                size_of::<ServiceValue>(),
                self.services,
            ),
            // Double-buffered: both generations of every set fit during a flip.
            shape(
                map_names::BACKEND_SLOTS,
                MapType::Hash,
                size_of::<SlotKey>(),
                4,
                2 * self.backends,
            ),
            shape(
                map_names::BACKENDS,
                MapType::Hash,
                4,
                size_of::<Backend>(),
                self.backends,
            ),
            shape(
                map_names::REVNAT,
                MapType::Hash,
                4,
                size_of::<RevNat>(),
                self.services,
            ),
            shape(
                map_names::CONNTRACK,
                MapType::LruHash,
                size_of::<CtKey>(),
                size_of::<CtValue>(),
                self.conntrack,
            ),
            shape(
                map_names::AFFINITY,
                MapType::LruHash,
                size_of::<AffinityKey>(),
                size_of::<AffinityValue>(),
                self.affinity,
            ),
            shape(map_names::CONFIG, MapType::Array, 4, size_of::<Config>(), 1),
            // A set has at least one frontend, so there are never more sets than frontends.
            shape(
                map_names::STATS,
                MapType::PerCpuHash,
                4,
                size_of::<ServiceStats>(),
                self.services,
            ),
        ]
    }
}

impl MapSizes {
    /// Each map's maximum entries, by name (the fixed-size CONFIG left out).
    pub fn capacities(&self) -> Vec<(&'static str, u32)> {
        let shapes = self.shapes().into_iter();
        let sized = shapes.filter(|shape| shape.name != map_names::CONFIG);
        sized.map(|shape| (shape.name, shape.max_entries)).collect()
    }
}

/// Mounts bpffs at /sys/fs/bpf unless something is mounted there already.
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let _source = fields.next();
        fields.next() == Some(BPFFS_ROOT) && fields.next() == Some("bpf")
    });
    if mounted {
        return Ok(());
    }
    fs::create_dir_all(BPFFS_ROOT).with_context(|| format!("creating {BPFFS_ROOT}"))?;
    nix::mount::mount(
        Some("bpf"),
        BPFFS_ROOT,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting bpffs at {BPFFS_ROOT} (needs CAP_SYS_ADMIN)"))?;
    tracing::info!("mounted bpffs at {BPFFS_ROOT}");
    Ok(())
}

/// How long a starting agent waits for the one holding the pin directory to exit.
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// The loaded program, bound to the pinned maps.
pub struct Datapath {
    ebpf: Ebpf,
    dir: PathBuf,
    _owner: Flock<fs::File>,
}

/// What `attach` did on a device.
#[derive(Debug, PartialEq, Eq)]
pub enum Attached {
    /// The device had no link of ours: a new one now carries the program.
    New,
    /// The device's pinned link now carries this agent's program (swapped atomically).
    Replaced,
}

impl Datapath {
    /// Lets go of the datapath and removes it: the links (detaching the program everywhere),
    /// then the maps, whose memory the kernel frees with the last pin. Returns what was removed.
    pub fn uninstall(self) -> anyhow::Result<Vec<PathBuf>> {
        let dir = self.dir.clone();
        // The pin directory's lock goes with `self`; `uninstall` takes it again.
        drop(self);
        uninstall(&dir)
    }

    /// Loads the program against the maps pinned in `dir`, creating and pinning them if absent.
    pub fn load(dir: &Path, sizes: &MapSizes) -> anyhow::Result<Datapath> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join(LINKS_DIR))
            .with_context(|| {
                format!("creating pin directory {} (is it on bpffs?)", dir.display())
            })?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        let owner = lock(dir, LOCK_WAIT)?;
        check_pinned_maps(dir, sizes)?;

        let shapes = sizes.shapes();
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(dir);
        for shape in &shapes {
            loader.map_max_entries(shape.name, shape.max_entries);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        for shape in &shapes {
            fs::set_permissions(dir.join(shape.name), fs::Permissions::from_mode(0o600))?;
        }
        let program = tc_program(&mut ebpf)?;
        program.load().map_err(|error| match error {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => {
                anyhow!("the verifier rejected {TC_INGRESS_PROGRAM}: {io_error}\n{verifier_log}")
            }
            other => anyhow!(other).context(format!("loading {TC_INGRESS_PROGRAM}")),
        })?;
        Ok(Datapath {
            ebpf,
            dir: dir.to_path_buf(),
            _owner: owner,
        })
    }

    pub fn program(&mut self) -> anyhow::Result<&mut SchedClassifier> {
        tc_program(&mut self.ebpf)
    }

    /// Puts this program on `ifname`'s TC ingress, through the device's pinned link if it has one.
    pub fn attach(&mut self, ifname: &str, ifindex: u32) -> anyhow::Result<Attached> {
        let pin = link_pin(&self.dir, ifindex);
        let program = tc_program(&mut self.ebpf)?;
        let (link_id, attached) = match PinnedLink::from_pin(&pin) {
            Ok(pinned) => {
                let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                    .with_context(|| format!("{} is not a TC link", pin.display()))?;
                let id = program.attach_to_link(link).with_context(|| {
                    format!("swapping the program on {ifname} into {}", pin.display())
                })?;
                (id, Attached::Replaced)
            }
            Err(_) if !pin.exists() => {
                let options = TcAttachOptions::TcxOrder(LinkOrder::default());
                let id = program
                    .attach_with_options(ifname, TcAttachType::Ingress, options)
                    .with_context(|| {
                        format!(
                            "attaching {TC_INGRESS_PROGRAM} to {ifname} (TCX needs Linux >= 6.6)"
                        )
                    })?;
                (id, Attached::New)
            }
            Err(error) => return Err(anyhow!(error).context(format!("opening {}", pin.display()))),
        };
        // The pin, not this process, keeps the link (and so the program) alive.
        let link = FdLink::try_from(program.take_link(link_id)?).context("TCX link")?;
        if attached == Attached::New {
            link.pin(&pin)
                .with_context(|| format!("pinning {}", pin.display()))?;
            fs::set_permissions(&pin, fs::Permissions::from_mode(0o600))?;
        }
        Ok(attached)
    }

    /// Removes the pins of links whose device is gone (the kernel detached them already).
    pub fn forget_links_except(&self, live_ifindexes: &BTreeSet<u32>) -> anyhow::Result<Vec<u32>> {
        let mut forgotten = Vec::new();
        for (ifindex, path) in pinned_links(&self.dir)? {
            if !live_ifindexes.contains(&ifindex) {
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                forgotten.push(ifindex);
            }
        }
        Ok(forgotten)
    }
}

fn tc_program(ebpf: &mut Ebpf) -> anyhow::Result<&mut SchedClassifier> {
    let program = ebpf
        .program_mut(TC_INGRESS_PROGRAM)
        .ok_or_else(|| anyhow!("the eBPF object has no program {TC_INGRESS_PROGRAM}"))?;
    Ok(program.try_into()?)
}

fn link_pin(dir: &Path, ifindex: u32) -> PathBuf {
    dir.join(LINKS_DIR)
        .join(format!("{TC_INGRESS_PROGRAM}_if{ifindex}"))
}

fn pinned_links(dir: &Path) -> anyhow::Result<Vec<(u32, PathBuf)>> {
    let prefix = format!("{TC_INGRESS_PROGRAM}_if");
    let entries = match fs::read_dir(dir.join(LINKS_DIR)) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error.into()),
    };
    let mut links = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if let Some(ifindex) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|i| i.parse().ok())
        {
            links.push((ifindex, entry.path()));
        }
    }
    Ok(links)
}

/// Refuses pinned maps whose shape differs from this build's, naming the map and the way out.
fn check_pinned_maps(dir: &Path, sizes: &MapSizes) -> anyhow::Result<()> {
    for shape in sizes.shapes() {
        let path = dir.join(shape.name);
        if !path.exists() {
            continue;
        }
        let info = MapData::from_pin(&path)
            .and_then(|map| map.info())
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let found = (
            info.map_type()?,
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        let wanted = (
            shape.kind,
            shape.key_size,
            shape.value_size,
            shape.max_entries,
        );
        if found != wanted {
            bail!(
                "pinned map {} is {:?} with key {} B, value {} B, {} entries; this agent needs {:?} with key {} B, \
                 value {} B, {} entries. Keep the map sizes of the running datapath, or run \
                 `proxy-agent uninstall` first (drops open connections' state)",
                path.display(),
                found.0,
                found.1,
                found.2,
                found.3,
                wanted.0,
                wanted.1,
                wanted.2,
                wanted.3
            );
        }
    }
    Ok(())
}

/// Takes the pin directory for this process, waiting up to `wait` for another agent to let go.
fn lock(dir: &Path, wait: Duration) -> anyhow::Result<Flock<fs::File>> {
    let deadline = Instant::now() + wait;
    let mut said = false;
    loop {
        let file = fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(owner) => return Ok(owner),
            Err((_, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                if !said {
                    tracing::info!(dir = %dir.display(), "waiting for the agent that holds the pin directory to exit");
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err((_, Errno::EWOULDBLOCK)) => bail!(
                "another agent holds {} (still running after {wait:?}): stop it, or give this one \
                 another --bpf-dir",
                dir.display()
            ),
            Err((_, errno)) => {
                return Err(anyhow!(errno).context(format!("locking {}", dir.display())));
            }
        }
    }
}

/// Detaches the datapath everywhere and removes every pin. Returns what was removed. Refuses
/// while an agent runs on the directory: it would go on writing maps nobody reads.
pub fn uninstall(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let _owner = lock(dir, Duration::ZERO)?;
    let mut removed = Vec::new();
    // Dropping the last reference to a link detaches it: unpinning is enough.
    for (_, path) in pinned_links(dir)? {
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        removed.push(path);
    }
    for shape in MapSizes::default().shapes() {
        let path = dir.join(shape.name);
        match fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(anyhow!(error).context(format!("removing {}", path.display())));
            }
        }
    }
    for empty in [dir.join(LINKS_DIR), dir.to_path_buf()] {
        match fs::remove_dir(&empty) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(
                    anyhow!(error).context(format!("removing {} (not empty?)", empty.display()))
                );
            }
        }
    }
    Ok(removed)
}
