//! The conformance suite every [`Store`] backend passes.
//!
//! `run(make)` calls `make` for a fresh, empty store per case, so cases do not share state.

use std::{
    future::Future,
    time::{Duration, UNIX_EPOCH},
};

use futures::StreamExt;

use super::{Event, Key, Kind, ListQuery, PutOutcome, Store};

fn at(ms: u64) -> std::time::SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Runs every case against stores made by `make`.
pub(crate) async fn run<F, Fut, S>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
    S: Store,
{
    put_get_refresh_update(make().await).await;
    raw_values_are_byte_exact(make().await).await;
    conditional_delete(make().await).await;
    list_and_paginate(make().await).await;
    namespaces_and_kinds_are_isolated(make().await).await;
    watch_starts_with_reset_then_follows(make().await).await;
    refresh_racing_delete_wins(make().await).await;
    concurrent_puts_all_land(make().await).await;
    mappings_have_one_lease_per_application(make().await).await;
}

async fn put_get_refresh_update(store: impl Store) {
    let key = Key::metadata("ns", "app", "rev1");
    assert_eq!(store.get(&key).await.unwrap(), None);
    let created = store.put(&key, "v1", at(1_000)).await.unwrap();
    assert!(matches!(created, PutOutcome::Created { .. }), "{created:?}");
    let record = store.get(&key).await.unwrap().unwrap();
    assert_eq!(&*record.value, "v1");
    assert_eq!(record.refreshed_at_ms, 1_000);
    assert_eq!(record.revision, created.revision());

    let refreshed = store.put(&key, "v1", at(2_000)).await.unwrap();
    assert!(
        matches!(refreshed, PutOutcome::Refreshed { .. }),
        "{refreshed:?}"
    );
    // A refresh the embedded store keeps in memory leaves the revision as it was.
    assert!(refreshed.revision() >= created.revision());
    let record = store.get(&key).await.unwrap().unwrap();
    assert_eq!(record.refreshed_at_ms, 2_000);
    assert_eq!(record.revision, refreshed.revision());

    let updated = store.put(&key, "v2", at(3_000)).await.unwrap();
    match updated {
        PutOutcome::Updated { previous, revision } => {
            assert_eq!(&*previous, "v1");
            assert!(revision > refreshed.revision());
            assert!(revision > created.revision());
        }
        other => panic!("expected Updated, got {other:?}"),
    }
    assert_eq!(&*store.get(&key).await.unwrap().unwrap().value, "v2");
}

async fn raw_values_are_byte_exact(store: impl Store) {
    let values = [
        String::new(),
        "  leading and trailing spaces  ".to_string(),
        "中文 metadata ✓ \u{1F600}".to_string(),
        "{\"app\":\"a\",\"services\":{}}\n\t".to_string(),
        "x".repeat(1024 * 1024),
    ];
    for (i, value) in values.iter().enumerate() {
        let key = Key::definition("ns", &format!("org.example.Service{i}:1.0.0::provider:app"));
        store.put(&key, value, at(1)).await.unwrap();
        assert_eq!(
            &*store.get(&key).await.unwrap().unwrap().value,
            value.as_str()
        );
    }
}

async fn conditional_delete(store: impl Store) {
    let key = Key::definition("ns", "svc");
    let rev = store.put(&key, "v", at(1)).await.unwrap().revision();
    assert!(!store.delete(&key, Some(rev + 1000)).await.unwrap());
    assert!(store.get(&key).await.unwrap().is_some());
    assert!(store.delete(&key, Some(rev)).await.unwrap());
    assert!(store.get(&key).await.unwrap().is_none());
    assert!(
        !store.delete(&key, None).await.unwrap(),
        "deleting a missing key"
    );
    store.put(&key, "v", at(1)).await.unwrap();
    assert!(store.delete(&key, None).await.unwrap());
}

async fn list_and_paginate(store: impl Store) {
    for app in ["a", "b", "c"] {
        for rev in ["1", "2"] {
            store
                .put(&Key::metadata("ns", app, rev), "v", at(1))
                .await
                .unwrap();
        }
    }
    store
        .put(&Key::metadata("other", "a", "1"), "v", at(1))
        .await
        .unwrap();
    let all = store.list(&ListQuery::all(Kind::Metadata)).await.unwrap();
    assert_eq!(all.len(), 7);
    let names: Vec<_> = all
        .iter()
        .map(|r| format!("{}:{}", r.key.namespace, r.key.name))
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "ordered by (namespace, name)");

    let mut query = ListQuery {
        namespace: Some("ns".into()),
        name_prefix: "b/".into(),
        ..ListQuery::all(Kind::Metadata)
    };
    let b: Vec<_> = store
        .list(&query)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.key.name)
        .collect();
    assert_eq!(b, vec!["b/1", "b/2"]);

    query.name_prefix.clear();
    query.limit = 4;
    let page1 = store.list(&query).await.unwrap();
    assert_eq!(page1.len(), 4);
    let last = page1.last().unwrap().key.clone();
    query.start_after = Some((last.namespace, last.name));
    let page2 = store.list(&query).await.unwrap();
    assert_eq!(page2.len(), 2);
    assert_eq!(page2[0].key.name, "c/1");
    assert!(
        store
            .list(&ListQuery::all(Kind::Definition))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn namespaces_and_kinds_are_isolated(store: impl Store) {
    store
        .put(&Key::metadata("a", "app", "r"), "in a", at(1))
        .await
        .unwrap();
    store
        .put(&Key::metadata("b", "app", "r"), "in b", at(1))
        .await
        .unwrap();
    store
        .put(&Key::definition("a", "app/r"), "definition", at(1))
        .await
        .unwrap();
    let get = |ns: &str| Key::metadata(ns, "app", "r");
    assert_eq!(&*store.get(&get("a")).await.unwrap().unwrap().value, "in a");
    assert_eq!(&*store.get(&get("b")).await.unwrap().unwrap().value, "in b");
    assert!(store.get(&get("c")).await.unwrap().is_none());
    assert_eq!(
        &*store
            .get(&Key::definition("a", "app/r"))
            .await
            .unwrap()
            .unwrap()
            .value,
        "definition"
    );
}

async fn watch_starts_with_reset_then_follows(store: impl Store) {
    let key = Key::metadata("ns", "app", "r");
    store.put(&key, "v1", at(1)).await.unwrap();
    let mut watch = store.watch();
    let Event::Reset { records, revision } = next(&mut watch).await else {
        panic!("first event must be a reset");
    };
    assert_eq!(records.len(), 1);
    assert_eq!(&*records[0].value, "v1");
    assert!(revision >= records[0].revision);

    store.put(&key, "v2", at(2)).await.unwrap();
    match next(&mut watch).await {
        Event::Put(record) => assert_eq!(&*record.value, "v2"),
        other => panic!("expected put, got {other:?}"),
    }
    store.put(&key, "v2", at(3)).await.unwrap();
    match next(&mut watch).await {
        Event::Refreshed {
            key: k,
            refreshed_at_ms,
            ..
        } => {
            assert_eq!(k, key);
            assert_eq!(refreshed_at_ms, 3);
        }
        other => panic!("expected refresh, got {other:?}"),
    }
    store.delete(&key, None).await.unwrap();
    match next(&mut watch).await {
        Event::Delete { key: k, .. } => assert_eq!(k, key),
        other => panic!("expected delete, got {other:?}"),
    }
}

async fn next(watch: &mut futures::stream::BoxStream<'static, Event>) -> Event {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("watch event within 10s")
        .expect("watch does not end")
}

async fn refresh_racing_delete_wins(store: impl Store) {
    // The sweeper read the record at `stale`, then a publish refreshed it: the conditional
    // delete must fail and the record must stay. (On the clock: a store that keeps
    // refreshes in memory asks the lease whether it still runs.)
    let key = Key::metadata("ns", "app", "r");
    let now = std::time::SystemTime::now();
    let stale = store
        .put(&key, "v", now - Duration::from_secs(1))
        .await
        .unwrap()
        .revision();
    store.put(&key, "v", now).await.unwrap();
    assert!(!store.delete(&key, Some(stale)).await.unwrap());
    assert!(store.get(&key).await.unwrap().is_some());
}

async fn concurrent_puts_all_land(store: impl Store) {
    let store = std::sync::Arc::new(store);
    let mut tasks = Vec::new();
    for i in 0..64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let key = Key::metadata("ns", &format!("app{i}"), "r");
            store.put(&key, &format!("value {i}"), at(1)).await.unwrap()
        }));
    }
    let mut revisions = Vec::new();
    for task in tasks {
        revisions.push(task.await.unwrap().revision());
    }
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(revisions.len(), 64, "every write has its own revision");
    for i in 0..64 {
        let key = Key::metadata("ns", &format!("app{i}"), "r");
        assert_eq!(
            &*store.get(&key).await.unwrap().unwrap().value,
            format!("value {i}")
        );
    }
}

async fn mappings_have_one_lease_per_application(store: impl Store) {
    // Same names under another kind must not collide with mappings.
    store
        .put(&Key::definition("ns", "org.Api/a"), "definition", at(1))
        .await
        .unwrap();
    let a = Key::mapping("ns", "org.Api", "a");
    let b = Key::mapping("ns", "org.Api", "b");
    let other = Key::mapping("ns", "org.Api2", "a");
    let created_a = store.put(&a, "", at(1_000)).await.unwrap();
    assert!(
        matches!(created_a, PutOutcome::Created { .. }),
        "{created_a:?}"
    );
    store.put(&b, "", at(1_000)).await.unwrap();
    store.put(&other, "", at(1_000)).await.unwrap();
    store
        .put(&Key::mapping("elsewhere", "org.Api", "c"), "", at(1_000))
        .await
        .unwrap();
    // Re-registering refreshes only that application's lease.
    let refreshed_b = store.put(&b, "", at(5_000)).await.unwrap();
    assert!(
        matches!(refreshed_b, PutOutcome::Refreshed { .. }),
        "{refreshed_b:?}"
    );
    assert_eq!(store.get(&a).await.unwrap().unwrap().refreshed_at_ms, 1_000);
    assert_eq!(store.get(&b).await.unwrap().unwrap().refreshed_at_ms, 5_000);
    let query = ListQuery {
        namespace: Some("ns".into()),
        name_prefix: "org.Api/".into(),
        ..ListQuery::all(Kind::Mapping)
    };
    let names: Vec<_> = store
        .list(&query)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            r.key
                .interface_application()
                .map(|(i, app)| format!("{i} {app}"))
        })
        .collect();
    assert_eq!(
        names,
        vec![Some("org.Api a".to_string()), Some("org.Api b".to_string())]
    );
    // One application expires alone: a conditional delete at its own revision.
    assert!(store.delete(&a, Some(created_a.revision())).await.unwrap());
    assert!(store.get(&a).await.unwrap().is_none());
    assert!(store.get(&b).await.unwrap().is_some());
    assert_eq!(
        store
            .list(&ListQuery::all(Kind::Mapping))
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        store
            .list(&ListQuery::all(Kind::Definition))
            .await
            .unwrap()
            .len(),
        1
    );
    let mut watch = store.watch();
    let Event::Reset { records, .. } = next(&mut watch).await else {
        panic!("first event must be a reset");
    };
    assert_eq!(
        records
            .iter()
            .filter(|r| r.key.kind == Kind::Mapping)
            .count(),
        3
    );
}
