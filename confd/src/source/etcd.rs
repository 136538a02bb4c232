//! etcd source: services under `/<prefix>/<name>/<id>` (JSON [`EtcdValue`]) and key/values
//! under the configured KV prefixes.
//!
//! Each prefix is mirrored by one task: range it, then ONE watch from `revision + 1`. When the
//! stream ends or fails, the watch is reopened from the last revision seen + 1, so every change
//! made while disconnected is replayed and none is missed; when that revision was compacted
//! away, the prefix is listed again. Long polls: one watch per prefix (1 + KV prefixes),
//! independent of the number of services.

use super::Publisher;
use crate::model::{Instance, Snapshot};
use std::collections::BTreeMap;
use std::time::Duration;
use switchboard::store::{etcd_dir, EtcdClient, EtcdValue, StoreError, WatchEvent};
use switchboard::{Backoff, Shutdown};
use tokio::sync::mpsc;

/// A prefix's keys and values, or `None` while its mirror is not in sync.
type MirrorState = Option<BTreeMap<String, Vec<u8>>>;

/// Runs until `shutdown`: one mirror per prefix, combined into snapshots.
pub async fn run(
    client: EtcdClient,
    prefix: String,
    kv_prefixes: Vec<String>,
    ignore: Vec<String>,
    publisher: Publisher,
    shutdown: Shutdown,
) {
    let dir = etcd_dir(&prefix);
    let mut prefixes = vec![dir.clone()];
    prefixes.extend(kv_prefixes.iter().cloned());
    let (tx, mut rx) = mpsc::channel::<(usize, MirrorState)>(64);
    for (slot, p) in prefixes.iter().enumerate() {
        tokio::spawn(mirror(
            client.clone(),
            p.clone(),
            slot,
            tx.clone(),
            publisher.clone(),
            shutdown.clone(),
        ));
    }
    drop(tx);
    let mut states: Vec<MirrorState> = vec![None; prefixes.len()];
    loop {
        let (slot, state) = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => return },
            _ = shutdown.cancelled() => return,
        };
        states[slot] = state;
        if states.iter().any(Option::is_none) {
            publisher.unhealthy("an etcd watch is reconnecting");
            continue;
        }
        let services = states[0].as_ref().expect("checked");
        let mut kv = BTreeMap::new();
        for (i, p) in prefixes.iter().enumerate().skip(1) {
            for (k, v) in states[i].as_ref().expect("checked") {
                if k.starts_with(p.as_str()) {
                    kv.insert(k.clone(), String::from_utf8_lossy(v).into_owned());
                }
            }
        }
        publisher.publish(Snapshot::build(
            services.iter().filter_map(|(k, v)| instance(&dir, k, v)),
            kv,
            &ignore,
        ));
    }
}

/// One service key and value as an instance; other keys and bad JSON are skipped.
fn instance(dir: &str, key: &str, value: &[u8]) -> Option<Instance> {
    let rel = key.strip_prefix(dir)?;
    if !rel.contains('/') {
        return None;
    }
    match serde_json::from_slice::<EtcdValue>(value) {
        Ok(v) => Some(Instance::from_service(
            v.into(),
            String::new(),
            "passing".into(),
        )),
        Err(e) => {
            tracing::debug!(key, error = %e, "skipping etcd key that is not a service");
            None
        }
    }
}

/// Applies one watch event to a mirror.
fn apply(state: &mut BTreeMap<String, Vec<u8>>, ev: WatchEvent) {
    match ev {
        WatchEvent::Put(kv) => {
            state.insert(kv.key, kv.value);
        }
        WatchEvent::Delete { key, .. } => {
            state.remove(&key);
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

/// Keeps `prefix` mirrored, sending the whole state after every change (and `None` whenever
/// it may be out of date).
async fn mirror(
    client: EtcdClient,
    prefix: String,
    slot: usize,
    tx: mpsc::Sender<(usize, MirrorState)>,
    publisher: Publisher,
    shutdown: Shutdown,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    'relist: loop {
        let range = tokio::select! {
            r = client.range_prefix(&prefix) => r,
            _ = shutdown.cancelled() => return,
        };
        let range = match range {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(prefix, error = %e, "etcd range failed");
                let _ = tx.send((slot, None)).await;
                if !backoff.wait(&shutdown).await {
                    return;
                }
                continue;
            }
        };
        let mut state: BTreeMap<String, Vec<u8>> =
            range.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
        let mut last = range.revision;
        if tx.send((slot, Some(state.clone()))).await.is_err() {
            return;
        }
        loop {
            let stream = tokio::select! {
                r = client.watch_prefix(&prefix, last + 1) => r,
                _ = shutdown.cancelled() => return,
            };
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(prefix, error = %e, "etcd watch failed");
                    let _ = tx.send((slot, None)).await;
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
            if tx.send((slot, Some(state.clone()))).await.is_err() {
                return;
            }
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
                        for ev in batch.events {
                            apply(&mut state, ev);
                        }
                        if tx.send((slot, Some(state.clone()))).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        tracing::info!(prefix, resume = last + 1, "etcd watch ended; resuming");
                        let _ = tx.send((slot, None)).await;
                        if !backoff.wait(&shutdown).await {
                            return;
                        }
                        break;
                    }
                    Err(StoreError::Compacted { .. }) => {
                        tracing::warn!(prefix, "etcd compacted past our revision; listing again");
                        let _ = tx.send((slot, None)).await;
                        continue 'relist;
                    }
                    Err(e) => {
                        tracing::warn!(prefix, error = %e, resume = last + 1, "etcd watch broke; resuming");
                        let _ = tx.send((slot, None)).await;
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
        for e in evs {
            apply(&mut s, e);
        }
        assert_eq!(s.keys().collect::<Vec<_>>(), ["/s/a/2"]);
    }

    #[test]
    fn parses_service_values() {
        let v = serde_json::json!({"id": "h:c:80", "name": "web", "address": "10.0.0.2",
            "port": 80, "tags": ["t"], "meta": {"vhost": "w.local"}});
        let bytes = serde_json::to_vec(&v).unwrap();
        let i = instance("/services/", "/services/web/h:c:80", &bytes).unwrap();
        assert_eq!(
            (i.name.as_str(), i.port, i.health.as_str()),
            ("web", 80, "passing")
        );
        assert!(instance("/services/", "/services/web", &bytes).is_none());
        assert!(instance("/services/", "/other/web/x", &bytes).is_none());
        assert!(instance("/services/", "/services/web/x", b"not json").is_none());
    }
}
