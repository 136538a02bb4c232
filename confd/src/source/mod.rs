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

pub mod consul;
pub mod etcd;
pub mod resolve;

use crate::config::Config;
use crate::model::{Instance, Snapshot};
use crate::names::is_address;
use std::collections::HashMap;
use std::fmt::Display;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use switchboard::store::{BadEntry, EntryProblem};
use switchboard::{excerpt, validate, RegistryUri, Service, Shutdown};
use tokio::sync::watch;

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
    /// A publisher and the handle reading from it. Names in addresses are held back until
    /// [`resolve::run`] (started by [`spawn`]) has looked them up.
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
                    seen: Mutex::new(HashMap::new()),
                    count: refused.clone(),
                }),
                resolver: Arc::new(resolve::Resolver::default()),
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
        crate::metrics::instance_refused(reason.label());
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
    tokio::spawn(resolve::run(publisher.clone(), shutdown.clone()));
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let (p, h) = Publisher::new();
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
