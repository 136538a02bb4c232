//! The floor under registrator's latency: the least a registrator must do
//! for a container's `start` event, run beside the real one on the same engine and store.
//!
//! For each `start` event of the run's containers (one bollard event stream, filtered by the
//! run's label on the engine's side) a task of its own inspects the container once and writes
//! one registration: no listing, no bookkeeping, no ordering between containers, no
//! verification. Registrator does more than this for every event (it cannot skip ordering or
//! the desired-set bookkeeping); the floor says how much of its latency is the engine and the
//! store themselves. Each stage is timed on the wall clock `docker events` stamps, so the
//! engine's share (event delivery, inspection) shows apart from the store's.

use crate::common::now_ns;
use bollard::query_parameters::EventsOptions;
use bollard::Docker;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use switchboard::{Service, Store};

/// When each stage of one container's floor registration ended (ns since the epoch).
#[derive(Debug, Clone, Copy, Default)]
pub struct Stages {
    /// The engine's `start` event timestamp.
    pub event: u128,
    /// The event reached the floor's stream.
    pub received: u128,
    /// The inspection returned.
    pub inspected: u128,
    /// The store acknowledged the write.
    pub written: u128,
}

/// The floor watcher, stopped on drop.
pub struct Floor {
    stages: Arc<Mutex<HashMap<String, Stages>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Floor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The registration the floor writes for container `name` publishing container port 80 on
/// `host_port`: service `service`, ID `floor:<name>:80` (an ID space registrator never uses).
pub fn floor_service(service: &str, name: &str, host_port: u16) -> Service {
    Service {
        id: format!("floor:{name}:80"),
        name: service.to_string(),
        address: "127.0.0.1".into(),
        port: host_port,
        tags: vec![],
        meta: Default::default(),
        check: None,
        ttl: None,
        docker_health: None,
    }
}

impl Floor {
    /// Subscribes to the `start` events of the containers labelled `switchboard.bench=<run>`
    /// and registers each under `service` in `store`. Returns once the subscription is in
    /// place (the engine answered a ping), so no start of the run is missed.
    pub async fn start(run: &str, service: &str, store: Store) -> Floor {
        let docker = Docker::connect_with_defaults()
            .expect("docker client")
            .negotiate_version()
            .await
            .expect("docker engine version");
        let stages: Arc<Mutex<HashMap<String, Stages>>> = Arc::default();
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("event".to_string(), vec!["start".to_string()]),
            (
                "label".to_string(),
                vec![format!("switchboard.bench={run}")],
            ),
        ]);
        // Replays from a second ago, as `DockerEvents` does: a start before the stream is
        // established still arrives.
        let since = (now_ns() / 1_000_000_000 - 1).to_string();
        let mut events = docker.events(Some(EventsOptions {
            since: Some(since),
            until: None,
            filters: Some(filters),
        }));
        let (s2, service) = (stages.clone(), service.to_string());
        let task = tokio::spawn(async move {
            while let Some(Ok(msg)) = events.next().await {
                let received = now_ns();
                let Some(id) = msg.actor.and_then(|a| a.id) else {
                    continue;
                };
                let event = msg.time_nano.unwrap_or_default().max(0) as u128;
                let (docker, store, stages, service) =
                    (docker.clone(), store.clone(), s2.clone(), service.clone());
                tokio::spawn(async move {
                    let Ok(resp) = docker.inspect_container(&id, None).await else {
                        return;
                    };
                    let inspected = now_ns();
                    let name = resp.name.unwrap_or_default();
                    let name = name.trim_start_matches('/').to_string();
                    let port = resp
                        .network_settings
                        .and_then(|n| n.ports)
                        .and_then(|p| p.get("80/tcp").cloned().flatten())
                        .and_then(|b| b.into_iter().find_map(|b| b.host_port?.parse().ok()));
                    let Some(port) = port else { return };
                    if store
                        .register(&floor_service(&service, &name, port))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let st = Stages {
                        event,
                        received,
                        inspected,
                        written: now_ns(),
                    };
                    stages.lock().unwrap().entry(name).or_insert(st);
                });
            }
        });
        Floor { stages, task }
    }

    /// The stages of container `name`'s registration, once written.
    pub fn get(&self, name: &str) -> Option<Stages> {
        self.stages.lock().unwrap().get(name).copied()
    }
}

/// `a / b` of two durations, or `-` when `b` is zero.
pub fn ratio(a: std::time::Duration, b: std::time::Duration) -> String {
    if b.is_zero() {
        return "-".into();
    }
    format!("{:.2}", a.as_secs_f64() / b.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ratios() {
        let ms = Duration::from_millis;
        assert_eq!(ratio(ms(30), ms(20)), "1.50");
        assert_eq!(ratio(ms(20), ms(20)), "1.00");
        assert_eq!(ratio(ms(5), ms(0)), "-");
    }

    #[test]
    fn floor_ids_are_not_registrator_ids() {
        let s = floor_service("floor1", "sbtest-bench-x-0", 32768);
        assert_eq!(s.id, "floor:sbtest-bench-x-0:80");
        assert_eq!((s.name.as_str(), s.port), ("floor1", 32768));
    }
}
