//! Sources: keep a [`Snapshot`] of the store current and publish it.
//!
//! Each backend runs its own watchers ([`consul`] for agent services and Consul KV, [`etcd`])
//! and publishes through a [`Publisher`]: a `tokio::sync::watch` of the latest snapshot plus a
//! "store healthy" flag. The one invariant every source keeps: a snapshot is published only
//! when every watcher has answered since its last error. During an outage nothing is
//! published, so an empty or partial view never replaces a good config.
//!
//! Isolation (issue 10): "every watcher has answered" is about the store, not about each
//! item. A failure about ONE item (a service the store refuses to answer for, an instance or
//! key with a name or ID [`switchboard::validate`] refuses) leaves that item out (or keeps its
//! last good state), is logged once through [`Publisher::refuse`] and counted, and never holds
//! back the snapshot for everyone else. Only a store-wide failure pauses publishing.

pub mod consul;
pub mod etcd;

use crate::config::Config;
use crate::model::{Instance, Snapshot};
use std::collections::HashSet;
use std::fmt::Display;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use switchboard::{excerpt, validate, RegistryUri, Service, Shutdown};
use tokio::sync::watch;

/// What the runner reads: the latest healthy snapshot and the store's health.
#[derive(Clone)]
pub struct SourceHandle {
    /// Latest snapshot from a healthy source (`None` until the first).
    pub snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    /// Whether the source is in sync with its store (what `/healthz` reports).
    pub healthy: watch::Receiver<bool>,
    /// Items (services, instances) left out since start, each counted once.
    pub refused: Arc<AtomicUsize>,
}

/// The sending half: sources publish through it.
#[derive(Clone)]
pub struct Publisher {
    snap: Arc<watch::Sender<Option<Arc<Snapshot>>>>,
    healthy: Arc<watch::Sender<bool>>,
    long_polls: Arc<AtomicUsize>,
    refusals: Arc<Refusals>,
}

/// What has been refused and logged, so each item is logged and counted once however often
/// the store repeats it (a Consul poller sees a refused service on every retry; every answer
/// about a service carries its bad instances again).
struct Refusals {
    /// `<kind> <value excerpt>` of each refusal logged. Bounded: when full it is emptied, so a
    /// flood of distinct bad items costs at most a repeated warning, never unbounded memory.
    seen: Mutex<HashSet<String>>,
    count: Arc<AtomicUsize>,
}

/// Distinct refusals remembered before the set starts over.
const MAX_REMEMBERED_REFUSALS: usize = 4096;

impl Publisher {
    /// A publisher and the handle reading from it.
    pub fn new() -> (Publisher, SourceHandle) {
        let (snap, snap_rx) = watch::channel(None);
        let (healthy, healthy_rx) = watch::channel(false);
        let long_polls = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        (
            Publisher {
                snap: Arc::new(snap),
                healthy: Arc::new(healthy),
                long_polls,
                refusals: Arc::new(Refusals {
                    seen: Mutex::new(HashSet::new()),
                    count: refused.clone(),
                }),
            },
            SourceHandle {
                snapshots: snap_rx,
                healthy: healthy_rx,
                refused,
            },
        )
    }

    /// Records that one item was left out of snapshots: `kind` says what it is (`service`,
    /// `instance`), `value` which one (shortened in the log), `reason` why. The first time
    /// an item is refused it is logged (one warning) and counted; repeats are silent.
    pub fn refuse(&self, kind: &str, value: &str, reason: &dyn Display) {
        let key = format!("{kind} {}", excerpt(value));
        {
            let mut seen = self.refusals.seen.lock().expect("refusals lock");
            if seen.contains(&key) {
                return;
            }
            if seen.len() >= MAX_REMEMBERED_REFUSALS {
                seen.clear();
            }
            seen.insert(key);
        }
        let total = self.refusals.count.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(
            refused_total = total,
            "leaving {kind} {:?} out of the templates' data: {reason}",
            excerpt(value)
        );
    }

    /// Forgets a refusal once the item is fine again, so a later failure is logged again.
    pub fn accepted(&self, kind: &str, value: &str) {
        let key = format!("{kind} {}", excerpt(value));
        self.refusals
            .seen
            .lock()
            .expect("refusals lock")
            .remove(&key);
    }

    /// The instance of a registered service, unless its name or ID is one
    /// [`switchboard::validate`] refuses: then `None`, refused (logged once) here. Every
    /// source builds its instances through this, so no template is ever handed such a value.
    pub fn instance(&self, svc: Service, node: String, health: String) -> Option<Instance> {
        let checked =
            validate::service_name(&svc.name).and_then(|()| validate::service_id(&svc.id));
        match checked {
            Ok(()) => Some(Instance::from_service(svc, node, health)),
            Err(e) => {
                let what = format!("{} of service {}", svc.id, svc.name);
                self.refuse("instance", &what, &e);
                None
            }
        }
    }

    /// Publishes a complete snapshot from a healthy source; unchanged snapshots wake nobody.
    pub fn publish(&self, s: Snapshot) {
        self.healthy
            .send_if_modified(|h| !std::mem::replace(h, true));
        let (services, instances) = (s.services.len(), s.total_instances());
        let changed = self.snap.send_if_modified(|cur| {
            if cur.as_deref() == Some(&s) {
                false
            } else {
                *cur = Some(Arc::new(s));
                true
            }
        });
        if changed {
            crate::metrics::snapshot(services, instances);
            tracing::info!(
                services,
                instances,
                long_polls = self.long_polls.load(Ordering::Relaxed),
                refused = self.refusals.count.load(Ordering::Relaxed),
                "snapshot updated"
            );
        }
    }

    /// Marks the source unhealthy: nothing is published until it recovers.
    pub fn unhealthy(&self, why: &str) {
        // Debug only: pollers log their own errors; this also fires briefly while a new
        // service's first answer is pending, which is normal.
        if self
            .healthy
            .send_if_modified(|h| std::mem::replace(h, false))
        {
            tracing::debug!(
                reason = why,
                "source not in sync: keeping the last good snapshot"
            );
        }
    }

    /// Counts one long poll for as long as the guard lives.
    pub fn long_poll(&self) -> LongPollGuard {
        self.long_polls.fetch_add(1, Ordering::Relaxed);
        LongPollGuard(self.long_polls.clone())
    }
}

/// Decrements the open long-poll count on drop (also when the poll is cancelled).
pub struct LongPollGuard(Arc<AtomicUsize>);

impl Drop for LongPollGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Starts the source the backend URI names; it runs until `shutdown`.
/// Fails, naming the file, when the store's TLS material cannot be used.
pub fn spawn(cfg: &Config, shutdown: Shutdown) -> anyhow::Result<SourceHandle> {
    let (publisher, handle) = Publisher::new();
    match &cfg.backend {
        RegistryUri::Consul { endpoint } => {
            let client = switchboard::store::ConsulClient::with_settings(endpoint, &cfg.store)?;
            tokio::spawn(consul::run(
                consul::Mode::Agent,
                client,
                consul::Options::from_config(cfg),
                publisher,
                shutdown,
            ));
        }
        RegistryUri::ConsulKv { endpoint, prefix } => {
            let client = switchboard::store::ConsulClient::with_settings(endpoint, &cfg.store)?;
            tokio::spawn(consul::run(
                consul::Mode::Kv(prefix.clone()),
                client,
                consul::Options::from_config(cfg),
                publisher,
                shutdown,
            ));
        }
        RegistryUri::Etcd { endpoints, prefix } => {
            let client =
                switchboard::store::EtcdClient::with_settings(endpoints.clone(), &cfg.store)?;
            tokio::spawn(etcd::run(
                client,
                prefix.clone(),
                cfg.kv_prefixes.clone(),
                cfg.ignore_services.clone(),
                publisher,
                shutdown,
            ));
        }
    }
    Ok(handle)
}
