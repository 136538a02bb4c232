//! Where services live in each store: check IDs in Consul, keys in Consul KV and etcd, and
//! the JSON value an etcd key holds. The registrator writes this layout and confd reads it,
//! so it has one owner.

use crate::Service;

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
/// `ip:port`, back into a service (only the parts a KV entry holds). `None` when the entry does
/// not have that shape.
pub fn consulkv_entry(rel_key: &str, value: &[u8]) -> Option<Service> {
    let (name, id) = rel_key.split_once('/')?;
    let text = std::str::from_utf8(value).ok()?.trim();
    let (host, port) = text.rsplit_once(':')?;
    Some(Service {
        id: id.to_string(),
        name: name.to_string(),
        address: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port: port.parse().ok()?,
        tags: Vec::new(),
        meta: Default::default(),
        check: None,
        ttl: None,
        docker_health: None,
    })
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
}
