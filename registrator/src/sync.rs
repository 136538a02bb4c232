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
//! The decisions are the pure functions [`plan`] and [`verify`]; [`Syncer::run`] only applies
//! them.

use std::collections::BTreeMap;
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

/// Decides what to write. `rejected` holds services the store refused as invalid: they are not
/// retried until their content changes.
pub fn plan(desired: &ServiceSet, applied: &ServiceSet, rejected: &ServiceSet) -> Plan {
    let mut p = Plan::default();
    for (id, old) in applied {
        match desired.get(id) {
            None => p.deregister.push(old.clone()),
            Some(new) if new.name != old.name => p.deregister.push(old.clone()),
            Some(_) => {}
        }
    }
    for (id, svc) in desired {
        if applied.get(id) != Some(svc) && rejected.get(id) != Some(svc) {
            p.register.push(svc.clone());
        }
    }
    p
}

/// What a listing of the store reveals.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// IDs we believe registered that the store lacks (or holds differently): forget them, so
    /// the next plan writes them again.
    pub lost: Vec<String>,
    /// This host's registrations that nothing backs (only filled with `cleanup`).
    pub stale: Vec<Service>,
}

/// Compares a store listing with our bookkeeping. Only `id`, `name`, `address` and `port` of
/// listed entries are compared, as that is all every store returns. `stale` only ever holds
/// IDs starting with `host_prefix` (`<hostname>:`), so `-cleanup` never touches another host's
/// registrations.
pub fn verify(
    desired: &ServiceSet,
    applied: &ServiceSet,
    listed: &[Service],
    host_prefix: &str,
    cleanup: bool,
) -> Verdict {
    let mut v = Verdict::default();
    for (id, svc) in applied {
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
            {
                v.stale.push(l.clone());
            }
        }
    }
    v
}

/// A failure the store will repeat for this service whatever we do (HTTP 4xx, other than the
/// "expired" case): skip it rather than stall every other registration behind it.
fn is_rejection(e: &StoreError) -> bool {
    matches!(e, StoreError::Status { status, .. } if (400..500).contains(status))
}

/// The syncer's settings.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// `<hostname>:`, the ID prefix of this host's registrations.
    pub host_prefix: String,
    /// `-cleanup`.
    pub cleanup: bool,
    /// `--keep-on-exit`.
    pub keep_on_exit: bool,
    /// How often the store is listed.
    pub verify_interval: Duration,
    /// How often TTL registrations are refreshed (`None`: no TTL).
    pub ttl_refresh: Option<Duration>,
}

/// The loop that applies [`plan`] and [`verify`] to a store.
pub struct Syncer {
    store: Store,
    opts: SyncOptions,
    applied: ServiceSet,
    rejected: ServiceSet,
}

/// Bounds the deregistrations on shutdown, so a dead store cannot hold the process.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

impl Syncer {
    /// A syncer with nothing applied yet.
    pub fn new(store: Store, opts: SyncOptions) -> Self {
        Syncer {
            store,
            opts,
            applied: ServiceSet::new(),
            rejected: ServiceSet::new(),
        }
    }

    /// Runs until `shutdown`, then deregisters everything it registered (unless
    /// `keep_on_exit`) and returns.
    pub async fn run(mut self, mut desired_rx: watch::Receiver<Desired>, shutdown: Shutdown) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        let mut outage: Option<String> = None;
        let mut retry_at: Option<Instant> = None;
        let (mut need_verify, mut need_reconcile, mut need_refresh) = (true, true, false);
        let mut verify_tick = tokio::time::interval(self.opts.verify_interval);
        verify_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let refresh_every = self.opts.ttl_refresh.unwrap_or(Duration::from_secs(3600));
        let mut refresh_tick = tokio::time::interval(refresh_every);
        refresh_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut desired: Option<Arc<ServiceSet>> = None;
        loop {
            if desired.is_none() {
                desired = desired_rx.borrow_and_update().clone();
            }
            if let Some(want) = desired.clone() {
                if retry_at.is_none() {
                    let step = self
                        .step(
                            &want,
                            &mut need_verify,
                            &mut need_reconcile,
                            &mut need_refresh,
                        )
                        .await;
                    match step {
                        Ok(()) => {
                            if let Some(e) = outage.take() {
                                info!(
                                    store = self.store.kind(),
                                    "store reachable again (was: {e})"
                                );
                            }
                            backoff.reset();
                        }
                        Err(e) => {
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
                            need_verify = true;
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
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = desired_rx.changed() => {
                    if r.is_err() {
                        // The Docker side is gone: only happens on shutdown.
                        shutdown.cancelled().await;
                        break;
                    }
                    desired = desired_rx.borrow_and_update().clone();
                    need_reconcile = true;
                }
                _ = retry => retry_at = None,
                _ = verify_tick.tick() => need_verify = true,
                _ = refresh_tick.tick(), if self.opts.ttl_refresh.is_some() => need_refresh = true,
            }
        }
        self.drain(desired.as_deref()).await;
    }

    /// One pass: verify (if due), reconcile (if due), refresh (if due). Flags are cleared as
    /// each part succeeds, so a failure resumes where it stopped.
    async fn step(
        &mut self,
        desired: &ServiceSet,
        need_verify: &mut bool,
        need_reconcile: &mut bool,
        need_refresh: &mut bool,
    ) -> Result<(), StoreError> {
        // An expired TTL lease/check means the store dropped our registrations: write them
        // again and refresh once more. A second expiry in the same pass is an outage.
        let mut expiries = 0;
        loop {
            if *need_verify {
                // List everything: services with a custom SERVICE_ID lack the host prefix.
                let listed = self.store.list("").await?;
                let v = verify(
                    desired,
                    &self.applied,
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
                for svc in &v.stale {
                    self.store.deregister(svc).await?;
                    info!(
                        "deregistered {} {} {} (cleanup)",
                        svc.id,
                        svc.name,
                        svc.addr()
                    );
                }
                *need_verify = false;
                *need_reconcile = true;
            }
            if *need_reconcile {
                let registered = self.reconcile(desired).await?;
                *need_reconcile = false;
                if registered && self.opts.ttl_refresh.is_some() {
                    // Pass fresh TTL checks at once rather than leaving them critical until
                    // the next tick.
                    *need_refresh = true;
                }
            }
            if !*need_refresh {
                return Ok(());
            }
            let services: Vec<Service> = self.applied.values().cloned().collect();
            match self.store.refresh(&services).await {
                Ok(()) => {
                    *need_refresh = false;
                    return Ok(());
                }
                Err(StoreError::Expired { what }) if expiries == 0 => {
                    info!("{what} expired in the store; registering everything again");
                    expiries += 1;
                    self.applied.clear();
                    *need_reconcile = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Applies [`plan`]; returns whether anything was registered.
    async fn reconcile(&mut self, desired: &ServiceSet) -> Result<bool, StoreError> {
        let p = plan(desired, &self.applied, &self.rejected);
        self.rejected.retain(|id, _| desired.contains_key(id));
        for svc in &p.deregister {
            match self.store.deregister(svc).await {
                Ok(()) => info!("deregistered {} {} {}", svc.id, svc.name, svc.addr()),
                Err(e) if is_rejection(&e) => warn!("cannot deregister {}: {e}", svc.id),
                Err(e) => return Err(e),
            }
            self.applied.remove(&svc.id);
        }
        for svc in &p.register {
            match self.store.register(svc).await {
                Ok(()) => {
                    info!("registered {} {} {}", svc.id, svc.name, svc.addr());
                    self.rejected.remove(&svc.id);
                    self.applied.insert(svc.id.clone(), svc.clone());
                }
                Err(e) if is_rejection(&e) => {
                    warn!("store refused {} {} {}: {e}", svc.id, svc.name, svc.addr());
                    self.applied.remove(&svc.id);
                    self.rejected.insert(svc.id.clone(), svc.clone());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(!p.register.is_empty())
    }

    /// Deregisters what we registered, plus anything desired (a write interrupted by shutdown
    /// may have reached the store without being recorded), within [`DRAIN_TIMEOUT`].
    async fn drain(mut self, desired: Option<&ServiceSet>) {
        if self.opts.keep_on_exit {
            info!(
                "leaving {} registrations in place (--keep-on-exit)",
                self.applied.len()
            );
            return;
        }
        let mut extra: Vec<Service> = desired
            .map(|d| {
                d.values()
                    .filter(|s| !self.applied.contains_key(&s.id))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let applied = std::mem::take(&mut self.applied);
        let store = self.store.clone();
        let work = async move {
            for svc in applied.values() {
                match store.deregister(svc).await {
                    Ok(()) => info!("deregistered {} {} {}", svc.id, svc.name, svc.addr()),
                    Err(e) => warn!("cannot deregister {} on exit: {e}", svc.id),
                }
            }
            for svc in extra.drain(..) {
                let _ = store.deregister(&svc).await;
            }
        };
        if tokio::time::timeout(DRAIN_TIMEOUT, work).await.is_err() {
            warn!("gave up deregistering after {DRAIN_TIMEOUT:?}: the store does not answer");
        }
    }
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
        let mut a_tagged = a.clone();
        a_tagged.tags = vec!["t".into()];
        type Case<'a> = (
            &'a str,
            Vec<Service>,
            Vec<Service>,
            Vec<Service>,
            Vec<&'a str>,
            Vec<&'a str>,
        );
        let cases: Vec<Case> = vec![
            ("nothing", vec![], vec![], vec![], vec![], vec![]),
            (
                "new",
                vec![a.clone()],
                vec![],
                vec![],
                vec![],
                vec!["h:a:80"],
            ),
            (
                "same",
                vec![a.clone()],
                vec![a.clone()],
                vec![],
                vec![],
                vec![],
            ),
            (
                "gone",
                vec![],
                vec![a.clone()],
                vec![],
                vec!["h:a:80"],
                vec![],
            ),
            (
                "port changed",
                vec![b_moved.clone()],
                vec![b.clone()],
                vec![],
                vec![],
                vec!["h:b:80"],
            ),
            (
                "tags changed",
                vec![a_tagged.clone()],
                vec![a.clone()],
                vec![],
                vec![],
                vec!["h:a:80"],
            ),
            (
                "renamed",
                vec![b_renamed.clone()],
                vec![b.clone()],
                vec![],
                vec!["h:b:80"],
                vec!["h:b:80"],
            ),
            (
                "rejected unchanged",
                vec![a.clone()],
                vec![],
                vec![a.clone()],
                vec![],
                vec![],
            ),
            (
                "rejected changed",
                vec![a_tagged.clone()],
                vec![],
                vec![a.clone()],
                vec![],
                vec!["h:a:80"],
            ),
            (
                "mixed",
                vec![a.clone()],
                vec![b.clone()],
                vec![],
                vec!["h:b:80"],
                vec!["h:a:80"],
            ),
        ];
        for (what, desired, applied, rejected, dereg, reg) in cases {
            let p = plan(&set(&desired), &set(&applied), &set(&rejected));
            assert_eq!(ids(&p.deregister), dereg, "{what}");
            assert_eq!(ids(&p.register), reg, "{what}");
        }
        // A renamed service's old registration (old name: its etcd key) is the one removed.
        let p = plan(&set(&[b_renamed]), &set(&[b]), &ServiceSet::new());
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
        type Case<'a> = (
            &'a str,
            Vec<Service>,
            Vec<Service>,
            Vec<Service>,
            bool,
            Vec<&'a str>,
            Vec<&'a str>,
        );
        let cases: Vec<Case> = vec![
            (
                "all there",
                vec![a.clone()],
                vec![a.clone()],
                vec![a.clone(), other_host.clone()],
                true,
                vec![],
                vec![],
            ),
            (
                "lost",
                vec![a.clone(), b.clone()],
                vec![a.clone(), b.clone()],
                vec![b.clone()],
                false,
                vec!["h:a:80"],
                vec![],
            ),
            (
                "lost custom id",
                vec![custom.clone()],
                vec![custom.clone()],
                vec![],
                false,
                vec!["custom-id"],
                vec![],
            ),
            (
                "changed behind our back",
                vec![a.clone()],
                vec![a.clone()],
                vec![a_elsewhere],
                false,
                vec!["h:a:80"],
                vec![],
            ),
            (
                "stale without cleanup",
                vec![],
                vec![],
                vec![stale.clone()],
                false,
                vec![],
                vec![],
            ),
            (
                "stale with cleanup, other host untouched",
                vec![a.clone()],
                vec![a.clone()],
                vec![a.clone(), stale.clone(), other_host.clone()],
                true,
                vec![],
                vec!["h:old:80"],
            ),
            (
                "desired but not yet applied is not stale",
                vec![b.clone()],
                vec![],
                vec![b.clone()],
                true,
                vec![],
                vec![],
            ),
            (
                "applied but undesired is left to plan",
                vec![],
                vec![a.clone()],
                vec![a.clone()],
                true,
                vec![],
                vec![],
            ),
        ];
        for (what, desired, applied, listed, cleanup, lost, stale_ids) in cases {
            let v = verify(&set(&desired), &set(&applied), &listed, "h:", cleanup);
            assert_eq!(v.lost, lost, "{what}");
            assert_eq!(ids(&v.stale), stale_ids, "{what}");
        }
    }

    #[test]
    fn rejections_are_client_errors_only() {
        let status = |status| StoreError::Status {
            endpoint: "e".into(),
            what: "w".into(),
            status,
            body: "b".into(),
        };
        assert!(is_rejection(&status(400)));
        assert!(!is_rejection(&status(500)));
        assert!(!is_rejection(&StoreError::Unreachable {
            endpoint: "e".into(),
            reason: "r".into()
        }));
    }
}
