//! DNS names in instance addresses, treated as the proxies treat them.
//!
//! nginx and HAProxy resolve a `server` line's name once, when they load the config, with the
//! system resolver (`getaddrinfo`), and refuse the whole config when it does not resolve:
//! `nginx -t` fails with `host not found in upstream`, HAProxy's check fails (with no output
//! under `-q`). One such instance would freeze every template. So confd asks the same
//! resolver first, and an instance whose name does not resolve is left out of the snapshot
//! (refused, reason `unresolvable`) until it does:
//!
//! - IP literals are never looked up; a name that resolves stays a name in the config (the
//!   proxy resolves it at load, as the user expects).
//! - Each name is looked up off the aggregator loops, at most [`CONCURRENCY`] at once, each
//!   bounded by [`LOOKUP_TIMEOUT`]; answers are cached per name, and the last snapshot is
//!   admitted again when they land.
//! - Every name in use is looked up again every [`RECHECK`] (and an unresolvable one at once
//!   when one of its instances changes), so an unresolvable name comes in once DNS answers,
//!   and a name that stops resolving leaves before it breaks a check.
//! - A name not answered yet is left out until its answer lands; the very first snapshot of a
//!   run (a start, a SIGHUP) waits up to [`LOOKUP_TIMEOUT`] for those answers instead, so it
//!   never renders a config without them.
//!
//! [`State`] is the pure part (what is known, what is due, what a snapshot becomes); [`run`]
//! is the thin task that performs lookups and re-admits.

use super::Publisher;
use crate::model::{Instance, Snapshot};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use switchboard::Shutdown;
use tokio::sync::{mpsc, Notify, Semaphore};

/// Longest a lookup may take (waiting for a free slot included) before the name counts as
/// unresolvable until its next try. Also how long the first snapshot waits for answers.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often each name in use is looked up again, resolvable or not.
pub const RECHECK: Duration = Duration::from_secs(10);
/// Lookups running at once: `getaddrinfo` blocks a thread each, and a resolver that hangs
/// must not take more than these.
pub const CONCURRENCY: usize = 8;

/// Whether `address` (already an IP address or DNS name) is a name to look up.
pub fn is_name(address: &str) -> bool {
    address.parse::<IpAddr>().is_err()
}

/// What is known of one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Never answered yet.
    Pending,
    /// The last lookup found an address.
    Resolves,
    /// The last lookup found none; why, as the resolver put it.
    Unresolvable(String),
}

/// One name in use.
#[derive(Debug, Clone)]
struct Name {
    verdict: Verdict,
    /// When it is to be looked up next; `None` while a lookup is running.
    due: Option<Instant>,
}

/// The names the current snapshot uses and what is known of each.
#[derive(Debug, Default)]
pub struct Names {
    names: HashMap<String, Name>,
    /// Each instance with a name (service, ID) and a hash of its content, to notice changes.
    instances: HashMap<(String, String), u64>,
}

impl Names {
    /// Follows the names `instances` use (IP literals are skipped): a new name is due now, a
    /// name no longer used is forgotten, and an unresolvable name is due now again when one of
    /// its instances is new or changed (whoever changed it may have fixed it).
    pub fn track<'a>(
        &mut self,
        instances: impl IntoIterator<Item = &'a Arc<Instance>>,
        now: Instant,
    ) {
        let mut named = HashMap::with_capacity(self.instances.len());
        let mut used = HashSet::new();
        for i in instances.into_iter().filter(|i| is_name(&i.address)) {
            let key = (i.name.clone(), i.id.clone());
            let version = super::hash_of(&**i);
            let changed = self.instances.get(&key) != Some(&version);
            named.insert(key, version);
            used.insert(i.address.as_str());
            match self.names.get_mut(&i.address) {
                None => {
                    self.names.insert(
                        i.address.clone(),
                        Name {
                            verdict: Verdict::Pending,
                            due: Some(now),
                        },
                    );
                }
                Some(n) => {
                    if changed && matches!(n.verdict, Verdict::Unresolvable(_)) && n.due.is_some() {
                        n.due = Some(now);
                    }
                }
            }
        }
        self.names.retain(|k, _| used.contains(k.as_str()));
        self.instances = named;
    }

    /// The names due at `now`, marked as being looked up.
    pub fn take_due(&mut self, now: Instant) -> Vec<String> {
        let mut due = Vec::new();
        for (k, n) in &mut self.names {
            if n.due.is_some_and(|d| d <= now) {
                n.due = None;
                due.push(k.clone());
            }
        }
        due
    }

    /// Records a lookup's answer (`Err` with why it did not resolve); the name is due again
    /// [`RECHECK`] later. An answer about a name no longer used is dropped.
    pub fn answered(&mut self, name: &str, answer: Result<(), String>, now: Instant) {
        if let Some(n) = self.names.get_mut(name) {
            n.verdict = match answer {
                Ok(()) => Verdict::Resolves,
                Err(why) => Verdict::Unresolvable(why),
            };
            n.due = Some(now + RECHECK);
        }
    }

    /// When the next lookup is due, if any is waiting.
    pub fn next_due(&self) -> Option<Instant> {
        self.names.values().filter_map(|n| n.due).min()
    }

    /// What is known of `name` (`Pending` for a name not tracked).
    pub fn verdict(&self, name: &str) -> &Verdict {
        self.names
            .get(name)
            .map(|n| &n.verdict)
            .unwrap_or(&Verdict::Pending)
    }
}

/// What a snapshot becomes once its names are checked.
#[derive(Debug, Default)]
pub struct Admission {
    /// What to publish, `None` to publish nothing (yet).
    pub snapshot: Option<Snapshot>,
    /// Instances left out because their name does not resolve, with why.
    pub refused: Vec<(Arc<Instance>, String)>,
    /// Instances with a name that resolves (kept).
    pub resolved: Vec<Arc<Instance>>,
}

/// `raw` without the instances whose name does not resolve or is not answered yet; also
/// returns how many were not answered yet. A service left with no instance is left out, as
/// sources leave out a service with none.
pub fn filter(raw: &Snapshot, names: &Names) -> (Admission, usize) {
    let mut a = Admission::default();
    let mut pending = 0;
    let mut services = std::collections::BTreeMap::new();
    for (service, instances) in &raw.services {
        let mut kept = Vec::with_capacity(instances.len());
        for i in instances {
            if !is_name(&i.address) {
                kept.push(i.clone());
                continue;
            }
            match names.verdict(&i.address) {
                Verdict::Resolves => {
                    a.resolved.push(i.clone());
                    kept.push(i.clone());
                }
                Verdict::Unresolvable(why) => {
                    let why = format!(
                        "address {:?} does not resolve ({why}); trying again every {}s",
                        switchboard::excerpt(&i.address),
                        RECHECK.as_secs()
                    );
                    a.refused.push((i.clone(), why));
                }
                Verdict::Pending => pending += 1,
            }
        }
        if !kept.is_empty() {
            services.insert(service.clone(), kept);
        }
    }
    a.snapshot = Some(Snapshot {
        services,
        kv: raw.kv.clone(),
    });
    (a, pending)
}

/// Where a run's publications stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Phase {
    /// Nothing published or held yet.
    #[default]
    Starting,
    /// Waiting for answers to publish the first snapshot, since this instant.
    Holding(Instant),
    /// Published at least once: a name not answered yet is left out instead.
    Live,
}

/// Everything behind the publisher's resolver lock.
#[derive(Debug, Default)]
pub struct State {
    /// The names in use.
    pub names: Names,
    /// The last snapshot from the store, when it uses names: what landing answers re-admit.
    raw: Option<Snapshot>,
    phase: Phase,
}

impl State {
    /// Admits `fresh` (a new snapshot from the store), or the last one again (`None`: answers
    /// landed, a hold ended), given what is known of its names at `now`.
    pub fn admit(&mut self, fresh: Option<Snapshot>, now: Instant) -> Admission {
        if let Some(s) = fresh {
            self.names.track(s.services.values().flatten(), now);
            if self.names.names.is_empty() {
                // No name at all (the usual case): published as it is.
                self.raw = None;
                self.phase = Phase::Live;
                return Admission {
                    snapshot: Some(s),
                    ..Admission::default()
                };
            }
            self.raw = Some(s);
        }
        let Some(raw) = &self.raw else {
            return Admission::default();
        };
        let (mut a, pending) = filter(raw, &self.names);
        let hold_since = match self.phase {
            Phase::Starting => Some(now),
            Phase::Holding(since) => Some(since),
            Phase::Live => None,
        };
        match hold_since {
            Some(since) if pending > 0 && now < since + LOOKUP_TIMEOUT => {
                self.phase = Phase::Holding(since);
                a.snapshot = None;
            }
            _ => self.phase = Phase::Live,
        }
        a
    }

    /// When the lookup task must wake next: a lookup due, or a hold ending.
    pub fn next_wake(&self) -> Option<Instant> {
        let hold_end = match self.phase {
            Phase::Holding(since) => Some(since + LOOKUP_TIMEOUT),
            Phase::Starting | Phase::Live => None,
        };
        [self.names.next_due(), hold_end]
            .into_iter()
            .flatten()
            .min()
    }
}

/// The resolver state a [`Publisher`] shares with its lookup task.
#[derive(Default)]
pub struct Resolver {
    state: Mutex<State>,
    /// Tells the lookup task that names may be due.
    wake: Notify,
}

impl Resolver {
    /// The state.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("resolver lock")
    }

    /// Wakes the lookup task.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// Looks up the names `publisher`'s snapshots use whenever they are due, and admits the last
/// snapshot again when answers land or a hold ends; until `shutdown`.
pub async fn run(publisher: Publisher, shutdown: Shutdown) {
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, Result<(), String>)>();
    loop {
        let (due, next) = {
            let mut st = publisher.resolver.lock();
            let due = st.names.take_due(Instant::now());
            (due, st.next_wake())
        };
        for name in due {
            let (tx, permits) = (tx.clone(), permits.clone());
            tokio::spawn(async move {
                let answer = lookup(name.clone(), permits).await;
                let _ = tx.send((name, answer));
            });
        }
        let timer = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = publisher.resolver.wake.notified() => {}
            Some(first) = rx.recv() => {
                let now = Instant::now();
                let mut st = publisher.resolver.lock();
                let mut answer = Some(first);
                while let Some((name, r)) = answer {
                    if let Err(why) = &r {
                        tracing::debug!(name, why, "name does not resolve");
                    }
                    st.names.answered(&name, r, now);
                    answer = rx.try_recv().ok();
                }
                drop(st);
                publisher.readmit();
            }
            _ = timer => publisher.readmit(),
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Resolves `name` with the system resolver (`getaddrinfo`, what nginx and HAProxy use at
/// load): `Ok` when it finds an address. The blocking call holds one of `permits` until it
/// returns, even past the timeout, so a hanging resolver never ties up more than
/// [`CONCURRENCY`] threads.
async fn lookup(name: String, permits: Arc<Semaphore>) -> Result<(), String> {
    let work = async move {
        let permit = permits.acquire_owned().await.map_err(|e| e.to_string())?;
        let found = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            (name.as_str(), 0u16)
                .to_socket_addrs()
                .map(|mut addrs| addrs.next().is_some())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        if found {
            Ok(())
        } else {
            Err("no address".to_string())
        }
    };
    match tokio::time::timeout(LOOKUP_TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {}s", LOOKUP_TIMEOUT.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::inst;
    use std::collections::BTreeMap;

    fn snap(v: &[(&str, &str, &str)]) -> Snapshot {
        Snapshot::build(
            v.iter().map(|(n, id, a)| inst(n, id, a, 80)),
            BTreeMap::new(),
            &[],
        )
    }

    fn ids(s: &Snapshot) -> Vec<String> {
        s.services
            .values()
            .flatten()
            .map(|i| i.id.clone())
            .collect()
    }

    #[test]
    fn only_names_are_looked_up() {
        for (a, name) in [
            ("10.0.0.1", false),
            ("fd00::1", false),
            ("::1", false),
            ("db.local", true),
            ("localhost", true),
            ("1.2.3", true),
        ] {
            assert_eq!(is_name(a), name, "{a}");
        }
    }

    #[test]
    fn names_are_due_when_new_on_the_timer_and_when_an_instance_changes() {
        let t0 = Instant::now();
        let s = snap(&[("web", "a", "db.local"), ("web", "b", "10.0.0.1")]);
        let mut n = Names::default();
        n.track(s.services.values().flatten(), t0);
        assert_eq!(n.verdict("db.local"), &Verdict::Pending);
        assert_eq!(n.next_due(), Some(t0));
        assert_eq!(n.take_due(t0), ["db.local"]);
        assert_eq!(
            n.take_due(t0),
            Vec::<String>::new(),
            "in flight: not due twice"
        );
        assert_eq!(n.next_due(), None);
        n.answered("db.local", Err("not found".into()), t0);
        assert_eq!(n.next_due(), Some(t0 + RECHECK), "retried on the timer");
        assert!(n.take_due(t0 + RECHECK / 2).is_empty());

        // The same instance again: still not due before the timer.
        n.track(s.services.values().flatten(), t0);
        assert!(n.take_due(t0 + Duration::from_secs(1)).is_empty());
        // The instance changed (its tags): due at once.
        let mut changed = inst("web", "a", "db.local", 80);
        changed.tags = vec!["v2".into()];
        let t1 = t0 + Duration::from_secs(1);
        n.track([&Arc::new(changed.clone())], t1);
        assert_eq!(n.take_due(t1), ["db.local"]);
        n.answered("db.local", Ok(()), t1);
        assert_eq!(n.verdict("db.local"), &Verdict::Resolves);
        // A resolving name is re-checked on the timer, not on every change.
        changed.tags = vec!["v3".into()];
        n.track([&Arc::new(changed)], t1);
        assert!(n.take_due(t1).is_empty());
        assert_eq!(n.take_due(t1 + RECHECK), ["db.local"]);
        // A name no longer used is forgotten, and a late answer about it dropped.
        n.track([], t1);
        n.answered("db.local", Ok(()), t1);
        assert_eq!(n.verdict("db.local"), &Verdict::Pending);
        assert_eq!(n.next_due(), None);
    }

    #[test]
    fn unresolvable_and_pending_names_are_left_out() {
        let raw = snap(&[
            ("web", "ip", "10.0.0.1"),
            ("web", "good", "good.local"),
            ("web", "bad", "bad.invalid"),
            ("db", "wait", "new.local"),
        ]);
        let t0 = Instant::now();
        let mut n = Names::default();
        n.track(raw.services.values().flatten(), t0);
        n.answered("good.local", Ok(()), t0);
        n.answered("bad.invalid", Err("Name or service not known".into()), t0);
        let (a, pending) = filter(&raw, &n);
        let s = a.snapshot.unwrap();
        assert_eq!(ids(&s), ["good", "ip"]);
        assert!(
            !s.services.contains_key("db"),
            "a service left empty is left out"
        );
        assert_eq!(pending, 1);
        assert_eq!(a.refused.len(), 1);
        assert_eq!(a.refused[0].0.id, "bad");
        assert!(
            a.refused[0].1.contains("\"bad.invalid\" does not resolve"),
            "{}",
            a.refused[0].1
        );
        assert!(
            a.refused[0].1.contains("Name or service not known"),
            "{}",
            a.refused[0].1
        );
        assert_eq!(a.resolved.len(), 1);
    }

    #[test]
    fn the_first_snapshot_waits_for_answers_a_bounded_time() {
        let t0 = Instant::now();
        let with_name = || snap(&[("web", "ip", "10.0.0.1"), ("web", "n", "n.local")]);
        // (what, answer before re-admitting, re-admitted at, published IDs or None)
        type Case = (
            &'static str,
            Option<Result<(), String>>,
            Duration,
            Option<Vec<&'static str>>,
        );
        let table: Vec<Case> = vec![
            ("no answer yet: held", None, Duration::from_secs(1), None),
            (
                "no answer by the timeout: published without it",
                None,
                LOOKUP_TIMEOUT,
                Some(vec!["ip"]),
            ),
            (
                "resolves",
                Some(Ok(())),
                Duration::from_secs(1),
                Some(vec!["ip", "n"]),
            ),
            (
                "does not resolve",
                Some(Err("nx".into())),
                Duration::from_secs(1),
                Some(vec!["ip"]),
            ),
        ];
        for (what, answer, at, want) in table {
            let mut st = State::default();
            assert!(
                st.admit(Some(with_name()), t0).snapshot.is_none(),
                "{what}: held"
            );
            assert_eq!(st.next_wake(), Some(t0), "{what}: the lookup is due");
            assert_eq!(st.names.take_due(t0), ["n.local"]);
            assert_eq!(
                st.next_wake(),
                Some(t0 + LOOKUP_TIMEOUT),
                "{what}: the hold's end"
            );
            if let Some(r) = answer {
                st.names.answered("n.local", r, t0 + at);
            }
            let got = st.admit(None, t0 + at).snapshot.map(|s| ids(&s));
            let want = want.map(|v| v.into_iter().map(String::from).collect::<Vec<_>>());
            assert_eq!(got, want, "{what}");
        }

        // Once live, a new name does not hold the others back.
        let mut st = State::default();
        assert!(st
            .admit(Some(snap(&[("web", "ip", "10.0.0.1")])), t0)
            .snapshot
            .is_some());
        let s = st.admit(Some(with_name()), t0).snapshot.unwrap();
        assert_eq!(ids(&s), ["ip"]);
        // And with no name at all, a snapshot is published as it is.
        let mut st = State::default();
        let plain = snap(&[("web", "ip", "10.0.0.1")]);
        assert_eq!(st.admit(Some(plain.clone()), t0).snapshot, Some(plain));
        assert_eq!(st.next_wake(), None);
        assert!(st.admit(None, t0).snapshot.is_none(), "nothing to re-admit");
    }

    #[tokio::test]
    async fn lookups_use_the_system_resolver() {
        let permits = Arc::new(Semaphore::new(CONCURRENCY));
        assert_eq!(lookup("localhost".into(), permits.clone()).await, Ok(()));
        let e = lookup("no-such-host.invalid".into(), permits.clone())
            .await
            .unwrap_err();
        assert!(!e.is_empty());
        assert_eq!(
            permits.available_permits(),
            CONCURRENCY,
            "permits come back"
        );
    }
}
