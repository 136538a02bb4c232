//! Certificates an operator puts in the store (from a private CA, a certificate bought
//! elsewhere): `<store_prefix><name>` holds JSON `{"cert": PEM chain, "key": PEM key}`, `<name>`
//! being a host or `_wildcard.<domain>` as for files. They are checked as file pairs are, by
//! [`super::load`].
//!
//! The prefix is read whole every [`REREAD`]: one request, whatever the number of hosts, and
//! the same on Consul and etcd. The last good read is kept while the store cannot be read, so
//! a store outage never takes a certificate away.

use super::{Origin, Supplied};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use switchboard::store::KvStore;
use switchboard::Shutdown;
use tokio::sync::watch;

/// How often the prefix is read.
pub const REREAD: Duration = Duration::from_secs(5);

/// What the store holds, as supplied pairs.
pub type StorePairs = Arc<Vec<Supplied>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    cert: String,
    key: String,
}

/// The pairs in `values` (names after `prefix`), and a warning per value that is not a record
/// (pure). Folder keys (empty names, names ending in `/`) are not values.
pub fn decode(prefix: &str, values: &BTreeMap<String, Vec<u8>>) -> (Vec<Supplied>, Vec<String>) {
    let mut pairs = Vec::new();
    let mut warnings = Vec::new();
    for (name, bytes) in values {
        if name.is_empty() || name.ends_with('/') {
            continue;
        }
        let what = format!("store key {prefix}{name}");
        match serde_json::from_slice::<Record>(bytes) {
            Ok(r) => pairs.push(Supplied {
                origin: Origin::Store,
                name: name.clone(),
                crt: r.cert.into_bytes(),
                key: r.key.into_bytes(),
                what,
            }),
            Err(e) => warnings.push(format!(
                "{what}: skipped: expected JSON {{\"cert\": PEM, \"key\": PEM}}: {e}"
            )),
        }
    }
    (pairs, warnings)
}

/// Reads `store`'s prefix every [`REREAD`] until `shutdown`, publishing its pairs on `out`
/// when they change. Warnings and read errors are logged when they change, not at every read.
pub async fn run(store: KvStore, out: watch::Sender<StorePairs>, shutdown: Shutdown) {
    let mut last_log: Vec<String> = Vec::new();
    loop {
        let log = match store.list().await {
            Ok(values) => {
                let (pairs, warnings) = decode(store.prefix(), &values);
                out.send_if_modified(|old| {
                    if **old == pairs {
                        return false;
                    }
                    *old = Arc::new(pairs);
                    true
                });
                warnings
            }
            Err(e) => vec![format!(
                "https store_prefix {}: cannot read it, keeping what was read before: {e}",
                store.prefix()
            )],
        };
        if log != last_log {
            for w in &log {
                tracing::warn!("{w}");
            }
            last_log = log;
        }
        tokio::select! {
            _ = tokio::time::sleep(REREAD) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_decode_and_bad_ones_are_named() {
        let values = BTreeMap::from([
            ("a.test".to_string(), br#"{"cert":"C","key":"K"}"#.to_vec()),
            ("dir/".to_string(), Vec::new()),
            ("b.test".to_string(), b"not json".to_vec()),
            (
                "c.test".to_string(),
                br#"{"cert":"C","key":"K","extra":1}"#.to_vec(),
            ),
        ]);
        let (pairs, warnings) = decode("switchboard/certs/", &values);
        assert_eq!(pairs.len(), 1);
        assert_eq!(
            (
                pairs[0].name.as_str(),
                pairs[0].crt.as_slice(),
                pairs[0].key.as_slice()
            ),
            ("a.test", &b"C"[..], &b"K"[..])
        );
        assert_eq!(pairs[0].what, "store key switchboard/certs/a.test");
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].starts_with("store key switchboard/certs/b.test: skipped: expected JSON")
        );
        assert!(warnings[1].contains("c.test"));
    }
}
