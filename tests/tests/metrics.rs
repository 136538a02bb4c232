//! `--metrics-addr` (`/metrics`, `/healthz`), `--healthcheck` and `--log-format json` of both
//! binaries, end to end: the real binaries (build them first: `cargo build -p registrator -p
//! confd`), a real Consul dev agent, a real Docker engine.
//!
//! Other tests' containers exist on the same engine, so counts are asserted as lower bounds
//! and registrations are looked up by this test's own container names.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use switchboard::{RegistryUri, Service, Store};
use switchboard_tests::*;

/// Upper bound for any single wait (health changes are expected within a few seconds).
const WAIT: Duration = Duration::from_secs(30);

fn loopback() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Runs `program --healthcheck http://<addr>/healthz`: (exit success, stderr).
fn probe(program: &str, addr: &str) -> (bool, String) {
    let out = Command::new(bin(program))
        .args(["--healthcheck", &format!("http://{addr}/healthz")])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every line of `output` is one JSON object with `level` and `message`; returns them.
fn json_lines(output: &str) -> Vec<Value> {
    assert!(!output.trim().is_empty(), "no log output");
    output
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l:?}\n{output}"));
            assert!(
                v["level"].is_string() && v["message"].is_string(),
                "log line without level and message: {l}"
            );
            v
        })
        .collect()
}

#[tokio::test]
async fn registrator_metrics_health_and_json_logs() {
    let mut consul = Consul::start().await;
    let addr = loopback();
    let mut reg = Process::spawn(
        &bin("registrator"),
        &[
            "-ip",
            "127.0.0.1",
            "--verify-interval",
            "1",
            "--metrics-addr",
            &addr,
            "--log-format",
            "json",
            &consul.uri(),
        ],
        &[],
    );
    wait_health(&reg, &addr, 200, WAIT).await;
    assert_eq!(probe("registrator", &addr), (true, String::new()));

    let web = Container::run(
        "metrics-web",
        &[
            "-p", "80", TEST_IMAGE, "httpd", "-f", "-p", "80", "-h", "/www",
        ],
    );
    let id = format!("{}:{}:80", hostname(), web.name);
    wait_for(&format!("{id} in Consul"), WAIT, || {
        consul.agent_service(&id)
    })
    .await;
    // The event-to-store sample is taken when the write returns, just after Consul has it.
    let m = wait_for("a registration counted in /metrics", WAIT, || async {
        let m = scrape(&addr).await;
        (m.sum("registrator_event_to_store_seconds_count") >= 1.0).then_some(m)
    })
    .await;
    assert!(
        m.sum("registrator_registrations_total") >= 1.0,
        "{}",
        m.text
    );
    assert!(m.sum("registrator_services") >= 1.0, "{}", m.text);
    assert!(
        m.samples["registrator_docker_events_total{action=\"start\"}"] >= 1.0,
        "{}",
        m.text
    );
    assert!(
        m.samples["registrator_store_request_duration_seconds_count{op=\"register\"}"] >= 1.0,
        "{}",
        m.text
    );
    assert_eq!(m.sum("registrator_docker_up"), 1.0, "{}", m.text);
    assert_eq!(m.sum("registrator_store_up"), 1.0, "{}", m.text);
    assert_eq!(m.sum("registrator_registration_failures_total"), 0.0);

    // The store goes away: unhealthy, with the reason, within a few seconds.
    let stopped = std::time::Instant::now();
    consul.stop();
    let body = wait_health(&reg, &addr, 503, WAIT).await;
    eprintln!(
        "registrator: /healthz 503 {:?} after the store stopped",
        stopped.elapsed()
    );
    assert!(
        body.starts_with("store: consul store unavailable") && body.lines().count() == 1,
        "{body:?}"
    );
    let (ok, err) = probe("registrator", &addr);
    assert!(!ok && err.contains("503") && err.contains("store"), "{err}");
    let m = scrape(&addr).await;
    assert_eq!(m.sum("registrator_store_up"), 0.0, "{}", m.text);
    assert!(
        m.sum("registrator_store_request_errors_total") >= 1.0,
        "{}",
        m.text
    );

    // And back: healthy again, and the container registered again in the empty agent.
    consul.restart().await;
    wait_health(&reg, &addr, 200, WAIT).await;
    wait_for(&format!("{id} in Consul again"), WAIT, || {
        consul.agent_service(&id)
    })
    .await;

    reg.signal(libc::SIGTERM);
    assert!(reg.wait_exit(WAIT).await.success(), "{}", reg.output());
    let lines = json_lines(&reg.output());
    assert!(
        lines.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("registered ") && m.contains(&id))),
        "no `registered {id}` event in:\n{}",
        reg.output()
    );
    assert!(
        lines.iter().any(|l| l["level"] == "WARN"),
        "{}",
        reg.output()
    );
}

#[tokio::test]
async fn metrics_addr_errors_are_one_line() {
    for program in ["registrator", "confd"] {
        let args: &[&str] = if program == "registrator" {
            &["--metrics-addr", "localhost", "consul://127.0.0.1:1"]
        } else {
            &[
                "--metrics-addr",
                "localhost",
                "--backend",
                "consul://127.0.0.1:1",
                "--template",
                "/dev/null:/dev/null",
            ]
        };
        let out = Command::new(bin(program)).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{program}: {err}");
        assert_eq!(err.lines().count(), 1, "{program}: {err}");
        assert!(
            err.contains("--metrics-addr") && err.contains("expected HOST:PORT"),
            "{program}: {err}"
        );
    }

    // The address in use: one line naming it, non-zero exit, before anything else is tried.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut reg = Process::spawn(
        &bin("registrator"),
        &["--metrics-addr", &addr, "consul://127.0.0.1:1"],
        &[],
    );
    assert_eq!(reg.wait_exit(WAIT).await.code(), Some(1));
    let want = format!("registrator: cannot listen on {addr} (--metrics-addr): ");
    assert!(
        reg.output().lines().any(|l| l.starts_with(&want)),
        "{}",
        reg.output()
    );
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("t.hbs");
    std::fs::write(&src, "x").unwrap();
    let mut confd = Process::spawn(
        &bin("confd"),
        &[
            "--metrics-addr",
            &addr,
            "--backend",
            "consul://127.0.0.1:1",
            "--template",
            &format!("{}:{}", src.display(), dir.path().join("out").display()),
        ],
        &[],
    );
    assert_eq!(confd.wait_exit(WAIT).await.code(), Some(1));
    let want = format!("cannot listen on {addr} (--metrics-addr): ");
    assert!(
        confd.output().lines().any(|l| l.contains(&want)),
        "{}",
        confd.output()
    );
}

fn service(id: &str, port: u16) -> Service {
    Service {
        id: id.into(),
        name: "web".into(),
        address: "127.0.0.1".into(),
        port,
        tags: vec![],
        meta: BTreeMap::new(),
        check: None,
        ttl: None,
        docker_health: None,
    }
}

async fn wait_file(p: &Process, path: &Path, needle: &str) {
    let what = format!("{} to contain {needle:?}", path.display());
    let found = poll(WAIT, Duration::from_millis(100), || async {
        std::fs::read_to_string(path)
            .ok()
            .filter(|t| t.contains(needle))
    })
    .await;
    assert!(
        found.is_some(),
        "timed out waiting for {what}; output:\n{}",
        p.output()
    );
}

#[tokio::test]
async fn confd_metrics_health_and_json_logs() {
    let mut consul = Consul::start().await;
    let store = Store::new(&RegistryUri::parse(&consul.uri()).unwrap());
    store.register(&service("m1", 10001)).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (src, out) = (d.join("t.hbs"), d.join("out"));
    let (fail_check, fail_reload) = (d.join("fail-check"), d.join("fail-reload"));
    let body = "{{#each service.web}}{{port}} {{/each}}\n";
    std::fs::write(&src, body).unwrap();
    let addr = loopback();
    let cfg = d.join("confd.yaml");
    std::fs::write(
        &cfg,
        format!(
            "backend: {}\nwait: {{ min: 0s, max: 0s }}\nmetrics_addr: {addr}\ntemplates:\n  - src: {}\n    dest: {}\n    check: \"test ! -e {} # {{{{staged}}}}\"\n    reload: \"test ! -e {}\"\n",
            consul.uri(),
            src.display(),
            out.display(),
            fail_check.display(),
            fail_reload.display()
        ),
    )
    .unwrap();
    let mut confd = Process::spawn(
        &bin("confd"),
        &[
            "--config",
            &cfg.display().to_string(),
            "--log-format",
            "json",
        ],
        &[],
    );
    wait_file(&confd, &out, "10001").await;
    wait_health(&confd, &addr, 200, WAIT).await;
    assert_eq!(probe("confd", &addr), (true, String::new()));
    let tpl = format!("{{template=\"{}\"}}", out.display());
    let m = scrape(&addr).await;
    for name in [
        "confd_renders_total",
        "confd_reloads_total",
        "confd_render_duration_seconds_count",
        "confd_reload_duration_seconds_count",
    ] {
        assert!(
            m.samples[&format!("{name}{tpl}")] >= 1.0,
            "{name}: {}",
            m.text
        );
    }
    assert!(m.sum("confd_snapshots_total") >= 1.0, "{}", m.text);
    assert_eq!(m.sum("confd_snapshot_instances"), 1.0, "{}", m.text);
    assert_eq!(m.sum("confd_store_up"), 1.0, "{}", m.text);
    assert!(
        m.has("confd_seconds_since_last_successful_render"),
        "{}",
        m.text
    );

    // A check that refuses the new file: unhealthy, naming the template and the reason.
    std::fs::write(&fail_check, "").unwrap();
    store.register(&service("m2", 10002)).await.unwrap();
    let why = wait_health(&confd, &addr, 503, WAIT).await;
    assert!(
        why.contains(&format!("-> {}", out.display())) && why.contains("check failed"),
        "{why:?}"
    );
    assert!(!std::fs::read_to_string(&out).unwrap().contains("10002"));
    assert!(scrape(&addr).await.sum("confd_check_failures_total") >= 1.0);
    // Fixed (the check passes now; the template edit triggers a render): healthy again.
    std::fs::remove_file(&fail_check).unwrap();
    std::fs::write(&src, body).unwrap();
    wait_file(&confd, &out, "10002").await;
    wait_health(&confd, &addr, 200, WAIT).await;

    // A failing reload: unhealthy until a retry succeeds.
    std::fs::write(&fail_reload, "").unwrap();
    store.register(&service("m3", 10003)).await.unwrap();
    let why = wait_health(&confd, &addr, 503, WAIT).await;
    assert!(why.contains("reload failed"), "{why:?}");
    let (ok, err) = probe("confd", &addr);
    assert!(!ok && err.contains("reload failed"), "{err}");
    assert!(scrape(&addr).await.sum("confd_reload_failures_total") >= 1.0);
    std::fs::remove_file(&fail_reload).unwrap();
    wait_file(&confd, &out, "10003").await;
    wait_health(&confd, &addr, 200, WAIT).await;

    // The store goes away, then comes back (empty: a dev agent forgets everything).
    let stopped = std::time::Instant::now();
    consul.stop();
    let why = wait_health(&confd, &addr, 503, WAIT).await;
    eprintln!(
        "confd: /healthz 503 {:?} after the store stopped",
        stopped.elapsed()
    );
    assert!(why.starts_with("store: not in sync with "), "{why:?}");
    assert_eq!(scrape(&addr).await.sum("confd_store_up"), 0.0);
    assert!(scrape(&addr).await.sum("confd_store_errors_total") >= 1.0);
    consul.restart().await;
    // The template names `service.web` (strict mode), so it renders once that is back.
    store.register(&service("m1", 10001)).await.unwrap();
    wait_health(&confd, &addr, 200, WAIT).await;

    confd.signal(libc::SIGTERM);
    assert!(confd.wait_exit(WAIT).await.success(), "{}", confd.output());
    let lines = json_lines(&confd.output());
    assert!(
        lines.iter().any(|l| l["message"] == "reloaded"),
        "{}",
        confd.output()
    );
}

#[tokio::test]
async fn registrator_health_follows_the_docker_event_stream() {
    let consul = Consul::start().await;
    let proxy = DockerProxy::start().await;
    let addr = loopback();
    let reg = Process::spawn(
        &bin("registrator"),
        &["-ip", "127.0.0.1", "--metrics-addr", &addr, &consul.uri()],
        &[("DOCKER_HOST", &proxy.docker_host())],
    );
    wait_health(&reg, &addr, 200, WAIT).await;
    assert_eq!(scrape(&addr).await.sum("registrator_docker_up"), 1.0);

    let cut = std::time::Instant::now();
    proxy.cut();
    let why = wait_health(&reg, &addr, 503, WAIT).await;
    eprintln!(
        "registrator: /healthz 503 {:?} after Docker was cut off",
        cut.elapsed()
    );
    assert!(why.starts_with("docker: event stream down"), "{why:?}");
    assert_eq!(scrape(&addr).await.sum("registrator_docker_up"), 0.0);

    proxy.restore();
    wait_health(&reg, &addr, 200, WAIT).await;
    assert_eq!(scrape(&addr).await.sum("registrator_docker_up"), 1.0);
}

/// The PIDs whose parent is `ppid`.
fn children(ppid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // `pid (comm) state ppid ...`; comm may hold spaces, so read after its last `)`.
        let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or_default();
        if after.split_whitespace().nth(1) == Some(&ppid.to_string()) {
            out.push(pid);
        }
    }
    out
}

#[tokio::test]
async fn confd_health_follows_the_supervised_process() {
    let consul = Consul::start().await;
    let store = Store::new(&RegistryUri::parse(&consul.uri()).unwrap());
    store.register(&service("x1", 10001)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (src, out) = (dir.path().join("t.hbs"), dir.path().join("out"));
    std::fs::write(&src, "{{#each service.web}}{{port}} {{/each}}\n").unwrap();
    let addr = loopback();
    let confd = Process::spawn(
        &bin("confd"),
        &[
            "--backend",
            &consul.uri(),
            "--template",
            &format!("{}:{}:true", src.display(), out.display()),
            "--exec",
            "sleep 600",
            "--metrics-addr",
            &addr,
        ],
        &[],
    );
    wait_health(&confd, &addr, 200, WAIT).await;
    let child = wait_for("the supervised sleep", WAIT, || async {
        children(confd.pid()).first().copied()
    })
    .await;

    unsafe {
        libc::kill(child, libc::SIGKILL);
    }
    let why = wait_health(&confd, &addr, 503, WAIT).await;
    assert!(
        why.starts_with("proxy: it exited unexpectedly") && why.contains("restarting in"),
        "{why:?}"
    );
    // Restarted after its backoff (1 s): healthy again, with a new process.
    wait_health(&confd, &addr, 200, WAIT).await;
    let again = children(confd.pid());
    assert!(!again.is_empty() && !again.contains(&child), "{again:?}");
}
