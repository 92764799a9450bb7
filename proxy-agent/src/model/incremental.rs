//! [`Compiler`]: [`compile`](super::compile) kept up to date one Service at a time.
//!
//! A change to one EndpointSlice must not cost a recompile of every Service of the cluster: the
//! compiler keeps each Service's output, and an update recompiles only the Services that the
//! changed objects touch (a Service, or the Service an EndpointSlice names now or named before).
//! The shared part, which Service owns a frontend two Services claim (the one that sorts
//! first), is decided again for the frontends those Services claim or claimed.
//!
//! Invariant: after any sequence of updates, [`Compiler::desired`] and [`Compiler::rejected`]
//! equal what `compile` makes of the same store (the table tests check `compile`, which is a
//! compiler's first update; `tests` checks the equality across updates). Each update reports
//! the backend sets it changed, old and new, which is what an incremental sync needs.
use std::collections::{BTreeMap, BTreeSet};

use super::compile::{Claim, ServiceOutput, compile_service, lost_frontend, owner_of};
use super::{
    BackendSet, DesiredState, Frontend, ObjectRef, Protocol, Rejection, ServicePortName,
    SliceRecord, Store,
};

/// What changed in the store since the last update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changes {
    /// Anything may have (the first update, a re-list, a reloaded manifest directory).
    All,
    /// Exactly these objects were added, changed or deleted.
    Objects {
        services: BTreeSet<ObjectRef>,
        slices: BTreeSet<ObjectRef>,
    },
}

/// One backend set before and after an update (`None`: absent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetChange {
    pub old: Option<BackendSet>,
    pub new: Option<BackendSet>,
}

pub struct Compiler {
    node_name: String,
    outputs: BTreeMap<ObjectRef, ServiceOutput>,
    /// Which Service each EndpointSlice belongs to, and the reverse.
    slice_owner: BTreeMap<ObjectRef, ObjectRef>,
    slices_of: BTreeMap<ObjectRef, SortedVec<ObjectRef>>,
    /// Every claim of a frontend, as (Service, port index, name); the first owns it: the Service
    /// that sorts first, and within a Service its first port.
    claims: BTreeMap<Frontend, SortedVec<(ObjectRef, usize, ServicePortName)>>,
    /// Claims that lost their frontend, by Service, for [`Compiler::rejected`].
    lost: BTreeMap<ObjectRef, BTreeMap<usize, Rejection>>,
    desired: DesiredState,
}

impl Compiler {
    pub fn new(node_name: &str) -> Compiler {
        Compiler {
            node_name: node_name.to_string(),
            outputs: BTreeMap::new(),
            slice_owner: BTreeMap::new(),
            slices_of: BTreeMap::new(),
            claims: BTreeMap::new(),
            lost: BTreeMap::new(),
            desired: DesiredState::default(),
        }
    }

    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// Everything currently wrong, in Service order (as `compile` reports it).
    pub fn rejected(&self) -> impl Iterator<Item = &Rejection> {
        let services: BTreeSet<&ObjectRef> = self.outputs.keys().chain(self.lost.keys()).collect();
        services.into_iter().flat_map(|service| {
            let own = self
                .outputs
                .get(service)
                .into_iter()
                .flat_map(|out| &out.rejected);
            own.chain(
                self.lost
                    .get(service)
                    .into_iter()
                    .flat_map(BTreeMap::values),
            )
        })
    }

    /// Brings the compiled state up to date with `store` and returns the sets that changed.
    pub fn update(
        &mut self,
        store: &Store,
        changes: &Changes,
    ) -> BTreeMap<ServicePortName, SetChange> {
        let dirty = self.dirty_services(store, changes);
        let mut touched_frontends = BTreeSet::new();
        for service in &dirty {
            if let Some(old) = self.outputs.remove(service) {
                for claim in &old.claims {
                    self.unclaim(claim);
                    touched_frontends.insert(claim.frontend);
                }
            }
            let Some(svc) = store.services.get(service) else {
                continue;
            };
            let slices = self
                .slices_of
                .get(service)
                .into_iter()
                .flatten()
                .filter_map(|slice_ref| store.endpoint_slices.get_key_value(slice_ref));
            let out = compile_service(service, svc, slices, &self.node_name);
            for claim in &out.claims {
                self.claims
                    .entry(claim.frontend)
                    .or_default()
                    .insert(claimant(claim));
                touched_frontends.insert(claim.frontend);
            }
            self.outputs.insert(service.clone(), out);
        }
        for service in &dirty {
            self.lost.remove(service);
        }
        self.decide(&touched_frontends, &dirty)
    }

    /// The Services whose output may differ after `changes`, with the slice index updated.
    fn dirty_services(&mut self, store: &Store, changes: &Changes) -> BTreeSet<ObjectRef> {
        match changes {
            Changes::All => {
                self.slice_owner.clear();
                self.slices_of.clear();
                for (slice_ref, slice) in &store.endpoint_slices {
                    self.index_slice(slice_ref, slice);
                }
                self.outputs
                    .keys()
                    .chain(store.services.keys())
                    .cloned()
                    .collect()
            }
            Changes::Objects { services, slices } => {
                let mut dirty = services.clone();
                for slice_ref in slices {
                    if let Some(before) = self.slice_owner.remove(slice_ref) {
                        if let Some(of) = self.slices_of.get_mut(&before) {
                            of.remove(slice_ref);
                            if of.is_empty() {
                                self.slices_of.remove(&before);
                            }
                        }
                        dirty.insert(before);
                    }
                    if let Some(slice) = store.endpoint_slices.get(slice_ref)
                        && let Some(owner) = self.index_slice(slice_ref, slice)
                    {
                        dirty.insert(owner);
                    }
                }
                dirty
            }
        }
    }

    fn index_slice(&mut self, slice_ref: &ObjectRef, slice: &SliceRecord) -> Option<ObjectRef> {
        let owner = owner_of(slice_ref, slice)?;
        self.slice_owner.insert(slice_ref.clone(), owner.clone());
        self.slices_of
            .entry(owner.clone())
            .or_default()
            .insert(slice_ref.clone());
        Some(owner)
    }

    fn unclaim(&mut self, claim: &Claim) {
        if let Some(claimants) = self.claims.get_mut(&claim.frontend) {
            claimants.remove(&claimant(claim));
            if claimants.is_empty() {
                self.claims.remove(&claim.frontend);
            }
        }
    }

    fn claim_of(&self, name: &ServicePortName) -> Option<&Claim> {
        self.outputs
            .get(&name.service)?
            .claims
            .iter()
            .find(|claim| &claim.name == name)
    }

    /// Gives each touched frontend to its first claimant and records the changed sets: those of
    /// the dirty Services and those whose frontends changed hands.
    fn decide(
        &mut self,
        frontends: &BTreeSet<Frontend>,
        dirty: &BTreeSet<ObjectRef>,
    ) -> BTreeMap<ServicePortName, SetChange> {
        let mut names = BTreeSet::new();
        for service in dirty {
            let first = ServicePortName {
                service: service.clone(),
                port_name: String::new(),
                protocol: Protocol::Tcp,
            };
            let of_service = self.desired.backend_sets.range(first..);
            names.extend(
                of_service
                    .map(|(name, _)| name)
                    .take_while(|name| &name.service == service)
                    .cloned(),
            );
        }
        for frontend in frontends {
            names.extend(
                self.claims
                    .get(frontend)
                    .into_iter()
                    .flatten()
                    .map(|(_, _, name)| name.clone()),
            );
        }
        for service in dirty {
            if let Some(out) = self.outputs.get(service) {
                names.extend(out.claims.iter().map(|claim| claim.name.clone()));
            }
        }
        let mut changed = BTreeMap::new();
        for name in names {
            let new = self.claim_of(&name).and_then(|claim| {
                let (_, _, owner) = self.claims.get(&claim.frontend)?.first()?;
                if owner == &name {
                    let mut set = claim.set.clone();
                    set.frontends.insert(claim.frontend);
                    Some(set)
                } else {
                    None
                }
            });
            if let Some(claim) = self.claim_of(&name).cloned() {
                let owner = self
                    .claims
                    .get(&claim.frontend)
                    .and_then(|c| c.first())
                    .map(|(_, _, owner)| owner.clone());
                let lost = self.lost.entry(name.service.clone()).or_default();
                match owner {
                    Some(owner) if owner != name => {
                        drop(lost.insert(claim.port_index, lost_frontend(&claim, &owner)))
                    }
                    _ => drop(lost.remove(&claim.port_index)),
                }
                if lost.is_empty() {
                    self.lost.remove(&name.service);
                }
            }
            let old = match &new {
                Some(set) => self.desired.backend_sets.insert(name.clone(), set.clone()),
                None => self.desired.backend_sets.remove(&name),
            };
            if old != new {
                changed.insert(name, SetChange { old, new });
            }
        }
        changed
    }
}

/// A small sorted set. Most frontends have one claimant and most Services one slice: a
/// `BTreeSet` would allocate room for eleven each time (1.5 KB for one claimant), which at
/// 10,000 Services was most of the compiler's memory.
#[derive(Clone, Debug)]
struct SortedVec<T>(Vec<T>);

impl<T> Default for SortedVec<T> {
    fn default() -> Self {
        SortedVec(Vec::new())
    }
}

impl<T: Ord> SortedVec<T> {
    fn insert(&mut self, value: T) {
        if let Err(position) = self.0.binary_search(&value) {
            self.0.insert(position, value);
        }
    }

    fn remove(&mut self, value: &T) {
        if let Ok(position) = self.0.binary_search(value) {
            self.0.remove(position);
        }
    }

    fn first(&self) -> Option<&T> {
        self.0.first()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a, T> IntoIterator for &'a SortedVec<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

fn claimant(claim: &Claim) -> (ObjectRef, usize, ServicePortName) {
    (
        claim.name.service.clone(),
        claim.port_index,
        claim.name.clone(),
    )
}

#[cfg(test)]
mod tests;
