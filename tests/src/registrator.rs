//! The `registrator` binary under test and what it writes to the stores, shared by the
//! `registrator_*` test binaries: how it is started, the containers it registers, and the
//! waits and reads on Consul and etcd that show a registration arriving, staying or leaving.
//!
//! A registration's service ID is `<hostname>:<container>:<port>` ([`id_of`]): other tests'
//! containers run on the same engine, so every read here looks at one ID, never at a count.
//! [`Registry`] puts "registered" in the same words for both stores, so one scenario runs
//! against each, and [`Presence`] watches a registration without pause through what should
//! not disturb it (a registrator restart).

use crate::consul::Consul;
use crate::docker::{Container, TEST_IMAGE};
use crate::etcd::Etcd;
use crate::poll::wait_for;
use crate::process::{bin, hostname, Process};
use serde_json::Value;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long any one wait of these tests may take.
pub const WAIT: Duration = Duration::from_secs(30);

/// The registrator with `-ip 127.0.0.1` (predictable addresses) and a fast store
/// verification, then `args`, then the URI.
pub fn registrator(uri: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
    let mut full = vec!["-ip", "127.0.0.1", "--verify-interval", "1"];
    full.extend_from_slice(args);
    full.push(uri);
    Process::spawn(&bin("registrator"), &full, env)
}

/// A container serving HTTP on port 80, published on a random host port; `opts` go before
/// the image.
pub fn web(tag: &str, opts: &[&str]) -> Container {
    let mut args = vec!["-p", "80"];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[TEST_IMAGE, "httpd", "-f", "-p", "80", "-h", "/www"]);
    Container::run(tag, &args)
}

/// The service ID registrator gives `c`'s `port` (`<hostname>:<container>:<port>`).
pub fn id_of(c: &Container, port: &str) -> String {
    format!("{}:{}:{port}", hostname(), c.name)
}

/// Waits until the agent has service `id`; returns its view of it.
pub async fn wait_consul(consul: &Consul, id: &str) -> Value {
    wait_for(&format!("{id} in Consul"), WAIT, || {
        consul.agent_service(id)
    })
    .await
}

/// Waits until the agent no longer has service `id`.
pub async fn wait_consul_gone(consul: &Consul, id: &str) {
    wait_for(&format!("{id} gone from Consul"), WAIT, || async {
        consul.agent_service(id).await.is_none().then_some(())
    })
    .await
}

/// The etcd key and value (JSON) of a service ID under `/<prefix>/`, if registered.
pub async fn etcd_service(etcd: &Etcd, prefix: &str, id: &str) -> Option<(String, Value)> {
    etcd.get_prefix(&format!("/{prefix}/"))
        .await
        .into_iter()
        .find(|(k, _)| k.ends_with(&format!("/{id}")))
        .map(|(k, v)| (k, serde_json::from_str(&v).unwrap()))
}

/// Waits until service `id` is under `/<prefix>/`; returns its key and value.
pub async fn wait_etcd(etcd: &Etcd, prefix: &str, id: &str) -> (String, Value) {
    wait_for(&format!("{id} in etcd"), WAIT, || {
        etcd_service(etcd, prefix, id)
    })
    .await
}

/// Waits until service `id` is no longer under `/<prefix>/`.
pub async fn wait_etcd_gone(etcd: &Etcd, prefix: &str, id: &str) {
    wait_for(&format!("{id} gone from etcd"), WAIT, || async {
        etcd_service(etcd, prefix, id).await.is_none().then_some(())
    })
    .await
}

/// The store a scenario runs against, run by the test: "registered" means in Consul's
/// passing instances of the service (what confd renders), or under the etcd prefix
/// [`Registry::PREFIX`].
pub enum Registry {
    /// A Consul dev agent (agent services).
    Consul(Consul),
    /// An etcd member.
    Etcd(Etcd),
}

impl Registry {
    /// The etcd prefix registrations go under.
    pub const PREFIX: &'static str = "adopt";

    /// The store's URI, for the registrator.
    pub fn uri(&self) -> String {
        match self {
            Registry::Consul(c) => c.uri(),
            Registry::Etcd(e) => e.uri(Self::PREFIX),
        }
    }

    /// The store's name, for what a test prints.
    pub fn name(&self) -> &'static str {
        match self {
            Registry::Consul(_) => "consul",
            Registry::Etcd(_) => "etcd",
        }
    }

    /// Whether instance `id` of service `name` is registered (and, in Consul, passing).
    pub async fn present(&self, name: &str, id: &str) -> bool {
        match self {
            Registry::Consul(c) => consul_passing(&c.http(), name, id).await,
            Registry::Etcd(e) => etcd_key(&e.http(), &Self::key(name, id)).await.is_some(),
        }
    }

    /// Waits until `id` is [present](Registry::present).
    pub async fn wait_present(&self, name: &str, id: &str) {
        wait_for(&format!("{id} registered"), WAIT, || async {
            self.present(name, id).await.then_some(())
        })
        .await
    }

    /// Waits until `id` is no longer [present](Registry::present).
    pub async fn wait_absent(&self, name: &str, id: &str) {
        wait_for(&format!("{id} gone"), WAIT, || async {
            (!self.present(name, id).await).then_some(())
        })
        .await
    }

    /// A presence monitor on `id`.
    pub fn monitor(&self, name: &str, id: &str) -> Presence {
        match self {
            Registry::Consul(c) => {
                let (http, name, id) = (c.http(), name.to_string(), id.to_string());
                Presence::start(move || {
                    let (http, name, id) = (http.clone(), name.clone(), id.clone());
                    async move { consul_passing(&http, &name, &id).await }
                })
            }
            Registry::Etcd(e) => {
                let (http, key) = (e.http(), Self::key(name, id));
                Presence::start(move || {
                    let (http, key) = (http.clone(), key.clone());
                    async move { etcd_key(&http, &key).await.is_some() }
                })
            }
        }
    }

    /// What changes when a registration is removed and written again: Consul's catalog
    /// `(CreateIndex, ModifyIndex)`; etcd's `create_revision` (a put in place, e.g. to move
    /// the key to a new lease, keeps it).
    pub async fn identity(&self, name: &str, id: &str) -> Value {
        match self {
            Registry::Consul(c) => {
                let (create, modify) = consul_indexes(c, name, id).await.unwrap();
                serde_json::json!([create, modify])
            }
            Registry::Etcd(e) => {
                let kv = etcd_key(&e.http(), &Self::key(name, id)).await.unwrap();
                kv["create_revision"].clone()
            }
        }
    }

    /// The etcd lease a key hangs on (`None` for Consul or no lease).
    pub async fn lease(&self, name: &str, id: &str) -> Option<String> {
        match self {
            Registry::Consul(_) => None,
            Registry::Etcd(e) => etcd_key(&e.http(), &Self::key(name, id))
                .await?
                .get("lease")
                .and_then(Value::as_str)
                .map(String::from),
        }
    }

    /// The etcd key of instance `id` of service `name`.
    fn key(name: &str, id: &str) -> String {
        format!("/{}/{name}/{id}", Self::PREFIX)
    }
}

/// One etcd key with its metadata (`create_revision`, `mod_revision`, `lease`, as the JSON
/// gateway spells them), if present.
async fn etcd_key(etcd_http: &str, key: &str) -> Option<Value> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = serde_json::json!({ "key": b64.encode(key) });
    let v: Value = reqwest::Client::new()
        .post(format!("{etcd_http}/v3/kv/range"))
        .json(&body)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v["kvs"].as_array()?.first().cloned()
}

/// `(CreateIndex, ModifyIndex)` of a service instance in Consul's catalog.
async fn consul_indexes(consul: &Consul, name: &str, id: &str) -> Option<(u64, u64)> {
    let v = consul
        .get_json(&format!("/v1/catalog/service/{name}"))
        .await;
    let e = v.as_array()?.iter().find(|e| e["ServiceID"] == id)?;
    Some((e["CreateIndex"].as_u64()?, e["ModifyIndex"].as_u64()?))
}

/// Whether `id` is among the passing instances of `name` (what confd renders).
async fn consul_passing(http: &str, name: &str, id: &str) -> bool {
    let url = format!("{http}/v1/health/service/{name}?passing");
    let Ok(r) = reqwest::get(&url).await else {
        return false;
    };
    let Ok(v) = r.json::<Value>().await else {
        return false;
    };
    v.as_array()
        .is_some_and(|a| a.iter().any(|e| e["Service"]["ID"] == id))
}

/// How often a [`Presence`] monitor looks: far below the gap (about 0.7 s) a registrator
/// restart leaves when the registrator deregisters on exit and registers again at start.
const PRESENCE_EVERY: Duration = Duration::from_millis(20);

/// Watches one registration on a task, from `start` until `finish`, counting every look and
/// every look at which it was absent. A bounded loop (it gives up after two minutes), never a
/// sleep-wait.
pub struct Presence {
    looks: Arc<AtomicU32>,
    misses: Arc<AtomicU32>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Presence {
    /// Starts looking, with `present` saying whether the registration is there.
    pub fn start<F, Fut>(present: F) -> Presence
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = bool> + Send,
    {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let looks = Arc::new(AtomicU32::new(0));
        let misses = Arc::new(AtomicU32::new(0));
        let (l, m) = (looks.clone(), misses.clone());
        let task = tokio::spawn(async move {
            let limit = std::time::Instant::now() + Duration::from_secs(120);
            while !*stopped.borrow() && std::time::Instant::now() < limit {
                if !present().await {
                    m.fetch_add(1, Ordering::SeqCst);
                }
                l.fetch_add(1, Ordering::SeqCst);
                tokio::select! {
                    _ = tokio::time::sleep(PRESENCE_EVERY) => {}
                    _ = stopped.changed() => {}
                }
            }
        });
        Presence {
            looks,
            misses,
            stop,
            task,
        }
    }

    /// Waits until the monitor has looked `n` more times: a window it certainly covered.
    pub async fn cover(&self, n: u32) {
        let target = self.looks.load(Ordering::SeqCst) + n;
        wait_for(&format!("{n} more looks"), WAIT, || async {
            (self.looks.load(Ordering::SeqCst) >= target).then_some(())
        })
        .await
    }

    /// Stops watching: `(looks, misses)`.
    pub async fn finish(self) -> (u32, u32) {
        let _ = self.stop.send(true);
        self.task.await.unwrap();
        (
            self.looks.load(Ordering::SeqCst),
            self.misses.load(Ordering::SeqCst),
        )
    }
}
