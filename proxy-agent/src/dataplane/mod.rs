//! `sync`: makes the pinned maps equal to a desired state, writing only the difference.
//!
//! The agent keeps a mirror of what the maps hold: read from the maps once at start (adoption of
//! what a previous agent left), then updated by every write the kernel accepts. A sync plans
//! against the mirror (pure) and applies the writes in order; if one fails (a full map), the
//! sync stops there, the maps are still consistent (every prefix of a plan is), and the next
//! sync plans again from what was really written.
//!
//! Two plans, one result: the first sync after adoption, and the first after a failure, plan
//! the whole state ([`plan::plan`]: it also sweeps what a crashed agent left). Every other sync
//! plans only the sets the compiler says changed ([`plan::plan_changes`]), so its cost follows
//! the change, not the cluster.
pub mod maps;
pub mod plan;

use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use crate::model::{DesiredState, ServicePortName, SetChange};
use maps::{Maps, WriteError};
use plan::{IdAllocator, MapState};

pub struct Dataplane {
    maps: Maps,
    mirror: MapState,
    ids: IdAllocator,
    /// The mirror may hold what no desired set explains (adopted, or a failed sync's writes).
    needs_full_plan: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    pub writes: usize,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("sync stopped after {applied} of {planned} map writes: {source}")]
pub struct SyncError {
    pub applied: usize,
    pub planned: usize,
    #[source]
    pub source: WriteError,
}

impl Dataplane {
    /// Takes over the maps as they are, including what a previous agent wrote.
    pub fn adopt(maps: Maps) -> anyhow::Result<Dataplane> {
        let mirror = maps.read()?;
        let ids = IdAllocator::after(&mirror);
        Ok(Dataplane {
            maps,
            mirror,
            ids,
            needs_full_plan: true,
        })
    }

    pub fn state(&self) -> &MapState {
        &self.mirror
    }

    /// Makes the maps equal to `desired`; `changes` are the sets that differ from the state the
    /// last sync was given.
    pub fn sync(
        &mut self,
        desired: &DesiredState,
        changes: &BTreeMap<ServicePortName, SetChange>,
    ) -> Result<SyncReport, SyncError> {
        let start = Instant::now();
        let writes = if self.needs_full_plan {
            plan::plan(&self.mirror, desired, &mut self.ids)
        } else {
            plan::plan_changes(&self.mirror, changes, &mut self.ids)
        };
        // Until this plan is applied in full, the next one cannot trust the mirror's story.
        self.needs_full_plan = true;
        for (applied, write) in writes.iter().enumerate() {
            self.maps.write(write).map_err(|source| SyncError {
                applied,
                planned: writes.len(),
                source,
            })?;
            self.mirror.apply(write);
        }
        self.needs_full_plan = false;
        Ok(SyncReport {
            writes: writes.len(),
            elapsed: start.elapsed(),
        })
    }
}
