//! Consul source: agent services (catalog + health) or Consul KV entries, plus KV prefixes.
//!
//! Agent services are followed with blocking queries: one on `/v1/catalog/services` and one
//! per service on `/v1/health/service/<name>` (`?passing` unless `include_unhealthy`), each
//! resuming from the `X-Consul-Index` it got, kept by [`BlockingIndex`] (reset to 0 when the
//! index goes backwards or after an error, as Consul's docs require: a restarted agent's index
//! is lower, and keeping the old one made every query wait its full `wait`). A service that
//! leaves the catalog has its poller stopped.
//!
//! One service never holds up the others: a catalog name [`switchboard::validate`]
//! refuses (`.`, `..`, a megabyte name) is never queried; a service whose query the agent
//! refuses ([`StoreError::is_item_failure`]) keeps its last answer or is left out; instances
//! with an invalid name or ID are dropped. Each is logged once ([`Publisher::refuse`]). Only a
//! store-wide failure (the catalog, a KV prefix, or any query failing for want of the agent)
//! stops snapshots.
//!
//! What the ACL token may read can change without any write in Consul (a policy narrowed or
//! restored), and then no blocking query wakes: Consul answers a blocking query with what the
//! token could read when the query was asked. So the catalog is listed again on a timer: its
//! blocking queries wait at most a third of `poll_wait` and every answer is looked at, also
//! one whose index did not move, so a restored policy shows within `poll_wait`. And answers
//! that lose entries are judged by their index (`hidden`, `unlisted`): Consul's index
//! moves with every write to what a query reads, so fewer entries at the SAME index can only
//! be fewer entries the token may see. Those are kept at their last answer, with one warning.
//! Consul 1.8 says nothing else about filtering: it answers 200 with the entries left out
//! (the catalog without the name, a service's health as `[]`), never 403, and sends no
//! `X-Consul-Results-Filtered-By-ACLs`; later versions send that header, without saying which
//! entries it hid, so it is only logged.
//!
//! How the number of long polls scales: `1 + S + K` for S services and K KV prefixes, as long
//! as that stays within `max_long_polls` (default 64). Beyond it the source switches to a
//! constant `2 + K`: one blocking query on the catalog and one on `/v1/health/state/any`
//! (which wakes on any check change); each wake re-reads every service's health with plain
//! (non-blocking) queries, at most 8 at a time. So open connections never exceed
//! `max(1 + S + K, 2 + K)` bounded by `max_long_polls`, trading request volume per change
//! for a bounded number of held connections. Consul KV (`consulkv://`): `1 + K`.
//!
//! Every task of a source (pollers, the sweeper, one-off reads) is spawned into one
//! [`JoinSet`] owned by [`run`], which joins them all before it returns: once a source has
//! stopped, none of its requests, and none of its connections, is left.

use super::Publisher;
use crate::config::Config;
use crate::model::{Instance, Snapshot};
use futures_util::stream::{self, StreamExt};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use switchboard::store::{
    BadEntry, BlockingIndex, ConsulClient, FailureLog, HealthEntry, QueryMeta, StoreError,
};
use switchboard::{validate, Backoff, Shutdown};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

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

/// The wait of the catalog's blocking queries: a third of `poll_wait`. An answer reflects what
/// the token could read when its query was asked, so a policy restored just after a query
/// started shows in the answer to the next one: within two waits (plus Consul's jitter of at
/// most a sixteenth each), which stays within `poll_wait`.
fn listing_wait(poll_wait: Duration) -> Duration {
    poll_wait / 3
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
type Swept = Result<(Vec<Instance>, QueryMeta), String>;

/// What pollers report to the aggregator.
enum Msg {
    Catalog {
        result: Result<BTreeSet<String>, String>,
        meta: QueryMeta,
    },
    Health {
        name: String,
        gen: u64,
        meta: QueryMeta,
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
    /// No answer yet: holds back snapshots.
    Waiting,
    /// The last answer, and the index Consul gave it.
    Known {
        instances: Vec<Instance>,
        index: u64,
    },
    /// The agent refuses to answer for this service and there is no earlier answer: it is
    /// left out, and snapshots go on without it.
    Refused,
}

impl Slot {
    /// The slot after the agent refused the service: the last good answer is kept.
    fn refused(self) -> Slot {
        match self {
            Slot::Known { instances, index } => Slot::Known { instances, index },
            Slot::Waiting | Slot::Refused => Slot::Refused,
        }
    }

    /// The instances of the last answer, if there is one with any.
    fn instances(&self) -> Option<&[Instance]> {
        match self {
            Slot::Known { instances, .. } if !instances.is_empty() => Some(instances),
            _ => None,
        }
    }
}

/// Why a service the catalog no longer lists is still followed, at its last answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Withheld {
    /// The catalog's index moved, so the service may have been removed: its own health is
    /// being asked (an answer at a new index without instances means it is gone; one at the
    /// index of its last answer means it is hidden).
    Asking,
    /// Hidden from confd's token: nothing about it changed in Consul (warned once).
    Hidden,
}

/// Whether an answer about a service lost instances although Consul wrote nothing about it:
/// it comes at the index of the last answer (`last`), which had instances this one lacks.
/// Consul's index moves with every write to what a query reads, so that can only be instances
/// the token may no longer read (an ACL policy narrowed since).
fn hidden(last: &Slot, new: &[Instance], index: u64) -> bool {
    match last {
        Slot::Known {
            instances,
            index: was,
        } => {
            if index == 0 || *was != index {
                return false;
            }
            let seen: std::collections::HashSet<(&str, &str)> = new
                .iter()
                .map(|i| (i.node.as_str(), i.id.as_str()))
                .collect();
            instances
                .iter()
                .any(|i| !seen.contains(&(i.node.as_str(), i.id.as_str())))
        }
        Slot::Waiting | Slot::Refused => false,
    }
}

/// What becomes of a service that the catalog's latest answer no longer lists, from its last
/// answer and whether the catalog's index moved since the answer that listed it. Without
/// instances to keep it simply leaves. At the same index nothing was written: it is hidden
/// from the token. Otherwise it may have been removed, or hidden while something else
/// changed: its own health is asked before anything is decided, and meanwhile its last
/// answer stays.
fn unlisted(slot: &Slot, catalog_moved: bool) -> Option<Withheld> {
    slot.instances()?;
    Some(if catalog_moved {
        Withheld::Asking
    } else {
        Withheld::Hidden
    })
}

/// Runs until `shutdown`; every task it started has ended when it returns.
pub async fn run(
    mode: Mode,
    client: ConsulClient,
    opts: Options,
    publisher: Publisher,
    shutdown: Shutdown,
) {
    let (tx, rx) = mpsc::channel::<Msg>(256);
    let mut tasks = JoinSet::new();
    for (slot, prefix) in opts.kv_prefixes.iter().enumerate() {
        let (c, p, w) = (client.clone(), prefix.clone(), opts.poll_wait);
        spawn_poller(
            &mut tasks,
            tx.clone(),
            publisher.clone(),
            shutdown.clone(),
            Poll::Changes,
            move |idx| {
                let (c, p) = (c.clone(), p.clone());
                async move { c.kv_list(&p, idx, w).await.map(indexed) }
            },
            move |r, _| Msg::Kv {
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
                &mut tasks,
                tx.clone(),
                publisher.clone(),
                shutdown.clone(),
                Poll::Changes,
                move |idx| {
                    let (c, d) = (c.clone(), d.clone());
                    async move { c.kv_list(&d, idx, w).await.map(indexed) }
                },
                move |r, _| {
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
            let (c, w) = (client.clone(), listing_wait(opts.poll_wait));
            spawn_poller(
                &mut tasks,
                tx.clone(),
                publisher.clone(),
                shutdown.clone(),
                Poll::Listing,
                move |idx| {
                    let c = c.clone();
                    async move { c.catalog_services(idx, w).await }
                },
                |r, meta| Msg::Catalog {
                    result: r
                        .map(|m| m.into_keys().collect())
                        .map_err(|e| e.to_string()),
                    meta,
                },
            );
        }
    }
    agg.tasks = tasks;
    let ctx = Effects {
        tx,
        client,
        publisher,
        shutdown,
    };
    agg.run(rx, &ctx).await;
}

/// A KV listing's index as the [`QueryMeta`] pollers take.
fn indexed<T>((value, index): (T, u64)) -> (T, QueryMeta) {
    (
        value,
        QueryMeta {
            index,
            ..QueryMeta::default()
        },
    )
}

/// What the aggregator needs to start tasks.
struct Effects {
    tx: mpsc::Sender<Msg>,
    client: ConsulClient,
    publisher: Publisher,
    shutdown: Shutdown,
}

/// Owns the current view and the per-service pollers.
struct Aggregator {
    opts: Options,
    kv_mode: bool,
    /// The services the catalog's last answer listed (and this source follows), and its index.
    catalog: Option<BTreeSet<String>>,
    catalog_index: u64,
    catalog_err: bool,
    /// Services the catalog no longer lists that are still followed at their last answer.
    withheld: BTreeMap<String, Withheld>,
    /// Services to ask about once ([`Withheld::Asking`]), taken by the run loop.
    asking: Vec<String>,
    /// The set of followed services changed: pollers are to be reconciled.
    refollow: bool,
    /// Whether Consul's `X-Consul-Results-Filtered-By-ACLs` was logged (once).
    filtering_noted: bool,
    /// Per service: poller generation and cancel token.
    pollers: BTreeMap<String, (u64, Shutdown)>,
    health: BTreeMap<String, Slot>,
    /// Services whose query failed store-wide since their last answer: they hold back
    /// snapshots, and keep their last answer for when they answer again.
    stale: BTreeSet<String>,
    kv_services: Option<Vec<Instance>>,
    kv: Vec<Option<BTreeMap<String, String>>>,
    gen: u64,
    /// Shared mode: the sweeper's cancel token and the names it should read.
    shared: Option<(Shutdown, watch::Sender<BTreeSet<String>>)>,
    /// Every task of this source, joined when it stops.
    tasks: JoinSet<()>,
}

impl Aggregator {
    fn new(opts: &Options) -> Aggregator {
        Aggregator {
            opts: opts.clone(),
            kv_mode: false,
            catalog: None,
            catalog_index: 0,
            catalog_err: false,
            withheld: BTreeMap::new(),
            asking: Vec::new(),
            refollow: false,
            filtering_noted: false,
            pollers: BTreeMap::new(),
            health: BTreeMap::new(),
            stale: BTreeSet::new(),
            kv_services: None,
            kv: vec![None; opts.kv_prefixes.len()],
            gen: 0,
            shared: None,
            tasks: JoinSet::new(),
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, ctx: &Effects) {
        loop {
            let msg = tokio::select! {
                m = rx.recv() => match m { Some(m) => m, None => break },
                Some(done) = self.tasks.join_next() => {
                    if let Err(e) = done {
                        if e.is_panic() {
                            tracing::error!("a Consul poller panicked: {e}");
                        }
                    }
                    continue;
                }
                _ = ctx.shutdown.cancelled() => break,
            };
            let publisher = &ctx.publisher;
            match msg {
                Msg::Catalog {
                    result: Ok(names),
                    meta,
                } => self.on_catalog(publisher, names, meta),
                Msg::Catalog { result: Err(_), .. } => self.catalog_err = true,
                Msg::Health {
                    name,
                    gen,
                    meta,
                    result,
                } => self.on_health(publisher, name, gen, meta, result),
                Msg::Bulk(result) => {
                    if self.shared.is_some() {
                        self.on_bulk(publisher, result);
                    }
                }
                Msg::Kv { slot, result } => self.kv[slot] = result.ok(),
                Msg::KvServices(result) => self.kv_services = result.ok(),
            }
            if std::mem::take(&mut self.refollow) {
                self.reconcile(ctx);
            }
            for name in std::mem::take(&mut self.asking) {
                self.ask(&name, ctx);
            }
            match self.snapshot() {
                Some(s) => publisher.publish(s),
                None => publisher.unhealthy("a Consul query has not answered since its last error"),
            }
        }
        // Stop and wait for every poller: their requests, and their client's connections,
        // must be gone once the source has stopped (a new one may be started next).
        drop(rx);
        self.tasks.shutdown().await;
    }

    /// Every service followed: the catalog's, and those kept while it does not list them.
    fn followed(&self) -> BTreeSet<String> {
        let listed = self.catalog.iter().flatten();
        listed.chain(self.withheld.keys()).cloned().collect()
    }

    /// The catalog answered. Services it no longer lists leave, or are kept ([`unlisted`]);
    /// services it lists again stop being withheld.
    fn on_catalog(&mut self, publisher: &Publisher, names: BTreeSet<String>, meta: QueryMeta) {
        // After a failure (the agent may have restarted, empty, and reached the same index by
        // chance) an unmoved index proves nothing: the services are asked about.
        let failed = std::mem::replace(&mut self.catalog_err, false);
        let names = self.valid(names, publisher);
        if meta.filtered_by_acls && !std::mem::replace(&mut self.filtering_noted, true) {
            tracing::warn!(
                "Consul says its ACLs filtered the catalog for confd's token: services the \
                 token may not read are not shown"
            );
        }
        let moved = failed || meta.index != self.catalog_index;
        let before = self.catalog.take().unwrap_or_default();
        for name in before.difference(&names) {
            let Some(slot) = self.health.get(name) else {
                continue;
            };
            match unlisted(slot, moved) {
                Some(Withheld::Hidden) => {
                    warn_hidden(name, slot, meta.index, "the catalog no longer lists it");
                    self.withheld.insert(name.clone(), Withheld::Hidden);
                }
                Some(Withheld::Asking) => {
                    tracing::debug!(service = %name, "left the catalog; asking its health");
                    self.withheld.insert(name.clone(), Withheld::Asking);
                    self.asking.push(name.clone());
                }
                None => {}
            }
        }
        let back: Vec<String> = self
            .withheld
            .keys()
            .filter(|n| names.contains(*n))
            .cloned()
            .collect();
        for name in back {
            if self.withheld.remove(&name) == Some(Withheld::Hidden) {
                tracing::info!(service = %name, "Consul's catalog lists service {name:?} again");
            }
        }
        self.catalog = Some(names);
        self.catalog_index = meta.index;
        self.refollow = true;
    }

    /// One service's poller (or a one-off read) answered or failed. Answers from a stopped
    /// poller are dropped.
    fn on_health(
        &mut self,
        publisher: &Publisher,
        name: String,
        gen: u64,
        meta: QueryMeta,
        result: Result<Vec<Instance>, Failure>,
    ) {
        if self.pollers.get(&name).map(|p| p.0) != Some(gen) {
            return;
        }
        match result {
            Ok(v) => self.on_answer(publisher, name, Ok((v, meta))),
            Err(f) if f.item => self.on_answer(publisher, name, Err(f.reason)),
            Err(_) => {
                self.stale.insert(name);
            }
        }
    }

    /// The sweeper read every service (or failed store-wide).
    fn on_bulk(&mut self, publisher: &Publisher, result: Result<BTreeMap<String, Swept>, String>) {
        match result {
            Ok(all) => {
                let followed = self.followed();
                for (name, r) in all {
                    if followed.contains(&name) {
                        self.on_answer(publisher, name, r);
                    }
                }
            }
            Err(_) => self.stale.extend(self.health.keys().cloned()),
        }
    }

    /// An answer about one followed service, or the agent refusing it (`Err`).
    fn on_answer(&mut self, publisher: &Publisher, name: String, r: Swept) {
        self.stale.remove(&name);
        let slot = self.health.remove(&name).unwrap_or(Slot::Waiting);
        let slot = match r {
            Ok((v, meta)) if hidden(&slot, &v, meta.index) => {
                let why = "its answer lacks instances it had";
                match self.withheld.get_mut(&name) {
                    Some(w @ Withheld::Asking) => {
                        *w = Withheld::Hidden;
                        warn_hidden(&name, &slot, meta.index, "the catalog no longer lists it");
                    }
                    Some(Withheld::Hidden) => {}
                    None => warn_hidden(&name, &slot, meta.index, why),
                }
                slot
            }
            Ok((v, _)) if v.is_empty() && self.withheld.contains_key(&name) => {
                // Not listed, and at a new index without instances: removed, or changed while
                // hidden; either way there is nothing confd may see to keep.
                if self.withheld.remove(&name) == Some(Withheld::Hidden) {
                    tracing::info!(
                        service = %name,
                        "service {name:?} changed in Consul while confd's token may not read it: leaving it out"
                    );
                }
                self.refollow = true;
                return;
            }
            Ok((v, meta)) => answered(publisher, &name, slot, Ok((v, meta.index))),
            Err(reason) => answered(publisher, &name, slot, Err(reason)),
        };
        self.health.insert(name, slot);
    }

    /// The catalog's names this source follows: not ignored, and valid. An invalid name is
    /// never queried (Consul cannot route `.` or `..` even percent-encoded, and answers 400),
    /// and is refused once instead.
    fn valid(&self, names: BTreeSet<String>, publisher: &Publisher) -> BTreeSet<String> {
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

    /// Starts and stops pollers so exactly the followed services are, choosing per-service or
    /// shared mode by the long-poll budget.
    fn reconcile(&mut self, ctx: &Effects) {
        let names = self.followed();
        self.health.retain(|n, _| names.contains(n));
        self.stale.retain(|n| names.contains(n));
        let per_service = 1 + names.len() + self.opts.kv_prefixes.len() <= self.opts.max_long_polls;
        if per_service {
            if let Some((tok, _)) = self.shared.take() {
                tracing::info!(services = names.len(), "per-service health polling");
                tok.cancel();
            }
            self.pollers.retain(|n, (_, tok)| {
                let keep = names.contains(n);
                if !keep {
                    tok.cancel();
                }
                keep
            });
            for name in &names {
                if self.pollers.contains_key(name) {
                    continue;
                }
                self.gen += 1;
                let gen = self.gen;
                let tok = ctx.shutdown.child_token();
                self.pollers.insert(name.clone(), (gen, tok.clone()));
                // A service followed in shared mode until now keeps its last answer until its
                // poller's first one, so it is still judged against it ([`hidden`]).
                self.health.entry(name.clone()).or_insert(Slot::Waiting);
                let (c, n, w) = (ctx.client.clone(), name.clone(), self.opts.poll_wait);
                let passing = !self.opts.include_unhealthy;
                let n2 = name.clone();
                let p = ctx.publisher.clone();
                spawn_poller(
                    &mut self.tasks,
                    ctx.tx.clone(),
                    ctx.publisher.clone(),
                    tok,
                    Poll::Service,
                    move |idx| {
                        let (c, n) = (c.clone(), n.clone());
                        async move { c.health_service(&n, passing, idx, w).await }
                    },
                    move |r, meta| Msg::Health {
                        name: n2.clone(),
                        gen,
                        meta,
                        result: health_instances(&p, r),
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
                let tok = ctx.shutdown.child_token();
                let (names_tx, names_rx) = watch::channel(names.clone());
                self.tasks.spawn(sweeper(
                    ctx.client.clone(),
                    self.opts.clone(),
                    names_rx,
                    ctx.tx.clone(),
                    ctx.publisher.clone(),
                    tok.clone(),
                ));
                self.shared = Some((tok, names_tx));
            }
            let (_, names_tx) = self.shared.as_ref().expect("set above");
            // Only a change of names makes the sweeper read everything again: the catalog
            // answers every third of `poll_wait` even when nothing changed.
            names_tx.send_if_modified(|cur| {
                let changed = *cur != names;
                if changed {
                    cur.clone_from(&names);
                }
                changed
            });
            for n in &names {
                self.health.entry(n.clone()).or_insert(Slot::Waiting);
            }
        }
    }

    /// Asks once, at once, for the health of a service the catalog stopped listing
    /// ([`Withheld::Asking`]); its answer comes as its poller's would. Its own long poll goes
    /// on: cancelling a blocking query frees nothing on Consul 1.8, which holds it until its
    /// `wait` ends.
    fn ask(&mut self, name: &str, ctx: &Effects) {
        if let Some((_, names_tx)) = &self.shared {
            // Shared mode: the next sweep reads every followed service, this one included.
            names_tx.send_modify(|_| {});
            return;
        }
        let Some((gen, tok)) = self.pollers.get(name).cloned() else {
            return;
        };
        let (c, n, tx, p) = (
            ctx.client.clone(),
            name.to_string(),
            ctx.tx.clone(),
            ctx.publisher.clone(),
        );
        let passing = !self.opts.include_unhealthy;
        self.tasks.spawn(async move {
            let r = tokio::select! {
                r = c.health_service(&n, passing, 0, Duration::ZERO) => r,
                _ = tok.cancelled() => return,
            };
            let (r, meta) = match r {
                Ok((v, meta)) => (Ok(v), meta),
                Err(e) if e.is_item_failure() => (Err(e), QueryMeta::default()),
                // The store itself failing is its poller's to report: this read's answer would
                // hold back snapshots until that poller answered again, which it does only
                // when something changes.
                Err(e) => {
                    tracing::debug!(service = %n, error = %e, "asking about a service failed");
                    return;
                }
            };
            let msg = Msg::Health {
                name: n,
                gen,
                meta,
                result: health_instances(&p, r),
            };
            let _ = tx.send(msg).await;
        });
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
        self.catalog.as_ref()?;
        if self.catalog_err || !self.stale.is_empty() {
            return None;
        }
        let mut insts = Vec::new();
        for name in self.followed() {
            match self.health.get(&name)? {
                Slot::Waiting => return None,
                Slot::Known { instances, .. } => insts.extend(instances.iter().cloned()),
                Slot::Refused => {}
            }
        }
        Some(Snapshot::build(insts, kv, &self.opts.ignore))
    }
}

/// The one warning about a service whose last answer is kept because Consul's latest answer
/// hides it (`why`) at the same index as the answer that showed it.
fn warn_hidden(name: &str, slot: &Slot, index: u64, why: &str) {
    tracing::warn!(
        service = %name,
        index,
        kept = slot.instances().map_or(0, <[Instance]>::len),
        "service {name:?}: {why} although nothing about it changed in Consul (same index): \
         confd's ACL token may not read it now (check the token's policy); keeping its last \
         answer"
    );
}

/// The slot of service `name` after an answer (`Ok`, with its index) or the agent refusing it
/// (`Err`, logged once through the publisher); `slot` is what it was.
fn answered(
    publisher: &Publisher,
    name: &str,
    slot: Slot,
    r: Result<(Vec<Instance>, u64), String>,
) -> Slot {
    match r {
        Ok((instances, index)) => {
            if slot == Slot::Refused {
                publisher.accepted("service", name);
            }
            Slot::Known { instances, index }
        }
        Err(reason) => {
            publisher.refuse("service", name, &reason);
            slot.refused()
        }
    }
}

/// One service's health answer as its instances, or the failure.
fn health_instances(
    publisher: &Publisher,
    r: Result<Vec<Result<HealthEntry, BadEntry>>, StoreError>,
) -> Result<Vec<Instance>, Failure> {
    r.map(|v| {
        v.into_iter()
            .filter_map(|h| health_instance(publisher, h))
            .collect()
    })
    .map_err(|e| Failure {
        item: e.is_item_failure(),
        reason: e.to_string(),
    })
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

/// Which answers a poller reports, and who logs its failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Poll {
    /// A KV prefix: answers whose index moved (and the first after a failure).
    Changes,
    /// The catalog: every answer, also one whose index did not move, since what the token
    /// may read can change without any write (see the module docs).
    Listing,
    /// One service's health: like [`Poll::Changes`]; failures about that service alone are
    /// logged by the aggregator, once, naming it.
    Service,
}

/// Runs one blocking-query loop in `tasks` until `shutdown`, reporting answers (see [`Poll`])
/// and each error as `wrap(result, meta)`. Errors are retried with backoff and restart from
/// index 0 ([`BlockingIndex`]). A failure is logged when its cause differs from the last one
/// logged ([`FailureLog`]), so the log names what is wrong now without one line per retry.
fn spawn_poller<T, F, Fut, W>(
    tasks: &mut JoinSet<()>,
    tx: mpsc::Sender<Msg>,
    publisher: Publisher,
    shutdown: Shutdown,
    poll: Poll,
    fetch: F,
    wrap: W,
) where
    T: Send + 'static,
    F: Fn(u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(T, QueryMeta), StoreError>> + Send,
    W: Fn(Result<T, StoreError>, QueryMeta) -> Msg + Send + 'static,
{
    tasks.spawn(async move {
        let mut index = BlockingIndex::new();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut failures = FailureLog::new();
        loop {
            let r = {
                let _guard = publisher.long_poll();
                tokio::select! {
                    r = fetch(index.get()) => r,
                    _ = shutdown.cancelled() => return,
                }
            };
            match r {
                Ok((v, meta)) => {
                    backoff.reset();
                    let moved = index.answered(meta.index);
                    let recovered = failures.succeeded();
                    let news = moved || recovered || poll == Poll::Listing;
                    if news && tx.send(wrap(Ok(v), meta)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    // The agent may have restarted with a lower index: keeping ours would make
                    // the next query wait its full `wait` for changes it will never see.
                    index.failed();
                    let logged_by_aggregator = poll == Poll::Service && e.is_item_failure();
                    if failures.failed(&e) && !logged_by_aggregator {
                        tracing::warn!(kind = e.kind(), error = %e, "Consul query failed; retrying");
                    }
                    if !e.is_item_failure() {
                        publisher.store_error(&e);
                    }
                    if tx.send(wrap(Err(e), QueryMeta::default())).await.is_err() {
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

/// Records a store-wide failure of the sweeper: counted, logged when its cause changed.
fn sweep_failed(publisher: &Publisher, failures: &mut FailureLog, what: &str, e: &StoreError) {
    publisher.store_error(e);
    if failures.failed(e) {
        tracing::warn!(kind = e.kind(), error = %e, "Consul {what} query failed; retrying");
    }
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
    let mut failures = FailureLog::new();
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
                    sweep_failed(&publisher, &mut failures, "health/state", &e);
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
                    let r = c.health_service(&n, passing, 0, Duration::ZERO).await;
                    (n, r)
                }
            })
            .buffer_unordered(8)
            .collect::<Vec<(
                String,
                Result<(Vec<Result<HealthEntry, BadEntry>>, QueryMeta), StoreError>,
            )>>();
        let results = tokio::select! {
            r = read => r,
            _ = shutdown.cancelled() => return,
        };
        let mut all = BTreeMap::new();
        let mut down = None;
        for (n, r) in results {
            match r {
                Ok((v, meta)) => {
                    let insts = v
                        .into_iter()
                        .filter_map(|h| health_instance(&publisher, h))
                        .collect();
                    all.insert(n, Ok((insts, meta)));
                }
                Err(e) if e.is_item_failure() => {
                    all.insert(n, Err(e.to_string()));
                }
                Err(e) => down = Some(e),
            }
        }
        if let Some(e) = down {
            sweep_failed(&publisher, &mut failures, "health", &e);
            index.failed();
            if tx.send(Msg::Bulk(Err(e.to_string()))).await.is_err()
                || !backoff.wait(&shutdown).await
            {
                return;
            }
            continue 'read;
        }
        failures.succeeded();
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
                        sweep_failed(&publisher, &mut failures, "health/state", &e);
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
        Publisher::new(crate::metrics::Telemetry::new())
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

    /// An answer's metadata at `index`.
    fn at(index: u64) -> QueryMeta {
        QueryMeta {
            index,
            filtered_by_acls: false,
        }
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
        a2.on_health(&p, "web".into(), 1, at(1), Ok(vec![]));
        assert!(a2.snapshot().is_none(), "db not answered");
        a2.on_health(&p, "db".into(), 1, at(2), Ok(vec![]));
        assert!(a2.snapshot().is_some());
        a2.catalog_err = true;
        assert!(a2.snapshot().is_none(), "catalog failing");
        a2.catalog_err = false;
        a2.on_health(&p, "db".into(), 1, at(0), refused(false));
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
            for (i, (name, r)) in answers.into_iter().enumerate() {
                a.on_health(&p, name.into(), 1, at(i as u64 + 1), r);
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
                    Ok((vec![inst("web", "w1", "10.0.0.1", 80)], at(2))),
                ),
                ("db".to_string(), db),
            ]
            .into())
        };
        a.on_bulk(&p, all(Err("answered 403".into())));
        assert_eq!(a.snapshot().map(|s| ids(&s)), Some(vec!["w1".to_string()]));
        a.on_bulk(&p, all(Ok((vec![inst("db", "d1", "10.0.0.2", 1)], at(3)))));
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
        let followed = a.valid(names.clone(), &p);
        assert_eq!(followed, ["web".to_string()].into());
        assert_eq!(h.refused.load(std::sync::atomic::Ordering::Relaxed), 4);
        a.valid(names, &p);
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

    #[test]
    fn fewer_instances_at_the_same_index_are_hidden_ones() {
        let (w1, w2) = (
            inst("web", "w1", "10.0.0.1", 80),
            inst("web", "w2", "10.0.0.2", 80),
        );
        let known = |index| Slot::Known {
            instances: vec![w1.clone(), w2.clone()],
            index,
        };
        // (what, last answer, new answer, its index, hidden)
        let table = [
            ("all gone, same index", known(7), vec![], 7, true),
            ("one gone, same index", known(7), vec![w1.clone()], 7, true),
            (
                "all there, same index",
                known(7),
                vec![w2.clone(), w1.clone()],
                7,
                false,
            ),
            ("all gone, index moved", known(7), vec![], 8, false),
            ("no index", known(0), vec![], 0, false),
            ("no earlier answer", Slot::Waiting, vec![], 7, false),
            ("refused before", Slot::Refused, vec![], 7, false),
        ];
        for (what, last, new, index, want) in table {
            assert_eq!(hidden(&last, &new, index), want, "{what}");
        }
        // A service that leaves the catalog: kept only with instances to keep, and hidden for
        // sure only when the catalog's index did not move.
        let empty = Slot::Known {
            instances: vec![],
            index: 7,
        };
        let table = [
            (known(7), false, Some(Withheld::Hidden)),
            (known(7), true, Some(Withheld::Asking)),
            (empty, false, None),
            (Slot::Waiting, false, None),
            (Slot::Refused, true, None),
        ];
        for (slot, moved, want) in table {
            assert_eq!(unlisted(&slot, moved), want, "{slot:?} moved={moved}");
        }
    }

    /// Web and db known at catalog index 10; db's last answer (d1) at index 5.
    fn web_and_db(p: &Publisher) -> Aggregator {
        let mut a = following(&["web", "db"]);
        a.catalog_index = 10;
        let web = vec![inst("web", "w1", "10.0.0.1", 80)];
        a.on_health(p, "web".into(), 1, at(4), Ok(web));
        let db = vec![inst("db", "d1", "10.0.0.2", 5432)];
        a.on_health(p, "db".into(), 1, at(5), Ok(db));
        a
    }

    fn catalog(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_service_hidden_by_the_acl_keeps_its_last_answer_until_listed_again() {
        let (p, _h) = publisher();
        let mut a = web_and_db(&p);
        let both = Some(vec!["d1".to_string(), "w1".to_string()]);
        // The catalog at the same index without db: nothing was written, db is hidden.
        a.on_catalog(&p, catalog(&["web"]), at(10));
        assert_eq!(a.withheld.get("db"), Some(&Withheld::Hidden));
        assert!(a.asking.is_empty());
        assert!(a.followed().contains("db"), "its poller goes on");
        assert_eq!(a.snapshot().map(|s| ids(&s)), both);
        // Its poller answers again (after an error) at the same index, empty: still hidden.
        a.on_health(&p, "db".into(), 1, at(5), Ok(vec![]));
        assert_eq!(a.snapshot().map(|s| ids(&s)), both);
        // A store-wide failure meanwhile holds back snapshots but keeps what is known, so the
        // answer after it is still judged against the last one.
        a.on_health(&p, "db".into(), 1, at(0), refused(false));
        assert!(a.snapshot().is_none());
        a.on_health(&p, "db".into(), 1, at(5), Ok(vec![]));
        assert_eq!(a.snapshot().map(|s| ids(&s)), both);
        // Other services go on.
        let web = vec![
            inst("web", "w1", "10.0.0.1", 80),
            inst("web", "w2", "10.0.0.3", 80),
        ];
        a.on_health(&p, "web".into(), 1, at(12), Ok(web));
        a.on_catalog(&p, catalog(&["web"]), at(12));
        assert_eq!(a.withheld.get("db"), Some(&Withheld::Hidden));
        assert_eq!(
            a.snapshot().map(|s| ids(&s)),
            Some(vec!["d1".into(), "w1".into(), "w2".into()])
        );
        // The policy is restored: the catalog lists db again.
        a.on_catalog(&p, catalog(&["web", "db"]), at(12));
        assert!(a.withheld.is_empty());
        assert_eq!(a.snapshot().unwrap().services["db"].len(), 1);
    }

    #[test]
    fn a_service_that_left_the_catalog_at_a_new_index_is_asked_about() {
        let (p, _h) = publisher();
        // Removed: its own answer comes at a new index, without instances.
        let mut a = web_and_db(&p);
        a.on_catalog(&p, catalog(&["web"]), at(11));
        assert_eq!(a.withheld.get("db"), Some(&Withheld::Asking));
        assert_eq!(a.asking, ["db"]);
        assert!(
            a.snapshot().unwrap().services.contains_key("db"),
            "kept meanwhile"
        );
        a.refollow = false;
        a.on_health(&p, "db".into(), 1, at(11), Ok(vec![]));
        assert!(a.withheld.is_empty());
        assert!(a.refollow, "its poller is to be stopped");
        assert!(!a.followed().contains("db"));
        assert_eq!(a.snapshot().map(|s| ids(&s)), Some(vec!["w1".to_string()]));

        // Hidden while something else changed: its own answer comes at its last index.
        let mut a = web_and_db(&p);
        a.on_catalog(&p, catalog(&["web"]), at(11));
        a.on_health(&p, "db".into(), 1, at(5), Ok(vec![]));
        assert_eq!(a.withheld.get("db"), Some(&Withheld::Hidden));
        assert!(a.snapshot().unwrap().services.contains_key("db"));

        // After a catalog failure the same index proves nothing: asked about.
        let mut a = web_and_db(&p);
        a.catalog_err = true;
        a.on_catalog(&p, catalog(&["web"]), at(10));
        assert_eq!(a.withheld.get("db"), Some(&Withheld::Asking));

        // A service without instances simply leaves.
        let mut a = web_and_db(&p);
        a.on_health(&p, "db".into(), 1, at(6), Ok(vec![]));
        a.on_catalog(&p, catalog(&["web"]), at(6));
        assert!(a.withheld.is_empty() && a.asking.is_empty());
        assert!(!a.followed().contains("db"));
    }
}
