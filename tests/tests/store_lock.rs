//! Shared state and the lock ([`KvStore`]) against a real Consul agent and a real etcd member:
//! compare-and-set, contention (one holder waits for the other), and a dead holder's lock
//! freed by its TTL.

use std::time::{Duration, Instant};
use switchboard::store::{KvStore, StoreSettings};
use switchboard::RegistryUri;
use switchboard_tests::*;

/// etcd's lease TTL in these tests (etcd frees a lease one TTL after its last keepalive).
const ETCD_TTL: Duration = Duration::from_secs(2);
/// Consul's session floor (it frees a session between one and two TTLs after its renewal).
const CONSUL_TTL: Duration = Duration::from_secs(10);

fn kv(uri: &str) -> KvStore {
    let uri = RegistryUri::parse(uri).unwrap();
    KvStore::with_settings(&uri, "switchboard/acme/", &StoreSettings::default()).unwrap()
}

async fn compare_and_set(store: &KvStore) {
    assert_eq!(store.get("certs/a.test").await.unwrap(), None);
    assert!(store.put_if("certs/a.test", b"one", 0).await.unwrap());
    // Create-only refuses a second creation.
    assert!(!store.put_if("certs/a.test", b"two", 0).await.unwrap());
    let v1 = store.get("certs/a.test").await.unwrap().unwrap();
    assert_eq!(v1.value, b"one");
    assert_ne!(v1.version, 0);
    assert!(store
        .put_if("certs/a.test", b"two", v1.version)
        .await
        .unwrap());
    // The version read before the last write is stale now.
    assert!(!store
        .put_if("certs/a.test", b"three", v1.version)
        .await
        .unwrap());
    let v2 = store.get("certs/a.test").await.unwrap().unwrap();
    assert_eq!(v2.value, b"two");
    assert!(!store.delete_if("certs/a.test", v1.version).await.unwrap());
    assert!(store.delete_if("certs/a.test", v2.version).await.unwrap());
    assert_eq!(store.get("certs/a.test").await.unwrap(), None);
    store.put("tokens/t1", b"auth").await.unwrap();
    assert_eq!(
        store.get("tokens/t1").await.unwrap().unwrap().value,
        b"auth"
    );
    store.delete("tokens/t1").await.unwrap();
    store.delete("tokens/t1").await.unwrap();
    assert_eq!(store.get("tokens/t1").await.unwrap(), None);
}

/// A holds the lock; B waits (still waiting after a TTL) and gets it once A releases.
async fn contend(a: &KvStore, b: &KvStore, ttl: Duration) {
    let held = a.lock("lock/order", "confd-a", ttl).await.unwrap();
    let mut b_lock = Box::pin(b.lock("lock/order", "confd-b", ttl));
    // Longer than a renewal period: A's renewals keep it held.
    let waited = tokio::time::timeout(ttl + Duration::from_secs(1), &mut b_lock).await;
    assert!(waited.is_err(), "B got the lock while A held it");
    assert_eq!(held.lost_reason(), None);
    assert_eq!(
        a.get("lock/order").await.unwrap().unwrap().value,
        b"confd-a"
    );
    let released = Instant::now();
    held.release().await;
    let got = tokio::time::timeout(Duration::from_secs(10), b_lock)
        .await
        .expect("B gets the lock once A releases it")
        .unwrap();
    println!(
        "B got the lock {:?} after A released it",
        released.elapsed()
    );
    assert_eq!(
        b.get("lock/order").await.unwrap().unwrap().value,
        b"confd-b"
    );
    got.release().await;
    assert_eq!(a.get("lock/order").await.unwrap(), None);
}

/// A's holder dies (stops renewing, never releases): B gets the lock within `bound`.
async fn dead_holder(a: &KvStore, b: &KvStore, ttl: Duration, bound: Duration) {
    let held = a.lock("lock/dead", "confd-a", ttl).await.unwrap();
    let died = Instant::now();
    held.abandon();
    let got = tokio::time::timeout(bound, b.lock("lock/dead", "confd-b", ttl))
        .await
        .unwrap_or_else(|_| panic!("B did not get a dead holder's lock within {bound:?}"))
        .unwrap();
    println!("B got the dead holder's lock after {:?}", died.elapsed());
    got.release().await;
}

#[tokio::test]
async fn consul_compare_and_set() {
    let consul = Consul::start().await;
    compare_and_set(&kv(&consul.uri())).await;
}

#[tokio::test]
async fn etcd_compare_and_set() {
    let etcd = Etcd::start().await;
    compare_and_set(&kv(&etcd.uri("svc"))).await;
}

#[tokio::test]
async fn consul_lock_contention_and_release() {
    let consul = Consul::start().await;
    contend(&kv(&consul.uri()), &kv(&consul.uri()), CONSUL_TTL).await;
}

#[tokio::test]
async fn etcd_lock_contention_and_release() {
    let etcd = Etcd::start().await;
    contend(&kv(&etcd.uri("svc")), &kv(&etcd.uri("svc")), ETCD_TTL).await;
}

#[tokio::test]
async fn consul_dead_holder_frees_the_lock() {
    let consul = Consul::start().await;
    // Consul invalidates a session up to twice its TTL after the last renewal.
    let bound = CONSUL_TTL * 2 + Duration::from_secs(5);
    dead_holder(&kv(&consul.uri()), &kv(&consul.uri()), CONSUL_TTL, bound).await;
}

#[tokio::test]
async fn etcd_dead_holder_frees_the_lock() {
    let etcd = Etcd::start().await;
    let bound = ETCD_TTL + Duration::from_secs(4);
    dead_holder(
        &kv(&etcd.uri("svc")),
        &kv(&etcd.uri("svc")),
        ETCD_TTL,
        bound,
    )
    .await;
}

#[tokio::test]
async fn etcd_lock_lost_when_its_lease_is_revoked() {
    let etcd = Etcd::start().await;
    let store = kv(&etcd.uri("svc"));
    let mut held = store.lock("lock/lost", "confd-a", ETCD_TTL).await.unwrap();
    // An operator (or a store failure) removes the lease under the holder.
    let lease: serde_json::Value = etcd
        .http_client()
        .post(format!("{}/v3/lease/leases", etcd.http()))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = lease["leases"][0]["ID"].as_str().unwrap().to_string();
    etcd.http_client()
        .post(format!("{}/v3/lease/revoke", etcd.http()))
        .json(&serde_json::json!({ "ID": id }))
        .send()
        .await
        .unwrap();
    let why = tokio::time::timeout(ETCD_TTL * 2, held.lost())
        .await
        .expect("the holder reports the lost lock within a renewal or two");
    assert!(why.contains("lease"), "{why}");
}
