//! Consul source: agent services (catalog + health) or Consul KV entries, plus KV prefixes.
//!
//! Agent services are followed with blocking queries: one on `/v1/catalog/services` and one
//! per service on `/v1/health/service/<name>` (`?passing` unless `include_unhealthy`), each
//! resuming from the `X-Consul-Index` it got (reset to 0 when the index goes backwards, as
//! Consul's docs require) with a bounded `wait`. A service that leaves the catalog has its
//! poller stopped.
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
use switchboard::store::{ConsulClient, HealthEntry, StoreError};
use switchboard::{Backoff, Shutdown};
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
    /// ACL token for the raw `/v1/health/state/any` query.
    pub token: Option<String>,
}

impl Options {
    /// Options from the configuration.
    pub fn from_config(cfg: &Config, token: Option<String>) -> Options {
        Options {
            poll_wait: cfg.poll_wait,
            include_unhealthy: cfg.include_unhealthy,
            kv_prefixes: cfg.kv_prefixes.clone(),
            ignore: cfg.ignore_services.clone(),
            max_long_polls: cfg.max_long_polls,
            token,
        }
    }
}

/// What pollers report to the aggregator.
enum Msg {
    Catalog(Result<BTreeSet<String>, String>),
    Health {
        name: String,
        gen: u64,
        result: Result<Vec<Instance>, String>,
    },
    /// Shared mode: every service's instances at once.
    Bulk(Result<BTreeMap<String, Vec<Instance>>, String>),
    Kv {
        slot: usize,
        result: Result<BTreeMap<String, String>, String>,
    },
    /// `consulkv://` service entries.
    KvServices(Result<Vec<Instance>, String>),
}

/// The index to send with the next blocking query, given the previous one and the answer's.
/// Consul: if the index goes backwards, start over from 0; never block on 0 forever.
pub fn next_index(prev: u64, got: u64) -> u64 {
    if got < prev {
        0
    } else {
        got.max(1)
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
            move |idx| {
                let (c, p) = (c.clone(), p.clone());
                async move { c.kv_list(&p, idx, w).await }
            },
            move |r| Msg::Kv {
                slot,
                result: r.map(|m| {
                    m.into_iter()
                        .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                        .collect()
                }),
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
            spawn_poller(
                tx.clone(),
                publisher.clone(),
                shutdown.clone(),
                move |idx| {
                    let (c, d) = (c.clone(), d.clone());
                    async move { c.kv_list(&d, idx, w).await }
                },
                move |r| {
                    Msg::KvServices(r.map(|m| {
                        m.iter()
                            .filter_map(|(k, v)| kv_instance(&k[dir.len().min(k.len())..], v))
                            .collect()
                    }))
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
                move |idx| {
                    let c = c.clone();
                    async move { c.catalog_services(idx, w).await }
                },
                |r| Msg::Catalog(r.map(|m| m.into_keys().collect())),
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
    /// Per service: poller generation, cancel token, last answer (None: none yet / error).
    pollers: BTreeMap<String, (u64, Shutdown)>,
    health: BTreeMap<String, Option<Vec<Instance>>>,
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
                    let names: BTreeSet<String> = names
                        .into_iter()
                        .filter(|n| !self.opts.ignore.contains(n))
                        .collect();
                    self.reconcile(&names, &tx, &client, &publisher, &shutdown);
                    self.catalog = Some(names);
                }
                Msg::Catalog(Err(_)) => self.catalog_err = true,
                Msg::Health { name, gen, result } => {
                    if self.pollers.get(&name).map(|p| p.0) == Some(gen) {
                        self.health.insert(name, result.ok());
                    }
                }
                Msg::Bulk(result) => {
                    if self.shared.is_some() {
                        match result {
                            Ok(all) => {
                                self.health = all.into_iter().map(|(k, v)| (k, Some(v))).collect()
                            }
                            Err(_) => self.health.values_mut().for_each(|v| *v = None),
                        }
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
                self.health.insert(name.clone(), None);
                let (c, n, w) = (client.clone(), name.clone(), self.opts.poll_wait);
                let passing = !self.opts.include_unhealthy;
                let n2 = name.clone();
                spawn_poller(
                    tx.clone(),
                    publisher.clone(),
                    tok,
                    move |idx| {
                        let (c, n) = (c.clone(), n.clone());
                        async move { c.health_service(&n, passing, idx, w).await }
                    },
                    move |r| Msg::Health {
                        name: n2.clone(),
                        gen,
                        result: r.map(|v| v.into_iter().map(health_instance).collect()),
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
                self.health.entry(n.clone()).or_insert(None);
            }
        }
    }

    /// The snapshot, if every query has answered since its last error.
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
            insts.extend(self.health.get(name)?.clone()?);
        }
        Some(Snapshot::build(insts, kv, &self.opts.ignore))
    }
}

fn health_instance(h: HealthEntry) -> Instance {
    Instance::from_service(h.service, h.node, h.status)
}

/// `<name>/<id>` = `ip:port` (Consul KV layout) as an instance.
fn kv_instance(rel_key: &str, value: &[u8]) -> Option<Instance> {
    switchboard::store::consulkv_entry(rel_key, value)
        .map(|s| Instance::from_service(s, String::new(), "passing".into()))
}

/// Runs one blocking-query loop until `shutdown`, reporting each answer (and each error) as
/// `wrap(result)`. Errors are retried with backoff; the index handling follows Consul's docs.
fn spawn_poller<T, F, Fut, W>(
    tx: mpsc::Sender<Msg>,
    publisher: Publisher,
    shutdown: Shutdown,
    fetch: F,
    wrap: W,
) where
    T: Send + 'static,
    F: Fn(u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(T, u64), StoreError>> + Send,
    W: Fn(Result<T, String>) -> Msg + Send + 'static,
{
    tokio::spawn(async move {
        let mut index = 0u64;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut failing = false;
        loop {
            let r = {
                let _guard = publisher.long_poll();
                tokio::select! {
                    r = fetch(index) => r,
                    _ = shutdown.cancelled() => return,
                }
            };
            match r {
                Ok((v, got)) => {
                    backoff.reset();
                    let changed = got != index || failing || index == 0;
                    index = next_index(index, got);
                    failing = false;
                    if changed && tx.send(wrap(Ok(v))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "Consul query failed; retrying");
                    }
                    failing = true;
                    if tx.send(wrap(Err(e.to_string()))).await.is_err() {
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
/// service's health (non-blocking, 8 at a time) and reports all of it at once.
async fn sweeper(
    client: ConsulClient,
    opts: Options,
    mut names: watch::Receiver<BTreeSet<String>>,
    tx: mpsc::Sender<Msg>,
    publisher: Publisher,
    shutdown: Shutdown,
) {
    let http = reqwest::Client::new();
    let url = format!("{}/v1/health/state/any", client.base_url());
    let mut index = 0u64;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    names.mark_changed();
    loop {
        // 1. Read everything.
        let current: Vec<String> = names.borrow_and_update().iter().cloned().collect();
        let passing = !opts.include_unhealthy;
        let results: Vec<(String, Result<Vec<HealthEntry>, StoreError>)> = stream::iter(current)
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
            .collect()
            .await;
        let mut all = BTreeMap::new();
        let mut err = None;
        for (n, r) in results {
            match r {
                Ok(v) => {
                    all.insert(n, v.into_iter().map(health_instance).collect());
                }
                Err(e) => err = Some(e.to_string()),
            }
        }
        let failed = err.is_some();
        let msg = match err {
            Some(e) => Msg::Bulk(Err(e)),
            None => Msg::Bulk(Ok(all)),
        };
        if tx.send(msg).await.is_err() {
            return;
        }
        if failed {
            if !backoff.wait(&shutdown).await {
                return;
            }
            continue;
        }
        backoff.reset();
        // 2. Wait for any check change or a catalog change.
        let poll = {
            let mut req = http
                .get(&url)
                .query(&[
                    ("index", index.to_string()),
                    ("wait", format!("{}s", opts.poll_wait.as_secs().max(1))),
                ])
                .timeout(opts.poll_wait + Duration::from_secs(10));
            if let Some(t) = &opts.token {
                req = req.header("X-Consul-Token", t);
            }
            async move {
                let r = req.send().await?.error_for_status()?;
                let idx = r
                    .headers()
                    .get("X-Consul-Index")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                // Drain the body so the connection can be reused.
                let _ = r.bytes().await;
                Ok::<u64, reqwest::Error>(idx)
            }
        };
        let _guard = publisher.long_poll();
        tokio::select! {
            r = poll => match r {
                Ok(got) => {
                    if got == index && index != 0 {
                        continue;
                    }
                    index = next_index(index, got);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Consul health/state query failed");
                    index = 0;
                    if !backoff.wait(&shutdown).await {
                        return;
                    }
                }
            },
            _ = names.changed() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_rules() {
        let cases = [(0, 5, 5), (5, 5, 5), (5, 9, 9), (9, 3, 0), (0, 0, 1)];
        for (prev, got, want) in cases {
            assert_eq!(next_index(prev, got), want, "{prev} {got}");
        }
    }

    #[test]
    fn kv_entries() {
        let i = kv_instance("web/h:c:80", b"10.0.0.2:8080").unwrap();
        assert_eq!(
            (i.name.as_str(), i.id.as_str(), i.port),
            ("web", "h:c:80", 8080)
        );
        let i = kv_instance("web/x", b"[fd00::1]:80").unwrap();
        assert_eq!(i.address, "fd00::1");
        assert!(kv_instance("web", b"1.2.3.4:80").is_none());
        assert!(kv_instance("web/x", b"nope").is_none());
    }

    fn opts(max: usize) -> Options {
        Options {
            poll_wait: Duration::from_secs(1),
            include_unhealthy: false,
            kv_prefixes: vec![],
            ignore: vec!["consul".into()],
            max_long_polls: max,
            token: None,
        }
    }

    #[test]
    fn snapshot_requires_every_answer() {
        let mut a = Aggregator::new(&opts(64));
        assert!(a.snapshot().is_none(), "no catalog yet");
        a.catalog = Some(["web".to_string(), "db".to_string()].into());
        a.health.insert("web".into(), Some(vec![]));
        assert!(a.snapshot().is_none(), "db not answered");
        a.health.insert("db".into(), Some(vec![]));
        assert!(a.snapshot().is_some());
        a.catalog_err = true;
        assert!(a.snapshot().is_none(), "catalog failing");
        a.catalog_err = false;
        a.health.insert("db".into(), None);
        assert!(a.snapshot().is_none(), "db failing");
    }
}
