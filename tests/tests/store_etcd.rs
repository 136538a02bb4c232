//! The etcd store against a real etcd member: registration layout, listing, TTL leases,
//! failover between members, watches (order, resume after a restart, compaction) and errors.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use switchboard::store::{EtcdClient, WatchBatch, WatchEvent, WatchStream};
use switchboard::{RegistryUri, Service, Store, StoreError};
use switchboard_tests::*;

/// Upper bound for any single wait on etcd in these tests.
const WAIT: Duration = Duration::from_secs(15);

fn service(id: &str, name: &str, port: u16) -> Service {
    Service {
        id: id.into(),
        name: name.into(),
        address: "10.1.2.3".into(),
        port,
        tags: vec!["blue".into(), "v2".into()],
        meta: BTreeMap::from([("owner".to_string(), "ops".to_string())]),
        check: None,
        ttl: None,
        docker_health: None,
    }
}

fn store(uri: &str) -> Store {
    Store::new(&RegistryUri::parse(uri).unwrap())
}

fn client(uri: &str) -> EtcdClient {
    match RegistryUri::parse(uri).unwrap() {
        RegistryUri::Etcd { endpoints, .. } => EtcdClient::new(endpoints),
        other => panic!("not an etcd URI: {other:?}"),
    }
}

/// The next batch, failing the test if none comes within [`WAIT`].
async fn next_batch(w: &mut WatchStream) -> Result<Option<WatchBatch>, StoreError> {
    tokio::time::timeout(WAIT, w.next())
        .await
        .expect("watch batch within the deadline")
}

/// Reads batches until `n` events have arrived; returns them with the last batch's revision.
async fn read_events(w: &mut WatchStream, n: usize) -> (Vec<WatchEvent>, i64) {
    let mut events = Vec::new();
    let mut revision = 0;
    while events.len() < n {
        let batch = next_batch(w).await.unwrap().expect("stream still open");
        assert!(batch.revision >= revision, "header revisions go backwards");
        revision = batch.revision;
        events.extend(batch.events);
    }
    (events, revision)
}

fn event_revision(e: &WatchEvent) -> i64 {
    match e {
        WatchEvent::Put(kv) => kv.mod_revision,
        WatchEvent::Delete { mod_revision, .. } => *mod_revision,
    }
}

/// (kind, key, value) of an event, for comparisons that ignore revisions.
fn summary(e: &WatchEvent) -> (&'static str, String, String) {
    match e {
        WatchEvent::Put(kv) => (
            "put",
            kv.key.clone(),
            String::from_utf8_lossy(&kv.value).into_owned(),
        ),
        WatchEvent::Delete { key, .. } => ("delete", key.clone(), String::new()),
    }
}

#[tokio::test]
async fn register_list_deregister() {
    let etcd = Etcd::start().await;
    let store = store(&etcd.uri("services"));
    assert_eq!(store.kind(), "etcd");
    store.ping().await.unwrap();

    let mine = service("h1:web:80", "web", 8080);
    let other = service("h2:web:80", "web", 8081);
    store.register(&mine).await.unwrap();
    store.register(&mine).await.unwrap(); // idempotent
    store.register(&other).await.unwrap();

    let kvs = etcd.get_prefix("/services/").await;
    let keys: Vec<&str> = kvs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["/services/web/h1:web:80", "/services/web/h2:web:80"]);
    let json: serde_json::Value = serde_json::from_str(&kvs[0].1).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "id": "h1:web:80", "name": "web", "address": "10.1.2.3", "port": 8080,
            "tags": ["blue", "v2"], "meta": {"owner": "ops"},
        })
    );

    let listed = store.list("h1:").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0], mine);
    assert_eq!(store.list("").await.unwrap().len(), 2);

    store.deregister(&mine).await.unwrap();
    assert_eq!(
        etcd.get_prefix("/services/").await,
        vec![("/services/web/h2:web:80".to_string(), kvs[1].1.clone())]
    );
    assert!(store.list("h1:").await.unwrap().is_empty());
    // Removing what is not there is not an error.
    store.deregister(&mine).await.unwrap();
}

#[tokio::test]
async fn client_put_range_delete() {
    let etcd = Etcd::start().await;
    let c = client(&etcd.uri(""));
    let r1 = c.put("/kv/a", b"1", None).await.unwrap();
    let r2 = c.put("/kv/b", &[0, 255, 7], None).await.unwrap();
    c.put("/kw", b"outside the prefix", None).await.unwrap();
    assert!(r2 > r1, "{r2} > {r1}");

    let range = c.range_prefix("/kv/").await.unwrap();
    assert!(range.revision > r2);
    let got: Vec<(&str, &[u8], i64)> = range
        .kvs
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.as_slice(), kv.mod_revision))
        .collect();
    assert_eq!(
        got,
        [("/kv/a", &b"1"[..], r1), ("/kv/b", &[0u8, 255, 7][..], r2)]
    );
    // The empty prefix covers every key.
    assert_eq!(c.range_prefix("").await.unwrap().kvs.len(), 3);

    c.delete("/kv/a").await.unwrap();
    c.delete("/kv/missing").await.unwrap();
    let left: Vec<String> = c
        .range_prefix("/kv/")
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(left, ["/kv/b"]);

    // An HTTP error (unknown lease) is a Status error from the member that answered.
    match c.put("/kv/c", b"x", Some(12345)).await {
        Err(StoreError::Status {
            endpoint, status, ..
        }) => {
            assert_eq!(endpoint, etcd.http());
            assert!(status >= 400, "{status}");
        }
        other => panic!("expected a status error, got {other:?}"),
    }
}

#[tokio::test]
async fn fails_over_to_a_live_member() {
    let etcd = Etcd::start().await;
    let dead = free_port();
    let uri = format!("etcd://127.0.0.1:{dead},127.0.0.1:{}/p", etcd.port);

    let store = store(&uri);
    store.register(&service("h:a:1", "a", 1)).await.unwrap();
    assert_eq!(store.list("h:").await.unwrap().len(), 1);

    let c = client(&uri);
    let range = c.range_prefix("/p/").await.unwrap();
    assert_eq!(range.kvs.len(), 1);
    // A fresh client (index back on the dead member) fails over for watches too.
    let c = client(&uri);
    let mut w = c.watch_prefix("/p/", range.revision + 1).await.unwrap();
    let rev = c.put("/p/b", b"2", None).await.unwrap();
    let (events, _) = read_events(&mut w, 1).await;
    assert_eq!(events.len(), 1);
    assert_eq!(event_revision(&events[0]), rev);
    assert_eq!(summary(&events[0]), ("put", "/p/b".into(), "2".into()));
}

#[tokio::test]
async fn unreachable_when_every_member_is_down() {
    let (a, b) = (free_port(), free_port());
    let uri = format!("etcd://127.0.0.1:{a},127.0.0.1:{b}/p");
    let store = store(&uri);
    let started = Instant::now();
    let err = store.ping().await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "gave up late: {:?}",
        started.elapsed()
    );
    match &err {
        StoreError::Unreachable { endpoint, .. } => {
            assert!(
                endpoint.contains(&a.to_string()) || endpoint.contains(&b.to_string()),
                "{endpoint}"
            )
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    let text = err.to_string();
    assert!(!text.contains('\n'), "one line: {text:?}");
    assert!(text.contains("127.0.0.1:"), "names the endpoint: {text}");

    let c = client(&uri);
    assert!(matches!(
        c.put("/p/x", b"1", None).await,
        Err(StoreError::Unreachable { .. })
    ));
    assert!(matches!(
        c.watch_prefix("/p/", 0).await,
        Err(StoreError::Unreachable { .. })
    ));
}

#[tokio::test]
async fn ttl_lease_kept_alive_by_refresh_and_replaced_after_expiry() {
    let etcd = Etcd::start().await;
    let store = store(&etcd.uri("ttl"));
    let mut svc = service("h:ttl:80", "ttl", 80);
    svc.ttl = Some(Duration::from_secs(2));
    store.register(&svc).await.unwrap();
    let c = client(&etcd.uri("ttl"));
    let first_lease = c.range_prefix("/ttl/").await.unwrap().kvs[0].lease;
    assert_ne!(first_lease, 0, "key attached to a lease");

    // Refreshing every 500 ms keeps the key well past its 2 s TTL. The ticks pace the
    // behaviour under test; they synchronise nothing.
    let kept_until = Instant::now() + Duration::from_millis(4500);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    while Instant::now() < kept_until {
        tick.tick().await;
        store.refresh(std::slice::from_ref(&svc)).await.unwrap();
        assert_eq!(
            etcd.get_prefix("/ttl/").await.len(),
            1,
            "key kept while refreshed"
        );
    }

    // Without refreshes the lease runs out and takes the key with it.
    wait_for("leased key to expire", WAIT, || async {
        etcd.get_prefix("/ttl/").await.is_empty().then_some(())
    })
    .await;
    match store.refresh(std::slice::from_ref(&svc)).await {
        Err(e @ StoreError::Expired { .. }) => {
            assert_eq!(
                e.to_string(),
                format!("etcd lease {first_lease} expired or unknown to the store")
            );
        }
        other => panic!("expected Expired, got {other:?}"),
    }

    // The next register grants a new lease.
    store.register(&svc).await.unwrap();
    let kvs = c.range_prefix("/ttl/").await.unwrap().kvs;
    assert_eq!(kvs.len(), 1);
    assert_ne!(kvs[0].lease, 0);
    assert_ne!(kvs[0].lease, first_lease);
    store.refresh(std::slice::from_ref(&svc)).await.unwrap();
}

#[tokio::test]
async fn lease_revoke_drops_attached_keys() {
    let etcd = Etcd::start().await;
    let c = client(&etcd.uri(""));
    let id = c.lease_grant(Duration::from_millis(30_500)).await.unwrap();
    c.put("/lease/a", b"1", Some(id)).await.unwrap();
    c.lease_keepalive(id).await.unwrap();
    assert_eq!(c.range_prefix("/lease/").await.unwrap().kvs[0].lease, id);
    c.lease_revoke(id).await.unwrap();
    assert!(c.range_prefix("/lease/").await.unwrap().kvs.is_empty());
    assert!(matches!(
        c.lease_keepalive(id).await,
        Err(StoreError::Expired { .. })
    ));
}

#[tokio::test]
async fn watch_delivers_changes_in_order() {
    let etcd = Etcd::start().await;
    let c = client(&etcd.uri(""));
    c.put("/other/x", b"not watched", None).await.unwrap();
    let start = c.range_prefix("/w/").await.unwrap().revision + 1;
    let mut w = c.watch_prefix("/w/", start).await.unwrap();

    let mut revs = Vec::new();
    for (k, v) in [
        ("/w/a", "1"),
        ("/other/y", "no"),
        ("/w/b", "2"),
        ("/w/c", "3"),
    ] {
        revs.push(c.put(k, v.as_bytes(), None).await.unwrap());
    }
    c.delete("/w/a").await.unwrap();

    let (events, last) = read_events(&mut w, 4).await;
    let got: Vec<_> = events.iter().map(summary).collect();
    assert_eq!(
        got,
        [
            ("put", "/w/a".to_string(), "1".to_string()),
            ("put", "/w/b".into(), "2".into()),
            ("put", "/w/c".into(), "3".into()),
            ("delete", "/w/a".into(), String::new()),
        ]
    );
    let event_revs: Vec<i64> = events.iter().map(event_revision).collect();
    assert_eq!(&event_revs[..3], &[revs[0], revs[2], revs[3]]);
    assert!(event_revs.windows(2).all(|p| p[0] < p[1]), "{event_revs:?}");
    assert!(last >= event_revs[3]);
}

#[tokio::test]
async fn watch_resumes_after_restart_without_loss_or_duplicates() {
    let mut etcd = Etcd::start().await;
    let c = client(&etcd.uri(""));
    let start = c.range_prefix("/r/").await.unwrap().revision + 1;
    let mut w = c.watch_prefix("/r/", start).await.unwrap();
    c.put("/r/a", b"1", None).await.unwrap();
    c.put("/r/b", b"1", None).await.unwrap();
    let (events, _) = read_events(&mut w, 2).await;
    let seen = event_revision(&events[1]);

    etcd.restart().await;
    // The old stream ends (or breaks) once its member is gone.
    loop {
        match next_batch(&mut w).await {
            Ok(Some(b)) => assert!(b.events.is_empty(), "no change was made: {b:?}"),
            Ok(None) | Err(StoreError::Unreachable { .. }) => break,
            Err(e) => panic!("unexpected watch error: {e}"),
        }
    }

    // Changes made while nobody watches ...
    c.put("/r/c", b"1", None).await.unwrap();
    c.put("/r/a", b"2", None).await.unwrap();
    c.delete("/r/b").await.unwrap();
    // ... arrive exactly once on a watch resumed from the last seen revision + 1.
    let mut w = c.watch_prefix("/r/", seen + 1).await.unwrap();
    let (events, _) = read_events(&mut w, 3).await;
    let got: Vec<_> = events.iter().map(summary).collect();
    assert_eq!(
        got,
        [
            ("put", "/r/c".to_string(), "1".to_string()),
            ("put", "/r/a".into(), "2".into()),
            ("delete", "/r/b".into(), String::new()),
        ]
    );
    assert!(event_revision(&events[0]) > seen);
    // Nothing else is pending: the next event is a fresh change.
    let sentinel = c.put("/r/z", b"end", None).await.unwrap();
    let (events, _) = read_events(&mut w, 1).await;
    assert_eq!(events.len(), 1);
    assert_eq!(event_revision(&events[0]), sentinel);
}

#[tokio::test]
async fn watch_from_a_compacted_revision_is_an_error() {
    let etcd = Etcd::start().await;
    let c = client(&etcd.uri(""));
    let first = c.put("/cmp/k", b"0", None).await.unwrap();
    let mut last = first;
    for i in 1..5 {
        last = c
            .put("/cmp/k", i.to_string().as_bytes(), None)
            .await
            .unwrap();
    }
    let compact_to = last - 1;
    let resp = reqwest::Client::new()
        .post(format!("{}/v3/kv/compaction", etcd.http()))
        .json(&serde_json::json!({"revision": compact_to, "physical": true}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());

    let mut w = c.watch_prefix("/cmp/", first).await.unwrap();
    match next_batch(&mut w).await {
        Err(e @ StoreError::Compacted { .. }) => {
            assert!(
                matches!(e, StoreError::Compacted { requested, compact_revision }
                    if requested == first && compact_revision == compact_to),
                "{e:?}"
            );
            assert!(e.to_string().contains("re-list"), "{e}");
        }
        other => panic!("expected Compacted, got {other:?}"),
    }

    // From a revision still kept, the watch works.
    let mut w = c.watch_prefix("/cmp/", last).await.unwrap();
    let (events, _) = read_events(&mut w, 1).await;
    assert_eq!(event_revision(&events[0]), last);
}
