//! confd and the proxies it drives, with both sides of a proxy: [`spawn_confd`],
//! [`HaproxyConfd`] (confd rendering the shipped HAProxy template and a real HAProxy serving
//! it), the reload command confd is given ([`signal_reload`], [`wait_pid_file`]), nginx's
//! peers socket ([`post_unix`]), upstream
//! [`Backend`]s, and what clients see through a proxy ([`answers`], [`wait_routes`]).

use crate::poll::{free_port, poll, wait_for};
use crate::process::{bin, workspace_root, Process};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The `confd` binary with `args`, logging at debug level for its own crate (what a failing
/// test's message shows).
pub fn spawn_confd(args: &[&str]) -> Process {
    Process::spawn(&bin("confd"), args, &[("RUST_LOG", "info,confd=debug")])
}

/// confd rendering the shipped HAProxy template (`templates/haproxy.cfg.hbs`) from a store into
/// a temp dir, and a real HAProxy (master-worker, reloaded by confd with SIGUSR2) serving the
/// result on a free port. Both stop on drop.
pub struct HaproxyConfd {
    /// Holds `confd.yaml`, `haproxy.cfg` and `haproxy.pid`.
    pub dir: tempfile::TempDir,
    /// HAProxy's listen port.
    pub port: u16,
    /// The confd process (its output explains a failed wait).
    pub confd: Process,
    _haproxy: Process,
}

impl HaproxyConfd {
    /// Starts confd on `backend_uri`. `settings` are extra top-level YAML lines (e.g. the
    /// quiescence `wait`), `vars` extra template vars (`listen`, `bind_address` and `pid` are
    /// set here). HAProxy starts once the rendered file satisfies `ready`; this returns when
    /// it accepts connections.
    pub async fn start(
        backend_uri: &str,
        bind: &str,
        settings: &str,
        vars: &[(&str, String)],
        ready: impl Fn(&str) -> bool,
    ) -> HaproxyConfd {
        HaproxyConfd::start_live(backend_uri, bind, settings, vars, false, ready).await
    }

    /// [`HaproxyConfd::start`], and with `live` an admin socket (`dir/admin.sock`, the
    /// template's `stats_socket`) that confd's `haproxy` live channel drives, so membership
    /// changes reach HAProxy through its runtime API with no reload.
    pub async fn start_live(
        backend_uri: &str,
        bind: &str,
        settings: &str,
        vars: &[(&str, String)],
        live: bool,
        ready: impl Fn(&str) -> bool,
    ) -> HaproxyConfd {
        HaproxyConfd::start_on(free_port(), backend_uri, bind, settings, vars, live, ready).await
    }

    /// [`HaproxyConfd::start_live`] with HAProxy's HTTP listener on `port` (chosen before,
    /// e.g. for an ACME server to validate on).
    pub async fn start_on(
        port: u16,
        backend_uri: &str,
        bind: &str,
        settings: &str,
        vars: &[(&str, String)],
        live: bool,
        ready: impl Fn(&str) -> bool,
    ) -> HaproxyConfd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let mut var_lines =
            format!("  listen: {port}\n  bind_address: {bind}\n  pid: {d}/haproxy.pid\n");
        for (k, v) in vars {
            var_lines.push_str(&format!("  {k}: {v}\n"));
        }
        let live_line = if live {
            var_lines.push_str(&format!("  stats_socket: {d}/admin.sock\n"));
            format!("    live: {{ haproxy: {{ socket: {d}/admin.sock, drain_timeout: 5s }} }}\n")
        } else {
            String::new()
        };
        let cfg = format!(
            r#"backend: {backend_uri}
{settings}
vars:
{var_lines}templates:
  - src: {tpl}
    dest: {d}/haproxy.cfg
    check: ["haproxy", "-c", "-q", "-f"]
    reload: {reload:?}
{live_line}"#,
            tpl = workspace_root().join("templates/haproxy.cfg.hbs").display(),
            reload = signal_reload(&dir.path().join("haproxy.pid"), "USR2"),
        );
        let cfg_path = dir.path().join("confd.yaml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let confd = Process::spawn(
            &bin("confd"),
            &["--config", cfg_path.to_str().unwrap()],
            &[("RUST_LOG", "info")],
        );
        let rendered = dir.path().join("haproxy.cfg");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&rendered).is_ok_and(|t| ready(&t)) {
            assert!(
                Instant::now() < deadline,
                "haproxy.cfg not ready; confd output:\n{}",
                confd.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let haproxy = Process::spawn(
            Path::new("haproxy"),
            &[
                "-W",
                "-f",
                rendered.to_str().unwrap(),
                "-p",
                &format!("{d}/haproxy.pid"),
            ],
            &[],
        );
        wait_pid_file(&dir.path().join("haproxy.pid"), Duration::from_secs(30)).await;
        let addr = format!("{bind}:{port}");
        wait_for("HAProxy listening", Duration::from_secs(30), || async {
            std::net::TcpStream::connect(&addr).ok().map(|_| ())
        })
        .await;
        HaproxyConfd {
            dir,
            port,
            confd,
            _haproxy: haproxy,
        }
    }

    /// Path of the rendered `haproxy.cfg`.
    pub fn cfg_path(&self) -> PathBuf {
        self.dir.path().join("haproxy.cfg")
    }

    /// The rendered `haproxy.cfg` (empty before the first render).
    pub fn cfg(&self) -> String {
        std::fs::read_to_string(self.cfg_path()).unwrap_or_default()
    }
}

/// The reference image's start, up to nginx: renders with `confd --config once_cfg --once`
/// until `<dir>/nginx.conf` holds `ready`, then starts nginx on it in the foreground (its
/// start log in `<dir>/nginx-start.log`, its pid file `<dir>/nginx.pid`) and waits until it
/// answers on 127.0.0.1:`port`. The confd daemon started next then owes no reload.
pub async fn nginx_on_first_render(once_cfg: &Path, dir: &Path, port: u16, ready: &str) -> Process {
    const WAIT: Duration = Duration::from_secs(30);
    let conf = dir.join("nginx.conf");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    wait_for(&format!("nginx.conf holding {ready:?}"), WAIT, || async {
        let mut once = Process::spawn(
            &bin("confd"),
            &["--config", once_cfg.to_str().unwrap(), "--once"],
            &[],
        );
        once.wait_exit(WAIT).await;
        read(&conf).contains(ready).then_some(())
    })
    .await;
    let nginx = Process::spawn(
        Path::new("nginx"),
        &[
            "-e",
            &format!("{}/nginx-start.log", dir.display()),
            "-c",
            conf.to_str().unwrap(),
            "-g",
            "daemon off;",
        ],
        &[],
    );
    wait_pid_file(&dir.join("nginx.pid"), WAIT).await;
    let addr = format!("127.0.0.1:{port}");
    let up = poll(WAIT, Duration::from_millis(100), || async {
        std::net::TcpStream::connect(&addr).ok().map(|_| ())
    })
    .await;
    assert!(
        up.is_some(),
        "nginx not listening on {addr}; its log:\n{}",
        read(&dir.join("nginx-start.log"))
    );
    nginx
}

/// confd rendering the shipped nginx template (`templates/nginx.conf.hbs`) with `lua_peers:
/// true` into a temp dir, and a real nginx (Debian's Lua module) serving it on a free
/// 127.0.0.1 port: membership changes go through confd's `nginx_lua` live channel, structural
/// ones reload nginx (SIGHUP). Started as the reference image's entrypoint does: one
/// `confd --once` render, nginx on it, then the confd daemon. Both stop on drop (fields drop
/// in order: nginx and confd before their directory).
pub struct NginxConfd {
    _nginx: Process,
    /// The confd daemon (its output explains a failed wait, and counts reloads).
    pub confd: Process,
    /// nginx's listen port on 127.0.0.1.
    pub port: u16,
    /// Holds `confd.yaml`, `nginx.conf`, nginx's pid file, logs and the peers socket.
    pub dir: tempfile::TempDir,
}

impl NginxConfd {
    /// Starts it on `backend_uri` with extra template `vars`; nginx starts once the rendered
    /// file contains `ready`, and this returns when confd's live channel is up.
    pub async fn start(backend_uri: &str, vars: &[(&str, String)], ready: &str) -> NginxConfd {
        let dir = tempfile::tempdir().unwrap();
        NginxConfd::start_in(dir, backend_uri, "", vars, ready).await
    }

    /// [`NginxConfd::start`] in `dir` (which may already hold what `settings` names), with
    /// `settings` as extra top-level YAML lines (e.g. `https: { ... }`).
    pub async fn start_in(
        dir: tempfile::TempDir,
        backend_uri: &str,
        settings: &str,
        vars: &[(&str, String)],
        ready: &str,
    ) -> NginxConfd {
        NginxConfd::start_on(free_port(), dir, backend_uri, settings, vars, ready).await
    }

    /// [`NginxConfd::start_in`] with nginx's HTTP listener on `port` (chosen before, e.g. for
    /// an ACME server to validate on).
    pub async fn start_on(
        port: u16,
        dir: tempfile::TempDir,
        backend_uri: &str,
        settings: &str,
        vars: &[(&str, String)],
        ready: &str,
    ) -> NginxConfd {
        const WAIT: Duration = Duration::from_secs(30);
        let d = dir.path().display().to_string();
        let mut var_lines = String::new();
        for (k, v) in vars {
            var_lines.push_str(&format!("  {k}: {v}\n"));
        }
        // With a `bind_address` among `vars`, the template puts it before the port.
        let listen = if vars.iter().any(|(k, _)| *k == "bind_address") {
            port.to_string()
        } else {
            format!("127.0.0.1:{port}")
        };
        let base = format!(
            r#"backend: {backend_uri}
wait: {{ min: 100ms, max: 1s }}
{settings}
vars:
  listen: {listen}
  pid: {d}/nginx.pid
  error_log: {d}/nginx-error.log
  access_log: {d}/nginx-access.log
  temp_dir: {d}
  lua_peers: true
  lua_peers_socket: {d}/peers.sock
{var_lines}templates:
  - src: {tpl}
    dest: {d}/nginx.conf
"#,
            tpl = workspace_root().join("templates/nginx.conf.hbs").display(),
        );
        let once_cfg = dir.path().join("confd-once.yaml");
        std::fs::write(&once_cfg, &base).unwrap();
        let nginx = nginx_on_first_render(&once_cfg, dir.path(), port, ready).await;
        let reload =
            serde_json::to_string(&signal_reload(&dir.path().join("nginx.pid"), "HUP")).unwrap();
        let cfg = dir.path().join("confd.yaml");
        std::fs::write(
            &cfg,
            format!(
                r#"{base}    check: "nginx -t -q -e {d}/nginx-check.log -c {{{{staged}}}}"
    reload: {reload}
    live: {{ nginx_lua: {{ socket: {d}/peers.sock }} }}
"#
            ),
        )
        .unwrap();
        let confd = Process::spawn(
            &bin("confd"),
            &["--config", cfg.to_str().unwrap()],
            &[("RUST_LOG", "info")],
        );
        confd.wait_output("snapshot updated", WAIT).await;
        let sock = dir.path().join("peers.sock");
        wait_for("the peers socket", WAIT, || async {
            sock.exists().then_some(())
        })
        .await;
        NginxConfd {
            _nginx: nginx,
            confd,
            port,
            dir,
        }
    }

    /// nginx's peers socket (`vars.lua_peers_socket`), for [`post_unix`].
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("peers.sock")
    }
}

/// An HTTP/1.0 POST over a unix socket (nginx's peers socket: `/switchboard/peers`,
/// `/switchboard/closing`): (status, first body line).
pub async fn post_unix(sock: &Path, path: &str, body: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(sock)
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", sock.display()));
    let mut req = format!(
        "POST {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.lines().next().unwrap_or("").to_string())
}

/// A proxy reload command for confd: sends `signal` to the master whose PID is in `pid_file`.
///
/// It FAILS while the file is missing: the proxy is not up yet. A starting proxy may have read
/// the previous config, so skipping the reload (`exit 0`) could leave it on that config for
/// good; a failed reload makes confd keep the new file and retry the reload until the proxy
/// answers. A file that exists but is empty is being written (nginx creates it before it
/// writes the number; HAProxy's master truncates and rewrites it at every reload): that is
/// waited out, for 5 s at most, rather than failing a reload that races a reload.
///
/// It returns once the master has a child it did not have before (the new worker), 10 s at
/// most: HAProxy's master loses a reload signal that arrives while it is still re-executing
/// for the previous one, so a reload must not return before it has taken effect. A reload
/// the proxy refuses (no new worker) fails after those 10 s.
pub fn signal_reload(pid_file: &Path, signal: &str) -> String {
    let f = pid_file.display().to_string().replace('\'', r"'\''");
    format!(
        r#"pid=; for _ in $(seq 50); do pid=$(cat '{f}') || break; [ -n "$pid" ] && break; sleep 0.1; done; [ -n "$pid" ] || exit 1
kids() {{ for d in /proc/[0-9]*; do read -r _ _ _ pp _ < "$d/stat" 2>/dev/null || continue; [ "$pp" = "$pid" ] && printf '%s ' "${{d#/proc/}}"; done; }}
before=" $(kids) "
kill -{signal} "$pid" || exit 1
for _ in $(seq 100); do for k in $(kids); do case "$before" in *" $k "*) ;; *) sleep 0.1; exit 0 ;; esac; done; sleep 0.1; done
echo "no new worker 10 s after SIG{signal}" >&2; exit 1"#
    )
}

/// Waits until `pid_file` holds the PID of a live process (a proxy's master has started and
/// written it completely) and returns it.
pub async fn wait_pid_file(pid_file: &Path, timeout: Duration) -> u32 {
    wait_for(
        &format!("a live PID in {}", pid_file.display()),
        timeout,
        || async {
            let text = std::fs::read_to_string(pid_file).ok()?;
            let pid: u32 = text.trim().parse().ok()?;
            // SAFETY: signal 0 only checks that the process exists.
            (unsafe { libc::kill(pid as i32, 0) } == 0).then_some(pid)
        },
    )
    .await
}

/// An HTTP backend on a free loopback port answering every request with its name, one
/// request per connection (as nginx and HAProxy speak to upstreams by default). Stops on
/// drop.
pub struct Backend {
    /// Its name: the body of every answer, and its service ID.
    pub name: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    /// Starts it.
    pub async fn start(name: &str) -> Backend {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let body = name.to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let body = body.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                        body.len(),
                        body
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Backend {
            name: name.to_string(),
            port,
            task,
        }
    }

    /// This backend as an instance of service `svc`, tagged `backend`, ID = its name.
    pub fn service(&self, svc: &str) -> switchboard::Service {
        switchboard::Service {
            id: self.name.clone(),
            name: svc.into(),
            address: "127.0.0.1".into(),
            port: self.port,
            tags: vec!["backend".into()],
            meta: Default::default(),
            check: None,
            ttl: None,
            docker_health: None,
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client that opens a new connection per request (so a reloaded proxy's new workers
/// answer, as separate users' clients would see them) and gives up on one after 3 s.
pub fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap()
}

/// One GET of `http://127.0.0.1:<port>/` (with a `Host` header when given): the body,
/// trimmed, or what went wrong (`status 502`, `error …`), so a failure is an answer too.
pub async fn answer(http: &reqwest::Client, port: u16, host: Option<&str>) -> String {
    let mut req = http.get(format!("http://127.0.0.1:{port}/"));
    if let Some(h) = host {
        req = req.header("Host", h);
    }
    match req.send().await {
        Ok(r) if r.status().is_success() => match r.text().await {
            Ok(body) => body.trim().to_string(),
            Err(e) => format!("error reading the body: {e}"),
        },
        Ok(r) => format!("status {}", r.status().as_u16()),
        Err(e) => format!("error {e}"),
    }
}

/// The distinct [`answer`]s of `n` GETs through a proxy on `port`, each on a new connection.
pub async fn answers(
    port: u16,
    host: Option<&str>,
    n: usize,
) -> std::collections::BTreeSet<String> {
    let http = fresh_client();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..n {
        seen.insert(answer(&http, port, host).await);
    }
    seen
}

/// Polls (bounded by `timeout`) until requests through `port` reach exactly `want`, nothing
/// else and no failure, in a sample of 4 requests per instance + 2 (round robin reaches each
/// at least once). `Ok`: how long it took; `Err`: what the last sample saw, for the caller's
/// failure message.
pub async fn routes_converge<S: AsRef<str>>(
    port: u16,
    host: Option<&str>,
    want: &[S],
    timeout: Duration,
) -> Result<Duration, std::collections::BTreeSet<String>> {
    let want: std::collections::BTreeSet<String> =
        want.iter().map(|w| w.as_ref().to_string()).collect();
    let started = Instant::now();
    let last = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let done = poll(timeout, Duration::from_millis(100), || async {
        let seen = answers(port, host, want.len() * 4 + 2).await;
        let ok = seen == want;
        *last.lock().unwrap() = seen;
        ok.then_some(())
    })
    .await;
    match done {
        Some(()) => Ok(started.elapsed()),
        None => Err(last.into_inner().unwrap()),
    }
}

/// [`routes_converge`], panicking with `what`, the wanted and the last seen answers.
pub async fn wait_routes<S: AsRef<str> + std::fmt::Debug>(
    what: &str,
    port: u16,
    host: Option<&str>,
    want: &[S],
    timeout: Duration,
) -> Duration {
    match routes_converge(port, host, want, timeout).await {
        Ok(took) => took,
        Err(last) => panic!("{what}: wanted {want:?} within {timeout:?}, last saw {last:?}"),
    }
}
