//! `confd --exec`: confd supervises a real nginx against a real Consul. It starts nginx after
//! the first render, reloads it by signal on a change, restarts it after `kill -9`, stops it
//! and exits with it on SIGTERM, and with the store down starts it on the file an earlier run
//! left (fail static), catching up when the store answers.

use std::path::PathBuf;
use std::time::Duration;
use switchboard::{RegistryUri, Store};
use switchboard_tests::*;

/// Upper bound for any single wait in these tests.
const WAIT: Duration = Duration::from_secs(30);

/// nginx's files, confd's config and the port nginx listens on, in one temp dir.
struct Setup {
    dir: tempfile::TempDir,
    port: u16,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
        }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn s(&self, name: &str) -> String {
        self.p(name).display().to_string()
    }

    /// A confd config rendering the shipped nginx template for service `http`, with `exec`
    /// running nginx in the foreground on the rendered file, and no reload command: the
    /// template is reloaded with the exec reload signal.
    fn config(&self, backend: &str) -> PathBuf {
        let d = self.dir.path().display();
        let exec = format!(
            "nginx -e {d}/nginx-start.log -c {conf} -g 'daemon off;'",
            conf = self.s("nginx.conf")
        );
        let cfg = format!(
            r#"
backend: {backend}
wait: {{ min: 100ms, max: 1s }}
poll_wait: 5s
vars:
  listen: {port}
  bind_address: 127.0.0.1
  pid: {d}/nginx.pid
  error_log: {d}/nginx-error.log
  access_log: {d}/nginx-access.log
  temp_dir: {d}
  default_service: http
templates:
  - src: {tpl}
    dest: {d}/nginx.conf
    check: "nginx -t -q -e {d}/nginx-check.log -c {{{{staged}}}}"
exec:
  command: {exec:?}
  reload_signal: SIGHUP
  kill_timeout: 10s
"#,
            port = self.port,
            tpl = workspace_root().join("templates/nginx.conf.hbs").display(),
        );
        let path = self.p("confd.yaml");
        std::fs::write(&path, cfg).unwrap();
        path
    }

    /// The live nginx master's PID, from its pid file.
    fn master(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.p("nginx.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        alive(pid).then_some(pid)
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// PIDs of the processes named `nginx` whose process group is `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() != Some(&"Z") && fields.get(2) == Some(&pgid.to_string().as_str()) {
            out.push(pid);
        }
    }
    out
}

/// Waits until requests through `port` reach exactly `want`; panics with confd's output.
async fn wait_routes(what: &str, confd: &Process, port: u16, want: &[&str]) {
    if let Err(last) = routes_converge(port, None, want, WAIT).await {
        panic!(
            "{what}: wanted {want:?}, last saw {last:?}; confd output:\n{}",
            confd.output()
        );
    }
}

fn consul_store(uri: &str) -> Store {
    Store::new(&RegistryUri::parse(uri).unwrap())
}

/// Start after the first render, reload by signal, restart after kill -9, SIGTERM stops both.
#[tokio::test]
async fn exec_runs_nginx_from_first_render_to_shutdown() {
    let consul = Consul::start().await;
    let store = consul_store(&consul.uri());
    let a = Backend::start("exec-a").await;
    store.register(&a.service("http")).await.unwrap();
    let s = Setup::new();
    let cfg = s.config(&consul.uri());
    let mut c = spawn_confd(&["--config", &cfg.display().to_string()]);

    // nginx starts on the first render and serves the registered backend.
    wait_routes("first render", &c, s.port, &["exec-a"]).await;
    let master = s.master().expect("nginx master running");
    let out = c.output();
    let rendered = out.find("rendered and replaced").expect("a render logged");
    let started = out
        .find("supervised process started")
        .unwrap_or_else(|| panic!("no start logged:\n{out}"));
    assert!(
        rendered < started,
        "nginx started before the first render:\n{out}"
    );
    assert!(!out.contains("exited unexpectedly"), "{out}");

    // A membership change is rendered and reloaded by SIGHUP: same master, new config.
    let b = Backend::start("exec-b").await;
    store.register(&b.service("http")).await.unwrap();
    wait_routes("after adding b", &c, s.port, &["exec-a", "exec-b"]).await;
    assert_eq!(s.master(), Some(master), "a reload, not a restart");
    assert!(
        c.output().contains("SIGHUP sent to the supervised process"),
        "{}",
        c.output()
    );

    // kill -9 of the master: its workers go too, and confd starts nginx again.
    // SAFETY: kill(2) of the nginx master this test's confd started.
    unsafe {
        libc::kill(master, libc::SIGKILL);
    }
    let restarted = wait_for("a new nginx master", WAIT, || async {
        s.master().filter(|p| *p != master)
    })
    .await;
    wait_routes("after kill -9", &c, s.port, &["exec-a", "exec-b"]).await;
    assert!(
        group_members(master).is_empty(),
        "the old master's workers live on"
    );
    assert!(c.output().contains("exited unexpectedly"), "{}", c.output());

    // SIGTERM: forwarded to nginx, confd exits with its status (nginx exits 0 on SIGTERM).
    c.signal(libc::SIGTERM);
    let st = c.wait_exit(WAIT).await;
    assert!(st.success(), "confd exit {st:?}; output:\n{}", c.output());
    assert!(!alive(restarted), "nginx still running after confd exited");
    assert!(
        group_members(restarted).is_empty(),
        "nginx workers left behind"
    );
    let after = answers(s.port, None, 1).await;
    assert!(
        after.iter().all(|a| a.starts_with("error")),
        "port still answers: {after:?}"
    );
    assert!(c.output().contains("forwarding SIGTERM"), "{}", c.output());
}

/// Store down at start, rendered file present: nginx starts on it; the store comes back and
/// confd catches up.
#[tokio::test]
async fn exec_fails_static_on_an_earlier_file_then_catches_up() {
    let mut consul = Consul::start().await;
    let store = consul_store(&consul.uri());
    let a = Backend::start("static-a").await;
    store.register(&a.service("http")).await.unwrap();
    let s = Setup::new();
    let cfg = s.config(&consul.uri());

    // An earlier run left nginx.conf routing to `a`.
    let mut once = Process::spawn(
        &bin("confd"),
        &["--config", &cfg.display().to_string(), "--once"],
        &[],
    );
    let st = once.wait_exit(WAIT).await;
    assert!(st.success(), "confd --once: {}", once.output());
    assert!(std::fs::read_to_string(s.p("nginx.conf"))
        .unwrap()
        .contains(&a.port.to_string()));
    assert!(s.master().is_none(), "--once must not start the command");

    // The store is down; confd starts nginx on that file.
    consul.stop();
    let c = spawn_confd(&["--config", &cfg.display().to_string()]);
    wait_routes("fail static", &c, s.port, &["static-a"]).await;
    assert!(c.output().contains("fail static"), "{}", c.output());
    let master = s.master().expect("nginx master");

    // The store comes back (empty: a dev agent forgets) with `b` only: confd catches up.
    consul.restart().await;
    let b = Backend::start("static-b").await;
    store.register(&b.service("http")).await.unwrap();
    wait_routes("caught up", &c, s.port, &["static-b"]).await;
    assert_eq!(s.master(), Some(master), "caught up by a reload");

    // confd killed outright (SIGKILL, nothing forwarded): its proxy does not outlive it.
    drop(c);
    wait_for("nginx gone after confd was killed", WAIT, || async {
        (!alive(master)).then_some(())
    })
    .await;
}

/// A template that never renders and no earlier file: the command is never started.
#[tokio::test]
async fn exec_waits_for_a_render_when_there_is_no_earlier_file() {
    let s = Setup::new();
    // Nothing listens on this port: the store is unreachable.
    let cfg = s.config(&format!("consul://127.0.0.1:{}", free_port()));
    let mut c = spawn_confd(&["--config", &cfg.display().to_string()]);
    c.wait_output("no earlier files to start on", WAIT).await;
    assert!(s.master().is_none());
    assert!(
        !c.output().contains("supervised process started"),
        "{}",
        c.output()
    );
    // Stopped before it ever started: exits 0, nothing to forward.
    c.signal(libc::SIGTERM);
    let st = c.wait_exit(WAIT).await;
    assert!(st.success(), "{st:?}: {}", c.output());
}
