//! confd changing HAProxy's servers through its runtime API, without reloads: real Consul and
//! etcd, the real `confd` binary (build it first: `cargo build -p confd`) with the shipped
//! template and a `live:` section, a real HAProxy (master-worker) on free loopback ports, and
//! small tokio HTTP backends that answer with their name, can answer slowly, and can stream.
//!
//! Under continuous load from a small generator that counts every failed request (transport
//! error or non-2xx), these tests assert what a user would check: no reload (the worker that
//! answers on the admin socket keeps its pid, and confd's own counter stays put), no failed
//! request, traffic reaching exactly the registered instances, open connections surviving,
//! and the file on disk equal to a fresh render (what a reload would load).

use confd::live::haproxy::cli::Cli;
use confd::live::haproxy::diff;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchboard::{RegistryUri, Service, Store};
use switchboard_tests::load::{Load, LoadSpec};
use switchboard_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Upper bound for any single wait.
const WAIT: Duration = Duration::from_secs(30);

/// confd's quiescence window in most tests.
const QUIESCENCE: &str = "{ min: 100ms, max: 1s }";
/// None at all: each change is applied as soon as it arrives.
const NO_QUIESCENCE: &str = "{ min: 0s, max: 0s }";

// ---------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------

/// An HTTP/1.1 backend (keep-alive, as HAProxy reuses server connections) on a free loopback
/// port. `/` answers its name; `/slow?ms=N` answers it after N ms; `/stream?chunks=N&every=MS`
/// streams N chunked lines, one every MS ms. It counts slow and streamed requests in progress.
struct Backend {
    name: String,
    port: u16,
    in_flight: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    async fn start(name: &str) -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (n, f) = (Arc::<str>::from(name), in_flight.clone());
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, n.clone(), f.clone()));
            }
        });
        Backend {
            name: name.to_string(),
            port,
            in_flight,
            task,
        }
    }

    fn service(&self, svc: &str) -> Service {
        Service {
            id: self.name.clone(),
            name: svc.into(),
            address: "127.0.0.1".into(),
            port: self.port,
            tags: vec!["backend".into()],
            meta: BTreeMap::new(),
            check: None,
            ttl: None,
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn query(path: &str, key: &str) -> u64 {
    path.split_once('?')
        .map(|(_, q)| q)
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn serve(mut sock: tokio::net::TcpStream, name: Arc<str>, in_flight: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = [0u8; 4096];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        buf.drain(..end);
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        // Only slow and streamed requests count: a health check must not pass for one.
        let long = path != "/";
        if long {
            in_flight.fetch_add(1, Ordering::SeqCst);
        }
        let done = respond(&mut sock, &name, &path).await;
        if long {
            in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        if done.is_err() || head.contains("connection: close") {
            return;
        }
    }
}

async fn respond(sock: &mut tokio::net::TcpStream, name: &str, path: &str) -> std::io::Result<()> {
    if path.starts_with("/stream") {
        let (chunks, every) = (query(path, "chunks"), query(path, "every"));
        sock.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await?;
        for i in 0..chunks {
            let line = format!("{name} {i}\n");
            sock.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes())
                .await?;
            tokio::time::sleep(Duration::from_millis(every)).await;
        }
        return sock.write_all(b"0\r\n\r\n").await;
    }
    if path.starts_with("/slow") {
        tokio::time::sleep(Duration::from_millis(query(path, "ms"))).await;
    }
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{name}",
        name.len()
    );
    sock.write_all(resp.as_bytes()).await
}

// ---------------------------------------------------------------------------------------
// confd + HAProxy with a live channel
// ---------------------------------------------------------------------------------------

/// confd rendering the shipped HAProxy template with `live: { haproxy_socket }`, and a real
/// HAProxy (master-worker, reloaded with SIGUSR2) serving the result on a free port.
struct Stack {
    dir: tempfile::TempDir,
    port: u16,
    cli: Cli,
    confd: Process,
    _haproxy: Process,
}

impl Stack {
    /// Starts confd on `backend_uri`; HAProxy starts once the rendered file names `first`.
    /// `fast`: no quiescence window and no check command, so a change is applied within a
    /// few milliseconds of its arrival.
    async fn start(backend_uri: &str, fast: bool, drain_timeout: &str, first: &str) -> Stack {
        let wait = if fast { NO_QUIESCENCE } else { QUIESCENCE };
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let port = free_port();
        let sock = format!("{d}/admin.sock");
        let cfg = format!(
            r#"backend: {backend_uri}
wait: {wait}
vars:
  listen: {port}
  bind_address: 127.0.0.1
  pid: {d}/haproxy.pid
  default_service: web
  stats_socket: {sock}
templates:
  - src: {tpl}
    dest: {d}/haproxy.cfg
{check}    reload: {reload:?}
    live: {{ haproxy: {{ socket: {sock}, drain_timeout: {drain_timeout} }} }}
"#,
            tpl = workspace_root().join("templates/haproxy.cfg.hbs").display(),
            reload = signal_reload(&dir.path().join("haproxy.pid"), "USR2"),
            check = if fast {
                ""
            } else {
                "    check: [\"haproxy\", \"-c\", \"-q\", \"-f\"]\n"
            },
        );
        std::fs::write(dir.path().join("confd.yaml"), cfg).unwrap();
        let confd = Process::spawn(
            &bin("confd"),
            &["--config", &format!("{d}/confd.yaml")],
            &[("RUST_LOG", "info,confd=debug")],
        );
        let rendered = dir.path().join("haproxy.cfg");
        let needle = format!("server {first} ");
        let rendered_ok = poll(WAIT, Duration::from_millis(50), || async {
            std::fs::read_to_string(&rendered)
                .is_ok_and(|t| t.contains(&needle))
                .then_some(())
        })
        .await;
        assert!(
            rendered_ok.is_some(),
            "no first render naming {first}; confd output:\n{}",
            confd.output()
        );
        let haproxy = Process::spawn(
            Path::new("haproxy"),
            &[
                "-W",
                "-f",
                &format!("{d}/haproxy.cfg"),
                "-p",
                &format!("{d}/haproxy.pid"),
            ],
            &[],
        );
        let pid_file = dir.path().join("haproxy.pid");
        let started = poll(WAIT, Duration::from_millis(50), || async {
            let pid: i32 = std::fs::read_to_string(&pid_file)
                .ok()?
                .trim()
                .parse()
                .ok()?;
            // SAFETY: signal 0 only checks that the process exists.
            (unsafe { libc::kill(pid, 0) } == 0).then_some(())
        })
        .await;
        assert!(
            started.is_some(),
            "HAProxy did not start; its output:\n{}",
            haproxy.output()
        );
        let cli = Cli::new(Path::new(&sock));
        let s = Stack {
            dir,
            port,
            cli,
            confd,
            _haproxy: haproxy,
        };
        // confd's first reload failed (no HAProxy yet) and is retried until it reaches it;
        // then confd waits for the worker that reload starts.
        s.wait_log("new HAProxy worker answers").await;
        s
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    fn cfg_path(&self) -> PathBuf {
        self.dir.path().join("haproxy.cfg")
    }

    /// The last value of a counter confd's log lines carry (`reloads=`, `live_updates=`).
    fn counter(&self, name: &str) -> u64 {
        let key = format!(" {name}=");
        self.confd
            .output()
            .lines()
            .rev()
            .find_map(|l| {
                let v = l.split(&key).nth(1)?;
                v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
            })
            .unwrap_or(0)
    }

    async fn wait_log(&self, needle: &str) {
        self.confd.wait_output(needle, WAIT).await;
    }

    /// The HAProxy worker answering on the admin socket (a reload replaces it).
    async fn worker(&self) -> u32 {
        self.cli.info().await.unwrap().pid
    }

    /// Server names of `backend` in the running process and in the file.
    async fn servers(&self, backend: &str) -> (BTreeSet<String>, BTreeSet<String>) {
        let running = self.cli.servers(backend).await.unwrap();
        let file = std::fs::read_to_string(self.cfg_path()).unwrap();
        let parsed = diff::parse(&file);
        (
            running.into_iter().map(|r| r.name).collect(),
            parsed.backends[backend]
                .servers
                .iter()
                .map(|s| s.name.clone())
                .collect(),
        )
    }

    /// Waits until the running process has exactly the file's servers in `backend` (draining
    /// ones deleted).
    async fn wait_running_equals_file(&self, backend: &str) {
        let last = Mutex::new(None);
        let same = poll(WAIT, Duration::from_millis(100), || async {
            let (running, file) = self.servers(backend).await;
            let ok = running == file;
            *last.lock().unwrap() = Some((running, file));
            ok.then_some(())
        })
        .await;
        assert!(
            same.is_some(),
            "{backend}: running servers != the file's: {:?}; confd output:\n{}",
            last.lock().unwrap(),
            self.confd.output()
        );
    }

    /// `confd --dry-run` with the same config prints nothing: the file equals a fresh render.
    async fn assert_file_is_a_fresh_render(&self) {
        let out = tokio::process::Command::new(bin("confd"))
            .args([
                "--config",
                &self.dir.path().join("confd.yaml").display().to_string(),
            ])
            .arg("--dry-run")
            .output();
        let out = tokio::time::timeout(WAIT, out).await.unwrap().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "",
            "the file differs from a fresh render"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------------------

/// Waits until `n` more requests of `load` succeeded; on timeout says what the load and confd
/// saw.
async fn wait_flowing(load: &Load, n: u64, stack: &Stack) {
    let ok = || load.answers().values().sum::<u64>();
    let start = ok();
    let done = poll(WAIT, Duration::from_millis(50), || async {
        (ok() >= start + n).then_some(())
    })
    .await;
    assert!(
        done.is_some(),
        "load stalled: {} of {n} more answers, {} failed; confd output:\n{}",
        ok() - start,
        load.failed(),
        stack.confd.output()
    );
}

fn store(uri: &str) -> Store {
    Store::new(&RegistryUri::parse(uri).unwrap())
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// Scale 1 → 3 → 1, five times, under load: every change is applied at runtime, HAProxy is never
/// reloaded, no request fails, traffic reaches exactly the registered set, removed servers
/// are deleted from the running process, and the file equals a fresh render.
#[tokio::test]
async fn scale_under_load_without_a_reload() {
    const ROUNDS: u64 = 5;
    let consul = Consul::start().await;
    let st = store(&consul.uri());
    let b: Vec<Backend> = backends(["b0", "b1", "b2"]).await;
    st.register(&b[0].service("web")).await.unwrap();
    let stack = Stack::start(&consul.uri(), false, "10s", "b0").await;
    wait_routes("b0 alone", stack.port, None, &["b0"], WAIT).await;
    let (reloads, worker) = (stack.counter("reloads"), stack.worker().await);

    let load = Load::start(LoadSpec::get(&stack.url(), 8));
    for round in 0..ROUNDS {
        st.register(&b[1].service("web")).await.unwrap();
        st.register(&b[2].service("web")).await.unwrap();
        wait_routes(
            &format!("round {round}: scaled to 3"),
            stack.port,
            None,
            &["b0", "b1", "b2"],
            WAIT,
        )
        .await;
        wait_flowing(&load, 300, &stack).await;
        st.deregister(&b[1].service("web")).await.unwrap();
        st.deregister(&b[2].service("web")).await.unwrap();
        wait_routes(
            &format!("round {round}: back to 1"),
            stack.port,
            None,
            &["b0"],
            WAIT,
        )
        .await;
        stack.wait_running_equals_file("svc_web").await;
        wait_flowing(&load, 300, &stack).await;
    }
    let report = load.stop().await;

    eprintln!(
        "scale 1->3->1 x{ROUNDS} under 8 clients: {}; {} reloads, {} live updates, per backend {:?}",
        report.summary(),
        stack.counter("reloads") - reloads,
        stack.counter("live_updates"),
        report.by_body
    );
    assert_eq!(report.failed, 0, "{}", report.summary());
    assert!(report.requests > 100, "the load ran: {}", report.summary());
    let names: BTreeSet<&str> = report.by_body.keys().map(String::as_str).collect();
    assert_eq!(names, BTreeSet::from(["b0", "b1", "b2"]));
    assert_eq!(
        stack.counter("reloads"),
        reloads,
        "{}",
        stack.confd.output()
    );
    assert_eq!(
        stack.worker().await,
        worker,
        "HAProxy's worker was replaced: a reload"
    );
    assert!(
        stack.counter("live_updates") >= 2 * ROUNDS,
        "{}",
        stack.confd.output()
    );
    assert!(stack.confd.output().contains("applied live, no reload: +"));
    stack.assert_file_is_a_fresh_render().await;
    assert!(
        !stack.confd.output().contains("ERROR"),
        "{}",
        stack.confd.output()
    );
}

async fn backends<const N: usize>(names: [&str; N]) -> Vec<Backend> {
    let mut out = Vec::new();
    for n in names {
        out.push(Backend::start(n).await);
    }
    out
}

/// A slow streaming response from one instance survives other instances coming and going; a
/// removed instance finishes its in-flight requests before it is deleted; an instance
/// re-registered while it drains is taken back into rotation. No reload throughout (etcd).
#[tokio::test]
async fn open_connections_survive_and_drained_requests_finish() {
    let etcd = Etcd::start().await;
    let uri = etcd.uri("services");
    let st = store(&uri);
    let b = backends(["s0", "s1", "s2"]).await;
    st.register(&b[0].service("web")).await.unwrap();
    let stack = Stack::start(&uri, false, "20s", "s0").await;
    wait_routes("s0 alone", stack.port, None, &["s0"], WAIT).await;
    let (reloads, worker) = (stack.counter("reloads"), stack.worker().await);

    // A 10 s stream from s0, the only instance.
    let url = format!("http://127.0.0.1:{}/stream?chunks=40&every=250", stack.port);
    let stream = tokio::spawn(async move {
        let mut r = reqwest::get(url).await.map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        while let Some(c) = r.chunk().await.map_err(|e| e.to_string())? {
            body.extend_from_slice(&c);
        }
        Ok::<_, String>(String::from_utf8_lossy(&body).lines().count())
    });
    wait_for("the stream to reach s0", WAIT, || async {
        (b[0].in_flight() == 1).then_some(())
    })
    .await;
    st.register(&b[1].service("web")).await.unwrap();
    wait_routes("s1 added", stack.port, None, &["s0", "s1"], WAIT).await;
    st.register(&b[2].service("web")).await.unwrap();
    wait_routes("s2 added", stack.port, None, &["s0", "s1", "s2"], WAIT).await;
    st.deregister(&b[2].service("web")).await.unwrap();
    wait_routes("s2 removed", stack.port, None, &["s0", "s1"], WAIT).await;
    assert_eq!(b[0].in_flight(), 1, "the stream is still open on s0");
    let lines = tokio::time::timeout(WAIT, stream).await.unwrap().unwrap();
    assert_eq!(lines, Ok(40), "the stream ran to its end");

    // In-flight requests on s1 when it is removed: they finish, then s1 is deleted.
    let slow = |n: usize| {
        let url = format!("http://127.0.0.1:{}/slow?ms=3000", stack.port);
        (0..n)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move {
                    let r = reqwest::get(url).await.map_err(|e| e.to_string())?;
                    let status = r.status();
                    let body = r.text().await.map_err(|e| e.to_string())?;
                    Ok::<_, String>((status.as_u16(), body))
                })
            })
            .collect::<Vec<_>>()
    };
    let reqs = slow(4);
    wait_for("a slow request on s1", WAIT, || async {
        (b[1].in_flight() > 0).then_some(())
    })
    .await;
    let updates = stack.counter("live_updates");
    st.deregister(&b[1].service("web")).await.unwrap();
    wait_for("s1 removal applied", WAIT, || async {
        (stack.counter("live_updates") > updates).then_some(())
    })
    .await;
    let (running, _) = stack.servers("svc_web").await;
    assert!(
        running.contains("s1") && b[1].in_flight() > 0,
        "s1 is draining while its request runs: {running:?}"
    );
    wait_routes(
        "s1 draining takes no new requests",
        stack.port,
        None,
        &["s0"],
        WAIT,
    )
    .await;
    let mut on_s1 = 0;
    for r in reqs {
        let (status, body) = tokio::time::timeout(WAIT, r)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(status, 200);
        on_s1 += usize::from(body == "s1");
    }
    assert!(on_s1 > 0, "a request that s1 served completed");
    stack.wait_running_equals_file("svc_web").await;
    stack
        .wait_log("server removed at runtime after draining")
        .await;

    // s2 comes back while it drains: the delete is cancelled, it serves again.
    st.register(&b[2].service("web")).await.unwrap();
    wait_routes("s2 back", stack.port, None, &["s0", "s2"], WAIT).await;
    let reqs = slow(4);
    wait_for("a slow request on s2", WAIT, || async {
        (b[2].in_flight() > 0).then_some(())
    })
    .await;
    st.deregister(&b[2].service("web")).await.unwrap();
    wait_routes("s2 draining", stack.port, None, &["s0"], WAIT).await;
    st.register(&b[2].service("web")).await.unwrap();
    wait_routes(
        "s2 back while it drained",
        stack.port,
        None,
        &["s0", "s2"],
        WAIT,
    )
    .await;
    stack.wait_log("drain cancelled").await;
    for r in reqs {
        let (status, _) = tokio::time::timeout(WAIT, r)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(status, 200);
    }
    stack.wait_running_equals_file("svc_web").await;

    eprintln!(
        "open connections: a 10 s stream kept all 40 lines across +s1 +s2 -s2; 4 slow requests finished ({on_s1} on the drained s1); s2 taken back while draining; {} live updates, 0 reloads",
        stack.counter("live_updates")
    );
    assert_eq!(
        stack.counter("reloads"),
        reloads,
        "{}",
        stack.confd.output()
    );
    assert_eq!(
        stack.worker().await,
        worker,
        "HAProxy's worker was replaced: a reload"
    );
    stack.assert_file_is_a_fresh_render().await;
    assert!(
        !stack.confd.output().contains("ERROR"),
        "{}",
        stack.confd.output()
    );
}

/// A new service is structure (a backend and a Host rule): it reloads, without failing a
/// request under load, and the next membership change is applied at runtime to the NEW
/// worker (not to the old one, which still answers on the socket just after a reload).
#[tokio::test]
async fn structural_change_reloads_then_runtime_updates_resume() {
    let consul = Consul::start().await;
    let st = store(&consul.uri());
    let b = backends(["w0", "a0", "a1"]).await;
    st.register(&b[0].service("web")).await.unwrap();
    let stack = Stack::start(&consul.uri(), true, "10s", "w0").await;
    wait_routes("w0", stack.port, None, &["w0"], WAIT).await;
    let (reloads, worker) = (stack.counter("reloads"), stack.worker().await);

    let load = Load::start(LoadSpec::get(&stack.url(), 8));
    let api = |i: usize| {
        let mut s = b[i].service("api");
        s.meta.insert("vhost".into(), "api.local".into());
        s
    };
    let updates = stack.counter("live_updates");
    st.register(&api(1)).await.unwrap();
    // The next change right behind the reload, while the old worker may still answer on the
    // socket: it must reach the new worker.
    poll(WAIT, Duration::from_millis(5), || async {
        (stack.counter("reloads") > reloads).then_some(())
    })
    .await
    .expect("confd reloads for the new service");
    st.register(&api(2)).await.unwrap();
    wait_routes(
        "api.local scaled",
        stack.port,
        Some("api.local"),
        &["a0", "a1"],
        WAIT,
    )
    .await;
    assert_eq!(
        stack.counter("reloads"),
        reloads + 1,
        "{}",
        stack.confd.output()
    );
    assert_eq!(
        stack.counter("live_updates"),
        updates + 1,
        "{}",
        stack.confd.output()
    );
    assert_ne!(
        stack.worker().await,
        worker,
        "a new worker after the reload"
    );
    // Keep the load on while the old worker finishes and leaves.
    wait_flowing(&load, 2000, &stack).await;
    let report = load.stop().await;
    eprintln!(
        "structural change under 8 clients: {}; 1 reload",
        report.summary()
    );
    assert_eq!(report.failed, 0, "{}", report.summary());
    stack.wait_running_equals_file("vhost_api.local").await;
    stack.assert_file_is_a_fresh_render().await;
}

/// `drain_timeout` bounds a removal: a request longer than it does not keep a removed
/// server alive; the server is cut off and deleted once the timeout has passed.
#[tokio::test]
async fn drain_timeout_bounds_a_removal() {
    let etcd = Etcd::start().await;
    let uri = etcd.uri("services");
    let st = store(&uri);
    let b = backends(["t0", "t1"]).await;
    st.register(&b[0].service("web")).await.unwrap();
    st.register(&b[1].service("web")).await.unwrap();
    let stack = Stack::start(&uri, false, "1s", "t1").await;
    wait_routes("t0 and t1", stack.port, None, &["t0", "t1"], WAIT).await;

    let url = format!("http://127.0.0.1:{}/slow?ms=15000", stack.port);
    let reqs: Vec<_> = (0..4)
        .map(|_| tokio::spawn(reqwest::get(url.clone())))
        .collect();
    wait_for("a slow request on t1", WAIT, || async {
        (b[1].in_flight() > 0).then_some(())
    })
    .await;
    let removed = Instant::now();
    st.deregister(&b[1].service("web")).await.unwrap();
    wait_for("t1 gone from the file", WAIT, || async {
        (!std::fs::read_to_string(stack.cfg_path())
            .unwrap()
            .contains("server t1 "))
        .then_some(())
    })
    .await;
    let (running, _) = stack.servers("svc_web").await;
    assert!(
        running.contains("t1"),
        "t1 drains first: {running:?}\n{}",
        stack.confd.output()
    );
    stack.wait_running_equals_file("svc_web").await;
    let took = removed.elapsed();
    eprintln!("drain_timeout 1s, a 15 s request in flight: t1 deleted after {took:?}");
    assert!(
        took >= Duration::from_secs(1),
        "waited for the timeout: {took:?}"
    );
    assert!(
        took < Duration::from_secs(10),
        "did not wait for the request: {took:?}"
    );
    stack.wait_log("timed_out=true").await;
    for r in reqs {
        r.abort();
    }
}
