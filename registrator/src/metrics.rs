//! The registrator's metric families and health conditions, recorded where things happen
//! (`sync` for the store, `docker` for the engine) and served by `--metrics-addr`.
//!
//! Process-wide, like the log: every recording point is one call, with no handle threaded
//! through the loops.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use std::sync::{LazyLock, Mutex};
use std::time::Instant;
use switchboard::telemetry::{Health, Registry};
use switchboard::StoreError;

/// Health condition: the store answers.
pub const STORE: &str = "store";
/// Health condition: Docker's event stream is up.
pub const DOCKER: &str = "docker";

/// A store operation, for the request metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Op {
    /// `ping`, `list`, `register`, `deregister`, `refresh`.
    pub op: &'static str,
}

/// A Docker event, by action.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Action {
    /// One of the actions the registrator subscribes to (`health_status` without its status).
    pub action: &'static str,
}

/// Every metric the registrator exports.
pub struct Metrics {
    /// Services registered by this registrator right now.
    pub services: Gauge,
    /// Registrations written.
    pub registrations: Counter,
    /// Registrations that failed (refused by the store, or the store unavailable).
    pub registration_failures: Counter,
    /// Registrations removed.
    pub deregistrations: Counter,
    /// Removals that failed.
    pub deregistration_failures: Counter,
    /// Removals the store refused that are still owed (tried again until they land).
    pub owed: Gauge,
    /// Docker events received, by action.
    pub docker_events: Family<Action, Counter>,
    /// Whether the Docker event stream is up (1) or down (0).
    pub docker_up: Gauge,
    /// From a Docker event to the store write it caused.
    pub event_to_store: Histogram,
    /// Store request durations, by operation.
    pub store_requests: Family<Op, Histogram, fn() -> Histogram>,
    /// Store requests that failed, by operation.
    pub store_errors: Family<Op, Counter>,
    /// Whether the store answered the last request (1) or not (0).
    pub store_up: Gauge,
    /// When the oldest Docker event not yet reflected in a published desired set arrived.
    unpublished_event: Mutex<Option<Instant>>,
    /// When the oldest event behind a published change, not yet written, arrived.
    unwritten_event: Mutex<Option<Instant>>,
}

fn latency_histogram() -> Histogram {
    // 1 ms to about 16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// The metrics, the registry serving them, and the health conditions.
pub struct Telemetry {
    /// Recording points write here.
    pub metrics: Metrics,
    /// What `/metrics` encodes.
    pub registry: Registry,
    /// What `/healthz` reports.
    pub health: Health,
}

/// The process's telemetry.
pub static TELEMETRY: LazyLock<Telemetry> = LazyLock::new(|| {
    let metrics = Metrics {
        services: Gauge::default(),
        registrations: Counter::default(),
        registration_failures: Counter::default(),
        deregistrations: Counter::default(),
        deregistration_failures: Counter::default(),
        owed: Gauge::default(),
        docker_events: Family::default(),
        docker_up: Gauge::default(),
        event_to_store: latency_histogram(),
        store_requests: Family::new_with_constructor(latency_histogram),
        store_errors: Family::default(),
        store_up: Gauge::default(),
        unpublished_event: Mutex::new(None),
        unwritten_event: Mutex::new(None),
    };
    let mut r = Registry::with_prefix("registrator");
    let m = &metrics;
    r.register(
        "services",
        "Services registered by this registrator",
        m.services.clone(),
    );
    r.register(
        "registrations",
        "Registrations written to the store",
        m.registrations.clone(),
    );
    r.register(
        "registration_failures",
        "Registrations that failed (refused, or the store unavailable)",
        m.registration_failures.clone(),
    );
    r.register(
        "deregistrations",
        "Registrations removed from the store",
        m.deregistrations.clone(),
    );
    r.register(
        "deregistration_failures",
        "Removals that failed",
        m.deregistration_failures.clone(),
    );
    r.register(
        "deregistrations_owed",
        "Removals the store refused, still owed and tried again until they land",
        m.owed.clone(),
    );
    r.register(
        "docker_events",
        "Docker container events received, by action",
        m.docker_events.clone(),
    );
    r.register(
        "docker_up",
        "1 while the Docker event stream is up, else 0",
        m.docker_up.clone(),
    );
    r.register(
        "event_to_store_seconds",
        "From a Docker event to the first store write it caused",
        m.event_to_store.clone(),
    );
    r.register(
        "store_request_duration_seconds",
        "Store request durations, by operation",
        m.store_requests.clone(),
    );
    r.register(
        "store_request_errors",
        "Store requests that failed, by operation",
        m.store_errors.clone(),
    );
    r.register(
        "store_up",
        "1 while the store answers, else 0",
        m.store_up.clone(),
    );
    for op in ["ping", "list", "register", "deregister", "refresh"] {
        // Every series from 0, so alerts on errors have one before the first error.
        drop(metrics.store_errors.get_or_create(&Op { op }));
    }
    let health = Health::new();
    // Until each has answered once, the registrator is not doing its job.
    health.fail(STORE, "not reached yet");
    health.fail(DOCKER, "not connected yet");
    Telemetry {
        metrics,
        registry: r,
        health,
    }
});

/// The metrics.
pub fn metrics() -> &'static Metrics {
    &TELEMETRY.metrics
}

/// The health conditions.
pub fn health() -> &'static Health {
    &TELEMETRY.health
}

/// Runs one store request, timing it and counting its failure.
pub async fn store_request<T>(
    op: &'static str,
    fut: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let start = Instant::now();
    let r = fut.await;
    let m = metrics();
    let labels = Op { op };
    m.store_requests
        .get_or_create(&labels)
        .observe(start.elapsed().as_secs_f64());
    if r.is_err() {
        m.store_errors.get_or_create(&labels).inc();
    }
    r
}

/// The store answered (a whole pass, or the first ping).
pub fn store_ok() {
    metrics().store_up.set(1);
    health().ok(STORE);
}

/// The store did not answer: `/healthz` says why until it does.
pub fn store_failed(kind: &str, err: &dyn std::fmt::Display) {
    metrics().store_up.set(0);
    health().fail(STORE, format_args!("{kind} store unavailable: {err}"));
}

/// Docker's event stream is up.
pub fn docker_ok() {
    metrics().docker_up.set(1);
    health().ok(DOCKER);
}

/// Docker's event stream is down.
pub fn docker_failed(why: &dyn std::fmt::Display) {
    metrics().docker_up.set(0);
    health().fail(DOCKER, format_args!("event stream down: {why}"));
}

/// A Docker event arrived (`action` as Docker sends it, e.g. `health_status: healthy`).
pub fn docker_event(action: &str, known: &[&'static str]) {
    let label = action_label(action, known);
    metrics()
        .docker_events
        .get_or_create(&Action { action: label })
        .inc();
    let mut u = lock(&metrics().unpublished_event);
    u.get_or_insert_with(Instant::now);
}

/// The label of a Docker action: one of the subscribed actions, else `other`, so the series
/// stay few whatever Docker sends (`health_status: healthy` is `health_status`).
fn action_label(action: &str, known: &[&'static str]) -> &'static str {
    let base = action.split(':').next().unwrap_or_default().trim();
    known
        .iter()
        .copied()
        .find(|a| *a == base)
        .unwrap_or("other")
}

/// The Docker side published its desired set; `changed` whether it differed. The events
/// behind a change are timed until its first store write; those behind no change are not
/// timed at all.
pub fn published(changed: bool) {
    let m = metrics();
    let Some(t) = lock(&m.unpublished_event).take() else {
        return;
    };
    if changed {
        let mut w = lock(&m.unwritten_event);
        w.get_or_insert(t);
    }
}

/// A registration or removal reached the store: times the oldest event behind it.
pub fn written() {
    let m = metrics();
    if let Some(t) = lock(&m.unwritten_event).take() {
        m.event_to_store.observe(t.elapsed().as_secs_f64());
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_actions_map_to_few_labels() {
        let known = &["start", "die", "health_status"];
        for (action, want) in [
            ("start", "start"),
            ("health_status: healthy", "health_status"),
            ("health_status: unhealthy", "health_status"),
            ("exec_start: sh -c x", "other"),
            ("", "other"),
            ("startx", "other"),
        ] {
            assert_eq!(action_label(action, known), want, "{action:?}");
        }
    }

    #[test]
    fn the_registry_encodes_every_family() {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &TELEMETRY.registry).unwrap();
        for name in [
            "registrator_services ",
            "registrator_registrations_total ",
            "registrator_deregistrations_owed ",
            "registrator_docker_up ",
            "registrator_store_request_errors_total{op=\"register\"} 0",
            "registrator_store_up ",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
    }
}
