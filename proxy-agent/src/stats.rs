//! Per-Service datapath counters and map fill levels, read from the pinned maps at each scrape.
//!
//! ```text
//! datapath: every packet to a frontend -> STATS[svc_id] on its CPU (packets, bytes, flows, ...)
//! syncer:   each changed Service port  -> ServicePorts: first frontend -> Service port name
//!           each sync                  -> entries of the maps it mirrors
//! scrape:   Service port name -> SERVICES[frontend].svc_id -> STATS[svc_id] summed over CPUs
//! ```
//!
//! The `svc_id` is the dataplane's to hand out, so nothing here keeps one: the scrape finds each
//! set's id through its frontend, the same lookup a packet makes. A Service port that is not
//! programmed (a full map, a sync still to come) is not reported. Counters start at zero with
//! their set and go with it (see `dataplane::plan`), as Prometheus expects of a series.
//!
//! A scrape costs two map lookups per Service port and a walk over the conntrack and affinity
//! keys to count them (bounded by their capacities); the metrics server runs it off the async
//! workers.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use aya::maps::{HashMap, Map, MapData, PerCpuHashMap};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use proxy_common::{
    AffinityKey, AffinityValue, CtKey, CtValue, ServiceKey, ServiceStats, ServiceValue, map_names,
};

use crate::dataplane::maps::open;
use crate::dataplane::plan::{MapState, service_key};
use crate::loader::MapSizes;
use crate::model::{Protocol, ServicePortName, SetChange};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServicePortLabels {
    namespace: String,
    service: String,
    /// The Service port's name ("" for a single unnamed port).
    port: String,
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: &'static str,
}

/// The maps whose entries the syncer counts from its mirror (the others are walked at scrape).
const MIRRORED: [&str; 5] = [
    map_names::SERVICES,
    map_names::BACKEND_SLOTS,
    map_names::BACKENDS,
    map_names::REVNAT,
    map_names::STATS,
];

pub struct DatapathMetrics {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    stats: PerCpuHashMap<MapData, u32, ServiceStats>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    /// Each desired Service port, by the first frontend of its set.
    ports: Mutex<BTreeMap<ServiceKey, ServicePortName>>,
    /// Entries of the [`MIRRORED`] maps after the last sync, in that order.
    mirrored: [AtomicU64; MIRRORED.len()],
    capacities: Vec<(&'static str, u32)>,
}

impl std::fmt::Debug for DatapathMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathMetrics").finish_non_exhaustive()
    }
}

impl DatapathMetrics {
    /// Opens the pinned maps of the datapath in `dir`, loaded with `sizes`.
    pub fn open(dir: &Path, sizes: &MapSizes) -> anyhow::Result<DatapathMetrics> {
        Ok(DatapathMetrics {
            services: HashMap::try_from(Map::HashMap(open(dir, map_names::SERVICES)?))?,
            stats: PerCpuHashMap::try_from(Map::PerCpuHashMap(open(dir, map_names::STATS)?))?,
            conntrack: HashMap::try_from(Map::LruHashMap(open(dir, map_names::CONNTRACK)?))?,
            affinity: HashMap::try_from(Map::LruHashMap(open(dir, map_names::AFFINITY)?))?,
            ports: Mutex::default(),
            mirrored: Default::default(),
            capacities: sizes.capacities(),
        })
    }

    /// Follows the Service ports a sync was given (`changes`, as the compiler reports them) and
    /// the map fill levels it left (`state`).
    pub fn record_sync(&self, changes: &BTreeMap<ServicePortName, SetChange>, state: &MapState) {
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        for (name, change) in changes {
            let first_frontend = |set: &Option<crate::model::BackendSet>| {
                set.as_ref()
                    .and_then(|set| set.frontends.first().map(service_key))
            };
            if let Some(old) = first_frontend(&change.old) {
                ports.remove(&old);
            }
            if let Some(new) = first_frontend(&change.new) {
                ports.insert(new, name.clone());
            }
        }
        let entries = [
            state.services().len(),
            state.slots().len(),
            state.backends().len(),
            state.revnats().len(),
            state.stats().len(),
        ];
        for (gauge, entries) in self.mirrored.iter().zip(entries) {
            gauge.store(entries as u64, Ordering::Relaxed);
        }
    }

    /// Each programmed Service port with its counters summed over the CPUs.
    fn service_counters(&self) -> Vec<(ServicePortLabels, ServiceStats)> {
        // Copied out, so a sync never waits for a scrape's system calls.
        let ports: Vec<(ServiceKey, ServicePortName)> = {
            let ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
            ports.iter().map(|(k, v)| (*k, v.clone())).collect()
        };
        ports
            .into_iter()
            .filter_map(|(frontend, name)| {
                let value = self.services.get(&frontend, 0).ok()?;
                let per_cpu = self.stats.get(&value.svc_id, 0).ok()?;
                Some((labels(&name), sum(per_cpu.iter())))
            })
            .collect()
    }
}

fn labels(name: &ServicePortName) -> ServicePortLabels {
    ServicePortLabels {
        namespace: name.service.namespace.clone(),
        service: name.service.name.clone(),
        port: name.port_name.clone(),
        protocol: match name.protocol {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        },
    }
}

/// One set's counters over all CPUs.
fn sum<'a>(per_cpu: impl Iterator<Item = &'a ServiceStats>) -> ServiceStats {
    per_cpu.fold(ServiceStats::default(), |total, cpu| ServiceStats {
        packets: total.packets + cpu.packets,
        bytes: total.bytes + cpu.bytes,
        flows: total.flows + cpu.flows,
        refused: total.refused + cpu.refused,
        affinity_hits: total.affinity_hits + cpu.affinity_hits,
    })
}

/// One per-Service counter family: its name, help, and the field it reports.
struct CounterFamily {
    name: &'static str,
    help: &'static str,
    value: fn(&ServiceStats) -> u64,
}

const SERVICE_COUNTERS: [CounterFamily; 5] = [
    CounterFamily {
        name: "service_packets",
        help: "Packets sent to the Service port's frontends (client to Service direction)",
        value: |s| s.packets,
    },
    CounterFamily {
        name: "service_bytes",
        help: "Bytes of those packets, as seen at TC (L2 header included)",
        value: |s| s.bytes,
    },
    CounterFamily {
        name: "service_flows",
        help: "New flows given a backend of the Service port",
        value: |s| s.flows,
    },
    CounterFamily {
        name: "service_refused_flows",
        help: "New flows refused because the Service port had no backend (TCP RST / ICMP \
               unreachable)",
        value: |s| s.refused,
    },
    CounterFamily {
        name: "service_affinity_hits",
        help: "New flows sent to the client's remembered backend (sessionAffinity: ClientIP)",
        value: |s| s.affinity_hits,
    },
];

impl Collector for DatapathMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = self.service_counters();
        for counter in &SERVICE_COUNTERS {
            let mut family = encoder.encode_descriptor(
                counter.name,
                counter.help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (labels, stats) in &counters {
                ConstCounter::new((counter.value)(stats)).encode(family.encode_family(labels)?)?;
            }
        }

        let mut entries = encoder.encode_descriptor(
            "map_entries",
            "Entries in each datapath map",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        let walked = [
            (map_names::CONNTRACK, self.conntrack.keys().count()),
            (map_names::AFFINITY, self.affinity.keys().count()),
        ];
        let mirrored = MIRRORED
            .iter()
            .zip(&self.mirrored)
            .map(|(map, gauge)| (*map, gauge.load(Ordering::Relaxed) as usize));
        for (map, count) in mirrored.chain(walked) {
            ConstGauge::new(count as i64).encode(entries.encode_family(&MapLabel { map })?)?;
        }
        let mut capacity = encoder.encode_descriptor(
            "map_capacity",
            "Maximum entries of each datapath map (see the --map-size-* flags)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for &(map, max) in &self.capacities {
            ConstGauge::new(i64::from(max)).encode(capacity.encode_family(&MapLabel { map })?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up_over_cpus() {
        let cpu = |n| ServiceStats {
            packets: n,
            bytes: 100 * n,
            flows: 1,
            refused: 0,
            affinity_hits: n % 2,
        };
        let per_cpu = [cpu(1), cpu(2), cpu(3)];
        assert_eq!(
            sum(per_cpu.iter()),
            ServiceStats {
                packets: 6,
                bytes: 600,
                flows: 3,
                refused: 0,
                affinity_hits: 2,
            }
        );
    }
}
