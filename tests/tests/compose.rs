//! End-to-end: the reference compose stacks (`compose/*.yml`) on the real Docker engine, with
//! the images `scripts/images` builds (the test command builds them first; without them these
//! tests say so and return).
//!
//! Each stack runs under its own project name with free host ports, and is taken down by a
//! drop guard whatever happens. The two stacks never run at the same time: each has its own
//! registrator, and registrator registers every container of the engine, so a second stack's
//! web instances would show up (unreachable, on another network) in the first one's proxy.
//! For the same reason the zero-loss checks want the engine to themselves: a container some
//! other program starts meanwhile becomes a new service, i.e. a structural reload (the test
//! command runs test binaries one after another, so nothing else runs in CI).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use switchboard_tests::*;

/// One stack at a time (see the module docs).
static ONE_STACK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long the stack gets to start: images start, Consul elects itself, registrator
/// registers, confd renders and the proxy starts.
const START: Duration = Duration::from_secs(90);
/// The promise the reference stack makes: scaling shows through the proxy within 5 s.
const CONVERGE: Duration = Duration::from_secs(5);
/// How long a stack's compose healthchecks get to pass: the first runs 10 s after start.
const HEALTHY: Duration = Duration::from_secs(60);
/// Concurrent keep-alive clients of the zero-loss load.
const LOAD_CLIENTS: usize = 8;
/// Requests per sample: enough for round-robin over three backends to reach each of them.
const SAMPLE: usize = 9;

/// A compose project, taken down (`down -v`) on drop.
struct Stack {
    project: String,
    files: Vec<PathBuf>,
    env: Vec<(&'static str, String)>,
    up: bool,
}

impl Stack {
    /// `docker-compose -p <unique> -f compose/<file>... up -d`; fails unless the images exist.
    fn up(tag: &str, files: &[&str], images: &[String], env: Vec<(&'static str, String)>) -> Stack {
        require_images(images);
        // The test command's images (a tag of their own, never the user's `latest`).
        let mut env = env;
        env.push(("SWITCHBOARD_TAG", IMAGE_TAG.to_string()));
        let project = format!("sbtest{}{tag}", std::process::id());
        // The stacks' default scope (`--scope-label com.docker.compose.project`) keeps every
        // other container on this engine (another test binary's, a bench's) out of the stack:
        // it would otherwise become a backend and reload the proxy mid-test.
        let mut stack = Stack {
            project,
            files: files
                .iter()
                .map(|f| workspace_root().join("compose").join(f))
                .collect(),
            env,
            up: true,
        };
        stack.compose(&["up", "-d"]);
        stack
    }

    /// Runs docker-compose on this project; panics with its output on failure.
    fn compose(&mut self, args: &[&str]) -> Output {
        let out = self.command(args).output().expect("docker-compose");
        if !out.status.success() {
            panic!(
                "docker-compose {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.arg("-p").arg(&self.project);
        for f in &self.files {
            cmd.arg("-f").arg(f);
        }
        cmd.args(args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// The logs of one service's containers.
    fn logs(&self, service: &str) -> String {
        let out = self
            .command(&["logs", "--no-color", service])
            .output()
            .expect("docker-compose logs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `down -v`, then checks that nothing of the project is left: no container, no network.
    fn down(&mut self) {
        self.compose(&["down", "-v", "--remove-orphans", "-t", "5"]);
        self.up = false;
        let label = format!("label=com.docker.compose.project={}", self.project);
        assert_eq!(
            docker(&["ps", "-aq", "--filter", &label]),
            "",
            "containers left"
        );
        assert_eq!(
            docker(&["network", "ls", "-q", "--filter", &label]),
            "",
            "networks left"
        );
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if !self.up {
            return;
        }
        if std::thread::panicking() {
            if let Ok(out) = self
                .command(&["logs", "--no-color", "--tail", "40"])
                .output()
            {
                eprintln!("{}", String::from_utf8_lossy(&out.stdout));
            }
        }
        let _ = self
            .command(&["down", "-v", "--remove-orphans", "-t", "5"])
            .output();
    }
}

/// One round of [`SAMPLE`] requests through the proxy: the distinct demo-app answers
/// ("Hello from <hostname> (<ip>)") and how many requests got something else or nothing.
async fn sample(http: &reqwest::Client, url: &str) -> (BTreeSet<String>, usize) {
    let mut seen = BTreeSet::new();
    let mut failed = 0;
    for _ in 0..SAMPLE {
        let body = match http.get(url).send().await {
            Ok(r) if r.status().is_success() => r.text().await.unwrap_or_default(),
            _ => String::new(),
        };
        let body = body.trim();
        if body.starts_with("Hello from ") {
            seen.insert(body.to_string());
        } else {
            failed += 1;
        }
    }
    (seen, failed)
}

/// Polls until a sample shows exactly `n` distinct backends and no failed request, within
/// `timeout`; returns them.
async fn backends_converge(url: &str, n: usize, timeout: Duration) -> BTreeSet<String> {
    let http = fresh_client();
    let started = Instant::now();
    let last = std::sync::Mutex::new((BTreeSet::new(), 0));
    let what = format!("{n} distinct backends answering through {url}");
    let found = tokio::time::timeout(
        timeout,
        wait_for(&what, timeout + Duration::from_secs(1), || {
            let (http, last) = (&http, &last);
            async move {
                let (seen, failed) = sample(http, url).await;
                let done = seen.len() == n && failed == 0;
                *last.lock().unwrap() = (seen.clone(), failed);
                done.then_some(seen)
            }
        }),
    )
    .await;
    match found {
        Ok(seen) => {
            eprintln!("{n} backend(s) after {:?}: {seen:?}", started.elapsed());
            seen
        }
        Err(_) => panic!(
            "no {what} within {timeout:?}; last sample: {:?}",
            last.lock().unwrap()
        ),
    }
}

/// Waits until the compose healthchecks of the stack's registrator and load balancer (their
/// `--healthcheck` against their own `/healthz`) call them healthy.
async fn wait_healthy(stack: &Stack) {
    for service in ["registrator", "lb"] {
        let name = format!("{}_{service}_1", stack.project);
        let last = std::sync::Mutex::new(String::new());
        let healthy = poll(HEALTHY, Duration::from_millis(500), || async {
            let out = Command::new("docker")
                .args(["inspect", "-f", "{{.State.Health.Status}}", &name])
                .output()
                .ok()?;
            let status = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let ok = status == "healthy";
            *last.lock().unwrap() = status;
            ok.then_some(())
        })
        .await;
        assert!(
            healthy.is_some(),
            "{name}: compose healthcheck not healthy within {HEALTHY:?} (last: {:?}); logs:\n{}",
            last.lock().unwrap(),
            stack.logs(service)
        );
    }
}

/// `docker-compose scale web=<n>`, then waits until exactly `n` backends answer through the
/// proxy, within [`CONVERGE`] of the command's return: the part Switchboard controls
/// (registration, render, reload). docker-compose's own run time (a second or two, more on a
/// loaded machine) is printed, not asserted.
async fn scale(stack: &mut Stack, url: &str, n: usize) {
    let started = Instant::now();
    stack.compose(&["scale", &format!("web={n}")]);
    let returned = started.elapsed();
    backends_converge(url, n, CONVERGE).await;
    eprintln!(
        "scale web={n}: command took {returned:?}; {n} backend(s) answer {:?} after it started",
        started.elapsed()
    );
}

/// The zero-failed-requests promise, on a running stack with three `web` instances: under
/// POST load (8 keep-alive clients, 0.3 s requests to an app that serves on for 2 s after
/// SIGTERM, as real servers do), scale 3 -> 1 -> 3, `docker stop`/`start`/`restart` of one
/// instance and a restart of registrator lose no request. Returns the load report; prints
/// each step's time.
async fn routine_operations_under_load(stack: &mut Stack, url: &str) -> Routine {
    let project = stack.project.clone();
    let reloads_before = stack.logs("lb").matches("reloaded").count();
    let container = |name: &str| format!("{project}_{name}");
    let load = load::Load::start(load::LoadSpec::post(
        &format!("{url}cgi-bin/slow"),
        LOAD_CLIENTS,
    ));
    load.wait_flowing(16, CONVERGE).await;
    let step = |what: &str, t: Instant| eprintln!("zero-loss: {what} in {:?}", t.elapsed());

    let t = Instant::now();
    scale(stack, url, 1).await;
    step("scale web=1", t);
    let t = Instant::now();
    scale(stack, url, 3).await;
    step("scale web=3", t);
    load.wait_flowing(16, CONVERGE).await;

    let t = Instant::now();
    docker(&["stop", &container("web_2")]);
    backends_converge(url, 2, CONVERGE).await;
    docker(&["start", &container("web_2")]);
    backends_converge(url, 3, CONVERGE).await;
    step("docker stop + start of web_2", t);

    let t = Instant::now();
    docker(&["restart", &container("web_3")]);
    backends_converge(url, 3, CONVERGE).await;
    step("docker restart of web_3", t);
    load.wait_flowing(16, CONVERGE).await;

    let t = Instant::now();
    docker(&["restart", &container("registrator_1")]);
    // The restarted registrator adopts what is registered: the load keeps flowing to all
    // three, and a change after the restart is still seen.
    load.wait_flowing(32, CONVERGE).await;
    backends_converge(url, 3, CONVERGE).await;
    scale(stack, url, 2).await;
    step("registrator restart, then scale web=2", t);
    load.wait_flowing(16, CONVERGE).await;

    // Membership alone never reloaded the proxy so far (the caller checks the count).
    let membership_reloads = stack.logs("lb").matches("reloaded").count() - reloads_before;

    // A structural change: a new service (a new upstream / backend) is rendered, checked and
    // reloaded under the same load; its removal reloads again.
    let failed_before = load.failed();
    let t = Instant::now();
    let network = format!("{project}_default");
    let extra_name = unique_name("extra");
    // The project's label, so the stack's registrator (filtered to its project) takes it.
    let in_project = format!("com.docker.compose.project={project}");
    let extra = docker(&[
        "run",
        "-d",
        "--name",
        &extra_name,
        "--label",
        TEST_LABEL,
        "--label",
        &in_project,
        "--network",
        &network,
        "-e",
        "SERVICE_NAME=extra",
        "-p",
        "80",
        &image("demo-web"),
    ]);
    let reloads_then = reloads_before + membership_reloads;
    wait_for("a reload for the new service", CONVERGE, || async {
        (stack.logs("lb").matches("reloaded").count() > reloads_then).then_some(())
    })
    .await;
    load.wait_flowing(16, CONVERGE).await;
    docker(&["rm", "-f", &extra]);
    wait_for("a reload for the removed service", CONVERGE, || async {
        (stack.logs("lb").matches("reloaded").count() > reloads_then + 1).then_some(())
    })
    .await;
    load.wait_flowing(16, CONVERGE).await;
    let structural_failed = load.failed() - failed_before;
    step("a new service and its removal (two reloads)", t);

    let report = load.stop().await;
    eprintln!(
        "zero-loss: {}; answers by backend: {:?}",
        report.summary(),
        report.by_body
    );
    eprintln!(
        "zero-loss: {membership_reloads} reloads for membership; {structural_failed} failed requests across the two structural reloads"
    );
    Routine {
        report,
        membership_reloads,
        structural_failed,
    }
}

/// What [`routine_operations_under_load`] saw.
struct Routine {
    report: load::LoadReport,
    /// Proxy reloads during the membership operations (scale, stop/start, restarts).
    membership_reloads: usize,
    /// Failed requests during the structural change (a new service, then its removal).
    structural_failed: u64,
}

/// Sends `command` as raw bytes to 127.0.0.1:`port` and returns what comes back within 2 s.
fn runtime_command_over_tcp(port: u16, command: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = s.write_all(command.as_bytes());
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Instances of service `http` in Consul's catalog.
async fn consul_http_instances(consul: &str) -> Option<Vec<serde_json::Value>> {
    let v: serde_json::Value = reqwest::get(format!("{consul}/v1/catalog/service/http"))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v.as_array().cloned()
}

/// Keys under `/services/http/` in etcd, through the v3 JSON gateway.
async fn etcd_http_keys(etcd: &str) -> Option<Vec<String>> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = serde_json::json!({
        "key": b64.encode("/services/http/"),
        "range_end": b64.encode("/services/http0"),
        "keys_only": true,
    });
    let v: serde_json::Value = reqwest::Client::new()
        .post(format!("{etcd}/v3/kv/range"))
        .json(&body)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
    kvs.iter()
        .map(|kv| {
            let k = b64.decode(kv["key"].as_str()?).ok()?;
            String::from_utf8(k).ok()
        })
        .collect()
}

#[tokio::test]
async fn consul_nginx_stack_scales_up_and_down() {
    let _one = ONE_STACK.lock().await;
    let (lb_port, consul_port) = (free_port(), free_port());
    let mut stack = Stack::up(
        "consul",
        &["docker-compose.yml"],
        &[
            image("consul"),
            image("registrator"),
            image("lb-nginx"),
            image("demo-web"),
        ],
        vec![
            ("BIND_ADDRESS", "127.0.0.1".to_string()),
            ("LB_PORT", lb_port.to_string()),
            ("CONSUL_PORT", consul_port.to_string()),
        ],
    );
    let url = format!("http://127.0.0.1:{lb_port}/");
    let consul = format!("http://127.0.0.1:{consul_port}");

    // One backend answers through nginx, registered as `http` with tag `backend`.
    backends_converge(&url, 1, START).await;
    let instances = wait_for("one http instance in Consul", CONVERGE, || async {
        consul_http_instances(&consul)
            .await
            .filter(|v| v.len() == 1)
    })
    .await;
    assert_eq!(instances[0]["ServiceTags"], serde_json::json!(["backend"]));
    assert_eq!(
        instances[0]["ServicePort"], 80,
        "-internal registers port 80"
    );

    // A container of no project, started before the scale: the stack's default scope
    // (`--scope-label com.docker.compose.project`) keeps it out, while the project's own
    // containers started after it are registered.
    let foreign = Container::run(
        "foreign",
        &[
            "-e",
            "SERVICE_NAME=foreign",
            "-p",
            "127.0.0.1::80",
            TEST_IMAGE,
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            "/www",
        ],
    );
    scale(&mut stack, &url, 3).await;
    wait_for("three http instances in Consul", CONVERGE, || async {
        consul_http_instances(&consul)
            .await
            .filter(|v| v.len() == 3)
    })
    .await;
    let catalog: serde_json::Value = reqwest::get(format!("{consul}/v1/catalog/services"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        catalog.get("foreign").is_none(),
        "a container outside the project was registered: {catalog}"
    );
    assert!(
        stack.logs("registrator").contains(
            "--scope-label com.docker.compose.project: registering only containers labelled"
        ),
        "registrator did not log its scope"
    );
    drop(foreign);

    scale(&mut stack, &url, 1).await;
    wait_for("one http instance in Consul", CONVERGE, || async {
        consul_http_instances(&consul)
            .await
            .filter(|v| v.len() == 1)
    })
    .await;

    scale(&mut stack, &url, 3).await;
    let r = routine_operations_under_load(&mut stack, &url).await;
    assert_eq!(
        r.membership_reloads, 0,
        "nginx reloaded for membership changes"
    );
    // Membership changes, stops and restarts: nothing may fail.
    assert_eq!(
        r.report.failed - r.structural_failed,
        0,
        "nginx stack: {}",
        r.report.summary()
    );
    // A structural change still reloads nginx, and a graceful reload closes the old worker's
    // idle keep-alive connections at once. confd first has the workers answer with
    // `Connection: close` for `close_before_reload` (500 ms), so these clients (a 0.3 s
    // request after another) are on fresh connections at the reload; a client silent for the
    // whole wait that sends its next request at that instant could still lose it: at most one
    // request per client connection per reload. Clients avoid it by retrying a request that
    // failed on a reused connection before any answer; HAProxy avoids it with
    // `idle-close-on-response`.
    assert!(
        r.structural_failed <= LOAD_CLIENTS as u64 * 2,
        "nginx stack: {} failed across two structural reloads, more than one per connection per reload",
        r.structural_failed
    );
    wait_healthy(&stack).await;

    stack.down();
}

#[tokio::test]
async fn etcd_haproxy_stack_scales_up_and_down() {
    let _one = ONE_STACK.lock().await;
    let (lb_port, stats_port, etcd_port) = (free_port(), free_port(), free_port());
    let password = format!("pw-{}", std::process::id());
    let mut stack = Stack::up(
        "etcd",
        &["docker-compose.etcd-haproxy.yml"],
        &[
            image("etcd"),
            image("registrator"),
            image("lb-haproxy"),
            image("demo-web"),
        ],
        vec![
            ("BIND_ADDRESS", "127.0.0.1".to_string()),
            ("LB_PORT", lb_port.to_string()),
            ("STATS_PORT", stats_port.to_string()),
            ("ETCD_PORT", etcd_port.to_string()),
            ("STATS_USER", "admin".to_string()),
            ("STATS_PASSWORD", password.clone()),
        ],
    );
    let url = format!("http://127.0.0.1:{lb_port}/");
    let etcd = format!("http://127.0.0.1:{etcd_port}");

    backends_converge(&url, 1, START).await;
    wait_for("one http key in etcd", CONVERGE, || async {
        etcd_http_keys(&etcd).await.filter(|k| k.len() == 1)
    })
    .await;

    // The statistics page wants the user and password from the environment.
    let stats = format!("http://127.0.0.1:{stats_port}/stats");
    let http = fresh_client();
    let anonymous = http.get(&stats).send().await.unwrap().status();
    assert_eq!(anonymous, 401, "stats page without credentials");
    let wrong = http
        .get(&stats)
        .basic_auth("admin", Some("wrong"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(wrong, 401, "stats page with a wrong password");
    let ok = http
        .get(&stats)
        .basic_auth("admin", Some(&password))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200, "stats page with the password");

    // The admin socket is not a door: runtime commands sent to the published ports get no
    // runtime answer (it is a unix socket inside the lb container).
    for port in [lb_port, stats_port] {
        let answer = runtime_command_over_tcp(port, "show info\n");
        assert!(
            !answer.contains("Uptime_sec") && !answer.contains("Name: HAProxy"),
            "port {port} answered a runtime command: {answer}"
        );
    }

    scale(&mut stack, &url, 3).await;
    wait_for("three http keys in etcd", CONVERGE, || async {
        etcd_http_keys(&etcd).await.filter(|k| k.len() == 3)
    })
    .await;
    // The new instances are listed on the statistics page too (server names carry the
    // container names, `<project>_web_<n>`).
    wait_for("three web servers on the stats page", CONVERGE, || async {
        let page = http
            .get(&stats)
            .basic_auth("admin", Some(&password))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (1..=3)
            .all(|n| page.contains(&format!("_web_{n}")))
            .then_some(())
    })
    .await;

    scale(&mut stack, &url, 1).await;
    wait_for("one http key in etcd", CONVERGE, || async {
        etcd_http_keys(&etcd).await.filter(|k| k.len() == 1)
    })
    .await;

    scale(&mut stack, &url, 3).await;
    let r = routine_operations_under_load(&mut stack, &url).await;
    assert_eq!(
        r.membership_reloads, 0,
        "HAProxy reloaded for membership changes"
    );
    assert_eq!(r.report.failed, 0, "HAProxy stack: {}", r.report.summary());
    assert_eq!(r.structural_failed, 0, "HAProxy stack, structural reloads");
    wait_healthy(&stack).await;

    stack.down();
}

/// The secured variant (`-f docker-compose.yml -f docker-compose.secure.yml`): Consul's ACLs in
/// default-deny mode, a token per consumer. The stack routes and scales as the open one does,
/// while a client without a token (anyone who reaches Consul's port) can neither read the
/// catalog nor register a backend, and confd's token cannot register either.
#[tokio::test]
async fn consul_secure_stack_denies_anonymous_writes_and_scales() {
    let _one = ONE_STACK.lock().await;
    let (lb_port, consul_port) = (free_port(), free_port());
    let mut stack = Stack::up(
        "secure",
        &["docker-compose.yml", "docker-compose.secure.yml"],
        &[
            image("consul"),
            image("registrator"),
            image("lb-nginx"),
            image("demo-web"),
        ],
        vec![
            ("BIND_ADDRESS", "127.0.0.1".to_string()),
            ("LB_PORT", lb_port.to_string()),
            ("CONSUL_PORT", consul_port.to_string()),
        ],
    );
    let url = format!("http://127.0.0.1:{lb_port}/");
    let consul = format!("http://127.0.0.1:{consul_port}");
    backends_converge(&url, 1, START).await;
    scale(&mut stack, &url, 2).await;

    let http = fresh_client();
    let register = |token: Option<String>| {
        let mut req = http
            .put(format!("{consul}/v1/agent/service/register"))
            .json(&serde_json::json!({"Name": "http", "ID": "intruder", "Address": "127.0.0.1", "Port": 9}));
        if let Some(t) = token {
            req = req.header("X-Consul-Token", t);
        }
        req.send()
    };
    let anonymous = register(None).await.unwrap();
    assert_eq!(
        anonymous.status(),
        403,
        "an anonymous registration must be refused"
    );
    let catalog = http
        .get(format!("{consul}/v1/health/service/http"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        catalog.json::<serde_json::Value>().await.unwrap(),
        serde_json::json!([]),
        "an anonymous read sees no instance"
    );
    // Each consumer holds its own token and nothing else.
    let mut secrets = Vec::new();
    for service in ["lb", "registrator"] {
        let listing = stack.compose(&["exec", "-T", service, "ls", "/secrets"]);
        assert_eq!(
            String::from_utf8_lossy(&listing.stdout).trim(),
            "token",
            "{service}"
        );
        let out = stack.compose(&["exec", "-T", service, "cat", "/secrets/token"]);
        let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(!token.is_empty(), "{service}'s token is empty");
        secrets.push(token);
    }
    let as_confd = register(Some(secrets[0].clone())).await.unwrap();
    assert_eq!(as_confd.status(), 403, "confd's token must not register");
    // No token shows in the consumers' logs.
    for service in ["lb", "registrator"] {
        let logs = stack.logs(service);
        assert!(
            !secrets.iter().any(|t| logs.contains(t.as_str())),
            "{service} logged a token"
        );
    }
    wait_healthy(&stack).await;
}

/// The secured etcd variant (`-f docker-compose.etcd-haproxy.yml -f
/// docker-compose.etcd-haproxy.secure.yml`): etcd speaks TLS only, from a CA the stack made,
/// with authentication on. The stack routes and scales as the open one does; plain HTTP gets
/// nowhere, a client without credentials reads nothing, and confd's user cannot write.
#[tokio::test]
async fn etcd_secure_stack_needs_tls_and_a_user_and_scales() {
    let _one = ONE_STACK.lock().await;
    let (lb_port, stats_port, etcd_port) = (free_port(), free_port(), free_port());
    let mut stack = Stack::up(
        "etcdsecure",
        &[
            "docker-compose.etcd-haproxy.yml",
            "docker-compose.etcd-haproxy.secure.yml",
        ],
        &[
            image("consul"),
            image("etcd"),
            image("registrator"),
            image("lb-haproxy"),
            image("demo-web"),
        ],
        vec![
            ("BIND_ADDRESS", "127.0.0.1".to_string()),
            ("LB_PORT", lb_port.to_string()),
            ("STATS_PORT", stats_port.to_string()),
            ("ETCD_PORT", etcd_port.to_string()),
            ("STATS_PASSWORD", format!("pw-{}", std::process::id())),
        ],
    );
    let url = format!("http://127.0.0.1:{lb_port}/");
    backends_converge(&url, 1, START).await;
    scale(&mut stack, &url, 2).await;

    // Plain HTTP gets no answer from etcd.
    let range = serde_json::json!({"key": "L3NlcnZpY2VzLw==", "range_end": "L3NlcnZpY2VzMA=="});
    let plain = fresh_client()
        .post(format!("http://127.0.0.1:{etcd_port}/v3/kv/range"))
        .json(&range)
        .send()
        .await;
    assert!(
        !plain.as_ref().is_ok_and(|r| r.status().is_success()),
        "plain HTTP answered: {plain:?}"
    );

    // Over TLS with the stack's CA (the name in etcd's certificate includes localhost).
    let ca = stack
        .compose(&["exec", "-T", "lb", "cat", "/ca/ca.pem"])
        .stdout;
    let tls = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let etcd = format!("https://localhost:{etcd_port}");
    let anonymous = tls
        .post(format!("{etcd}/v3/kv/range"))
        .json(&range)
        .send()
        .await
        .unwrap();
    let status = anonymous.status();
    let body = anonymous.text().await.unwrap_or_default();
    assert!(
        !status.is_success() && !body.contains("\"kvs\""),
        "an anonymous read answered {status}: {body}"
    );

    // confd's user reads but may not write; its password is the only file it holds.
    let listing = stack
        .compose(&["exec", "-T", "lb", "ls", "/secrets"])
        .stdout;
    assert_eq!(String::from_utf8_lossy(&listing).trim(), "password");
    let out = stack.compose(&["exec", "-T", "lb", "cat", "/secrets/password"]);
    let password = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let auth: serde_json::Value = tls
        .post(format!("{etcd}/v3/auth/authenticate"))
        .json(&serde_json::json!({"name": "confd", "password": password}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = auth["token"]
        .as_str()
        .expect("a token for confd")
        .to_string();
    let read = tls
        .post(format!("{etcd}/v3/kv/range"))
        .header("Authorization", &token)
        .json(&range)
        .send()
        .await
        .unwrap();
    let read: serde_json::Value = read.json().await.unwrap();
    assert!(
        read["count"]
            .as_str()
            .is_some_and(|c| c.parse::<u32>().unwrap_or(0) >= 2),
        "confd's user should read the two registrations: {read}"
    );
    let write = tls
        .post(format!("{etcd}/v3/kv/put"))
        .header("Authorization", &token)
        .json(&serde_json::json!({"key": "L3NlcnZpY2VzL2h0dHAvaW50cnVkZXI=", "value": "MTI3LjAuMC4xOjk="}))
        .send()
        .await
        .unwrap();
    let status = write.status();
    let body = write.text().await.unwrap_or_default();
    assert!(
        !status.is_success() && body.contains("permission denied"),
        "confd's user wrote: {status} {body}"
    );
    for service in ["lb", "registrator"] {
        assert!(
            !stack.logs(service).contains(&password),
            "{service} logged a password"
        );
    }
    wait_healthy(&stack).await;
}
