//! Typed handles on the pinned translation maps: read them whole, write one entry at a time.
//! Opened from the pins, so the agent, `proxy-agent list` and the tests all see the same maps.
use std::path::Path;

use anyhow::Context;
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuHashMap, PerCpuValues};
use aya::sys::SyscallError;
use proxy_common::{
    Backend, Config, RevNat, ServiceKey, ServiceStats, ServiceValue, SlotKey, map_names,
};

use super::plan::{MapState, MapWrite};

pub struct Maps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, u32, Backend>,
    revnats: HashMap<MapData, u32, RevNat>,
    stats: PerCpuHashMap<MapData, u32, ServiceStats>,
    config: Array<MapData, Config>,
}

pub(crate) fn open(dir: &Path, name: &str) -> anyhow::Result<MapData> {
    let path = dir.join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {} (is the datapath installed? run `proxy-agent run`)",
            path.display()
        )
    })
}

impl Maps {
    pub fn open_pinned(dir: &Path) -> anyhow::Result<Maps> {
        Ok(Maps {
            services: HashMap::try_from(Map::HashMap(open(dir, map_names::SERVICES)?))?,
            slots: HashMap::try_from(Map::HashMap(open(dir, map_names::BACKEND_SLOTS)?))?,
            backends: HashMap::try_from(Map::HashMap(open(dir, map_names::BACKENDS)?))?,
            revnats: HashMap::try_from(Map::HashMap(open(dir, map_names::REVNAT)?))?,
            stats: PerCpuHashMap::try_from(Map::PerCpuHashMap(open(dir, map_names::STATS)?))?,
            config: Array::try_from(Map::Array(open(dir, map_names::CONFIG)?))?,
        })
    }

    /// Everything the translation maps hold right now.
    pub fn read(&self) -> anyhow::Result<MapState> {
        Ok(MapState::from_entries(
            self.services
                .iter()
                .collect::<Result<_, _>>()
                .context("reading SERVICES")?,
            self.slots
                .iter()
                .collect::<Result<_, _>>()
                .context("reading BACKEND_SLOTS")?,
            self.backends
                .iter()
                .collect::<Result<_, _>>()
                .context("reading BACKENDS")?,
            self.revnats
                .iter()
                .collect::<Result<_, _>>()
                .context("reading REVNAT")?,
            self.stats
                .keys()
                .collect::<Result<_, _>>()
                .context("reading STATS")?,
        ))
    }

    pub fn write(&mut self, write: &MapWrite) -> Result<(), WriteError> {
        let (map, result) = match *write {
            MapWrite::PutBackend(id, backend) => {
                (map_names::BACKENDS, self.backends.insert(id, backend, 0))
            }
            MapWrite::PutSlot(key, id) => (map_names::BACKEND_SLOTS, self.slots.insert(key, id, 0)),
            MapWrite::PutRevNat(id, revnat) => {
                (map_names::REVNAT, self.revnats.insert(id, revnat, 0))
            }
            MapWrite::PutService(key, value) => {
                (map_names::SERVICES, self.services.insert(key, value, 0))
            }
            MapWrite::DeleteService(key) => (
                map_names::SERVICES,
                ignore_missing(self.services.remove(&key)),
            ),
            MapWrite::DeleteSlot(key) => (
                map_names::BACKEND_SLOTS,
                ignore_missing(self.slots.remove(&key)),
            ),
            MapWrite::DeleteBackend(id) => (
                map_names::BACKENDS,
                ignore_missing(self.backends.remove(&id)),
            ),
            MapWrite::DeleteRevNat(id) => {
                (map_names::REVNAT, ignore_missing(self.revnats.remove(&id)))
            }
            MapWrite::PutStats(svc_id) => (
                map_names::STATS,
                zero_stats().and_then(|zero| self.stats.insert(svc_id, zero, 0)),
            ),
            MapWrite::DeleteStats(svc_id) => {
                (map_names::STATS, ignore_missing(self.stats.remove(&svc_id)))
            }
        };
        result.map_err(|source| WriteError { map, source })
    }

    pub fn write_config(&mut self, config: Config) -> anyhow::Result<()> {
        self.config.set(0, config, 0).context("writing CONFIG")
    }
}

/// A `STATS` value of zeroes: one for each CPU the kernel may ever bring online.
fn zero_stats() -> Result<PerCpuValues<ServiceStats>, MapError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, io_error)| SyscallError {
        call: "reading /sys/devices/system/cpu/possible",
        io_error,
    })?;
    PerCpuValues::try_from(vec![ServiceStats::default(); cpus]).map_err(|io_error| {
        MapError::from(SyscallError {
            call: "bpf_map_update_elem",
            io_error,
        })
    })
}

/// Deleting what is already gone reaches the state the delete wanted.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

/// A write the kernel refused; a full map is the usual cause.
#[derive(Debug, thiserror::Error)]
#[error("writing {map}: {source} (a full map? its size is a flag of `proxy-agent run`)")]
pub struct WriteError {
    pub map: &'static str,
    #[source]
    pub source: MapError,
}
