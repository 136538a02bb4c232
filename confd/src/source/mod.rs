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
//!
//! A running source is a [`Source`], owned by whoever decides its lifetime (confd's `serve`),
//! not by a run of the render loop: runs read it through [`Source::handle`], so a SIGHUP
//! that does not change what the source watches ([`SourceKey`]) keeps it, long polls and
//! all. Stopping one ([`Source::stop`]) joins every task it started, so its requests and
//! connections are gone before another source starts.

pub mod consul;
pub mod etcd;

use crate::config::Config;
use crate::model::{Instance, Snapshot};
use std::collections::HashSet;
use std::fmt::Display;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchboard::store::StoreSettings;
use switchboard::{excerpt, validate, RegistryUri, Service, Shutdown};
use tokio::sync::watch;
use tokio::task::JoinHandle;

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

/// What a source watches and how it reaches the store: two configurations with equal keys
/// are served by one source. A SIGHUP whose new configuration has the running source's key
/// (templates, `wait`, `vars`, `exec`... changed) keeps that source and its long polls, so it
/// costs the store no connection at all: Consul 1.8 holds a blocking query's connection, and
/// its place in `http_max_conns_per_client`, until the query's `wait` ends, even after the
/// client has closed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceKey {
    backend: RegistryUri,
    /// TLS file names and credentials (`Debug` shows no secret).
    store: StoreSettings,
    /// The contents of the TLS files, hashed: files are read when a client is built, so a
    /// SIGHUP after certificates were replaced under the same names builds a new client.
    tls_files: u64,
    poll_wait: Duration,
    include_unhealthy: bool,
    kv_prefixes: Vec<String>,
    ignore: Vec<String>,
    max_long_polls: usize,
}

impl SourceKey {
    /// The key of the source `cfg` needs.
    pub fn of(cfg: &Config) -> SourceKey {
        SourceKey {
            backend: cfg.backend.clone(),
            store: cfg.store.clone(),
            tls_files: tls_fingerprint(&cfg.store.tls),
            poll_wait: cfg.poll_wait,
            include_unhealthy: cfg.include_unhealthy,
            kv_prefixes: cfg.kv_prefixes.clone(),
            ignore: cfg.ignore_services.clone(),
            max_long_polls: cfg.max_long_polls,
        }
    }
}

/// A hash of the TLS files' contents (a file that cannot be read hashes its error), in the
/// order [`switchboard::store::StoreSettings::http_client`] reads them.
fn tls_fingerprint(tls: &switchboard::store::TlsSettings) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut files: Vec<PathBuf> = [&tls.ca_file, &tls.cert_file, &tls.key_file]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    if let Some(dir) = &tls.ca_path {
        match std::fs::read_dir(dir) {
            Ok(entries) => {
                let mut in_dir: Vec<PathBuf> =
                    entries.filter_map(|e| Some(e.ok()?.path())).collect();
                in_dir.sort();
                files.extend(in_dir);
            }
            Err(e) => e.kind().hash(&mut h),
        }
    }
    for f in files {
        f.hash(&mut h);
        match std::fs::read(&f) {
            Ok(bytes) => bytes.hash(&mut h),
            Err(e) => e.kind().hash(&mut h),
        }
    }
    h.finish()
}

/// The store clients of a source, built but not started: building reads the TLS files and
/// may fail, and it opens no connection, so a new configuration is checked this far before
/// the running source is stopped for it.
pub struct Prepared {
    key: SourceKey,
    backend: String,
    clients: Clients,
}

enum Clients {
    Consul(
        consul::Mode,
        switchboard::store::ConsulClient,
        consul::Options,
    ),
    Etcd {
        client: switchboard::store::EtcdClient,
        prefix: String,
        kv_prefixes: Vec<String>,
        ignore: Vec<String>,
    },
}

impl Prepared {
    /// The clients of the source the backend URI names.
    /// Fails, naming the file, when the store's TLS material cannot be used.
    pub fn new(cfg: &Config) -> anyhow::Result<Prepared> {
        let consul = |mode, endpoint| -> anyhow::Result<Clients> {
            let client = switchboard::store::ConsulClient::with_settings(endpoint, &cfg.store)?;
            Ok(Clients::Consul(
                mode,
                client,
                consul::Options::from_config(cfg),
            ))
        };
        let clients = match &cfg.backend {
            RegistryUri::Consul { endpoint } => consul(consul::Mode::Agent, endpoint)?,
            RegistryUri::ConsulKv { endpoint, prefix } => {
                consul(consul::Mode::Kv(prefix.clone()), endpoint)?
            }
            RegistryUri::Etcd { endpoints, prefix } => Clients::Etcd {
                client: switchboard::store::EtcdClient::with_settings(
                    endpoints.clone(),
                    &cfg.store,
                )?,
                prefix: prefix.clone(),
                kv_prefixes: cfg.kv_prefixes.clone(),
                ignore: cfg.ignore_services.clone(),
            },
        };
        Ok(Prepared {
            key: SourceKey::of(cfg),
            backend: cfg.backend.primary().base_url(),
            clients,
        })
    }

    /// Starts watching, until [`Source::stop`] or `shutdown`.
    pub fn start(self, shutdown: &Shutdown) -> Source {
        let stop = shutdown.child_token();
        let (publisher, handle) = Publisher::new();
        let healthy = handle.healthy.clone();
        let (backend, token) = (self.backend, stop.clone());
        let task = tokio::spawn(async move {
            let follow = crate::metrics::follow_source(healthy, backend, token.clone());
            let watch = async move {
                match self.clients {
                    Clients::Consul(mode, client, opts) => {
                        consul::run(mode, client, opts, publisher, token).await
                    }
                    Clients::Etcd {
                        client,
                        prefix,
                        kv_prefixes,
                        ignore,
                    } => etcd::run(client, prefix, kv_prefixes, ignore, publisher, token).await,
                }
            };
            tokio::join!(follow, watch);
        });
        Source {
            key: self.key,
            handle,
            _cancel_on_drop: stop.clone().drop_guard(),
            stop,
            task,
        }
    }
}

/// A running source: owned by whoever decides its lifetime (confd's `serve`, across the
/// SIGHUP restarts of the render loop), read by runs through [`Source::handle`].
pub struct Source {
    key: SourceKey,
    handle: SourceHandle,
    stop: Shutdown,
    /// Dropped without [`Source::stop`] (an early return), the source still stops.
    _cancel_on_drop: tokio_util::sync::DropGuard,
    /// Ends once every task of the source has ended (each backend joins its own).
    task: JoinHandle<()>,
}

impl Source {
    /// Builds the clients for `cfg` and starts watching (see [`Prepared`]).
    pub fn start(cfg: &Config, shutdown: &Shutdown) -> anyhow::Result<Source> {
        Ok(Prepared::new(cfg)?.start(shutdown))
    }

    /// What a run reads. A new handle is marked changed, so a run started on a source that
    /// already holds a snapshot renders it at once.
    pub fn handle(&self) -> SourceHandle {
        let mut h = self.handle.clone();
        h.snapshots.mark_changed();
        h
    }

    /// Whether this source watches what `cfg` asks for, the same way: then a run of `cfg`
    /// can use it as it is.
    pub fn serves(&self, cfg: &Config) -> bool {
        self.key == SourceKey::of(cfg)
    }

    /// Stops every task of the source and waits until they have all ended: their requests
    /// are dropped, and with the last client clone its connection pool, so the connections
    /// are closed on confd's side before this returns.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            if e.is_panic() {
                tracing::error!("the store source panicked: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    /// Which configuration changes a running source survives: everything but what it watches
    /// and how it reaches the store, TLS files' contents included.
    #[test]
    fn a_source_serves_configurations_that_watch_the_same_way() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().display();
        std::fs::write(d.path().join("a.hbs"), "a").unwrap();
        std::fs::write(d.path().join("b.hbs"), "b").unwrap();
        let ca = d.path().join("ca.pem");
        std::fs::write(&ca, "first CA").unwrap();
        let file = d.path().join("confd.yaml");
        let base = format!(
            "backend: consul-tls://127.0.0.1:8501\ntls:\n  ca_file: {dir}/ca.pem\n\
             poll_wait: 30s\ntemplates:\n  - src: {dir}/a.hbs\n    dest: {dir}/a\n"
        );
        let key = |yaml: &str| {
            std::fs::write(&file, yaml).unwrap();
            let o = Overrides {
                config: Some(file.clone()),
                ..Overrides::default()
            };
            SourceKey::of(&Config::load(&o).unwrap())
        };
        let running = key(&base);
        let same = [
            base.replace("a.hbs", "b.hbs"),
            format!("{base}wait: {{ min: 1s, max: 5s }}\nvars: {{ x: 1 }}\n"),
        ];
        for yaml in same {
            assert_eq!(key(&yaml), running, "{yaml}");
        }
        let other = [
            base.replace("poll_wait: 30s", "poll_wait: 20s"),
            base.replace("8501", "8502"),
            format!("{base}kv_prefixes: [cfg]\n"),
            format!("{base}include_unhealthy: true\n"),
            format!("{base}max_long_polls: 8\n"),
            format!("{base}ignore_services: []\n"),
            format!("{base}token: t\n"),
        ];
        for yaml in other {
            assert_ne!(key(&yaml), running, "{yaml}");
        }
        // The same file name with another certificate in it.
        std::fs::write(&ca, "second CA").unwrap();
        assert_ne!(key(&base), running);
    }
}
