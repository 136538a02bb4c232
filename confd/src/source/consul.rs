//! Consul source: agent services (catalog + health) or Consul KV entries, plus KV prefixes.
//!
//! Agent services are followed with blocking queries: one on `/v1/catalog/services` and one
//! per service on `/v1/health/service/<name>` (`?passing` unless `include_unhealthy`), each
//! resuming from the `X-Consul-Index` it got, kept by [`BlockingIndex`] (reset to 0 when the
//! index goes backwards or after an error, as Consul's docs require: a restarted agent's index
//! is lower, and keeping the old one made every query wait its full `wait`). A service that
//! leaves the catalog has its poller stopped.
//!
//! One service never holds up the others (issue 10): a catalog name [`switchboard::validate`]
//! refuses (`.`, `..`, a megabyte name) is never queried; a service whose query the agent
//! refuses ([`StoreError::is_item_failure`]) keeps its last answer or is left out; instances
//! with an invalid name or ID are dropped. Each is logged once ([`Publisher::refuse`]). Only a
//! store-wide failure (the catalog, a KV prefix, or any query failing for want of the agent)
//! stops snapshots.
//!
//! How the number of long polls scales: `1 + S + K` for S services and K KV prefixes, as long
//! as that stays within `max_long_polls` (default 64). Beyond it the source switches to a
//! constant `2 + K`: one blocking query on the catalog and one on `/v1/health/state/any`
//! (which wakes on any check change); each wake re-reads every service's health with plain
//! (non-blocking) queries, at most 8 at a time. So open connections never exceed
//! `max(1 + S + K, 2 + K)` bounded by `max_long_polls`, trading request volume per change
//! for a bounded number of held connections. Consul KV (`consulkv://`): `1 + K`.

use super::Publisher;
use crate::config::Config;
use crate::model::{Instance, Snapshot};
use futures_util::stream::{self, StreamExt};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use switchboard::store::{BadEntry, BlockingIndex, ConsulClient, HealthEntry, StoreError};
use switchboard::{validate, Backoff, Shutdown};
use tokio::sync::{mpsc, watch};

/// What to read.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Agent services through catalog and health.
    Agent,
    /// `consulkv://`: `<prefix>/<name>/<id>` = `ip:port`.
    Kv(String),
}

/// Settings of the Consul source.
#[derive(Debug, Clone)]
pub struct Options {
    /// Longest wait of one blocking query.
    pub poll_wait: Duration,
    /// Include instances whose checks do not pass.
    pub include_unhealthy: bool,
    /// KV prefixes exposed as `kv`.
    pub kv_prefixes: Vec<String>,
    /// Services never shown.
    pub ignore: Vec<String>,
    /// Bound on open long polls (see the module docs).
    pub max_long_polls: usize,
}

impl Options {
    /// Options from the configuration.
    pub fn from_config(cfg: &Config) -> Options {
        Options {
            poll_wait: cfg.poll_wait,
            include_unhealthy: cfg.include_unhealthy,
            kv_prefixes: cfg.kv_prefixes.clone(),
            ignore: cfg.ignore_services.clone(),
            max_long_polls: cfg.max_long_polls,
        }
    }
}

/// A failed query about one service.
#[derive(Debug)]
struct Failure {
    /// The agent answered and refused this one service ([`StoreError::is_item_failure`]);
    /// otherwise the agent itself is failing.
    item: bool,
    reason: String,
}

/// One service's result in a shared-mode sweep: its instances, or why the agent refused it.
type Swept = Result<Vec<Instance>, String>;

/// What pollers report to the aggregator.
enum Msg {
    Catalog(Result<BTreeSet<String>, String>),
    Health {
        name: String,
        gen: u64,
        result: Result<Vec<Instance>, Failure>,
    },
    /// Shared mode: every service's result at once, or a store-wide failure.
    Bulk(Result<BTreeMap<String, Swept>, String>),
    Kv {
        slot: usize,
        result: Result<BTreeMap<String, String>, String>,
    },
    /// `consulkv://` service entries.
    KvServices(Result<Vec<Instance>, String>),
}

/// What the aggregator knows of one service's instances.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot {
    /// No answer yet, or the agent failed since the last one: holds back snapshots.
    Waiting,
    /// The last answer.
    Known(Vec<Instance>),
    /// The agent refuses to answer for this service and there is no earlier answer: it is
    /// left out, and snapshots go on without it.
    Refused,
}

impl Slot {
    /// The slot after the agent refused the service: the last good answer is kept.
    fn refused(self) -> Slot {
        match self {
            Slot::Known(v) => Slot::Known(v),
            Slot::Waiting | Slot::Refused => Slot::Refused,
        }
    }
}

/// Runs until `shutdown`.
pub async fn run(
    mode: Mode,
    client: ConsulClient,
    opts: Options,
    publisher: Publisher,
    shutdown: Shutdown,
) {
    let (tx, rx) = mpsc::channel::<Msg>(256);
    for (slot, prefix) in opts.kv_prefixes.iter().enumerate() {
        let (c, p, w) = (client.clone(), prefix.clone(), opts.poll_wait);
        spawn_poller(
            tx.clone(),
            publisher.clone(),
            shutdown.clone(),
            false,
            move |idx| {
                let (c, p) = (c.clone(), p.clone());
                async move { c.kv_list(&p, idx, w).await }
            },
            move |r| Msg::Kv {
                slot,
                result: r
                    .map(|m| {
                        m.into_iter()
                            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                            .collect()
                    })
                    .map_err(|e| e.to_string()),
            },
        );
    }
    let mut agg = Aggregator::new(&opts);
    match mode {
        Mode::Kv(prefix) => {
            let dir = if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            };
            let (c, w) = (client.clone(), opts.poll_wait);
            let d = dir.clone();
            let p = publisher.clone();
            spawn_poller(
                tx.clone(),
                publisher.clone(),
                shutdown.clone(),
                false,
                move |idx| {
                    let (c, d) = (c.clone(), d.clone());
                    async move { c.kv_list(&d, idx, w).await }
                },
                move |r| {
                    Msg::KvServices(
                        r.map(|m| {
                            m.iter()
                                .filter_map(|(k, v)| {
                                    kv_instance(&p, &k[dir.len().min(k.len())..], v)
                                })
                                .collect()
                        })
                        .map_err(|e| e.to_string()),
                    )
                },
            );
            agg.catalog = Some(BTreeSet::new());
            agg.kv_mode = true;
        }
        Mode::Agent => {
            let (c, w) = (client.clone(), opts.poll_wait);
            spawn_poller(
                tx.clone(),
                publisher.clone(),
                shutdown.clone(),
                false,
                move |idx| {
                    let c = c.clone();
                    async move { c.catalog_services(idx, w).await }
                },
                |r| {
                    Msg::Catalog(
                        r.map(|m| m.into_keys().collect())
                            .map_err(|e| e.to_string()),
                    )
                },
            );
        }
    }
    agg.run(rx, tx, client, publisher, shutdown).await;
}

/// Owns the current view and the per-service pollers.
struct Aggregator {
    opts: Options,
    kv_mode: bool,
    catalog: Option<BTreeSet<String>>,
    catalog_err: bool,
    /// Per service: poller generation and cancel token.
    pollers: BTreeMap<String, (u64, Shutdown)>,
    health: BTreeMap<String, Slot>,
    kv_services: Option<Vec<Instance>>,
    kv: Vec<Option<BTreeMap<String, String>>>,
    gen: u64,
    /// Shared mode: the sweeper's cancel token and the names it should read.
    shared: Option<(Shutdown, watch::Sender<BTreeSet<String>>)>,
}

impl Aggregator {
    fn new(opts: &Options) -> Aggregator {
        Aggregator {
            opts: opts.clone(),
            kv_mode: false,
            catalog: None,
            catalog_err: false,
            pollers: BTreeMap::new(),
            health: BTreeMap::new(),
            kv_services: None,
            kv: vec![None; opts.kv_prefixes.len()],
            gen: 0,
            shared: None,
        }
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Msg>,
        tx: mpsc::Sender<Msg>,
        client: ConsulClient,
        publisher: Publisher,
        shutdown: Shutdown,
    ) {
        loop {
            let msg = tokio::select! {
                m = rx.recv() => match m { Some(m) => m, None => return },
                _ = shutdown.cancelled() => return,
            };
            match msg {
                Msg::Catalog(Ok(names)) => {
                    self.catalog_err = false;
                    let names = self.followed(names, &publisher);
                    self.reconcile(&names, &tx, &client, &publisher, &shutdown);
                    self.catalog = Some(names);
                }
                Msg::Catalog(Err(_)) => self.catalog_err = true,
                Msg::Health { name, gen, result } => self.on_health(&publisher, name, gen, result),
                Msg::Bulk(result) => {
                    if self.shared.is_some() {
                        self.on_bulk(&publisher, result);
                    }
                }
                Msg::Kv { slot, result } => self.kv[slot] = result.ok(),
                Msg::KvServices(result) => self.kv_services = result.ok(),
            }
            match self.snapshot() {
                Some(s) => publisher.publish(s),
                None => publisher.unhealthy("a Consul query has not answered since its last error"),
            }
        }
    }

    /// One service's poller answered (or failed). Answers from a stopped poller are dropped.
    fn on_health(
        &mut self,
        publisher: &Publisher,
        name: String,
        gen: u64,
        result: Result<Vec<Instance>, Failure>,
    ) {
        if self.pollers.get(&name).map(|p| p.0) != Some(gen) {
            return;
        }
        let slot = self.health.remove(&name).unwrap_or(Slot::Waiting);
        let slot = match result {
            Ok(v) => answered(publisher, &name, slot, Ok(v)),
            Err(f) if f.item => answered(publisher, &name, slot, Err(f.reason)),
            Err(_) => Slot::Waiting,
        };
        self.health.insert(name, slot);
    }

    /// The sweeper read every service (or failed store-wide).
    fn on_bulk(&mut self, publisher: &Publisher, result: Result<BTreeMap<String, Swept>, String>) {
        match result {
            Ok(all) => {
                let mut next = BTreeMap::new();
                for (name, r) in all {
                    let slot = self.health.remove(&name).unwrap_or(Slot::Waiting);
                    next.insert(name.clone(), answered(publisher, &name, slot, r));
                }
                self.health = next;
            }
            Err(_) => self.health.values_mut().for_each(|v| *v = Slot::Waiting),
        }
    }

    /// The catalog's names this source follows: not ignored, and valid. An invalid name is
    /// never queried (Consul cannot route `.` or `..` even percent-encoded, and answers 400),
    /// and is refused once instead.
    fn followed(&self, names: BTreeSet<String>, publisher: &Publisher) -> BTreeSet<String> {
        names
            .into_iter()
            .filter(|n| !self.opts.ignore.contains(n))
            .filter(|n| match validate::service_name(n) {
                Ok(()) => true,
                Err(e) => {
                    publisher.refuse("service", n, &e);
                    false
                }
            })
            .collect()
    }

    /// Starts and stops pollers so exactly the catalog's services are followed, choosing
    /// per-service or shared mode by the long-poll budget.
    fn reconcile(
        &mut self,
        names: &BTreeSet<String>,
        tx: &mpsc::Sender<Msg>,
        client: &ConsulClient,
        publisher: &Publisher,
        shutdown: &Shutdown,
    ) {
        let per_service = 1 + names.len() + self.opts.kv_prefixes.len() <= self.opts.max_long_polls;
        if per_service {
            if let Some((tok, _)) = self.shared.take() {
                tracing::info!(services = names.len(), "per-service health polling");
                tok.cancel();
                self.health.clear();
            }
            self.pollers.retain(|n, (_, tok)| {
                let keep = names.contains(n);
                if !keep {
                    tok.cancel();
                }
                keep
            });
            self.health.retain(|n, _| names.contains(n));
            for name in names {
                if self.pollers.contains_key(name) {
                    continue;
                }
                self.gen += 1;
                let gen = self.gen;
                let tok = shutdown.child_token();
                self.pollers.insert(name.clone(), (gen, tok.clone()));
                self.health.insert(name.clone(), Slot::Waiting);
                let (c, n, w) = (client.clone(), name.clone(), self.opts.poll_wait);
                let passing = !self.opts.include_unhealthy;
                let n2 = name.clone();
                let p = publisher.clone();
                spawn_poller(
                    tx.clone(),
                    publisher.clone(),
                    tok,
                    true,
                    move |idx| {
                        let (c, n) = (c.clone(), n.clone());
                        async move { c.health_service(&n, passing, idx, w).await }
                    },
                    move |r| Msg::Health {
                        name: n2.clone(),
                        gen,
                        result: r
                            .map(|v| {
                                v.into_iter()
                                    .filter_map(|h| health_instance(&p, h))
                                    .collect()
                            })
                            .map_err(|e| Failure {
                                item: e.is_item_failure(),
                                reason: e.to_string(),
                            }),
                    },
                );
            }
        } else {
            if self.shared.is_none() {
                tracing::info!(
                    services = names.len(),
                    max_long_polls = self.opts.max_long_polls,
                    "too many services for one long poll each: shared health polling"
                );
                for (_, (_, tok)) in std::mem::take(&mut self.pollers) {
                    tok.cancel();
                }
                self.health.clear();
                let tok = shutdown.child_token();
                let (names_tx, names_rx) = watch::channel(names.clone());
                tokio::spawn(sweeper(
                    client.clone(),
                    self.opts.clone(),
                    names_rx,
                    tx.clone(),
                    publisher.clone(),
                    tok.clone(),
                ));
                self.shared = Some((tok, names_tx));
            }
            let (_, names_tx) = self.shared.as_ref().expect("set above");
            names_tx.send_replace(names.clone());
            self.health.retain(|n, _| names.contains(n));
            for n in names {
                self.health.entry(n.clone()).or_insert(Slot::Waiting);
            }
        }
    }

    /// The snapshot, if every query has answered since its last store-wide error. Services
    /// the agent refuses are left out (or kept at their last answer), never waited for.
    fn snapshot(&self) -> Option<Snapshot> {
        let kv: BTreeMap<String, String> = self
            .kv
            .iter()
            .cloned()
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        if self.kv_mode {
            let insts = self.kv_services.clone()?;
            return Some(Snapshot::build(insts, kv, &self.opts.ignore));
        }
        let catalog = self.catalog.as_ref()?;
        if self.catalog_err {
            return None;
        }
        let mut insts = Vec::new();
        for name in catalog {
            match self.health.get(name)? {
                Slot::Waiting => return None,
                Slot::Known(v) => insts.extend(v.iter().cloned()),
                Slot::Refused => {}
            }
        }
        Some(Snapshot::build(insts, kv, &self.opts.ignore))
    }
}

/// The slot of service `name` after an answer (`Ok`) or the agent refusing it (`Err`, logged
/// once through the publisher); `slot` is what it was.
fn answered(
    publisher: &Publisher,
    name: &str,
    slot: Slot,
    r: Result<Vec<Instance>, String>,
) -> Slot {
    match r {
        Ok(v) => {
            if slot == Slot::Refused {
                publisher.accepted("service", name);
            }
            Slot::Known(v)
        }
        Err(reason) => {
            publisher.refuse("service", name, &reason);
            slot.refused()
        }
    }
}

/// One entry of a health answer as an instance; a bad entry or an invalid instance is
/// refused (logged once per version) and left out, never failing its service's answer.
fn health_instance(publisher: &Publisher, h: Result<HealthEntry, BadEntry>) -> Option<Instance> {
    match h {
        Ok(h) => publisher.instance(h.service, h.node, h.status),
        Err(bad) => {
            publisher.bad_entry(&bad, None, None);
            None
        }
    }
}

/// `<name>/<id>` = `ip:port` (Consul KV layout) as an instance; other keys are skipped, a
/// bad value or an invalid instance refused.
fn kv_instance(publisher: &Publisher, rel_key: &str, value: &[u8]) -> Option<Instance> {
    match switchboard::store::consulkv_entry(rel_key, value)? {
        Ok(svc) => publisher.instance(svc, String::new(), "passing".into()),
        Err(bad) => {
            publisher.bad_entry(&bad, None, None);
            None
        }
    }
}

/// Runs one blocking-query loop until `shutdown`, reporting each answer (and each error) as
/// `wrap(result)`. Errors are retried with backoff and restart from index 0
/// ([`BlockingIndex`]). The first error of a run of errors is logged, except, with
/// `item_scoped`, item failures: the aggregator logs those once, naming the service.
fn spawn_poller<T, F, Fut, W>(
    tx: mpsc::Sender<Msg>,
    publisher: Publisher,
    shutdown: Shutdown,
    item_scoped: bool,
    fetch: F,
    wrap: W,
) where
    T: Send + 'static,
    F: Fn(u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(T, u64), StoreError>> + Send,
    W: Fn(Result<T, StoreError>) -> Msg + Send + 'static,
{
    tokio::spawn(async move {
        let mut index = BlockingIndex::new();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut failing = false;
        loop {
            let r = {
                let _guard = publisher.long_poll();
                tokio::select! {
                    r = fetch(index.get()) => r,
                    _ = shutdown.cancelled() => return,
                }
            };
            match r {
                Ok((v, got)) => {
                    backoff.reset();
                    let news = index.answered(got) || failing;
                    failing = false;
                    if news && tx.send(wrap(Ok(v))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    // The agent may have restarted with a lower index: keeping ours would make
                    // the next query wait its full `wait` for changes it will never see.
                    index.failed();
                    let logged_by_aggregator = item_scoped && e.is_item_failure();
                    if !failing && !logged_by_aggregator {
                        tracing::warn!(error = %e, "Consul query failed; retrying");
                    }
                    if !e.is_item_failure() {
                        crate::metrics::store_error(&e);
                    }
                    failing = true;
                    if tx.send(wrap(Err(e))).await.is_err() {
                        return;
                    }
                    if !backoff.wait(&shutdown).await {
                        return;
                    }
                }
            }
        }
    });
}

/// Shared mode: waits on `/v1/health/state/any` and on catalog changes, then re-reads every
/// service's health (non-blocking, 8 at a time) and reports all of it at once. A service the
/// agent refuses is reported as refused; only a store-wide failure fails the whole sweep.
async fn sweeper(
    client: ConsulClient,
    opts: Options,
    mut names: watch::Receiver<BTreeSet<String>>,
    tx: mpsc::Sender<Msg>,
    publisher: Publisher,
    shutdown: Shutdown,
) {
    let mut index = BlockingIndex::new();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut failing = false;
    'read: loop {
        // 1. With no index to wait from, take one first: any change after it is then either
        // in the read below or wakes the wait after it, so none is missed.
        if index.get() == 0 {
            let r = tokio::select! {
                r = client.health_state_index(0, opts.poll_wait) => r,
                _ = shutdown.cancelled() => return,
            };
            match r {
                Ok(got) => {
                    index.answered(got);
                }
                Err(e) => {
                    crate::metrics::store_error(&e);
                    if !failing {
                        tracing::warn!(error = %e, "Consul health/state query failed; retrying");
                    }
                    failing = true;
                    if tx.send(Msg::Bulk(Err(e.to_string()))).await.is_err()
                        || !backoff.wait(&shutdown).await
                    {
                        return;
                    }
                    continue 'read;
                }
            }
        }
        // 2. Read everything.
        let current: Vec<String> = names.borrow_and_update().iter().cloned().collect();
        let passing = !opts.include_unhealthy;
        let read = stream::iter(current)
            .map(|n| {
                let c = client.clone();
                async move {
                    let r = c
                        .health_service(&n, passing, 0, Duration::ZERO)
                        .await
                        .map(|x| x.0);
                    (n, r)
                }
            })
            .buffer_unordered(8)
            .collect::<Vec<(
                String,
                Result<Vec<Result<HealthEntry, BadEntry>>, StoreError>,
            )>>();
        let results = tokio::select! {
            r = read => r,
            _ = shutdown.cancelled() => return,
        };
        let mut all = BTreeMap::new();
        let mut down = None;
        for (n, r) in results {
            match r {
                Ok(v) => {
                    let insts = v
                        .into_iter()
                        .filter_map(|h| health_instance(&publisher, h))
                        .collect();
                    all.insert(n, Ok(insts));
                }
                Err(e) if e.is_item_failure() => {
                    all.insert(n, Err(e.to_string()));
                }
                Err(e) => down = Some(e),
            }
        }
        if let Some(e) = down {
            crate::metrics::store_error(&e);
            if !failing {
                tracing::warn!(error = %e, "Consul health query failed; retrying");
            }
            failing = true;
            index.failed();
            if tx.send(Msg::Bulk(Err(e.to_string()))).await.is_err()
                || !backoff.wait(&shutdown).await
            {
                return;
            }
            continue 'read;
        }
        failing = false;
        backoff.reset();
        if tx.send(Msg::Bulk(Ok(all))).await.is_err() {
            return;
        }
        // 3. Wait for any check change or a catalog change. A wait that ends without a change
        // just waits again: nothing needs reading.
        loop {
            let _guard = publisher.long_poll();
            tokio::select! {
                r = client.health_state_index(index.get(), opts.poll_wait) => match r {
                    Ok(got) => {
                        if index.answered(got) {
                            continue 'read;
                        }
                    }
                    Err(e) => {
                        crate::metrics::store_error(&e);
                        tracing::warn!(error = %e, "Consul health/state query failed; retrying");
                        failing = true;
                        index.failed();
                        if !backoff.wait(&shutdown).await {
                            return;
                        }
                        continue 'read;
                    }
                },
                _ = names.changed() => continue 'read,
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::inst;

    fn publisher() -> (Publisher, super::super::SourceHandle) {
        Publisher::new()
    }

    #[test]
    fn kv_entries() {
        let (p, h) = publisher();
        let i = kv_instance(&p, "web/h:c:80", b"10.0.0.2:8080").unwrap();
        assert_eq!(
            (i.name.as_str(), i.id.as_str(), i.port),
            ("web", "h:c:80", 8080)
        );
        let i = kv_instance(&p, "web/x", b"[fd00::1]:80").unwrap();
        assert_eq!(i.address, "fd00::1");
        assert!(
            kv_instance(&p, "web", b"1.2.3.4:80").is_none(),
            "not a service key"
        );
        assert_eq!(h.refused.load(std::sync::atomic::Ordering::Relaxed), 0);
        // Keys that escaped the layout (written before names were validated) are refused, and
        // so are values that are not `host:port` with a valid port.
        assert!(kv_instance(&p, "../h:c:80", b"10.0.0.2:80").is_none());
        assert!(kv_instance(&p, "web/..", b"10.0.0.2:80").is_none());
        assert!(kv_instance(&p, "web/a/b", b"10.0.0.2:80").is_none());
        assert!(kv_instance(&p, "web/x", b"nope").is_none());
        assert!(kv_instance(&p, "web/y", b"10.0.0.2:0").is_none());
        assert!(kv_instance(&p, "web/z", b"10.0.0.2:65536").is_none());
        assert_eq!(h.refused.load(std::sync::atomic::Ordering::Relaxed), 6);
    }

    fn opts(max: usize) -> Options {
        Options {
            poll_wait: Duration::from_secs(1),
            include_unhealthy: false,
            kv_prefixes: vec![],
            ignore: vec!["consul".into()],
            max_long_polls: max,
        }
    }

    /// An aggregator following `names` with per-service pollers of generation 1.
    fn following(names: &[&str]) -> Aggregator {
        let mut a = Aggregator::new(&opts(64));
        a.catalog = Some(names.iter().map(|n| n.to_string()).collect());
        for n in names {
            a.pollers.insert(n.to_string(), (1, Shutdown::new()));
            a.health.insert(n.to_string(), Slot::Waiting);
        }
        a
    }

    fn refused(item: bool) -> Result<Vec<Instance>, Failure> {
        Err(Failure {
            item,
            reason: "GET /v1/health/service/x answered 403: Permission denied".into(),
        })
    }

    fn ids(s: &Snapshot) -> Vec<String> {
        s.services
            .values()
            .flatten()
            .map(|i| i.id.clone())
            .collect()
    }

    #[test]
    fn snapshot_requires_every_answer() {
        let (p, _h) = publisher();
        let mut a = Aggregator::new(&opts(64));
        assert!(a.snapshot().is_none(), "no catalog yet");
        let mut a2 = following(&["web", "db"]);
        a2.on_health(&p, "web".into(), 1, Ok(vec![]));
        assert!(a2.snapshot().is_none(), "db not answered");
        a2.on_health(&p, "db".into(), 1, Ok(vec![]));
        assert!(a2.snapshot().is_some());
        a2.catalog_err = true;
        assert!(a2.snapshot().is_none(), "catalog failing");
        a2.catalog_err = false;
        a2.on_health(&p, "db".into(), 1, refused(false));
        assert!(a2.snapshot().is_none(), "db failing store-wide");
        a.catalog = Some(BTreeSet::new());
        assert!(a.snapshot().is_some(), "an empty catalog is a snapshot");
    }

    #[test]
    fn a_refused_service_never_holds_back_the_others() {
        let (p, h) = publisher();
        let web = || Ok(vec![inst("web", "w1", "10.0.0.1", 80)]);
        let db = || Ok(vec![inst("db", "d1", "10.0.0.2", 5432)]);
        // (what, answers in order, ids in the snapshot or None for "no snapshot")
        type Answer = (&'static str, Result<Vec<Instance>, Failure>);
        type Case = (&'static str, Vec<Answer>, Option<Vec<&'static str>>);
        let table: Vec<Case> = vec![
            (
                "both answer",
                vec![("web", web()), ("db", db())],
                Some(vec!["d1", "w1"]),
            ),
            (
                "db refused before any answer: left out",
                vec![("web", web()), ("db", refused(true))],
                Some(vec!["w1"]),
            ),
            (
                "db refused after an answer: last answer kept",
                vec![("web", web()), ("db", db()), ("db", refused(true))],
                Some(vec!["d1", "w1"]),
            ),
            (
                "db refused, then answers again",
                vec![("web", web()), ("db", refused(true)), ("db", db())],
                Some(vec!["d1", "w1"]),
            ),
            (
                "db failing store-wide pauses everything",
                vec![("web", web()), ("db", db()), ("db", refused(false))],
                None,
            ),
            (
                "stale generation ignored",
                vec![("web", web()), ("db", refused(true)), ("gone", web())],
                Some(vec!["w1"]),
            ),
        ];
        for (what, answers, want) in table {
            let mut a = following(&["web", "db"]);
            for (name, r) in answers {
                a.on_health(&p, name.into(), 1, r);
            }
            let got = a.snapshot().map(|s| ids(&s));
            let want = want.map(|v| v.into_iter().map(String::from).collect::<Vec<_>>());
            assert_eq!(got, want, "{what}");
        }
        assert_eq!(
            h.refused.load(std::sync::atomic::Ordering::Relaxed),
            2,
            "counted once per run of refusals: once before db answered again, once after"
        );
    }

    #[test]
    fn shared_mode_isolates_refused_services_too() {
        let (p, _h) = publisher();
        let mut a = following(&["web", "db"]);
        let all = |db: Swept| {
            Ok([
                (
                    "web".to_string(),
                    Ok(vec![inst("web", "w1", "10.0.0.1", 80)]),
                ),
                ("db".to_string(), db),
            ]
            .into())
        };
        a.on_bulk(&p, all(Err("answered 403".into())));
        assert_eq!(a.snapshot().map(|s| ids(&s)), Some(vec!["w1".to_string()]));
        a.on_bulk(&p, all(Ok(vec![inst("db", "d1", "10.0.0.2", 1)])));
        a.on_bulk(&p, all(Err("answered 403".into())));
        assert_eq!(
            a.snapshot().map(|s| ids(&s)),
            Some(vec!["d1".to_string(), "w1".to_string()]),
            "last answer kept"
        );
        a.on_bulk(&p, Err("unreachable".into()));
        assert!(a.snapshot().is_none(), "store-wide failure pauses");
    }

    #[test]
    fn invalid_catalog_names_are_never_followed() {
        let (p, h) = publisher();
        let a = Aggregator::new(&opts(64));
        let huge = "n".repeat(1_200_000);
        let names: BTreeSet<String> = ["web", ".", "..", "consul", "a/b", &huge]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let followed = a.followed(names.clone(), &p);
        assert_eq!(followed, ["web".to_string()].into());
        assert_eq!(h.refused.load(std::sync::atomic::Ordering::Relaxed), 4);
        a.followed(names, &p);
        assert_eq!(
            h.refused.load(std::sync::atomic::Ordering::Relaxed),
            4,
            "each logged and counted once"
        );
    }

    #[test]
    fn instances_with_invalid_ids_are_dropped() {
        let (p, _h) = publisher();
        let entry = |id: &str| HealthEntry {
            service: switchboard::Service {
                id: id.into(),
                name: "web".into(),
                address: "10.0.0.1".into(),
                port: 80,
                tags: vec![],
                meta: Default::default(),
                check: None,
                ttl: None,
                docker_health: None,
            },
            node: "n1".into(),
            status: "passing".into(),
        };
        assert!(health_instance(&p, Ok(entry("h:c:80"))).is_some());
        assert!(health_instance(&p, Ok(entry(".."))).is_none());
        assert!(health_instance(&p, Ok(entry("a\nb"))).is_none());
    }
}
