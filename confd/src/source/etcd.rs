//! etcd source: services under `/<prefix>/<name>/<id>` (JSON
//! [`switchboard::store::EtcdValue`]) and key/values under the configured KV prefixes.
//!
//! Each prefix is mirrored by one task: range it, then ONE watch from `revision + 1`. When the
//! stream ends or fails, the watch is reopened from the last revision seen + 1, so every change
//! made while disconnected is replayed and none is missed; when that revision was compacted
//! away, the prefix is listed again. Long polls: one watch per prefix (1 + KV prefixes),
//! independent of the number of services.
//!
//! Cost per change is kept independent of the number of instances: a mirror parses only the
//! keys an event touches and updates its entries in place, then wakes the aggregator through a
//! [`Notify`], which coalesces wake-ups. The aggregator builds one snapshot from whatever the
//! mirrors hold when it runs, so a burst of thousands of puts yields a handful of snapshots
//! rather than one full rebuild per event (the bench found that quadratic at 10,000 instances).
//!
//! A bad key is about that key alone: a value that is not a service (not JSON, a port out of
//! range: [`switchboard::store::etcd_entry`]) or an instance [`Publisher::instance`] refuses
//! (`..` keys written before names were validated, port 0, an address that is not one) is
//! left out and logged once per version; the snapshot goes on without it.

use super::Publisher;
use crate::model::{Instance, Snapshot};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchboard::store::{etcd_dir, etcd_entry, EtcdClient, StoreError, WatchEvent};
use switchboard::{Backoff, Shutdown};
use tokio::sync::Notify;

/// One prefix's entries, parsed, and whether they are in sync with the store.
struct Mirror<V> {
    in_sync: bool,
    entries: BTreeMap<String, V>,
}

/// A mirror shared between its task (writer) and the aggregator (reader).
type Shared<V> = Arc<Mutex<Mirror<V>>>;

fn shared<V>() -> Shared<V> {
    Arc::new(Mutex::new(Mirror {
        in_sync: false,
        entries: BTreeMap::new(),
    }))
}

/// Runs until `shutdown`: one mirror per prefix, combined into snapshots. Every mirror has
/// ended (its watch dropped) when it returns.
pub async fn run(
    client: EtcdClient,
    prefix: String,
    kv_prefixes: Vec<String>,
    ignore: Vec<String>,
    publisher: Publisher,
    shutdown: Shutdown,
) {
    let dir = etcd_dir(&prefix);
    let wake = Arc::new(Notify::new());
    // Instances are parsed once and shared (`Arc`) with every snapshot built from them.
    let services: Shared<Option<Arc<Instance>>> = shared();
    let parse_dir = dir.clone();
    let p = publisher.clone();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(mirror(
        client.clone(),
        dir,
        services.clone(),
        move |k: &str, v: &[u8]| instance(&p, &parse_dir, k, v).map(Arc::new),
        wake.clone(),
        publisher.clone(),
        shutdown.clone(),
    ));
    let mut kvs: Vec<(String, Shared<String>)> = Vec::new();
    for p in kv_prefixes {
        let m = shared();
        tasks.spawn(mirror(
            client.clone(),
            p.clone(),
            m.clone(),
            |_: &str, v: &[u8]| String::from_utf8_lossy(v).into_owned(),
            wake.clone(),
            publisher.clone(),
            shutdown.clone(),
        ));
        kvs.push((p, m));
    }
    loop {
        tokio::select! {
            _ = wake.notified() => {}
            _ = shutdown.cancelled() => break,
        }
        let instances: Vec<Arc<Instance>> = {
            let m = services.lock().expect("mirror lock");
            if !m.in_sync {
                publisher.unhealthy("an etcd watch is reconnecting");
                continue;
            }
            m.entries.values().flatten().cloned().collect()
        };
        let mut kv = BTreeMap::new();
        let mut in_sync = true;
        for (p, m) in &kvs {
            let m = m.lock().expect("mirror lock");
            in_sync &= m.in_sync;
            for (k, v) in m.entries.iter().filter(|(k, _)| k.starts_with(p.as_str())) {
                kv.insert(k.clone(), v.clone());
            }
        }
        if !in_sync {
            publisher.unhealthy("an etcd watch is reconnecting");
            continue;
        }
        publisher.publish(Snapshot::build(instances, kv, &ignore));
    }
    tasks.shutdown().await;
}

/// One service key (`<name>/<id>` under `dir`) and its value as an instance; other keys are
/// skipped, a value that is not a service or an invalid instance refused (see
/// [`Publisher::instance`]), named by its key.
fn instance(publisher: &Publisher, dir: &str, key: &str, value: &[u8]) -> Option<Instance> {
    let rel = key.strip_prefix(dir)?;
    let (name, id) = rel.split_once('/')?;
    match etcd_entry(value) {
        Ok(svc) => publisher.instance(svc, String::new(), "passing".into()),
        Err(bad) => {
            publisher.bad_entry(&bad, Some(name), Some(id));
            None
        }
    }
}

/// Applies one watch event to a mirror's entries, parsing only the key it touches.
fn apply<V>(entries: &mut BTreeMap<String, V>, ev: WatchEvent, parse: &impl Fn(&str, &[u8]) -> V) {
    match ev {
        WatchEvent::Put(kv) => {
            let v = parse(&kv.key, &kv.value);
            entries.insert(kv.key, v);
        }
        WatchEvent::Delete { key, .. } => {
            entries.remove(&key);
        }
    }
}

/// The revision to resume a watch from after the events of a batch were applied.
fn last_seen(prev: i64, events: &[WatchEvent]) -> i64 {
    events
        .iter()
        .map(|e| match e {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { mod_revision, .. } => *mod_revision,
        })
        .fold(prev, i64::max)
}

/// Sets a mirror's sync flag and wakes the aggregator.
fn set_in_sync<V>(m: &Shared<V>, wake: &Notify, in_sync: bool) {
    m.lock().expect("mirror lock").in_sync = in_sync;
    wake.notify_one();
}

/// Keeps `prefix` mirrored into `m`, parsing values with `parse`; the mirror is marked out of
/// sync whenever it may be out of date.
async fn mirror<V, F>(
    client: EtcdClient,
    prefix: String,
    m: Shared<V>,
    parse: F,
    wake: Arc<Notify>,
    publisher: Publisher,
    shutdown: Shutdown,
) where
    F: Fn(&str, &[u8]) -> V,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    'relist: loop {
        let range = tokio::select! {
            r = client.range_prefix(&prefix) => r,
            _ = shutdown.cancelled() => return,
        };
        let range = match range {
            Ok(r) => r,
            Err(e) => {
                publisher.store_error(&e);
                tracing::warn!(prefix, error = %e, "etcd range failed");
                set_in_sync(&m, &wake, false);
                if !backoff.wait(&shutdown).await {
                    return;
                }
                continue;
            }
        };
        let mut last = range.revision;
        {
            let entries = range
                .kvs
                .into_iter()
                .map(|kv| {
                    let v = parse(&kv.key, &kv.value);
                    (kv.key, v)
                })
                .collect();
            let mut g = m.lock().expect("mirror lock");
            g.entries = entries;
            g.in_sync = true;
        }
        wake.notify_one();
        loop {
            let stream = tokio::select! {
                r = client.watch_prefix(&prefix, last + 1) => r,
                _ = shutdown.cancelled() => return,
            };
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    publisher.store_error(&e);
                    tracing::warn!(prefix, error = %e, "etcd watch failed");
                    set_in_sync(&m, &wake, false);
                    if matches!(e, StoreError::Compacted { .. }) {
                        continue 'relist;
                    }
                    if !backoff.wait(&shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            let _guard = publisher.long_poll();
            // Resynced: the watch replays everything after `last` first.
            set_in_sync(&m, &wake, true);
            loop {
                let next = tokio::select! {
                    n = stream.next() => n,
                    _ = shutdown.cancelled() => return,
                };
                match next {
                    Ok(Some(batch)) => {
                        backoff.reset();
                        if batch.events.is_empty() {
                            continue;
                        }
                        last = last_seen(last, &batch.events);
                        {
                            let mut g = m.lock().expect("mirror lock");
                            for ev in batch.events {
                                apply(&mut g.entries, ev, &parse);
                            }
                        }
                        wake.notify_one();
                    }
                    Ok(None) => {
                        tracing::info!(prefix, resume = last + 1, "etcd watch ended; resuming");
                        set_in_sync(&m, &wake, false);
                        if !backoff.wait(&shutdown).await {
                            return;
                        }
                        break;
                    }
                    Err(StoreError::Compacted { .. }) => {
                        tracing::warn!(prefix, "etcd compacted past our revision; listing again");
                        set_in_sync(&m, &wake, false);
                        continue 'relist;
                    }
                    Err(e) => {
                        publisher.store_error(&e);
                        tracing::warn!(prefix, error = %e, resume = last + 1, "etcd watch broke; resuming");
                        set_in_sync(&m, &wake, false);
                        if !backoff.wait(&shutdown).await {
                            return;
                        }
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard::store::KeyValue;

    fn put(key: &str, value: &str, rev: i64) -> WatchEvent {
        WatchEvent::Put(KeyValue {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            mod_revision: rev,
            lease: 0,
        })
    }

    #[test]
    fn applies_events_and_tracks_revision() {
        let mut s = BTreeMap::new();
        let evs = vec![
            put("/s/a/1", "x", 5),
            put("/s/a/2", "y", 6),
            WatchEvent::Delete {
                key: "/s/a/1".into(),
                mod_revision: 7,
            },
        ];
        assert_eq!(last_seen(4, &evs), 7);
        assert_eq!(last_seen(9, &evs), 9);
        let parse = |_: &str, v: &[u8]| v.to_vec();
        for e in evs {
            apply(&mut s, e, &parse);
        }
        assert_eq!(s.keys().collect::<Vec<_>>(), ["/s/a/2"]);
    }

    #[test]
    fn parses_service_values() {
        let v = serde_json::json!({"id": "h:c:80", "name": "web", "address": "10.0.0.2",
            "port": 80, "tags": ["t"], "meta": {"vhost": "w.local"}});
        let bytes = serde_json::to_vec(&v).unwrap();
        let (p, h) = Publisher::new(crate::metrics::Telemetry::new());
        let i = instance(&p, "/services/", "/services/web/h:c:80", &bytes).unwrap();
        assert_eq!(
            (i.name.as_str(), i.port, i.health.as_str()),
            ("web", 80, "passing")
        );
        assert!(instance(&p, "/services/", "/services/web", &bytes).is_none());
        assert!(instance(&p, "/services/", "/other/web/x", &bytes).is_none());
        assert_eq!(h.refused.load(std::sync::atomic::Ordering::Relaxed), 0);
        // Each bad value is refused on its own, named by its key.
        let bad: [&[u8]; 5] = [
            b"not json",
            br#"{"id": "x", "name": "web", "address": "10.0.0.2", "port": 0}"#,
            br#"{"id": "x", "name": "web", "address": "10.0.0.2", "port": 65536}"#,
            br#"{"id": "x", "name": "web", "address": "1.2.3.4; }", "port": 80}"#,
            br#"{"id": "x", "name": "web", "address": "10.0.0.2"}"#,
        ];
        for (n, value) in bad.iter().enumerate() {
            assert!(
                instance(&p, "/services/", "/services/web/x", value).is_none(),
                "{}",
                String::from_utf8_lossy(value)
            );
            assert_eq!(h.refused.load(std::sync::atomic::Ordering::Relaxed), n + 1);
        }
        assert!(instance(&p, "/services/", "/services/web/x", b"not json").is_none());
        assert_eq!(
            h.refused.load(std::sync::atomic::Ordering::Relaxed),
            6,
            "a change back to an earlier version is a change too"
        );
        assert!(instance(&p, "/services/", "/services/web/x", b"not json").is_none());
        assert_eq!(
            h.refused.load(std::sync::atomic::Ordering::Relaxed),
            6,
            "a repeat is not"
        );
        for (name, id) in [("..", "h:c:80"), ("web", ".."), (".", "x"), ("web", "a\nb")] {
            let v = serde_json::json!({"id": id, "name": name, "address": "10.0.0.2", "port": 80});
            let bytes = serde_json::to_vec(&v).unwrap();
            let key = format!("/services/{name}/{id}");
            assert!(
                instance(&p, "/services/", &key, &bytes).is_none(),
                "{name:?} {id:?}"
            );
        }
        assert_eq!(h.refused.load(std::sync::atomic::Ordering::Relaxed), 10);
    }
}
