//! The Consul store against a real Consul dev agent: registration with checks and TTL, the KV
//! layout, blocking queries, hostile metadata and an agent that is not there.

use serde_json::Value;
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::Duration;
use switchboard::store::ConsulClient;
use switchboard::{Check, CheckKind, RegistryUri, Service, Store, StoreError};
use switchboard_tests::*;

const WAIT: Duration = Duration::from_secs(20);

fn store(uri: &str) -> Store {
    Store::new(&RegistryUri::parse(uri).unwrap())
}

fn client(consul: &Consul) -> ConsulClient {
    match store(&consul.uri()) {
        Store::Consul(c) => c,
        other => panic!("expected a Consul store, got {}", other.kind()),
    }
}

fn service(id: &str, name: &str, port: u16) -> Service {
    Service {
        id: id.into(),
        name: name.into(),
        address: "127.0.0.1".into(),
        port,
        tags: vec![],
        meta: BTreeMap::new(),
        check: None,
        ttl: None,
        docker_health: None,
    }
}

fn check(kind: CheckKind) -> Check {
    Check {
        interval: Some(Duration::from_secs(1)),
        timeout: Some(Duration::from_secs(1)),
        ..Check::new(kind)
    }
}

/// Status of one check of `name`, as `/v1/health/checks/<name>` reports it.
async fn check_status(consul: &Consul, name: &str, check_id: &str) -> Option<String> {
    let checks = consul.get_json(&format!("/v1/health/checks/{name}")).await;
    checks
        .as_array()?
        .iter()
        .find(|c| c["CheckID"] == check_id)
        .map(|c| c["Status"].as_str().unwrap().to_string())
}

/// Waits until the check reports `want`.
async fn wait_check(consul: &Consul, name: &str, check_id: &str, want: &str) {
    let what = format!("check {check_id} of {name} to be {want}");
    wait_for(&what, WAIT, || async {
        (check_status(consul, name, check_id).await.as_deref() == Some(want)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn register_with_checks_list_and_deregister() {
    let consul = Consul::start().await;
    let store = store(&consul.uri());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let live_port = listener.local_addr().unwrap().port();
    let dead_port = free_port();

    // HTTP check against a port nobody listens on, starting "passing" so the switch to
    // critical is something the agent did. Hostile metadata keys are dropped, not fatal.
    let mut web = service("sbhost:web:80", "sb-web", dead_port);
    web.tags = vec!["blue".into(), "v1".into()];
    web.meta = [
        ("version", "1.2"),
        ("a b", "space"),
        ("x;y", "semicolon"),
        ("consul-owned", "reserved"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    web.check = Some(Check {
        initial_status: Some("passing".into()),
        ..check(CheckKind::Http(format!("http://127.0.0.1:{dead_port}/")))
    });
    // TCP check against a listening port: starts critical (Consul's default), goes passing.
    let mut db = service("sbhost:db:5432", "sb-db", live_port);
    db.check = Some(check(CheckKind::Tcp(format!("127.0.0.1:{live_port}"))));
    // A script check gets an argv, never a shell: through `sh -c` this would exit 2 (critical).
    let mut script = service("sbhost:script:1", "sb-script", 1);
    script.check = Some(check(CheckKind::Script(vec![
        "/bin/echo".into(),
        "ok; exit 2".into(),
    ])));
    // Untrusted characters in an ID must not change which endpoint is called.
    let odd = service("sbhost:we b?x=1#y%:81", "sb-odd", 81);
    let foreign = service("otherhost:web:80", "sb-web", 8081);

    for s in [&web, &db, &script, &odd, &foreign] {
        store.register(s).await.unwrap();
    }

    let agent = consul.get_json("/v1/agent/services").await;
    assert_eq!(agent["sbhost:web:80"]["Port"], dead_port);
    assert_eq!(agent["sbhost:we b?x=1#y%:81"]["Service"], "sb-odd");

    let catalog = consul.get_json("/v1/catalog/service/sb-web").await;
    let entry = catalog
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["ServiceID"] == "sbhost:web:80")
        .expect("web in the catalog");
    assert_eq!(entry["ServiceTags"], serde_json::json!(["blue", "v1"]));
    assert_eq!(entry["ServiceMeta"], serde_json::json!({"version": "1.2"}));
    assert_eq!(entry["ServiceAddress"], "127.0.0.1");

    wait_check(&consul, "sb-web", "service:sbhost:web:80", "critical").await;
    wait_check(&consul, "sb-db", "service:sbhost:db:5432", "passing").await;
    wait_check(&consul, "sb-script", "service:sbhost:script:1", "passing").await;

    // The health endpoint through the client: aggregate status per instance.
    let c = client(&consul);
    let (web_health, meta) = c
        .health_service("sb-web", false, 0, Duration::ZERO)
        .await
        .unwrap();
    let web_health: Vec<_> = web_health.into_iter().map(Result::unwrap).collect();
    assert!(meta.index > 0);
    assert!(!meta.filtered_by_acls);
    let ids: Vec<&str> = web_health.iter().map(|e| e.service.id.as_str()).collect();
    assert_eq!(ids, ["otherhost:web:80", "sbhost:web:80"]);
    assert_eq!(web_health[0].status, "passing");
    assert_eq!(web_health[1].status, "critical");
    assert_eq!(web_health[1].node, "sbtest");
    let (passing, _) = c
        .health_service("sb-web", true, 0, Duration::ZERO)
        .await
        .unwrap();
    let passing: Vec<_> = passing.into_iter().map(Result::unwrap).collect();
    assert_eq!(passing.len(), 1);
    assert_eq!(passing[0].service.id, "otherhost:web:80");

    let mut mine: Vec<String> = store
        .list("sbhost:")
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    mine.sort();
    assert_eq!(
        mine,
        [
            "sbhost:db:5432",
            "sbhost:script:1",
            "sbhost:we b?x=1#y%:81",
            "sbhost:web:80"
        ]
    );
    let listed = store.list("sbhost:web:").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].tags, web.tags);
    assert_eq!(listed[0].port, dead_port);

    store.deregister(&web).await.unwrap();
    store.deregister(&odd).await.unwrap();
    // Removing what is not there is fine.
    store.deregister(&web).await.unwrap();
    let ids = consul.agent_service_ids().await;
    assert!(!ids.contains(&web.id) && !ids.contains(&odd.id), "{ids:?}");
    assert!(ids.contains(&foreign.id) && ids.contains(&db.id), "{ids:?}");
    drop(listener);
}

#[tokio::test]
async fn ttl_refresh_expiry_and_agent_restart() {
    let mut consul = Consul::start().await;
    let store = store(&consul.uri());
    let mut svc = service("sbhost:ttl:80", "sb-ttl", 80);
    svc.ttl = Some(Duration::from_secs(2));
    store.register(&svc).await.unwrap();
    let check_id = switchboard::store::ttl_check_id(&svc.id);
    assert_eq!(
        check_status(&consul, "sb-ttl", &check_id).await.as_deref(),
        Some("passing")
    );

    // Refreshing every half TTL keeps it passing for well over one TTL. The interval paces the
    // refresh loop (as the registrator's would); it does not synchronise with anything.
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    for _ in 0..10 {
        tick.tick().await;
        store.refresh(std::slice::from_ref(&svc)).await.unwrap();
        assert_eq!(
            check_status(&consul, "sb-ttl", &check_id).await.as_deref(),
            Some("passing")
        );
    }

    // Without refresh the agent marks it critical once the TTL runs out.
    wait_check(&consul, "sb-ttl", &check_id, "critical").await;
    store.refresh(std::slice::from_ref(&svc)).await.unwrap();
    wait_check(&consul, "sb-ttl", &check_id, "passing").await;

    // A dev agent forgets everything on restart: refresh must say so.
    consul.restart().await;
    match store.refresh(std::slice::from_ref(&svc)).await {
        Err(StoreError::Expired { what }) => assert!(what.contains(&check_id), "{what}"),
        other => panic!("expected Expired, got {other:?}"),
    }
    // Registering again brings it back.
    store.register(&svc).await.unwrap();
    store.refresh(std::slice::from_ref(&svc)).await.unwrap();
}

#[tokio::test]
async fn consulkv_layout() {
    let consul = Consul::start().await;
    let uri = format!("consulkv://127.0.0.1:{}/sbsvc", consul.port);
    let store = store(&uri);
    let a = service("sbhost:web:80", "web", 8080);
    let b = service("sbhost:api:90", "api", 9090);
    let foreign = service("otherhost:web:80", "web", 8081);
    for s in [&a, &b, &foreign] {
        store.register(s).await.unwrap();
    }

    let raw = reqwest::get(format!(
        "{}/v1/kv/sbsvc/web/sbhost:web:80?raw",
        consul.http()
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert_eq!(raw, "127.0.0.1:8080");

    let mut listed = store.list("sbhost:").await.unwrap();
    listed.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(listed, [b.clone(), a.clone()]);

    store.deregister(&a).await.unwrap();
    store.deregister(&a).await.unwrap();
    let listed = store.list("sbhost:").await.unwrap();
    assert_eq!(listed, std::slice::from_ref(&b));
    let status = reqwest::get(format!("{}/v1/kv/sbsvc/web/sbhost:web:80", consul.http()))
        .await
        .unwrap()
        .status();
    assert_eq!(status, 404);

    // An empty prefix is an empty map that still carries an index to block on.
    let c = client(&consul);
    let (kvs, index) = c.kv_list("nothing/", 0, Duration::ZERO).await.unwrap();
    assert!(kvs.is_empty());
    assert!(index > 0);
}

#[tokio::test]
async fn blocking_queries_wake_on_change() {
    let consul = Consul::start().await;
    let c = client(&consul);

    // Just after leader election the agent is still syncing its own `consul` service, so the
    // catalog may change for other reasons: the watcher loops as confd does, each round
    // blocking from the last index, until it sees the new service.
    let (before, meta) = c.catalog_services(0, Duration::ZERO).await.unwrap();
    let index = meta.index;
    assert!(index > 0);
    assert!(!before.contains_key("sb-late"));
    let watcher = c.clone();
    let task = tokio::spawn(async move {
        let mut last = index;
        loop {
            let (services, next) = watcher
                .catalog_services(last, Duration::from_secs(60))
                .await
                .unwrap();
            let next = next.index;
            assert!(next >= last, "index went backwards: {next} < {last}");
            last = next;
            if let Some(tags) = services.get("sb-late") {
                return (tags.clone(), last);
            }
        }
    });
    let mut svc = service("sbhost:late:80", "sb-late", 80);
    svc.tags = vec!["t1".into()];
    c.agent_register(&svc).await.unwrap();
    let (tags, new_index) = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("blocking query returned after the change")
        .unwrap();
    assert!(new_index > index, "{new_index} > {index}");
    assert_eq!(tags, ["t1"]);

    // The same for a KV prefix.
    let (_, kv_index) = c.kv_list("sbwatch/", 0, Duration::ZERO).await.unwrap();
    let watcher = c.clone();
    let task = tokio::spawn(async move {
        watcher
            .kv_list("sbwatch/", kv_index, Duration::from_secs(60))
            .await
    });
    c.kv_put("sbwatch/a", b"1.2.3.4:80").await.unwrap();
    let (kvs, new_index) = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("blocking KV query returned after the change")
        .unwrap()
        .unwrap();
    assert!(new_index > kv_index);
    assert_eq!(kvs["sbwatch/a"], b"1.2.3.4:80");

    // A blocking query that times out on Consul's side (the agent's own anti-entropy may still
    // bump the index) is an answer, not a client timeout.
    let (_, idx) = c.catalog_services(0, Duration::ZERO).await.unwrap();
    let idx = idx.index;
    let (same, idx2) = c
        .catalog_services(idx, Duration::from_secs(1))
        .await
        .unwrap();
    let idx2 = idx2.index;
    assert!(idx2 >= idx);
    assert!(same.contains_key("sb-late"));
}

#[tokio::test]
async fn unreachable_agent_is_one_line_error() {
    let port = free_port();
    let store = store(&format!("consul://127.0.0.1:{port}"));
    let endpoint = format!("http://127.0.0.1:{port}");
    for result in [
        store.ping().await,
        store.register(&service("sbhost:x:1", "x", 1)).await,
    ] {
        let err = result.unwrap_err();
        assert!(
            matches!(&err, StoreError::Unreachable { endpoint: e, .. } if *e == endpoint),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains("Connection refused"), "{text}");
        assert!(text.starts_with(&endpoint), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }
}

#[tokio::test]
async fn http_errors_carry_status_and_first_line() {
    let consul = Consul::start().await;
    let store = store(&consul.uri());
    // Consul refuses a service without a name.
    let bad = service("sbhost:noname:1", "", 1);
    match store.register(&bad).await {
        Err(StoreError::Status {
            status, body, what, ..
        }) => {
            assert_eq!(status, 400);
            assert!(!body.is_empty() && !body.contains('\n'), "{body}");
            assert_eq!(what, "PUT /v1/agent/service/register");
        }
        other => panic!("expected a Status error, got {other:?}"),
    }
    let v: Value = consul.get_json("/v1/agent/services").await;
    assert!(v.as_object().unwrap().is_empty());
}
