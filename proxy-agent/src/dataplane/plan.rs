//! The pure half of sync: from what the maps hold and what they should hold, the ordered list of
//! map writes that turns one into the other.
//!
//! Invariant, after every single write (so a packet never sees a half-updated state): each
//! `SERVICES` entry names a `REVNAT` entry and, for every slot below its `backend_count`, a
//! `BACKEND_SLOTS` entry of its generation that names an existing `BACKENDS` entry. The order
//! that keeps it:
//!
//! 0. deletes of orphans, slots, backends and revnat entries no frontend reaches now and none
//!    will (what a failed or crashed sync left): first, so a nearly full map has room for the
//!    puts;
//! 1. `BACKENDS` puts (new and changed backends);
//! 2. `BACKEND_SLOTS` puts of new generations (the old generation stays readable);
//! 3. `REVNAT` puts, and `STATS` entries (zeroed) for new sets;
//! 4. `SERVICES` puts: one update per frontend flips it to the new generation;
//! 5. `SERVICES` deletes, then 6. slot, 7. backend, 8. revnat and 9. `STATS` deletes of what
//!    nothing names.
//!
//! `STATS` is not needed for translation, but creating a set's counters before its first
//! frontend and deleting them after its last means every packet a frontend takes is counted, and
//! a set's counters never survive it (a new set starts at zero).
//!
//! Ids: a backend set keeps the `svc_id` its frontends already have in the maps, and a backend
//! keeps its id while its address stays in the set (orphans of the set included), so conntrack
//! and affinity entries stay valid across syncs and agent restarts (the ids are read back from
//! the pinned maps). New ids are never reused while the agent runs; a later agent may reuse an
//! id it cannot see, which the datapath guards against by checking each backend's owner.
//! A new generation is above every generation of the set in the maps, so no frontend, even one
//! a crashed sync left on an older generation, ever reads slots while they are written.
//!
//! Everything not reachable from a desired frontend is deleted: that is also the sweep that
//! removes what a crashed sync or a deleted Service left behind.

use std::collections::{BTreeMap, BTreeSet};

use proxy_common::{
    BACKEND_F_LOCAL, BACKEND_F_TERMINATING, Backend, RevNat, SCOPE_INTERNAL, ServiceKey,
    ServiceValue, SlotKey, ipv4, port,
};

use crate::model::{BackendSet, DesiredState, Frontend, Protocol, ServicePortName, SetChange};

/// The contents of the translation maps (conntrack and affinity are the datapath's own), with
/// an index of backends by owning set kept up to date by [`MapState::apply`], so a plan finds a
/// set's backends without scanning every backend of the node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    services: BTreeMap<ServiceKey, ServiceValue>,
    slots: BTreeMap<SlotKey, u32>,
    backends: BTreeMap<u32, Backend>,
    revnats: BTreeMap<u32, RevNat>,
    /// The sets with a `STATS` entry (the counts are the datapath's, never mirrored).
    stats: BTreeSet<u32>,
    /// svc_id -> (address, port) -> backend id.
    owned: BTreeMap<u32, BTreeMap<(u32, u16), u32>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapWrite {
    PutBackend(u32, Backend),
    PutSlot(SlotKey, u32),
    PutRevNat(u32, RevNat),
    PutService(ServiceKey, ServiceValue),
    DeleteService(ServiceKey),
    DeleteSlot(SlotKey),
    DeleteBackend(u32),
    DeleteRevNat(u32),
    /// Creates (or resets) the set's `STATS` entry: zero on every CPU.
    PutStats(u32),
    DeleteStats(u32),
}

impl MapState {
    /// A state read back from the maps.
    pub fn from_entries(
        services: BTreeMap<ServiceKey, ServiceValue>,
        slots: BTreeMap<SlotKey, u32>,
        backends: BTreeMap<u32, Backend>,
        revnats: BTreeMap<u32, RevNat>,
        stats: BTreeSet<u32>,
    ) -> MapState {
        let mut state = MapState {
            services,
            slots,
            revnats,
            stats,
            ..MapState::default()
        };
        for (id, backend) in backends {
            state.apply(&MapWrite::PutBackend(id, backend));
        }
        state
    }

    pub fn services(&self) -> &BTreeMap<ServiceKey, ServiceValue> {
        &self.services
    }

    pub fn slots(&self) -> &BTreeMap<SlotKey, u32> {
        &self.slots
    }

    pub fn backends(&self) -> &BTreeMap<u32, Backend> {
        &self.backends
    }

    pub fn revnats(&self) -> &BTreeMap<u32, RevNat> {
        &self.revnats
    }

    pub fn stats(&self) -> &BTreeSet<u32> {
        &self.stats
    }

    /// Mirrors one write that the kernel accepted.
    pub fn apply(&mut self, write: &MapWrite) {
        match *write {
            MapWrite::PutBackend(id, backend) => {
                if let Some(old) = self.backends.insert(id, backend) {
                    self.forget_owner(id, &old);
                }
                let by_addr = self.owned.entry(backend.svc_id).or_default();
                by_addr.insert((backend.addr, backend.port), id);
            }
            MapWrite::PutSlot(key, id) => drop(self.slots.insert(key, id)),
            MapWrite::PutRevNat(id, revnat) => drop(self.revnats.insert(id, revnat)),
            MapWrite::PutService(key, value) => drop(self.services.insert(key, value)),
            MapWrite::DeleteService(key) => drop(self.services.remove(&key)),
            MapWrite::DeleteSlot(key) => drop(self.slots.remove(&key)),
            MapWrite::DeleteBackend(id) => {
                if let Some(old) = self.backends.remove(&id) {
                    self.forget_owner(id, &old);
                }
            }
            MapWrite::DeleteRevNat(id) => drop(self.revnats.remove(&id)),
            MapWrite::PutStats(svc_id) => drop(self.stats.insert(svc_id)),
            MapWrite::DeleteStats(svc_id) => drop(self.stats.remove(&svc_id)),
        }
    }

    fn forget_owner(&mut self, id: u32, backend: &Backend) {
        if let Some(by_addr) = self.owned.get_mut(&backend.svc_id) {
            if by_addr.get(&(backend.addr, backend.port)) == Some(&id) {
                by_addr.remove(&(backend.addr, backend.port));
            }
            if by_addr.is_empty() {
                self.owned.remove(&backend.svc_id);
            }
        }
    }

    /// The highest generation the maps give set `svc_id`: its frontends' and its slots'.
    fn top_generation(&self, svc_id: u32, frontends: impl Iterator<Item = u32>) -> Option<u32> {
        self.slots
            .range(slots_of(svc_id))
            .map(|(key, _)| key.generation)
            .chain(frontends)
            .max()
    }

    /// The slots and backends some frontend reaches now.
    fn reachable(&self) -> (BTreeSet<SlotKey>, BTreeSet<u32>) {
        let mut slots = BTreeSet::new();
        let mut backends = BTreeSet::new();
        for value in self.services.values() {
            for slot in 0..value.backend_count {
                let key = SlotKey {
                    svc_id: value.svc_id,
                    generation: value.generation,
                    slot,
                };
                if let Some(id) = self.slots.get(&key) {
                    slots.insert(key);
                    backends.insert(*id);
                }
            }
        }
        (slots, backends)
    }

    /// The backend ids a frontend's current generation serves, in slot order; `None` if a slot
    /// is missing (a state no sync leaves behind: the set is then rewritten whole).
    fn serving(&self, value: &ServiceValue) -> Option<Vec<u32>> {
        (0..value.backend_count)
            .map(|slot| {
                let key = SlotKey {
                    svc_id: value.svc_id,
                    generation: value.generation,
                    slot,
                };
                self.slots.get(&key).copied()
            })
            .collect()
    }
}

/// Every slot key of set `svc_id`, all generations (slot keys sort by set first).
fn slots_of(svc_id: u32) -> std::ops::RangeInclusive<SlotKey> {
    let first = SlotKey {
        svc_id,
        generation: 0,
        slot: 0,
    };
    let last = SlotKey {
        svc_id,
        generation: u32::MAX,
        slot: u32::MAX,
    };
    first..=last
}

/// Allocates ids above every id found in the maps, so none is reused while the agent runs.
/// Id 0 is never handed out (it reads as "unset" in a zeroed value).
#[derive(Clone, Debug)]
pub struct IdAllocator {
    next_svc: u32,
    next_backend: u32,
    next_revnat: u32,
}

impl IdAllocator {
    pub fn after(state: &MapState) -> IdAllocator {
        let max_svc = state.services.values().map(|v| v.svc_id);
        let max_slot_svc = state.slots.keys().map(|k| k.svc_id);
        let max_owner = state.backends.values().map(|b| b.svc_id);
        let max_stats = state.stats.iter().copied();
        let max_backend = state
            .backends
            .keys()
            .copied()
            .chain(state.slots.values().copied());
        let max_revnat = state
            .revnats
            .keys()
            .copied()
            .chain(state.services.values().map(|v| v.revnat_id));
        IdAllocator {
            next_svc: max_svc
                .chain(max_slot_svc)
                .chain(max_owner)
                .chain(max_stats)
                .max()
                .unwrap_or(0)
                .wrapping_add(1)
                .max(1),
            next_backend: max_backend.max().unwrap_or(0).wrapping_add(1).max(1),
            next_revnat: max_revnat.max().unwrap_or(0).wrapping_add(1).max(1),
        }
    }

    fn take(next: &mut u32) -> u32 {
        let id = *next;
        // 2^32 allocations before a wrap: far beyond any agent's lifetime.
        *next = next.wrapping_add(1).max(1);
        id
    }
}

pub fn service_key(frontend: &Frontend) -> ServiceKey {
    ServiceKey {
        addr: ipv4(frontend.addr),
        port: port(frontend.port),
        proto: match frontend.protocol {
            Protocol::Tcp => proxy_common::IPPROTO_TCP,
            Protocol::Udp => proxy_common::IPPROTO_UDP,
        },
        scope: SCOPE_INTERNAL,
    }
}

/// The writes of one plan by kind, in the order they are applied (see the module docs).
#[derive(Default)]
struct Writes {
    orphan_deletes: Vec<MapWrite>,
    backend_puts: Vec<MapWrite>,
    slot_puts: Vec<MapWrite>,
    revnat_puts: Vec<MapWrite>,
    stats_puts: Vec<MapWrite>,
    service_puts: Vec<MapWrite>,
    service_deletes: Vec<MapWrite>,
    slot_deletes: Vec<MapWrite>,
    backend_deletes: Vec<MapWrite>,
    revnat_deletes: Vec<MapWrite>,
    stats_deletes: Vec<MapWrite>,
}

impl Writes {
    fn into_vec(self) -> Vec<MapWrite> {
        [
            self.orphan_deletes,
            self.backend_puts,
            self.slot_puts,
            self.revnat_puts,
            self.stats_puts,
            self.service_puts,
            self.service_deletes,
            self.slot_deletes,
            self.backend_deletes,
            self.revnat_deletes,
            self.stats_deletes,
        ]
        .concat()
    }
}

/// Everything the desired sets keep, so nothing they use is deleted or given to another set.
#[derive(Default)]
struct Live {
    svc_ids: BTreeSet<u32>,
    slots: BTreeSet<SlotKey>,
    backends: BTreeSet<u32>,
    revnats: BTreeSet<u32>,
    services: BTreeSet<ServiceKey>,
}

/// The ordered writes that turn `current` into `desired` (see the module docs for the order).
pub fn plan(current: &MapState, desired: &DesiredState, ids: &mut IdAllocator) -> Vec<MapWrite> {
    let mut writes = Writes::default();
    let mut live = Live::default();
    for set in desired.backend_sets.values() {
        plan_set(current, set, ids, &mut live, &mut writes);
    }

    let (reachable_slots, reachable_backends) = current.reachable();
    let unreachable_slot = |key: &&SlotKey| !reachable_slots.contains(*key);
    let unreachable_backend = |id: &&u32| !reachable_backends.contains(*id);
    let dead_slots = current
        .slots
        .keys()
        .filter(|key| !live.slots.contains(*key));
    let dead_backends = current
        .backends
        .keys()
        .filter(|id| !live.backends.contains(*id));
    // A revnat entry no frontend names is never reused (a frontend keeps its own through its
    // SERVICES entry): it can go first too.
    let named_revnats: BTreeSet<u32> = current.services.values().map(|v| v.revnat_id).collect();
    let orphan_revnats = current
        .revnats
        .keys()
        .filter(|id| !named_revnats.contains(*id));
    writes.orphan_deletes = dead_slots
        .clone()
        .filter(unreachable_slot)
        .map(|key| MapWrite::DeleteSlot(*key))
        .chain(
            dead_backends
                .clone()
                .filter(unreachable_backend)
                .map(|id| MapWrite::DeleteBackend(*id)),
        )
        .chain(orphan_revnats.map(|id| MapWrite::DeleteRevNat(*id)))
        .collect();
    writes.service_deletes = current
        .services
        .keys()
        .filter(|key| !live.services.contains(*key))
        .map(|key| MapWrite::DeleteService(*key))
        .collect();
    writes.slot_deletes = dead_slots
        .filter(|key| !unreachable_slot(key))
        .map(|key| MapWrite::DeleteSlot(*key))
        .collect();
    writes.backend_deletes = dead_backends
        .filter(|id| !unreachable_backend(id))
        .map(|id| MapWrite::DeleteBackend(*id))
        .collect();
    writes.revnat_deletes = current
        .revnats
        .keys()
        .filter(|id| named_revnats.contains(*id) && !live.revnats.contains(*id))
        .map(|id| MapWrite::DeleteRevNat(*id))
        .collect();
    writes.stats_deletes = current
        .stats
        .iter()
        .filter(|svc_id| !live.svc_ids.contains(*svc_id))
        .map(|svc_id| MapWrite::DeleteStats(*svc_id))
        .collect();
    writes.into_vec()
}

/// The ordered writes for the sets in `changes` alone, when `current` is what an earlier plan
/// made (no orphans: after a start or a failed sync, use [`plan`]). Everything else keeps its
/// ids and entries; deletes stay within the frontends and sets the changes touch. Costs the
/// size of the changes, plus a pass over the frontends to know which set ids are taken.
pub fn plan_changes(
    current: &MapState,
    changes: &BTreeMap<ServicePortName, SetChange>,
    ids: &mut IdAllocator,
) -> Vec<MapWrite> {
    let touched: BTreeSet<ServiceKey> = changes
        .values()
        .flat_map(|change| change.old.iter().chain(&change.new))
        .flat_map(|set| set.frontends.iter().map(service_key))
        .collect();
    let mut writes = Writes::default();
    let mut live = Live::default();
    // The frontends the changes do not touch keep their sets' ids and revnat entries.
    for (key, value) in &current.services {
        if !touched.contains(key) {
            live.svc_ids.insert(value.svc_id);
            live.revnats.insert(value.revnat_id);
        }
    }
    let untouched_svc_ids = live.svc_ids.clone();
    let mut planned_svc_ids = BTreeSet::new();
    for set in changes.values().filter_map(|change| change.new.as_ref()) {
        planned_svc_ids.insert(plan_set(current, set, ids, &mut live, &mut writes));
    }

    let touched_values: Vec<&ServiceValue> = touched
        .iter()
        .filter_map(|key| current.services.get(key))
        .collect();
    let touched_svc_ids = touched_values
        .iter()
        .map(|value| value.svc_id)
        .chain(planned_svc_ids)
        .filter(|svc_id| !untouched_svc_ids.contains(svc_id))
        .collect::<BTreeSet<u32>>();
    let dead_svc_ids: Vec<u32> = touched_svc_ids
        .iter()
        .copied()
        .filter(|svc_id| !live.svc_ids.contains(svc_id))
        .collect();
    writes.service_deletes = touched
        .iter()
        .filter(|key| current.services.contains_key(*key) && !live.services.contains(*key))
        .map(|key| MapWrite::DeleteService(*key))
        .collect();
    for svc_id in touched_svc_ids {
        let dead_slots = current
            .slots
            .range(slots_of(svc_id))
            .map(|(key, _)| key)
            .filter(|key| !live.slots.contains(*key));
        writes
            .slot_deletes
            .extend(dead_slots.map(|key| MapWrite::DeleteSlot(*key)));
        let owned = current
            .owned
            .get(&svc_id)
            .into_iter()
            .flat_map(BTreeMap::values);
        let dead_backends = owned.filter(|id| !live.backends.contains(*id));
        writes
            .backend_deletes
            .extend(dead_backends.map(|id| MapWrite::DeleteBackend(*id)));
    }
    let dead_revnats: BTreeSet<u32> = touched_values
        .iter()
        .map(|value| value.revnat_id)
        .filter(|id| current.revnats.contains_key(id) && !live.revnats.contains(id))
        .collect();
    writes.revnat_deletes = dead_revnats
        .into_iter()
        .map(MapWrite::DeleteRevNat)
        .collect();
    writes.stats_deletes = dead_svc_ids
        .into_iter()
        .filter(|svc_id| current.stats.contains(svc_id))
        .map(MapWrite::DeleteStats)
        .collect();
    writes.into_vec()
}

/// Plans one desired set: its backends, slots, revnat entries and frontends. Returns its svc_id.
fn plan_set(
    current: &MapState,
    set: &BackendSet,
    ids: &mut IdAllocator,
    live: &mut Live,
    writes: &mut Writes,
) -> u32 {
    // Keep the set's id (and so its slots and affinity) if one of its frontends has it.
    let existing = set
        .frontends
        .iter()
        .filter_map(|frontend| current.services.get(&service_key(frontend)))
        .find(|value| !live.svc_ids.contains(&value.svc_id));
    let svc_id = existing.map_or_else(|| IdAllocator::take(&mut ids.next_svc), |v| v.svc_id);
    live.svc_ids.insert(svc_id);
    if !current.stats.contains(&svc_id) {
        writes.stats_puts.push(MapWrite::PutStats(svc_id));
    }
    let serving = existing.and_then(|value| Some((value.generation, current.serving(value)?)));

    // A backend keeps its id while its address stays in the set.
    let no_backends = BTreeMap::new();
    let known = current.owned.get(&svc_id).unwrap_or(&no_backends);
    let mut backend_ids = Vec::with_capacity(set.endpoints.len());
    for (endpoint, info) in &set.endpoints {
        let backend = Backend {
            addr: ipv4(*endpoint.ip()),
            port: port(endpoint.port()),
            flags: (if info.terminating {
                BACKEND_F_TERMINATING
            } else {
                0
            }) | (if info.local { BACKEND_F_LOCAL } else { 0 }),
            _pad: 0,
            svc_id,
        };
        let id = known
            .get(&(backend.addr, backend.port))
            .copied()
            .unwrap_or_else(|| IdAllocator::take(&mut ids.next_backend));
        if current.backends.get(&id) != Some(&backend) {
            writes.backend_puts.push(MapWrite::PutBackend(id, backend));
        }
        live.backends.insert(id);
        backend_ids.push(id);
    }

    let generation = match &serving {
        Some((generation, serving_ids)) if *serving_ids == backend_ids => *generation,
        _ => {
            // Write the set under a generation nothing in the maps uses.
            let frontend_generations = set
                .frontends
                .iter()
                .filter_map(|frontend| current.services.get(&service_key(frontend)))
                .filter(|value| value.svc_id == svc_id)
                .map(|value| value.generation);
            let generation = current
                .top_generation(svc_id, frontend_generations)
                .map_or(1, |g| g.wrapping_add(1));
            for (slot, id) in (0u32..).zip(&backend_ids) {
                let key = SlotKey {
                    svc_id,
                    generation,
                    slot,
                };
                if current.slots.get(&key) != Some(id) {
                    writes.slot_puts.push(MapWrite::PutSlot(key, *id));
                }
            }
            generation
        }
    };
    for slot in (0u32..).take(backend_ids.len()) {
        live.slots.insert(SlotKey {
            svc_id,
            generation,
            slot,
        });
    }

    for frontend in &set.frontends {
        let key = service_key(frontend);
        let revnat = RevNat {
            addr: key.addr,
            port: key.port,
            _pad: 0,
        };
        let current_value = current.services.get(&key);
        let revnat_id = current_value
            .map(|value| value.revnat_id)
            .filter(|id| current.revnats.get(id) == Some(&revnat) && !live.revnats.contains(id))
            .unwrap_or_else(|| {
                let id = IdAllocator::take(&mut ids.next_revnat);
                writes.revnat_puts.push(MapWrite::PutRevNat(id, revnat));
                id
            });
        live.revnats.insert(revnat_id);
        let value = ServiceValue {
            svc_id,
            backend_count: backend_ids.len() as u32,
            generation,
            affinity_timeout_s: set.affinity_timeout_s.unwrap_or(0),
            revnat_id,
            flags: 0,
        };
        if current_value != Some(&value) {
            writes.service_puts.push(MapWrite::PutService(key, value));
        }
        live.services.insert(key);
    }
    svc_id
}

#[cfg(test)]
mod tests;
