//! Automatic HTTPS: a certificate for every virtual host of the snapshot, obtained from an
//! ACME server and kept in the store, shared by every confd on the same prefix.
//!
//! One module per concern: [`config`] (the `acme:` section), [`storage`] (the store layout
//! and sealed keys), [`account`] (the shared account), [`order`] (one certificate for one
//! host), [`challenge`] (the HTTP-01 responder). This module is the loop: it reads each host's
//! stored certificate, and for those missing or due for renewal takes the store's lock, makes
//! sure no other confd has stored one meanwhile, orders, stores, releases. Whoever holds the
//! lock orders; the others wait and then find the certificate stored. A failure affects only
//! its host, which backs off on its own.
//!
//! What it publishes ([`Certificates`]) is for the code that feeds proxies.

pub mod account;
pub mod challenge;
pub mod config;
pub mod order;
pub mod storage;

pub use config::{AcmeConfig, AcmeFile};
pub use storage::Certificate;

use crate::metrics::{Host, Telemetry};
use crate::model::Snapshot;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use storage::{cert_key, Sealer, LOCK};
use switchboard::store::KvStore;
use switchboard::{Backoff, Shutdown};
use tokio::sync::watch;

/// The current certificate of each host that has one, by host name.
pub type Certificates = Arc<BTreeMap<String, Arc<Certificate>>>;

/// How often stored certificates are read again, to pick up what other confds stored.
const REREAD: Duration = Duration::from_secs(10);

/// The hosts to keep certificates for, and warnings for those that cannot have one over
/// HTTP-01 (pure).
pub fn hosts(snapshot: &Snapshot) -> (BTreeSet<String>, Vec<String>) {
    let mut hosts = BTreeSet::new();
    let mut warnings = Vec::new();
    for inst in snapshot.services.values().flatten() {
        let Some(v) = inst.vhost() else { continue };
        if let Some(rest) = v.strip_prefix("*.") {
            if crate::names::is_dns_name(rest) {
                warnings.push(format!(
                    "{v}: HTTP-01 cannot validate a wildcard: expected a certificate from files or the store"
                ));
            }
            continue;
        }
        if crate::names::is_dns_name(&v) {
            hosts.insert(v);
        }
    }
    warnings.sort();
    warnings.dedup();
    (hosts, warnings)
}

/// The ACME part of a running confd for one configuration and one store source: the
/// challenge listener and the loop. A reload that changes the `acme:` section or replaces the
/// source stops it as a whole and starts another, so it always follows the current
/// snapshots, store and settings; the certificates channel outlives it.
#[derive(Debug)]
pub struct Running {
    cfg: AcmeConfig,
    stop: Shutdown,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Binds the challenge listener (the error names `acme.challenge_addr`) and starts the
    /// loop on `snapshots`, with the store at `backend` reached with `settings`.
    pub async fn start(
        cfg: AcmeConfig,
        backend: &switchboard::RegistryUri,
        settings: &switchboard::store::StoreSettings,
        snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
        telemetry: &Telemetry,
        out: watch::Sender<Certificates>,
        shutdown: &Shutdown,
    ) -> Result<Running, String> {
        let store = KvStore::with_settings(backend, &cfg.prefix, settings)
            .map_err(|e| format!("acme: {e}"))?;
        let listener = challenge::bind(cfg.challenge_addr).await?;
        if let Ok(a) = listener.local_addr() {
            tracing::info!("answering ACME challenges on {a}");
        }
        let stop = shutdown.child_token();
        let tasks = vec![
            tokio::spawn(challenge::serve(listener, store.clone(), stop.clone())),
            tokio::spawn(run(
                cfg.clone(),
                store,
                snapshots,
                telemetry.clone(),
                out,
                stop.clone(),
            )),
        ];
        Ok(Running { cfg, stop, tasks })
    }

    /// Whether it runs with these settings.
    pub fn runs(&self, cfg: &AcmeConfig) -> bool {
        self.cfg == *cfg
    }

    /// Stops both tasks and waits for them: the listener is closed and the lock, if held,
    /// released (dropped) before this returns.
    pub async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Per-host retry state.
struct Retry {
    backoff: Backoff,
    next: Instant,
}

/// Keeps a certificate for every host of the latest snapshot until `shutdown`, publishing
/// them on `out`.
pub async fn run(
    cfg: AcmeConfig,
    store: KvStore,
    mut snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    telemetry: Telemetry,
    out: watch::Sender<Certificates>,
    shutdown: Shutdown,
) {
    let sealer = match &cfg.key_file {
        Some(p) => match Sealer::from_file(p) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("{e}");
                return;
            }
        },
        None => Sealer::none(),
    };
    let holder = format!("confd pid {} on {}", std::process::id(), hostname());
    let mut retries: HashMap<String, Retry> = HashMap::new();
    let mut warned = BTreeSet::new();
    // The hosts the expiry gauge shows, so that a host gone from the snapshot leaves it.
    let mut shown = BTreeSet::new();
    let mut snapshots_open = true;
    loop {
        let snap = snapshots.borrow_and_update().clone();
        let (wanted, warnings) = snap.as_deref().map(hosts).unwrap_or_default();
        for w in warnings {
            if warned.insert(w.clone()) {
                tracing::warn!("acme: {w}");
            }
        }
        // Read what is stored; note what is missing or due.
        let now = SystemTime::now();
        let mut stored = BTreeMap::new();
        let mut due = Vec::new();
        let mut next_due = now + REREAD;
        for host in &wanted {
            match read_cert(&store, host, &sealer).await {
                Ok(Some(c)) => {
                    let renew_at = c.renew_at(cfg.renew_before);
                    if renew_at <= now {
                        due.push(host.clone());
                    } else {
                        next_due = next_due.min(renew_at);
                    }
                    stored.insert(host.clone(), Arc::new(c));
                }
                Ok(None) => due.push(host.clone()),
                Err(e) => {
                    tracing::warn!(
                        "acme: {host}: stored certificate unusable, ordering again: {e}"
                    );
                    due.push(host.clone());
                }
            }
        }
        publish(&out, &telemetry, &stored, cfg.renew_before, &mut shown);
        retries.retain(|h, _| wanted.contains(h));
        let ready: Vec<String> = due
            .into_iter()
            .filter(|h| retries.get(h).map_or(true, |r| r.next <= Instant::now()))
            .collect();
        if !ready.is_empty() {
            let done = tokio::select! {
                r = order_all(&cfg, &store, &sealer, &holder, &ready, &telemetry, &mut retries) => r,
                _ = shutdown.cancelled() => return,
            };
            for c in done {
                stored.insert(c.host.clone(), Arc::new(c));
            }
            publish(&out, &telemetry, &stored, cfg.renew_before, &mut shown);
        }
        let wake_retry = retries.values().map(|r| r.next).min();
        let wake_due = next_due
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let mut wake = tokio::time::Instant::now() + wake_due.min(REREAD);
        if let Some(r) = wake_retry {
            wake = wake.min(r.into());
        }
        tokio::select! {
            r = snapshots.changed(), if snapshots_open => { snapshots_open = r.is_ok(); }
            _ = tokio::time::sleep_until(wake) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Orders `hosts` under the lock; returns the certificates obtained (or found stored by
/// another confd meanwhile), recording failures in `retries`.
async fn order_all(
    cfg: &AcmeConfig,
    store: &KvStore,
    sealer: &Sealer,
    holder: &str,
    hosts: &[String],
    telemetry: &Telemetry,
    retries: &mut HashMap<String, Retry>,
) -> Vec<Certificate> {
    let fail = |host: &str, cause: &str, retries: &mut HashMap<String, Retry>| {
        let r = retries.entry(host.to_string()).or_insert_with(|| Retry {
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(300)),
            next: Instant::now(),
        });
        let delay = r.backoff.next_delay();
        r.next = Instant::now() + delay;
        telemetry
            .metrics()
            .acme_failures
            .get_or_create(&Host {
                host: host.to_string(),
            })
            .inc();
        tracing::warn!("acme: {host}: {cause} (retrying in {delay:?})");
    };
    let mut lock = match store.lock(LOCK, holder, cfg.lock_ttl).await {
        Ok(l) => l,
        Err(e) => {
            for h in hosts {
                fail(
                    h,
                    &format!("cannot take the lock {}: {e}", store.key(LOCK)),
                    retries,
                );
            }
            return Vec::new();
        }
    };
    tracing::info!(lock = %lock.key(), hosts = hosts.len(), "acme: took the lock");
    let mut got = Vec::new();
    let mut account = None;
    for host in hosts {
        // Another confd may have stored it while this one waited for the lock.
        if let Ok(Some(c)) = read_cert(store, host, sealer).await {
            if c.renew_at(cfg.renew_before) > SystemTime::now() {
                retries.remove(host);
                got.push(c);
                continue;
            }
        }
        let r = tokio::select! {
            r = obtain(cfg, store, sealer, &mut account, host) => r,
            why = lock.lost() => Err(format!("lost the lock mid-order: {why}")),
        };
        match r {
            Ok(c) => {
                if let Err(e) = store.put(&cert_key(host), &c.to_record(sealer)).await {
                    fail(host, &format!("storing the certificate: {e}"), retries);
                    continue;
                }
                tracing::info!(host = %host, "acme: certificate stored");
                if c.renew_at(cfg.renew_before) <= SystemTime::now() {
                    // Ordering again at once would get the same: back off like a failure.
                    fail(
                        host,
                        "the new certificate is already within acme.renew_before of its expiry: expected renew_before shorter than the ACME server's certificate lifetime",
                        retries,
                    );
                } else {
                    retries.remove(host);
                }
                got.push(c);
            }
            Err(e) => fail(host, &e, retries),
        }
        if lock.lost_reason().is_some() {
            // The rest wait for the next pass, and a lock of their own.
            break;
        }
    }
    lock.release().await;
    got
}

/// One host's order, with the account loaded (or made) on first use.
async fn obtain(
    cfg: &AcmeConfig,
    store: &KvStore,
    sealer: &Sealer,
    account: &mut Option<instant_acme::Account>,
    host: &str,
) -> Result<Certificate, String> {
    let acc = match account {
        Some(a) => a.clone(),
        None => {
            let a = account::load_or_create(cfg, store, sealer).await?;
            *account = Some(a.clone());
            a
        }
    };
    match order::obtain(&acc, host, store).await {
        // The ACME server forgot the stored account (a test server's restart, a deactivation):
        // make a new one and try once more.
        Err(e) if e.contains("accountDoesNotExist") => {
            let a = account::create(cfg, store, sealer).await?;
            *account = Some(a.clone());
            order::obtain(&a, host, store).await
        }
        r => r,
    }
}

async fn read_cert(
    store: &KvStore,
    host: &str,
    sealer: &Sealer,
) -> Result<Option<Certificate>, String> {
    match store.get(&cert_key(host)).await {
        Ok(Some(v)) => Certificate::from_record(host, &v.value, sealer).map(Some),
        Ok(None) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// The name prefix of the ACME notes on `/healthz`.
const NOTE: &str = "acme ";

/// Publishes the usable certificates (`stored` less the expired ones: a host is better served
/// on HTTP alone than on an expired certificate), sets the expiry gauge of every stored one,
/// and notes on `/healthz` those due for renewal or expired.
fn publish(
    out: &watch::Sender<Certificates>,
    telemetry: &Telemetry,
    stored: &BTreeMap<String, Arc<Certificate>>,
    renew_before: Option<Duration>,
    shown: &mut BTreeSet<String>,
) {
    let now = SystemTime::now();
    let gauge = &telemetry.metrics().acme_expiry;
    for host in shown.iter().filter(|h| !stored.contains_key(*h)) {
        gauge.remove(&Host { host: host.clone() });
    }
    shown.clear();
    for (host, c) in stored {
        gauge.get_or_create(&Host { host: host.clone() }).set(
            c.not_after
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs() as i64,
        );
        shown.insert(host.clone());
    }
    telemetry.health().set_notes(
        NOTE,
        notes(stored.values().map(|c| &**c), renew_before, now),
    );
    let current: BTreeMap<String, Arc<Certificate>> = stored
        .iter()
        .filter(|(_, c)| c.not_after > now)
        .map(|(h, c)| (h.clone(), c.clone()))
        .collect();
    out.send_if_modified(|old| {
        if **old == current {
            return false;
        }
        *old = Arc::new(current);
        true
    });
}

/// The `/healthz` notes of certificates due for renewal or expired at `now` (pure). They
/// never fail health: the other hosts still serve, and a renewal that keeps failing is in the
/// log and on `/metrics`.
fn notes<'a>(
    certs: impl Iterator<Item = &'a Certificate>,
    renew_before: Option<Duration>,
    now: SystemTime,
) -> Vec<(String, String)> {
    certs
        .filter(|c| c.renew_at(renew_before) <= now)
        .map(|c| {
            let text = match c.not_after.duration_since(now) {
                Ok(left) if !left.is_zero() => format!(
                    "certificate expires {} (in {}), renewal due",
                    rfc3339(c.not_after),
                    rough(left)
                ),
                _ => format!(
                    "certificate expired {}, not served until renewed",
                    rfc3339(c.not_after)
                ),
            };
            (format!("{NOTE}{}", c.host), text)
        })
        .collect()
}

/// `t` as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm, proleptic Gregorian).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A duration to the hour (or minute, under an hour), for people.
fn rough(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=3599 => format!("{}m", s.div_ceil(60)),
        _ if s < 86_400 * 2 => format!("{}h", s / 3600),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::inst;

    #[test]
    fn hosts_of_a_snapshot() {
        let mut a = inst("web", "a", "10.0.0.1", 80);
        a.meta.insert("vhost".into(), "App.Example.test".into());
        let mut b = inst("web", "b", "10.0.0.2", 80);
        b.meta.insert("vhost".into(), "app.example.test".into());
        let mut c = inst("api", "c", "10.0.0.3", 80);
        c.meta.insert("vhost".into(), "bad name!".into());
        let d = inst("db", "d", "10.0.0.4", 5432);
        let snap = Snapshot::build(vec![a, b, c, d], BTreeMap::new(), &[]);
        let (hosts, warnings) = hosts(&snap);
        assert_eq!(hosts.into_iter().collect::<Vec<_>>(), ["app.example.test"]);
        assert!(warnings.is_empty());
    }

    #[test]
    fn notes_name_due_and_expired_certificates() {
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let cert = |host: &str, from: u64, to: u64| Certificate {
            host: host.into(),
            chain_pem: String::new(),
            key_pem: String::new(),
            not_before: at(from),
            not_after: at(to),
        };
        let now = 1_800_000_000;
        let certs = [
            // A third of 90 days left, less a day: due.
            cert("due.test", now - 61 * 86_400, now + 29 * 86_400),
            cert("fresh.test", now - 86_400, now + 89 * 86_400),
            cert("expired.test", now - 90 * 86_400, now - 3600),
        ];
        let got = notes(certs.iter(), None, at(now));
        assert_eq!(
            got,
            [
                (
                    "acme due.test".to_string(),
                    "certificate expires 2027-02-13T08:00:00Z (in 29d0h), renewal due".to_string()
                ),
                (
                    "acme expired.test".to_string(),
                    "certificate expired 2027-01-15T07:00:00Z, not served until renewed"
                        .to_string()
                ),
            ]
        );
        // With renew_before longer than what is left, the fresh one is due too.
        let got = notes(
            certs.iter(),
            Some(Duration::from_secs(90 * 86_400)),
            at(now),
        );
        assert_eq!(got.len(), 3);
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(at(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rough(Duration::from_secs(61)), "2m");
        assert_eq!(rough(Duration::from_secs(5 * 3600 + 5)), "5h");
    }
}
