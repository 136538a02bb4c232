//! What templates see: a snapshot of the store turned into plain data.
//!
//! Sources build a [`Snapshot`] (instances and key/values); [`crate::render::data`] turns it into the
//! JSON document templates render from. Registry values are untrusted (they come from container
//! labels), so the structural ones are validated once: an instance's name, ID, port and
//! address by the source that reads it ([`crate::source::Publisher::instance`]), and a virtual
//! host here (one that is not a valid DNS name is ignored). Free-text values (names, tags,
//! meta) stay as they are; templates must pass them through the `*_name` / `*_string` helpers.

use serde::{Serialize, Serializer};
use std::collections::BTreeMap;
use std::sync::Arc;

/// One service instance as templates see it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Instance {
    /// Unique ID.
    pub id: String,
    /// Service name.
    pub name: String,
    /// IP address or DNS name that resolves (validated by the source).
    pub address: String,
    /// Port, 1 to 65535 (validated by the source).
    pub port: u16,
    /// Tags, as registered.
    pub tags: Vec<String>,
    /// Metadata (`SERVICE_<KEY>` values, keys lowercased).
    pub meta: Meta,
    /// Consul node name (empty for other stores).
    pub node: String,
    /// `passing`, `warning` or `critical` (always `passing` outside Consul agent services).
    pub health: String,
}

impl Instance {
    /// An instance of a registered service, on `node` (empty outside Consul agent services)
    /// with aggregate check status `health`.
    pub fn from_service(s: switchboard::Service, node: String, health: String) -> Instance {
        Instance {
            id: s.id,
            name: s.name,
            address: s.address,
            port: s.port,
            tags: s.tags,
            meta: s.meta.into(),
            node,
            health,
        }
    }

    /// The virtual host this instance serves: meta `vhost`, or meta `hostname` + `.` + meta
    /// `domain`; `None` when absent or not a valid DNS name.
    pub fn vhost(&self) -> Option<String> {
        crate::names::vhost(|k| self.meta.get(k).map(String::as_str))
    }
}

/// An instance's metadata: key/value pairs sorted by key, as a `BTreeMap` holds them, in one
/// allocation of their exact number. A `BTreeMap` allocates a node for 11 entries (about
/// 640 bytes) for even one; instances hold a few, and 10,000 instances are held at once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Meta(Vec<(String, String)>);

impl Meta {
    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<&String> {
        let i = self.0.binary_search_by(|(k, _)| k.as_str().cmp(key)).ok()?;
        Some(&self.0[i].1)
    }

    /// Sets `key` to `value`, returning the value it replaces.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        match self.0.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    /// The pairs in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> + Clone {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<BTreeMap<String, String>> for Meta {
    fn from(m: BTreeMap<String, String>) -> Meta {
        // Sorted and unique already; `collect` from a map sizes the list exactly.
        Meta(m.into_iter().collect())
    }
}

/// As a map, the way it was a `BTreeMap`.
impl Serialize for Meta {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

/// Everything one render sees from the store. Only healthy sources publish one, so a snapshot
/// is never the partial view of an outage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Instances by service name, each list sorted by ID. Shared (`Arc`): a source keeps
    /// the instances it parsed and each snapshot points at them, so an instance costs its
    /// memory once however many snapshots are alive, and comparing two snapshots is mostly
    /// comparing pointers.
    pub services: BTreeMap<String, Vec<Arc<Instance>>>,
    /// Key/values under the configured prefixes.
    pub kv: BTreeMap<String, String>,
}

impl Snapshot {
    /// Builds a snapshot, dropping services in `ignore`, sorting and de-duplicating by ID.
    /// The instances are the source's, already validated.
    pub fn build<I: Into<Arc<Instance>>>(
        instances: impl IntoIterator<Item = I>,
        kv: BTreeMap<String, String>,
        ignore: &[String],
    ) -> Snapshot {
        let mut services: BTreeMap<String, BTreeMap<String, Arc<Instance>>> = BTreeMap::new();
        for i in instances {
            let i = i.into();
            if ignore.contains(&i.name) {
                continue;
            }
            services
                .entry(i.name.clone())
                .or_default()
                .insert(i.id.clone(), i);
        }
        Snapshot {
            services: services
                .into_iter()
                .map(|(k, v)| (k, v.into_values().collect()))
                .collect(),
            kv,
        }
    }

    /// Number of instances over all services (the `min_instances` outage guard).
    pub fn total_instances(&self) -> usize {
        self.services.values().map(Vec::len).sum()
    }

    /// Whether going from `old` to `self` takes an endpoint away: an instance of `old` is
    /// gone, or now has another address or port. Such a change is applied without waiting for
    /// quiescence: the instance is usually being drained, and each moment it stays in the
    /// proxy sends it requests it may no longer answer. Additions may wait and coalesce.
    pub fn withdraws_from(&self, old: &Snapshot) -> bool {
        old.services.iter().any(|(name, was)| {
            let now = self
                .services
                .get(name)
                .map(Vec::as_slice)
                .unwrap_or_default();
            was.iter().any(|o| {
                // Both lists are sorted by ID (see `build`).
                match now.binary_search_by(|n| n.id.cmp(&o.id)) {
                    Ok(k) => now[k].address != o.address || now[k].port != o.port,
                    Err(_) => true,
                }
            })
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn inst(name: &str, id: &str, addr: &str, port: u16) -> Instance {
        Instance {
            id: id.into(),
            name: name.into(),
            address: addr.into(),
            port,
            tags: vec![],
            meta: Meta::default(),
            node: "n1".into(),
            health: "passing".into(),
        }
    }

    #[test]
    fn withdrawals_are_told_from_additions() {
        let snap = |v: &[(&str, &str, &str, u16)]| {
            Snapshot::build(
                v.iter().map(|(n, id, a, p)| inst(n, id, a, *p)),
                BTreeMap::new(),
                &[],
            )
        };
        let base = snap(&[("web", "a", "10.0.0.1", 80), ("web", "b", "10.0.0.2", 80)]);
        let cases = [
            (
                "same",
                snap(&[("web", "a", "10.0.0.1", 80), ("web", "b", "10.0.0.2", 80)]),
                false,
            ),
            (
                "added",
                snap(&[
                    ("web", "a", "10.0.0.1", 80),
                    ("web", "b", "10.0.0.2", 80),
                    ("web", "c", "10.0.0.3", 80),
                    ("api", "x", "10.0.0.4", 80),
                ]),
                false,
            ),
            ("removed", snap(&[("web", "a", "10.0.0.1", 80)]), true),
            ("service gone", snap(&[]), true),
            (
                "moved",
                snap(&[("web", "a", "10.0.0.1", 80), ("web", "b", "10.0.0.9", 80)]),
                true,
            ),
            (
                "port",
                snap(&[("web", "a", "10.0.0.1", 80), ("web", "b", "10.0.0.2", 81)]),
                true,
            ),
            (
                "renamed",
                snap(&[("web", "a", "10.0.0.1", 80), ("api", "b", "10.0.0.2", 80)]),
                true,
            ),
        ];
        for (what, new, want) in cases {
            assert_eq!(new.withdraws_from(&base), want, "{what}");
        }
        assert!(!base.withdraws_from(&Snapshot::default()));
    }

    #[test]
    fn meta_is_a_sorted_map() {
        let mut m = Meta::from(BTreeMap::from([
            ("b".to_string(), "2".to_string()),
            ("a".to_string(), "1".to_string()),
        ]));
        assert_eq!(m.insert("c".into(), "3".into()), None);
        assert_eq!(m.insert("a".into(), "0".into()), Some("1".into()));
        assert_eq!(m.insert("aa".into(), "x".into()), None);
        assert_eq!(m.get("a").map(String::as_str), Some("0"));
        assert_eq!(m.get("ab"), None);
        let keys: Vec<_> = m.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a", "aa", "b", "c"]);
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            serde_json::json!({"a": "0", "aa": "x", "b": "2", "c": "3"})
        );
    }

    #[test]
    fn vhost_from_meta() {
        let mut i = inst("app", "1", "10.0.0.1", 80);
        assert_eq!(i.vhost(), None);
        i.meta.insert("hostname".into(), "2048".into());
        assert_eq!(i.vhost().as_deref(), Some("2048"));
        i.meta.insert("domain".into(), "local.com".into());
        assert_eq!(i.vhost().as_deref(), Some("2048.local.com"));
        i.meta.insert("vhost".into(), "RestServer.local".into());
        assert_eq!(i.vhost().as_deref(), Some("restserver.local"));
        i.meta
            .insert("vhost".into(), "a; } server { listen 81; }".into());
        assert_eq!(i.vhost(), None);
    }

    #[test]
    fn build_sorts_dedups_and_ignores() {
        let s = Snapshot::build(
            vec![
                inst("web", "b", "10.0.0.2", 80),
                inst("web", "a", "10.0.0.1", 80),
                inst("web", "a", "10.0.0.1", 80),
                inst("consul", "consul", "127.0.0.1", 8300),
                inst("db", "d", "db.local", 5432),
            ],
            BTreeMap::new(),
            &["consul".to_string()],
        );
        let ids: Vec<_> = s.services["web"].iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(!s.services.contains_key("consul"));
        assert_eq!(s.total_instances(), 3);
    }
}
