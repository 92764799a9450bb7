//! The compiler, updated object by object, must always equal a compile of the whole store, and
//! report exactly the sets that differ. Random edits over a small universe (three addresses
//! shared by five Services, slices that change owner) make frontend conflicts and ownership moves
//! common rather than rare.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

use super::*;
use crate::model::compile;

/// xorshift64: deterministic, so a failure replays.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn key(name: &str) -> ObjectRef {
    ObjectRef {
        namespace: "default".into(),
        name: name.into(),
    }
}

fn random_service(rng: &mut Rng, name: &str) -> Service {
    let ip = format!("10.96.0.{}", 1 + rng.below(3));
    let mut ports = vec![json!({"name": "http", "port": 80, "targetPort": 8080})];
    if rng.below(2) == 0 {
        ports.push(json!({"name": "https", "port": 443 + rng.below(2), "targetPort": 8443}));
    }
    let mut spec = json!({"clusterIP": ip, "ports": ports});
    if rng.below(5) == 0 {
        spec["clusterIP"] = json!("010.96.0.1"); // rejected
    }
    if rng.below(4) == 0 {
        spec["sessionAffinity"] = json!("ClientIP");
    }
    serde_json::from_value(
        json!({"metadata": {"name": name, "namespace": "default"}, "spec": spec}),
    )
    .unwrap()
}

fn random_slice(rng: &mut Rng, name: &str) -> EndpointSlice {
    let owner = format!("svc-{}", rng.below(5));
    let endpoints: Vec<_> = (0..rng.below(4))
        .map(|i| {
            let address = if rng.below(6) == 0 { "garbage".to_string() } else { format!("10.244.1.{}", 10 + i + rng.below(3)) };
            json!({"addresses": [address], "conditions": {"ready": rng.below(3) != 0}, "nodeName": format!("node-{}", rng.below(2))})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": owner}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "https", "port": 8443, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
    .unwrap()
}

#[test]
fn updates_object_by_object_equal_a_full_compile_and_report_exactly_the_changed_sets() {
    for seed in 1..=20u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut store = Store::default();
        let mut compiler = Compiler::new("node-0");
        compiler.update(&store, &Changes::All);
        for step in 0..150 {
            let before = compiler.desired().clone();
            let mut services = BTreeSet::new();
            let mut slices = BTreeSet::new();
            // One to three edits between updates, as a coalesced batch would bring.
            for _ in 0..1 + rng.below(3) {
                match rng.below(4) {
                    0 | 1 => {
                        let name = format!("svc-{}", rng.below(5));
                        if rng.below(4) == 0 {
                            store.services.remove(&key(&name));
                        } else {
                            store
                                .services
                                .insert(key(&name), random_service(&mut rng, &name));
                        }
                        services.insert(key(&name));
                    }
                    _ => {
                        let name = format!("slice-{}", rng.below(6));
                        if rng.below(4) == 0 {
                            store.endpoint_slices.remove(&key(&name));
                        } else {
                            store
                                .endpoint_slices
                                .insert(key(&name), random_slice(&mut rng, &name).into());
                        }
                        slices.insert(key(&name));
                    }
                }
            }
            let changes = compiler.update(&store, &Changes::Objects { services, slices });
            let full = compile(&store, "node-0");
            let context = format!("seed {seed}, step {step}");
            assert_eq!(
                compiler.desired(),
                &full.desired,
                "{context}: desired state"
            );
            assert_eq!(
                compiler.rejected().cloned().collect::<Vec<_>>(),
                full.rejected,
                "{context}: rejections"
            );
            assert_eq!(
                changes,
                full.desired.changes_from(&before),
                "{context}: reported changes"
            );
        }
    }
}

#[test]
fn an_update_with_nothing_changed_reports_nothing() {
    let mut store = Store::default();
    let mut rng = Rng(7);
    store
        .services
        .insert(key("svc-0"), random_service(&mut rng, "svc-0"));
    store
        .endpoint_slices
        .insert(key("slice-0"), random_slice(&mut rng, "slice-0").into());
    let mut compiler = Compiler::new("node-0");
    compiler.update(&store, &Changes::All);
    let nothing = Changes::Objects {
        services: BTreeSet::new(),
        slices: BTreeSet::new(),
    };
    assert_eq!(compiler.update(&store, &nothing), BTreeMap::new());
    assert_eq!(compiler.update(&store, &Changes::All), BTreeMap::new());
}
