//! confd's metric families and health conditions, recorded where things happen (the source
//! for snapshots and store errors, the runner for renders, checks, reloads and live updates)
//! and served by `--metrics-addr` / `metrics_addr:`.
//!
//! One [`Telemetry`] per process, made by confd's `main` and handed to what records: the
//! source, each run of the render loop, the supervisor. It outlives the runs, so the counters
//! run on across SIGHUP restarts. A handle, not a global: what records is told where to, and
//! a test gets a registry of its own.
//!
//! The recording points take plain values (a template's source and destination paths,
//! durations, counts), never the configuration's types, and an [`Outcome`] from its own
//! module: the only part of confd this module imports, so anything may record here.

#[cfg(test)]
use crate::outcome::Failure;
use crate::outcome::Outcome;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchboard::telemetry::{Health, Registry};
use switchboard::Shutdown;
use tokio::sync::watch;

/// Health condition: the source is in sync with the store.
pub const STORE: &str = "store";
/// Health condition: the process confd supervises (`--exec`) runs.
pub const PROXY: &str = "proxy";
/// Prefix of the per-template health conditions (`template SRC -> DEST`).
pub const TEMPLATE: &str = "template ";
/// A source out of sync for less than this is normal (a watch reconnecting, a new service's
/// first answer pending) and does not make `/healthz` fail.
const STORE_GRACE: Duration = Duration::from_secs(2);

/// Labels of the per-template metrics: the destination file.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Tpl {
    /// The template's `dest`.
    pub template: String,
}

impl Tpl {
    /// The labels of the template writing `dest`.
    pub fn of(dest: &Path) -> Tpl {
        Tpl {
            template: dest.display().to_string(),
        }
    }
}

type Durations = Family<Tpl, Histogram, fn() -> Histogram>;

/// Labels of `confd_instances_refused`: why the instance was left out.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Why {
    /// `port`, `address`, `unresolvable`, `name`, `id` or `decode`.
    pub reason: String,
}

/// Labels of `confd_route_warnings`: a service whose routing labels are not served as asked.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteWhy {
    /// The service.
    pub service: String,
    /// A fixed token (see [`crate::routes::Warning::reason`]).
    pub reason: String,
}

/// Labels of `confd_acme_certificate_expiry_timestamp_seconds`: the virtual host.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Host {
    /// The host name, validated as a DNS name.
    pub host: String,
}

/// Every metric confd exports.
pub struct Metrics {
    /// When each host's stored ACME certificate expires (Unix seconds).
    pub acme_expiry: Family<Host, Gauge>,
    /// ACME orders that failed, per host.
    pub acme_failures: Family<Host, Counter>,
    /// Snapshots published (each a change in what the store holds).
    pub snapshots: Counter,
    /// Instances in the current snapshot.
    pub instances: Gauge,
    /// Services in the current snapshot.
    pub services: Gauge,
    /// Whether the source is in sync with the store (1) or not (0).
    pub store_up: Gauge,
    /// Store requests (queries, watches) that failed.
    pub store_errors: Counter,
    /// Instances left out of the templates' data, once per version of each, by reason.
    pub instances_refused: Family<Why, Counter>,
    /// Routing warnings of the current snapshot, per service and reason (each 1 while it
    /// holds; gone when it no longer does).
    pub route_warnings: Family<RouteWhy, Gauge>,
    /// Their log lines, to log each once while it holds.
    route_warning_lines: Mutex<std::collections::BTreeSet<String>>,
    /// Templates rendered.
    pub renders: Family<Tpl, Counter>,
    /// Renders that failed (a template error, the `min_instances` guard, an unreadable file).
    pub render_failures: Family<Tpl, Counter>,
    /// How long a render took.
    pub render_seconds: Durations,
    /// Check commands that refused a staged file.
    pub check_failures: Family<Tpl, Counter>,
    /// Reloads that succeeded.
    pub reloads: Family<Tpl, Counter>,
    /// Reloads that failed.
    pub reload_failures: Family<Tpl, Counter>,
    /// How long a reload command took.
    pub reload_seconds: Durations,
    /// Membership changes applied through a live channel, without a reload.
    pub live_updates: Family<Tpl, Counter>,
    /// Live updates that failed (the change was reloaded instead).
    pub live_update_failures: Family<Tpl, Counter>,
    /// When each template last went through a pass without failing.
    last_success: Arc<Mutex<BTreeMap<String, Instant>>>,
    /// The latest store error and when it happened, for `/healthz` ([`Telemetry::follow_source`]).
    last_store_error: watch::Sender<Option<(Instant, String)>>,
}

fn duration_histogram() -> Histogram {
    // 1 ms to about 30 s (a command's timeout).
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The process's metrics, the registry serving them, and the health conditions. Cheap to
/// clone: every clone records into the same ones.
#[derive(Clone)]
pub struct Telemetry(Arc<Inner>);

struct Inner {
    /// Recording points write here.
    metrics: Metrics,
    /// What `/metrics` encodes.
    registry: Registry,
    /// What `/healthz` reports.
    health: Health,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Default for Telemetry {
    fn default() -> Telemetry {
        Telemetry::new()
    }
}

/// Every family registered under `confd_`, and the `store` condition failing until the first
/// snapshot.
fn build() -> Inner {
    let last_success = Arc::new(Mutex::new(BTreeMap::new()));
    let m = Metrics {
        acme_expiry: Family::default(),
        acme_failures: Family::default(),
        snapshots: Counter::default(),
        instances: Gauge::default(),
        services: Gauge::default(),
        store_up: Gauge::default(),
        store_errors: Counter::default(),
        instances_refused: Family::default(),
        route_warnings: Family::default(),
        route_warning_lines: Mutex::default(),
        renders: Family::default(),
        render_failures: Family::default(),
        render_seconds: Family::new_with_constructor(duration_histogram),
        check_failures: Family::default(),
        reloads: Family::default(),
        reload_failures: Family::default(),
        reload_seconds: Family::new_with_constructor(duration_histogram),
        live_updates: Family::default(),
        live_update_failures: Family::default(),
        last_success: last_success.clone(),
        last_store_error: watch::Sender::new(None),
    };
    let mut r = Registry::with_prefix("confd");
    r.register(
        "snapshots",
        "Snapshots of the store published",
        m.snapshots.clone(),
    );
    r.register(
        "snapshot_instances",
        "Instances in the current snapshot",
        m.instances.clone(),
    );
    r.register(
        "snapshot_services",
        "Services in the current snapshot",
        m.services.clone(),
    );
    r.register(
        "store_up",
        "1 while the source is in sync with the store, else 0",
        m.store_up.clone(),
    );
    r.register(
        "store_errors",
        "Store requests that failed",
        m.store_errors.clone(),
    );
    r.register(
        "instances_refused",
        "Instances left out of the templates' data (once per version of each), by reason",
        m.instances_refused.clone(),
    );
    r.register(
        "route_warnings",
        "Services whose routing labels are not served as asked (1 while it holds), by reason; the log says why",
        m.route_warnings.clone(),
    );
    r.register(
        "acme_certificate_expiry_timestamp_seconds",
        "When each host's certificate in the store expires (Unix seconds)",
        m.acme_expiry.clone(),
    );
    r.register(
        "acme_order_failures",
        "ACME orders that failed, per host; the log says why",
        m.acme_failures.clone(),
    );
    r.register("renders", "Templates rendered", m.renders.clone());
    r.register(
        "render_failures",
        "Renders that failed",
        m.render_failures.clone(),
    );
    r.register(
        "render_duration_seconds",
        "How long a render took",
        m.render_seconds.clone(),
    );
    r.register(
        "check_failures",
        "Staged files the check command refused",
        m.check_failures.clone(),
    );
    r.register("reloads", "Reloads that succeeded", m.reloads.clone());
    r.register(
        "reload_failures",
        "Reloads that failed",
        m.reload_failures.clone(),
    );
    r.register(
        "reload_duration_seconds",
        "How long a reload command took",
        m.reload_seconds.clone(),
    );
    r.register(
        "live_updates",
        "Changes applied to the running proxy without a reload",
        m.live_updates.clone(),
    );
    r.register(
        "live_update_failures",
        "Live updates that failed (reloaded instead)",
        m.live_update_failures.clone(),
    );
    r.register_collector(Box::new(SinceLastSuccess(last_success)));
    let health = Health::new();
    health.fail(STORE, "no snapshot from the store yet");
    Inner {
        metrics: m,
        registry: r,
        health,
    }
}

/// `confd_seconds_since_last_successful_render{template}`, computed at each scrape.
#[derive(Debug)]
struct SinceLastSuccess(Arc<Mutex<BTreeMap<String, Instant>>>);

impl Collector for SinceLastSuccess {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = Instant::now();
        let ages: Vec<(String, f64)> = lock(&self.0)
            .iter()
            .map(|(t, at)| (t.clone(), now.duration_since(*at).as_secs_f64()))
            .collect();
        let mut m = encoder.encode_descriptor(
            "seconds_since_last_successful_render",
            "Seconds since the template last rendered without a failure (grows while nothing changes).",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (template, age) in ages {
            let labels = Tpl { template };
            ConstGauge::new(age).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl Telemetry {
    /// A new registry with every metric at zero and the `store` condition failing until the
    /// first snapshot.
    pub fn new() -> Telemetry {
        Telemetry(Arc::new(build()))
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// What `/metrics` encodes.
    pub fn registry(&self) -> &Registry {
        &self.0.registry
    }

    /// The health conditions (what `/healthz` reports).
    pub fn health(&self) -> &Health {
        &self.0.health
    }

    /// A new snapshot was published.
    pub fn snapshot(&self, services: usize, instances: usize) {
        let m = self.metrics();
        m.snapshots.inc();
        m.services.set(services as i64);
        m.instances.set(instances as i64);
    }

    /// A store request failed (each failed request, retries included).
    pub fn store_error(&self, e: &dyn std::fmt::Display) {
        let m = self.metrics();
        m.store_errors.inc();
        m.last_store_error
            .send_replace(Some((Instant::now(), e.to_string())));
    }

    /// An instance was left out of the templates' data, for `reason` (see [`Why`]).
    pub fn instance_refused(&self, reason: &str) {
        self.metrics()
            .instances_refused
            .get_or_create(&Why {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// The routing warnings of the current snapshot: each is logged when it first holds, and
    /// `confd_route_warnings` shows exactly these.
    pub fn route_warnings(&self, warnings: &[crate::routes::Warning]) {
        let m = self.metrics();
        let lines: std::collections::BTreeSet<String> =
            warnings.iter().map(|w| w.to_string()).collect();
        let mut last = lock(&m.route_warning_lines);
        if *last == lines {
            return;
        }
        for l in lines.difference(&last) {
            tracing::warn!("route: {l}");
        }
        m.route_warnings.clear();
        for w in warnings {
            m.route_warnings
                .get_or_create(&RouteWhy {
                    service: w.service.clone(),
                    reason: w.reason.to_string(),
                })
                .set(1);
        }
        *last = lines;
    }

    /// Follows the source's "in sync" flag and the latest store error into the `store`
    /// condition until `shutdown`: while the source is out of sync, each new error replaces
    /// the reason, so `/healthz` names what is wrong now (a certificate from another CA after
    /// a refused connection), not the first error of the outage.
    pub async fn follow_source(
        &self,
        mut healthy: watch::Receiver<bool>,
        backend: String,
        shutdown: Shutdown,
    ) {
        let (m, health) = (self.metrics(), self.health());
        let mut errors = m.last_store_error.subscribe();
        let mut synced: Option<Instant> = None;
        loop {
            let in_sync = *healthy.borrow_and_update();
            let last = errors.borrow_and_update().clone();
            if in_sync {
                m.store_up.set(1);
                health.ok(STORE);
                synced = Some(Instant::now());
            } else {
                m.store_up.set(0);
                let reason = store_reason(&backend, last.as_ref(), synced);
                health.fail_after(STORE, reason, STORE_GRACE);
            }
            tokio::select! {
                r = healthy.changed() => if r.is_err() { return },
                _ = errors.changed() => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// The supervised process (`--exec`) runs.
    pub fn proxy_up(&self) {
        self.health().ok(PROXY);
    }

    /// The supervised process does not run (not started yet, or restarting after it exited).
    pub fn proxy_down(&self, why: &dyn std::fmt::Display) {
        self.health().fail(PROXY, why);
    }

    /// A new run (start or SIGHUP) of the templates writing `dests` forgets the health of the
    /// last one's templates, and shows every counter of the new ones from 0, so a rate or an
    /// alert on failures has a series before the first failure.
    pub fn new_run<'a>(&self, dests: impl IntoIterator<Item = &'a Path>) {
        self.health().clear_prefix(TEMPLATE);
        let m = self.metrics();
        for dest in dests {
            let l = Tpl::of(dest);
            for family in [
                &m.renders,
                &m.render_failures,
                &m.check_failures,
                &m.reloads,
                &m.reload_failures,
                &m.live_updates,
                &m.live_update_failures,
            ] {
                drop(family.get_or_create(&l));
            }
        }
    }

    /// What a pass did to the template rendering `src` into `dest` (only templates the pass
    /// took: due or owed a reload).
    pub fn outcome(&self, src: &Path, dest: &Path, o: &Outcome) {
        let name = format!("{TEMPLATE}{} -> {}", src.display(), dest.display());
        match o {
            Outcome::Failed(why) | Outcome::ReloadFailed(why) => self.health().fail(&name, why),
            Outcome::Unchanged | Outcome::Updated | Outcome::Live => {
                self.health().ok(&name);
                lock(&self.metrics().last_success).insert(Tpl::of(dest).template, Instant::now());
            }
            Outcome::WouldChange => {}
        }
    }

    /// A render of the template writing `dest` took `took` and succeeded or not.
    pub fn rendered(&self, dest: &Path, took: Duration, ok: bool) {
        let l = Tpl::of(dest);
        let m = self.metrics();
        m.render_seconds
            .get_or_create(&l)
            .observe(took.as_secs_f64());
        if ok {
            m.renders.get_or_create(&l).inc();
        } else {
            m.render_failures.get_or_create(&l).inc();
        }
    }

    /// The check command refused the staged file of the template writing `dest`.
    pub fn check_failed(&self, dest: &Path) {
        self.metrics()
            .check_failures
            .get_or_create(&Tpl::of(dest))
            .inc();
    }

    /// A reload covering the templates writing `dests` took `took` and succeeded or not.
    pub fn reloaded<'a>(
        &self,
        dests: impl IntoIterator<Item = &'a Path>,
        took: Duration,
        ok: bool,
    ) {
        let m = self.metrics();
        for dest in dests {
            let l = Tpl::of(dest);
            m.reload_seconds
                .get_or_create(&l)
                .observe(took.as_secs_f64());
            if ok {
                m.reloads.get_or_create(&l).inc();
            } else {
                m.reload_failures.get_or_create(&l).inc();
            }
        }
    }

    /// A live update of the template writing `dest` succeeded or not.
    pub fn live(&self, dest: &Path, ok: bool) {
        let l = Tpl::of(dest);
        let m = self.metrics();
        if ok {
            m.live_updates.get_or_create(&l).inc();
        } else {
            m.live_update_failures.get_or_create(&l).inc();
        }
    }
}

/// The `store` condition's reason while the source is not in sync: the latest error, unless
/// it is older than the last time the source was in sync (then it belongs to an outage that
/// ended, and naming it would be naming a cause long gone).
fn store_reason(
    backend: &str,
    last: Option<&(Instant, String)>,
    synced: Option<Instant>,
) -> String {
    match last {
        Some((at, e)) if synced.map_or(true, |s| *at >= s) => {
            format!("not in sync with {backend}: {e}")
        }
        _ => format!("not in sync with {backend}"),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_reason_is_the_latest_error_of_this_outage() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let b = "https://127.0.0.1:8501";
        let tls = (at(20), "TLS failed: unknown issuer".to_string());
        let table = [
            // (latest error, last in sync, reason)
            (None, None, "not in sync with https://127.0.0.1:8501"),
            (
                Some(&tls),
                None,
                "not in sync with https://127.0.0.1:8501: TLS failed: unknown issuer",
            ),
            (
                Some(&tls),
                Some(at(10)),
                "not in sync with https://127.0.0.1:8501: TLS failed: unknown issuer",
            ),
            // In sync since the error: it was about an earlier outage.
            (
                Some(&tls),
                Some(at(30)),
                "not in sync with https://127.0.0.1:8501",
            ),
        ];
        for (last, synced, want) in table {
            assert_eq!(store_reason(b, last, synced), want, "{last:?} {synced:?}");
        }
    }

    #[test]
    fn template_outcomes_set_health_and_the_age_of_the_last_success() {
        let t = Telemetry::new();
        let (src, dest) = (
            Path::new("/unit/metrics-a.hbs"),
            Path::new("/unit/metrics-a"),
        );
        let name = "template /unit/metrics-a.hbs -> /unit/metrics-a";
        t.outcome(src, dest, &Outcome::Failed(Failure::Check("nope".into())));
        let why = t.health().status().unwrap_err();
        assert!(
            why.contains(&format!("{name}: check failed: nope")),
            "{why}"
        );
        t.outcome(src, dest, &Outcome::Updated);
        assert!(!t.health().status().err().unwrap_or_default().contains(name));
        t.outcome(
            src,
            dest,
            &Outcome::ReloadFailed(Failure::Reload("x".into())),
        );
        assert!(t.health().status().unwrap_err().contains(name));
        t.new_run([]);
        assert!(!t.health().status().err().unwrap_or_default().contains(name));

        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, t.registry()).unwrap();
        assert!(
            text.contains(
                "confd_seconds_since_last_successful_render{template=\"/unit/metrics-a\"} "
            ),
            "{text}"
        );
    }
}
