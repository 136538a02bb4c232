//! Watches the Docker engine and publishes the complete set of services its containers provide.
//!
//! Level-triggered: an event only marks a container for re-inspection, and the inspection
//! decides (running? healthy? gone?). At most one inspection per container is in flight; an
//! event meanwhile bumps the container's generation and triggers another inspection when the
//! first returns, and [`Tracker`] only applies a result newer than the last applied one. So a
//! late `die` never removes a container that has since restarted.
//!
//! One thing inspection cannot see is a stop in progress: Docker's `kill` event with the
//! container's stop signal withdraws its services at once (see `drain`), and that state, not
//! the event, is what [`decide`] reads next to the inspection.
//!
//! The event subscription starts from a timestamp taken before listing containers (Docker
//! replays events since then), so nothing that happens between the listing and the
//! subscription is missed. When the stream ends or fails, it reconnects with backoff and
//! re-lists everything, re-inspecting every known container too, so containers removed while
//! the engine was unreachable are dropped.

use crate::config::Deregister;
use crate::derive::{derive, ContainerInfo, ContainerPort, DeriveOptions};
use crate::drain::{parse_docker_time, Drains, Kill, StopSpec};
use crate::sync::{Desired, ServiceSet};
use bollard::models::{ContainerInspectResponse, EventMessage, HealthStatusEnum};
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use bollard::Docker;
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use switchboard::{Backoff, DockerHealth, Service, Shutdown};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// How many inspections run at once (a host with hundreds of containers at start).
const INSPECT_CONCURRENCY: usize = 16;
/// How soon a failed inspection (engine hiccup, not a 404) is tried again.
const INSPECT_RETRY: Duration = Duration::from_secs(2);
/// Container events that can change what a container serves. `kill` also carries the signal
/// that starts a drain.
const EVENTS: &[&str] = &[
    "start",
    "restart",
    "die",
    "stop",
    "kill",
    "destroy",
    "pause",
    "unpause",
    "rename",
    "update",
    "health_status",
];

/// Per-container inspection bookkeeping: which generation was asked for, which is in flight,
/// which was applied last.
#[derive(Debug, Default)]
pub struct Tracker {
    entries: HashMap<String, Track>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Track {
    requested: u64,
    inflight: Option<u64>,
    applied: u64,
}

impl Tracker {
    /// Something happened to `id`: returns the generation to inspect now, or `None` when an
    /// inspection is already running (another follows it).
    pub fn mark(&mut self, id: &str) -> Option<u64> {
        let t = self.entries.entry(id.to_string()).or_default();
        t.requested += 1;
        if t.inflight.is_some() {
            return None;
        }
        t.inflight = Some(t.requested);
        t.inflight
    }

    /// The inspection of generation `gen` returned. Returns whether its result may be applied
    /// (it is newer than the last applied one and `ok`), and the next generation to inspect
    /// if the container was marked meanwhile.
    pub fn finish(&mut self, id: &str, gen: u64, ok: bool) -> (bool, Option<u64>) {
        let Some(t) = self.entries.get_mut(id) else {
            return (false, None);
        };
        if t.inflight == Some(gen) {
            t.inflight = None;
        }
        let apply = ok && gen > t.applied;
        if apply {
            t.applied = gen;
        }
        let next = if t.inflight.is_none() && t.requested > gen {
            t.inflight = Some(t.requested);
            t.inflight
        } else {
            None
        };
        (apply, next)
    }

    /// Drops the bookkeeping of a container that is gone, unless work on it is pending.
    pub fn forget(&mut self, id: &str) {
        if let Some(t) = self.entries.get(id) {
            if t.inflight.is_none() && t.requested <= t.applied {
                self.entries.remove(id);
            }
        }
    }

    /// Every container we know of.
    pub fn ids(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }
}

/// What a container's state means for its services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Register what it provides.
    Serve,
    /// Remove its services.
    Withdraw,
    /// Leave its services as they are (`-deregister on-success` after a failure).
    Keep,
}

/// The parts of `State` that decide [`Decision`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunState {
    /// Running and not restarting.
    pub running: bool,
    /// Frozen by `docker pause`: it answers nobody, so it is withdrawn.
    pub paused: bool,
    /// The Docker HEALTHCHECK status, if the container has one.
    pub health: Option<String>,
    /// Exit status of the last run.
    pub exit_code: i64,
    /// When the current (or last) run started, nanoseconds since the epoch on the engine's
    /// clock: tells a drain which run its stop signal was for.
    pub started_ns: Option<i64>,
}

/// What a container's Docker HEALTHCHECK does to its registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthGate {
    /// Registered only while healthy: the store (etcd, Consul KV) runs no checks, so a
    /// registration there means "send traffic".
    Withdraw,
    /// Registered whatever its health, with a Consul check whose status follows Docker's
    /// (`Service::docker_health`), so Consul shows it critical with a reason instead of the
    /// service vanishing (gliderlabs#578).
    Check,
}

impl HealthGate {
    /// The gate for the store named by `kind` (`Store::kind`): only the Consul agent runs checks.
    pub fn of(kind: &str) -> HealthGate {
        if kind == "consul" {
            HealthGate::Check
        } else {
            HealthGate::Withdraw
        }
    }
}

/// Whether a container in `state` should be registered. `draining`: it was sent its stop
/// signal and is finishing its work (see `drain`), so it takes no new clients.
pub fn decide(state: &RunState, draining: bool, mode: Deregister, gate: HealthGate) -> Decision {
    if state.running && !state.paused {
        if draining {
            return Decision::Withdraw;
        }
        match state.health.as_deref() {
            None | Some("healthy") => Decision::Serve,
            Some(_) if gate == HealthGate::Check => Decision::Serve,
            Some(_) => Decision::Withdraw,
        }
    } else if !state.running && mode == Deregister::OnSuccess && state.exit_code != 0 {
        Decision::Keep
    } else {
        Decision::Withdraw
    }
}

/// With [`HealthGate::Check`], marks each service with the container's Docker health, so the
/// store gives it a check that follows it; a change of health is then a change of the services
/// and reaches the store like any other.
pub fn follow_health(services: &mut [Service], health: Option<&str>, gate: HealthGate) {
    let health = match gate {
        HealthGate::Check => health.and_then(DockerHealth::from_docker),
        HealthGate::Withdraw => None,
    };
    for s in services {
        s.docker_health = health;
    }
}

/// `80/tcp` -> `(80, "tcp")`; a bare number is TCP.
fn parse_port_key(key: &str) -> Option<(u16, String)> {
    let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
    Some((port.parse().ok()?, proto.to_ascii_lowercase()))
}

/// What one inspection tells: the container for derivation, its state for [`decide`], how it
/// is stopped for draining.
#[derive(Debug, Clone)]
pub struct Inspected {
    /// Derivation's input.
    pub info: ContainerInfo,
    /// Running, paused, healthy, exit status, start time.
    pub run: RunState,
    /// Stop signal, stop timeout, `SERVICE_DRAIN`.
    pub stop: StopSpec,
}

/// Reduces bollard's inspect response to what derivation, [`decide`] and draining need.
pub fn extract(resp: ContainerInspectResponse) -> Inspected {
    let config = resp.config.unwrap_or_default();
    let net = resp.network_settings.unwrap_or_default();
    let mut ports: BTreeMap<(u16, String), Vec<(String, u16)>> = BTreeMap::new();
    for key in config.exposed_ports.unwrap_or_default() {
        if let Some(k) = parse_port_key(&key) {
            ports.entry(k).or_default();
        }
    }
    for (key, bindings) in net.ports.unwrap_or_default() {
        let Some(k) = parse_port_key(&key) else {
            continue;
        };
        let entry = ports.entry(k).or_default();
        for b in bindings.unwrap_or_default() {
            if let Some(hp) = b.host_port.and_then(|p| p.parse::<u16>().ok()) {
                entry.push((b.host_ip.unwrap_or_default(), hp));
            }
        }
    }
    let networks: BTreeMap<String, _> = net.networks.unwrap_or_default().into_iter().collect();
    let ip = networks
        .values()
        .filter_map(|n| n.ip_address.clone())
        .find(|ip| !ip.is_empty());
    let addresses = networks
        .iter()
        .filter_map(|(name, n)| Some((name.clone(), n.ip_address.clone()?)))
        .filter(|(_, ip)| !ip.is_empty())
        .collect();
    let host_network = resp
        .host_config
        .and_then(|h| h.network_mode)
        .is_some_and(|m| m == "host");
    let state = resp.state.unwrap_or_default();
    let health = state
        .health
        .and_then(|h| h.status)
        .filter(|s| !matches!(s, HealthStatusEnum::EMPTY | HealthStatusEnum::NONE))
        .map(|s| s.to_string());
    let restarting = state.restarting.unwrap_or(false);
    let run = RunState {
        running: state.running.unwrap_or(false) && !restarting,
        paused: state.paused.unwrap_or(false),
        health,
        exit_code: state.exit_code.unwrap_or(0),
        started_ns: state.started_at.as_deref().and_then(parse_docker_time),
    };
    let (stop_signal, stop_timeout) = (config.stop_signal, config.stop_timeout);
    let info = ContainerInfo {
        id: resp.id.unwrap_or_default(),
        name: resp
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        image: config.image.unwrap_or_default(),
        env: config.env.unwrap_or_default(),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        ports: ports
            .into_iter()
            .map(|((port, proto), bindings)| ContainerPort {
                port,
                proto,
                bindings,
            })
            .collect(),
        ip,
        networks: addresses,
        host_network,
    };
    let stop = StopSpec::new(stop_signal.as_deref(), stop_timeout, &info);
    Inspected { info, run, stop }
}

/// The `kill` event's signal and time, if it is one.
fn kill_of(msg: &EventMessage) -> Option<Kill> {
    if msg.action.as_deref() != Some("kill") {
        return None;
    }
    let signal = msg.actor.as_ref()?.attributes.as_ref()?.get("signal")?;
    let sent_ns = msg
        .time_nano
        .or_else(|| msg.time.map(|t| t.saturating_mul(1_000_000_000)))?;
    // The event may be a replay from before a reconnect: date it back on our clock too, so
    // its drain ends when it would have. Clamped: the engine's clock is not ours.
    let age_ns = (unix_now_ns() - sent_ns).clamp(0, 3_600_000_000_000);
    let now = Instant::now();
    let sent = now
        .checked_sub(Duration::from_nanos(age_ns.unsigned_abs()))
        .unwrap_or(now);
    Some(Kill {
        signal: signal.trim().parse().ok()?,
        sent_ns,
        sent,
    })
}

/// The short (12-character) form of a container ID, as `docker ps` prints it.
fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// The answer to one inspection.
enum Outcome {
    Found(Box<Inspected>),
    Gone,
    Failed(String),
}

/// How far the watcher's first listing got. The desired set is published only once every
/// container of the first listing was inspected: a partial set would withdraw the rest.
#[derive(Debug)]
enum Phase {
    /// The engine has not been listed yet.
    Unlisted,
    /// Containers of the first listing whose inspection has not finished.
    Inspecting(HashSet<String>),
    /// The first listing was inspected whole; every change is published.
    Ready,
}

/// Whether the engine was ever reached, for what `run` logs when it (re)connects. Every way
/// out of a connected stream marks it `Down`.
#[derive(Debug, Clone, Copy)]
enum Link {
    /// Never reached yet.
    Connecting,
    /// Lost at least once; reconnecting with backoff.
    Down,
}

/// The Docker side: events and inspections in, desired service sets out.
pub struct Watcher {
    docker: Docker,
    opts: DeriveOptions,
    deregister: Deregister,
    /// Whether an unhealthy container is withdrawn or registered with a failing check.
    gate: HealthGate,
    resync: Option<Duration>,
    tx: watch::Sender<Desired>,
    tracker: Tracker,
    /// Services per container ID.
    services: HashMap<String, Vec<Service>>,
    /// Name and stop spec of every container inspected, for judging `kill` events at once.
    known: HashMap<String, Known>,
    /// Containers sent their stop signal, still finishing their work.
    drains: Drains,
    /// `(container, key)` pairs already warned about.
    warned: HashSet<(String, String)>,
    /// Which container holds each service ID (see [`crate::derive::claim_ids`]).
    id_owners: BTreeMap<String, String>,
    /// `(service ID, refused container)` pairs already warned about.
    warned_duplicates: HashSet<(String, String)>,
    /// Containers whose failed inspection is retried.
    retry: HashSet<String>,
    /// How far the first listing got: nothing is published before it was inspected whole.
    phase: Phase,
    sem: Arc<Semaphore>,
    results_tx: mpsc::UnboundedSender<(String, u64, Outcome)>,
    results_rx: mpsc::UnboundedReceiver<(String, u64, Outcome)>,
}

/// What the last inspection of a container said that a `kill` event needs.
#[derive(Debug)]
struct Known {
    name: String,
    stop: StopSpec,
}

fn unix_now() -> i64 {
    unix_now_ns() / 1_000_000_000
}

fn unix_now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Watcher {
    /// A watcher publishing into `tx`.
    pub fn new(
        docker: Docker,
        opts: DeriveOptions,
        deregister: Deregister,
        gate: HealthGate,
        resync: Option<Duration>,
        tx: watch::Sender<Desired>,
    ) -> Self {
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        Watcher {
            docker,
            opts,
            deregister,
            gate,
            resync,
            tx,
            tracker: Tracker::default(),
            services: HashMap::new(),
            known: HashMap::new(),
            drains: Drains::default(),
            warned: HashSet::new(),
            id_owners: BTreeMap::new(),
            warned_duplicates: HashSet::new(),
            retry: HashSet::new(),
            phase: Phase::Unlisted,
            sem: Arc::new(Semaphore::new(INSPECT_CONCURRENCY)),
            results_tx,
            results_rx,
        }
    }

    /// Runs until `shutdown`, reconnecting to the engine whenever its event stream stops.
    pub async fn run(mut self, shutdown: Shutdown) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        // A second of overlap: replayed events only cause harmless re-inspections.
        let mut since = unix_now() - 1;
        let mut link = Link::Connecting;
        let mut resync_tick =
            tokio::time::interval(self.resync.unwrap_or(Duration::from_secs(86_400)));
        resync_tick.tick().await;
        let mut retry_tick = tokio::time::interval(INSPECT_RETRY);
        loop {
            let filters = HashMap::from([
                ("type".to_string(), vec!["container".to_string()]),
                (
                    "event".to_string(),
                    EVENTS.iter().map(|e| e.to_string()).collect(),
                ),
            ]);
            let mut events = self.docker.events(Some(EventsOptions {
                since: Some(since.to_string()),
                until: None,
                filters: Some(filters),
            }));
            let listed = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.list_and_mark() => r,
            };
            match listed {
                Ok(n) => {
                    crate::metrics::docker_ok();
                    match link {
                        Link::Down => {
                            info!("docker engine reachable again; resynced {n} running containers")
                        }
                        Link::Connecting => info!("watching docker: {n} running containers"),
                    }
                    backoff.reset();
                    loop {
                        let drain_ends = self.drains.next_deadline();
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            ev = events.next() => match ev {
                                Some(Ok(msg)) => {
                                    since = msg.time.unwrap_or(since).max(since);
                                    self.event(msg);
                                }
                                Some(Err(e)) => {
                                    crate::metrics::docker_failed(&e);
                                    warn!("docker event stream failed: {e}; reconnecting");
                                    link = Link::Down;
                                    break;
                                }
                                None => {
                                    crate::metrics::docker_failed(&"ended");
                                    warn!("docker event stream ended; reconnecting");
                                    link = Link::Down;
                                    break;
                                }
                            },
                            Some((id, gen, outcome)) = self.results_rx.recv() => {
                                self.apply(&id, gen, outcome);
                            }
                            _ = resync_tick.tick(), if self.resync.is_some() => {
                                debug!("periodic resync");
                                if let Err(e) = self.list_and_mark().await {
                                    warn!("resync failed: {e}");
                                }
                            }
                            _ = retry_tick.tick(), if !self.retry.is_empty() => {
                                for id in std::mem::take(&mut self.retry) {
                                    self.mark(&id);
                                }
                            }
                            _ = tokio::time::sleep_until(drain_ends.unwrap_or_else(Instant::now)),
                                if drain_ends.is_some() => {
                                for id in self.drains.take_expired(Instant::now()) {
                                    let name = self.known.get(&id).map_or(id.as_str(), |k| &k.name);
                                    info!("container {name} outlived its stop timeout after its stop signal; serving it again if it still runs");
                                    self.mark(&id);
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    crate::metrics::docker_failed(&format_args!("cannot list containers: {e}"));
                    if !matches!(link, Link::Down) {
                        warn!("cannot list docker containers: {e}; retrying");
                    }
                    link = Link::Down;
                }
            }
            drop(events);
            // Keep applying inspections that were in flight while waiting to reconnect.
            let wait = backoff.next_delay();
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(deadline) => break,
                    Some((id, gen, outcome)) = self.results_rx.recv() => self.apply(&id, gen, outcome),
                }
            }
        }
    }

    /// Lists running containers and marks them and every container we know for inspection.
    async fn list_and_mark(&mut self) -> Result<usize, bollard::errors::Error> {
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: false,
                ..Default::default()
            }))
            .await?;
        let mut ids: HashSet<String> = list.into_iter().filter_map(|c| c.id).collect();
        let n = ids.len();
        if matches!(self.phase, Phase::Unlisted) {
            if ids.is_empty() {
                self.phase = Phase::Ready;
                self.publish();
            } else {
                self.phase = Phase::Inspecting(ids.clone());
            }
        }
        ids.extend(self.tracker.ids().cloned());
        ids.extend(self.services.keys().cloned());
        for id in ids {
            self.mark(&id);
        }
        Ok(n)
    }

    /// One Docker event: marks the container for inspection, and a `kill` with the container's
    /// stop signal withdraws its services at once, without waiting for the inspection (the
    /// process is exiting; every millisecond it stays in the store it may get a new request).
    fn event(&mut self, msg: EventMessage) {
        let Some(id) = msg.actor.as_ref().and_then(|a| a.id.clone()) else {
            return;
        };
        let action = msg.action.as_deref().unwrap_or_default();
        crate::metrics::docker_event(action, EVENTS);
        debug!("docker event {action} {id}");
        if let Some(kill) = kill_of(&msg) {
            let known = self.known.get(&id);
            if self.drains.kill(&id, kill, known.map(|k| &k.stop))
                && self.services.remove(&id).is_some()
            {
                let name = known.map_or(id.as_str(), |k| &k.name);
                info!("container {name} got its stop signal ({}): withdrawing its services while it stops", kill.signal);
                if matches!(self.phase, Phase::Ready) {
                    self.publish();
                }
            }
        }
        self.mark(&id);
    }

    /// Schedules an inspection of `id` (or a follow-up one if one is running).
    fn mark(&mut self, id: &str) {
        if let Some(gen) = self.tracker.mark(id) {
            self.spawn_inspect(id.to_string(), gen);
        }
    }

    fn spawn_inspect(&self, id: String, gen: u64) {
        let docker = self.docker.clone();
        let sem = self.sem.clone();
        let tx = self.results_tx.clone();
        tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            let outcome = match docker.inspect_container(&id, None).await {
                Ok(resp) => Outcome::Found(Box::new(extract(resp))),
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => Outcome::Gone,
                Err(e) => Outcome::Failed(e.to_string()),
            };
            let _ = tx.send((id, gen, outcome));
        });
    }

    /// Applies one inspection result, then publishes the desired set if it changed.
    fn apply(&mut self, id: &str, gen: u64, outcome: Outcome) {
        let ok = !matches!(outcome, Outcome::Failed(_));
        let (apply, next) = self.tracker.finish(id, gen, ok);
        if let Some(g) = next {
            self.spawn_inspect(id.to_string(), g);
        }
        if apply {
            match outcome {
                Outcome::Gone => self.remove(id),
                Outcome::Found(found) => {
                    let Inspected { info, run, stop } = *found;
                    let draining = self.drains.inspected(
                        id,
                        &stop,
                        run.running,
                        run.started_ns,
                        Instant::now(),
                    );
                    self.known.insert(
                        id.to_string(),
                        Known {
                            name: info.name.clone(),
                            stop,
                        },
                    );
                    match decide(&run, draining, self.deregister, self.gate) {
                        Decision::Serve => {
                            let mut d = derive(&info, &self.opts);
                            follow_health(&mut d.services, run.health.as_deref(), self.gate);
                            for w in d.warnings {
                                if self.warned.insert((id.to_string(), w.key.clone())) {
                                    warn!(
                                        "container {}: ignoring {}={:?}: expected {}",
                                        info.name, w.key, w.value, w.expected
                                    );
                                }
                            }
                            if d.services.is_empty() {
                                self.services.remove(id);
                            } else {
                                self.services.insert(id.to_string(), d.services);
                            }
                        }
                        Decision::Withdraw => {
                            self.services.remove(id);
                        }
                        Decision::Keep => {}
                    }
                }
                Outcome::Failed(_) => {}
            }
        } else if let Outcome::Failed(e) = &outcome {
            debug!("inspecting {id} failed: {e}; will retry");
            self.retry.insert(id.to_string());
        }
        if let Phase::Inspecting(pending) = &mut self.phase {
            pending.remove(id);
            if pending.is_empty() {
                self.phase = Phase::Ready;
            }
        }
        if matches!(self.phase, Phase::Ready) {
            self.publish();
        }
    }

    fn remove(&mut self, id: &str) {
        self.services.remove(id);
        self.known.remove(id);
        self.drains.forget(id);
        self.warned.retain(|(c, _)| c != id);
        self.tracker.forget(id);
    }

    /// Sends the desired set if it differs from the last one sent.
    ///
    /// Two containers asking for one service ID (the same `SERVICE_ID`) get one registration:
    /// the container that holds it keeps it, and each refused one is warned about once.
    fn publish(&mut self) {
        let claims = crate::derive::claim_ids(
            self.services
                .iter()
                .map(|(c, v)| (c.as_str(), v.as_slice())),
            &self.id_owners,
        );
        for d in &claims.duplicates {
            for refused in &d.refused {
                if self
                    .warned_duplicates
                    .insert((d.id.clone(), refused.clone()))
                {
                    warn!(
                        "container {}: service ID {} is already registered for container {}; not registering it twice (set a distinct SERVICE_ID)",
                        short(refused),
                        switchboard::excerpt(&d.id),
                        short(&d.kept)
                    );
                }
            }
        }
        self.warned_duplicates.retain(|(id, c)| {
            claims
                .duplicates
                .iter()
                .any(|d| d.id == *id && d.refused.contains(c))
        });
        self.id_owners = claims.owners;
        let set: ServiceSet = claims.services;
        let changed = self.tx.send_if_modified(|cur| {
            if cur.as_deref() == Some(&set) {
                false
            } else {
                *cur = Some(Arc::new(set));
                true
            }
        });
        crate::metrics::published(changed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_orders_inspections() {
        let mut t = Tracker::default();
        // start -> inspect gen 1; die arrives while it runs -> no second inspection yet.
        assert_eq!(t.mark("c"), Some(1));
        assert_eq!(t.mark("c"), None);
        assert_eq!(t.mark("c"), None);
        // gen 1 returns: applied, and one follow-up for the latest generation.
        assert_eq!(t.finish("c", 1, true), (true, Some(3)));
        // A stale duplicate of gen 1 can never be applied after it.
        assert_eq!(t.finish("c", 1, true), (false, None));
        assert_eq!(t.finish("c", 3, true), (true, None));
        // A failed inspection is not applied and not retried here (the caller re-marks).
        assert_eq!(t.mark("c"), Some(4));
        assert_eq!(t.finish("c", 4, false), (false, None));
        assert_eq!(t.mark("c"), Some(5));
        assert_eq!(t.finish("c", 5, true), (true, None));
        t.forget("c");
        assert_eq!(t.ids().count(), 0);
        // Forgetting keeps containers with pending work.
        assert_eq!(t.mark("d"), Some(1));
        t.forget("d");
        assert_eq!(t.ids().count(), 1);
        assert_eq!(t.finish("unknown", 1, true), (false, None));
    }

    #[test]
    fn decisions() {
        use Decision::*;
        use Deregister::*;
        let st = |running, paused, health: Option<&str>, exit_code| RunState {
            running,
            paused,
            health: health.map(String::from),
            exit_code,
            started_ns: None,
        };
        // (state, draining, mode, decision)
        let cases = [
            (st(true, false, None, 0), false, Always, Serve),
            (st(true, false, Some("healthy"), 0), false, Always, Serve),
            (
                st(true, false, Some("starting"), 0),
                false,
                Always,
                Withdraw,
            ),
            (
                st(true, false, Some("unhealthy"), 0),
                false,
                Always,
                Withdraw,
            ),
            (st(true, true, None, 0), false, Always, Withdraw),
            (st(false, false, None, 0), false, Always, Withdraw),
            (st(false, false, None, 137), false, Always, Withdraw),
            (st(false, false, None, 0), false, OnSuccess, Withdraw),
            (st(false, false, None, 1), false, OnSuccess, Keep),
            (st(true, false, None, 1), false, OnSuccess, Serve),
            // Sent its stop signal: it takes no new clients, healthy or not, in any mode.
            (st(true, false, None, 0), true, Always, Withdraw),
            (st(true, false, Some("healthy"), 0), true, Always, Withdraw),
            (st(true, false, None, 0), true, OnSuccess, Withdraw),
            // Once it exited, the mode decides as before.
            (st(false, false, None, 1), true, OnSuccess, Keep),
        ];
        for (state, draining, mode, want) in cases {
            assert_eq!(
                decide(&state, draining, mode, HealthGate::Withdraw),
                want,
                "{state:?} draining={draining} {mode:?}"
            );
        }
        // With checks in the store, health no longer gates: the check tells. Draining,
        // pausing and stopping still withdraw.
        let cases = [
            (st(true, false, Some("unhealthy"), 0), false, Serve),
            (st(true, false, Some("starting"), 0), false, Serve),
            (st(true, false, Some("healthy"), 0), false, Serve),
            (st(true, false, Some("unhealthy"), 0), true, Withdraw),
            (st(true, true, Some("healthy"), 0), false, Withdraw),
            (st(false, false, Some("unhealthy"), 0), false, Withdraw),
        ];
        for (state, draining, want) in cases {
            assert_eq!(
                decide(&state, draining, Always, HealthGate::Check),
                want,
                "{state:?} draining={draining}"
            );
        }
    }

    #[test]
    fn health_follows_docker_only_with_checks() {
        let svc = || Service {
            id: "h:c:80".into(),
            name: "web".into(),
            address: "10.0.0.1".into(),
            port: 80,
            tags: vec![],
            meta: Default::default(),
            check: None,
            ttl: None,
            docker_health: None,
        };
        let cases = [
            (
                Some("unhealthy"),
                HealthGate::Check,
                Some(DockerHealth::Unhealthy),
            ),
            (
                Some("starting"),
                HealthGate::Check,
                Some(DockerHealth::Starting),
            ),
            (
                Some("healthy"),
                HealthGate::Check,
                Some(DockerHealth::Healthy),
            ),
            (None, HealthGate::Check, None),
            (Some("healthy"), HealthGate::Withdraw, None),
        ];
        for (health, gate, want) in cases {
            let mut services = vec![svc(), svc()];
            follow_health(&mut services, health, gate);
            assert!(
                services.iter().all(|s| s.docker_health == want),
                "{health:?} {gate:?}"
            );
        }
        assert_eq!(HealthGate::of("consul"), HealthGate::Check);
        assert_eq!(HealthGate::of("consulkv"), HealthGate::Withdraw);
        assert_eq!(HealthGate::of("etcd"), HealthGate::Withdraw);
    }

    #[test]
    fn extracts_inspect_data() {
        let json = serde_json::json!({
            "Id": "abc",
            "Name": "/web1",
            "Config": {
                "Image": "team/web:1",
                "Env": ["SERVICE_NAME=x"],
                "Labels": {"l": "v"},
                "ExposedPorts": {"80/tcp": {}, "53/udp": {}, "9000/tcp": {}},
                "StopSignal": "SIGQUIT",
                "StopTimeout": 3
            },
            "State": {"Running": true, "Paused": false, "Restarting": false, "ExitCode": 0,
                      "StartedAt": "1970-01-01T00:00:01.5Z",
                      "Health": {"Status": "starting"}},
            "HostConfig": {"NetworkMode": "default"},
            "NetworkSettings": {
                "Ports": {
                    "80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "32768"},
                               {"HostIp": "::", "HostPort": "32768"}],
                    "53/udp": [{"HostIp": "0.0.0.0", "HostPort": "32769"}],
                    "9000/tcp": null
                },
                "Networks": {"bridge": {"IPAddress": "172.17.0.3"}}
            }
        });
        let resp: ContainerInspectResponse = serde_json::from_value(json).unwrap();
        let Inspected {
            info,
            run: state,
            stop,
        } = extract(resp);
        assert_eq!(info.name, "web1");
        assert_eq!(info.image, "team/web:1");
        assert_eq!(info.ip.as_deref(), Some("172.17.0.3"));
        assert!(!info.host_network);
        let ports: Vec<_> = info
            .ports
            .iter()
            .map(|p| (p.port, p.proto.as_str(), p.bindings.len()))
            .collect();
        assert_eq!(
            ports,
            vec![(53, "udp", 1), (80, "tcp", 2), (9000, "tcp", 0)]
        );
        assert_eq!(state.health.as_deref(), Some("starting"));
        assert!(state.running);
        assert_eq!(state.started_ns, Some(1_500_000_000));
        assert_eq!(stop.signal, Some(libc::SIGQUIT));
        assert_eq!(stop.timeout, Some(Duration::from_secs(3)));
        assert!(stop.drain);
    }

    fn kill_event(action: &str, signal: Option<&str>, time_nano: Option<i64>) -> EventMessage {
        let mut attributes = HashMap::from([("name".to_string(), "web".to_string())]);
        if let Some(s) = signal {
            attributes.insert("signal".into(), s.into());
        }
        EventMessage {
            action: Some(action.into()),
            actor: Some(bollard::models::EventActor {
                id: Some("abc".into()),
                attributes: Some(attributes),
            }),
            time: time_nano.map(|t| t / 1_000_000_000),
            time_nano,
            ..Default::default()
        }
    }

    #[test]
    fn reads_kill_events() {
        let now = unix_now_ns();
        let k = kill_of(&kill_event("kill", Some("15"), Some(now))).unwrap();
        assert_eq!((k.signal, k.sent_ns), (15, now));
        assert!(k.sent <= Instant::now());
        // A replayed event is dated back on our clock too.
        let old = kill_of(&kill_event("kill", Some("15"), Some(now - 2_000_000_000))).unwrap();
        assert!(old.sent + Duration::from_millis(1500) < k.sent + Duration::from_millis(1));
        assert!(kill_of(&kill_event("die", Some("15"), Some(now))).is_none());
        assert!(kill_of(&kill_event("kill", None, Some(now))).is_none());
        assert!(kill_of(&kill_event("kill", Some("TERM"), Some(now))).is_none());
        assert!(kill_of(&kill_event("kill", Some("15"), None)).is_none());
    }
}
