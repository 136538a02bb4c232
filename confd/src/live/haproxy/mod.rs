//! HAProxy's runtime API as a live channel: servers of existing backends are added, drained and
//! removed, moved and re-weighted through the admin stats socket, with no reload.
//!
//! [`diff`] decides from the old and new rendered files alone (the template stays the one
//! source of truth); [`cli`] speaks the socket's protocol; this module applies a plan and owns
//! what outlives it: the servers still draining, and which worker process is the current one.
//!
//! Invariants a reader must not break:
//! - Before applying, the running process is checked against the OLD file (every server there,
//!   at the same address): runtime changes are only ever a delta on a state we know. Any
//!   surprise is an error, and the caller reloads, which re-reads the file and is always right.
//! - A removed server is drained (no new traffic, in-flight requests finish), then put in
//!   maintenance and deleted by a background task once its sessions end or `drain_timeout`
//!   passes, so a long drain never holds up other templates. The task and [`Haproxy::apply`]
//!   take the same lock per step, so a server re-added under the same name while it drains is
//!   taken back (its delete cancelled) rather than raced.
//! - After a reload the socket keeps answering from the OLD worker for a few hundred
//!   milliseconds (seamless reload passes the listening socket on; 125 to 300 ms measured with
//!   2.6): a command sent then would land in a process about to exit. [`Haproxy::after_reload`]
//!   waits until a new worker answers.

pub mod cli;
pub mod diff;

use crate::duration;
use crate::live::{LiveError, Summary};
use cli::{no_such_server, Cli, Running};
use diff::{add_commands, update_commands, Change, Diff, Server};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often a draining server's sessions are counted.
const DRAIN_POLL: Duration = Duration::from_millis(200);
/// `del server` right after maintenance can still find idle connections being purged; it is
/// retried this often, this many times.
const DELETE_RETRY: Duration = Duration::from_millis(100);
const DELETE_ATTEMPTS: u32 = 20;
/// Longest wait for a new worker to answer after a reload. A reload of a large config takes
/// well under this; past it we stop waiting and say so (the next apply still checks the
/// running state against the file first).
const RELOAD_SETTLE: Duration = Duration::from_secs(10);
/// How often the socket is asked for its worker while waiting after a reload.
const RELOAD_POLL: Duration = Duration::from_millis(50);
/// How long a worker that may predate the reload (it started less than a second or two
/// before it) is watched for a successor before it is taken as the new one. Reloads of
/// ordinary configs hand over well within this (125 to 300 ms measured).
const CANDIDATE_WATCH: Duration = Duration::from_secs(1);

fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}

/// The `haproxy` live channel (`live: { haproxy: { socket: PATH, drain_timeout: 30s } }`):
/// membership changes for one HAProxy through its admin socket.
///
/// A config value (compared by its settings) that also carries what outlives one apply: the
/// servers still draining and the current worker, shared by its clones. When the last clone
/// goes (confd stops, or SIGHUP replaced the config) the drains in progress stop; their
/// servers stay drained (no new traffic) until the next reload.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "HaproxyConfig")]
pub struct Haproxy {
    /// The admin stats socket, a unix socket the rendered config opens with
    /// `stats socket PATH ... level admin`.
    pub socket: PathBuf,
    /// How long a removed server may keep serving its open connections before they are cut
    /// and it is deleted anyway.
    pub drain_timeout: Duration,
    cli: Cli,
    shared: Arc<Shared>,
}

impl PartialEq for Haproxy {
    fn eq(&self, o: &Haproxy) -> bool {
        self.socket == o.socket && self.drain_timeout == o.drain_timeout
    }
}

impl Eq for Haproxy {}

/// `live: { haproxy: ... }` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HaproxyConfig {
    socket: PathBuf,
    #[serde(default = "default_drain_timeout", with = "duration::serde_text")]
    drain_timeout: Duration,
}

impl TryFrom<HaproxyConfig> for Haproxy {
    type Error = String;

    fn try_from(c: HaproxyConfig) -> Result<Haproxy, String> {
        // `ipv4@host:port` and friends are HAProxy's TCP listeners: an admin socket on TCP
        // would let anyone who reaches the port rewrite the proxy, so only a path is taken.
        let text = c.socket.to_string_lossy().into_owned();
        let tcp = text
            .split_once('@')
            .is_some_and(|(prefix, _)| !prefix.contains('/'));
        if text.is_empty() || tcp {
            return Err(format!(
                "haproxy socket {text:?}: expected the path of a unix socket"
            ));
        }
        Ok(Haproxy::new(c.socket, c.drain_timeout))
    }
}

/// Shared by the clones of one channel; dropping the last one stops its drains.
#[derive(Debug, Default)]
struct Shared {
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What outlives one apply.
#[derive(Debug, Default)]
struct State {
    /// The worker that answered last, once we are sure it is the current one.
    worker: Option<u32>,
    /// Servers being drained, by (backend, server).
    draining: HashMap<(String, String), Draining>,
    /// Tells one drain apart from a later drain of the same name.
    next_drain: u64,
}

#[derive(Debug)]
struct Draining {
    /// Its line in the file it was removed from.
    server: Server,
    id: u64,
    cancel: CancellationToken,
}

/// Server changes for one HAProxy, decided by [`Haproxy::plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan(Diff);

impl Haproxy {
    /// A channel to the admin socket at `socket`.
    pub fn new(socket: PathBuf, drain_timeout: Duration) -> Haproxy {
        Haproxy {
            cli: Cli::new(&socket),
            socket,
            drain_timeout,
            shared: Arc::default(),
        }
    }

    /// The server changes from `old` to `new`, if that is all that changed and all of it can
    /// be applied at runtime. Pure; the reason for `None` is logged at debug level.
    pub fn plan(&self, old: &str, new: &str) -> Option<Plan> {
        let socket = self.cli.socket().to_string_lossy();
        match diff::diff(old, new, &socket) {
            Ok(d) => Some(Plan(d)),
            Err(reason) => {
                tracing::debug!(socket = %socket, reason = %reason, "not a runtime update");
                None
            }
        }
    }

    /// Applies `plan`. Removals return once the servers are draining; they are deleted in the
    /// background.
    pub async fn apply(&self, plan: Plan) -> Result<Summary, LiveError> {
        let Plan(Diff {
            changes,
            before,
            pools,
            peers,
        }) = plan;
        let mut st = self.shared.state.lock().await;
        let info = self.cli.info().await?;
        if info.stopping {
            return Err(self.diverged("the process answering is stopping (a reload is under way)"));
        }
        if st.worker.is_some_and(|w| w != info.pid) {
            tracing::info!(socket = %self.cli.socket().display(), pid = info.pid, "HAProxy was reloaded or restarted by someone else");
        }
        st.worker = Some(info.pid);
        let mut running = BTreeMap::new();
        for (be, servers) in &before {
            let r = self.cli.servers(be).await?;
            self.check_running(be, servers, &r, &st)?;
            running.insert(be.clone(), r);
        }
        let mut summary = Summary {
            changed: before.keys().cloned().collect(),
            pools,
            peers,
            ..Summary::default()
        };
        // Changes in place first, then additions, then removals: capacity before it goes away.
        let rank = |c: &Change| match c {
            Change::Update { .. } => 0,
            Change::Add { .. } => 1,
            Change::Remove { .. } => 2,
        };
        let mut changes = changes;
        changes.sort_by_key(rank);
        for c in changes {
            match c {
                Change::Update { backend, old, new } => {
                    self.run_all(update_commands(&backend, &old, &new, false))
                        .await?;
                    summary.updated += 1;
                }
                Change::Add { backend, server } => {
                    let present = running[&backend].iter().any(|r| r.name == server.name);
                    self.add(&mut st, &backend, &server, present).await?;
                    summary.added += 1;
                }
                Change::Remove { backend, server } => {
                    self.cli
                        .run(&format!("set server {backend}/{} state drain", server.name))
                        .await?;
                    self.start_drain(&mut st, backend, server);
                    summary.removed += 1;
                }
            }
        }
        Ok(summary)
    }

    /// Puts each renewed pair into the running process (see
    /// [`crate::live::LiveChannel::certs_renewed`]): `set ssl cert <file> <<` with the file's
    /// PEM (the bytes confd wrote to `serve_dir`, so a restart serves the same), then `commit
    /// ssl cert <file>`. HAProxy swaps the certificate for new handshakes; connections open on
    /// the old one go on. A file the running config does not reference is refused by HAProxy:
    /// the caller then reloads.
    pub async fn certs_renewed(&self, pairs: &[Arc<crate::certs::Pair>]) -> Result<(), LiveError> {
        let _st = self.shared.state.lock().await;
        for p in pairs {
            let path = p.pem.to_string_lossy();
            let pem = std::fs::read_to_string(&p.pem).map_err(|e| LiveError::Invalid {
                endpoint: format!("HAProxy socket {}", self.socket.display()),
                reason: format!("cannot read {path}: {e}"),
            })?;
            let command = set_cert_command(&path, &pem).map_err(|reason| LiveError::Invalid {
                endpoint: format!("HAProxy socket {}", self.socket.display()),
                reason,
            })?;
            self.cli.run(&command).await?;
            if let Err(e) = self.cli.run(&format!("commit ssl cert {path}")).await {
                // Leave no transaction open: the next `set ssl cert` would extend it.
                let _ = self.cli.send(&format!("abort ssl cert {path}")).await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Waits (bounded) until the socket answers from a worker started by the reload that just
    /// happened, and forgets the drains in progress: the new worker loaded the file, in which
    /// those servers no longer are (the old worker finishes their connections).
    pub async fn after_reload(&self, new: &str) {
        let mut st = self.shared.state.lock().await;
        for (_, d) in st.draining.drain() {
            d.cancel.cancel();
        }
        let socket = self.socket.to_string_lossy();
        if !diff::parse(new).admin_sockets.iter().any(|s| *s == socket) {
            // No runtime update can happen with this file (plan needs the socket), so there
            // is no worker to wait for.
            st.worker = None;
            tracing::debug!(socket = %socket, "the reloaded config opens no such admin socket");
            return;
        }
        let mut previous = st.worker.take();
        // With no worker known from before (no runtime update and no reload yet since confd
        // started), the first to answer is a candidate, watched for a moment.
        let mut candidate: Option<(u32, Instant)> = None;
        let start = Instant::now();
        loop {
            if let Ok(i) = self.cli.info().await {
                if previous.is_none() && candidate.is_none() {
                    // Uptime counts whole seconds, hence the slack.
                    if i.uptime_secs > start.elapsed().as_secs() + 1 {
                        // It ran before this reload: the old worker. Wait for its successor.
                        previous = Some(i.pid);
                    } else {
                        // The new worker, or one started just before the reload (HAProxy
                        // itself starting): if another takes over soon, that one is new.
                        candidate = Some((i.pid, Instant::now()));
                    }
                }
                let fresh = match (previous, candidate) {
                    (Some(p), _) => i.pid != p,
                    (None, Some((c, since))) => i.pid != c || since.elapsed() >= CANDIDATE_WATCH,
                    (None, None) => false,
                };
                if fresh && !i.stopping {
                    tracing::debug!(socket = %self.cli.socket().display(), pid = i.pid, waited = ?start.elapsed(), "new HAProxy worker answers");
                    st.worker = Some(i.pid);
                    return;
                }
            }
            if self.shared.stop.is_cancelled() {
                return;
            }
            if start.elapsed() >= RELOAD_SETTLE {
                tracing::warn!(
                    socket = %self.cli.socket().display(),
                    "no new HAProxy worker answered within {RELOAD_SETTLE:?} of the reload; the next runtime update checks the running state first"
                );
                return;
            }
            tokio::time::sleep(RELOAD_POLL).await;
        }
    }

    fn diverged(&self, detail: impl Into<String>) -> LiveError {
        LiveError::Diverged {
            endpoint: format!("HAProxy socket {}", self.socket.display()),
            detail: detail.into(),
        }
    }

    /// The running servers of `be` must be those of the old file (same addresses); extra
    /// ones are allowed only if they take no traffic (draining, or left in maintenance).
    fn check_running(
        &self,
        be: &str,
        file: &[Server],
        running: &[Running],
        st: &State,
    ) -> Result<(), LiveError> {
        for s in file {
            let Some(r) = running.iter().find(|r| r.name == s.name) else {
                return Err(self.diverged(format!("server {be}/{} is not running", s.name)));
            };
            if let (Some(want), Some(have)) = (s.socket_addr(), r.addr) {
                if (want.ip(), want.port()) != have {
                    return Err(self.diverged(format!(
                        "server {be}/{} runs at {}:{}, the file says {}",
                        s.name, have.0, have.1, s.addr
                    )));
                }
            }
        }
        let named: BTreeSet<&str> = file.iter().map(|s| s.name.as_str()).collect();
        for r in running.iter().filter(|r| !named.contains(r.name.as_str())) {
            let ours = st.draining.contains_key(&(be.to_string(), r.name.clone()));
            if !ours && !r.idle_by_admin() {
                return Err(self.diverged(format!(
                    "server {be}/{} is running and in service but not in the file",
                    r.name
                )));
            }
        }
        Ok(())
    }

    async fn run_all(&self, commands: Vec<String>) -> Result<(), LiveError> {
        for c in commands {
            self.cli.run(&c).await?;
        }
        Ok(())
    }

    /// Adds `s` to `be`. `present`: the running process already has a server of that name
    /// (one we are draining, or one left over in maintenance).
    async fn add(
        &self,
        st: &mut State,
        be: &str,
        s: &Server,
        present: bool,
    ) -> Result<(), LiveError> {
        let key = (be.to_string(), s.name.clone());
        if present {
            if let Some(d) = st.draining.remove(&key) {
                d.cancel.cancel();
                // Back before it was deleted: take it back in place if only its address,
                // port, weight or state differ. Its in-flight connections are untouched.
                if let Ok(Change::Update { old, new, .. }) = diff::update_in_place(be, &d.server, s)
                {
                    tracing::info!(server = %format!("{be}/{}", s.name), "server back while draining: drain cancelled");
                    return self.run_all(update_commands(be, &old, &new, true)).await;
                }
            }
            // Otherwise it must go first; that fails (and the caller reloads) while it still
            // has connections.
            let id = format!("{be}/{}", s.name);
            self.cli
                .run(&format!("set server {id} state maint"))
                .await?;
            self.cli.run(&format!("del server {id}")).await?;
        }
        self.run_all(add_commands(be, s)).await
    }

    fn start_drain(&self, st: &mut State, backend: String, server: Server) {
        st.next_drain += 1;
        let id = st.next_drain;
        let cancel = self.shared.stop.child_token();
        let key = (backend, server.name.clone());
        if let Some(old) = st.draining.insert(
            key.clone(),
            Draining {
                server,
                id,
                cancel: cancel.clone(),
            },
        ) {
            old.cancel.cancel();
        }
        let job = Drain {
            cli: self.cli.clone(),
            state: self.shared.state.clone(),
            key,
            id,
            cancel,
            timeout: self.drain_timeout,
        };
        tokio::spawn(job.run());
    }
}

/// `set ssl cert <path> <<` and its payload, the PEM of `pem` without blank lines (a blank
/// line ends the payload). The path is a word of the command line: one with blanks or control
/// characters is refused rather than sent.
fn set_cert_command(path: &str, pem: &str) -> Result<String, String> {
    if path.is_empty() || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "certificate file {path:?}: expected a path without blanks"
        ));
    }
    if !pem.contains("-----BEGIN ") {
        return Err(format!("{path}: expected PEM"));
    }
    let mut out = format!("set ssl cert {path} <<\n");
    for line in pem.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
        out.push_str(line);
        out.push('\n');
    }
    Ok(out)
}

/// One removed server on its way out: sessions end (or the timeout passes), maintenance,
/// delete.
struct Drain {
    cli: Cli,
    state: Arc<Mutex<State>>,
    key: (String, String),
    id: u64,
    cancel: CancellationToken,
    timeout: Duration,
}

impl Drain {
    async fn run(self) {
        let (be, name) = &self.key;
        let sid = format!("{be}/{name}");
        let start = Instant::now();
        let mut timed_out = false;
        loop {
            match self.cli.sessions(be, name).await {
                Ok(None) => {
                    // Gone already: a reload re-created the backend from the file.
                    self.forget().await;
                    return;
                }
                Ok(Some(0)) => break,
                Ok(Some(_)) => {}
                Err(e) => {
                    tracing::debug!(server = %sid, error = %e, "cannot count sessions of a draining server")
                }
            }
            if start.elapsed() >= self.timeout {
                timed_out = true;
                break;
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(DRAIN_POLL) => {}
            }
        }
        let mut last = None;
        for attempt in 0..DELETE_ATTEMPTS {
            {
                let mut st = self.state.lock().await;
                if !self.current(&st) {
                    return;
                }
                let result = async {
                    if attempt == 0 {
                        self.cli
                            .run(&format!("set server {sid} state maint"))
                            .await?;
                        if timed_out {
                            // Past the drain timeout: its remaining connections are cut.
                            self.cli
                                .run(&format!("shutdown sessions server {sid}"))
                                .await?;
                        }
                    }
                    self.cli.run(&format!("del server {sid}")).await
                }
                .await;
                match result {
                    Ok(()) => {
                        st.draining.remove(&self.key);
                        tracing::info!(server = %sid, drained = ?start.elapsed(), timed_out, "server removed at runtime after draining");
                        return;
                    }
                    Err(e) if no_such_server(&e) => {
                        st.draining.remove(&self.key);
                        return;
                    }
                    Err(e) => last = Some(e),
                }
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(DELETE_RETRY) => {}
            }
        }
        if let Some(e) = last {
            tracing::warn!(server = %sid, error = %e, "server left in maintenance: it could not be deleted; the next reload removes it");
        }
        self.forget().await;
    }

    /// Whether this drain is still the one registered for its server.
    fn current(&self, st: &State) -> bool {
        !self.cancel.is_cancelled() && st.draining.get(&self.key).is_some_and(|d| d.id == self.id)
    }

    async fn forget(&self) {
        let mut st = self.state.lock().await;
        if self.current(&st) {
            st.draining.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_goes_as_a_payload_without_blank_lines() {
        let pem = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n\n-----BEGIN PRIVATE KEY-----\r\nBBB\n-----END PRIVATE KEY-----\n";
        assert_eq!(
            set_cert_command("/s/a.test.pem", pem).unwrap(),
            "set ssl cert /s/a.test.pem <<\n-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\nBBB\n-----END PRIVATE KEY-----\n"
        );
        for (path, pem, want) in [
            ("/s/a b.pem", pem, "without blanks"),
            ("/s/a\nshow info", pem, "without blanks"),
            ("", pem, "without blanks"),
            ("/s/a.pem", "garbage", "expected PEM"),
        ] {
            let e = set_cert_command(path, pem).unwrap_err();
            assert!(e.contains(want), "{path:?}: {e}");
        }
    }
}
