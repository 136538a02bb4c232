//! Where services live in each store: check IDs in Consul, keys in Consul KV and etcd, and
//! the JSON value an etcd key holds. The registrator writes this layout and confd reads it,
//! so it has one owner.
//!
//! Reading it back is entry by entry: whoever wrote an entry (registrator, an operator,
//! another tool), one that is not a usable service comes back as a [`BadEntry`] beside the
//! good ones, never as a failure of the whole answer, so it can only ever affect itself.

use crate::{excerpt, validate, Service};
use serde::Deserialize;
use std::fmt;
use std::hash::{Hash, Hasher};

/// ID of the TTL check the registrator attaches to a Consul service when run with `-ttl`.
pub fn ttl_check_id(service_id: &str) -> String {
    format!("service:{service_id}:ttl")
}

/// ID of the check whose status follows the container's Docker HEALTHCHECK
/// ([`Service::docker_health`]).
pub fn docker_health_check_id(service_id: &str) -> String {
    format!("service:{service_id}:docker-health")
}

/// Consul KV key of a service: `<prefix>/<name>/<id>` (gliderlabs' layout).
pub(super) fn consulkv_key(prefix: &str, svc: &Service) -> String {
    if prefix.is_empty() {
        format!("{}/{}", svc.name, svc.id)
    } else {
        format!("{prefix}/{}/{}", svc.name, svc.id)
    }
}

/// A Consul KV entry in registrator's layout, `<name>/<id>` (relative to the prefix) =
/// `ip:port`, back into a service (only the parts a KV entry holds). `None` when the key does
/// not have that shape (it is not a service entry); a service key whose value is not
/// `host:port` with a valid port ([`validate::port`]) is a [`BadEntry`].
pub fn consulkv_entry(rel_key: &str, value: &[u8]) -> Option<Result<Service, BadEntry>> {
    let (name, id) = rel_key.split_once('/')?;
    let bad = |problem| BadEntry {
        name: Some(name.to_string()),
        id: Some(id.to_string()),
        problem,
        digest: digest(&value),
    };
    let decode = |why: String| bad(EntryProblem::Decode(why));
    let service = (|| {
        let text = std::str::from_utf8(value)
            .map_err(|_| decode("the value is not UTF-8".into()))?
            .trim();
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| decode(format!("value {:?} is not host:port", excerpt(text))))?;
        let port: i64 = port
            .parse()
            .map_err(|_| decode(format!("port {:?} is not a number", excerpt(port))))?;
        let port = validate::port(port).map_err(|e| bad(EntryProblem::Port(e)))?;
        Ok(Service {
            id: id.to_string(),
            name: name.to_string(),
            address: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            tags: Vec::new(),
            meta: Default::default(),
            check: None,
            ttl: None,
            docker_health: None,
        })
    })();
    Some(service)
}

/// The etcd directory services live under: `/<prefix>/` (or `/`).
pub fn etcd_dir(prefix: &str) -> String {
    if prefix.is_empty() {
        "/".to_string()
    } else {
        format!("/{prefix}/")
    }
}

/// etcd key of a service: `/<prefix>/<name>/<id>`.
pub(super) fn etcd_key(prefix: &str, svc: &Service) -> String {
    format!("{}{}/{}", etcd_dir(prefix), svc.name, svc.id)
}

/// What an etcd value holds: the service as confd and other readers need it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EtcdValue {
    /// Service ID.
    pub id: String,
    /// Service name.
    pub name: String,
    /// Address to connect to.
    pub address: String,
    /// Port to connect to.
    pub port: u16,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Metadata (`SERVICE_<KEY>` values).
    #[serde(default)]
    pub meta: std::collections::BTreeMap<String, String>,
}

impl From<&Service> for EtcdValue {
    fn from(s: &Service) -> Self {
        EtcdValue {
            id: s.id.clone(),
            name: s.name.clone(),
            address: s.address.clone(),
            port: s.port,
            tags: s.tags.clone(),
            meta: s.meta.clone(),
        }
    }
}

impl From<EtcdValue> for Service {
    fn from(v: EtcdValue) -> Self {
        Service {
            id: v.id,
            name: v.name,
            address: v.address,
            port: v.port,
            tags: v.tags,
            meta: v.meta,
            check: None,
            ttl: None,
            docker_health: None,
        }
    }
}

/// An etcd value back into a service (only the parts an etcd value holds), or why it is not
/// one: not JSON, a field missing or of the wrong type, or a port [`validate::port`] refuses
/// (the value's `port` is read as any integer, so 65536 or -5 is named as a bad port rather
/// than as undecodable).
pub fn etcd_entry(value: &[u8]) -> Result<Service, BadEntry> {
    /// [`EtcdValue`] with the port as written.
    #[derive(Deserialize)]
    struct Stored {
        id: String,
        name: String,
        address: String,
        port: i64,
        #[serde(default)]
        tags: Vec<String>,
        #[serde(default)]
        meta: std::collections::BTreeMap<String, String>,
    }
    let v: Stored = match serde_json::from_slice(value) {
        Ok(v) => v,
        Err(e) => {
            // Slow path, for the message only: the name and ID, if they can be read.
            let any: Option<serde_json::Value> = serde_json::from_slice(value).ok();
            let field = |k: &str| {
                any.as_ref()
                    .and_then(|v| v.get(k))
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_string)
            };
            return Err(BadEntry {
                name: field("name"),
                id: field("id"),
                problem: EntryProblem::Decode(e.to_string()),
                digest: digest(&value),
            });
        }
    };
    let port = match validate::port(v.port) {
        Ok(p) => p,
        Err(e) => {
            return Err(BadEntry {
                name: Some(v.name),
                id: Some(v.id),
                problem: EntryProblem::Port(e),
                digest: digest(&value),
            })
        }
    };
    Ok(Service {
        id: v.id,
        name: v.name,
        address: v.address,
        port,
        tags: v.tags,
        meta: v.meta,
        check: None,
        ttl: None,
        docker_health: None,
    })
}

/// What makes a stored entry unusable as a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryProblem {
    /// It does not have the layout's shape: not JSON, a field missing or of another type.
    Decode(String),
    /// Its port is not one a proxy can use.
    Port(validate::PortError),
}

impl EntryProblem {
    /// A one-word name of the problem (`decode`, `port`), e.g. for a metric label.
    pub fn label(&self) -> &'static str {
        match self {
            EntryProblem::Decode(_) => "decode",
            EntryProblem::Port(_) => "port",
        }
    }
}

impl fmt::Display for EntryProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryProblem::Decode(why) => write!(f, "cannot decode the entry: {why}"),
            EntryProblem::Port(e) => e.fmt(f),
        }
    }
}

/// A stored entry that is not a usable service, as the decoders report it beside the good
/// entries of the same answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadEntry {
    /// The service name, when it could be read.
    pub name: Option<String>,
    /// The service ID, when it could be read.
    pub id: Option<String>,
    /// What is wrong.
    pub problem: EntryProblem,
    /// A digest of the entry as stored: the same for a repeat of the same entry (Consul sends
    /// a service's bad entry again in every answer about that service), different after any
    /// change, so a reader can report each version of an entry once.
    pub digest: u64,
}

/// A digest of `value` (see [`BadEntry::digest`]): stable within a process, which is all a
/// reader comparing versions of an entry needs.
pub(super) fn digest(value: &impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A service for the store tests.
    pub(in crate::store) fn svc() -> Service {
        Service {
            id: "host:web:80".into(),
            name: "web".into(),
            address: "10.0.0.2".into(),
            port: 8080,
            tags: vec![],
            meta: Default::default(),
            check: None,
            ttl: None,
            docker_health: None,
        }
    }

    #[test]
    fn keys() {
        assert_eq!(consulkv_key("services", &svc()), "services/web/host:web:80");
        assert_eq!(consulkv_key("", &svc()), "web/host:web:80");
        assert_eq!(etcd_key("services", &svc()), "/services/web/host:web:80");
        assert_eq!(etcd_key("", &svc()), "/web/host:web:80");
        assert_eq!(ttl_check_id("a:b:80"), "service:a:b:80:ttl");
        assert_eq!(
            docker_health_check_id("a:b:80"),
            "service:a:b:80:docker-health"
        );
    }

    #[test]
    fn etcd_entries_one_by_one() {
        let good = br#"{"id": "h:c:80", "name": "web", "address": "10.0.0.2", "port": 8080}"#;
        let s = etcd_entry(good).unwrap();
        assert_eq!(
            (s.id.as_str(), s.name.as_str(), s.port),
            ("h:c:80", "web", 8080)
        );
        // (value, problem label, name and ID read back)
        let table: [(&[u8], &str, Option<&str>); 8] = [
            (
                br#"{"id": "a", "name": "web", "address": "x", "port": 0}"#,
                "port",
                Some("a"),
            ),
            (
                br#"{"id": "a", "name": "web", "address": "x", "port": 65536}"#,
                "port",
                Some("a"),
            ),
            (
                br#"{"id": "a", "name": "web", "address": "x", "port": -5}"#,
                "port",
                Some("a"),
            ),
            (
                br#"{"id": "a", "name": "web", "address": "x", "port": 80.5}"#,
                "decode",
                Some("a"),
            ),
            (
                br#"{"id": "a", "name": "web", "address": "x", "port": "80"}"#,
                "decode",
                Some("a"),
            ),
            (
                br#"{"id": "a", "name": "web", "address": "x"}"#,
                "decode",
                Some("a"),
            ),
            (
                br#"{"id": 7, "name": "web", "address": "x", "port": 80}"#,
                "decode",
                None,
            ),
            (b"not json", "decode", None),
        ];
        for (value, label, id) in table {
            let what = String::from_utf8_lossy(value);
            let e = etcd_entry(value).unwrap_err();
            assert_eq!(e.problem.label(), label, "{what}");
            assert_eq!(e.id.as_deref(), id, "{what}");
            assert_eq!(
                e.digest,
                etcd_entry(value).unwrap_err().digest,
                "{what}: stable"
            );
        }
        let a = etcd_entry(br#"{"id": "a", "name": "w", "address": "x", "port": 0}"#);
        let b = etcd_entry(br#"{"id": "a", "name": "w", "address": "y", "port": 0}"#);
        assert_ne!(
            a.unwrap_err().digest,
            b.unwrap_err().digest,
            "a change shows"
        );
    }

    #[test]
    fn consulkv_entries_one_by_one() {
        let s = consulkv_entry("web/h:c:80", b"10.0.0.2:8080")
            .unwrap()
            .unwrap();
        assert_eq!(
            (s.name.as_str(), s.id.as_str(), s.port),
            ("web", "h:c:80", 8080)
        );
        let s = consulkv_entry("web/x", b" [fd00::1]:80\n")
            .unwrap()
            .unwrap();
        assert_eq!((s.address.as_str(), s.port), ("fd00::1", 80));
        assert!(
            consulkv_entry("noslash", b"1.2.3.4:80").is_none(),
            "not a service key"
        );
        let table: [(&[u8], &str); 7] = [
            (b"1.2.3.4:0", "port"),
            (b"1.2.3.4:65536", "port"),
            (b"1.2.3.4:-5", "port"),
            (b"1.2.3.4:http", "decode"),
            (b"1.2.3.4", "decode"),
            (b"", "decode"),
            (b"\xff:80", "decode"),
        ];
        for (value, label) in table {
            let e = consulkv_entry("web/x", value).unwrap().unwrap_err();
            assert_eq!(e.problem.label(), label, "{value:?}");
            assert_eq!(
                (e.name.as_deref(), e.id.as_deref()),
                (Some("web"), Some("x"))
            );
        }
        let e = consulkv_entry("web/x", b"1.2.3.4:65536")
            .unwrap()
            .unwrap_err();
        assert_eq!(
            e.problem.to_string(),
            "invalid port 65536; expected 1 to 65535"
        );
    }
}
