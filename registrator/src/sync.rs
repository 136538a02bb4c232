//! Keeps the store in line with the desired services.
//!
//! The Docker side publishes the complete desired set; this module owns `applied`, the
//! registrations it wrote successfully, and moves the store towards the desired set: register
//! what differs, deregister what is no longer wanted. It never trusts its bookkeeping blindly:
//! every `verify_interval` it lists the store, re-registers what the store lost (a Consul dev
//! agent forgets everything on restart) and, with `-cleanup`, removes this host's registrations
//! nobody wants. Store errors start an "outage": one warning, then retries with backoff until
//! the store answers again, after which everything desired is (re)registered.
//!
//! Registrations mirror running containers, not the registrator's lifetime: with gliderlabs',
//! a `docker restart registrator` takes every service of the host out of the load balancer. A stop, restart, upgrade or crash leaves them in place, and a new registrator
//! *adopts* them: its first pass, once the Docker side has published its first complete set,
//! lists the store, takes every registration equal to what it would write as already applied
//! (no write, so nothing flaps and no watcher wakes), and removes this host's registrations
//! (`<hostname>:` IDs) that no running container backs: containers that stopped while no
//! registrator watched. Removing everything on exit is an opt-in (`--deregister-on-exit`).
//!
//! Removals are urgent: a container that got its stop signal is finishing its requests and must
//! get no new ones. So a pass that is registering or refreshing many services stops starting
//! writes as soon as the Docker side withdraws something we registered, and the next pass
//! (deregistrations first, even before the store's listing) starts at once.
//!
//! A removal the store refuses (an ACL policy or etcd role without write, a 5xx about the item)
//! stays *owed*: it leaves `applied` (that is no longer what the store holds for sure) for a
//! list of owed removals, each tried again at every pass once its own delay has passed
//! ([`OWED_RETRY`]), until it lands or its container is back (then the registration is what
//! is owed, and plan writes it over the old entry). A removal that failed because the store
//! did not answer at all stays in `applied` and is tried again when the outage ends. Either
//! way a refusal is never forgotten: nothing else would ever remove that entry (the listing
//! looks only at what is desired, and `-cleanup` is off by default), and the proxy would go
//! on sending traffic to a container that is gone.
//!
//! Writes of a pass overlap, up to [`WRITES_IN_FLIGHT`] at once ([`Batch`]): a store round
//! trip is mostly waiting (an etcd put waits for its fsync on a quorum), so when containers
//! start together, one-at-a-time writes made the last of them wait for all the others. Every
//! deregistration of a pass completes before its first registration starts, and a
//! registration published while a pass runs joins its writes ([`arrivals`]) instead of waiting
//! for the slowest of them.
//!
//! The decisions are the pure functions [`adopt`], [`plan`] and [`verify`]; [`Syncer::run`]
//! only applies them.

use crate::metrics::{self, metrics, store_request};
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use switchboard::{Backoff, Service, Shutdown, Store, StoreError};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// The services that should be registered, by ID.
pub type ServiceSet = BTreeMap<String, Service>;

/// What the Docker side publishes: `None` until the first complete listing of containers, so
/// nothing is registered or cleaned up from a partial view.
pub type Desired = Option<Arc<ServiceSet>>;

/// The store writes that bring it from `applied` to `desired`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Registrations to remove, applied first (a renamed service's old key must go before the
    /// new one is written, since Consul keys by ID alone).
    pub deregister: Vec<Service>,
    /// Registrations to write.
    pub register: Vec<Service>,
}

/// Removals the store refused earlier and that are still owed, as [`plan`] sees them at one
/// instant (kept by `Refusals`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Owed {
    /// Those whose delay has passed: tried again now.
    pub due: ServiceSet,
    /// Those still waiting for their delay.
    pub waiting: ServiceSet,
}

impl Owed {
    /// Whether an owed removal holds back the registration `svc`: one of the same ID under
    /// another name (a renamed service whose old entry the store would not remove). The old
    /// entry must go first, as for a rename in [`plan`]: Consul keys by ID alone, so a later
    /// removal of the old entry would remove the new one. The same ID and name is the
    /// container back, which needs no removal ([`backs`]).
    fn holds_back(&self, svc: &Service) -> bool {
        [&self.due, &self.waiting]
            .iter()
            .any(|set| set.get(&svc.id).is_some_and(|o| o.name != svc.name))
    }
}

/// Whether `desired` holds the registration `svc` stands for (same ID and name: the same
/// Consul service, etcd key and Consul KV key), so removing it would be wrong.
pub fn backs(desired: &ServiceSet, svc: &Service) -> bool {
    desired.get(&svc.id).is_some_and(|d| d.name == svc.name)
}

/// The removals to make now: what was applied and is no longer desired (or desired under
/// another name), then the owed removals whose delay has passed and that nothing desired backs.
pub fn removals(desired: &ServiceSet, applied: &ServiceSet, owed: &Owed) -> Vec<Service> {
    applied
        .values()
        .chain(owed.due.values())
        .filter(|old| !backs(desired, old))
        .cloned()
        .collect()
}

/// Decides what to write. `rejected` holds services the store refused that are still held back
/// (see `Refusals`): they are not written again until their delay passes or their content
/// changes. `owed`: removals the store refused earlier; those due are made again (with the
/// others, first), and a registration one of them holds back ([`Owed::holds_back`]) waits.
pub fn plan(
    desired: &ServiceSet,
    applied: &ServiceSet,
    rejected: &ServiceSet,
    owed: &Owed,
) -> Plan {
    let mut p = Plan {
        deregister: removals(desired, applied, owed),
        register: vec![],
    };
    for (id, svc) in desired {
        if applied.get(id) != Some(svc) && rejected.get(id) != Some(svc) && !owed.holds_back(svc) {
            p.register.push(svc.clone());
        }
    }
    p
}

/// What a store's listing shows of a registration, which is what adoption can compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listing {
    /// Tags and metadata come back (Consul agent services, the etcd JSON), so they must match
    /// too; a Consul KV entry holds only the address.
    pub tags_meta: bool,
    /// A TTL registration hangs on its writer's lease (etcd), which dies with the old process:
    /// it is written again under ours (a put in place, never a delete first), not adopted as it
    /// is. Consul's TTL check belongs to the service and is simply refreshed.
    pub ttl_bound_to_writer: bool,
}

impl Listing {
    /// What the store named by `kind` ([`Store::kind`]) lists.
    pub fn of(kind: &str) -> Listing {
        Listing {
            tags_meta: kind != "consulkv",
            ttl_bound_to_writer: kind == "etcd",
        }
    }

    /// Whether `listed` is `want` as far as the listing shows. A service whose check follows
    /// Docker health never is: the listing shows no check status, and the container's health
    /// may have changed while no registrator watched, so it is written again (in place; that
    /// write sets the status).
    fn same(&self, want: &Service, listed: &Service) -> bool {
        want.docker_health.is_none()
            && listed.id == want.id
            && listed.name == want.name
            && listed.address == want.address
            && listed.port == want.port
            && (!self.tags_meta || (listed.tags == want.tags && listed.meta == want.meta))
    }
}

/// What a new registrator makes of the store at its first pass.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Adoption {
    /// Desired services already registered exactly so: taken as applied, not written again.
    pub adopted: Vec<Service>,
    /// This host's registrations (IDs starting with `<hostname>:`) that nothing desired
    /// matches by ID and name: left by containers that stopped while no registrator ran.
    /// Removed now, with or without `-cleanup`: the host prefix is this host's registrator's,
    /// and nobody else would ever remove them.
    pub stale: Vec<Service>,
}

/// Decides what to adopt and what to remove at the first pass after start. A desired service
/// listed differently (or not at all) is neither: [`plan`] registers it, in place. A listed
/// entry under the host prefix whose ID is desired under another name is stale (in etcd the
/// name is part of the key, so the new registration would not replace it).
pub fn adopt(
    desired: &ServiceSet,
    listed: &[Service],
    host_prefix: &str,
    listing: Listing,
) -> Adoption {
    let mut a = Adoption::default();
    for want in desired.values() {
        let rebind = listing.ttl_bound_to_writer && want.ttl.is_some();
        if !rebind && listed.iter().any(|l| listing.same(want, l)) {
            a.adopted.push(want.clone());
        }
    }
    for l in listed {
        if l.id.starts_with(host_prefix) && !backs(desired, l) {
            a.stale.push(l.clone());
        }
    }
    a
}

/// Whether `next` drops something `applied` holds: a removal that must not wait.
fn withdraws(next: &ServiceSet, applied: &ServiceSet) -> bool {
    applied.keys().any(|id| !next.contains_key(id))
}

/// Registrations a desired set published while a pass runs (`next`) adds, which may start
/// before that pass ends: new or changed in place, neither written (`applied`) nor already
/// part of the pass (`scheduled`, whatever its content), nor held back after a refusal
/// (`held`) or by an owed removal (`owed`, see [`Owed::holds_back`]). A service renamed under
/// the same ID is left to the next pass, which deregisters the old name first; so is
/// everything when `next` also withdraws something (see [`withdraws`]: the pass then stops
/// starting writes).
pub fn arrivals(
    next: &ServiceSet,
    applied: &ServiceSet,
    scheduled: &ServiceSet,
    held: &ServiceSet,
    owed: &Owed,
) -> Vec<Service> {
    next.values()
        .filter(|s| {
            let renamed = applied.get(&s.id).is_some_and(|a| a.name != s.name);
            applied.get(&s.id) != Some(*s)
                && !renamed
                && !scheduled.contains_key(&s.id)
                && held.get(&s.id) != Some(*s)
                && !owed.holds_back(s)
        })
        .cloned()
        .collect()
}

/// What a listing of the store reveals.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// IDs we believe registered, and still want, that the store lacks (or holds
    /// differently): forget them, so the next plan writes them again.
    pub lost: Vec<String>,
    /// This host's registrations that nothing backs (only filled with `cleanup`).
    pub stale: Vec<Service>,
}

/// Compares a store listing with our bookkeeping. Only `id`, `name`, `address` and `port` of
/// listed entries are compared, as that is all every store returns. `stale` only ever holds
/// IDs starting with `host_prefix` (`<hostname>:`), so `-cleanup` never touches another host's
/// registrations.
///
/// What is applied but no longer desired is [`plan`]'s to remove, listed or not: a listing
/// can hide an entry that is there (a Consul ACL policy without read filters it out), and
/// removing what is gone already succeeds. Owed removals are not stale: they are being
/// retried already.
pub fn verify(
    desired: &ServiceSet,
    applied: &ServiceSet,
    owed: &Owed,
    listed: &[Service],
    host_prefix: &str,
    cleanup: bool,
) -> Verdict {
    let mut v = Verdict::default();
    for (id, svc) in applied.iter().filter(|(_, svc)| backs(desired, svc)) {
        let present = listed.iter().any(|l| {
            l.id == *id && l.name == svc.name && l.address == svc.address && l.port == svc.port
        });
        if !present {
            v.lost.push(id.clone());
        }
    }
    if cleanup {
        for l in listed {
            if l.id.starts_with(host_prefix)
                && !desired.contains_key(&l.id)
                && !applied.contains_key(&l.id)
                && !owed.due.contains_key(&l.id)
                && !owed.waiting.contains_key(&l.id)
            {
                v.stale.push(l.clone());
            }
        }
    }
    v
}

/// Writes the store refused, each tried again after its own growing delay: registrations
/// ([`REFUSED_RETRY`]) and removals ([`OWED_RETRY`]). A refusal is about one item (see
/// [`StoreError::is_item_failure`]): a `SERVICE_CHECK_SCRIPT` on an agent with script checks
/// off, a name the store will not take, an ACL policy or etcd role without write. Treating it
/// as an outage would hold every other registration and removal of the host behind it;
/// retrying it at once would hammer the store. Many refusals clear (the agent is restarted with
/// script checks on, the policy is fixed), so they are retried.
#[derive(Debug)]
struct Refusals {
    /// First and longest delay.
    retry: (Duration, Duration),
    items: BTreeMap<String, RefusedItem>,
}

#[derive(Debug)]
struct RefusedItem {
    svc: Service,
    until: Instant,
    backoff: Backoff,
}

/// First and longest wait before a refused registration is tried again. A registration that
/// waits costs a new instance its traffic, no more, and most refusals last (script checks off,
/// a name Consul cannot route): 30 s after the first refusal, then up to every 5 minutes.
const REFUSED_RETRY: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(300));

/// First and longest wait before a refused removal is tried again (jittered ±20 %, doubling:
/// 1, 2, 4, 8, 16, then every 30 s). A removal that waits sends traffic to a container that
/// is gone, so the first retries come fast and the longest wait stays short; a store that
/// refuses for long (a policy lost write for an hour) gets one small request per owed removal
/// every 30 s, never more (an idle host with a handful of stopped containers: a few requests a
/// minute). A removal that lands is never tried again.
pub const OWED_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

impl Refusals {
    /// No refusals, tried again with delays from `retry.0` doubling up to `retry.1`.
    fn new(retry: (Duration, Duration)) -> Self {
        Refusals {
            retry,
            items: BTreeMap::new(),
        }
    }

    /// `svc` was refused at `now`: hold it back for its next delay, which it returns.
    fn refuse(&mut self, svc: &Service, now: Instant) -> Duration {
        let retry = self.retry;
        let item = self
            .items
            .entry(svc.id.clone())
            .or_insert_with(|| RefusedItem {
                svc: svc.clone(),
                until: now,
                backoff: Backoff::new(retry.0, retry.1),
            });
        if item.svc != *svc {
            item.backoff.reset();
            item.svc = svc.clone();
        }
        let delay = item.backoff.next_delay();
        item.until = now + delay;
        delay
    }

    /// `id` was written (or is no longer wanted): forget it. Returns how often it had been
    /// refused, if it was held.
    fn clear(&mut self, id: &str) -> Option<u32> {
        self.items.remove(id).map(|r| r.backoff.attempts())
    }

    /// Forgets, and returns, the services `drop` picks.
    fn forget(&mut self, drop: impl Fn(&Service) -> bool) -> Vec<Service> {
        let gone: Vec<String> = self
            .items
            .iter()
            .filter(|(_, r)| drop(&r.svc))
            .map(|(id, _)| id.clone())
            .collect();
        gone.iter()
            .filter_map(|id| self.items.remove(id))
            .map(|r| r.svc)
            .collect()
    }

    /// Makes everything held due at `now`, keeping each one's backoff: if it is refused
    /// again, its next delay is the one it would have had.
    fn hurry(&mut self, now: Instant) {
        for r in self.items.values_mut() {
            r.until = r.until.min(now);
        }
    }

    /// Whether `id` is held.
    fn contains(&self, id: &str) -> bool {
        self.items.contains_key(id)
    }

    /// How many are held.
    fn len(&self) -> usize {
        self.items.len()
    }

    /// Everything held, split by whether its delay has passed at `now`.
    fn at(&self, now: Instant) -> Owed {
        let mut o = Owed::default();
        for (id, r) in &self.items {
            let side = if r.until > now {
                &mut o.waiting
            } else {
                &mut o.due
            };
            side.insert(id.clone(), r.svc.clone());
        }
        o
    }

    /// The services still held back at `now` (what [`plan`] must not write again).
    fn held(&self, now: Instant) -> ServiceSet {
        self.at(now).waiting
    }

    /// When the next held-back service is due again, among those not due yet when the last
    /// pass started (`after`). One that pass saw due and left (a registration an owed removal
    /// holds back) waits for the next pass something else starts: waking for it again at once
    /// would loop without end.
    fn next_retry(&self, after: Instant) -> Option<Instant> {
        self.items
            .values()
            .map(|r| r.until)
            .filter(|t| *t > after)
            .min()
    }
}

/// The syncer's settings.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// `<hostname>:`, the ID prefix of this host's registrations.
    pub host_prefix: String,
    /// `-cleanup`.
    pub cleanup: bool,
    /// `--deregister-on-exit`: the old way, everything leaves the store on SIGTERM/SIGINT.
    pub deregister_on_exit: bool,
    /// How often the store is listed.
    pub verify_interval: Duration,
    /// How often TTL registrations are refreshed (`None`: no TTL).
    pub ttl_refresh: Option<Duration>,
}

/// The loop that applies [`adopt`], [`plan`] and [`verify`] to a store.
pub struct Syncer {
    store: Store,
    opts: SyncOptions,
    listing: Listing,
    applied: ServiceSet,
    /// Registrations the store refused.
    refused: Refusals,
    /// Removals the store refused: still owed.
    owed: Refusals,
}

/// What the next pass must do. Each part is cleared once it succeeded, so a pass that fails
/// (or stops early for a removal) resumes where it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Due {
    /// The first pass after start: list the store and adopt what is there.
    adopt: bool,
    /// List the store to find lost (and, with `-cleanup`, stale) registrations.
    verify: bool,
    /// Bring the store to the desired set.
    reconcile: bool,
    /// Keep TTL registrations alive.
    refresh: bool,
}

/// How a pass of writes ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writes {
    /// Every write was made.
    Done,
    /// Stopped early: the Docker side withdrew something we registered, and that comes first.
    Preempted,
}

/// Bounds the deregistrations of `--deregister-on-exit`, so a dead store cannot hold the
/// process.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// TTL refreshes made between two looks for an urgent removal (Consul passes one check per
/// request).
const REFRESH_CHUNK: usize = 32;

/// Store writes of one pass in flight at once. Enough to keep a store's round trips
/// overlapping when a host starts a batch of containers; few enough that a registrator
/// catching up on hundreds of services never floods a store other hosts share.
pub const WRITES_IN_FLIGHT: usize = 8;

/// Which write a [`Batch`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Register,
    Deregister,
}

/// One write of a pass and its result.
type Written = (Service, Result<(), StoreError>);

/// The writes of one kind a pass makes, up to [`WRITES_IN_FLIGHT`] in flight, each result
/// handed back as it arrives so the caller's bookkeeping follows every write that landed, even
/// when another failed. Whoever drives it decides before each [`Batch::next`] whether more may
/// start (not after a store-wide failure, not once a removal waits); what already runs is
/// always awaited, never dropped half-way.
struct Batch<'a> {
    store: &'a Store,
    op: Op,
    pending: VecDeque<Service>,
    running: FuturesUnordered<BoxFuture<'a, Written>>,
}

impl<'a> Batch<'a> {
    fn new(store: &'a Store, op: Op, items: Vec<Service>) -> Self {
        Batch {
            store,
            op,
            pending: items.into(),
            running: FuturesUnordered::new(),
        }
    }

    /// One more write, after those already queued.
    fn push(&mut self, svc: Service) {
        self.pending.push_back(svc);
    }

    /// Starts writes up to the limit when `start`, then waits for the next to finish. `None`
    /// once nothing runs and nothing more may (or is left to) start.
    async fn next(&mut self, start: bool) -> Option<Written> {
        while start && self.running.len() < WRITES_IN_FLIGHT {
            let Some(svc) = self.pending.pop_front() else {
                break;
            };
            let (store, op) = (self.store, self.op);
            self.running.push(Box::pin(async move {
                let r = match op {
                    Op::Register => register(store, &svc).await,
                    Op::Deregister => deregister(store, &svc).await,
                };
                (svc, r)
            }));
        }
        self.running.next().await
    }
}

impl Syncer {
    /// A syncer with nothing applied yet.
    pub fn new(store: Store, opts: SyncOptions) -> Self {
        Syncer {
            listing: Listing::of(store.kind()),
            store,
            opts,
            applied: ServiceSet::new(),
            refused: Refusals::new(REFUSED_RETRY),
            owed: Refusals::new(OWED_RETRY),
        }
    }

    /// Runs until `shutdown`, then returns, leaving the registrations for the next registrator
    /// to adopt (or deregistering them with `deregister_on_exit`).
    pub async fn run(mut self, mut desired_rx: watch::Receiver<Desired>, shutdown: Shutdown) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        let mut outage: Option<String> = None;
        let mut retry_at: Option<Instant> = None;
        let mut due = Due {
            adopt: true,
            verify: false,
            reconcile: true,
            refresh: false,
        };
        let mut verify_tick = tokio::time::interval(self.opts.verify_interval);
        verify_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let refresh_every = self.opts.ttl_refresh.unwrap_or(Duration::from_secs(3600));
        let mut refresh_tick = tokio::time::interval(refresh_every);
        refresh_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut desired: Option<Arc<ServiceSet>> = None;
        let mut last_pass = Instant::now();
        loop {
            if desired.is_none() {
                desired = desired_rx.borrow_and_update().clone();
            }
            if let Some(want) = desired.clone() {
                if retry_at.is_none() {
                    last_pass = Instant::now();
                    let step = self.step(&want, &mut due, &desired_rx).await;
                    metrics().services.set(self.applied.len() as i64);
                    metrics().owed.set(self.owed.len() as i64);
                    match step {
                        Ok(()) => {
                            metrics::store_ok();
                            if let Some(e) = outage.take() {
                                info!(
                                    store = self.store.kind(),
                                    "store reachable again (was: {e})"
                                );
                                // What changed may be what refused the removals (an etcd role
                                // granted back answers the listing again too): try them now
                                // rather than after their grown delays.
                                self.owed.hurry(Instant::now());
                            }
                            backoff.reset();
                        }
                        Err(e) => {
                            metrics::store_failed(self.store.kind(), &e);
                            if outage.is_none() {
                                warn!(
                                    store = self.store.kind(),
                                    "store unavailable, retrying until it answers: {e}"
                                );
                            } else {
                                debug!("store still unavailable: {e}");
                            }
                            outage = Some(e.to_string());
                            // After an outage the store may have lost anything: list it first.
                            due.verify = true;
                            retry_at = Some(Instant::now() + backoff.next_delay());
                        }
                    }
                }
            }
            let retry = async {
                match retry_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            // During an outage the outage's own backoff paces passes: what is due then waits
            // for it (else an item already due would wake this loop at once, again and again).
            let refused_due = [
                self.refused.next_retry(last_pass),
                self.owed.next_retry(last_pass),
            ]
            .into_iter()
            .flatten()
            .min()
            .filter(|_| retry_at.is_none());
            let retry_refused = async {
                match refused_due {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = desired_rx.changed() => {
                    if r.is_err() {
                        // The Docker side is gone: only happens on shutdown.
                        shutdown.cancelled().await;
                        break;
                    }
                    desired = desired_rx.borrow_and_update().clone();
                    due.reconcile = true;
                }
                _ = retry => retry_at = None,
                _ = retry_refused => due.reconcile = true,
                _ = verify_tick.tick() => due.verify = true,
                _ = refresh_tick.tick(), if self.opts.ttl_refresh.is_some() => due.refresh = true,
            }
        }
        self.exit(desired.as_deref()).await;
    }

    /// One pass: adopt or verify (if due), reconcile (if due), refresh (if due). Returns early,
    /// with the rest still due, when `changes` withdraws something registered.
    async fn step(
        &mut self,
        desired: &ServiceSet,
        due: &mut Due,
        changes: &watch::Receiver<Desired>,
    ) -> Result<(), StoreError> {
        // An expired TTL lease/check means the store dropped our registrations: write them
        // again and refresh once more. A second expiry in the same pass is an outage.
        let mut expiries = 0;
        loop {
            if due.adopt {
                self.adopt(desired).await?;
                due.adopt = false;
                due.verify = false;
                due.reconcile = true;
                // The old registrator's last refresh may be most of a TTL ago.
                due.refresh = self.opts.ttl_refresh.is_some();
            }
            if due.reconcile {
                // Removals first: before a listing, which takes longer and may fail.
                self.remove(desired).await?;
            }
            if due.verify {
                // List everything: services with a custom SERVICE_ID lack the host prefix.
                let listed = store_request("list", self.store.list("")).await?;
                let v = verify(
                    desired,
                    &self.applied,
                    &self.owed.at(Instant::now()),
                    &listed,
                    &self.opts.host_prefix,
                    self.opts.cleanup,
                );
                for id in &v.lost {
                    if let Some(svc) = self.applied.remove(id) {
                        info!(
                            "store lost {} {} {}; registering it again",
                            svc.id,
                            svc.name,
                            svc.addr()
                        );
                    }
                }
                self.remove_stale(&v.stale, "cleanup").await?;
                due.verify = false;
                due.reconcile = true;
            }
            if due.reconcile {
                let (writes, registered) = self.reconcile(desired, changes).await?;
                if registered && self.opts.ttl_refresh.is_some() {
                    // Pass fresh TTL checks at once rather than leaving them critical until
                    // the next tick.
                    due.refresh = true;
                }
                if writes == Writes::Preempted {
                    return Ok(());
                }
                due.reconcile = false;
            }
            if !due.refresh {
                return Ok(());
            }
            match self.refresh(changes).await {
                Ok(Writes::Done) => {
                    due.refresh = false;
                    return Ok(());
                }
                Ok(Writes::Preempted) => return Ok(()),
                Err(StoreError::Expired { what }) if expiries == 0 => {
                    info!("{what} expired in the store; registering everything again");
                    expiries += 1;
                    // Only what is desired is written again; a removal not made yet stays
                    // due (removing what expired with the lease succeeds).
                    self.applied.retain(|_, s| !backs(desired, s));
                    due.reconcile = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether `changes` holds a desired set, not yet seen, that drops something registered.
    fn removal_waiting(&self, changes: &watch::Receiver<Desired>) -> bool {
        if !changes.has_changed().unwrap_or(false) {
            return false;
        }
        let next = changes.borrow();
        next.as_deref()
            .is_some_and(|next| withdraws(next, &self.applied))
    }

    /// The first pass: applies [`adopt`] to a listing of the store.
    async fn adopt(&mut self, desired: &ServiceSet) -> Result<(), StoreError> {
        let listed = store_request("list", self.store.list("")).await?;
        let a = adopt(desired, &listed, &self.opts.host_prefix, self.listing);
        self.remove_stale(&a.stale, "no running container backs it")
            .await?;
        // One line at every start, so an operator sees the handover from the last registrator.
        info!(
            "adopted {} registrations already in the store; {} to write",
            a.adopted.len(),
            desired.len() - a.adopted.len()
        );
        for svc in a.adopted {
            debug!("adopted {} {} {}", svc.id, svc.name, svc.addr());
            self.applied.insert(svc.id.clone(), svc);
        }
        Ok(())
    }

    /// Refreshes the TTLs of everything applied, a chunk at a time.
    async fn refresh(&mut self, changes: &watch::Receiver<Desired>) -> Result<Writes, StoreError> {
        let services: Vec<Service> = self.applied.values().cloned().collect();
        if services.is_empty() {
            // Still one call: etcd keeps the lease alive for registrations to come.
            store_request("refresh", self.store.refresh(&[])).await?;
            return Ok(Writes::Done);
        }
        for chunk in services.chunks(REFRESH_CHUNK) {
            store_request("refresh", self.store.refresh(chunk)).await?;
            if self.removal_waiting(changes) {
                return Ok(Writes::Preempted);
            }
        }
        Ok(Writes::Done)
    }

    /// Makes every removal [`removals`] asks for (withdrawn services, renamed ones' old
    /// entries, owed removals whose delay has passed), overlapping up to [`WRITES_IN_FLIGHT`].
    /// An owed removal whose container is back is dropped first. A removal the store refuses
    /// stays owed ([`Syncer::owe`]). A store-wide failure starts nothing more and is returned
    /// once the running writes are done; what it failed stays where it was (`applied`, or owed
    /// and due), for the next pass.
    async fn remove(&mut self, desired: &ServiceSet) -> Result<(), StoreError> {
        for svc in self.owed.forget(|s| backs(desired, s)) {
            info!(
                "no longer owes the removal of {} {} {}: it is running again (its registration is written instead)",
                svc.id,
                svc.name,
                svc.addr()
            );
        }
        let list = removals(desired, &self.applied, &self.owed.at(Instant::now()));
        if list.is_empty() {
            return Ok(());
        }
        let store = self.store.clone();
        let mut failed: Option<StoreError> = None;
        let mut writes = Batch::new(&store, Op::Deregister, list);
        while let Some((svc, r)) = writes.next(failed.is_none()).await {
            match r {
                Ok(()) => {
                    metrics::written();
                    match self.owed.clear(&svc.id) {
                        Some(n) => info!(
                            "deregistered {} {} {} (owed: the store had refused it {n} time(s))",
                            svc.id,
                            svc.name,
                            svc.addr()
                        ),
                        None => info!("deregistered {} {} {}", svc.id, svc.name, svc.addr()),
                    }
                }
                Err(e) if e.is_item_failure() => self.owe(&svc, &e),
                Err(e) => {
                    failed.get_or_insert(e);
                    continue;
                }
            }
            self.applied.remove(&svc.id);
        }
        metrics().owed.set(self.owed.len() as i64);
        failed.map_or(Ok(()), Err)
    }

    /// `svc`'s removal was refused: it stays owed, tried again after its next delay
    /// ([`OWED_RETRY`]). Warned about at the first refusal only: a store that refuses for an
    /// hour must not fill the log; `registrator_deregistrations_owed` says how many wait.
    fn owe(&mut self, svc: &Service, e: &StoreError) {
        let first = !self.owed.contains(&svc.id);
        let delay = self.owed.refuse(svc, Instant::now());
        if first {
            warn!(
                "store refused to deregister {} {} {}: still owed, trying it again in {delay:.0?}, then with backoff up to {:?}, until it lands or the container is back (other writes go on): {e}",
                svc.id,
                svc.name,
                svc.addr(),
                OWED_RETRY.1
            );
        } else {
            debug!(
                "removal of {} refused again; next try in {delay:.0?}: {e}",
                svc.id
            );
        }
    }

    /// Removes registrations nothing backs (`why` says how that was found), overlapping the
    /// writes. One the store refuses stays owed, as for any removal; a store-wide failure is
    /// returned once the writes already running are done.
    async fn remove_stale(&mut self, stale: &[Service], why: &str) -> Result<(), StoreError> {
        let store = self.store.clone();
        let mut failed: Option<StoreError> = None;
        let mut writes = Batch::new(&store, Op::Deregister, stale.to_vec());
        while let Some((svc, r)) = writes.next(failed.is_none()).await {
            match r {
                Ok(()) => info!(
                    "deregistered {} {} {} ({why})",
                    svc.id,
                    svc.name,
                    svc.addr()
                ),
                Err(e) if e.is_item_failure() => self.owe(&svc, &e),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Applies [`plan`]: every removal first ([`Syncer::remove`]), then the registrations,
    /// overlapping up to [`WRITES_IN_FLIGHT`]. Registrations the Docker side publishes
    /// meanwhile join the running ones ([`arrivals`]) rather than wait for the pass to end.
    /// Returns how it ended and whether anything was registered. A store-wide failure starts
    /// nothing more, waits for the writes already running (their results are recorded) and is
    /// returned.
    async fn reconcile(
        &mut self,
        desired: &ServiceSet,
        changes: &watch::Receiver<Desired>,
    ) -> Result<(Writes, bool), StoreError> {
        self.remove(desired).await?;
        let now = Instant::now();
        let p = plan(
            desired,
            &self.applied,
            &self.refused.held(now),
            &self.owed.at(now),
        );
        self.refused.forget(|s| !desired.contains_key(&s.id));
        let store = self.store.clone();
        let mut failed: Option<StoreError> = None;
        let mut registered = false;
        let mut preempted = false;
        // Everything this pass writes or has written, by ID: an arrival for one of them waits
        // for the next pass, so two writes of one ID never race.
        let mut scheduled: ServiceSet = p
            .register
            .iter()
            .map(|s| (s.id.clone(), s.clone()))
            .collect();
        let mut looked_at: Desired = None;
        // Wakes the loop for a new desired set while writes are out; the run loop's own
        // receiver still sees the change afterwards and plans a pass for what is left.
        let mut watch = changes.clone();
        let mut watching = true;
        let mut writes = Batch::new(&store, Op::Register, p.register);
        loop {
            preempted = preempted || self.removal_waiting(changes);
            if failed.is_none() && !preempted && changes.has_changed().unwrap_or(false) {
                let next = changes.borrow().clone();
                let fresh = match (&next, &looked_at) {
                    (Some(n), Some(l)) => !Arc::ptr_eq(n, l),
                    (n, _) => n.is_some(),
                };
                if let (true, Some(next)) = (fresh, &next) {
                    let now = Instant::now();
                    let held = self.refused.held(now);
                    let owed = self.owed.at(now);
                    for svc in arrivals(next, &self.applied, &scheduled, &held, &owed) {
                        scheduled.insert(svc.id.clone(), svc.clone());
                        writes.push(svc);
                    }
                }
                looked_at = next;
            }
            let start = failed.is_none() && !preempted;
            let written = tokio::select! {
                biased;
                w = writes.next(start) => w,
                r = watch.changed(), if watching && start => {
                    watching = r.is_ok();
                    continue;
                }
            };
            let Some((svc, r)) = written else {
                break;
            };
            match r {
                Ok(()) => {
                    metrics::written();
                    registered = true;
                    info!("registered {} {} {}", svc.id, svc.name, svc.addr());
                    self.refused.clear(&svc.id);
                    // Written over an owed removal's entry (the container came back during
                    // this pass): nothing is owed for it any more.
                    self.owed.clear(&svc.id);
                    self.applied.insert(svc.id.clone(), svc);
                }
                Err(e) if e.is_item_failure() => {
                    let delay = self.refused.refuse(&svc, Instant::now());
                    warn!(
                        "store refused {} {} {} (other registrations go on; trying it again in {delay:.0?}): {e}",
                        svc.id,
                        svc.name,
                        svc.addr()
                    );
                    self.applied.remove(&svc.id);
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None if preempted => Ok((Writes::Preempted, registered)),
            None => Ok((Writes::Done, registered)),
        }
    }

    /// On shutdown: leaves every registration for the next registrator to adopt, or with
    /// `--deregister-on-exit` deregisters what we registered and the removals still owed, plus
    /// anything desired (a write interrupted by shutdown may have reached the store without
    /// being recorded), within [`EXIT_TIMEOUT`]. Without it, an owed removal is left to the
    /// next registrator, whose adoption removes this host's entries no container backs.
    async fn exit(mut self, desired: Option<&ServiceSet>) {
        if !self.opts.deregister_on_exit {
            info!(
                "leaving {} registrations in place for the next registrator to adopt",
                self.applied.len()
            );
            return;
        }
        let extra: Vec<Service> = desired
            .map(|d| {
                d.values()
                    .filter(|s| !self.applied.contains_key(&s.id))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let owed = self.owed.forget(|_| true);
        let applied: Vec<Service> = std::mem::take(&mut self.applied)
            .into_values()
            .chain(owed)
            .collect();
        let store = self.store.clone();
        let work = async move {
            let mut writes = Batch::new(&store, Op::Deregister, applied);
            while let Some((svc, r)) = writes.next(true).await {
                match r {
                    Ok(()) => info!("deregistered {} {} {}", svc.id, svc.name, svc.addr()),
                    Err(e) => warn!("cannot deregister {} on exit: {e}", svc.id),
                }
            }
            let mut writes = Batch::new(&store, Op::Deregister, extra);
            while writes.next(true).await.is_some() {}
        };
        if tokio::time::timeout(EXIT_TIMEOUT, work).await.is_err() {
            warn!("gave up deregistering after {EXIT_TIMEOUT:?}: the store does not answer");
        }
    }
}

/// One registration written, timed and counted.
async fn register(store: &Store, svc: &Service) -> Result<(), StoreError> {
    let r = store_request("register", store.register(svc)).await;
    match &r {
        Ok(()) => metrics().registrations.inc(),
        Err(_) => metrics().registration_failures.inc(),
    };
    r
}

/// One registration removed, timed and counted.
async fn deregister(store: &Store, svc: &Service) -> Result<(), StoreError> {
    let r = store_request("deregister", store.deregister(svc)).await;
    match &r {
        Ok(()) => metrics().deregistrations.inc(),
        Err(_) => metrics().deregistration_failures.inc(),
    };
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(id: &str, name: &str, port: u16) -> Service {
        Service {
            id: id.into(),
            name: name.into(),
            address: "127.0.0.1".into(),
            port,
            tags: vec![],
            meta: Default::default(),
            check: None,
            ttl: None,
            docker_health: None,
        }
    }

    fn set(items: &[Service]) -> ServiceSet {
        items.iter().map(|s| (s.id.clone(), s.clone())).collect()
    }

    fn ids(v: &[Service]) -> Vec<&str> {
        v.iter().map(|s| s.id.as_str()).collect()
    }

    #[test]
    fn plans() {
        let a = svc("h:a:80", "a", 1);
        let b = svc("h:b:80", "b", 2);
        let b_moved = svc("h:b:80", "b", 3);
        let b_renamed = svc("h:b:80", "bee", 2);
        let c = svc("h:c:80", "c", 3);
        let c_moved = svc("h:c:80", "c", 4);
        let c_renamed = svc("h:c:80", "cee", 3);
        let mut a_tagged = a.clone();
        a_tagged.tags = vec!["t".into()];
        /// One plan: the sets given, and the IDs deregistered and registered.
        struct PlanCase<'a> {
            what: &'a str,
            desired: Vec<Service>,
            applied: Vec<Service>,
            rejected: Vec<Service>,
            /// Owed removals whose delay has passed, and those still waiting.
            due: Vec<Service>,
            waiting: Vec<Service>,
            deregister: Vec<&'a str>,
            register: Vec<&'a str>,
        }
        let cases = vec![
            PlanCase {
                what: "nothing",
                desired: vec![],
                applied: vec![],
                rejected: vec![],
                due: vec![],
                waiting: vec![],
                deregister: vec![],
                register: vec![],
            },
            PlanCase {
                what: "new",
                desired: vec![a.clone()],
                applied: vec![],
                rejected: vec![],
                due: vec![],
                waiting: vec![],
                deregister: vec![],
                register: vec!["h:a:80"],
            },
            PlanCase {
                what: "same",
                desired: vec![a.clone()],
                applied: vec![a.clone()],
                rejected: vec![],
                due: vec![],
                waiting: vec![],
                deregister: vec![],
                register: vec![],
            },
            PlanCase {
                what: "gone",
                desired: vec![],
                applied: vec![a.clone()],
                rejected: vec![],
                due: vec![],
                waiting: vec![],
                deregister: vec!["h:a:80"],
                register: vec![],
            },
            PlanCase {
                what: "port changed",
                desired: vec![b_moved.clone()],
                applied: vec![b.clone()],
                rejected: vec![],
                due: vec![],
                waiting: vec![],
                deregister: vec![],
                register: vec!["h:b:80"],
            },
            PlanCase {
                what: "tags changed",
                desired: vec![a_tagged.clone()],
                applied: vec![a.clone()],
                rejected: vec![],
                due: vec![],
                waiting: vec![],
                deregister: vec![],
                register: vec!["h:a:80"],
            },
            PlanCase {
                what: "renamed",
                desired: vec![b_renamed.clone()],
                applied: vec![b.clone()],
                rejected: vec![],
                due: vec![],
                waiting: vec![],
                deregister: vec!["h:b:80"],
                register: vec!["h:b:80"],
            },
            PlanCase {
                what: "rejected unchanged",
                desired: vec![a.clone()],
                applied: vec![],
                rejected: vec![a.clone()],
                due: vec![],
                waiting: vec![],
                deregister: vec![],
                register: vec![],
            },
            PlanCase {
                what: "rejected changed",
                desired: vec![a_tagged.clone()],
                applied: vec![],
                rejected: vec![a.clone()],
                due: vec![],
                waiting: vec![],
                deregister: vec![],
                register: vec!["h:a:80"],
            },
            PlanCase {
                what: "owed removal due: tried again",
                desired: vec![],
                applied: vec![],
                rejected: vec![],
                due: vec![c.clone()],
                waiting: vec![],
                deregister: vec!["h:c:80"],
                register: vec![],
            },
            PlanCase {
                what: "owed removal waiting: not yet",
                desired: vec![],
                applied: vec![],
                rejected: vec![],
                due: vec![],
                waiting: vec![c.clone()],
                deregister: vec![],
                register: vec![],
            },
            PlanCase {
                what: "removals first: withdrawn and owed together",
                desired: vec![a.clone()],
                applied: vec![b.clone()],
                rejected: vec![],
                due: vec![c.clone()],
                waiting: vec![],
                deregister: vec!["h:b:80", "h:c:80"],
                register: vec!["h:a:80"],
            },
            // The container is back (same ID and name): its registration is what is owed,
            // written over the old entry, which must not be removed.
            PlanCase {
                what: "owed due, container back on another port",
                desired: vec![c_moved.clone()],
                applied: vec![],
                rejected: vec![],
                due: vec![c.clone()],
                waiting: vec![],
                deregister: vec![],
                register: vec!["h:c:80"],
            },
            PlanCase {
                what: "owed waiting, container back",
                desired: vec![c.clone()],
                applied: vec![],
                rejected: vec![],
                due: vec![],
                waiting: vec![c.clone()],
                deregister: vec![],
                register: vec!["h:c:80"],
            },
            // Renamed under the same ID: the old entry goes first (Consul keys by ID alone).
            PlanCase {
                what: "owed old name due: removed, new name waits",
                desired: vec![c_renamed.clone()],
                applied: vec![],
                rejected: vec![],
                due: vec![c.clone()],
                waiting: vec![],
                deregister: vec!["h:c:80"],
                register: vec![],
            },
            PlanCase {
                what: "owed old name waiting: new name waits",
                desired: vec![c_renamed.clone(), a.clone()],
                applied: vec![],
                rejected: vec![],
                due: vec![],
                waiting: vec![c.clone()],
                deregister: vec![],
                register: vec!["h:a:80"],
            },
            PlanCase {
                what: "mixed",
                desired: vec![a.clone()],
                applied: vec![b.clone()],
                rejected: vec![],
                due: vec![],
                waiting: vec![],
                deregister: vec!["h:b:80"],
                register: vec!["h:a:80"],
            },
        ];
        for PlanCase {
            what,
            desired,
            applied,
            rejected,
            due,
            waiting,
            deregister: dereg,
            register: reg,
        } in cases
        {
            let owed = Owed {
                due: set(&due),
                waiting: set(&waiting),
            };
            let p = plan(&set(&desired), &set(&applied), &set(&rejected), &owed);
            assert_eq!(ids(&p.deregister), dereg, "{what}");
            assert_eq!(ids(&p.register), reg, "{what}");
        }
        // A renamed service's old registration (old name: its etcd key) is the one removed.
        let p = plan(
            &set(&[b_renamed]),
            &set(&[b]),
            &ServiceSet::new(),
            &Owed::default(),
        );
        assert_eq!(p.deregister[0].name, "b");
    }

    #[test]
    fn verifies() {
        let a = svc("h:a:80", "a", 1);
        let b = svc("h:b:80", "b", 2);
        let custom = svc("custom-id", "c", 3);
        let other_host = svc("other:x:80", "x", 4);
        let stale = svc("h:old:80", "old", 5);
        let a_elsewhere = svc("h:a:80", "a", 9);
        /// One verification: what is desired, applied and listed, and the IDs found lost and stale.
        struct VerifyCase<'a> {
            what: &'a str,
            desired: Vec<Service>,
            applied: Vec<Service>,
            listed: Vec<Service>,
            /// Removals owed (due or not: the same to a listing).
            owed: Vec<Service>,
            cleanup: bool,
            lost: Vec<&'a str>,
            stale: Vec<&'a str>,
        }
        let cases = vec![
            VerifyCase {
                what: "all there",
                desired: vec![a.clone()],
                applied: vec![a.clone()],
                listed: vec![a.clone(), other_host.clone()],
                owed: vec![],
                cleanup: true,
                lost: vec![],
                stale: vec![],
            },
            VerifyCase {
                what: "lost",
                desired: vec![a.clone(), b.clone()],
                applied: vec![a.clone(), b.clone()],
                listed: vec![b.clone()],
                owed: vec![],
                cleanup: false,
                lost: vec!["h:a:80"],
                stale: vec![],
            },
            VerifyCase {
                what: "lost custom id",
                desired: vec![custom.clone()],
                applied: vec![custom.clone()],
                listed: vec![],
                owed: vec![],
                cleanup: false,
                lost: vec!["custom-id"],
                stale: vec![],
            },
            VerifyCase {
                what: "changed behind our back",
                desired: vec![a.clone()],
                applied: vec![a.clone()],
                listed: vec![a_elsewhere],
                owed: vec![],
                cleanup: false,
                lost: vec!["h:a:80"],
                stale: vec![],
            },
            VerifyCase {
                what: "stale without cleanup",
                desired: vec![],
                applied: vec![],
                listed: vec![stale.clone()],
                owed: vec![],
                cleanup: false,
                lost: vec![],
                stale: vec![],
            },
            VerifyCase {
                what: "stale with cleanup, other host untouched",
                desired: vec![a.clone()],
                applied: vec![a.clone()],
                listed: vec![a.clone(), stale.clone(), other_host.clone()],
                owed: vec![],
                cleanup: true,
                lost: vec![],
                stale: vec!["h:old:80"],
            },
            VerifyCase {
                what: "desired but not yet applied is not stale",
                desired: vec![b.clone()],
                applied: vec![],
                listed: vec![b.clone()],
                owed: vec![],
                cleanup: true,
                lost: vec![],
                stale: vec![],
            },
            // A listing can hide what is there (a Consul policy without read): a removal is
            // never dropped because the entry is not listed.
            VerifyCase {
                what: "applied, undesired and not listed: left to plan",
                desired: vec![],
                applied: vec![a.clone()],
                listed: vec![],
                owed: vec![],
                cleanup: false,
                lost: vec![],
                stale: vec![],
            },
            VerifyCase {
                what: "renamed and the old name not listed: left to plan",
                desired: vec![svc("h:a:80", "aa", 1)],
                applied: vec![a.clone()],
                listed: vec![],
                owed: vec![],
                cleanup: true,
                lost: vec![],
                stale: vec![],
            },
            VerifyCase {
                what: "an owed removal is being retried, not stale",
                desired: vec![],
                applied: vec![],
                listed: vec![stale.clone()],
                owed: vec![stale.clone()],
                cleanup: true,
                lost: vec![],
                stale: vec![],
            },
            VerifyCase {
                what: "applied but undesired is left to plan",
                desired: vec![],
                applied: vec![a.clone()],
                listed: vec![a.clone()],
                owed: vec![],
                cleanup: true,
                lost: vec![],
                stale: vec![],
            },
        ];
        for VerifyCase {
            what,
            desired,
            applied,
            listed,
            owed,
            cleanup,
            lost,
            stale: stale_ids,
        } in cases
        {
            let owed = Owed {
                due: ServiceSet::new(),
                waiting: set(&owed),
            };
            let v = verify(
                &set(&desired),
                &set(&applied),
                &owed,
                &listed,
                "h:",
                cleanup,
            );
            assert_eq!(v.lost, lost, "{what}");
            assert_eq!(ids(&v.stale), stale_ids, "{what}");
        }
    }

    #[test]
    fn adopts() {
        let a = svc("h:a:80", "a", 1);
        let mut a_ttl = a.clone();
        a_ttl.ttl = Some(Duration::from_secs(30));
        let mut a_tagged = a.clone();
        a_tagged.tags = vec!["t".into()];
        let mut a_meta = a.clone();
        a_meta.meta = [("k".to_string(), "v".to_string())].into();
        let mut a_tagged_meta = a_tagged.clone();
        a_tagged_meta.meta = a_meta.meta.clone();
        let mut a_checked = a.clone();
        a_checked.check = Some(switchboard::Check::new(switchboard::CheckKind::Tcp(
            "127.0.0.1:1".into(),
        )));
        let mut a_health = a.clone();
        a_health.docker_health = Some(switchboard::DockerHealth::Unhealthy);
        let a_moved = svc("h:a:80", "a", 9);
        let a_renamed = svc("h:a:80", "aa", 1);
        let gone = svc("h:gone:80", "g", 2);
        let other_host = svc("other:x:80", "x", 3);
        let custom = svc("custom-id", "c", 4);
        let consul = Listing::of("consul");
        let consulkv = Listing::of("consulkv");
        let etcd = Listing::of("etcd");
        /// One adoption at start: the store's listing, and the IDs adopted and removed as stale.
        struct AdoptCase<'a> {
            what: &'a str,
            listing: Listing,
            desired: Vec<Service>,
            listed: Vec<Service>,
            adopted: Vec<&'a str>,
            stale: Vec<&'a str>,
        }
        let cases = vec![
            AdoptCase {
                what: "empty store",
                listing: consul,
                desired: vec![a.clone()],
                listed: vec![],
                adopted: vec![],
                stale: vec![],
            },
            AdoptCase {
                what: "same: no write",
                listing: consul,
                desired: vec![a.clone()],
                listed: vec![a.clone()],
                adopted: vec!["h:a:80"],
                stale: vec![],
            },
            AdoptCase {
                what: "same in etcd",
                listing: etcd,
                desired: vec![a.clone()],
                listed: vec![a.clone()],
                adopted: vec!["h:a:80"],
                stale: vec![],
            },
            AdoptCase {
                what: "same in consulkv",
                listing: consulkv,
                desired: vec![a.clone()],
                listed: vec![a.clone()],
                adopted: vec!["h:a:80"],
                stale: vec![],
            },
            // Docker health may have changed unseen: written again (in place), never adopted
            // and never stale.
            AdoptCase {
                what: "docker health is written again",
                listing: consul,
                desired: vec![a_health.clone()],
                listed: vec![a.clone()],
                adopted: vec![],
                stale: vec![],
            },
            // Listings carry no checks or TTLs: compared on what they show.
            AdoptCase {
                what: "check not listed",
                listing: consul,
                desired: vec![a_checked],
                listed: vec![a.clone()],
                adopted: vec!["h:a:80"],
                stale: vec![],
            },
            AdoptCase {
                what: "consul TTL check is refreshed, not rewritten",
                listing: consul,
                desired: vec![a_ttl.clone()],
                listed: vec![a.clone()],
                adopted: vec!["h:a:80"],
                stale: vec![],
            },
            AdoptCase {
                what: "etcd TTL key moves to our lease",
                listing: etcd,
                desired: vec![a_ttl.clone()],
                listed: vec![a.clone()],
                adopted: vec![],
                stale: vec![],
            },
            AdoptCase {
                what: "consulkv has no TTL here",
                listing: consulkv,
                desired: vec![a_ttl],
                listed: vec![a.clone()],
                adopted: vec!["h:a:80"],
                stale: vec![],
            },
            AdoptCase {
                what: "moved port: rewritten in place",
                listing: consul,
                desired: vec![a_moved.clone()],
                listed: vec![a.clone()],
                adopted: vec![],
                stale: vec![],
            },
            AdoptCase {
                what: "tags changed",
                listing: consul,
                desired: vec![a_tagged.clone()],
                listed: vec![a.clone()],
                adopted: vec![],
                stale: vec![],
            },
            AdoptCase {
                what: "meta changed",
                listing: etcd,
                desired: vec![a_meta.clone()],
                listed: vec![a.clone()],
                adopted: vec![],
                stale: vec![],
            },
            AdoptCase {
                what: "consulkv shows no tags or meta",
                listing: consulkv,
                desired: vec![a_tagged_meta],
                listed: vec![a.clone()],
                adopted: vec!["h:a:80"],
                stale: vec![],
            },
            AdoptCase {
                what: "renamed: old key is stale",
                listing: etcd,
                desired: vec![a_renamed],
                listed: vec![a.clone()],
                adopted: vec![],
                stale: vec!["h:a:80"],
            },
            AdoptCase {
                what: "stopped while down: removed, other hosts and custom IDs untouched",
                listing: consul,
                desired: vec![a.clone()],
                listed: vec![a.clone(), gone.clone(), other_host, custom.clone()],
                adopted: vec!["h:a:80"],
                stale: vec!["h:gone:80"],
            },
            AdoptCase {
                what: "custom ID adopted",
                listing: consul,
                desired: vec![custom.clone()],
                listed: vec![custom],
                adopted: vec!["custom-id"],
                stale: vec![],
            },
            AdoptCase {
                what: "nothing running",
                listing: consul,
                desired: vec![],
                listed: vec![a, gone],
                adopted: vec![],
                stale: vec!["h:a:80", "h:gone:80"],
            },
        ];
        for AdoptCase {
            what,
            listing,
            desired,
            listed,
            adopted,
            stale,
        } in cases
        {
            let got = adopt(&set(&desired), &listed, "h:", listing);
            assert_eq!(ids(&got.adopted), adopted, "{what}: adopted");
            assert_eq!(ids(&got.stale), stale, "{what}: stale");
            // What is adopted is the desired service itself, so the next plan writes nothing.
            let applied = set(&got.adopted);
            let p = plan(
                &set(&desired),
                &applied,
                &ServiceSet::new(),
                &Owed::default(),
            );
            assert!(p.deregister.is_empty(), "{what}");
            assert_eq!(
                p.register.len(),
                desired.len() - got.adopted.len(),
                "{what}"
            );
        }
        assert_eq!(
            Listing::of("consulkv"),
            Listing {
                tags_meta: false,
                ttl_bound_to_writer: false
            }
        );
    }

    #[test]
    fn withdrawals_are_seen() {
        let a = svc("h:a:80", "a", 1);
        let b = svc("h:b:80", "b", 2);
        let a_moved = svc("h:a:80", "a", 3);
        let cases = [
            ("nothing applied", vec![], vec![a.clone()], false),
            (
                "an addition",
                vec![a.clone()],
                vec![a.clone(), b.clone()],
                false,
            ),
            ("a change in place", vec![a.clone()], vec![a_moved], false),
            (
                "a removal",
                vec![a.clone(), b.clone()],
                vec![b.clone()],
                true,
            ),
            ("everything", vec![a], vec![], true),
        ];
        for (what, applied, next, want) in cases {
            assert_eq!(withdraws(&set(&next), &set(&applied)), want, "{what}");
        }
    }

    #[test]
    fn arrivals_join_a_running_pass() {
        let a = svc("h:a:80", "a", 1);
        let b = svc("h:b:80", "b", 2);
        let c = svc("h:c:80", "c", 3);
        let a_moved = svc("h:a:80", "a", 4);
        let a_renamed = svc("h:a:80", "z", 1);
        let b_moved = svc("h:b:80", "b", 5);
        let c_moved = svc("h:c:80", "c", 6);
        struct ArrivalCase<'a> {
            what: &'a str,
            next: Vec<Service>,
            applied: Vec<Service>,
            scheduled: Vec<Service>,
            held: Vec<Service>,
            owed: Vec<Service>,
            want: Vec<&'a str>,
        }
        let cases = [
            ArrivalCase {
                what: "a new service",
                next: vec![a.clone(), c.clone()],
                applied: vec![a.clone()],
                scheduled: vec![],
                held: vec![],
                owed: vec![],
                want: vec!["h:c:80"],
            },
            ArrivalCase {
                what: "changed in place",
                next: vec![a_moved.clone()],
                applied: vec![a.clone()],
                scheduled: vec![],
                held: vec![],
                owed: vec![],
                want: vec!["h:a:80"],
            },
            ArrivalCase {
                what: "renamed: the next pass deregisters the old name first",
                next: vec![a_renamed.clone()],
                applied: vec![a.clone()],
                scheduled: vec![],
                held: vec![],
                owed: vec![],
                want: vec![],
            },
            ArrivalCase {
                what: "part of the pass already, even changed since",
                next: vec![b_moved],
                applied: vec![],
                scheduled: vec![b],
                held: vec![],
                owed: vec![],
                want: vec![],
            },
            ArrivalCase {
                what: "held back after a refusal",
                next: vec![c.clone()],
                applied: vec![],
                scheduled: vec![],
                held: vec![c.clone()],
                owed: vec![],
                want: vec![],
            },
            ArrivalCase {
                what: "held back, but changed since",
                next: vec![c_moved],
                applied: vec![],
                scheduled: vec![],
                held: vec![c],
                owed: vec![],
                want: vec!["h:c:80"],
            },
            ArrivalCase {
                what: "its old name's removal still owed",
                next: vec![a_renamed.clone()],
                applied: vec![],
                scheduled: vec![],
                held: vec![],
                owed: vec![a.clone()],
                want: vec![],
            },
            ArrivalCase {
                what: "owed under the same name: the container is back",
                next: vec![a_moved.clone()],
                applied: vec![],
                scheduled: vec![],
                held: vec![],
                owed: vec![a.clone()],
                want: vec!["h:a:80"],
            },
            ArrivalCase {
                what: "nothing new",
                next: vec![a.clone()],
                applied: vec![a],
                scheduled: vec![],
                held: vec![],
                owed: vec![],
                want: vec![],
            },
        ];
        for ArrivalCase {
            what,
            next,
            applied,
            scheduled,
            held,
            owed,
            want,
        } in cases
        {
            let owed = Owed {
                due: set(&owed),
                waiting: ServiceSet::new(),
            };
            let got = arrivals(
                &set(&next),
                &set(&applied),
                &set(&scheduled),
                &set(&held),
                &owed,
            );
            assert_eq!(ids(&got), want, "{what}");
        }
    }

    #[test]
    fn refused_items_are_held_back_then_retried() {
        let t0 = Instant::now();
        let mut r = Refusals::new(REFUSED_RETRY);
        let a = svc("h:a:80", "a", 1);
        let d1 = r.refuse(&a, t0);
        assert!(d1 >= Duration::from_secs(24), "{d1:?}");
        assert_eq!(
            ids(&r.held(t0).into_values().collect::<Vec<_>>()),
            vec!["h:a:80"]
        );
        assert_eq!(r.next_retry(t0), Some(t0 + d1));
        // A pass that started once it was due saw it: no wake for it again.
        assert_eq!(r.next_retry(t0 + d1), None);
        // Due again after its delay; the next refusal waits longer.
        assert!(r.held(t0 + d1).is_empty());
        let d2 = r.refuse(&a, t0 + d1);
        assert!(d2 > d1, "{d2:?} after {d1:?}");
        // Changed content starts over; a write or a removal forgets it.
        let a2 = svc("h:a:80", "a", 2);
        let d3 = r.refuse(&a2, t0);
        assert!(d3 < d2, "{d3:?}");
        r.clear("h:a:80");
        assert_eq!(r.next_retry(t0), None);
        r.refuse(&a, t0);
        r.forget(|s| !ServiceSet::new().contains_key(&s.id));
        assert!(r.held(t0).is_empty());
    }

    #[test]
    fn owed_removals_are_retried_fast_with_a_short_cap() {
        let t0 = Instant::now();
        let mut r = Refusals::new(OWED_RETRY);
        let a = svc("h:a:80", "a", 1);
        let mut delays = vec![];
        let mut now = t0;
        for _ in 0..12 {
            let d = r.refuse(&a, now);
            assert!(r.at(now).waiting.contains_key("h:a:80"));
            now += d;
            assert!(r.at(now).due.contains_key("h:a:80"), "due after {d:?}");
            delays.push(d);
        }
        // Jittered ±20 %: about 1 s first, doubling, never past 30 s, and at the cap late on.
        let secs: Vec<f64> = delays.iter().map(Duration::as_secs_f64).collect();
        assert!((0.8..=1.2).contains(&secs[0]), "{secs:?}");
        assert!((1.6..=2.4).contains(&secs[1]), "{secs:?}");
        assert!(secs.iter().all(|d| *d <= 30.0), "{secs:?}");
        assert!(secs[11] >= 24.0, "{secs:?}");
        // Twelve refusals take well under ten minutes: about one request per 30 s at most.
        assert!(now - t0 < Duration::from_secs(300), "{:?}", now - t0);
        assert_eq!(r.clear("h:a:80"), Some(12));
        assert_eq!(r.clear("h:a:80"), None);
    }

    /// The bookkeeping of one owed removal through the passes of the run loop: refused at the
    /// stop, held for its delay, tried again, and dropped when the container is back (its
    /// registration is then what the plan writes).
    #[test]
    fn owed_removal_bookkeeping() {
        let t0 = Instant::now();
        let a = svc("h:a:80", "a", 1);
        let a_back = svc("h:a:80", "a", 2);
        let b = svc("h:b:80", "b", 3);
        let none = ServiceSet::new();
        let mut applied = set(&[a.clone(), b.clone()]);
        let mut owed = Refusals::new(OWED_RETRY);

        // Stopped: the removal is planned, and refused.
        let desired = set(std::slice::from_ref(&b));
        let p = plan(&desired, &applied, &none, &owed.at(t0));
        assert_eq!(ids(&p.deregister), vec!["h:a:80"]);
        let d = owed.refuse(&a, t0);
        applied.remove("h:a:80");
        // Nothing to do while it waits; due again after its delay; still owed, not lost.
        let p = plan(&desired, &applied, &none, &owed.at(t0));
        assert_eq!(p, Plan::default());
        let p = plan(&desired, &applied, &none, &owed.at(t0 + d));
        assert_eq!(ids(&p.deregister), vec!["h:a:80"]);
        assert!(p.register.is_empty());
        let d2 = owed.refuse(&a, t0 + d);
        assert_eq!(owed.next_retry(t0 + d), Some(t0 + d + d2));

        // Another container's withdrawal joins it; the registration of a new one waits for
        // neither (they are removed first in the same pass).
        let c = svc("h:c:80", "c", 4);
        let desired = set(std::slice::from_ref(&c));
        let p = plan(&desired, &applied, &none, &owed.at(t0 + d + d2));
        assert_eq!(ids(&p.deregister), vec!["h:b:80", "h:a:80"]);
        assert_eq!(ids(&p.register), vec!["h:c:80"]);

        // Back (another port after `docker start`), before its next try: no longer owed, and
        // registered again over the old entry.
        let desired = set(std::slice::from_ref(&a_back));
        assert!(owed.forget(|s| backs(&desired, s)).iter().any(|s| s == &a));
        assert_eq!(owed.len(), 0);
        let p = plan(&desired, &none, &none, &owed.at(t0));
        assert!(p.deregister.is_empty());
        assert_eq!(p.register, vec![a_back]);

        // The store answers again after an outage: every owed removal is due at once, and a
        // refusal then goes on from the delay it had reached.
        let mut late = Refusals::new(OWED_RETRY);
        for _ in 0..6 {
            late.refuse(&b, t0);
        }
        assert!(late
            .at(t0 + Duration::from_secs(10))
            .waiting
            .contains_key("h:b:80"));
        late.hurry(t0 + Duration::from_secs(10));
        assert!(late
            .at(t0 + Duration::from_secs(10))
            .due
            .contains_key("h:b:80"));
        assert!(late.refuse(&b, t0) >= Duration::from_secs(24));

        // A landing removal is forgotten, with how often it had been refused.
        owed.refuse(&b, t0);
        owed.refuse(&b, t0);
        assert_eq!(owed.clear("h:b:80"), Some(2));
        assert_eq!(owed.next_retry(t0), None);
    }
}
