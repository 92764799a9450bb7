//! The maps, pinned by name so they outlive the agent and are adopted by the next one. Sizes are
//! defaults; the agent may override them at load time.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuHashMap},
};
use proxy_common::{
    AffinityKey, AffinityValue, Backend, Config, CtKey, CtValue, RevNat, ServiceKey, ServiceStats,
    ServiceValue, SlotKey, map_sizes,
};

#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(map_sizes::SERVICES, 0);

#[map]
pub static BACKEND_SLOTS: HashMap<SlotKey, u32> = HashMap::pinned(map_sizes::BACKEND_SLOTS, 0);

#[map]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(map_sizes::BACKENDS, 0);

#[map]
pub static REVNAT: HashMap<u32, RevNat> = HashMap::pinned(map_sizes::REVNAT, 0);

#[map]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(map_sizes::CONNTRACK, 0);

#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(map_sizes::AFFINITY, 0);

#[map]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

/// Per-CPU, so counting costs no atomic operation and no cache line shared between CPUs.
#[map]
pub static STATS: PerCpuHashMap<u32, ServiceStats> = PerCpuHashMap::pinned(map_sizes::STATS, 0);
