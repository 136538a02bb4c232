//! registrator: registers published Docker container ports as services in Consul or etcd,
//! a drop-in for gliderlabs/registrator.
//!
//! The moving parts, one module each:
//! - `cli`: the command line (Go-style flags included) -> [`Config`].
//! - `derive`: container -> services, gliderlabs' rules, pure.
//! - `docker`: events and inspections -> the desired service set.
//! - `engine`: which Docker engine, and how (`DOCKER_HOST`, `DOCKER_TLS_VERIFY`,
//!   `DOCKER_CERT_PATH`).
//! - `drain`: a container's stop signal withdraws its services before its process exits.
//! - `sync`: desired set -> store writes, with adoption at start, verification, cleanup, TTLs
//!   and outages.
//! - `host`: this host's name and address.
//! - `scope`: `--scope-label`, read from registrator's own container.

mod cli;
mod config;
mod derive;
mod docker;
mod drain;
mod engine;
mod host;
mod metrics;
mod scope;
mod sync;

pub use cli::{healthcheck_url, parse, CliExit};
pub use config::{Config, Deregister};
pub use derive::{derive, ContainerInfo, ContainerPort, DeriveOptions, Derived, Warning};
pub use engine::Engine;
pub use host::{hostname, primary_address};

use anyhow::{bail, Context};
use std::time::Duration;
use switchboard::store::StoreSettings;
use switchboard::{Shutdown, Store};
use tokio::sync::watch;
use tracing::{info, warn};

/// Runs the registrator until `shutdown` fires, then returns, leaving its registrations for
/// the next registrator to adopt (unless `deregister_on_exit`). Fails when the store or the
/// Docker engine cannot be reached at start.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let host_ip = match &config.ip {
        Some(ip) => ip.clone(),
        None => {
            match host::primary_address() {
                Some(ip) => ip.to_string(),
                None => {
                    warn!("cannot find a non-loopback address for this host; using 127.0.0.1 (set -ip)");
                    "127.0.0.1".to_string()
                }
            }
        }
    };
    info!(
        "registrator {} starting: store {}, hostname {}, host address {host_ip}",
        switchboard::VERSION,
        config.uri.primary(),
        config.hostname
    );
    if let Some(addr) = config.metrics_addr {
        let server = switchboard::telemetry::TelemetryServer::bind("--metrics-addr", addr)
            .await
            .map_err(anyhow::Error::msg)?;
        info!("serving /metrics and /healthz on {}", server.local_addr()?);
        let t = &*metrics::TELEMETRY;
        tokio::spawn(server.serve(&t.registry, t.health.clone(), shutdown.clone()));
    }
    for why in config.ineffective_flags() {
        warn!("{why}");
    }
    // The environment is read once, here: TLS files and the token are the store's business.
    let settings = StoreSettings::from_env(&config.uri).context("store settings")?;
    let store = Store::with_settings(&config.uri, &settings).context("store settings")?;
    if !connect_store(&store, &config, &shutdown).await? {
        return Ok(());
    }
    let Some(docker) = connect_docker(&config, &shutdown).await? else {
        return Ok(());
    };
    let mut label_filter = config.label_filter.clone();
    if let Some(key) = &config.scope_label {
        let only = scope::resolve(&docker, key).await?;
        info!(
            "--scope-label {key}: registering only containers labelled {key}={:?}",
            switchboard::excerpt(only.value.as_deref().unwrap_or_default())
        );
        label_filter.push(only);
    }

    let (tx, rx) = watch::channel(None);
    let opts = DeriveOptions {
        hostname: config.hostname.clone(),
        host_ip,
        ip: config.ip.clone(),
        internal: config.internal,
        explicit: config.explicit,
        tags: config.tags.clone(),
        ttl: config.ttl,
        use_ip_from_label: config.use_ip_from_label.clone(),
        network: config.network.clone(),
        label_filter,
    };
    let gate = docker::HealthGate::of(store.kind());
    let watcher = docker::Watcher::new(docker, opts, config.deregister, gate, config.resync, tx);
    let syncer = sync::Syncer::new(
        store,
        sync::SyncOptions {
            host_prefix: format!("{}:", config.hostname),
            cleanup: config.cleanup,
            deregister_on_exit: config.deregister_on_exit,
            verify_interval: config.verify_interval,
            ttl_refresh: config.ttl.map(|_| config.ttl_refresh),
        },
    );
    // The watcher stops with the syncer's token too; the syncer finishes its exit (with
    // --deregister-on-exit, the deregistrations) before returning.
    let stop = shutdown.child_token();
    let mut watch_task = tokio::spawn(watcher.run(stop.clone()));
    let mut sync_task = tokio::spawn(syncer.run(rx, stop.clone()));
    tokio::select! {
        r = &mut watch_task => {
            // It only returns on shutdown; anything else is a bug (a panic): drain and fail.
            stop.cancel();
            let _ = sync_task.await;
            if !shutdown.is_cancelled() {
                bail!("docker watcher stopped unexpectedly: {r:?}");
            }
        }
        r = &mut sync_task => {
            stop.cancel();
            let _ = watch_task.await;
            if let Err(e) = r {
                bail!("store syncer failed: {e}");
            }
        }
    }
    info!("stopped");
    Ok(())
}

/// Connects to the Docker engine and agrees on an API version, retrying per
/// `-retry-attempts`/`-retry-interval` as for the store. Returns `Ok(None)` when shutdown came
/// first. Errors are one line naming `DOCKER_HOST` and the file or the failure.
async fn connect_docker(
    config: &Config,
    shutdown: &Shutdown,
) -> anyhow::Result<Option<bollard::Docker>> {
    let engine = Engine::from_env().map_err(anyhow::Error::msg)?;
    let client = engine.connect().map_err(anyhow::Error::msg)?;
    let mut attempt: u32 = 0;
    loop {
        // negotiate_version falls back to the client's version when the engine does not
        // answer, so the ping is what proves the engine (and its TLS) is reachable.
        let err = match client.ping().await {
            Ok(_) => match client.clone().negotiate_version().await {
                Ok(d) => {
                    info!("docker engine: {}", engine.describe());
                    return Ok(Some(d));
                }
                Err(e) => e,
            },
            Err(e) => e,
        };
        let why = engine::describe_failure(&engine, &err);
        if config.retry_attempts.is_some_and(|max| attempt >= max) {
            bail!(
                "{why} (after {} attempt(s); see -retry-attempts)",
                attempt + 1
            );
        }
        attempt += 1;
        warn!("Docker engine not reachable yet ({why}); retrying");
        tokio::select! {
            _ = tokio::time::sleep(config.retry_interval.max(Duration::from_millis(1))) => {}
            _ = shutdown.cancelled() => return Ok(None),
        }
    }
}

/// Pings the store, retrying per `-retry-attempts`/`-retry-interval`. Returns `Ok(false)` when
/// shutdown came first.
async fn connect_store(
    store: &Store,
    config: &Config,
    shutdown: &Shutdown,
) -> anyhow::Result<bool> {
    let mut attempt: u32 = 0;
    loop {
        let err = match metrics::store_request("ping", store.ping()).await {
            Ok(()) => {
                metrics::store_ok();
                return Ok(true);
            }
            Err(e) => e,
        };
        metrics::store_failed(store.kind(), &err);
        if config.retry_attempts.is_some_and(|max| attempt >= max) {
            // "Reach" only when it did not answer: a refused certificate or token is a
            // different fix for the operator.
            let verb = match err {
                switchboard::StoreError::Unreachable { .. } => "reach",
                _ => "use",
            };
            return Err(err).with_context(|| {
                format!(
                    "cannot {verb} the {} store at {} after {} attempt(s) (see -retry-attempts)",
                    store.kind(),
                    config.uri.primary(),
                    attempt + 1
                )
            });
        }
        attempt += 1;
        warn!("{} store not reachable yet ({err}); retrying", store.kind());
        tokio::select! {
            _ = tokio::time::sleep(config.retry_interval.max(Duration::from_millis(1))) => {}
            _ = shutdown.cancelled() => return Ok(false),
        }
    }
}
