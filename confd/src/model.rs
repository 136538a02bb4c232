//! What templates see: a snapshot of the store turned into plain data.
//!
//! Sources build a [`Snapshot`] (instances and key/values); [`template_data`] turns it into the
//! JSON document templates render from. Registry values are untrusted (they come from container
//! labels), so the structural ones are validated here once: an instance whose address is not
//! an IP address or DNS name is dropped with a warning, and a virtual host that is not a valid
//! DNS name is ignored. Free-text values (names, tags, meta) stay as they are; templates must
//! pass them through the `*_name` / `*_string` helpers.

use crate::helpers::safe_token;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// One service instance as templates see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instance {
    /// Unique ID.
    pub id: String,
    /// Service name.
    pub name: String,
    /// IP address or DNS name (validated).
    pub address: String,
    /// Port.
    pub port: u16,
    /// Tags, as registered.
    pub tags: Vec<String>,
    /// Metadata (`SERVICE_<KEY>` values, keys lowercased).
    pub meta: BTreeMap<String, String>,
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
            meta: s.meta,
            node,
            health,
        }
    }

    /// The virtual host this instance serves: meta `vhost`, or meta `hostname` + `.` + meta
    /// `domain`; `None` when absent or not a valid DNS name.
    pub fn vhost(&self) -> Option<String> {
        let v = match (self.meta.get("vhost"), self.meta.get("hostname")) {
            (Some(v), _) if !v.is_empty() => v.clone(),
            (_, Some(h)) if !h.is_empty() => match self.meta.get("domain") {
                Some(d) if !d.is_empty() => format!("{h}.{}", d.trim_start_matches('.')),
                _ => h.clone(),
            },
            _ => return None,
        };
        let v = v.to_ascii_lowercase();
        is_dns_name(&v).then_some(v)
    }
}

/// Everything one render sees from the store. Only healthy sources publish one, so a snapshot
/// is never the partial view of an outage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Instances by service name, each list sorted by ID.
    pub services: BTreeMap<String, Vec<Instance>>,
    /// Key/values under the configured prefixes.
    pub kv: BTreeMap<String, String>,
}

impl Snapshot {
    /// Builds a snapshot, dropping instances with an unusable address and services in
    /// `ignore`, sorting and de-duplicating by ID.
    pub fn build(
        instances: impl IntoIterator<Item = Instance>,
        kv: BTreeMap<String, String>,
        ignore: &[String],
    ) -> Snapshot {
        let mut services: BTreeMap<String, BTreeMap<String, Instance>> = BTreeMap::new();
        for i in instances {
            if ignore.contains(&i.name) {
                continue;
            }
            if !is_address(&i.address) {
                // Excerpts: these values come from labels and may be megabytes long.
                tracing::warn!(
                    service = ?switchboard::excerpt(&i.name),
                    id = ?switchboard::excerpt(&i.id),
                    address = ?switchboard::excerpt(&i.address),
                    "ignoring instance: address is not an IP address or DNS name"
                );
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

#[derive(Serialize)]
struct InstanceData<'a> {
    #[serde(flatten)]
    inst: &'a Instance,
    /// Validated virtual host, or empty.
    vhost: String,
}

#[derive(Serialize)]
struct ServiceData<'a> {
    name: &'a str,
    tags: Vec<&'a str>,
    instances: Vec<InstanceData<'a>>,
}

#[derive(Serialize)]
struct VhostData<'a> {
    host: String,
    /// A token safe as an upstream/backend name.
    name: String,
    instances: Vec<InstanceData<'a>>,
}

fn inst_data(i: &Instance) -> InstanceData<'_> {
    InstanceData {
        inst: i,
        vhost: i.vhost().unwrap_or_default(),
    }
}

/// The document templates render: `services`, `service`, `vhosts`, `kv`, `vars`.
pub fn template_data(
    snap: &Snapshot,
    vars: &BTreeMap<String, serde_json::Value>,
) -> serde_json::Value {
    let services: Vec<ServiceData> = snap
        .services
        .iter()
        .map(|(name, insts)| ServiceData {
            name,
            tags: insts
                .iter()
                .flat_map(|i| i.tags.iter().map(String::as_str))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            instances: insts.iter().map(inst_data).collect(),
        })
        .collect();
    let by_name: BTreeMap<&str, Vec<InstanceData>> = snap
        .services
        .iter()
        .map(|(n, insts)| (n.as_str(), insts.iter().map(inst_data).collect()))
        .collect();
    let mut vhosts: BTreeMap<String, Vec<InstanceData>> = BTreeMap::new();
    for insts in snap.services.values() {
        for i in insts {
            if let Some(v) = i.vhost() {
                vhosts.entry(v).or_default().push(inst_data(i));
            }
        }
    }
    let vhosts: Vec<VhostData> = vhosts
        .into_iter()
        .map(|(host, instances)| VhostData {
            name: safe_token(&host),
            host,
            instances,
        })
        .collect();
    serde_json::json!({
        "services": services,
        "service": by_name,
        "vhosts": vhosts,
        "kv": snap.kv,
        "vars": vars,
    })
}

/// An IP address or a DNS name: what may stand in a `server` line.
pub fn is_address(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok() || is_dns_name(s)
}

/// RFC 1123 host name: dot-separated labels of letters, digits and `-`, not starting or ending
/// with `-`, at most 253 characters.
pub fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
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
            meta: BTreeMap::new(),
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
    fn addresses_and_dns_names() {
        let cases = [
            ("10.0.0.1", true),
            ("fd00::1", true),
            ("web.local", true),
            ("a-b.c", true),
            ("1.2.3.4; }", false),
            ("", false),
            ("-a.b", false),
            ("a..b", false),
            ("a b", false),
            ("a\nb", false),
        ];
        for (s, ok) in cases {
            assert_eq!(is_address(s), ok, "{s:?}");
        }
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
    fn build_sorts_dedups_and_drops_bad_addresses() {
        let s = Snapshot::build(
            vec![
                inst("web", "b", "10.0.0.2", 80),
                inst("web", "a", "10.0.0.1", 80),
                inst("web", "a", "10.0.0.1", 80),
                inst("web", "c", "1.2.3.4; }", 80),
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

    #[test]
    fn data_layout() {
        let mut a = inst("web", "a", "10.0.0.1", 80);
        a.tags = vec!["x".into(), "backend".into()];
        a.meta.insert("vhost".into(), "w.local".into());
        let mut b = inst("web", "b", "10.0.0.2", 81);
        b.tags = vec!["backend".into()];
        let s = Snapshot::build(vec![a, b], [("k".into(), "v".into())].into(), &[]);
        let d = template_data(&s, &[("listen".into(), serde_json::json!(80))].into());
        assert_eq!(d["services"][0]["name"], "web");
        assert_eq!(
            d["services"][0]["tags"],
            serde_json::json!(["backend", "x"])
        );
        assert_eq!(d["services"][0]["instances"][1]["port"], 81);
        assert_eq!(d["service"]["web"][0]["vhost"], "w.local");
        assert_eq!(d["service"]["web"][1]["vhost"], "");
        assert_eq!(d["vhosts"][0]["host"], "w.local");
        assert_eq!(d["vhosts"][0]["name"], "w.local");
        assert_eq!(d["vhosts"][0]["instances"][0]["id"], "a");
        assert_eq!(d["kv"]["k"], "v");
        assert_eq!(d["vars"]["listen"], 80);
    }
}
