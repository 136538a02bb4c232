//! A load generator that counts every failed request.
//!
//! "Zero failed requests" is only a claim if every request is counted: each client is a task
//! with its own keep-alive connection (as a browser or a service client holds one), sends
//! requests back to back and records each answer. A request fails when the transport fails
//! (refused, reset, closed without an answer, timed out) or the status is not 2xx. Load is
//! bounded both in time and in count, and goes to the address given (loopback in tests).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What each client sends.
#[derive(Debug, Clone)]
pub enum Request {
    /// `GET url`.
    Get,
    /// `POST url` with this body: not idempotent, so no proxy retries it on another server.
    Post(String),
}

/// How much load, for how long at most.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The URL every request goes to.
    pub url: String,
    /// What is sent.
    pub request: Request,
    /// Concurrent clients, each on its own keep-alive connection.
    pub clients: usize,
    /// The run stops after this many requests in all, even if not stopped before.
    pub max_requests: u64,
    /// ... or after this long.
    pub max_duration: Duration,
    /// A request with no answer within this is a failure.
    pub timeout: Duration,
    /// HTTPS: a PEM CA certificate the clients trust (beside the system's).
    pub ca_pem: Option<String>,
    /// The URL's host name goes to this address (so an `https://name:port/` URL sends SNI
    /// `name` to a loopback proxy).
    pub resolve: Option<(String, std::net::SocketAddr)>,
}

impl LoadSpec {
    /// `clients` keep-alive clients POSTing to `url`, at most 200,000 requests or 120 s.
    pub fn post(url: &str, clients: usize) -> LoadSpec {
        LoadSpec {
            url: url.to_string(),
            request: Request::Post("switchboard load".into()),
            clients,
            max_requests: 200_000,
            max_duration: Duration::from_secs(120),
            timeout: Duration::from_secs(10),
            ca_pem: None,
            resolve: None,
        }
    }

    /// Over HTTPS: trust `ca_pem`, and send the URL's host `name` to `addr`.
    pub fn https(mut self, ca_pem: &str, name: &str, addr: std::net::SocketAddr) -> LoadSpec {
        self.ca_pem = Some(ca_pem.to_string());
        self.resolve = Some((name.to_string(), addr));
        self
    }

    /// Like [`LoadSpec::post`] with GET requests.
    pub fn get(url: &str, clients: usize) -> LoadSpec {
        LoadSpec {
            request: Request::Get,
            ..LoadSpec::post(url, clients)
        }
    }
}

/// What a run saw.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Requests that got an answer or failed.
    pub requests: u64,
    /// Of those, failed.
    pub failed: u64,
    /// The first failures, each `+<ms since start> <reason>`.
    pub failures: Vec<String>,
    /// Successful answers by body (trimmed): which backend served how many.
    pub by_body: BTreeMap<String, u64>,
    /// How long the load ran.
    pub elapsed: Duration,
}

impl LoadReport {
    /// One line: `N requests, F failed in T s (first failures: ...)`.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} requests, {} failed in {:.1} s",
            self.requests,
            self.failed,
            self.elapsed.as_secs_f64()
        );
        if !self.failures.is_empty() {
            s.push_str(&format!(" (first failures: {})", self.failures.join("; ")));
        }
        s
    }
}

#[derive(Default)]
struct Shared {
    requests: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
    failures: Mutex<Vec<String>>,
    by_body: Mutex<BTreeMap<String, u64>>,
}

/// Load running in the background until [`Load::stop`].
pub struct Load {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    started: Instant,
}

/// How many failures are kept with their reason.
const KEPT_FAILURES: usize = 20;

impl Load {
    /// Starts the clients.
    pub fn start(spec: LoadSpec) -> Load {
        let shared = Arc::new(Shared::default());
        let started = Instant::now();
        let deadline = started + spec.max_duration;
        let tasks = (0..spec.clients)
            .map(|_| {
                let shared = shared.clone();
                let spec = spec.clone();
                tokio::spawn(async move {
                    // One connection per client, reused while the server keeps it open.
                    let mut http = reqwest::Client::builder()
                        .pool_max_idle_per_host(1)
                        .timeout(spec.timeout);
                    if let Some(pem) = &spec.ca_pem {
                        http = http.add_root_certificate(
                            reqwest::Certificate::from_pem(pem.as_bytes()).expect("a PEM CA"),
                        );
                    }
                    if let Some((name, addr)) = &spec.resolve {
                        http = http.resolve(name, *addr);
                    }
                    let http = http.build().expect("HTTP client");
                    while !shared.stop.load(Ordering::Relaxed)
                        && Instant::now() < deadline
                        && shared.requests.fetch_add(1, Ordering::Relaxed) < spec.max_requests
                    {
                        let req = match &spec.request {
                            Request::Get => http.get(&spec.url),
                            Request::Post(body) => http.post(&spec.url).body(body.clone()),
                        };
                        let outcome = match req.send().await {
                            Ok(r) if r.status().is_success() => match r.text().await {
                                Ok(body) => Ok(body.trim().to_string()),
                                Err(e) => Err(format!("reading the body: {e}")),
                            },
                            Ok(r) => Err(format!("status {}", r.status())),
                            Err(e) => Err(format!("{e:?}")),
                        };
                        match outcome {
                            Ok(body) => {
                                *shared.by_body.lock().unwrap().entry(body).or_default() += 1;
                            }
                            Err(reason) => {
                                shared.failed.fetch_add(1, Ordering::Relaxed);
                                let mut f = shared.failures.lock().unwrap();
                                if f.len() < KEPT_FAILURES {
                                    f.push(format!(
                                        "+{}ms {reason}",
                                        started.elapsed().as_millis()
                                    ));
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            shared,
            tasks,
            started,
        }
    }

    /// Successful answers so far, by body.
    pub fn answers(&self) -> BTreeMap<String, u64> {
        self.shared.by_body.lock().unwrap().clone()
    }

    /// Failed requests so far.
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` more requests succeeded than now (the load is flowing), or
    /// panics after `timeout`.
    pub async fn wait_flowing(&self, n: u64, timeout: Duration) {
        let ok = |s: &Shared| s.by_body.lock().unwrap().values().sum::<u64>();
        let start = ok(&self.shared);
        crate::poll::wait_for("load flowing", timeout, || async {
            (ok(&self.shared) >= start + n).then_some(())
        })
        .await;
    }

    /// Stops the clients (each finishes its request in flight) and reports.
    pub async fn stop(self) -> LoadReport {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let s = &self.shared;
        let by_body = s.by_body.lock().unwrap().clone();
        let failed = s.failed.load(Ordering::Relaxed);
        LoadReport {
            requests: by_body.values().sum::<u64>() + failed,
            failed,
            failures: s.failures.lock().unwrap().clone(),
            by_body,
            elapsed: self.started.elapsed(),
        }
    }
}
