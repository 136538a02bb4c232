//! Scenarios 4 (failover) and 5 (several hosts), end to end: the real Docker engine (and a
//! second `dockerd` this file starts itself), a Consul dev agent, the `registrator` and
//! `confd` binaries as users run them (`cargo build -p registrator -p confd` first) and a
//! real HAProxy on free loopback ports. Recipes: `docs/scenario-4-failover.md` and
//! `docs/scenario-5-several-hosts.md`.
//!
//! Other tests share the default engine, and our registrators register every container on
//! it; each test therefore names its service uniquely and the proxy serves only that one.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard_tests::*;

/// Upper bound for any single wait.
const WAIT: Duration = Duration::from_secs(30);

/// The app: `Hello from <hostname>` on port 8000. `sh` stays PID 1 with a TERM trap so
/// `docker stop` ends it at once, as a real app would (busybox httpd as PID 1 ignores TERM
/// and would make every stop wait for the kill timeout).
const APP: &str = "mkdir -p /www; echo \"Hello from $(hostname)\" > /www/index.html; \
                   trap 'exit 0' TERM; httpd -f -p 8000 -h /www & wait";

/// A service name no other test's container carries: our registrators see the whole engine.
fn service_name(tag: &str) -> String {
    format!("{tag}{}", std::process::id())
}

/// Port 8000 published on loopback, on a port the engine picks.
const PUBLISH_ANY: &str = "127.0.0.1::8000";

/// `docker run` arguments for one app instance (publish on loopback, name the service).
fn app_args(service: &str, publish: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "-p",
        publish,
        "--stop-timeout",
        "2",
        "-e",
        &format!("SERVICE_NAME={service}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend([TEST_IMAGE, "sh", "-c", APP].map(String::from));
    args
}

/// What an instance answers (trimmed): its hostname is the first 12 characters of its
/// container ID.
fn hello(container_id: &str) -> String {
    format!("Hello from {}", &container_id[..12])
}

fn run_app(tag: &str, service: &str, extra: &[&str]) -> Container {
    let args = app_args(service, PUBLISH_ANY, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Container::run(tag, &args)
}

/// A registrator on the default engine (or another one through `DOCKER_HOST`), registering
/// published ports with 127.0.0.1: published ports answer on loopback.
fn registrator(uri: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
    let mut full = vec!["-ip", "127.0.0.1"];
    full.extend_from_slice(args);
    full.push(uri);
    Process::spawn(&bin("registrator"), &full, env)
}

/// confd rendering the shipped HAProxy template for one service, plus HAProxy itself.
struct Proxy(HaproxyConfd);

impl Proxy {
    /// Starts confd; HAProxy starts once the first config with a server is rendered.
    async fn start(consul: &Consul, service: &str) -> Proxy {
        let vars = [
            ("default_service", service.to_string()),
            ("check_path", "/".to_string()),
            ("check_expect", "Hello".to_string()),
        ];
        Proxy(
            HaproxyConfd::start(
                &consul.uri(),
                "127.0.0.1",
                "wait: { min: 100ms, max: 1s }",
                &vars,
                |cfg| cfg.contains("    server "),
            )
            .await,
        )
    }

    fn port(&self) -> u16 {
        self.0.port
    }

    /// The rendered haproxy.cfg.
    fn config(&self) -> String {
        self.0.cfg()
    }

    /// Waits until requests through the proxy reach exactly `want` (bodies); returns how
    /// long that took.
    async fn wait_routes(&self, what: &str, want: &BTreeSet<String>) -> Duration {
        let want: Vec<&String> = want.iter().collect();
        match routes_converge(self.port(), None, &want, WAIT).await {
            Ok(took) => took,
            Err(last) => panic!(
                "{what}: wanted {want:?}, last saw {last:?}\nhaproxy.cfg:\n{}\nconfd output:\n{}",
                self.config(),
                self.0.confd.output()
            ),
        }
    }

    /// Waits until the rendered config no longer names `needle` (a host identity or a
    /// container name), i.e. confd took those servers out; returns how long that took.
    async fn wait_gone(&self, what: &str, needle: &str) -> Duration {
        let start = Instant::now();
        while self.config().contains(needle) {
            assert!(
                start.elapsed() < WAIT,
                "{what}: {needle} still in haproxy.cfg:\n{}\nconfd output:\n{}",
                self.config(),
                self.0.confd.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        start.elapsed()
    }
}

/// One GET through the proxy: the body, or why it failed.
async fn get(http: &reqwest::Client, port: u16) -> Result<String, String> {
    let r = http
        .get(format!("http://127.0.0.1:{port}/"))
        .send()
        .await
        .map_err(|e| format!("transport: {e}"))?;
    let status = r.status();
    let body = r.text().await.map_err(|e| format!("body: {e}"))?;
    if status.is_success() && body.starts_with("Hello from ") {
        Ok(body.trim().to_string())
    } else {
        Err(format!("status {status}: {body:?}"))
    }
}

/// A client calling every 100 ms in the background, at most `n` times or until stopped:
/// the witness that the service stays up while something fails.
struct Caller {
    sent: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Result<String, String>>>,
}

impl Caller {
    fn start(port: u16, n: usize) -> Caller {
        let sent = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (counter, stopped) = (sent.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let http = fresh_client();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut out = Vec::with_capacity(n);
            while out.len() < n && !stopped.load(Ordering::SeqCst) {
                tick.tick().await;
                out.push(get(&http, port).await);
                counter.fetch_add(1, Ordering::SeqCst);
            }
            out
        });
        Caller { sent, stop, task }
    }

    /// Lets `k` more calls through, then stops the client (it must still be calling then).
    async fn stop_after(&self, k: usize) {
        let now = self.sent.load(Ordering::SeqCst);
        assert!(
            !self.task.is_finished(),
            "the client ran out of calls too early"
        );
        self.wait_sent(now + k).await;
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Waits until `k` requests have been answered (or failed), so the fault lands mid-run.
    async fn wait_sent(&self, k: usize) {
        wait_for("the client to get going", WAIT, || async {
            (self.sent.load(Ordering::SeqCst) >= k).then_some(())
        })
        .await;
    }

    /// Waits for the run to end; prints and returns the failures.
    async fn finish(self, what: &str) -> (Vec<Result<String, String>>, Vec<String>) {
        let results = self.task.await.unwrap();
        let failures: Vec<String> = results.iter().filter_map(|r| r.clone().err()).collect();
        println!(
            "{what}: {} requests, {} failed {:?}",
            results.len(),
            failures.len(),
            failures
        );
        (results, failures)
    }
}

fn set(items: &[&String]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------
// Scenario 4: failover
// ---------------------------------------------------------------------------------------

/// A second instance joins within seconds; `docker stop` of one loses no request of a
/// client calling every 100 ms (HAProxy retries on another server until the stopped one is
/// out), and then only the other answers.
// Multi-threaded: the background client must keep calling while the test body blocks on the
// docker CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario4_failover_loses_no_request() {
    let consul = Consul::start().await;
    let service = service_name("failover");
    let reg = registrator(&consul.uri(), &[], &[]);
    let a = run_app("failover-a", &service, &[]);
    let hello_a = hello(&a.id);
    let px = Proxy::start(&consul, &service).await;
    let cfg = px.config();
    assert!(cfg.contains("option httpchk GET /"), "{cfg}");
    assert!(cfg.contains("http-check expect string \"Hello\""), "{cfg}");
    assert!(
        cfg.contains("retry-on conn-failure empty-response"),
        "{cfg}"
    );
    px.wait_routes("first instance", &set(&[&hello_a])).await;

    let started = Instant::now();
    let b = run_app("failover-b", &service, &[]);
    let hello_b = hello(&b.id);
    px.wait_routes("both instances", &set(&[&hello_a, &hello_b]))
        .await;
    let joined = started.elapsed();
    println!("second instance answering {joined:?} after docker run");
    assert!(joined < Duration::from_secs(10), "took {joined:?}");

    let caller = Caller::start(px.port(), 60);
    caller.wait_sent(10).await;
    a.stop(10);
    let took = px.wait_gone("the stopped instance", &a.name).await;
    println!("stopped instance left the proxy {took:?} after docker stop returned");
    let (results, failures) = caller.finish("docker stop during 60 calls").await;
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    // The last second of calls all went to the survivor.
    for r in &results[results.len() - 10..] {
        assert_eq!(r.as_deref(), Ok(hello_b.as_str()));
    }
    px.wait_routes("only the other", &set(&[&hello_b])).await;
    reg.wait_output(
        &format!("deregistered {}:{}:8000", hostname(), a.name),
        WAIT,
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Scenario 5: several hosts
// ---------------------------------------------------------------------------------------

/// Host B's bridge (`br-sbtest`) and its gateway and subnet (unused elsewhere on these
/// machines).
const BRIDGE: &str = "br-sbtest";
const BRIDGE_CIDR: &str = "10.213.57.1/24";

/// Both engines pick published ports from the same range (32768 up, sequentially) and cannot
/// see each other's: the second engine's would sooner or later take a port the default
/// engine hands out next. Its containers therefore publish explicit ports below that range.
fn engine_b_args(service: &str, extra: &[&str]) -> Vec<String> {
    let publish = format!("127.0.0.1:{}:8000", port_below_ephemeral_range());
    app_args(service, &publish, extra)
}

/// A free loopback port in 20000..30000, outside the kernel's and Docker's ephemeral range.
fn port_below_ephemeral_range() -> u16 {
    let seed = std::process::id() as u64 * 7919
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
    (0..10_000u64)
        .map(|i| 20_000 + ((seed + i * 97) % 10_000) as u16)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port in 20000..30000")
}

/// Two engines, one registrator each (distinct `--hostname` identities, `-cleanup`, TTL 3 s),
/// one Consul, one proxy. Both hosts' instances answer; `kill -9` of one host's registrator
/// takes its instances out once their TTL lapses, and losing that engine altogether takes
/// them out through their failing HTTP checks, while the other host serves throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario5_several_hosts_survive_losing_one() {
    let mut engine_b = DockerEngine::start(BRIDGE, BRIDGE_CIDR);
    let consul = Consul::start().await;
    let service = service_name("hosts");
    let host_a = format!("sbtest-host-a-{}", std::process::id());
    let host_b = format!("sbtest-host-b-{}", std::process::id());
    let reg_args = |host: &str| -> Vec<String> {
        [
            "-ttl",
            "3",
            "-ttl-refresh",
            "1",
            "-cleanup",
            "-hostname",
            host,
        ]
        .map(String::from)
        .to_vec()
    };
    let args_a = reg_args(&host_a);
    let args_a: Vec<&str> = args_a.iter().map(String::as_str).collect();
    let args_b = reg_args(&host_b);
    let args_b: Vec<&str> = args_b.iter().map(String::as_str).collect();
    let env_b = [("DOCKER_HOST", engine_b.sock.as_str())];
    let _reg_a = registrator(&consul.uri(), &args_a, &[]);
    let mut reg_b = registrator(&consul.uri(), &args_b, &env_b);

    let check = [
        "-e",
        "SERVICE_CHECK_HTTP=/",
        "-e",
        "SERVICE_CHECK_INTERVAL=1s",
    ];
    let a1 = run_app("hosts-a", &service, &check);
    let a2 = run_app("hosts-a", &service, &check);
    let (b1, _) = engine_b.run("hosts-b", &engine_b_args(&service, &check));
    let (b2, _) = engine_b.run("hosts-b", &engine_b_args(&service, &check));
    let on_a = set(&[&hello(&a1.id), &hello(&a2.id)]);
    let all: BTreeSet<String> = on_a
        .iter()
        .cloned()
        .chain([hello(&b1), hello(&b2)])
        .collect();

    let px = Proxy::start(&consul, &service).await;
    px.wait_routes("instances on both hosts", &all).await;
    let cfg = px.config();
    assert!(cfg.contains(&host_a) && cfg.contains(&host_b), "{cfg}");

    // (a) host B's registrator dies: its registrations stay but their TTL check lapses.
    let caller = Caller::start(px.port(), 600);
    caller.wait_sent(5).await;
    reg_b.kill9();
    let took = px.wait_gone("host B after its TTL lapsed", &host_b).await;
    println!("host B's instances left the proxy {took:?} after its registrator was killed");
    px.wait_routes("host A only", &on_a).await;
    caller.stop_after(10).await;
    let (_, failures) = caller.finish("registrator kill -9 on host B").await;
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    let health = consul
        .get_json(&format!("/v1/health/service/{service}"))
        .await;
    let critical_ttl = health
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["Service"]["ID"].as_str().unwrap().starts_with(&host_b))
        .flat_map(|e| e["Checks"].as_array().unwrap().clone())
        .filter(|c| c["Name"] == "registrator TTL" && c["Status"] == "critical")
        .count();
    assert_eq!(critical_ttl, 2, "{health:#}");

    // (b) host B comes back under a new registrator, then its engine dies.
    let _reg_b = registrator(&consul.uri(), &args_b, &env_b);
    px.wait_routes("host B back", &all).await;
    let caller = Caller::start(px.port(), 600);
    caller.wait_sent(5).await;
    engine_b.kill();
    let took = px.wait_gone("host B after its engine died", &host_b).await;
    println!("host B's instances left the proxy {took:?} after its dockerd was killed");
    px.wait_routes("host A only", &on_a).await;
    caller.stop_after(10).await;
    let (_, failures) = caller.finish("dockerd kill -9 on host B").await;
    assert!(failures.is_empty(), "failed requests: {failures:?}");
}
