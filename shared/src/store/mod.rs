//! Stores: where services are registered and read back.
//!
//! [`ConsulClient`] and [`EtcdClient`] are thin HTTP clients of each store's API (Consul's HTTP
//! API, etcd v3's JSON gateway). [`Store`] puts the registrator's operations (register,
//! deregister, list, refresh) over them, chosen at start from a [`RegistryUri`]; confd uses the
//! clients' read and watch calls directly. [`KvStore`] keeps shared state (ACME) under a prefix
//! of either store, with a [`Lock`] every process using that prefix agrees on.

mod consul;
mod error;
mod etcd;
mod kv;
mod layout;
mod settings;

pub use consul::{BlockingIndex, ConsulClient, HealthEntry, KvEntry, QueryMeta};
use error::{guard, transport_error};
pub use error::{one_line, tls_failure, FailureLog, Scope, StoreError};
pub use etcd::{EtcdClient, KeyValue, RangeResult, WatchBatch, WatchEvent, WatchStream};
pub use kv::{KvStore, Lock, Versioned};
pub use layout::{
    consulkv_entry, docker_health_check_id, etcd_dir, etcd_entry, ttl_check_id, BadEntry,
    EntryProblem, EtcdValue,
};
use layout::{consulkv_key, etcd_key};
pub use settings::{
    etcd_user, Credentials, EtcdUser, Secret, SettingsError, StoreSettings, TlsSettings,
};

use crate::validate;
use crate::{RegistryUri, Service};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

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
    /// A store for this URI with no TLS material or credentials beyond the URI (public web
    /// roots for HTTPS). The binaries use [`Store::with_settings`].
    pub fn new(uri: &RegistryUri) -> Store {
        Store::with_settings(uri, &StoreSettings::default())
            .expect("a client without TLS files always builds")
    }

    /// A store for this URI, reached with `settings` (see [`StoreSettings::from_env`]).
    /// Fails, naming the file or setting, when TLS material cannot be read or used.
    pub fn with_settings(
        uri: &RegistryUri,
        settings: &StoreSettings,
    ) -> Result<Store, SettingsError> {
        Ok(match uri {
            RegistryUri::Consul { endpoint } => {
                Store::Consul(ConsulClient::with_settings(endpoint, settings)?)
            }
            RegistryUri::ConsulKv { endpoint, prefix } => Store::ConsulKv {
                client: ConsulClient::with_settings(endpoint, settings)?,
                prefix: prefix.clone(),
            },
            RegistryUri::Etcd { endpoints, prefix } => Store::Etcd {
                client: EtcdClient::with_settings(endpoints.clone(), settings)?,
                prefix: prefix.clone(),
                lease: Arc::new(Mutex::new(None)),
            },
        })
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
            // Not `/v1/agent/self`: it needs `agent:read`, which a registrator's token
            // (service:write, node:read) need not have. The service list needs no particular
            // right (Consul filters it) but still checks the token is known and TLS works.
            Store::Consul(c) | Store::ConsulKv { client: c, .. } => {
                c.agent_services().await.map(|_| ())
            }
            Store::Etcd { client, prefix, .. } => {
                client.range_prefix(&etcd_dir(prefix)).await.map(|_| ())
            }
        }
    }

    /// Registers `svc`, replacing any registration with the same ID. Idempotent.
    ///
    /// With `svc.ttl` set: Consul gets an extra TTL check ([`ttl_check_id`]); etcd puts the
    /// key under this store's lease, granting one if none is held.
    ///
    /// A name or ID [`validate`] refuses (except an empty one, which the store refuses itself)
    /// is [`StoreError::Invalid`] and nothing is sent: once written, such a registration
    /// could not be removed again (Consul answers 405 to deregistering `..`) or would sit
    /// outside the key prefix.
    pub async fn register(&self, svc: &Service) -> Result<(), StoreError> {
        guard(validate::service_name(&svc.name))?;
        guard(validate::service_id(&svc.id))?;
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
    /// not an error. An invalid name or ID is [`StoreError::Invalid`], as for [`Store::register`].
    pub async fn deregister(&self, svc: &Service) -> Result<(), StoreError> {
        guard(validate::service_id(&svc.id))?;
        if !matches!(self, Store::Consul(_)) {
            guard(validate::service_name(&svc.name))?;
        }
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
    ///
    /// Entries with a name or ID [`validate`] refuses are left out: this client would refuse
    /// to deregister them (and Consul could not), so a caller cleaning up must never be
    /// handed one, or it would fail on it at every pass.
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
                    .filter_map(|(k, v)| consulkv_entry(&k[dir.len()..], &v)?.ok())
                    .collect()
            }
            Store::Etcd { client, prefix, .. } => {
                let range = client.range_prefix(&etcd_dir(prefix)).await?;
                range
                    .kvs
                    .iter()
                    .filter_map(|kv| etcd_entry(&kv.value).ok())
                    .collect()
            }
        };
        Ok(all
            .into_iter()
            .filter(|s| s.id.starts_with(id_prefix))
            .filter(|s| {
                validate::service_id(&s.id).is_ok() && validate::service_name(&s.name).is_ok()
            })
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

#[cfg(test)]
mod tests {
    use super::layout::tests::svc;
    use super::*;

    #[tokio::test]
    async fn invalid_names_and_ids_are_refused_before_sending() {
        // Nothing listens on port 9: a request would be `Unreachable`, not `Invalid`.
        let uri = RegistryUri::parse("consulkv://127.0.0.1:9/svc/reg").unwrap();
        let store = Store::new(&uri);
        let table: [(&str, &str); 4] = [
            ("..", "host:web:80"),
            (".", "host:web:80"),
            ("web", ".."),
            ("web", "a/../../b"),
        ];
        for (name, id) in table {
            let s = Service {
                name: name.into(),
                id: id.into(),
                ..svc()
            };
            for r in [store.register(&s).await, store.deregister(&s).await] {
                match r {
                    Err(StoreError::Invalid(_)) => {}
                    other => panic!("{name:?} {id:?}: {other:?}"),
                }
            }
        }
        // Valid ones, and an empty name (left for the store to refuse), are sent.
        let empty = Service {
            name: String::new(),
            ..svc()
        };
        for s in [svc(), empty] {
            assert!(
                matches!(
                    store.register(&s).await,
                    Err(StoreError::Unreachable { .. })
                ),
                "{s:?}"
            );
        }
    }

    #[test]
    fn consulkv_entry_round_trip() {
        let s = svc();
        let back = consulkv_entry("web/host:web:80", s.addr().as_bytes()).unwrap();
        assert_eq!(back, Ok(s));
    }
}
