//! Each case is a sequence of desired states planned from the state the previous step left.
//! Every write is applied to a mirror one at a time and the datapath invariant is checked after
//! each, so a bad write order fails here, not in a packet.
use std::net::{Ipv4Addr, SocketAddrV4};

use super::*;
use crate::model::{BackendSet, EndpointInfo, ObjectRef, ServicePortName};
use proxy_common::ipv4_addr;

fn name(service: &str) -> ServicePortName {
    ServicePortName {
        service: ObjectRef {
            namespace: "default".into(),
            name: service.into(),
        },
        port_name: String::new(),
        protocol: Protocol::Tcp,
    }
}

fn frontend(addr: [u8; 4], port: u16) -> Frontend {
    Frontend {
        addr: Ipv4Addr::from(addr),
        port,
        protocol: Protocol::Tcp,
    }
}

fn endpoint(last_octet: u8) -> (SocketAddrV4, EndpointInfo) {
    (
        SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, last_octet), 8080),
        EndpointInfo::default(),
    )
}

fn set(frontends: &[Frontend], endpoints: &[u8]) -> BackendSet {
    BackendSet {
        frontends: frontends.iter().copied().collect(),
        endpoints: endpoints.iter().map(|octet| endpoint(*octet)).collect(),
        affinity_timeout_s: None,
    }
}

fn desired(sets: &[(&str, BackendSet)]) -> DesiredState {
    DesiredState {
        backend_sets: sets.iter().map(|(n, s)| (name(n), s.clone())).collect(),
    }
}

/// The datapath's view: every frontend's slots and backends resolve, and its set is counted.
fn assert_consistent(state: &MapState, after: &MapWrite) {
    for (key, value) in &state.services {
        assert!(
            state.stats.contains(&value.svc_id),
            "{key:?} has no STATS entry after {after:?}"
        );
        assert!(
            state.revnats.contains_key(&value.revnat_id),
            "{key:?} lost its revnat after {after:?}"
        );
        let serving = state
            .serving(value)
            .unwrap_or_else(|| panic!("{key:?} has a missing slot after {after:?}"));
        for id in serving {
            assert!(
                state.backends.contains_key(&id),
                "{key:?} names missing backend {id} after {after:?}"
            );
        }
    }
}

/// What a packet to each frontend can reach: the map state read back as a desired state.
fn reachable(state: &MapState) -> BTreeMap<ServiceKey, BTreeSet<(u32, u16)>> {
    state
        .services
        .iter()
        .map(|(key, value)| {
            let backends = state.serving(value).unwrap().into_iter().map(|id| {
                let backend = state.backends[&id];
                (backend.addr, backend.port)
            });
            (*key, backends.collect())
        })
        .collect()
}

fn expected(desired: &DesiredState) -> BTreeMap<ServiceKey, BTreeSet<(u32, u16)>> {
    let mut out = BTreeMap::new();
    for set in desired.backend_sets.values() {
        for frontend in &set.frontends {
            let backends = set
                .endpoints
                .keys()
                .map(|e| (ipv4(*e.ip()), port(e.port())));
            out.insert(service_key(frontend), backends.collect());
        }
    }
    out
}

/// Plans and applies one step; returns the writes.
fn step(state: &mut MapState, ids: &mut IdAllocator, desired: &DesiredState) -> Vec<MapWrite> {
    let writes = plan(state, desired, ids);
    for write in &writes {
        state.apply(write);
        assert_consistent(state, write);
    }
    assert_eq!(reachable(state), expected(desired));
    assert_eq!(
        state.stats,
        state.services.values().map(|v| v.svc_id).collect(),
        "counters exist for the programmed sets, and only for them"
    );
    assert_eq!(
        plan(state, desired, ids),
        vec![],
        "a second plan must find nothing to do"
    );
    writes
}

const VIP: [u8; 4] = [10, 96, 0, 10];
const VIP2: [u8; 4] = [10, 96, 0, 13];

fn cases() -> Vec<(&'static str, Vec<DesiredState>)> {
    vec![
        (
            "create from empty",
            vec![desired(&[("a", set(&[frontend(VIP, 80)], &[1, 2, 3]))])],
        ),
        (
            "grow, shrink, empty, refill",
            vec![
                desired(&[("a", set(&[frontend(VIP, 80)], &[1, 2]))]),
                desired(&[("a", set(&[frontend(VIP, 80)], &[1, 2, 3]))]),
                desired(&[("a", set(&[frontend(VIP, 80)], &[3]))]),
                desired(&[("a", set(&[frontend(VIP, 80)], &[]))]),
                desired(&[("a", set(&[frontend(VIP, 80)], &[4, 5]))]),
            ],
        ),
        (
            "service deleted",
            vec![
                desired(&[
                    ("a", set(&[frontend(VIP, 80)], &[1])),
                    ("b", set(&[frontend(VIP2, 80)], &[2])),
                ]),
                desired(&[("b", set(&[frontend(VIP2, 80)], &[2]))]),
                desired(&[]),
            ],
        ),
        (
            "frontend moves to another service",
            vec![
                desired(&[("a", set(&[frontend(VIP, 80)], &[1]))]),
                desired(&[("b", set(&[frontend(VIP, 80)], &[2]))]),
            ],
        ),
        (
            "two frontends of one set split into two sets",
            vec![
                desired(&[("a", set(&[frontend(VIP, 80), frontend(VIP2, 80)], &[1, 2]))]),
                desired(&[
                    ("a", set(&[frontend(VIP, 80)], &[1, 2])),
                    ("b", set(&[frontend(VIP2, 80)], &[3])),
                ]),
            ],
        ),
    ]
}

#[test]
fn sequences_converge_and_stay_consistent_after_every_write() {
    for (case, steps) in cases() {
        let mut state = MapState::default();
        let mut ids = IdAllocator::after(&state);
        for (i, desired) in steps.iter().enumerate() {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                step(&mut state, &mut ids, desired);
            }));
            assert!(result.is_ok(), "case {case:?} failed at step {i}");
        }
    }
}

#[test]
fn planning_only_the_changed_sets_reaches_what_a_full_plan_reaches() {
    for (case, steps) in cases() {
        let (mut full, mut incremental) = (MapState::default(), MapState::default());
        let (mut full_ids, mut incremental_ids) =
            (IdAllocator::after(&full), IdAllocator::after(&incremental));
        let mut previous = DesiredState::default();
        for (i, desired) in steps.iter().enumerate() {
            step(&mut full, &mut full_ids, desired);
            let changes = desired.changes_from(&previous);
            for write in plan_changes(&incremental, &changes, &mut incremental_ids) {
                incremental.apply(&write);
                assert_consistent(&incremental, &write);
            }
            assert_eq!(incremental, full, "case {case:?} step {i}: the same maps");
            assert_eq!(
                plan(&incremental, desired, &mut incremental_ids),
                vec![],
                "case {case:?} step {i}: nothing left over"
            );
            previous = desired.clone();
        }
    }
}

#[test]
fn an_unchanged_state_writes_nothing() {
    let mut state = MapState::default();
    let mut ids = IdAllocator::after(&state);
    let d = desired(&[("a", set(&[frontend(VIP, 80)], &[1, 2]))]);
    step(&mut state, &mut ids, &d);
    assert_eq!(plan(&state, &d, &mut ids), vec![]);
}

#[test]
fn an_added_endpoint_keeps_ids_and_flips_the_generation_once() {
    let mut state = MapState::default();
    let mut ids = IdAllocator::after(&state);
    step(
        &mut state,
        &mut ids,
        &desired(&[("a", set(&[frontend(VIP, 80)], &[1, 2]))]),
    );
    let before = state.services[&service_key(&frontend(VIP, 80))];
    let kept: BTreeSet<u32> = state.backends.keys().copied().collect();

    let writes = step(
        &mut state,
        &mut ids,
        &desired(&[("a", set(&[frontend(VIP, 80)], &[1, 2, 3]))]),
    );
    let after = state.services[&service_key(&frontend(VIP, 80))];
    assert_eq!(
        after.svc_id, before.svc_id,
        "affinity state is keyed by svc_id"
    );
    assert_eq!(after.revnat_id, before.revnat_id);
    assert_eq!(after.generation, before.generation + 1);
    assert!(
        kept.iter().all(|id| state.backends.contains_key(id)),
        "kept endpoints keep their ids"
    );
    let service_puts = writes
        .iter()
        .filter(|w| matches!(w, MapWrite::PutService(..)))
        .count();
    assert_eq!(service_puts, 1, "one update flips the frontend: {writes:?}");
    // 1 new backend, 3 slots of the new generation, the flip, 2 old slots deleted.
    assert_eq!(writes.len(), 1 + 3 + 1 + 2, "{writes:?}");
}

#[test]
fn a_removed_endpoint_loses_its_backend_entry() {
    let mut state = MapState::default();
    let mut ids = IdAllocator::after(&state);
    step(
        &mut state,
        &mut ids,
        &desired(&[("a", set(&[frontend(VIP, 80)], &[1, 2]))]),
    );
    step(
        &mut state,
        &mut ids,
        &desired(&[("a", set(&[frontend(VIP, 80)], &[2]))]),
    );
    let addrs: Vec<u32> = state.backends.values().map(|b| b.addr).collect();
    assert_eq!(addrs, vec![ipv4(Ipv4Addr::new(10, 244, 1, 2))]);
}

#[test]
fn a_flag_change_updates_the_backend_in_place() {
    let mut state = MapState::default();
    let mut ids = IdAllocator::after(&state);
    let mut d = desired(&[("a", set(&[frontend(VIP, 80)], &[1]))]);
    step(&mut state, &mut ids, &d);
    for info in d
        .backend_sets
        .values_mut()
        .flat_map(|s| s.endpoints.values_mut())
    {
        info.terminating = true;
    }
    let writes = step(&mut state, &mut ids, &d);
    assert!(
        matches!(writes.as_slice(), [MapWrite::PutBackend(_, b)] if b.flags == BACKEND_F_TERMINATING),
        "{writes:?}"
    );
}

#[test]
fn an_affinity_change_is_one_service_update() {
    let mut state = MapState::default();
    let mut ids = IdAllocator::after(&state);
    let mut d = desired(&[("a", set(&[frontend(VIP, 80)], &[1]))]);
    step(&mut state, &mut ids, &d);
    d.backend_sets
        .values_mut()
        .for_each(|s| s.affinity_timeout_s = Some(10800));
    let writes = step(&mut state, &mut ids, &d);
    assert!(
        matches!(writes.as_slice(), [MapWrite::PutService(_, v)] if v.affinity_timeout_s == 10800),
        "{writes:?}"
    );
}

#[test]
fn adoption_keeps_ids_and_sweeps_leftovers_of_a_crashed_sync() {
    let mut state = MapState::default();
    let mut ids = IdAllocator::after(&state);
    let d = desired(&[("a", set(&[frontend(VIP, 80)], &[1, 2]))]);
    step(&mut state, &mut ids, &d);
    let adopted = state.clone();
    // A sync that died after writing a new generation and a new backend, before the flip.
    let orphan_slot = SlotKey {
        svc_id: 1,
        generation: 99,
        slot: 0,
    };
    state.apply(&MapWrite::PutSlot(orphan_slot, 77));
    state.apply(&MapWrite::PutBackend(77, Backend::default()));
    state.apply(&MapWrite::PutRevNat(55, RevNat::default()));

    // A restarted agent reads the maps back and allocates above everything it finds.
    let mut ids = IdAllocator::after(&state);
    let writes = step(&mut state, &mut ids, &d);
    assert_eq!(
        writes,
        vec![
            MapWrite::DeleteSlot(orphan_slot),
            MapWrite::DeleteBackend(77),
            MapWrite::DeleteRevNat(55)
        ]
    );
    assert_eq!(state, adopted);
    assert_eq!(
        IdAllocator::take(&mut ids.next_backend),
        78,
        "ids are never reused"
    );
}

#[test]
fn a_new_generation_is_above_every_generation_a_crash_left_in_use() {
    let mut state = MapState::default();
    let mut ids = IdAllocator::after(&state);
    let both = desired(&[("a", set(&[frontend(VIP, 80), frontend(VIP2, 80)], &[1]))]);
    step(&mut state, &mut ids, &both);
    // A sync died after flipping one frontend to generation 2: VIP2 still reads generation 1.
    let svc_id = state.services[&service_key(&frontend(VIP, 80))].svc_id;
    let gen1_slot = SlotKey {
        svc_id,
        generation: 1,
        slot: 0,
    };
    let backend = state.slots[&gen1_slot];
    let gen2_slot = SlotKey {
        svc_id,
        generation: 2,
        slot: 0,
    };
    state.apply(&MapWrite::PutSlot(gen2_slot, backend));
    let key = service_key(&frontend(VIP, 80));
    let flipped = ServiceValue {
        generation: 2,
        ..state.services[&key]
    };
    state.apply(&MapWrite::PutService(key, flipped));

    // The set changes: whatever frontend the plan keys on, it must not write generation 1 or 2.
    let writes = step(
        &mut state,
        &mut ids,
        &desired(&[("a", set(&[frontend(VIP, 80), frontend(VIP2, 80)], &[2]))]),
    );
    for write in &writes {
        if let MapWrite::PutSlot(key, _) = write {
            assert_eq!(key.generation, 3, "{writes:?}");
        }
    }
}

#[test]
fn orphans_of_a_failed_sync_are_reused_or_deleted_before_any_put() {
    let mut state = MapState::default();
    let mut ids = IdAllocator::after(&state);
    step(
        &mut state,
        &mut ids,
        &desired(&[("a", set(&[frontend(VIP, 80)], &[1]))]),
    );
    // A sync that wanted endpoints 2 and 3 failed after writing their backends (a full map).
    let planned = plan(
        &state,
        &desired(&[("a", set(&[frontend(VIP, 80)], &[2, 3]))]),
        &mut ids,
    );
    let mut id_of = BTreeMap::new();
    for write in planned
        .iter()
        .take_while(|w| matches!(w, MapWrite::PutBackend(..)))
    {
        if let MapWrite::PutBackend(id, backend) = write {
            id_of.insert(ipv4_addr(backend.addr).octets()[3], *id);
        }
        state.apply(write);
    }
    assert_eq!(id_of.len(), 2);

    // Retried with endpoint 3 only: 2's orphan is deleted before anything is put, and 3 keeps
    // the id its orphan has.
    let writes = step(
        &mut state,
        &mut ids,
        &desired(&[("a", set(&[frontend(VIP, 80)], &[3]))]),
    );
    assert_eq!(writes[0], MapWrite::DeleteBackend(id_of[&2]), "{writes:?}");
    assert!(
        !writes.iter().any(|w| matches!(w, MapWrite::PutBackend(..))),
        "{writes:?}"
    );
    assert_eq!(
        state.backends.keys().copied().collect::<Vec<_>>(),
        vec![id_of[&3]]
    );
}

#[test]
fn counters_come_and_go_with_their_set() {
    let mut state = MapState::default();
    let mut ids = IdAllocator::after(&state);
    let a = desired(&[("a", set(&[frontend(VIP, 80)], &[1]))]);
    let writes = step(&mut state, &mut ids, &a);
    let svc_id = state.services.values().next().unwrap().svc_id;
    let put = writes.iter().position(|w| *w == MapWrite::PutStats(svc_id));
    let frontend_put = writes
        .iter()
        .position(|w| matches!(w, MapWrite::PutService(..)));
    assert!(
        put < frontend_put,
        "counters before the frontend: {writes:?}"
    );

    // An endpoint change keeps the counters: the set is the same.
    let a2 = desired(&[("a", set(&[frontend(VIP, 80)], &[1, 2]))]);
    let writes = step(&mut state, &mut ids, &a2);
    assert!(!writes.iter().any(|w| matches!(w, MapWrite::PutStats(_))));

    // Removing the Service removes its counters, last.
    let writes = step(&mut state, &mut ids, &DesiredState::default());
    assert_eq!(writes.last(), Some(&MapWrite::DeleteStats(svc_id)));
}

#[test]
fn an_adopted_set_without_counters_gets_them_and_leftover_counters_go() {
    let mut state = MapState::default();
    let mut ids = IdAllocator::after(&state);
    let d = desired(&[("a", set(&[frontend(VIP, 80)], &[1]))]);
    step(&mut state, &mut ids, &d);
    let svc_id = state.services.values().next().unwrap().svc_id;
    // Maps an agent without counters wrote, plus counters of a set a crash left behind.
    state.apply(&MapWrite::DeleteStats(svc_id));
    state.apply(&MapWrite::PutStats(40));
    let mut ids = IdAllocator::after(&state);
    let writes = step(&mut state, &mut ids, &d);
    assert_eq!(
        writes,
        vec![MapWrite::PutStats(svc_id), MapWrite::DeleteStats(40)]
    );
}
