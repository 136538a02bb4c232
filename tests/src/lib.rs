//! Helpers for Switchboard's integration tests and benchmarks.
//!
//! Everything here starts REAL services (a Consul dev agent, an etcd member, containers on the
//! local Docker engine, the project's own binaries) on free loopback ports, and stops them on
//! drop, so a failing test leaves nothing behind. Containers carry the label
//! `switchboard.test=1` and a `sbtest-` name prefix; [`remove_stale_containers`] removes any a
//! crashed run left.

pub mod cluster;
pub mod load;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The local test image (see `scripts/test-images.sh`): busybox with sh, httpd, nc, hostname.
pub const TEST_IMAGE: &str = "switchboard-test/busybox:latest";
/// Label every test container carries.
pub const TEST_LABEL: &str = "switchboard.test=1";

/// A TCP port that was free on 127.0.0.1 a moment ago, and that this process has not handed
/// out before: the kernel may give a port it just released to the next `bind(0)`, and tests
/// running side by side in one test binary would then start two servers on one port (a store
/// cluster takes twenty at once).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Polls `f` every `every` until it returns `Some`, or returns `None` once `timeout` has
/// passed. The benchmarks use it with a fine `every` so pacing does not dominate what they
/// measure; tests use [`wait_for`].
pub async fn poll<T, F, Fut>(timeout: Duration, every: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout` naming `what`.
/// This is how tests wait: a bounded poll with a deadline, never a bare sleep.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match poll(timeout, Duration::from_millis(100), f).await {
        Some(v) => v,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// The `confd` binary with `args`, logging at debug level for its own crate (what a failing
/// test's message shows).
pub fn spawn_confd(args: &[&str]) -> Process {
    Process::spawn(&bin("confd"), args, &[("RUST_LOG", "info,confd=debug")])
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

/// The workspace's target directory (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
    }
}

/// Path of one of the project's binaries (`registrator`, `confd`), built by `cargo build`
/// before the tests run (the test command does it). Prefers a debug build.
pub fn bin(name: &str) -> PathBuf {
    for profile in ["debug", "release"] {
        let p = target_dir().join(profile).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("binary {name} not built: run `cargo build --workspace` first");
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A program on `PATH`, or in one of `extra`; panics naming it when it is nowhere.
pub(crate) fn find_program(name: &str, extra: &[&str]) -> PathBuf {
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    for dir in extra {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} not found on PATH: run scripts/setup first");
}

/// A child process killed on drop, its stdout and stderr captured in a log file.
///
/// It runs in a process group of its own, and every kill (drop, [`Process::kill9`]) goes to
/// the whole group: a daemon's helpers (nginx's and HAProxy's workers, dockerd's containerd)
/// die with it instead of living on as orphans that still hold their ports.
pub struct Process {
    child: Option<Child>,
    name: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Process {
    /// Starts `program` with `args` and extra environment, logging to a temp file.
    pub fn spawn(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Process {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("output.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Process {
            child: Some(child),
            name: program.file_name().unwrap().to_string_lossy().into_owned(),
            log,
            _dir: dir,
        }
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Process ID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends a signal (e.g. `libc::SIGTERM`).
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// Waits for the process to exit, up to `timeout`; panics with its output otherwise.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not exit within {timeout:?}; output:\n{}",
                    self.name,
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9` of the process and everything in its process group, then reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) of the group this process leads (created at spawn); a group that
            // is already gone only yields ESRCH.
            unsafe {
                libc::kill(-(c.id() as i32), libc::SIGKILL);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until the output contains `needle`.
    pub async fn wait_output(&self, needle: &str, timeout: Duration) {
        let what = format!("{} to print {needle:?}", self.name);
        let deadline = Instant::now() + timeout;
        loop {
            if self.output().contains(needle) {
                return;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; output:\n{}", self.output());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
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

/// Test certificates made with `openssl`: a CA (`ca.pem`, `ca.key`), a server certificate for
/// 127.0.0.1 and `localhost` (`server.pem`, `server.key`; also usable as a client, as etcd's
/// own gateway needs) and a client certificate without a Common Name (`client.pem`,
/// `client.key`), all in a temp
/// directory that lives as long as any clone.
#[derive(Clone)]
pub struct Pki {
    dir: std::sync::Arc<tempfile::TempDir>,
}

impl Pki {
    /// Generates a CA named `cn` and the server and client certificates it signs.
    pub fn generate(cn: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("openssl runs (scripts/setup installs it)");
            assert!(
                out.status.success(),
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let subj = format!("/CN={cn}");
        let mut args = vec![
            "req", "-x509", "-days", "2", "-keyout", "ca.key", "-out", "ca.pem",
        ];
        args.extend(ec);
        args.extend(["-subj", &subj]);
        args.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
        args.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
        openssl(&args);
        for (name, san) in [
            ("server", "IP:127.0.0.1,DNS:localhost,DNS:server.dc1.consul"),
            ("client", "DNS:client"),
        ] {
            let ext = format!("{name}.ext");
            std::fs::write(
                d.join(&ext),
                format!(
                    "subjectAltName={san}\nbasicConstraints=CA:FALSE\n\
                     keyUsage=critical,digitalSignature,keyEncipherment\n\
                     extendedKeyUsage=serverAuth,clientAuth\n"
                ),
            )
            .unwrap();
            let (key, csr, pem) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            // No Common Name on the client certificate: with client-certificate auth and
            // auth enabled, etcd's JSON gateway refuses a certificate that has one (it
            // cannot carry the CN as the user), answering 400.
            let subj = if name == "client" {
                "/O=switchboard-test".to_string()
            } else {
                format!("/CN={name}")
            };
            let mut args = vec!["req", "-keyout", &key, "-out", &csr, "-subj", &subj];
            args.extend(ec);
            openssl(&args);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &pem,
                "-extfile",
                &ext,
            ]);
        }
        Pki {
            dir: std::sync::Arc::new(dir),
        }
    }

    /// The path of one of the files, as a string.
    pub fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }

    /// A client trusting only this CA and presenting the client certificate.
    pub fn client(&self) -> reqwest::Client {
        let ca = std::fs::read(self.path("ca.pem")).unwrap();
        let mut id = std::fs::read(self.path("client.pem")).unwrap();
        id.extend(std::fs::read(self.path("client.key")).unwrap());
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .identity(reqwest::Identity::from_pem(&id).unwrap())
            .build()
            .unwrap()
    }
}

/// When a Consul agent the tests start counts as ready.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ConsulReady {
    /// Its catalog lists its own `consul` service (so its registrations show at once).
    Catalog,
    /// It has a leader (`/v1/status/leader`, which needs no ACL token): with ACLs in
    /// default-deny mode an anonymous reader sees no catalog.
    Leader,
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

/// A Consul dev agent on free loopback ports. Dev mode keeps nothing on disk, so a restart
/// forgets every registration: exactly the outage registrator must recover from.
pub struct Consul {
    /// HTTP API port.
    pub port: u16,
    ports: [u16; 4],
    hcl: String,
    /// When the agent counts as ready.
    ready: ConsulReady,
    proc: Option<Process>,
}

impl Consul {
    /// Starts an agent (script checks enabled) and waits until it is ready.
    pub async fn start() -> Consul {
        Consul::start_with("enable_script_checks = true").await
    }

    /// Starts an agent with this agent configuration (HCL) and waits until it is ready.
    pub async fn start_with(hcl: &str) -> Consul {
        let mut c = Consul {
            port: free_port(),
            ports: [free_port(), free_port(), free_port(), free_port()],
            hcl: hcl.to_string(),
            ready: ConsulReady::Catalog,
            proc: None,
        };
        c.launch().await;
        c
    }

    /// Starts an agent whose configuration (HCL) may enable ACLs in default-deny mode or
    /// HTTPS, and waits only for a leader (the plain HTTP port stays open on loopback for
    /// that, and for the test's own setup requests).
    pub async fn start_secure(hcl: &str) -> Consul {
        let mut c = Consul {
            port: free_port(),
            ports: [free_port(), free_port(), free_port(), free_port()],
            hcl: hcl.to_string(),
            ready: ConsulReady::Leader,
            proc: None,
        };
        c.launch().await;
        c
    }

    async fn launch(&mut self) {
        let bin = find_program("consul", &["/usr/local/bin", "/opt/switchboard/bin"]);
        let [dns, serf_lan, serf_wan, server] = self.ports.map(|p| p.to_string());
        let http = self.port.to_string();
        let args = [
            "agent",
            "-dev",
            "-bind",
            "127.0.0.1",
            "-client",
            "127.0.0.1",
            "-http-port",
            &http,
            "-dns-port",
            &dns,
            "-serf-lan-port",
            &serf_lan,
            "-serf-wan-port",
            &serf_wan,
            "-server-port",
            &server,
            "-grpc-port",
            "-1",
            "-node",
            "sbtest",
            "-hcl",
            &self.hcl,
        ];
        self.proc = Some(Process::spawn(&bin, &args, &[]));
        // A leader alone is not enough: the agent registers its node and its own `consul`
        // service in the catalog a moment after the election (anti-entropy), and until then
        // the catalog answers without them and the agent's own registrations do not show in
        // catalog or health queries yet. Callers rely on all of it, so wait for that sync.
        let url = format!("{}/v1/catalog/services", self.http());
        let client = reqwest::Client::new();
        if self.ready == ConsulReady::Leader {
            let url = format!("{}/v1/status/leader", self.http());
            wait_for("consul leader", Duration::from_secs(30), || {
                let client = client.clone();
                let url = url.clone();
                async move {
                    let r = client.get(&url).send().await.ok()?;
                    let v: String = r.json().await.ok()?;
                    (!v.is_empty()).then_some(())
                }
            })
            .await;
            return;
        }
        wait_for(
            "consul leader and its own catalog entry",
            Duration::from_secs(30),
            || {
                let client = client.clone();
                let url = url.clone();
                async move {
                    let r = client.get(&url).send().await.ok()?;
                    if !r.status().is_success() {
                        return None;
                    }
                    let v: serde_json::Value = r.json().await.ok()?;
                    v.get("consul").map(|_| ())
                }
            },
        )
        .await;
    }

    /// `http://127.0.0.1:<port>`.
    pub fn http(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `consul://127.0.0.1:<port>`.
    pub fn uri(&self) -> String {
        format!("consul://127.0.0.1:{}", self.port)
    }

    /// Stops the agent (`kill -9`).
    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Starts it again on the same ports, empty (dev mode).
    pub async fn restart(&mut self) {
        self.stop();
        self.launch().await;
    }

    /// GET a JSON document from the API (panics on transport errors).
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        reqwest::get(format!("{}{path}", self.http()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// IDs of the services registered with the agent.
    pub async fn agent_service_ids(&self) -> Vec<String> {
        let v = self.get_json("/v1/agent/services").await;
        let mut ids: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        ids.sort();
        ids
    }
}

/// One etcd member on free loopback ports, with its own data directory (kept across
/// [`Etcd::restart`], so data survives like a real restart).
pub struct Etcd {
    /// Client port.
    pub port: u16,
    peer_port: u16,
    data: tempfile::TempDir,
    /// Client TLS with client-certificate authentication, from these certificates.
    tls: Option<Pki>,
    /// More `etcd` arguments.
    extra: Vec<String>,
    proc: Option<Process>,
}

impl Etcd {
    /// Starts a member and waits until it answers.
    pub async fn start() -> Etcd {
        let mut e = Etcd {
            port: free_port(),
            peer_port: free_port(),
            data: tempfile::tempdir().unwrap(),
            tls: None,
            extra: Vec::new(),
            proc: None,
        };
        e.launch().await;
        e
    }

    /// Starts a member serving clients over HTTPS with `pki`'s server certificate, requiring
    /// client certificates signed by its CA (`--client-cert-auth`), and waits until it answers.
    pub async fn start_tls(pki: &Pki) -> Etcd {
        Etcd::start_tls_with(pki, &[]).await
    }

    /// As [`Etcd::start_tls`], with more `etcd` arguments.
    pub async fn start_tls_with(pki: &Pki, extra: &[&str]) -> Etcd {
        let mut e = Etcd {
            port: free_port(),
            peer_port: free_port(),
            data: tempfile::tempdir().unwrap(),
            tls: Some(pki.clone()),
            extra: extra.iter().map(|a| a.to_string()).collect(),
            proc: None,
        };
        e.launch().await;
        e
    }

    /// A client of this member's gateway: with the client certificate when it serves TLS.
    pub fn http_client(&self) -> reqwest::Client {
        match &self.tls {
            None => reqwest::Client::new(),
            Some(pki) => pki.client(),
        }
    }

    async fn launch(&mut self) {
        let bin = find_program("etcd", &["/usr/bin", "/opt/switchboard/bin"]);
        let client = self.http();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let data = self.data.path().join("member");
        let cluster = format!("sbtest={peer}");
        let mut args = vec![
            "--name",
            "sbtest",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &cluster,
        ];
        let tls_args = self.tls.as_ref().map(|pki| {
            [
                "--cert-file".to_string(),
                pki.path("server.pem"),
                "--key-file".to_string(),
                pki.path("server.key"),
                "--trusted-ca-file".to_string(),
                pki.path("ca.pem"),
                "--client-cert-auth".to_string(),
            ]
        });
        if let Some(t) = &tls_args {
            args.extend(t.iter().map(String::as_str));
        }
        args.extend(self.extra.iter().map(String::as_str));
        self.proc = Some(Process::spawn(
            &bin,
            &args,
            &[("ETCD_UNSUPPORTED_ARCH", "")],
        ));
        let url = format!("{client}/v3/kv/range");
        let http = self.http_client();
        wait_for("etcd to answer", Duration::from_secs(30), || {
            let http = http.clone();
            let url = url.clone();
            async move {
                let r = http
                    .post(&url)
                    .body(r#"{"key":"AA=="}"#)
                    .send()
                    .await
                    .ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
    }

    /// `http://127.0.0.1:<port>` (`https://` when it serves TLS).
    pub fn http(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// `etcd://127.0.0.1:<port>/<prefix>`.
    pub fn uri(&self, prefix: &str) -> String {
        format!("etcd://127.0.0.1:{}/{prefix}", self.port)
    }

    /// Stops the member (`kill -9`).
    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Starts it again on the same ports and data.
    pub async fn restart(&mut self) {
        self.stop();
        self.launch().await;
    }

    /// Every key and (UTF-8) value under `prefix`, through the JSON gateway.
    pub async fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().unwrap() += 1;
        let body = serde_json::json!({"key": b64.encode(prefix), "range_end": b64.encode(end)});
        let v: serde_json::Value = reqwest::Client::new()
            .post(format!("{}/v3/kv/range", self.http()))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut out = Vec::new();
        for kv in v["kvs"].as_array().cloned().unwrap_or_default() {
            let k = b64.decode(kv["key"].as_str().unwrap()).unwrap();
            let val = b64
                .decode(kv["value"].as_str().unwrap_or_default())
                .unwrap();
            out.push((
                String::from_utf8(k).unwrap(),
                String::from_utf8(val).unwrap(),
            ));
        }
        out
    }
}

/// Runs the docker CLI; panics with its stderr on failure. Returns trimmed stdout.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI");
    if !out.status.success() {
        panic!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Makes sure the test image exists (builds it with `scripts/test-images.sh`).
pub fn ensure_test_image() {
    let ok = Command::new("docker")
        .args(["image", "inspect", TEST_IMAGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        let st = Command::new("bash")
            .arg(workspace_root().join("scripts/test-images.sh"))
            .status()
            .unwrap();
        assert!(st.success(), "scripts/test-images.sh failed");
    }
}

/// The tag of the images the test command builds (`scripts/images --debug`): a tag of their
/// own, so a test run never replaces the images a user runs (`latest`). Compose stacks in
/// tests run with `SWITCHBOARD_TAG` set to it.
pub const IMAGE_TAG: &str = "test";

/// `switchboard/<name>:`[`IMAGE_TAG`]: one of the project's images, as the tests run it.
pub fn image(name: &str) -> String {
    format!("switchboard/{name}:{IMAGE_TAG}")
}

/// Fails the test, naming what is missing, unless every image in `images` exists: a test
/// whose prerequisite is missing must fail, never pass without having run.
/// `scripts/images --debug` (run by the test command) builds the project's images.
pub fn require_images<S: AsRef<str>>(images: &[S]) {
    let missing: Vec<&str> = images
        .iter()
        .map(AsRef::as_ref)
        .filter(|image| {
            !Command::new("docker")
                .args(["image", "inspect", image])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "images {missing:?} are not built: run scripts/images (the test command does)"
    );
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique container name with the test prefix: `sbtest-<tag>-<pid>-<n>`.
pub fn unique_name(tag: &str) -> String {
    format!(
        "sbtest-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A container removed (`docker rm -f`) on drop.
pub struct Container {
    /// Full container ID.
    pub id: String,
    /// Name (without the leading `/`).
    pub name: String,
}

impl Container {
    /// `docker run -d --name <unique> --label switchboard.test=1 <args...>`. `args` holds the
    /// options, the image and the command, as for `docker run`.
    pub fn run(tag: &str, args: &[&str]) -> Container {
        ensure_test_image();
        let name = unique_name(tag);
        let mut full = vec!["run", "-d", "--name", &name, "--label", TEST_LABEL];
        full.extend_from_slice(args);
        let id = docker(&full);
        Container { id, name }
    }

    /// Published host port of `container_port` (e.g. `"80/tcp"`).
    pub fn host_port(&self, container_port: &str) -> u16 {
        let out = docker(&["port", &self.id, container_port]);
        let first = out.lines().next().unwrap_or_default();
        first.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// The container's IP on the default bridge.
    pub fn ip(&self) -> String {
        docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &self.id,
        ])
    }

    /// `docker stop -t <secs>`.
    pub fn stop(&self, secs: u32) {
        docker(&["stop", "-t", &secs.to_string(), &self.id]);
    }

    /// `docker start`.
    pub fn start(&self) {
        docker(&["start", &self.id]);
    }

    /// `docker restart -t 1`.
    pub fn restart(&self) {
        docker(&["restart", "-t", "1", &self.id]);
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", "-v", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Removes every container a previous (crashed) test run left behind.
pub fn remove_stale_containers() {
    let ids = docker(&["ps", "-aq", "--filter", "label=switchboard.test=1"]);
    for id in ids.lines().filter(|l| !l.is_empty()) {
        let _ = Command::new("docker").args(["rm", "-f", "-v", id]).status();
    }
}

/// This host's name, as registrator puts it in service IDs.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    assert_eq!(rc, 0);
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
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
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let port = free_port();
        let mut var_lines =
            format!("  listen: {port}\n  bind_address: {bind}\n  pid: {d}/haproxy.pid\n");
        for (k, v) in vars {
            var_lines.push_str(&format!("  {k}: {v}\n"));
        }
        let cfg = format!(
            r#"backend: {backend_uri}
{settings}
vars:
{var_lines}templates:
  - src: {tpl}
    dest: {d}/haproxy.cfg
    check: ["haproxy", "-c", "-q", "-f"]
    reload: {reload:?}
"#,
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

/// A `/metrics` answer, parsed: every sample's series (`name` or `name{labels}`, as written)
/// and its value. Parsing is strict (OpenMetrics text as Prometheus reads it: `# HELP`,
/// `# TYPE`, `# UNIT` comments, `series value` lines, `# EOF` last), so a malformed
/// exposition fails the test that scrapes it.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// Series -> value.
    pub samples: BTreeMap<String, f64>,
    /// The raw text, for failure messages.
    pub text: String,
}

impl Scrape {
    /// Parses an exposition; the error names the first bad line.
    pub fn parse(text: &str) -> Result<Scrape, String> {
        let body = text
            .strip_suffix("# EOF\n")
            .ok_or("the exposition does not end with `# EOF`")?;
        let mut samples = BTreeMap::new();
        for line in body.lines() {
            if let Some(c) = line.strip_prefix("# ") {
                let kind = c.split(' ').next().unwrap_or_default();
                if !matches!(kind, "HELP" | "TYPE" | "UNIT") {
                    return Err(format!("unexpected comment line {line:?}"));
                }
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .ok_or_else(|| format!("no value in line {line:?}"))?;
            let name = series.split('{').next().unwrap_or_default();
            let name_ok = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
            let labels_ok = series == name || (series.ends_with('}') && series.contains("=\""));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .map_err(|_| format!("bad value in line {line:?}"))?,
            };
            if !name_ok || !labels_ok {
                return Err(format!("bad series in line {line:?}"));
            }
            if samples.insert(series.to_string(), value).is_some() {
                return Err(format!("series repeated: {series}"));
            }
        }
        Ok(Scrape {
            samples,
            text: text.to_string(),
        })
    }

    /// The sum of every sample of metric `name` (all label sets); 0 when there is none.
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(s, _)| s.split('{').next() == Some(name))
            .map(|(_, v)| v)
            .sum()
    }

    /// Whether any sample of metric `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.samples
            .keys()
            .any(|s| s.split('{').next() == Some(name))
    }
}

/// GETs `http://<addr>/metrics` and parses it (panics when it does not answer or parse).
pub async fn scrape(addr: &str) -> Scrape {
    let r = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap_or_else(|e| panic!("GET {addr}/metrics: {e}"));
    assert_eq!(r.status(), 200, "GET {addr}/metrics");
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        ct.starts_with("application/openmetrics-text"),
        "content type {ct:?}"
    );
    let text = r.text().await.unwrap();
    Scrape::parse(&text).unwrap_or_else(|e| panic!("{addr}/metrics: {e}:\n{text}"))
}

/// GETs `http://<addr>/healthz`: the status and body, or `None` when nothing answers.
pub async fn healthz(addr: &str) -> Option<(u16, String)> {
    let r = reqwest::get(format!("http://{addr}/healthz")).await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.ok()?))
}

/// Waits until `/healthz` at `addr` answers `status`; returns the body. On timeout panics
/// with the last answer and `p`'s output.
pub async fn wait_health(p: &Process, addr: &str, status: u16, timeout: Duration) -> String {
    let last = std::sync::Mutex::new(None);
    let last_ref = &last;
    let got = poll(timeout, Duration::from_millis(100), || async move {
        let h = healthz(addr).await;
        *last_ref.lock().unwrap() = h.clone();
        h.filter(|(s, _)| *s == status).map(|(_, b)| b)
    })
    .await;
    match got {
        Some(b) => b,
        None => panic!(
            "timed out after {timeout:?} waiting for /healthz {status} at {addr}; last answer {:?}; output:\n{}",
            last.lock().unwrap(),
            p.output()
        ),
    }
}

/// A TCP front for the Docker socket whose connections can be cut (all dropped, new ones
/// refused) and restored: an engine outage as the registrator sees it, without touching the
/// engine other tests share.
pub struct DockerProxy {
    port: u16,
    state: std::sync::Arc<std::sync::Mutex<tokio_util::sync::CancellationToken>>,
    task: tokio::task::JoinHandle<()>,
}

impl DockerProxy {
    /// Starts the front, passing connections through.
    pub async fn start() -> DockerProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = std::sync::Arc::new(std::sync::Mutex::new(
            tokio_util::sync::CancellationToken::new(),
        ));
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    continue;
                };
                let token = st.lock().unwrap().clone();
                if token.is_cancelled() {
                    drop(tcp);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut unix) =
                        tokio::net::UnixStream::connect("/var/run/docker.sock").await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix) => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        DockerProxy { port, state, task }
    }

    /// `DOCKER_HOST` for a client going through it.
    pub fn docker_host(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.state.lock().unwrap().cancel();
    }

    /// Passes connections through again.
    pub fn restore(&self) {
        *self.state.lock().unwrap() = tokio_util::sync::CancellationToken::new();
    }
}

impl Drop for DockerProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP front for etcd that can hold its writes: while closed, every `POST /v3/kv/put` waits
/// at the front (a store whose disk stalls) and everything else passes at once. It counts the
/// writes outstanding, from their first bytes to the first bytes of their answer (HTTP/1: one
/// request at a time per connection) or until their client gives up on them: what shows
/// whether a client's writes overlap.
pub struct StoreFront {
    port: u16,
    outstanding: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    max: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    gate: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// What a front's connection is waiting for (see [`StoreFront`]).
const IDLE: u8 = 0;
const ANSWER: u8 = 1;
const WRITE_ANSWER: u8 = 2;

impl StoreFront {
    /// Starts an open front for `127.0.0.1:<upstream>`.
    pub async fn start(upstream: u16) -> StoreFront {
        use std::sync::atomic::{AtomicU8, AtomicUsize};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const WRITE: &[u8] = b"POST /v3/kv/put";
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let outstanding = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let (gate, gate_rx) = tokio::sync::watch::channel(true);
        let (out, mx) = (outstanding.clone(), max.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (mut c_read, mut c_write) = client.into_split();
                let (mut s_read, mut s_write) = server.into_split();
                let state = Arc::new(AtomicU8::new(IDLE));
                let (state2, out2, mx2) = (state.clone(), out.clone(), mx.clone());
                let mut gate_rx = gate_rx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut have = 0;
                    loop {
                        match c_read.read(&mut buf[have..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => have += n,
                        }
                        if state2.load(Ordering::SeqCst) == IDLE {
                            // A new request: read enough of it to see what it is.
                            if have < WRITE.len() && buf[..have] == WRITE[..have] {
                                continue;
                            }
                            if buf[..have].starts_with(WRITE) {
                                state2.store(WRITE_ANSWER, Ordering::SeqCst);
                                let now = out2.fetch_add(1, Ordering::SeqCst) + 1;
                                mx2.fetch_max(now, Ordering::SeqCst);
                                // Held until the gate opens, unless the client gives up on
                                // it first (its request timeout): then it is outstanding no
                                // more.
                                let abandoned = loop {
                                    tokio::select! {
                                        r = gate_rx.wait_for(|open| *open) => break r.is_err(),
                                        r = c_read.read(&mut buf[have..]) => match r {
                                            Ok(0) | Err(_) => break true,
                                            Ok(n) => have += n,
                                        },
                                    }
                                };
                                if abandoned {
                                    if state2.swap(IDLE, Ordering::SeqCst) == WRITE_ANSWER {
                                        out2.fetch_sub(1, Ordering::SeqCst);
                                    }
                                    break;
                                }
                            } else {
                                state2.store(ANSWER, Ordering::SeqCst);
                            }
                        }
                        if s_write.write_all(&buf[..have]).await.is_err() {
                            break;
                        }
                        have = 0;
                    }
                });
                let out3 = out.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = s_read.read(&mut buf).await {
                        if state.swap(IDLE, Ordering::SeqCst) == WRITE_ANSWER {
                            out3.fetch_sub(1, Ordering::SeqCst);
                        }
                        if c_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        StoreFront {
            port,
            outstanding,
            max,
            gate,
            task,
        }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Holds every write from now on.
    pub fn close(&self) {
        self.gate.send_replace(false);
    }

    /// Passes the held writes on, and every write after them.
    pub fn open(&self) {
        self.gate.send_replace(true);
    }

    /// Writes outstanding now (held or on their way).
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::SeqCst)
    }

    /// The most writes that were outstanding at one moment so far.
    pub fn max_outstanding(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }
}

impl Drop for StoreFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs a program to completion: its trimmed stdout, or one line with its stderr.
pub fn run_cmd(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A second Docker engine on this machine (a second "host"): its own socket, data and exec
/// roots, pid file and bridge (no iptables: the userland proxy publishes ports on loopback),
/// with [`TEST_IMAGE`] loaded. Drop removes its containers, stops it, unmounts and deletes its
/// directories and the bridge.
pub struct DockerEngine {
    dir: PathBuf,
    /// Its unix socket, as `docker -H` and `DOCKER_HOST` take it.
    pub sock: String,
    bridge: String,
    extra: Vec<String>,
    proc: Option<Process>,
    /// Set by [`DockerEngine::kill`]: cleanup must restart dockerd to stop the orphans.
    killed: bool,
}

impl DockerEngine {
    /// Starts an engine on a new bridge `bridge` (at most 15 characters, unused) with the
    /// gateway address and subnet `cidr` (e.g. `10.213.57.1/24`, unused elsewhere).
    pub fn start(bridge: &str, cidr: &str) -> DockerEngine {
        DockerEngine::start_with(bridge, cidr, &[])
    }

    /// [`DockerEngine::start`] with more dockerd arguments (e.g. a TLS listener:
    /// `--host tcp://127.0.0.1:P --tlsverify --tlscacert ...`).
    pub fn start_with(bridge: &str, cidr: &str, extra: &[&str]) -> DockerEngine {
        // A bridge a crashed run left would make `ip link add` fail.
        let _ = run_cmd("ip", &["link", "del", bridge]);
        run_cmd("ip", &["link", "add", bridge, "type", "bridge"]).unwrap();
        // From here on Drop cleans up, whatever fails next.
        let dir = PathBuf::from(format!(
            "/tmp/sbtest-engine-{bridge}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut e = DockerEngine {
            sock: format!("unix://{}/docker.sock", dir.display()),
            dir,
            bridge: bridge.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            proc: None,
            killed: false,
        };
        run_cmd("ip", &["addr", "add", cidr, "dev", bridge]).unwrap();
        run_cmd("ip", &["link", "set", bridge, "up"]).unwrap();
        // The machine's /etc/docker/daemon.json sets data-root; an empty file of our own
        // keeps it from clashing with --data-root.
        std::fs::write(e.dir.join("daemon.json"), "{}").unwrap();
        e.launch().unwrap();
        let mut save = Command::new("docker")
            .args(["save", TEST_IMAGE])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let load = Command::new("docker")
            .args(["-H", &e.sock, "load", "-q"])
            .stdin(save.stdout.take().unwrap())
            .output()
            .unwrap();
        assert!(save.wait().unwrap().success(), "docker save failed");
        assert!(
            load.status.success(),
            "docker load into the second engine: {}",
            String::from_utf8_lossy(&load.stderr)
        );
        e
    }

    /// Starts dockerd on this engine's directories and waits until it answers (a blocking
    /// bounded poll: nothing else runs while an engine starts).
    fn launch(&mut self) -> Result<(), String> {
        let d = self.dir.display().to_string();
        let mut args: Vec<String> = [
            "--config-file",
            &format!("{d}/daemon.json"),
            "--host",
            &self.sock,
            "--data-root",
            &format!("{d}/data"),
            "--exec-root",
            &format!("{d}/exec"),
            "--pidfile",
            &format!("{d}/docker.pid"),
            "--bridge",
            &self.bridge,
            "--iptables=false",
        ]
        .map(String::from)
        .to_vec();
        args.extend(self.extra.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.proc = Some(Process::spawn(Path::new("dockerd"), &args, &[]));
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.docker(&["info", "-f", "{{.ID}}"]).is_err() {
            if Instant::now() > deadline {
                return Err(format!(
                    "second dockerd did not answer; output:\n{}",
                    self.proc.as_ref().unwrap().output()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// `docker -H <this engine's socket> ARGS`.
    pub fn docker(&self, args: &[&str]) -> Result<String, String> {
        let mut full = vec!["-H", &self.sock];
        full.extend_from_slice(args);
        run_cmd("docker", &full)
    }

    /// `docker run -d` on this engine; returns the container ID and name. Names are unique
    /// across both engines, as the service IDs `<host>:<container>:<port>` need.
    pub fn run(&self, tag: &str, args: &[String]) -> (String, String) {
        let name = unique_name(tag);
        let mut full = vec!["run", "-d", "--name", &name, "--label", TEST_LABEL];
        full.extend(args.iter().map(String::as_str));
        let id = self.docker(&full).unwrap();
        (id, name)
    }

    /// The host is lost: `kill -9` dockerd. Its containerd and port proxies die with it
    /// (the containers' processes live on under their shims until cleanup).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
        self.killed = true;
    }
}

impl Drop for DockerEngine {
    fn drop(&mut self) {
        // After a kill, restarting dockerd on the same roots stops the orphaned containers.
        if self.killed {
            let _ = self.launch();
        }
        if let Ok(ids) = self.docker(&["ps", "-aq"]) {
            for id in ids.lines().filter(|l| !l.is_empty()) {
                let _ = self.docker(&["rm", "-f", "-v", id]);
            }
        }
        if let Some(p) = self.proc.as_mut() {
            p.signal(libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while self.dir.join("docker.pid").exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        self.proc = None;
        // dockerd leaves its data root bind-mounted on itself; unmount everything under our
        // directory, deepest first, before deleting it.
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| Path::new(m).starts_with(&self.dir))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = run_cmd("umount", &["-l", m]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = run_cmd("ip", &["link", "del", &self.bridge]);
    }
}
