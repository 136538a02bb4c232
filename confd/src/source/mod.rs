//! Sources: keep a [`Snapshot`] of the store current and publish it.
//!
//! Each backend runs its own watchers ([`consul`] for agent services and Consul KV, [`etcd`])
//! and publishes through a [`Publisher`]: a `tokio::sync::watch` of the latest snapshot plus a
//! "store healthy" flag. The one invariant every source keeps: a snapshot is published only
//! when every watcher has answered since its last error. During an outage nothing is
//! published, so an empty or partial view never replaces a good config.
//!
//! Isolation: "every watcher has answered" is about the store, not about each item. A
//! failure about ONE item (a service the store refuses to answer for, a service the agent
//! answers for but with one bad entry) leaves that item out (or keeps its last good state),
//! is logged once through [`Publisher::refuse`] and counted, and never holds back the
//! snapshot for everyone else. Only a store-wide failure pauses publishing.
//!
//! Every instance is validated once, here, whoever wrote it: the store's decoders hand over
//! each entry on its own ([`switchboard::store::BadEntry`] for one that is not a service),
//! [`Publisher::instance`] is the one place a source turns a service into an [`Instance`]
//! ([`check_instance`]: name, ID, port, address), and [`Publisher::publish`] leaves out
//! instances whose DNS name does not resolve ([`resolve`]). Each refused instance is logged
//! once per version and counted on `confd_instances_refused{reason}` ([`Reason`]).
//!
//! A running source is a [`Source`], owned by whoever decides its lifetime (confd's `serve`),
//! not by a run of the render loop: runs read it through [`Source::handle`], so a SIGHUP
//! that does not change what the source watches ([`SourceKey`]) keeps it, long polls and
//! all. Stopping one ([`Source::stop`]) joins every task it started, so its requests and
//! connections are gone before another source starts.

pub mod consul;
pub mod etcd;
pub mod resolve;

use crate::config::Config;
use crate::metrics::Telemetry;
use crate::model::{Instance, Snapshot};
use crate::names::is_address;
use std::collections::HashMap;
use std::fmt::Display;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchboard::store::{BadEntry, EntryProblem, StoreSettings};
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
    /// Items (services, instances) left out since start, each version of each counted once.
    pub refused: Arc<AtomicUsize>,
}

/// The sending half: sources publish through it.
#[derive(Clone)]
pub struct Publisher {
    snap: Arc<watch::Sender<Option<Arc<Snapshot>>>>,
    healthy: Arc<watch::Sender<bool>>,
    long_polls: Arc<AtomicUsize>,
    refusals: Arc<Refusals>,
    resolver: Arc<resolve::Resolver>,
    /// Where the source's snapshots, store errors and refusals are counted.
    telemetry: Telemetry,
}

/// Why an instance was left out of the templates' data: the `reason` label of
/// `confd_instances_refused`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The stored entry does not decode as a service.
    Decode,
    /// A port outside 1 to 65535.
    Port,
    /// An address that is neither an IP address nor a DNS name.
    Address,
    /// A DNS name the system resolver does not resolve (see [`resolve`]).
    Unresolvable,
    /// A service name [`validate`] refuses.
    Name,
    /// A service ID [`validate`] refuses.
    Id,
}

impl Reason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Decode => "decode",
            Reason::Port => "port",
            Reason::Address => "address",
            Reason::Unresolvable => "unresolvable",
            Reason::Name => "name",
            Reason::Id => "id",
        }
    }
}

/// Which check refused an instance. Each keeps its own record: an instance the resolver
/// leaves out is valid as stored, and the store's next answer (which accepts it again at the
/// entry check) must not make the resolver's refusal look new.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Stage {
    /// Decoding and [`check_instance`], as entries are read.
    Entry,
    /// Name resolution, as snapshots are published.
    Resolution,
}

/// What has been refused and logged, so each version of an item is logged and counted once
/// however often the store repeats it (a Consul poller sees a refused service on every retry;
/// every answer about a service carries its bad instances again), while a changed item is
/// logged again.
struct Refusals {
    /// Per refused item (a hash of its kind and identity), a digest of the version refused.
    /// Bounded: when full it is emptied, so a flood of distinct bad items costs at most a
    /// repeated warning, never unbounded memory.
    seen: Mutex<HashMap<u64, u64>>,
    count: Arc<AtomicUsize>,
}

impl Refusals {
    /// Records that `version` of `item` was refused; whether that is news (the item was not
    /// refused before, or another version of it was), i.e. whether to log and count it.
    fn note(&self, item: u64, version: u64) -> bool {
        let mut seen = self.seen.lock().expect("refusals lock");
        if seen.get(&item) == Some(&version) {
            return false;
        }
        if seen.len() >= MAX_REMEMBERED_REFUSALS && !seen.contains_key(&item) {
            seen.clear();
        }
        seen.insert(item, version);
        true
    }

    /// Forgets `item`'s refusal, so a later one is news. `item` is computed only when
    /// something is remembered at all: this runs for every good instance of every answer.
    fn forget(&self, item: impl FnOnce() -> u64) {
        let mut seen = self.seen.lock().expect("refusals lock");
        if !seen.is_empty() {
            seen.remove(&item());
        }
    }
}

/// Distinct refusals remembered before the set starts over.
const MAX_REMEMBERED_REFUSALS: usize = 4096;

/// A hash of `v`, stable within the process (all the refusal records need).
fn hash_of(v: impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// The refusal record of an instance at `stage`, without allocating.
fn instance_item(stage: Stage, name: &str, id: &str) -> u64 {
    hash_of(("instance", stage, name, id))
}

/// Why the service `svc` read from a store cannot be an instance templates see, if it
/// cannot: a name or ID [`validate`] refuses, a port outside 1 to 65535, or an address that
/// is neither an IP address nor a DNS name (a proxy can use nothing else, and the shipped
/// templates' `addr` helper fails the whole render on it).
pub fn check_instance(svc: &Service) -> Result<(), (Reason, String)> {
    validate::service_name(&svc.name).map_err(|e| (Reason::Name, e.to_string()))?;
    validate::service_id(&svc.id).map_err(|e| (Reason::Id, e.to_string()))?;
    validate::port(svc.port.into()).map_err(|e| (Reason::Port, e.to_string()))?;
    if !is_address(&svc.address) {
        return Err((
            Reason::Address,
            format!(
                "invalid address {:?}; expected an IP address or a DNS name",
                excerpt(&svc.address)
            ),
        ));
    }
    Ok(())
}

impl Publisher {
    /// A publisher and the handle reading from it, counting into `telemetry`. Names in
    /// addresses are held back until [`resolve::run`] (started by [`Prepared::start`]) has
    /// looked them up.
    pub fn new(telemetry: Telemetry) -> (Publisher, SourceHandle) {
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
                    seen: Mutex::new(HashMap::new()),
                    count: refused.clone(),
                }),
                resolver: Arc::new(resolve::Resolver::default()),
                telemetry,
            },
            SourceHandle {
                snapshots: snap_rx,
                healthy: healthy_rx,
                refused,
            },
        )
    }

    /// Records that one item was left out of snapshots: `kind` says what it is (`service`),
    /// `value` which one (shortened in the log), `reason` why. The first time an item is
    /// refused it is logged (one warning) and counted; repeats are silent until
    /// [`Publisher::accepted`].
    pub fn refuse(&self, kind: &str, value: &str, reason: &dyn Display) {
        if !self.refusals.note(hash_of((kind, value)), 0) {
            return;
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
        self.refusals.forget(|| hash_of((kind, value)));
    }

    /// One instance (`id` of service `name`) left out, `version` being a digest of what was
    /// refused: logged (one warning naming the instance and why), counted on
    /// `confd_instances_refused{reason}` once per version; a repeat is silent.
    fn refuse_instance(
        &self,
        stage: Stage,
        (name, id): (&str, &str),
        version: u64,
        reason: Reason,
        why: &dyn Display,
    ) {
        if !self.refusals.note(instance_item(stage, name, id), version) {
            return;
        }
        let total = self.refusals.count.fetch_add(1, Ordering::Relaxed) + 1;
        self.telemetry.instance_refused(reason.label());
        let what = format!("{id} of service {name}");
        tracing::warn!(
            refused_total = total,
            reason = reason.label(),
            "leaving instance {:?} out of the templates' data: {why}",
            excerpt(&what)
        );
    }

    /// The instance of a registered service, unless [`check_instance`] refuses it: then
    /// `None`, refused (logged once per version) here. Every source builds its instances
    /// through this, so no template is ever handed an invalid name, ID, port or address.
    pub fn instance(&self, svc: Service, node: String, health: String) -> Option<Instance> {
        match check_instance(&svc) {
            Ok(()) => {
                self.refusals
                    .forget(|| instance_item(Stage::Entry, &svc.name, &svc.id));
                Some(Instance::from_service(svc, node, health))
            }
            Err((reason, why)) => {
                let version = hash_of(&svc);
                self.refuse_instance(Stage::Entry, (&svc.name, &svc.id), version, reason, &why);
                None
            }
        }
    }

    /// A stored entry that is not a usable service ([`BadEntry`]): refused like an invalid
    /// instance. `name` and `id` name it when the entry itself could not say (an etcd key's
    /// parts); else they are read from it, or its digest stands for the ID.
    pub fn bad_entry(&self, bad: &BadEntry, name: Option<&str>, id: Option<&str>) {
        let digest_id = format!("#{:016x}", bad.digest);
        let name = name.or(bad.name.as_deref()).unwrap_or("?");
        let id = id.or(bad.id.as_deref()).unwrap_or(&digest_id);
        let reason = match bad.problem {
            EntryProblem::Decode(_) => Reason::Decode,
            EntryProblem::Port(_) => Reason::Port,
        };
        self.refuse_instance(Stage::Entry, (name, id), bad.digest, reason, &bad.problem);
    }

    /// Publishes a complete snapshot from a healthy source; unchanged snapshots wake nobody.
    ///
    /// Instances whose address is a DNS name go through [`resolve`] first: one whose name
    /// does not resolve is left out (refused), and one not looked up yet is left out until
    /// the answer lands (the first snapshot waits for those answers, a bounded time, so a
    /// start or a SIGHUP never renders a config without them).
    pub fn publish(&self, s: Snapshot) {
        self.healthy
            .send_if_modified(|h| !std::mem::replace(h, true));
        let mut st = self.resolver.lock();
        let admitted = st.admit(Some(s), Instant::now());
        // Sent under the resolver's lock, so a re-admission from the lookup task can never
        // send an older snapshot after this one.
        self.apply(admitted);
        drop(st);
        self.resolver.wake();
    }

    /// Admits the last snapshot again with what the resolver knows now (answers landed, a
    /// hold ended).
    fn readmit(&self) {
        let mut st = self.resolver.lock();
        let admitted = st.admit(None, Instant::now());
        self.apply(admitted);
    }

    /// Logs the resolver's refusals, forgets those it lifted, and sends what it admitted.
    fn apply(&self, a: resolve::Admission) {
        for (i, why) in &a.refused {
            let version = hash_of((&i.address, i.port));
            let inst = (i.name.as_str(), i.id.as_str());
            self.refuse_instance(Stage::Resolution, inst, version, Reason::Unresolvable, why);
        }
        for i in &a.resolved {
            self.refusals
                .forget(|| instance_item(Stage::Resolution, &i.name, &i.id));
        }
        if let Some(s) = a.snapshot {
            self.send(s);
        }
    }

    /// Sends `s` to the runner, unless it equals the current snapshot.
    fn send(&self, s: Snapshot) {
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
            self.telemetry.snapshot(services, instances);
            tracing::info!(
                services,
                instances,
                long_polls = self.long_polls.load(Ordering::Relaxed),
                refused = self.refusals.count.load(Ordering::Relaxed),
                "snapshot updated"
            );
        }
    }

    /// A store request failed (each failed request, retries included): counted, and named by
    /// `/healthz` while the source is out of sync. Failures about one item are not store
    /// errors: they go through [`Publisher::refuse`].
    pub fn store_error(&self, e: &dyn Display) {
        self.telemetry.store_error(e);
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

    /// Starts watching, until [`Source::stop`] or `shutdown`, counting into `telemetry`.
    pub fn start(self, telemetry: &Telemetry, shutdown: &Shutdown) -> Source {
        let stop = shutdown.child_token();
        let (publisher, handle) = Publisher::new(telemetry.clone());
        let publisher_for_resolver = publisher.clone();
        let healthy = handle.healthy.clone();
        let (backend, token) = (self.backend, stop.clone());
        let telemetry = telemetry.clone();
        let task = tokio::spawn(async move {
            let follow = telemetry.follow_source(healthy, backend, token.clone());
            // Names in the snapshot are looked up beside the watchers, and stop with them.
            let resolver = resolve::run(publisher_for_resolver, token.clone());
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
            tokio::join!(follow, watch, resolver);
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
    /// Builds the clients for `cfg` and starts watching (see [`Prepared`]), counting into
    /// `telemetry`.
    pub fn start(
        cfg: &Config,
        telemetry: &Telemetry,
        shutdown: &Shutdown,
    ) -> anyhow::Result<Source> {
        Ok(Prepared::new(cfg)?.start(telemetry, shutdown))
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

    fn svc(name: &str, id: &str, address: &str, port: u16) -> Service {
        Service {
            id: id.into(),
            name: name.into(),
            address: address.into(),
            port,
            tags: vec![],
            meta: Default::default(),
            check: None,
            ttl: None,
            docker_health: None,
        }
    }

    #[test]
    fn instances_are_checked_once_at_the_source() {
        let huge = "a".repeat(300);
        let table: Vec<(Service, Option<Reason>)> = vec![
            (svc("web", "h:c:80", "10.0.0.1", 80), None),
            (svc("web", "h:c:80", "fd00::1", 65535), None),
            (svc("web", "h:c:80", "db.local", 1), None),
            (svc("web", "h:c:80", "no-such-host.invalid", 80), None),
            (svc("web", "h:c:80", "10.0.0.1", 0), Some(Reason::Port)),
            (svc("web", "h:c:80", "", 80), Some(Reason::Address)),
            (
                svc("web", "h:c:80", "1.2.3.4; }", 80),
                Some(Reason::Address),
            ),
            (svc("web", "h:c:80", "a b", 80), Some(Reason::Address)),
            (
                svc("web", "h:c:80", "fe80::1%eth0", 80),
                Some(Reason::Address),
            ),
            (svc("web", "h:c:80", &huge, 80), Some(Reason::Address)),
            (svc("..", "h:c:80", "10.0.0.1", 80), Some(Reason::Name)),
            (svc("web", "a/b", "10.0.0.1", 80), Some(Reason::Id)),
            (svc("..", "a/b", "bad; ", 0), Some(Reason::Name)),
        ];
        for (s, want) in table {
            let got = check_instance(&s);
            assert_eq!(got.as_ref().err().map(|e| e.0), want, "{s:?}: {got:?}");
            if let Err((_, why)) = got {
                assert!(why.len() < 400 && !why.contains('\n'), "{why}");
            }
        }
    }

    #[test]
    fn a_refused_instance_is_logged_once_per_version() {
        let (p, h) = Publisher::new(Telemetry::new());
        let count = || h.refused.load(Ordering::Relaxed);
        let steps: [(Service, bool, usize); 7] = [
            (svc("web", "a", "10.0.0.1", 0), false, 1),
            (svc("web", "a", "10.0.0.1", 0), false, 1),
            (svc("web", "a", "10.0.0.2", 0), false, 2),
            (svc("web", "b", "10.0.0.2", 0), false, 3),
            (svc("web", "a", "10.0.0.2", 80), true, 3),
            (svc("web", "a", "10.0.0.2", 0), false, 4),
            (svc("web", "b", "10.0.0.2", 0), false, 4),
        ];
        for (n, (s, ok, want)) in steps.into_iter().enumerate() {
            assert_eq!(
                p.instance(s, String::new(), "passing".into()).is_some(),
                ok,
                "step {n}"
            );
            assert_eq!(count(), want, "step {n}");
        }
        // The resolver's refusal is its own record: the entry check accepting the same
        // instance again (every store answer) does not make it news.
        let bad_name = || Arc::new(crate::model::tests::inst("web", "n", "bad.invalid", 80));
        let refused = |i: Arc<Instance>| resolve::Admission {
            refused: vec![(i, "does not resolve".into())],
            ..Default::default()
        };
        p.apply(refused(bad_name()));
        assert_eq!(count(), 5);
        assert!(p
            .instance(
                svc("web", "n", "bad.invalid", 80),
                String::new(),
                "passing".into()
            )
            .is_some());
        p.apply(refused(bad_name()));
        assert_eq!(count(), 5, "not news");
        p.apply(resolve::Admission {
            resolved: vec![bad_name()],
            ..Default::default()
        });
        p.apply(refused(bad_name()));
        assert_eq!(count(), 6, "resolved in between: news again");
    }
}
