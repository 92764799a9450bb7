//! The fake API server through the real kube client and kube-runtime's watcher and reflector, as
//! the agent uses them. All but the last test run unprivileged on 127.0.0.1; the last one makes a
//! network namespace and so needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN), failing without it.

use std::future::ready;
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::watch_object;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config, ResourceExt};
use proxy_testbed::Testbed;
use proxy_testbed::apiserver::{FakeApiServer, Kind};
use serde_json::{Value, json};

/// The longest any convergence may take; tests normally converge in milliseconds.
const CONVERGE: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);
/// The watchers' pause after an error: short, but long enough that a change made right after a
/// fault lands before the watcher's next request.
const BACKOFF: Duration = Duration::from_millis(200);

/// kube-runtime's backoff with a fixed pause, so tests are fast and deterministic.
struct Fixed(Duration);

impl Iterator for Fixed {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(self.0)
    }
}

impl Backoff for Fixed {
    fn reset(&mut self) {}
}

fn client(server: &FakeApiServer) -> Client {
    let url = server.url().parse().unwrap();
    Client::try_from(Config::new(url)).unwrap()
}

fn service(namespace: &str, name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": namespace, "name": name, "labels": labels},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "TCP"}]},
    })
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
}

/// A reflector over services, driven on its own task with [`BACKOFF`] after errors.
fn reflect(api: Api<Service>, config: watcher::Config) -> Store<Service> {
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config)).backoff(Fixed(BACKOFF));
    tokio::spawn(stream.for_each(|_| ready(())));
    reader
}

/// `namespace/name` of everything in a reflector's store, sorted.
fn names(store: &Store<Service>) -> Vec<String> {
    let mut names: Vec<_> = store
        .state()
        .iter()
        .map(|s| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()))
        .collect();
    names.sort();
    names
}

/// Waits until `done` holds, failing with `what` after [`CONVERGE`].
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < CONVERGE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn api_error(result: kube::Result<impl std::fmt::Debug>) -> Box<kube::core::Status> {
    match result {
        Err(kube::Error::Api(status)) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn lists_in_pages_sorted_by_namespace_and_name() {
    let server = FakeApiServer::start_local();
    for i in 0..25 {
        let namespace = if i % 2 == 0 { "b" } else { "a" };
        server.apply(service(namespace, &format!("svc-{i:02}"), json!({})));
    }
    let api = Api::<Service>::all(client(&server));

    let mut pages = Vec::new();
    let mut names = Vec::new();
    let mut params = ListParams::default().limit(10);
    loop {
        let page = api.list(&params).await.unwrap();
        assert_eq!(
            page.metadata.resource_version,
            Some(server.resource_version().to_string())
        );
        pages.push(page.items.len());
        names.extend(
            page.items
                .iter()
                .map(|s| format!("{}/{}", s.namespace().unwrap(), s.name_any())),
        );
        match page.metadata.continue_ {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    assert_eq!(pages, [10, 10, 5]);
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(names, sorted, "every item once, in namespace/name order");
    assert_eq!(names.len(), 25);
    assert_eq!(server.list_count(Kind::Service), 3);

    let in_a = Api::<Service>::namespaced(client(&server), "a");
    let items = in_a.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(items.len(), 12);
    assert!(items.iter().all(|s| s.namespace().as_deref() == Some("a")));
    // Other kinds are listed with their own list kind and empty.
    let slices = Api::<EndpointSlice>::all(client(&server));
    assert!(
        slices
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn garbage_continue_tokens_are_400_and_compacted_ones_410() {
    let server = FakeApiServer::start_local();
    for i in 0..3 {
        server.apply(service("default", &format!("s{i}"), json!({})));
    }
    let api = Api::<Service>::all(client(&server));

    let garbage = ListParams::default().limit(1).continue_token("not-a-token");
    assert_eq!(api_error(api.list(&garbage).await).code, 400);

    let first = api.list(&ListParams::default().limit(1)).await.unwrap();
    let token = first.metadata.continue_.unwrap();
    server.apply(service("default", "s9", json!({})));
    server.compact();
    let next = ListParams::default().limit(1).continue_token(&token);
    let status = api_error(api.list(&next).await);
    assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
}

#[tokio::test]
async fn watch_sends_added_modified_deleted_in_order_and_replays_them() {
    let server = FakeApiServer::start_local();
    server.apply(node("unrelated"));
    let from = server.resource_version().to_string();
    let api = Api::<Service>::all(client(&server));
    let params = WatchParams::default().disable_bookmarks();
    let mut live = api.watch(&params, &from).await.unwrap().boxed();

    let added = server.apply(service("default", "web", json!({})));
    let modified = server.apply(service("default", "web", json!({"tier": "front"})));
    let deleted = server.delete(Kind::Service, "default", "web").unwrap();
    assert!(added < modified && modified < deleted);

    let expect = |event: WatchEvent<Service>| match event {
        WatchEvent::Added(s) => ("ADDED", s.resource_version().unwrap()),
        WatchEvent::Modified(s) => ("MODIFIED", s.resource_version().unwrap()),
        WatchEvent::Deleted(s) => ("DELETED", s.resource_version().unwrap()),
        other => panic!("unexpected {other:?}"),
    };
    let wanted = [
        ("ADDED", added.to_string()),
        ("MODIFIED", modified.to_string()),
        ("DELETED", deleted.to_string()),
    ];
    for want in &wanted {
        assert_eq!(&expect(live.try_next().await.unwrap().unwrap()), want);
    }

    // A watch opened later from the same resourceVersion gets the same events from the history.
    let mut replay = api.watch(&params, &from).await.unwrap().boxed();
    for want in &wanted {
        assert_eq!(&expect(replay.try_next().await.unwrap().unwrap()), want);
    }
    assert_eq!(server.watch_count(Kind::Service), 2);
}

#[tokio::test]
async fn watch_from_zero_starts_with_the_current_state() {
    let server = FakeApiServer::start_local();
    server.apply(service("default", "a", json!({})));
    server.apply(service("default", "b", json!({})));
    let api = Api::<Service>::all(client(&server));
    let params = WatchParams::default().disable_bookmarks();
    let mut events = api.watch(&params, "0").await.unwrap().boxed();
    server.apply(service("default", "c", json!({})));
    for name in ["a", "b", "c"] {
        match events.try_next().await.unwrap().unwrap() {
            WatchEvent::Added(s) => assert_eq!(s.name_any(), name),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn watch_from_a_compacted_version_gets_one_410_error_event() {
    let server = FakeApiServer::start_local();
    server.apply(node("n1"));
    let old = server.apply(service("default", "a", json!({})));
    server.apply(service("default", "b", json!({})));
    server.compact();
    let compacted = server.resource_version();
    let api = Api::<Service>::all(client(&server));
    let mut events = api
        .watch(&WatchParams::default(), &(old - 1).to_string())
        .await
        .unwrap()
        .boxed();
    match events.try_next().await.unwrap().unwrap() {
        WatchEvent::Error(status) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert_eq!(
                status.message,
                format!("too old resource version: {} ({compacted})", old - 1)
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        events.try_next().await.unwrap().is_none(),
        "the stream ends"
    );
}

#[tokio::test]
async fn bookmarks_carry_the_global_resource_version() {
    let server = FakeApiServer::start_local();
    server.set_bookmark_interval(Duration::from_millis(50));
    let api = Api::<Service>::all(client(&server));
    let mut events = api
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    // A change to another kind moves the one counter; the service watch learns it by bookmark.
    let rv = server.apply(node("n1"));
    loop {
        match events.try_next().await.unwrap().unwrap() {
            WatchEvent::Bookmark(bookmark)
                if bookmark.metadata.resource_version == rv.to_string() =>
            {
                assert_eq!(bookmark.types.kind, "Service");
                assert_eq!(bookmark.types.api_version, "v1");
                break;
            }
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn watch_ends_at_its_timeout() {
    let server = FakeApiServer::start_local();
    let api = Api::<Service>::all(client(&server));
    let start = Instant::now();
    let events = api
        .watch(&WatchParams::default().timeout(1).disable_bookmarks(), "0")
        .await
        .unwrap();
    assert_eq!(events.count().await, 0);
    let took = start.elapsed();
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(2)).contains(&took),
        "{took:?}"
    );
}

#[tokio::test]
async fn reflector_converges_to_the_servers_objects() {
    let server = FakeApiServer::start_local();
    for name in ["a", "b", "c"] {
        server.apply(service("default", name, json!({})));
    }
    let api = Api::<Service>::all(client(&server));
    // Pages of two, so the initial list takes two requests.
    let store = reflect(api, watcher::Config::default().page_size(2));
    store.wait_until_ready().await.unwrap();
    assert_eq!(names(&store), ["default/a", "default/b", "default/c"]);
    assert_eq!(server.list_count(Kind::Service), 2);

    server.delete(Kind::Service, "default", "a");
    server.apply(service("other", "d", json!({})));
    server.apply(service("default", "b", json!({"changed": "yes"})));
    eventually("the changes", || {
        names(&store) == ["default/b", "default/c", "other/d"]
            && store
                .state()
                .iter()
                .any(|s| s.labels().get("changed").is_some())
    })
    .await;
}

#[tokio::test]
async fn streaming_list_watcher_converges_without_listing() {
    let server = FakeApiServer::start_local();
    server.apply(service("default", "a", json!({})));
    let api = Api::<Service>::all(client(&server));
    let store = reflect(api, watcher::Config::default().streaming_lists());
    store.wait_until_ready().await.unwrap();
    assert_eq!(names(&store), ["default/a"]);
    server.apply(service("default", "b", json!({})));
    eventually("b", || names(&store) == ["default/a", "default/b"]).await;
    assert_eq!(server.list_count(Kind::Service), 0);
    assert_eq!(server.watch_count(Kind::Service), 1);
}

#[tokio::test]
async fn after_expire_watches_the_reflector_relists_once_and_sees_changes_made_meanwhile() {
    let server = FakeApiServer::start_local();
    server.apply(service("default", "a", json!({})));
    let store = reflect(
        Api::<Service>::all(client(&server)),
        watcher::Config::default(),
    );
    store.wait_until_ready().await.unwrap();
    let lists = server.list_count(Kind::Service);
    // Let the watch start, so that it is there to expire.
    eventually("the watch", || server.watch_count(Kind::Service) == 1).await;

    server.expire_watches();
    // The watcher is in its backoff now: these land between the expiry and the re-list.
    server.delete(Kind::Service, "default", "a");
    server.apply(service("default", "late", json!({})));
    eventually("the re-list", || names(&store) == ["default/late"]).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(server.list_count(Kind::Service), lists + 1);
}

#[tokio::test]
async fn after_restart_the_watcher_relists_from_a_compacted_version() {
    let server = FakeApiServer::start_local();
    server.apply(service("default", "a", json!({})));
    let store = reflect(
        Api::<Service>::all(client(&server)),
        watcher::Config::default().disable_bookmarks(),
    );
    store.wait_until_ready().await.unwrap();
    eventually("the watch", || server.watch_count(Kind::Service) == 1).await;

    // The watcher's resourceVersion is a's; this moves the counter past it, so after the restart
    // the watcher's resume is too old.
    server.apply(node("n1"));
    server.restart();
    server.apply(service("default", "b", json!({})));
    eventually("b", || names(&store) == ["default/a", "default/b"]).await;
    assert_eq!(server.list_count(Kind::Service), 2);
}

#[tokio::test]
async fn bookmarks_let_the_watcher_resume_after_restart_without_relisting() {
    let server = FakeApiServer::start_local();
    server.set_bookmark_interval(Duration::from_millis(50));
    server.apply(service("default", "a", json!({})));
    let store = reflect(
        Api::<Service>::all(client(&server)),
        watcher::Config::default(),
    );
    store.wait_until_ready().await.unwrap();
    eventually("the watch", || server.watch_count(Kind::Service) == 1).await;

    server.apply(node("n1"));
    // A bookmark brings the watcher to n1's resourceVersion, the compaction point of the restart.
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.restart();
    server.apply(service("default", "b", json!({})));
    eventually("b", || names(&store) == ["default/a", "default/b"]).await;
    assert_eq!(
        server.list_count(Kind::Service),
        1,
        "resumed, not re-listed"
    );
    assert_eq!(server.watch_count(Kind::Service), 2);
}

#[tokio::test]
async fn the_watcher_recovers_from_refused_connections() {
    let server = FakeApiServer::start_local();
    server.apply(service("default", "a", json!({})));
    server.apply(service("default", "b", json!({})));
    let store = reflect(
        Api::<Service>::all(client(&server)),
        watcher::Config::default(),
    );
    store.wait_until_ready().await.unwrap();

    server.refuse_connections(true);
    let refused = TcpStream::connect(server.addr()).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    server.delete(Kind::Service, "default", "a");
    server.apply(service("default", "c", json!({})));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        names(&store),
        ["default/a", "default/b"],
        "nothing gets through"
    );

    server.refuse_connections(false);
    eventually("the outage's changes", || {
        names(&store) == ["default/b", "default/c"]
    })
    .await;
}

#[tokio::test]
async fn label_selectors_filter_lists_and_watches() {
    const PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
    let server = FakeApiServer::start_local();
    server.apply(service("default", "ours", json!({"app": "web"})));
    server.apply(service("default", "theirs", json!({PROXY_NAME: "other"})));
    let api = Api::<Service>::all(client(&server));

    let selector = format!("!{PROXY_NAME}");
    let store = reflect(api.clone(), watcher::Config::default().labels(&selector));
    store.wait_until_ready().await.unwrap();
    assert_eq!(names(&store), ["default/ours"]);

    // Gaining the label takes it out of the selection: watchers see it deleted; losing it, added.
    server.apply(service("default", "ours", json!({PROXY_NAME: "other"})));
    eventually("ours to leave", || names(&store).is_empty()).await;
    server.apply(service("default", "theirs", json!({})));
    eventually("theirs to join", || names(&store) == ["default/theirs"]).await;

    let listed = |selector: String| {
        let api = api.clone();
        async move {
            let list = api.list(&ListParams::default().labels(&selector)).await;
            list.map(|l| l.items.iter().map(|s| s.name_any()).collect::<Vec<_>>())
        }
    };
    assert_eq!(
        listed("app in (web,db)".into()).await.unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        listed("app notin (web)".into()).await.unwrap(),
        ["ours", "theirs"]
    );
    assert_eq!(
        listed(format!("{PROXY_NAME}=other")).await.unwrap(),
        ["ours"]
    );
    assert_eq!(api_error(listed("app > 1".into()).await).code, 400);
}

#[tokio::test]
async fn field_selectors_pick_nodes_by_name() {
    let server = FakeApiServer::start_local();
    server.apply(node("n1"));
    server.apply(node("n2"));
    let api = Api::<Node>::all(client(&server));
    let names = |params: ListParams| {
        let api = api.clone();
        async move {
            let items = api.list(&params).await.unwrap().items;
            items.iter().map(|n| n.name_any()).collect::<Vec<_>>()
        }
    };
    assert_eq!(
        names(ListParams::default().fields("metadata.name=n2")).await,
        ["n2"]
    );
    assert_eq!(
        names(ListParams::default().fields("metadata.name!=n2")).await,
        ["n1"]
    );
    let unsupported = api
        .list(&ListParams::default().fields("spec.unschedulable=true"))
        .await;
    assert_eq!(api_error(unsupported).code, 400);

    // kube-runtime's watch_object watches with a metadata.name field selector.
    let mut n1 = watch_object(api.clone(), "n1").boxed();
    assert_eq!(
        n1.try_next().await.unwrap().unwrap().unwrap().name_any(),
        "n1"
    );
    server.delete(Kind::Node, "", "n2");
    server.delete(Kind::Node, "", "n1");
    assert!(
        n1.try_next().await.unwrap().unwrap().is_none(),
        "n1 deleted"
    );
}

#[tokio::test]
async fn failing_requests_are_api_errors_with_a_status() {
    let server = FakeApiServer::start_local();
    let api = Api::<Service>::all(client(&server));
    server.fail_requests(Some(500));
    let status = api_error(api.list(&ListParams::default()).await);
    assert_eq!(
        (status.code, status.reason.as_str()),
        (500, "InternalError")
    );
    assert_eq!(
        server.list_count(Kind::Service),
        0,
        "failed requests are not counted"
    );
    server.fail_requests(None);
    assert!(api.list(&ListParams::default()).await.is_ok());
}

#[tokio::test]
async fn stalled_watches_send_nothing_and_never_recover() {
    let server = FakeApiServer::start_local();
    server.set_bookmark_interval(Duration::from_millis(20));
    let api = Api::<Service>::all(client(&server));
    let mut open = api
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();

    server.stall_watches(true);
    server.apply(service("default", "a", json!({})));
    assert!(
        tokio::time::timeout(QUIET, open.next()).await.is_err(),
        "no event, no bookmark"
    );
    let new = tokio::time::timeout(QUIET, api.watch(&WatchParams::default(), "0")).await;
    assert!(new.is_err(), "a new watch gets no answer");
    // Lists still work: only watches are dead.
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );

    server.stall_watches(false);
    assert!(
        tokio::time::timeout(QUIET, open.next()).await.is_err(),
        "still dead"
    );
    let mut fresh = api
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    match fresh.try_next().await.unwrap().unwrap() {
        WatchEvent::Added(s) => assert_eq!(s.name_any(), "a"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn kubeconfig_version_and_unknown_paths() {
    let server = FakeApiServer::start_local();
    let path = std::env::temp_dir().join(format!(
        "fake-apiserver-{}-{}.kubeconfig",
        std::process::id(),
        server.addr().port()
    ));
    server.write_kubeconfig(&path).unwrap();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    assert_eq!(config.cluster_url.to_string(), format!("{}/", server.url()));
    let client = Client::try_from(config).unwrap();

    let version = client.apiserver_version().await.unwrap();
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "34")
    );
    server.apply(service("default", "a", json!({})));
    // The kubeconfig's namespace is the client's default one.
    let services = Api::<Service>::default_namespaced(client.clone());
    assert_eq!(
        services
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );

    let pods = Api::<Pod>::all(client);
    let status = api_error(pods.list(&ListParams::default()).await);
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
}

/// Root: the listener lives in a node's network namespace and the server is started from outside
/// it; listening again after refused connections must happen in that namespace.
#[test]
fn listens_again_inside_the_listeners_network_namespace() {
    let mut testbed = Testbed::new().unwrap_or_else(|err| panic!("{err:#}"));
    let node = testbed.add_node("api").unwrap();
    let (netns, addr) = (node.netns, SocketAddrV4::new(node.underlay_addr, 6443));
    let server = FakeApiServer::start(netns.tcp_listen(addr).unwrap());
    let version = || -> std::io::Result<String> {
        let mut stream = netns.tcp_connect(addr, Duration::from_secs(1))?;
        stream.write_all(b"GET /version HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    };
    assert!(version().unwrap().contains("\"minor\":\"34\""));

    server.refuse_connections(true);
    let refused = version().unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    server.refuse_connections(false);
    let start = Instant::now();
    let answer = loop {
        match version() {
            Ok(answer) => break answer,
            Err(err) => assert!(start.elapsed() < CONVERGE, "not listening again: {err}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
}
