//! confd end to end: real Consul / etcd, the real `confd` binary, real nginx and HAProxy,
//! and tiny in-test HTTP backends that answer with their own name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use switchboard::{RegistryUri, Service, Store};
use switchboard_tests::*;

/// Upper bound for any single wait in these tests.
const WAIT: Duration = Duration::from_secs(30);

const HOSTILE: &str = "a; } server { listen 81; }";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn service(id: &str, name: &str, address: &str, port: u16) -> Service {
    Service {
        id: id.into(),
        name: name.into(),
        address: address.into(),
        port,
        tags: vec!["backend".into()],
        meta: BTreeMap::new(),
        check: None,
        ttl: None,
        docker_health: None,
    }
}

fn store(uri: &str) -> Store {
    Store::new(&RegistryUri::parse(uri).unwrap())
}

fn templates_dir() -> PathBuf {
    workspace_root().join("templates")
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Runs confd to completion; returns (exit success, stdout+stderr).
async fn confd_once(args: &[&str]) -> (bool, String) {
    let mut p = spawn_confd(args);
    let st = p.wait_exit(WAIT).await;
    (st.success(), p.output())
}

/// Waits until the file at `path` satisfies `pred`; on timeout panics with the file and
/// confd's output.
async fn wait_file(p: &Process, what: &str, path: &Path, pred: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let t = read(path);
        if pred(&t) {
            return;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; {}:\n{t}\nconfd output:\n{}",
                path.display(),
                p.output()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// nginx + HAProxy files and vars in one temp dir.
struct Proxies {
    dir: tempfile::TempDir,
    nginx_port: u16,
    haproxy_port: u16,
    stats_port: u16,
}

impl Proxies {
    fn new() -> Proxies {
        Proxies {
            dir: tempfile::tempdir().unwrap(),
            nginx_port: free_port(),
            haproxy_port: free_port(),
            stats_port: free_port(),
        }
    }
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn s(&self, name: &str) -> String {
        self.p(name).display().to_string()
    }

    /// A confd config rendering both shipped templates with checks, and reloading nginx
    /// (the two templates share `vars`, so only one proxy can take the port; HAProxy runs
    /// from its own config in the etcd test).
    fn config(&self, backend: &str) -> PathBuf {
        self.config_with(backend, &templates_dir().join("nginx.conf.hbs"))
    }

    /// Like [`Proxies::config`] with another nginx template source.
    fn config_with(&self, backend: &str, nginx_src: &Path) -> PathBuf {
        let (d, nginx_pid) = (self.dir.path().display(), self.s("nginx.pid"));
        let nginx_conf = self.s("nginx.conf");
        let cfg = format!(
            r#"
backend: {backend}
wait: {{ min: 100ms, max: 1s }}
poll_wait: 5s
vars:
  listen: {np}
  bind_address: 127.0.0.1
  pid: {nginx_pid}
  error_log: {d}/nginx-error.log
  access_log: {d}/nginx-access.log
  temp_dir: {d}
  default_service: http
templates:
  - src: {nginx_src}
    dest: {nginx_conf}
    check: "nginx -t -q -e {d}/nginx-check.log -c {{{{staged}}}}"
    reload: {nginx_reload:?}
  - src: {tpl}/haproxy.cfg.hbs
    dest: {d}/haproxy.cfg
    check: ["haproxy", "-c", "-q", "-f", "{{{{staged}}}}"]
"#,
            np = self.nginx_port,
            nginx_reload = signal_reload(&self.p("nginx.pid"), "HUP"),
            tpl = templates_dir().display(),
            nginx_src = nginx_src.display(),
        );
        // The HAProxy template reads the stats settings too.
        let cfg = cfg.replace(
            "  default_service: http\n",
            &format!(
                "  default_service: http\n  stats_port: {sp}\n  stats_user: admin\n  stats_password: s3cret\n",
                sp = self.stats_port,
            ),
        );
        let path = self.p("confd.yaml");
        write(&path, &cfg);
        path
    }

    /// Starts nginx on the rendered file; returns once its master has written its PID (so
    /// confd's reloads reach it from then on).
    async fn start_nginx(&self) -> Process {
        let p = Process::spawn(
            Path::new("nginx"),
            &[
                "-e",
                &self.s("nginx-start.log"),
                "-c",
                &self.s("nginx.conf"),
                "-g",
                "daemon off;",
            ],
            &[],
        );
        wait_pid_file(&self.p("nginx.pid"), WAIT).await;
        p
    }

    /// Starts HAProxy (master-worker) on the rendered file; returns once its PID is written.
    async fn start_haproxy(&self) -> Process {
        let p = Process::spawn(
            Path::new("haproxy"),
            &[
                "-W",
                "-f",
                &self.s("haproxy.cfg"),
                "-p",
                &self.s("haproxy.pid"),
            ],
            &[],
        );
        wait_pid_file(&self.p("haproxy.pid"), WAIT).await;
        p
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// Consul: nginx and HAProxy both route to exactly the registered instances as they come
/// and go, and the vhost (hostname + domain) and stats page work.
#[tokio::test]
async fn consul_nginx_and_haproxy_route_to_exactly_the_live_set() {
    let consul = Consul::start().await;
    let st = store(&consul.uri());
    let backends = [
        Backend::start("b1").await,
        Backend::start("b2").await,
        Backend::start("b3").await,
    ];
    for b in &backends[..2] {
        let mut s = b.service("http");
        s.meta.insert("hostname".into(), "2048".into());
        s.meta.insert("domain".into(), "local.com".into());
        st.register(&s).await.unwrap();
    }
    let px = Proxies::new();
    // Both shipped templates are rendered and checked; nginx serves (HAProxy is exercised
    // live in the etcd test).
    let cfg = px.config(&consul.uri());
    let confd_p = spawn_confd(&["--config", cfg.to_str().unwrap()]);
    wait_file(&confd_p, "nginx.conf rendered", &px.p("nginx.conf"), |t| {
        t.contains("svc_http")
    })
    .await;
    let _nginx = px.start_nginx().await;
    wait_routes(
        "nginx, two instances",
        px.nginx_port,
        None,
        &["b1", "b2"],
        WAIT,
    )
    .await;
    wait_routes(
        "nginx vhost 2048.local.com",
        px.nginx_port,
        Some("2048.local.com"),
        &["b1", "b2"],
        WAIT,
    )
    .await;

    st.register(&backends[2].service("http")).await.unwrap();
    wait_routes(
        "nginx, three instances",
        px.nginx_port,
        None,
        &["b1", "b2", "b3"],
        WAIT,
    )
    .await;
    st.deregister(&backends[0].service("http")).await.unwrap();
    wait_routes(
        "nginx, b1 removed",
        px.nginx_port,
        None,
        &["b2", "b3"],
        WAIT,
    )
    .await;
    let out = confd_p.output();
    assert!(out.contains("reloaded"), "{out}");
    assert!(!out.contains("ERROR"), "{out}");
    assert!(read(&px.p("haproxy.cfg")).contains("server b3 127.0.0.1:"));
}

/// How many lines of `p`'s output contain every needle.
fn count_lines(p: &Process, needles: &[&str]) -> usize {
    p.output()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

/// Waits until more than `seen` lines of `p`'s output contain every needle.
async fn wait_lines_past(p: &Process, needles: &[&str], seen: usize) {
    let found = poll(WAIT, Duration::from_millis(100), || async {
        (count_lines(p, needles) > seen).then_some(())
    })
    .await;
    assert!(
        found.is_some(),
        "no more than {seen} lines with {needles:?} in:\n{}",
        p.output()
    );
}

/// Waits until one line of `p`'s output contains every needle.
async fn wait_line(p: &Process, needles: &[&str]) {
    wait_lines_past(p, needles, 0).await;
}

/// confd starts before the proxy (as in a container whose entrypoint starts both): the first
/// render's reload fails, and the new file stays, since removing it would leave nginx nothing
/// to start on. A change while nginx is still down replaces it and stays too: the file it
/// replaces was never loaded, so putting it back would only start nginx on an old registry.
/// The reload is retried, and nginx, once it runs, serves the current config.
#[tokio::test]
async fn reload_failures_before_the_proxy_starts_are_retried() {
    let etcd = Etcd::start().await;
    let uri = etcd.uri("services");
    let st = store(&uri);
    let (b1, b2) = (Backend::start("r1").await, Backend::start("r2").await);
    st.register(&b1.service("http")).await.unwrap();
    let px = Proxies::new();
    let cfg = px.config(&uri);
    let p = spawn_confd(&["--config", cfg.to_str().unwrap()]);
    let kept = ["keeping the new file", "nginx.conf"];
    wait_line(&p, &kept).await;
    let first = read(&px.p("nginx.conf"));
    assert!(first.contains(&format!("127.0.0.1:{}", b1.port)), "{first}");

    // Changed while nginx is down: the new file is written, its reload fails, and it stays.
    st.register(&b2.service("http")).await.unwrap();
    let second = format!("127.0.0.1:{}", b2.port);
    wait_file(&p, "the change written", &px.p("nginx.conf"), |t| {
        t.contains(&second)
    })
    .await;
    // A reload that fails from here on runs with the new file in place.
    wait_lines_past(&p, &kept, count_lines(&p, &kept)).await;
    let now = read(&px.p("nginx.conf"));
    assert!(now.contains(&second), "the first file was put back:\n{now}");
    let out = p.output();
    assert!(!out.contains("restoring the previous file"), "{out}");

    // nginx starts on the current file; the retried reload then succeeds.
    let _nginx = px.start_nginx().await;
    wait_routes(
        "nginx, both, on the file it started with",
        px.nginx_port,
        None,
        &["r1", "r2"],
        WAIT,
    )
    .await;
    wait_line(&p, &["confd::runner: reloaded "]).await;
    let out = p.output();
    assert!(out.contains("trying again in"), "{out}");
}

/// A template edit that nginx refuses: the check fails, the error names the template with
/// nginx's complaint, nginx.conf stays as it was and nginx keeps serving; fixing the template
/// on disk applies at once.
#[tokio::test]
async fn failed_nginx_check_keeps_config_and_proxy_serving() {
    let etcd = Etcd::start().await;
    let uri = etcd.uri("services");
    let b1 = Backend::start("n1").await;
    store(&uri).register(&b1.service("http")).await.unwrap();
    let px = Proxies::new();
    let src = px.p("nginx.conf.hbs");
    let shipped = read(&templates_dir().join("nginx.conf.hbs"));
    write(&src, &shipped);
    let cfg = px.config_with(&uri, &src);
    let p = spawn_confd(&["--config", cfg.to_str().unwrap()]);
    wait_file(&p, "nginx.conf rendered", &px.p("nginx.conf"), |t| {
        t.contains("svc_http")
    })
    .await;
    let _nginx = px.start_nginx().await;
    wait_routes("nginx serving", px.nginx_port, None, &["n1"], WAIT).await;
    let good = read(&px.p("nginx.conf"));

    write(
        &src,
        &shipped.replace(
            "worker_processes 1;",
            "worker_processes 1;\nbogus_directive on;",
        ),
    );
    p.wait_output("check failed", WAIT).await;
    let out = p.output();
    let line = out.lines().find(|l| l.contains("check failed")).unwrap();
    assert!(line.contains("nginx.conf.hbs"), "{line}");
    assert!(line.contains("bogus_directive"), "{line}");
    assert_eq!(read(&px.p("nginx.conf")), good);
    wait_routes("nginx still serving", px.nginx_port, None, &["n1"], WAIT).await;

    write(
        &src,
        &shipped.replace("worker_processes 1;", "worker_processes 2;"),
    );
    wait_file(&p, "fixed template applied", &px.p("nginx.conf"), |t| {
        t.contains("worker_processes 2;")
    })
    .await;
    wait_routes(
        "nginx serving after the fix",
        px.nginx_port,
        None,
        &["n1"],
        WAIT,
    )
    .await;
}

/// HAProxy from etcd: routing follows the instances; Host routing for the vhost; the stats
/// page demands the configured user and lists the servers.
#[tokio::test]
async fn etcd_haproxy_routes_vhosts_and_protects_stats() {
    let etcd = Etcd::start().await;
    let uri = etcd.uri("services");
    let st = store(&uri);
    let b1 = Backend::start("h1").await;
    let b2 = Backend::start("h2").await;
    let mut s1 = b1.service("app");
    s1.meta.insert("hostname".into(), "2048".into());
    s1.meta.insert("domain".into(), "local.com".into());
    st.register(&s1).await.unwrap();
    let px = Proxies::new();
    let d = px.dir.path().display().to_string();
    let cfg = format!(
        r#"
backend: {uri}
wait: {{ min: 100ms, max: 1s }}
vars:
  listen: {hp}
  bind_address: 127.0.0.1
  pid: {d}/haproxy.pid
  default_tag: backend
  stats_port: {sp}
  stats_user: admin
  stats_password: s3cret
templates:
  - src: {tpl}/haproxy.cfg.hbs
    dest: {d}/haproxy.cfg
    check: ["haproxy", "-c", "-q", "-f"]
    reload: {reload:?}
"#,
        reload = signal_reload(&px.p("haproxy.pid"), "USR2"),
        hp = px.haproxy_port,
        sp = px.stats_port,
        tpl = templates_dir().display()
    );
    write(&px.p("confd.yaml"), &cfg);
    let confd_p = spawn_confd(&["--config", &px.s("confd.yaml")]);
    wait_file(
        &confd_p,
        "haproxy.cfg rendered",
        &px.p("haproxy.cfg"),
        |t| t.contains("backend svc_app"),
    )
    .await;
    let _haproxy = px.start_haproxy().await;
    wait_routes("haproxy default", px.haproxy_port, None, &["h1"], WAIT).await;
    wait_routes(
        "haproxy vhost",
        px.haproxy_port,
        Some("2048.local.com"),
        &["h1"],
        WAIT,
    )
    .await;

    let mut s2 = b2.service("app");
    s2.meta = s1.meta.clone();
    st.register(&s2).await.unwrap();
    wait_routes("haproxy, both", px.haproxy_port, None, &["h1", "h2"], WAIT).await;
    wait_routes(
        "haproxy vhost, both",
        px.haproxy_port,
        Some("2048.local.com"),
        &["h1", "h2"],
        WAIT,
    )
    .await;
    st.deregister(&s1).await.unwrap();
    wait_routes("haproxy, h1 removed", px.haproxy_port, None, &["h2"], WAIT).await;

    let stats = format!("http://127.0.0.1:{}/stats", px.stats_port);
    // No pooled connections: a reload still finishing may close an idle keep-alive one.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let anon = http.get(&stats).send().await.unwrap();
    assert_eq!(anon.status(), 401);
    let page = http
        .get(&stats)
        .basic_auth("admin", Some("s3cret"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("svc_app"), "stats page lists the backend");
    assert!(!confd_p.output().contains("ERROR"), "{}", confd_p.output());
}

/// Hostile registry values cannot inject directives: the rendered nginx.conf passes
/// `nginx -t` and HAProxy's `-c`, and contains no `listen 81`.
#[tokio::test]
async fn hostile_values_cannot_inject() {
    let etcd = Etcd::start().await;
    let uri = etcd.uri("services");
    let st = store(&uri);
    let mut evil = service(HOSTILE, HOSTILE, "127.0.0.1", 8080);
    evil.tags = vec![HOSTILE.into(), "backend".into()];
    evil.meta.insert("vhost".into(), HOSTILE.into());
    evil.meta.insert("check_path".into(), HOSTILE.into());
    evil.meta.insert(HOSTILE.into(), HOSTILE.into());
    st.register(&evil).await.unwrap();
    let mut evil_addr = service("evil-addr", "http", "1.2.3.4; } server { listen 81; }", 80);
    evil_addr.meta.insert("hostname".into(), HOSTILE.into());
    st.register(&evil_addr).await.unwrap();
    st.register(&service("good", "http", "127.0.0.1", 8081))
        .await
        .unwrap();

    let px = Proxies::new();
    let d = px.dir.path().display().to_string();
    let cfg = format!(
        r#"
backend: {uri}
vars:
  listen: {np}
  pid: {d}/nginx.pid
  error_log: {d}/error.log
  access_log: {d}/access.log
  temp_dir: {d}
  default_service: {hostile_json}
templates:
  - src: {tpl}/nginx.conf.hbs
    dest: {d}/nginx.conf
    check: "nginx -t -q -e {d}/check.log -c {{{{staged}}}}"
  - src: {tpl}/haproxy.cfg.hbs
    dest: {d}/haproxy.cfg
    check: "haproxy -c -q -f {{{{staged}}}}"
"#,
        np = px.nginx_port,
        hostile_json = serde_json::to_string(HOSTILE).unwrap(),
        tpl = templates_dir().display()
    );
    write(&px.p("confd.yaml"), &cfg);
    let (ok, out) = confd_once(&["--config", &px.s("confd.yaml"), "--once"]).await;
    assert!(ok, "{out}");
    for f in ["nginx.conf", "haproxy.cfg"] {
        let text = read(&px.p(f));
        assert!(text.contains("8081"), "{f} has the good instance:\n{text}");
        assert!(
            text.contains("8080"),
            "{f} has the hostile-named instance:\n{text}"
        );
        assert!(!text.contains("listen 81"), "{f} was injected:\n{text}");
        assert!(
            !text.contains("1.2.3.4"),
            "{f} has the hostile address:\n{text}"
        );
    }
    // Validated by the real proxies once more, outside confd.
    let st = std::process::Command::new("nginx")
        .args([
            "-t",
            "-q",
            "-e",
            &format!("{d}/t.log"),
            "-c",
            &px.s("nginx.conf"),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(
        out.contains(r#"leaving instance "evil-addr of service http" out of the templates' data: invalid address"#),
        "{out}"
    );
}

/// A failing check keeps the previous file (and the proxy serving it); the error names the
/// template and carries the check's output; the next good change goes through.
#[tokio::test]
async fn failing_check_keeps_the_previous_file() {
    let etcd = Etcd::start().await;
    let uri = etcd.uri("services");
    let st = store(&uri);
    st.register(&service("good1", "web", "127.0.0.1", 1001))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tpl = dir.path().join("list.hbs");
    write(&tpl, "{{#each service.web}}{{id}}\n{{/each}}");
    let dest = dir.path().join("list.txt");
    let cfg = dir.path().join("c.yaml");
    write(
        &cfg,
        &format!(
            "backend: {uri}\nwait: {{ min: 50ms, max: 500ms }}\ntemplates:\n  - src: {}\n    dest: {}\n    check: \"if grep -q bad {{{{staged}}}}; then echo found a bad one; exit 1; fi\"\n",
            tpl.display(),
            dest.display()
        ),
    );
    let p = spawn_confd(&["--config", cfg.to_str().unwrap()]);
    wait_file(&p, "first render", &dest, |t| t == "good1\n").await;
    st.register(&service("bad", "web", "127.0.0.1", 1002))
        .await
        .unwrap();
    p.wait_output("check failed", WAIT).await;
    let out = p.output();
    let line = out.lines().find(|l| l.contains("check failed")).unwrap();
    assert!(line.contains("list.hbs"), "{line}");
    assert!(line.contains("found a bad one"), "{line}");
    assert_eq!(read(&dest), "good1\n");
    st.deregister(&service("bad", "web", "127.0.0.1", 1002))
        .await
        .unwrap();
    st.register(&service("good2", "web", "127.0.0.1", 1003))
        .await
        .unwrap();
    wait_file(&p, "next good change", &dest, |t| t == "good1\ngood2\n").await;
}

/// A broken template (misspelt field) logs an error naming the field; fixing the file on
/// disk renders at once, without a restart or a store change.
#[tokio::test]
async fn broken_template_fixed_on_disk_recovers() {
    let etcd = Etcd::start().await;
    let uri = etcd.uri("services");
    store(&uri)
        .register(&service("one", "web", "127.0.0.1", 1001))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tpl = dir.path().join("t.hbs");
    write(&tpl, "{{#each service.web}}{{prot}}\n{{/each}}");
    let dest = dir.path().join("out.txt");
    let p = spawn_confd(&[
        "--backend",
        &uri,
        "--template",
        &format!("{}:{}", tpl.display(), dest.display()),
    ]);
    p.wait_output("misspelt field `prot`", WAIT).await;
    assert!(!dest.exists());
    write(&tpl, "{{#each service.web}}{{port}}\n{{/each}}");
    wait_file(&p, "fixed template rendered", &dest, |t| t == "1001\n").await;
}

/// 50 registrations in a burst give a handful of renders, not 50.
#[tokio::test]
async fn burst_of_registrations_coalesces() {
    let etcd = Etcd::start().await;
    let uri = etcd.uri("services");
    let st = store(&uri);
    st.register(&service("s00", "web", "127.0.0.1", 2000))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tpl = dir.path().join("t.hbs");
    write(&tpl, "{{#each service.web}}{{id}}\n{{/each}}");
    let dest = dir.path().join("out.txt");
    let renders = dir.path().join("renders.log");
    let p = spawn_confd(&[
        "--backend",
        &uri,
        "--wait",
        "500ms:3s",
        "--template",
        &format!(
            "{}:{}:echo render >> {}",
            tpl.display(),
            dest.display(),
            renders.display()
        ),
    ]);
    wait_file(&p, "first render", &renders, |t| t.lines().count() == 1).await;
    // All 50 at once, so the burst is a burst even on a loaded machine.
    let mut set = tokio::task::JoinSet::new();
    for i in 1..=50u16 {
        let st = st.clone();
        set.spawn(async move {
            st.register(&service(&format!("s{i:02}"), "web", "127.0.0.1", 2000 + i))
                .await
                .unwrap()
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    wait_file(&p, "all 51 rendered", &dest, |t| t.lines().count() == 51).await;
    // The reload runs just after the rename: wait for the one following the last render.
    // Nothing changes after all 51 are in, so no later render can add to the count.
    wait_file(&p, "reload after the burst", &renders, |t| {
        t.lines().count() >= 2
    })
    .await;
    let n = read(&renders).lines().count() - 1;
    assert!(
        (1..=4).contains(&n),
        "{n} renders for a burst of 50:\n{}",
        p.output()
    );
}

/// etcd restarts; changes made while confd reconnects are all rendered (watch resumed from
/// the last revision).
#[tokio::test]
async fn etcd_restart_misses_no_change() {
    let mut etcd = Etcd::start().await;
    let uri = etcd.uri("services");
    let st = store(&uri);
    st.register(&service("a", "web", "127.0.0.1", 1))
        .await
        .unwrap();
    st.register(&service("b", "web", "127.0.0.1", 2))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tpl = dir.path().join("t.hbs");
    write(&tpl, "{{#each service.web}}{{id}}\n{{/each}}");
    let dest = dir.path().join("out.txt");
    let p = spawn_confd(&[
        "--backend",
        &uri,
        "--wait",
        "50ms:200ms",
        "--template",
        &format!("{}:{}", tpl.display(), dest.display()),
    ]);
    wait_file(&p, "first render", &dest, |t| t == "a\nb\n").await;
    etcd.restart().await;
    // Straight after the restart, before confd's backoff lets it reconnect.
    st.deregister(&service("a", "web", "127.0.0.1", 1))
        .await
        .unwrap();
    st.register(&service("c", "web", "127.0.0.1", 3))
        .await
        .unwrap();
    wait_file(&p, "changes made during reconnect", &dest, |t| {
        t == "b\nc\n"
    })
    .await;
    // And the watch keeps working after the reconnect.
    st.register(&service("d", "web", "127.0.0.1", 4))
        .await
        .unwrap();
    wait_file(&p, "change after reconnect", &dest, |t| t == "b\nc\nd\n").await;
    assert!(p.output().contains("resum"), "{}", p.output());
}

/// `--once` renders and exits 0; a failing template makes it exit non-zero. `--dry-run`
/// prints a diff and writes nothing.
#[tokio::test]
async fn once_and_dry_run() {
    let etcd = Etcd::start().await;
    let uri = etcd.uri("services");
    store(&uri)
        .register(&service("one", "web", "127.0.0.1", 1001))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tpl = dir.path().join("t.hbs");
    write(&tpl, "{{#each service.web}}{{id}}:{{port}}\n{{/each}}");
    let dest = dir.path().join("out.txt");
    let spec = format!("{}:{}", tpl.display(), dest.display());

    write(&dest, "old\n");
    let (ok, out) = confd_once(&["--backend", &uri, "--template", &spec, "--dry-run"]).await;
    assert!(ok, "{out}");
    assert!(out.contains("-old") && out.contains("+one:1001"), "{out}");
    assert_eq!(read(&dest), "old\n", "dry run wrote the file");

    let (ok, out) = confd_once(&["--backend", &uri, "--template", &spec, "--once"]).await;
    assert!(ok, "{out}");
    assert_eq!(read(&dest), "one:1001\n");

    let bad = dir.path().join("bad.hbs");
    write(&bad, "{{nope}}");
    let bad_spec = format!("{}:{}", bad.display(), dir.path().join("bad.txt").display());
    let (ok, out) = confd_once(&[
        "--backend",
        &uri,
        "--template",
        &spec,
        "--template",
        &bad_spec,
        "--once",
    ])
    .await;
    assert!(!ok, "{out}");
    assert!(out.contains("`nope`"), "{out}");
}

/// A bad config file is refused at start with one `file:line:column: ...` line.
#[tokio::test]
async fn bad_config_is_refused_with_location() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    write(
        &cfg,
        "backend: consul://127.0.0.1:8500\ntemplates:\n  - src: a.hbs\n    dets: /tmp/x\n",
    );
    let (ok, out) = confd_once(&["--config", cfg.to_str().unwrap()]).await;
    assert!(!ok);
    let want = format!("{}:4:5: ", cfg.display());
    let lines: Vec<&str> = out.lines().filter(|l| l.contains(&want)).collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(lines[0].contains("unknown field `dets`"), "{out}");
}

/// SIGHUP re-reads the config (new vars render); SIGTERM exits 0.
#[tokio::test]
async fn sighup_rereads_config_and_sigterm_exits_zero() {
    let etcd = Etcd::start().await;
    let uri = etcd.uri("services");
    store(&uri)
        .register(&service("one", "web", "127.0.0.1", 1001))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tpl = dir.path().join("t.hbs");
    write(
        &tpl,
        "{{vars.greeting}} {{#each service.web}}{{id}}{{/each}}\n",
    );
    let dest = dir.path().join("out.txt");
    let cfg = dir.path().join("c.yaml");
    let config = |greeting: &str| {
        format!(
            "backend: {uri}\nvars: {{ greeting: {greeting} }}\ntemplates:\n  - src: {}\n    dest: {}\n",
            tpl.display(),
            dest.display()
        )
    };
    write(&cfg, &config("hello"));
    let mut p = spawn_confd(&["--config", cfg.to_str().unwrap()]);
    wait_file(&p, "first render", &dest, |t| t == "hello one\n").await;
    // A broken file on SIGHUP is refused and the old config keeps running.
    write(&cfg, "vars: [\n");
    p.signal(libc::SIGHUP);
    p.wait_output("new configuration refused", WAIT).await;
    // So is one whose template file does not exist (a mistyped `src`).
    let missing = dir.path().join("missing.hbs");
    write(
        &cfg,
        &config("hallo").replace(&tpl.display().to_string(), &missing.display().to_string()),
    );
    p.signal(libc::SIGHUP);
    wait_line(&p, &["new configuration refused", "missing.hbs"]).await;
    write(&cfg, &config("bonjour"));
    p.signal(libc::SIGHUP);
    wait_file(&p, "re-read config rendered", &dest, |t| {
        t == "bonjour one\n"
    })
    .await;
    p.signal(libc::SIGTERM);
    let st = p.wait_exit(WAIT).await;
    assert!(st.success(), "{st:?}\n{}", p.output());
}

/// Long polls against Consul: 1 + services while within `max_long_polls`, then constant.
#[tokio::test]
async fn consul_long_polls_stay_bounded() {
    let consul = Consul::start().await;
    let st = store(&consul.uri());
    for i in 0..30 {
        st.register(&service(
            &format!("i{i}"),
            &format!("svc{i:02}"),
            "127.0.0.1",
            3000 + i,
        ))
        .await
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let tpl = dir.path().join("t.hbs");
    write(&tpl, "{{#each services}}{{name}}\n{{/each}}");
    let dest = dir.path().join("out.txt");
    let cfg = dir.path().join("c.yaml");
    write(
        &cfg,
        &format!(
            "backend: {}\nmax_long_polls: 8\npoll_wait: 5s\ntemplates:\n  - src: {}\n    dest: {}\n",
            consul.uri(),
            tpl.display(),
            dest.display()
        ),
    );
    let p = spawn_confd(&["--config", cfg.to_str().unwrap()]);
    wait_file(&p, "30 services rendered", &dest, |t| {
        t.lines().count() == 30
    })
    .await;
    // A change is still seen in shared mode.
    st.register(&service("i99", "svc99", "127.0.0.1", 3999))
        .await
        .unwrap();
    wait_file(&p, "31 services rendered", &dest, |t| {
        t.lines().count() == 31
    })
    .await;
    let out = p.output();
    assert!(out.contains("shared health polling"), "{out}");
    let max = out
        .lines()
        .filter_map(|l| l.split("long_polls=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse::<usize>().ok())
        .max()
        .unwrap();
    assert!(max <= 8, "{max} long polls open:\n{out}");
}

/// A reload that fails after the swap puts the previous file back and reloads again; the
/// daemon keeps running and applies the next good change.
#[tokio::test]
async fn failed_reload_restores_the_previous_file() {
    let etcd = Etcd::start().await;
    let uri = etcd.uri("services");
    let st = store(&uri);
    st.register(&service("good1", "web", "127.0.0.1", 1))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tpl = dir.path().join("t.hbs");
    write(&tpl, "{{#each service.web}}{{id}}\n{{/each}}");
    let dest = dir.path().join("out.txt");
    let log = dir.path().join("reloads.log");
    // The "proxy" refuses any config naming `bad`, after the file was swapped in.
    let reload = format!(
        "if grep -q bad {d}; then echo refused >> {l}; echo cannot load bad >&2; exit 1; fi; echo ok >> {l}",
        d = dest.display(),
        l = log.display()
    );
    let p = spawn_confd(&[
        "--backend",
        &uri,
        "--wait",
        "50ms:200ms",
        "--template",
        &format!("{}:{}:{reload}", tpl.display(), dest.display()),
    ]);
    wait_file(&p, "first render and reload", &log, |t| t == "ok\n").await;
    let bad = service("bad", "web", "127.0.0.1", 2);
    st.register(&bad).await.unwrap();
    // Refused, restored, reloaded again with the previous file. (The template is retried
    // after a backoff, refused and restored again each time, while `bad` is registered.)
    wait_file(&p, "rollback reload", &log, |t| {
        t.starts_with("ok\nrefused\nok\n")
    })
    .await;
    assert_eq!(read(&dest), "good1\n");
    let out = p.output();
    let line = out.lines().find(|l| l.contains("reload failed")).unwrap();
    assert!(
        line.contains("t.hbs") && line.contains("cannot load bad"),
        "{line}"
    );
    st.deregister(&bad).await.unwrap();
    st.register(&service("good2", "web", "127.0.0.1", 3))
        .await
        .unwrap();
    wait_file(&p, "next good change", &dest, |t| t == "good1\ngood2\n").await;
}

/// Consul: by default only instances whose checks pass are rendered; `include_unhealthy`
/// renders the others too, with their health. Consul KV (`consulkv://`) renders as well.
#[tokio::test]
async fn consul_health_filter_and_consulkv() {
    let consul = Consul::start().await;
    let st = store(&consul.uri());
    st.register(&service("up", "web", "127.0.0.1", 1))
        .await
        .unwrap();
    let mut down = service("down", "web", "127.0.0.1", 2);
    down.check = Some(switchboard::Check {
        initial_status: Some("critical".into()),
        ..switchboard::Check::new(switchboard::CheckKind::Ttl(Duration::from_secs(60)))
    });
    st.register(&down).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tpl = dir.path().join("t.hbs");
    write(
        &tpl,
        "{{#each service.web}}{{id}}:{{health}}:{{node}}\n{{/each}}",
    );
    let dest = dir.path().join("out.txt");
    let spec = format!("{}:{}", tpl.display(), dest.display());
    let (ok, out) = confd_once(&["--backend", &consul.uri(), "--template", &spec, "--once"]).await;
    assert!(ok, "{out}");
    assert_eq!(read(&dest), "up:passing:sbtest\n");

    let cfg = dir.path().join("c.yaml");
    write(
        &cfg,
        &format!(
            "backend: {}\ninclude_unhealthy: true\ntemplates:\n  - src: {}\n    dest: {}\n",
            consul.uri(),
            tpl.display(),
            dest.display()
        ),
    );
    let (ok, out) = confd_once(&["--config", cfg.to_str().unwrap(), "--once"]).await;
    assert!(ok, "{out}");
    assert_eq!(read(&dest), "down:critical:sbtest\nup:passing:sbtest\n");

    let kv_uri = format!("consulkv://127.0.0.1:{}/svc", consul.port);
    store(&kv_uri)
        .register(&service("k1", "web", "10.0.0.9", 8080))
        .await
        .unwrap();
    write(&tpl, "{{#each service.web}}{{id}}={{addr this}}\n{{/each}}");
    let (ok, out) = confd_once(&["--backend", &kv_uri, "--template", &spec, "--once"]).await;
    assert!(ok, "{out}");
    assert_eq!(read(&dest), "k1=10.0.0.9:8080\n");
}

/// While the store is down nothing is rendered: the last good file stays.
#[tokio::test]
async fn outage_keeps_the_last_good_file() {
    let mut etcd = Etcd::start().await;
    let uri = etcd.uri("services");
    let st = store(&uri);
    st.register(&service("a", "web", "127.0.0.1", 1))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tpl = dir.path().join("t.hbs");
    write(&tpl, "{{#each service.web}}{{id}}\n{{/each}}");
    let dest = dir.path().join("out.txt");
    let p = spawn_confd(&[
        "--backend",
        &uri,
        "--wait",
        "50ms:200ms",
        "--template",
        &format!("{}:{}", tpl.display(), dest.display()),
    ]);
    wait_file(&p, "first render", &dest, |t| t == "a\n").await;
    etcd.stop();
    p.wait_output("etcd watch", WAIT).await;
    // A template edit during the outage renders from the last good snapshot, not from nothing.
    write(&tpl, "{{#each service.web}}[{{id}}]\n{{/each}}");
    wait_file(&p, "edit applied during the outage", &dest, |t| {
        t == "[a]\n"
    })
    .await;
    etcd.restart().await;
    st.register(&service("b", "web", "127.0.0.1", 2))
        .await
        .unwrap();
    wait_file(&p, "change after the outage", &dest, |t| t == "[a]\n[b]\n").await;
}
