//! Shared state under one key prefix, and a lock every process using the prefix agrees on.
//!
//! Registrations have their own layouts ([`super::Store`]); this is for state that several
//! confds share and must not fight over (ACME: the account, certificates, challenge tokens).
//! Keys are `<prefix><name>` on both stores, the prefix taken as given (`switchboard/acme/`):
//! Consul KV keys have no leading `/`, and etcd keys are the same bytes.
//!
//! Values are opaque bytes with a version ([`Versioned`]): Consul's modify index, etcd's mod
//! revision. [`KvStore::put_if`] writes only over the version read, so two writers never lose
//! each other's update silently.
//!
//! [`KvStore::lock`] holds `<prefix><name>` as a lock:
//! - Consul: a session (TTL, behaviour `delete`, no lock delay) and `?acquire=`. Consul
//!   invalidates a session between one and two TTLs after its last renewal.
//! - etcd: a lease and a transaction that creates the key only if it is absent. etcd revokes
//!   a lease one TTL after its last keepalive.
//!
//! The holder renews in the background every third of the TTL. A dead holder's lock is freed
//! by the store when its session or lease expires (its key is deleted with it); a holder that
//! cannot renew for a whole TTL, or whose session or lease is gone, reports the lock lost
//! ([`Lock::lost`]) and must stop what it was doing under it.

use super::{ConsulClient, EtcdClient, SettingsError, StoreError, StoreSettings};
use crate::RegistryUri;
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// A value and the version it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The bytes.
    pub value: Vec<u8>,
    /// What [`KvStore::put_if`] compares: never 0 for a key that exists.
    pub version: u64,
}

/// Bytes under a prefix of Consul KV or etcd.
///
/// Every method is one request (or, for [`KvStore::lock`], a loop of them), so dropping a call
/// leaves no client state behind; a dropped write may or may not have been applied.
#[derive(Debug, Clone)]
pub struct KvStore {
    backend: Backend,
    prefix: String,
}

#[derive(Debug, Clone)]
enum Backend {
    Consul(ConsulClient),
    Etcd(EtcdClient),
}

impl KvStore {
    /// The store this URI names (any Consul scheme uses its agent's KV), reached with
    /// `settings`, keys under `prefix`.
    pub fn with_settings(
        uri: &RegistryUri,
        prefix: &str,
        settings: &StoreSettings,
    ) -> Result<KvStore, SettingsError> {
        let backend = match uri {
            RegistryUri::Consul { endpoint } | RegistryUri::ConsulKv { endpoint, .. } => {
                Backend::Consul(ConsulClient::with_settings(endpoint, settings)?)
            }
            RegistryUri::Etcd { endpoints, .. } => {
                Backend::Etcd(EtcdClient::with_settings(endpoints.clone(), settings)?)
            }
        };
        Ok(KvStore {
            backend,
            prefix: prefix.to_string(),
        })
    }

    /// The full key of `name`.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The prefix, as given.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `name`'s value and version, if it exists. Cancel-safe (a read).
    pub async fn get(&self, name: &str) -> Result<Option<Versioned>, StoreError> {
        let key = self.key(name);
        match &self.backend {
            Backend::Consul(c) => {
                Ok(c.kv_get(&key, 0, Duration::ZERO)
                    .await?
                    .0
                    .map(|e| Versioned {
                        value: e.value,
                        version: e.modify_index,
                    }))
            }
            Backend::Etcd(c) => Ok(c.get(&key).await?.map(|kv| Versioned {
                value: kv.value,
                version: kv.mod_revision as u64,
            })),
        }
    }

    /// Every value under the prefix, by name (the key after the prefix). Cancel-safe (a read).
    pub async fn list(&self) -> Result<std::collections::BTreeMap<String, Vec<u8>>, StoreError> {
        let strip = |k: &str| k.strip_prefix(self.prefix.as_str()).map(str::to_string);
        match &self.backend {
            Backend::Consul(c) => Ok(c
                .kv_list(&self.prefix, 0, Duration::ZERO)
                .await?
                .0
                .into_iter()
                .filter_map(|(k, v)| Some((strip(&k)?, v)))
                .collect()),
            Backend::Etcd(c) => Ok(c
                .range_prefix(&self.prefix)
                .await?
                .kvs
                .into_iter()
                .filter_map(|kv| Some((strip(&kv.key)?, kv.value)))
                .collect()),
        }
    }

    /// Writes `name`, whatever was there.
    pub async fn put(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let key = self.key(name);
        match &self.backend {
            Backend::Consul(c) => c.kv_put(&key, value).await,
            Backend::Etcd(c) => c.put(&key, value, None).await.map(|_| ()),
        }
    }

    /// Writes `name` only if its version is still `version` (0: only if it does not exist).
    /// Returns whether it was written.
    pub async fn put_if(&self, name: &str, value: &[u8], version: u64) -> Result<bool, StoreError> {
        let key = self.key(name);
        match &self.backend {
            Backend::Consul(c) => c.kv_cas(&key, value, version).await,
            Backend::Etcd(c) => c.put_if(&key, value, version as i64, None).await,
        }
    }

    /// Deletes `name`. Deleting what is not there is not an error.
    pub async fn delete(&self, name: &str) -> Result<(), StoreError> {
        let key = self.key(name);
        match &self.backend {
            Backend::Consul(c) => c.kv_delete(&key).await,
            Backend::Etcd(c) => c.delete(&key).await,
        }
    }

    /// Deletes `name` only if its version is still `version`. Returns whether it was deleted.
    pub async fn delete_if(&self, name: &str, version: u64) -> Result<bool, StoreError> {
        let key = self.key(name);
        match &self.backend {
            Backend::Consul(c) => c.kv_delete_cas(&key, version).await,
            Backend::Etcd(c) => c.delete_if(&key, version as i64).await,
        }
    }

    /// Takes the lock `<prefix><name>`, waiting while another holder has it. `holder` is
    /// written as the lock's value (who holds it, for operators). `ttl` is how long a dead
    /// holder keeps it (Consul: at least 10 s, and up to twice the TTL).
    ///
    /// Cancel-safe: a session or lease is made only once the lock looks free, and one left by
    /// a dropped call expires with its TTL.
    pub async fn lock(&self, name: &str, holder: &str, ttl: Duration) -> Result<Lock, StoreError> {
        let key = self.key(name);
        let held = match &self.backend {
            Backend::Consul(c) => Held::Consul(consul_acquire(c, &key, holder, ttl).await?),
            Backend::Etcd(c) => Held::Etcd(etcd_acquire(c, &key, holder, ttl).await?),
        };
        let (lost_tx, lost_rx) = watch::channel(None);
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(hold(
            self.backend.clone(),
            held,
            key.clone(),
            ttl,
            lost_tx,
            stop_rx,
        ));
        Ok(Lock {
            key,
            lost: lost_rx,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }
}

/// A session or lease backing a held lock.
enum Held {
    Consul(String),
    Etcd(i64),
}

async fn consul_acquire(
    c: &ConsulClient,
    key: &str,
    holder: &str,
    ttl: Duration,
) -> Result<String, StoreError> {
    let mut index = 0;
    loop {
        let (entry, next) = c
            .kv_get(key, index, ttl.max(Duration::from_secs(1)))
            .await?;
        // Consul's rule for blocking queries: an index going backwards starts again.
        index = if next < index { 0 } else { next };
        if entry.is_some_and(|e| e.session.is_some()) {
            continue;
        }
        let session = c.session_create(holder, ttl).await?;
        if c.kv_acquire(key, holder.as_bytes(), &session).await? {
            return Ok(session);
        }
        // Someone else was quicker: let our session go and wait again.
        let _ = c.session_destroy(&session).await;
    }
}

async fn etcd_acquire(
    c: &EtcdClient,
    key: &str,
    holder: &str,
    ttl: Duration,
) -> Result<i64, StoreError> {
    loop {
        let range = c.range_prefix(key).await?;
        if !range.kvs.iter().any(|kv| kv.key == key) {
            let lease = c.lease_grant(ttl).await?;
            if c.put_if(key, holder.as_bytes(), 0, Some(lease)).await? {
                return Ok(lease);
            }
            let _ = c.lease_revoke(lease).await;
            continue;
        }
        // Held: wait for any change under the key (its deletion frees it), at most one TTL,
        // then look again.
        let mut watch = c.watch_prefix(key, range.revision + 1).await?;
        let _ = tokio::time::timeout(ttl, async {
            loop {
                match watch.next().await {
                    Ok(Some(batch)) if batch.events.is_empty() => continue,
                    _ => return,
                }
            }
        })
        .await;
    }
}

/// Renews the lock every third of its TTL until told to stop (then releases it, or leaves it
/// to expire) or until it is lost (then says why on `lost`).
async fn hold(
    backend: Backend,
    held: Held,
    key: String,
    ttl: Duration,
    lost: watch::Sender<Option<String>>,
    mut stop: oneshot::Receiver<bool>,
) {
    let every = ttl / 3;
    let mut renewed = Instant::now();
    loop {
        tokio::select! {
            release = &mut stop => {
                if release.unwrap_or(true) {
                    let r = match (&backend, &held) {
                        (Backend::Consul(c), Held::Consul(s)) => c.session_destroy(s).await,
                        (Backend::Etcd(c), Held::Etcd(l)) => c.lease_revoke(*l).await,
                        _ => unreachable!("a lock is held on the store that granted it"),
                    };
                    if let Err(e) = r {
                        tracing::warn!(lock = %key, error = %e, "could not release the lock; it expires with its TTL");
                    }
                }
                return;
            }
            _ = tokio::time::sleep(every) => {}
        }
        let r = match (&backend, &held) {
            (Backend::Consul(c), Held::Consul(s)) => c.session_renew(s).await,
            (Backend::Etcd(c), Held::Etcd(l)) => c.lease_keepalive(*l).await,
            _ => unreachable!("a lock is held on the store that granted it"),
        };
        let why = match r {
            Ok(()) => {
                renewed = Instant::now();
                continue;
            }
            Err(e @ StoreError::Expired { .. }) => e.to_string(),
            Err(e) if renewed.elapsed() >= ttl => format!("not renewed for a whole TTL: {e}"),
            Err(_) => continue,
        };
        tracing::warn!(lock = %key, reason = %why, "lock lost");
        let _ = lost.send(Some(why));
        return;
    }
}

/// A held lock. Dropping it releases it in the background; [`Lock::release`] waits for that.
#[derive(Debug)]
pub struct Lock {
    key: String,
    lost: watch::Receiver<Option<String>>,
    stop: Option<oneshot::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Lock {
    /// The lock's full key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Why the lock was lost, if it was.
    pub fn lost_reason(&self) -> Option<String> {
        self.lost.borrow().clone()
    }

    /// Resolves once the lock is lost, with the reason. Cancel-safe (a watch).
    pub async fn lost(&mut self) -> String {
        loop {
            if let Some(why) = self.lost.borrow_and_update().clone() {
                return why;
            }
            if self.lost.changed().await.is_err() {
                // The renewal task ended without reporting a loss: released.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Releases the lock and waits until the store has been told.
    pub async fn release(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Stops renewing without releasing, as a crashed holder would: the store frees the lock
    /// when its TTL runs out. For tests of that path.
    pub fn abandon(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(false);
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
    }
}
