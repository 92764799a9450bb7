//! Table-driven tests of [`compile`], in the style of kube-proxy's proxier tests: each case is a
//! small store built with the helpers below, and the exact state and rejections it compiles to.
//! Every case runs on node [`NODE`]. The seed manifests are compiled in `source::manifests`'s
//! tests, which load them through the parser.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ClientIPConfig, Service, ServicePort, ServiceSpec, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{MAX_ENDPOINTS_PER_SLICE, SERVICE_PROXY_NAME_LABEL};
use crate::model::SERVICE_NAME_LABEL;
use crate::model::{
    BackendSet, Compiled, DesiredState, EndpointInfo, Frontend, ObjectRef, Protocol, Rejection,
    ServicePortName, Store, compile,
};

const NODE: &str = "node-1";
const NS: &str = "default";

// ---- Object builders -------------------------------------------------------------------------

/// Lets a case tweak one field of a built object inline.
trait With: Sized {
    fn with(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}
impl<T> With for T {}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(NS.into()),
        ..ObjectMeta::default()
    }
}

fn some_if_set(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.into())
}

/// A ClusterIP Service in [`NS`]; `cluster_ip` "" leaves `clusterIP` unset.
fn svc(name: &str, cluster_ip: &str, ports: Vec<ServicePort>) -> Service {
    Service {
        metadata: meta(name),
        spec: Some(ServiceSpec {
            cluster_ip: some_if_set(cluster_ip),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn spec(service: &mut Service) -> &mut ServiceSpec {
    service.spec.get_or_insert_with(ServiceSpec::default)
}

fn client_ip_timeout(service: &mut Service, seconds: i32) {
    spec(service).session_affinity = Some("ClientIP".into());
    spec(service).session_affinity_config = Some(SessionAffinityConfig {
        client_ip: Some(ClientIPConfig {
            timeout_seconds: Some(seconds),
        }),
    });
}

/// A Service port; `name` "" leaves `name` unset, as for a Service's only port.
fn port(name: &str, number: i32, protocol: &str) -> ServicePort {
    ServicePort {
        name: some_if_set(name),
        port: number,
        protocol: Some(protocol.into()),
        ..ServicePort::default()
    }
}

fn tcp(name: &str, number: i32) -> ServicePort {
    port(name, number, "TCP")
}

/// An IPv4 EndpointSlice in [`NS`] labelled for Service `service`.
fn slice(
    name: &str,
    service: &str,
    ports: Vec<EndpointPort>,
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    EndpointSlice {
        address_type: "IPv4".into(),
        endpoints,
        metadata: ObjectMeta {
            labels: Some(BTreeMap::from([(
                SERVICE_NAME_LABEL.to_owned(),
                service.to_owned(),
            )])),
            ..meta(name)
        },
        ports: Some(ports),
    }
}

/// A slice port as the EndpointSlice controller writes it: the name is always present.
fn sport(name: &str, number: i32, protocol: &str) -> EndpointPort {
    EndpointPort {
        name: Some(name.into()),
        port: Some(number),
        protocol: Some(protocol.into()),
        ..EndpointPort::default()
    }
}

fn stcp(name: &str, number: i32) -> EndpointPort {
    sport(name, number, "TCP")
}

fn conditions(ready: bool, serving: bool, terminating: bool) -> Option<EndpointConditions> {
    Some(EndpointConditions {
        ready: Some(ready),
        serving: Some(serving),
        terminating: Some(terminating),
    })
}

/// A ready endpoint on `node` ("" for no `nodeName`).
fn ready(addr: &str, node: &str) -> Endpoint {
    Endpoint {
        addresses: vec![addr.into()],
        conditions: conditions(true, true, false),
        node_name: some_if_set(node),
        ..Endpoint::default()
    }
}

/// A pod shutting down that still answers (serving) or no longer does.
fn terminating(addr: &str, node: &str, serving: bool) -> Endpoint {
    Endpoint {
        conditions: conditions(false, serving, true),
        ..ready(addr, node)
    }
}

/// A pod that is neither ready nor terminating (failing its readiness probe).
fn not_ready(addr: &str, node: &str) -> Endpoint {
    Endpoint {
        conditions: conditions(false, false, false),
        ..ready(addr, node)
    }
}

// ---- Expected-state builders -----------------------------------------------------------------

const REMOTE: EndpointInfo = EndpointInfo {
    terminating: false,
    local: false,
};
const LOCAL: EndpointInfo = EndpointInfo {
    terminating: false,
    local: true,
};
const REMOTE_TERMINATING: EndpointInfo = EndpointInfo {
    terminating: true,
    local: false,
};
const LOCAL_TERMINATING: EndpointInfo = EndpointInfo {
    terminating: true,
    local: true,
};

type Want = (ServicePortName, BackendSet);

/// The TCP backend set of Service `service` (in [`NS`]) port `port_name`, fronted by `frontend`
/// ("10.96.0.1:80"), without affinity.
fn set(service: &str, port_name: &str, frontend: &str, endpoints: &[(&str, EndpointInfo)]) -> Want {
    let frontend: std::net::SocketAddrV4 = frontend.parse().expect("frontend in a test table");
    let name = ServicePortName {
        service: ObjectRef {
            namespace: NS.into(),
            name: service.into(),
        },
        port_name: port_name.into(),
        protocol: Protocol::Tcp,
    };
    let set = BackendSet {
        frontends: [Frontend {
            addr: *frontend.ip(),
            port: frontend.port(),
            protocol: Protocol::Tcp,
        }]
        .into(),
        endpoints: endpoints
            .iter()
            .map(|(addr, info)| (addr.parse().expect("endpoint in a test table"), *info))
            .collect(),
        affinity_timeout_s: None,
    };
    (name, set)
}

fn udp_set(want: &mut Want) {
    want.0.protocol = Protocol::Udp;
    want.1.frontends = want
        .1
        .frontends
        .iter()
        .map(|f| Frontend {
            protocol: Protocol::Udp,
            ..*f
        })
        .collect();
}

fn rejected(kind: &'static str, name: &str, reason: &str) -> Rejection {
    Rejection {
        kind,
        object: ObjectRef {
            namespace: NS.into(),
            name: name.into(),
        },
        reason: reason.into(),
    }
}

fn svc_rejected(name: &str, reason: &str) -> Rejection {
    rejected("Service", name, reason)
}

fn slice_rejected(name: &str, reason: &str) -> Rejection {
    rejected("EndpointSlice", name, reason)
}

// ---- The runner ------------------------------------------------------------------------------

struct Case {
    name: &'static str,
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    want: Vec<Want>,
    rejected: Vec<Rejection>,
}

fn object_ref(metadata: &ObjectMeta) -> ObjectRef {
    ObjectRef {
        namespace: metadata.namespace.clone().unwrap_or_default(),
        name: metadata.name.clone().unwrap_or_default(),
    }
}

/// Compiles every case and reports all mismatches at once.
fn run(cases: Vec<Case>) {
    let mut failures = Vec::new();
    for case in cases {
        let store = Store {
            services: case
                .services
                .into_iter()
                .map(|s| (object_ref(&s.metadata), s))
                .collect(),
            endpoint_slices: case
                .slices
                .into_iter()
                .map(|s| (object_ref(&s.metadata), s.into()))
                .collect(),
        };
        let got = compile(&store, NODE);
        let want = Compiled {
            desired: DesiredState {
                backend_sets: case.want.into_iter().collect(),
            },
            rejected: case.rejected,
        };
        if got != want {
            failures.push(format!(
                "case {:?}\n--- got\n{got:#?}\n--- want\n{want:#?}",
                case.name
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The usual one-port Service `a` at 10.96.0.1:80 -> 8080 and its slice `a-1`.
fn svc_a() -> Service {
    svc("a", "10.96.0.1", vec![tcp("", 80)])
}

fn slice_a(endpoints: Vec<Endpoint>) -> EndpointSlice {
    slice("a-1", "a", vec![stcp("", 8080)], endpoints)
}

// ---- The tables ------------------------------------------------------------------------------

#[test]
fn std_rejects_leading_zeros_in_ipv4() {
    // compile relies on this for "010.1.1.1" (which inet_aton would read as octal 8.1.1.1).
    for bad in [
        "010.1.1.1",
        "10.01.1.1",
        "00.0.0.0",
        "300.1.1.1",
        "1.2.3",
        "abc",
        " 10.0.0.1",
    ] {
        assert!(bad.parse::<std::net::Ipv4Addr>().is_err(), "{bad:?}");
    }
    assert!("10.0.0.1".parse::<std::net::Ipv4Addr>().is_ok());
}

#[test]
fn skipped_services() {
    let with_slice = |service: Service| Case {
        name: "",
        services: vec![service],
        slices: vec![slice_a(vec![ready("10.244.1.1", NODE)])],
        want: vec![],
        rejected: vec![],
    };
    run(vec![
        Case {
            name: "ExternalName",
            ..with_slice(svc("a", "", vec![tcp("", 80)]).with(|s| {
                spec(s).type_ = Some("ExternalName".into());
                spec(s).external_name = Some("example.com".into());
            }))
        },
        Case {
            name: "headless: clusterIP None",
            ..with_slice(svc("a", "None", vec![tcp("", 80)]))
        },
        Case {
            name: "headless: clusterIPs [None]",
            ..with_slice(
                svc("a", "None", vec![tcp("", 80)])
                    .with(|s| spec(s).cluster_ips = Some(vec!["None".into()])),
            )
        },
        Case {
            name: "no clusterIP",
            ..with_slice(svc("a", "", vec![tcp("", 80)]))
        },
        Case {
            name: "no spec",
            ..with_slice(Service {
                metadata: meta("a"),
                ..Service::default()
            })
        },
        Case {
            name: "labelled service-proxy-name",
            ..with_slice(svc_a().with(|s| {
                s.metadata.labels = Some(BTreeMap::from([(
                    SERVICE_PROXY_NAME_LABEL.to_owned(),
                    "other-proxy".to_owned(),
                )]));
            }))
        },
        Case {
            name: "IPv6-only",
            ..with_slice(
                svc("a", "fd00::1", vec![tcp("", 80)])
                    .with(|s| spec(s).cluster_ips = Some(vec!["fd00::1".into()])),
            )
        },
        Case {
            name: "no ports: nothing to program",
            ..with_slice(svc("a", "10.96.0.1", vec![]))
        },
    ]);
}

#[test]
fn cluster_ips() {
    let endpoints = || vec![slice_a(vec![ready("10.244.1.1", "")])];
    let want = || vec![set("a", "", "10.96.0.1:80", &[("10.244.1.1:8080", REMOTE)])];
    run(vec![
        Case {
            name: "dual-stack, IPv6 first: the IPv4 address is used",
            services: vec![svc("a", "fd00::1", vec![tcp("", 80)]).with(|s| {
                spec(s).cluster_ips = Some(vec!["fd00::1".into(), "10.96.0.1".into()]);
            })],
            slices: endpoints(),
            want: want(),
            rejected: vec![],
        },
        Case {
            name: "dual-stack, IPv4 first",
            services: vec![svc_a().with(|s| {
                spec(s).cluster_ips = Some(vec!["10.96.0.1".into(), "fd00::1".into()]);
            })],
            slices: endpoints(),
            want: want(),
            rejected: vec![],
        },
        Case {
            name: "clusterIPs without clusterIP",
            services: vec![
                svc("a", "", vec![tcp("", 80)])
                    .with(|s| spec(s).cluster_ips = Some(vec!["10.96.0.1".into()])),
            ],
            slices: endpoints(),
            want: want(),
            rejected: vec![],
        },
        Case {
            name: "NodePort and LoadBalancer Services get their ClusterIP frontend",
            services: vec![
                svc_a().with(|s| spec(s).type_ = Some("NodePort".into())),
                svc("b", "10.96.0.2", vec![tcp("", 80)])
                    .with(|s| spec(s).type_ = Some("LoadBalancer".into())),
            ],
            slices: vec![],
            want: vec![
                set("a", "", "10.96.0.1:80", &[]),
                set("b", "", "10.96.0.2:80", &[]),
            ],
            rejected: vec![],
        },
        Case {
            name: "invalid clusterIP strings reject the whole Service",
            services: vec![
                svc("a", "010.1.1.1", vec![tcp("", 80)]),
                svc("b", "300.1.1.1", vec![tcp("", 80)]),
                svc("c", "abc", vec![tcp("", 80)]),
                svc("d", "1.2.3", vec![tcp("", 80)]),
            ],
            slices: endpoints(),
            want: vec![],
            rejected: vec![
                svc_rejected(
                    "a",
                    r#"spec.clusterIP: "010.1.1.1" is not a valid IP address"#,
                ),
                svc_rejected(
                    "b",
                    r#"spec.clusterIP: "300.1.1.1" is not a valid IP address"#,
                ),
                svc_rejected("c", r#"spec.clusterIP: "abc" is not a valid IP address"#),
                svc_rejected("d", r#"spec.clusterIP: "1.2.3" is not a valid IP address"#),
            ],
        },
        Case {
            name: "garbage in the second family of a dual-stack Service",
            services: vec![svc_a().with(|s| {
                spec(s).cluster_ips = Some(vec!["10.96.0.1".into(), "fd00::zz".into()]);
            })],
            slices: endpoints(),
            want: vec![],
            rejected: vec![svc_rejected(
                "a",
                r#"spec.clusterIPs[1]: "fd00::zz" is not a valid IP address"#,
            )],
        },
        Case {
            name: "clusterIP differs from clusterIPs[0]",
            services: vec![svc_a().with(|s| {
                spec(s).cluster_ips = Some(vec!["10.96.0.2".into()]);
            })],
            slices: endpoints(),
            want: vec![],
            rejected: vec![svc_rejected(
                "a",
                r#"spec.clusterIP: "10.96.0.1" differs from spec.clusterIPs[0]: "10.96.0.2""#,
            )],
        },
        Case {
            name: "reserved addresses",
            services: vec![
                svc("a", "0.0.0.0", vec![tcp("", 80)]),
                svc("b", "127.0.0.1", vec![tcp("", 80)]),
                svc("c", "224.0.0.1", vec![tcp("", 80)]),
                svc("d", "255.255.255.255", vec![tcp("", 80)]),
            ],
            slices: vec![],
            want: vec![],
            rejected: [
                "a:0.0.0.0",
                "b:127.0.0.1",
                "c:224.0.0.1",
                "d:255.255.255.255",
            ]
            .iter()
            .filter_map(|s| s.split_once(':'))
            .map(|(name, ip)| {
                svc_rejected(
                    name,
                    &format!(
                        "spec.clusterIP: {ip:?} is reserved (unspecified, loopback, \
                             link-local, multicast or broadcast)"
                    ),
                )
            })
            .collect(),
        },
        Case {
            name: "unknown type",
            services: vec![svc_a().with(|s| spec(s).type_ = Some("Clusterip".into()))],
            slices: endpoints(),
            want: vec![],
            rejected: vec![svc_rejected(
                "a",
                r#"spec.type: "Clusterip" is not one of ClusterIP, NodePort, LoadBalancer, ExternalName"#,
            )],
        },
    ]);
}

#[test]
fn service_ports() {
    run(vec![
        Case {
            name: "UDP",
            services: vec![svc("dns", "10.96.0.10", vec![port("dns", 53, "UDP")])],
            slices: vec![slice(
                "dns-1",
                "dns",
                vec![sport("dns", 53, "UDP")],
                vec![ready("10.244.1.1", "")],
            )],
            want: vec![
                set("dns", "dns", "10.96.0.10:53", &[("10.244.1.1:53", REMOTE)]).with(udp_set),
            ],
            rejected: vec![],
        },
        Case {
            name: "TCP and UDP on the same port number are two frontends",
            services: vec![svc(
                "dns",
                "10.96.0.10",
                vec![port("dns", 53, "UDP"), tcp("dns-tcp", 53)],
            )],
            slices: vec![slice(
                "dns-1",
                "dns",
                vec![sport("dns-tcp", 53, "TCP"), sport("dns", 53, "UDP")],
                vec![ready("10.244.1.1", "")],
            )],
            want: vec![
                set("dns", "dns", "10.96.0.10:53", &[("10.244.1.1:53", REMOTE)]).with(udp_set),
                set(
                    "dns",
                    "dns-tcp",
                    "10.96.0.10:53",
                    &[("10.244.1.1:53", REMOTE)],
                ),
            ],
            rejected: vec![],
        },
        Case {
            name: "absent and empty protocol mean TCP",
            services: vec![svc(
                "a",
                "10.96.0.1",
                vec![
                    ServicePort {
                        protocol: None,
                        ..tcp("p", 80)
                    },
                    port("q", 81, ""),
                ],
            )],
            slices: vec![],
            want: vec![
                set("a", "p", "10.96.0.1:80", &[]),
                set("a", "q", "10.96.0.1:81", &[]),
            ],
            rejected: vec![],
        },
        Case {
            name: "SCTP is rejected, the other ports compile",
            services: vec![svc(
                "a",
                "10.96.0.1",
                vec![tcp("http", 80), port("sig", 9, "SCTP")],
            )],
            slices: vec![],
            want: vec![set("a", "http", "10.96.0.1:80", &[])],
            rejected: vec![svc_rejected(
                "a",
                "spec.ports[1].protocol: SCTP is not supported",
            )],
        },
        Case {
            name: "unknown protocol",
            services: vec![svc("a", "10.96.0.1", vec![port("", 80, "tcp")])],
            slices: vec![],
            want: vec![],
            rejected: vec![svc_rejected(
                "a",
                r#"spec.ports[0].protocol: "tcp" is not one of TCP, UDP, SCTP"#,
            )],
        },
        Case {
            name: "port out of range",
            services: vec![svc(
                "a",
                "10.96.0.1",
                vec![
                    tcp("zero", 0),
                    tcp("big", 65_536),
                    tcp("negative", -1),
                    tcp("max", i32::MAX),
                    tcp("ok", 65_535),
                ],
            )],
            slices: vec![],
            want: vec![set("a", "ok", "10.96.0.1:65535", &[])],
            rejected: vec![
                svc_rejected("a", "spec.ports[0].port: 0 is out of range 1-65535"),
                svc_rejected("a", "spec.ports[1].port: 65536 is out of range 1-65535"),
                svc_rejected("a", "spec.ports[2].port: -1 is out of range 1-65535"),
                svc_rejected(
                    "a",
                    "spec.ports[3].port: 2147483647 is out of range 1-65535",
                ),
            ],
        },
        Case {
            name: "duplicate port name",
            services: vec![svc(
                "a",
                "10.96.0.1",
                vec![tcp("http", 80), tcp("http", 81)],
            )],
            slices: vec![],
            want: vec![set("a", "http", "10.96.0.1:80", &[])],
            rejected: vec![svc_rejected(
                "a",
                r#"spec.ports[1].name: "http" is already the name of an earlier TCP port"#,
            )],
        },
    ]);
}

#[test]
fn session_affinity() {
    let case =
        |name: &'static str, service: Service, want: Vec<Want>, rejected: Vec<Rejection>| Case {
            name,
            services: vec![service],
            slices: vec![],
            want,
            rejected,
        };
    let with_timeout = |seconds: u32| {
        vec![set("a", "", "10.96.0.1:80", &[]).with(|w| w.1.affinity_timeout_s = Some(seconds))]
    };
    let out_of_range = |seconds: i32| {
        vec![svc_rejected(
            "a",
            &format!(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds: {seconds} is out of range \
                 1-86400"
            ),
        )]
    };
    run(vec![
        case(
            "ClientIP without a timeout: the default 10800 s",
            svc_a().with(|s| spec(s).session_affinity = Some("ClientIP".into())),
            with_timeout(10_800),
            vec![],
        ),
        case(
            "ClientIP with a custom timeout",
            svc_a().with(|s| client_ip_timeout(s, 60)),
            with_timeout(60),
            vec![],
        ),
        case(
            "the maximum timeout",
            svc_a().with(|s| client_ip_timeout(s, 86_400)),
            with_timeout(86_400),
            vec![],
        ),
        case(
            "timeout 0",
            svc_a().with(|s| client_ip_timeout(s, 0)),
            vec![],
            out_of_range(0),
        ),
        case(
            "timeout above a day",
            svc_a().with(|s| client_ip_timeout(s, 86_401)),
            vec![],
            out_of_range(86_401),
        ),
        case(
            "negative timeout",
            svc_a().with(|s| client_ip_timeout(s, i32::MIN)),
            vec![],
            out_of_range(i32::MIN),
        ),
        case(
            "None",
            svc_a().with(|s| spec(s).session_affinity = Some("None".into())),
            vec![set("a", "", "10.96.0.1:80", &[])],
            vec![],
        ),
        case(
            "a timeout without ClientIP is ignored",
            svc_a().with(|s| {
                client_ip_timeout(s, 0);
                spec(s).session_affinity = None;
            }),
            vec![set("a", "", "10.96.0.1:80", &[])],
            vec![],
        ),
        case(
            "unknown affinity",
            svc_a().with(|s| spec(s).session_affinity = Some("clientip".into())),
            vec![],
            vec![svc_rejected(
                "a",
                r#"spec.sessionAffinity: "clientip" is not one of None, ClientIP"#,
            )],
        ),
    ]);
}

#[test]
fn endpoint_conditions() {
    let case = |name: &'static str, endpoints: Vec<Endpoint>, want: &[(&str, EndpointInfo)]| Case {
        name,
        services: vec![svc_a()],
        slices: vec![slice_a(endpoints)],
        want: vec![set("a", "", "10.96.0.1:80", want)],
        rejected: vec![],
    };
    run(vec![
        case(
            "ready endpoints, local ones flagged",
            vec![
                ready("10.244.1.1", NODE),
                ready("10.244.2.1", "node-2"),
                ready("10.244.3.1", ""),
            ],
            &[
                ("10.244.1.1:8080", LOCAL),
                ("10.244.2.1:8080", REMOTE),
                ("10.244.3.1:8080", REMOTE),
            ],
        ),
        case(
            "absent conditions mean ready",
            vec![Endpoint {
                conditions: None,
                ..ready("10.244.1.1", "")
            }],
            &[("10.244.1.1:8080", REMOTE)],
        ),
        case(
            "when any endpoint is ready, only ready ones serve",
            vec![ready("10.244.1.1", ""), terminating("10.244.1.2", "", true)],
            &[("10.244.1.1:8080", REMOTE)],
        ),
        case(
            "no ready endpoint: serving terminating ones take over",
            vec![
                terminating("10.244.1.1", NODE, true),
                terminating("10.244.1.2", "", true),
            ],
            &[
                ("10.244.1.1:8080", LOCAL_TERMINATING),
                ("10.244.1.2:8080", REMOTE_TERMINATING),
            ],
        ),
        case(
            "terminating endpoints that no longer serve are excluded",
            vec![
                terminating("10.244.1.1", "", true),
                terminating("10.244.1.2", "", false),
            ],
            &[("10.244.1.1:8080", REMOTE_TERMINATING)],
        ),
        case(
            "not ready and not terminating: never used",
            vec![
                not_ready("10.244.1.1", ""),
                terminating("10.244.1.2", "", false),
            ],
            &[],
        ),
        case(
            "absent serving defers to ready",
            vec![Endpoint {
                conditions: Some(EndpointConditions {
                    ready: Some(false),
                    serving: None,
                    terminating: Some(true),
                }),
                ..ready("10.244.1.1", "")
            }],
            &[],
        ),
        case(
            "ready wins over a contradictory terminating flag",
            vec![Endpoint {
                conditions: conditions(true, true, true),
                ..ready("10.244.1.1", "")
            }],
            &[("10.244.1.1:8080", REMOTE)],
        ),
        case(
            "a Service without endpoints keeps its frontend",
            vec![],
            &[],
        ),
    ]);
}

#[test]
fn endpoint_slices_of_a_service() {
    run(vec![
        Case {
            name: "deduplicated across two slices",
            services: vec![svc_a()],
            slices: vec![
                slice_a(vec![ready("10.244.1.1", NODE), ready("10.244.1.2", NODE)]),
                slice(
                    "a-2",
                    "a",
                    vec![stcp("", 8080)],
                    vec![ready("10.244.1.2", NODE), ready("10.244.2.1", "node-2")],
                ),
            ],
            want: vec![set(
                "a",
                "",
                "10.96.0.1:80",
                &[
                    ("10.244.1.1:8080", LOCAL),
                    ("10.244.1.2:8080", LOCAL),
                    ("10.244.2.1:8080", REMOTE),
                ],
            )],
            rejected: vec![],
        },
        Case {
            name: "a duplicate prefers the copy that is not terminating",
            services: vec![svc_a()],
            slices: vec![
                slice_a(vec![terminating("10.244.1.1", "", true)]),
                slice(
                    "a-2",
                    "a",
                    vec![stcp("", 8080)],
                    vec![ready("10.244.1.1", "")],
                ),
            ],
            want: vec![set("a", "", "10.96.0.1:80", &[("10.244.1.1:8080", REMOTE)])],
            rejected: vec![],
        },
        Case {
            name: "each slice gives its own backend port (mid-rollout of a targetPort change)",
            services: vec![svc_a()],
            slices: vec![
                slice_a(vec![ready("10.244.1.1", "")]),
                slice(
                    "a-2",
                    "a",
                    vec![stcp("", 9090)],
                    vec![ready("10.244.1.2", "")],
                ),
            ],
            want: vec![set(
                "a",
                "",
                "10.96.0.1:80",
                &[("10.244.1.1:8080", REMOTE), ("10.244.1.2:9090", REMOTE)],
            )],
            rejected: vec![],
        },
        Case {
            name: "slices of another Service, of the same name in another namespace, or unlabelled",
            services: vec![svc_a()],
            slices: vec![
                slice(
                    "b-1",
                    "b",
                    vec![stcp("", 8080)],
                    vec![ready("10.244.9.1", "")],
                ),
                slice(
                    "a-1",
                    "a",
                    vec![stcp("", 8080)],
                    vec![ready("10.244.9.2", "")],
                )
                .with(|s| s.metadata.namespace = Some("other".into())),
                slice(
                    "a-x",
                    "a",
                    vec![stcp("", 8080)],
                    vec![ready("10.244.9.3", "")],
                )
                .with(|s| s.metadata.labels = None),
            ],
            want: vec![set("a", "", "10.96.0.1:80", &[])],
            rejected: vec![],
        },
        Case {
            name: "IPv6 and FQDN slices are ignored",
            services: vec![svc_a()],
            slices: vec![
                slice_a(vec![ready("fd00::1", "")]).with(|s| s.address_type = "IPv6".into()),
                slice(
                    "a-2",
                    "a",
                    vec![stcp("", 8080)],
                    vec![ready("pod.example.com", "")],
                )
                .with(|s| s.address_type = "FQDN".into()),
            ],
            want: vec![set("a", "", "10.96.0.1:80", &[])],
            rejected: vec![],
        },
    ]);
}

#[test]
fn port_matching() {
    run(vec![
        Case {
            name: "named ports: the slice port carrying the Service port's name",
            services: vec![svc(
                "a",
                "10.96.0.1",
                vec![tcp("http", 80), tcp("https", 443)],
            )],
            slices: vec![slice_a(vec![ready("10.244.1.1", "")]).with(|s| {
                s.ports = Some(vec![stcp("https", 8443), stcp("http", 8080)]);
            })],
            want: vec![
                set("a", "http", "10.96.0.1:80", &[("10.244.1.1:8080", REMOTE)]),
                set(
                    "a",
                    "https",
                    "10.96.0.1:443",
                    &[("10.244.1.1:8443", REMOTE)],
                ),
            ],
            rejected: vec![],
        },
        Case {
            name: "port name mismatch: no endpoints",
            services: vec![svc("a", "10.96.0.1", vec![tcp("http", 80)])],
            slices: vec![slice(
                "a-1",
                "a",
                vec![stcp("web", 8080)],
                vec![ready("10.244.1.1", "")],
            )],
            want: vec![set("a", "http", "10.96.0.1:80", &[])],
            rejected: vec![],
        },
        Case {
            name: "unnamed ports: absent and empty names are the same",
            services: vec![
                svc_a(),
                svc("b", "10.96.0.2", vec![tcp("", 80)]).with(|s| {
                    spec(s).ports = Some(vec![ServicePort {
                        name: Some(String::new()),
                        ..tcp("", 80)
                    }])
                }),
            ],
            slices: vec![
                slice_a(vec![ready("10.244.1.1", "")]).with(|s| {
                    s.ports = Some(vec![EndpointPort {
                        name: None,
                        ..stcp("", 8080)
                    }]);
                }),
                slice(
                    "b-1",
                    "b",
                    vec![stcp("", 8080)],
                    vec![ready("10.244.1.2", "")],
                ),
            ],
            want: vec![
                set("a", "", "10.96.0.1:80", &[("10.244.1.1:8080", REMOTE)]),
                set("b", "", "10.96.0.2:80", &[("10.244.1.2:8080", REMOTE)]),
            ],
            rejected: vec![],
        },
        Case {
            name: "protocol mismatch: no endpoints",
            services: vec![svc("dns", "10.96.0.10", vec![port("", 53, "UDP")])],
            slices: vec![slice(
                "dns-1",
                "dns",
                vec![stcp("", 53)],
                vec![ready("10.244.1.1", "")],
            )],
            want: vec![set("dns", "", "10.96.0.10:53", &[]).with(udp_set)],
            rejected: vec![],
        },
        Case {
            name: "a slice without ports contributes nothing",
            services: vec![svc_a()],
            slices: vec![slice_a(vec![ready("10.244.1.1", "")]).with(|s| s.ports = None)],
            want: vec![set("a", "", "10.96.0.1:80", &[])],
            rejected: vec![],
        },
    ]);
}

#[test]
fn bad_endpoint_slices() {
    run(vec![
        Case {
            name: "invalid addresses are rejected, the slice's other endpoints count",
            services: vec![svc_a()],
            slices: vec![slice_a(vec![
                ready("10.244.1.1", ""),
                ready("10.244.1.2", ""),
                ready("010.244.1.1", ""),
                ready("fd00::1", ""),
                ready("garbage", ""),
                Endpoint {
                    addresses: vec![],
                    ..ready("", "")
                },
                ready("127.0.0.1", ""),
            ])],
            want: vec![set(
                "a",
                "",
                "10.96.0.1:80",
                &[("10.244.1.1:8080", REMOTE), ("10.244.1.2:8080", REMOTE)],
            )],
            rejected: vec![
                slice_rejected(
                    "a-1",
                    r#"endpoints[2].addresses[0]: "010.244.1.1" is not a valid IPv4 address"#,
                ),
                slice_rejected(
                    "a-1",
                    r#"endpoints[3].addresses[0]: "fd00::1" is not a valid IPv4 address"#,
                ),
                slice_rejected(
                    "a-1",
                    r#"endpoints[4].addresses[0]: "garbage" is not a valid IPv4 address"#,
                ),
                slice_rejected("a-1", "endpoints[5].addresses: empty"),
                slice_rejected(
                    "a-1",
                    "endpoints[6].addresses[0]: \"127.0.0.1\" is reserved (unspecified, \
                     loopback, link-local, multicast or broadcast)",
                ),
            ],
        },
        Case {
            name: "a bad slice is reported once, however many Service ports read it",
            services: vec![svc(
                "a",
                "10.96.0.1",
                vec![tcp("http", 80), tcp("https", 443)],
            )],
            slices: vec![slice(
                "a-1",
                "a",
                vec![stcp("http", 8080), stcp("https", 8443)],
                vec![ready("1.2.3", "")],
            )],
            want: vec![
                set("a", "http", "10.96.0.1:80", &[]),
                set("a", "https", "10.96.0.1:443", &[]),
            ],
            rejected: vec![slice_rejected(
                "a-1",
                r#"endpoints[0].addresses[0]: "1.2.3" is not a valid IPv4 address"#,
            )],
        },
        Case {
            name: "bad slice ports",
            services: vec![svc(
                "a",
                "10.96.0.1",
                vec![
                    tcp("zero", 80),
                    tcp("big", 81),
                    tcp("missing", 82),
                    tcp("ok", 83),
                ],
            )],
            slices: vec![slice(
                "a-1",
                "a",
                vec![
                    stcp("zero", 0),
                    stcp("big", 65_536),
                    EndpointPort {
                        port: None,
                        ..stcp("missing", 0)
                    },
                    sport("ok", 8083, "tcp"),
                    stcp("ok", 8083),
                    stcp("ok", 9999),
                    sport("sctp", 9, "SCTP"),
                ],
                vec![ready("10.244.1.1", "")],
            )],
            want: vec![
                set("a", "zero", "10.96.0.1:80", &[]),
                set("a", "big", "10.96.0.1:81", &[]),
                set("a", "missing", "10.96.0.1:82", &[]),
                set("a", "ok", "10.96.0.1:83", &[("10.244.1.1:8083", REMOTE)]),
            ],
            rejected: vec![
                slice_rejected("a-1", "ports[0].port: 0 is out of range 1-65535"),
                slice_rejected("a-1", "ports[1].port: 65536 is out of range 1-65535"),
                slice_rejected("a-1", "ports[2].port: missing"),
                slice_rejected(
                    "a-1",
                    r#"ports[3].protocol: "tcp" is not one of TCP, UDP, SCTP"#,
                ),
                slice_rejected(
                    "a-1",
                    r#"ports[5].name: "ok" is already the name of an earlier TCP port"#,
                ),
            ],
        },
        Case {
            name: "unknown addressType",
            services: vec![svc_a()],
            slices: vec![
                slice_a(vec![ready("10.244.1.1", "")]).with(|s| s.address_type = "ipv4".into()),
            ],
            want: vec![set("a", "", "10.96.0.1:80", &[])],
            rejected: vec![slice_rejected(
                "a-1",
                r#"addressType: "ipv4" is not one of IPv4, IPv6, FQDN"#,
            )],
        },
        Case {
            name: "slices of a skipped Service are not checked",
            services: vec![svc("a", "None", vec![tcp("", 80)])],
            slices: vec![slice_a(vec![ready("garbage", "")])],
            want: vec![],
            rejected: vec![],
        },
        Case {
            name: "a slice with more endpoints than the API allows is refused whole",
            services: vec![svc_a()],
            slices: vec![slice_a(
                (0..=MAX_ENDPOINTS_PER_SLICE)
                    .map(|i| ready(&format!("10.200.{}.{}", i / 250, i % 250 + 1), ""))
                    .collect(),
            )],
            want: vec![set("a", "", "10.96.0.1:80", &[])],
            rejected: vec![slice_rejected(
                "a-1",
                "endpoints: 1001 entries, more than the 1000 an EndpointSlice may hold",
            )],
        },
    ]);
}

#[test]
fn internal_traffic_policy() {
    let local =
        |service: Service| service.with(|s| spec(s).internal_traffic_policy = Some("Local".into()));
    run(vec![
        Case {
            name: "Local: only this node's endpoints",
            services: vec![local(svc_a())],
            slices: vec![slice_a(vec![
                ready("10.244.1.1", NODE),
                ready("10.244.2.1", "node-2"),
            ])],
            want: vec![set("a", "", "10.96.0.1:80", &[("10.244.1.1:8080", LOCAL)])],
            rejected: vec![],
        },
        Case {
            name: "Local without local endpoints: empty, traffic refused",
            services: vec![local(svc_a())],
            slices: vec![slice_a(vec![ready("10.244.2.1", "node-2")])],
            want: vec![set("a", "", "10.96.0.1:80", &[])],
            rejected: vec![],
        },
        Case {
            name: "Local: a local serving terminating endpoint beats a remote ready one",
            services: vec![local(svc_a())],
            slices: vec![slice_a(vec![
                ready("10.244.2.1", "node-2"),
                terminating("10.244.1.1", NODE, true),
            ])],
            want: vec![set(
                "a",
                "",
                "10.96.0.1:80",
                &[("10.244.1.1:8080", LOCAL_TERMINATING)],
            )],
            rejected: vec![],
        },
        Case {
            name: "Cluster: every endpoint",
            services: vec![
                svc_a().with(|s| spec(s).internal_traffic_policy = Some("Cluster".into())),
            ],
            slices: vec![slice_a(vec![
                ready("10.244.1.1", NODE),
                ready("10.244.2.1", "node-2"),
            ])],
            want: vec![set(
                "a",
                "",
                "10.96.0.1:80",
                &[("10.244.1.1:8080", LOCAL), ("10.244.2.1:8080", REMOTE)],
            )],
            rejected: vec![],
        },
        Case {
            name: "unknown policy",
            services: vec![svc_a().with(|s| spec(s).internal_traffic_policy = Some("Node".into()))],
            slices: vec![],
            want: vec![],
            rejected: vec![svc_rejected(
                "a",
                r#"spec.internalTrafficPolicy: "Node" is not one of Cluster, Local"#,
            )],
        },
    ]);
}

#[test]
fn frontend_conflicts() {
    let taken = |index: usize, frontend: &str, owner: &str, port: &str| {
        format!(
            "spec.ports[{index}]: {frontend}/TCP is already the frontend of Service {owner} \
             port {port:?}"
        )
    };
    run(vec![
        Case {
            name: "the Service that sorts first wins, the other port is rejected",
            services: vec![
                svc("b", "10.96.0.1", vec![tcp("web", 80), tcp("other", 81)]),
                svc_a(),
            ],
            slices: vec![],
            want: vec![
                set("a", "", "10.96.0.1:80", &[]),
                set("b", "other", "10.96.0.1:81", &[]),
            ],
            rejected: vec![svc_rejected(
                "b",
                &taken(0, "10.96.0.1:80", "default/a", ""),
            )],
        },
        Case {
            name: "namespaces sort first",
            services: vec![
                svc_a(),
                svc_a().with(|s| s.metadata.namespace = Some("alpha".into())),
            ],
            slices: vec![],
            want: vec![set("a", "", "10.96.0.1:80", &[]).with(|w| {
                w.0.service.namespace = "alpha".into();
            })],
            rejected: vec![svc_rejected("a", &taken(0, "10.96.0.1:80", "alpha/a", ""))],
        },
        Case {
            name: "the same port twice in one Service",
            services: vec![svc("a", "10.96.0.1", vec![tcp("x", 80), tcp("y", 80)])],
            slices: vec![],
            want: vec![set("a", "x", "10.96.0.1:80", &[])],
            rejected: vec![svc_rejected(
                "a",
                &taken(1, "10.96.0.1:80", "default/a", "x"),
            )],
        },
    ]);
}

#[test]
fn compile_is_deterministic() {
    let store = Store {
        services: [svc_a(), svc("b", "10.96.0.1", vec![tcp("", 80)])]
            .into_iter()
            .map(|s| (object_ref(&s.metadata), s))
            .collect(),
        endpoint_slices: [slice_a(vec![
            ready("10.244.1.1", NODE),
            ready("010.1.1.1", ""),
        ])]
        .into_iter()
        .map(|s| (object_ref(&s.metadata), s.into()))
        .collect(),
    };
    let first = compile(&store, NODE);
    assert_eq!(first, compile(&store.clone(), NODE));
    assert_eq!(first.rejected.len(), 2);
}
