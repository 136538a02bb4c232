//! Stores: where services are registered and read back.
//!
//! [`ConsulClient`] and [`EtcdClient`] are thin HTTP clients of each store's API (Consul's HTTP
//! API, etcd v3's JSON gateway). [`Store`] puts the registrator's operations (register,
//! deregister, list, refresh) over them, chosen at start from a [`RegistryUri`]; confd uses the
//! clients' read and watch calls directly.

mod consul;
mod etcd;

pub use consul::{ConsulClient, HealthEntry};
pub use etcd::{EtcdClient, KeyValue, RangeResult, WatchBatch, WatchEvent, WatchStream};

use crate::{RegistryUri, Service};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No answer: connection refused, reset or timed out. Retry later.
    #[error("{endpoint} unreachable: {reason}")]
    Unreachable {
        /// Which endpoint (base URL).
        endpoint: String,
        /// The transport error, flattened to one line.
        reason: String,
    },
    /// The store answered with an HTTP error.
    #[error("{endpoint} answered {status} to {what}: {body}")]
    Status {
        /// Which endpoint (base URL).
        endpoint: String,
        /// What was asked (method and path).
        what: String,
        /// HTTP status code.
        status: u16,
        /// The first line of the body.
        body: String,
    },
    /// etcd compacted away the revision a watch wanted to resume from: re-list.
    #[error(
        "etcd revision {requested} was compacted (oldest kept {compact_revision}); re-list needed"
    )]
    Compacted {
        /// Revision asked for.
        requested: i64,
        /// Oldest revision still available.
        compact_revision: i64,
    },
    /// A TTL lease or check the store no longer knows: registrations must be written again.
    #[error("{what} expired or unknown to the store")]
    Expired {
        /// Which lease or check.
        what: String,
    },
    /// The store's answer could not be decoded.
    #[error("cannot decode {what}: {reason}")]
    Decode {
        /// What was being decoded.
        what: String,
        /// Why it failed.
        reason: String,
    },
}

/// The registrator's view of a store.
///
/// Every method is a complete request/response exchange, so all are cancel-safe in the sense
/// that dropping one leaves no client state half-updated; the store itself may or may not have
/// applied a dropped write, which is why callers re-list rather than trust their own bookkeeping
/// after an error.
#[derive(Debug, Clone)]
pub enum Store {
    /// `consul://`: agent services with checks.
    Consul(ConsulClient),
    /// `consulkv://`: `<prefix>/<name>/<id>` = `ip:port`.
    ConsulKv {
        /// The agent.
        client: ConsulClient,
        /// Key prefix, no leading or trailing `/`.
        prefix: String,
    },
    /// `etcd://`: `/<prefix>/<name>/<id>` = service JSON, optionally under a TTL lease.
    Etcd {
        /// The members.
        client: EtcdClient,
        /// Key prefix, no leading or trailing `/`.
        prefix: String,
        /// The lease TTL registrations are attached to; granted on first use, replaced when
        /// the store reports it gone.
        lease: Arc<Mutex<Option<i64>>>,
    },
}

impl Store {
    /// A store for this URI. `CONSUL_HTTP_TOKEN` is sent to Consul when set.
    pub fn new(uri: &RegistryUri) -> Store {
        let token = std::env::var("CONSUL_HTTP_TOKEN")
            .ok()
            .filter(|t| !t.is_empty());
        match uri {
            RegistryUri::Consul { endpoint } => Store::Consul(ConsulClient::new(endpoint, token)),
            RegistryUri::ConsulKv { endpoint, prefix } => Store::ConsulKv {
                client: ConsulClient::new(endpoint, token),
                prefix: prefix.clone(),
            },
            RegistryUri::Etcd { endpoints, prefix } => Store::Etcd {
                client: EtcdClient::new(endpoints.clone()),
                prefix: prefix.clone(),
                lease: Arc::new(Mutex::new(None)),
            },
        }
    }

    /// A short name for logs: `consul`, `consulkv` or `etcd`.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Consul(_) => "consul",
            Store::ConsulKv { .. } => "consulkv",
            Store::Etcd { .. } => "etcd",
        }
    }

    /// Checks the store answers (Consul: agent self; etcd: a range on the prefix).
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Consul(c) | Store::ConsulKv { client: c, .. } => c.agent_self().await,
            Store::Etcd { client, prefix, .. } => {
                client.range_prefix(&etcd_dir(prefix)).await.map(|_| ())
            }
        }
    }

    /// Registers `svc`, replacing any registration with the same ID. Idempotent.
    ///
    /// With `svc.ttl` set: Consul gets an extra TTL check ([`ttl_check_id`]); etcd puts the
    /// key under this store's lease, granting one if none is held.
    pub async fn register(&self, svc: &Service) -> Result<(), StoreError> {
        match self {
            Store::Consul(c) => c.agent_register(svc).await,
            Store::ConsulKv { client, prefix } => {
                client
                    .kv_put(&consulkv_key(prefix, svc), svc.addr().as_bytes())
                    .await
            }
            Store::Etcd {
                client,
                prefix,
                lease,
            } => {
                let lease_id = match svc.ttl {
                    None => None,
                    Some(ttl) => {
                        let mut held = lease.lock().await;
                        match *held {
                            Some(id) => Some(id),
                            None => {
                                let id = client.lease_grant(ttl).await?;
                                *held = Some(id);
                                Some(id)
                            }
                        }
                    }
                };
                let value = serde_json::to_vec(&EtcdValue::from(svc)).expect("service JSON");
                client
                    .put(&etcd_key(prefix, svc), &value, lease_id)
                    .await
                    .map(|_| ())
            }
        }
    }

    /// Removes `svc` (by ID, and by name where the key needs it). Removing what is not there is
    /// not an error.
    pub async fn deregister(&self, svc: &Service) -> Result<(), StoreError> {
        match self {
            Store::Consul(c) => c.agent_deregister(&svc.id).await,
            Store::ConsulKv { client, prefix } => {
                client.kv_delete(&consulkv_key(prefix, svc)).await
            }
            Store::Etcd { client, prefix, .. } => client.delete(&etcd_key(prefix, svc)).await,
        }
    }

    /// Every registration whose ID starts with `id_prefix` (the registrator passes
    /// `<hostname>:`). Only `id`, `name`, `address` and `port` are guaranteed to be filled.
    pub async fn list(&self, id_prefix: &str) -> Result<Vec<Service>, StoreError> {
        let all = match self {
            Store::Consul(c) => c.agent_services().await?,
            Store::ConsulKv { client, prefix } => {
                let dir = if prefix.is_empty() {
                    String::new()
                } else {
                    format!("{prefix}/")
                };
                let (kvs, _) = client.kv_list(&dir, 0, Duration::ZERO).await?;
                kvs.into_iter()
                    .filter_map(|(k, v)| consulkv_entry(&k[dir.len()..], &v))
                    .collect()
            }
            Store::Etcd { client, prefix, .. } => {
                let range = client.range_prefix(&etcd_dir(prefix)).await?;
                range
                    .kvs
                    .iter()
                    .filter_map(|kv| serde_json::from_slice::<EtcdValue>(&kv.value).ok())
                    .map(Service::from)
                    .collect()
            }
        };
        Ok(all
            .into_iter()
            .filter(|s| s.id.starts_with(id_prefix))
            .collect())
    }

    /// Keeps TTL registrations alive: passes each service's TTL check (Consul) or keeps the
    /// lease alive (etcd). Returns [`StoreError::Expired`] when the store no longer knows the
    /// check or lease, so the caller registers everything again. Consul KV has no TTL support
    /// here (sessions would be needed); refresh is a no-op for it.
    pub async fn refresh(&self, services: &[Service]) -> Result<(), StoreError> {
        match self {
            Store::Consul(c) => {
                for svc in services.iter().filter(|s| s.ttl.is_some()) {
                    c.agent_check_pass(&ttl_check_id(&svc.id)).await?;
                }
                Ok(())
            }
            Store::ConsulKv { .. } => Ok(()),
            Store::Etcd { client, lease, .. } => {
                let mut held = lease.lock().await;
                let Some(id) = *held else { return Ok(()) };
                match client.lease_keepalive(id).await {
                    Err(e @ StoreError::Expired { .. }) => {
                        // Forget it: the next register grants a fresh lease.
                        *held = None;
                        Err(e)
                    }
                    other => other,
                }
            }
        }
    }
}

/// An error and its causes on one line, so a log line stays a line: reqwest's own message
/// ("error sending request") says little; the cause (connection refused, timed out) is what an
/// operator needs. reqwest and hyper often repeat their source in their own message, so
/// repeats are skipped.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let msg = s.to_string();
        if !text.contains(&msg) {
            text.push_str(": ");
            text.push_str(&msg);
        }
        source = s.source();
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// ID of the TTL check the registrator attaches to a Consul service when run with `-ttl`.
pub fn ttl_check_id(service_id: &str) -> String {
    format!("service:{service_id}:ttl")
}

/// Consul KV key of a service: `<prefix>/<name>/<id>` (gliderlabs' layout).
fn consulkv_key(prefix: &str, svc: &Service) -> String {
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
fn etcd_key(prefix: &str, svc: &Service) -> String {
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> Service {
        Service {
            id: "host:web:80".into(),
            name: "web".into(),
            address: "10.0.0.2".into(),
            port: 8080,
            tags: vec![],
            meta: Default::default(),
            check: None,
            ttl: None,
        }
    }

    #[test]
    fn keys() {
        assert_eq!(consulkv_key("services", &svc()), "services/web/host:web:80");
        assert_eq!(consulkv_key("", &svc()), "web/host:web:80");
        assert_eq!(etcd_key("services", &svc()), "/services/web/host:web:80");
        assert_eq!(etcd_key("", &svc()), "/web/host:web:80");
        assert_eq!(ttl_check_id("a:b:80"), "service:a:b:80:ttl");
    }

    #[test]
    fn consulkv_entry_round_trip() {
        let s = svc();
        let back = consulkv_entry("web/host:web:80", s.addr().as_bytes()).unwrap();
        assert_eq!(back, s);
        assert!(consulkv_entry("noslash", b"1.2.3.4:80").is_none());
        assert!(consulkv_entry("web/x", b"garbage").is_none());
    }
}
