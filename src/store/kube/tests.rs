//! The Kubernetes store against a real kube-apiserver (see `tests/common/kube.rs`).

use std::time::{Duration, UNIX_EPOCH};

use futures::StreamExt;

use super::{kube_process::KubeApiserver, *};

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Namespaces the conformance suite and these tests write to.
const NAMESPACES: &[&str] = &["ns", "other", "elsewhere", "a", "b", "c", "team-a"];

async fn server() -> KubeApiserver {
    let server = KubeApiserver::start().await;
    server.apply_crds(&resources::crds_yaml()).await;
    server.create_namespaces(NAMESPACES).await;
    server
}

fn fast_options(identity: &str) -> KubeOptions {
    let mut options = KubeOptions::new();
    options.election = election::ElectionConfig::new(identity).with_periods(
        Duration::from_secs(3),
        Duration::from_secs(2),
        Duration::from_millis(300),
    );
    options
}

async fn connect(server: &KubeApiserver, identity: &str) -> KubeStore {
    let mut options = fast_options(identity);
    options.kubeconfig = Some(server.kubeconfig());
    KubeStore::connect(options).await.unwrap()
}

async fn next(watch: &mut BoxStream<'static, Event>) -> Event {
    tokio::time::timeout(Duration::from_secs(15), watch.next())
        .await
        .expect("watch event within 15s")
        .expect("watch does not end")
}

async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn conformance() {
    let server = server().await;
    let started = Instant::now();
    crate::store::conformance::run(|| async {
        server
            .kubectl(&[
                "delete",
                "md,sd,sm",
                "--all",
                "--all-namespaces",
                "--wait=true",
            ])
            .await;
        connect(&server, "conformance").await
    })
    .await;
    eprintln!(
        "conformance suite on kube-apiserver took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn objects_as_kubectl_shows_them_and_objects_kubectl_made() {
    let server = server().await;
    let store = connect(&server, "layout").await;
    let key = Key::metadata("team-a", "Greeter Service", "A1B2/sha512:ff");
    let revision = store
        .put(&key, "{\"raw\": 1}\n", at(1_767_225_600_123))
        .await
        .unwrap()
        .revision();
    let name = names::object_name(&key.name);
    let json = server
        .kubectl(&["get", "md", "-n", "team-a", &name, "-o", "json"])
        .await;
    let object: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(object["spec"]["application"], "Greeter Service");
    assert_eq!(object["spec"]["revision"], "A1B2/sha512:ff");
    assert_eq!(object["spec"]["metadataInfo"], "{\"raw\": 1}\n");
    assert_eq!(
        object["metadata"]["annotations"][resources::REFRESHED_AT],
        "2026-01-01T00:00:00.123Z"
    );
    assert_eq!(
        object["metadata"]["resourceVersion"],
        revision.to_string(),
        "the record's revision is the resourceVersion"
    );
    // Selectable by application label; printer columns.
    let table = server
        .kubectl(&[
            "get",
            "md",
            "-n",
            "team-a",
            "-l",
            &format!(
                "{}={}",
                resources::APPLICATION_LABEL,
                names::label_value("Greeter Service")
            ),
        ])
        .await;
    eprintln!("{table}");
    let header = table.lines().next().unwrap();
    for column in ["NAME", "APPLICATION", "REVISION", "LAST REFRESH", "AGE"] {
        assert!(header.contains(column), "{header}");
    }
    assert!(
        table.contains("Greeter Service") && table.contains(&name),
        "{table}"
    );

    // An object made with kubectl under a name of its choosing is a record.
    let mut watch = store.watch();
    assert!(matches!(next(&mut watch).await, Event::Reset { .. }));
    let yaml = "apiVersion: service-definition.networking.dubbo.io/v1\n\
                kind: ServiceDefinition\nmetadata:\n  name: hand-made\n  namespace: team-a\n\
                spec:\n  identifier: org.example.Hand:1.0\n  definition: '{\"by\":\"kubectl\"}'\n";
    server
        .kubectl_stdin(&["apply", "-f", "-"], Some(yaml))
        .await;
    let def = Key::definition("team-a", "org.example.Hand:1.0");
    match next(&mut watch).await {
        Event::Put(record) => {
            assert_eq!(record.key, def);
            assert_eq!(&*record.value, "{\"by\":\"kubectl\"}");
            assert!(record.refreshed_at_ms > 0, "creationTimestamp stands in");
        }
        other => panic!("expected the kubectl object, got {other:?}"),
    }
    // Publishing the same record updates that object instead of making a second one.
    match store.put(&def, "v2", at(5)).await.unwrap() {
        PutOutcome::Updated { previous, .. } => assert_eq!(&*previous, "{\"by\":\"kubectl\"}"),
        other => panic!("expected an update, got {other:?}"),
    }
    let got = server
        .kubectl(&["get", "sd", "-n", "team-a", "-o", "name"])
        .await;
    assert_eq!(
        got.trim(),
        "servicedefinition.service-definition.networking.dubbo.io/hand-made"
    );
    // A spec that names no record is ignored.
    let junk = "apiVersion: metadata.networking.dubbo.io/v1\nkind: Metadata\nmetadata:\n  \
                name: junk\n  namespace: team-a\nspec:\n  application: 'a/b'\n  revision: r\n  \
                metadataInfo: x\n";
    server
        .kubectl_stdin(&["apply", "-f", "-"], Some(junk))
        .await;
    store
        .put(&Key::metadata("team-a", "after", "1"), "v", at(6))
        .await
        .unwrap();
    assert_eq!(
        store
            .list(&ListQuery::all(Kind::Metadata))
            .await
            .unwrap()
            .len(),
        2
    );
    // kubectl delete is a delete.
    server
        .kubectl(&["delete", "sd", "-n", "team-a", "hand-made"])
        .await;
    loop {
        match next(&mut watch).await {
            Event::Delete { key, .. } => {
                assert_eq!(key, def);
                break;
            }
            Event::Put(_) | Event::Refreshed { .. } => {}
            other => panic!("expected the delete, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn refusals_size_namespaces_and_caps() {
    let server = server().await;
    let store = connect(&server, "refusals").await;
    // Over etcd's request limit (1.5 MiB): the API server refuses, the store says why.
    let big = "x".repeat(2 * 1024 * 1024);
    let error = store
        .put(&Key::definition("ns", "big"), &big, at(1))
        .await
        .unwrap_err();
    eprintln!("2 MiB value: {error}");
    assert!(matches!(error, Error::TooLarge(_)), "{error:?}");
    // A value whose JSON escapes push it past the API server's 3 MiB request limit.
    let escaped = "\u{1}".repeat(1024 * 1024);
    let error = store
        .put(&Key::definition("ns", "escaped"), &escaped, at(1))
        .await
        .unwrap_err();
    eprintln!("1 MiB of control characters: {error}");
    assert!(matches!(error, Error::TooLarge(_)), "{error:?}");

    for namespace in ["Not_DNS", "does-not-exist"] {
        let error = store
            .put(&Key::definition(namespace, "svc"), "v", at(1))
            .await
            .unwrap_err();
        eprintln!("namespace {namespace}: {error}");
        assert!(matches!(error, Error::Rejected(_)), "{error:?}");
    }

    let mut options = fast_options("capped");
    options.kubeconfig = Some(server.kubeconfig());
    options.max_records_per_namespace = 1;
    let capped = KubeStore::connect(options).await.unwrap();
    capped
        .put(&Key::metadata("c", "a", "1"), "v", at(1))
        .await
        .unwrap();
    assert!(matches!(
        capped.put(&Key::metadata("c", "a", "2"), "v", at(1)).await,
        Err(Error::NamespaceFull { limit: 1, .. })
    ));
    capped
        .put(&Key::metadata("c", "a", "1"), "v2", at(2))
        .await
        .unwrap();
}

#[tokio::test]
async fn two_stores_share_records_and_elect_one_sweeper() {
    let server = server().await;
    let a = connect(&server, "replica-a").await;
    let b = connect(&server, "replica-b").await;
    let mut watch_b = b.watch();
    assert!(matches!(next(&mut watch_b).await, Event::Reset { .. }));
    let key = Key::metadata("ns", "app", "r");
    let created = a.put(&key, "v1", at(1)).await.unwrap();
    match next(&mut watch_b).await {
        Event::Put(record) => {
            assert_eq!(&*record.value, "v1");
            assert_eq!(record.revision, created.revision());
        }
        other => panic!("expected a put, got {other:?}"),
    }
    assert!(matches!(
        b.put(&key, "v1", at(2)).await.unwrap(),
        PutOutcome::Refreshed { .. }
    ));
    match b.put(&key, "v2", at(3)).await.unwrap() {
        PutOutcome::Updated { previous, .. } => assert_eq!(&*previous, "v1"),
        other => panic!("expected an update, got {other:?}"),
    }
    match a.put(&key, "v3", at(4)).await.unwrap() {
        PutOutcome::Updated { previous, .. } => assert_eq!(&*previous, "v2"),
        other => panic!("expected an update, got {other:?}"),
    }
    assert!(!b.delete(&key, Some(created.revision())).await.unwrap());

    // Exactly one leads.
    let (la, lb) = (a.leadership().unwrap(), b.leadership().unwrap());
    eventually(Duration::from_secs(10), "one replica leads", || async {
        *la.borrow() != *lb.borrow()
    })
    .await;
    let (leader, follower, follower_rx) = if *la.borrow() { (a, b, lb) } else { (b, a, la) };
    for _ in 0..10 {
        assert!(!*follower_rx.borrow(), "two leaders");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lease = server
        .kubectl(&[
            "get",
            "lease",
            "-n",
            "default",
            election::DEFAULT_LEASE_NAME,
            "-o",
            "json",
        ])
        .await;
    eprintln!("{lease}");
    // The leader goes away: it releases the lease and the other takes over quickly.
    let started = Instant::now();
    drop(leader);
    eventually(
        Duration::from_secs(10),
        "the other replica leads",
        || async { *follower_rx.borrow() },
    )
    .await;
    eprintln!("takeover after the leader stopped: {:?}", started.elapsed());
    drop(follower);
}

#[tokio::test]
async fn api_server_down_reads_work_writes_fail_restart_loses_nothing() {
    let mut server = server().await;
    let store = connect(&server, "outage").await;
    let other = connect(&server, "writer").await;
    let (k1, k2, k3) = (
        Key::metadata("ns", "app", "1"),
        Key::metadata("ns", "app", "2"),
        Key::metadata("ns", "app", "3"),
    );
    store.put(&k1, "before", at(1)).await.unwrap();
    let mut watch = store.watch();
    assert!(matches!(next(&mut watch).await, Event::Reset { .. }));
    store.ready().await.unwrap();

    server.kill();
    // With no request of the store's own, the probe finds it; ready() never waits.
    let killed = Instant::now();
    while store.ready().await.is_ok() {
        assert!(
            killed.elapsed() < probe::PROBE_INTERVAL + REQUEST_TIMEOUT,
            "ready() still succeeds"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("unready {:?} after the kill", killed.elapsed());
    let asked = Instant::now();
    let unready = store.ready().await;
    assert!(asked.elapsed() < Duration::from_millis(100));
    assert!(
        matches!(&unready, Err(Error::Unavailable(r)) if r.contains("failing")),
        "{unready:?}"
    );

    let started = Instant::now();
    let failed = store.put(&k2, "during", at(2)).await;
    eprintln!(
        "put with the API server down failed after {:?}: {failed:?}",
        started.elapsed()
    );
    assert!(matches!(failed, Err(Error::Unavailable(_))), "{failed:?}");
    assert!(started.elapsed() < REQUEST_TIMEOUT + Duration::from_secs(1));
    assert!(matches!(
        store.delete(&k1, None).await,
        Err(Error::Unavailable(_))
    ));
    assert!(matches!(store.ready().await, Err(Error::Unavailable(_))));
    assert_eq!(&*store.get(&k1).await.unwrap().unwrap().value, "before");
    assert_eq!(
        store
            .list(&ListQuery::all(Kind::Metadata))
            .await
            .unwrap()
            .len(),
        1
    );
    // A change made while the API server is down, straight in its etcd: after the restart the
    // API server's watch cache starts past our last resourceVersion, so the watch must relist.
    let k4 = Key::metadata("ns", "app", "4");
    let object = serde_json::json!({
        "apiVersion": "metadata.networking.dubbo.io/v1",
        "kind": "Metadata",
        "metadata": {
            "name": "written-in-etcd",
            "namespace": "ns",
            "uid": "00000000-0000-0000-0000-000000000004",
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"application": "app", "revision": "4", "metadataInfo": "from etcd"},
    });
    let mut etcd = etcd_client::Client::connect([server.etcd.endpoint()], None)
        .await
        .unwrap();
    etcd.put(
        "/registry/metadata.networking.dubbo.io/metadata/ns/written-in-etcd",
        object.to_string(),
        None,
    )
    .await
    .unwrap();

    server.restart().await;
    let restarted = Instant::now();
    // Writes from another replica right after the restart, while our watch reconnects.
    eventually(Duration::from_secs(20), "writes succeed again", || async {
        other.put(&k2, "after", at(3)).await.is_ok()
    })
    .await;
    other.put(&k1, "changed", at(4)).await.unwrap();
    other.put(&k3, "new", at(5)).await.unwrap();
    assert!(other.delete(&k2, None).await.unwrap());
    // Every change arrives: as events, or as a reset after a relist.
    eventually(Duration::from_secs(20), "the mirror follows", || async {
        store
            .get(&k1)
            .await
            .unwrap()
            .is_some_and(|r| &*r.value == "changed")
            && store.get(&k3).await.unwrap().is_some()
            && store.get(&k2).await.unwrap().is_none()
            && store
                .get(&k4)
                .await
                .unwrap()
                .is_some_and(|r| &*r.value == "from etcd")
    })
    .await;
    eprintln!(
        "mirror caught up {:?} after the restart",
        restarted.elapsed()
    );
    let (mut seen_k1, mut seen_k3, mut seen_k4, mut resets) = (false, false, false, 0);
    while !(seen_k1 && seen_k3 && seen_k4) {
        match next(&mut watch).await {
            Event::Put(r) if r.key == k1 => seen_k1 = &*r.value == "changed",
            Event::Put(r) if r.key == k3 => seen_k3 = true,
            Event::Put(r) if r.key == k4 => seen_k4 = true,
            Event::Reset { records, .. } => {
                resets += 1;
                seen_k1 = records
                    .iter()
                    .any(|r| r.key == k1 && &*r.value == "changed");
                seen_k3 = records.iter().any(|r| r.key == k3);
                seen_k4 = records.iter().any(|r| r.key == k4);
            }
            _ => {}
        }
    }
    eprintln!("watchers got {resets} reset(s) after the restart");
    store.ready().await.unwrap();
    store.put(&k2, "again", at(6)).await.unwrap();
}

#[tokio::test]
async fn connect_fails_clearly_without_crds() {
    let server = KubeApiserver::start().await;
    let mut options = fast_options("no-crds");
    options.kubeconfig = Some(server.kubeconfig());
    let started = Instant::now();
    let error = KubeStore::connect(options).await.unwrap_err();
    eprintln!("without CRDs: {error}");
    assert!(matches!(error, Error::Unavailable(_)), "{error:?}");
    assert!(error.to_string().contains("crds"), "{error}");
    assert!(started.elapsed() < STARTUP_TIMEOUT + Duration::from_secs(2));
}
