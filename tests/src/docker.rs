//! The Docker engines the tests run containers on: the docker CLI, the test image and the
//! project's images, [`Container`]s removed on drop, a second engine on the same machine (a
//! second host, [`DockerEngine`]) and a front for the engine's socket whose connections can be
//! cut ([`DockerProxy`]).
//!
//! Containers carry the label [`TEST_LABEL`] and a `sbtest-` name prefix, so a run only ever
//! touches its own and [`remove_stale_containers`] finds those a crashed run left.

use crate::process::{run_cmd, workspace_root, Process};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The local test image (see `scripts/test-images.sh`): busybox with sh, httpd, nc, hostname.
pub const TEST_IMAGE: &str = "switchboard-test/busybox:latest";

/// Label every test container carries.
pub const TEST_LABEL: &str = "switchboard.test=1";

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
