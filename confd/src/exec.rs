//! `--exec`: confd supervises the proxy, as consul-template's exec mode does, so a container
//! needs no shell entrypoint and no init process.
//!
//! This module owns the child process: when it starts (after the first good render of every
//! template, or on the files an earlier run left when the store does not answer: fail
//! static), how it is reloaded (a signal, for templates without a reload command of their
//! own), how it is restarted (with backoff, when it dies on its own) and how it stops (the
//! signal confd got, forwarded; confd exits with the child's status).
//!
//! The command comes from the operator's configuration (`--exec` or the config file's `exec:`),
//! never from store data. It runs without a shell: a string is split into words by shell
//! quoting rules, and anything a shell would interpret (`;`, `|`, `&`, `$`, redirections) is
//! refused rather than passed on as a literal word. Whoever needs a shell writes
//! `sh -c '...'` (ending in `exec proxy ...`, so that signals reach the proxy itself).
//!
//! One child per confd process, kept across SIGHUP: a SIGHUP re-reads confd's own
//! configuration and restarts the render loop, but the proxy keeps running (it is reloaded
//! only if the new configuration renders a different file). The supervisor therefore lives
//! beside the render loop, not inside it: confd's `serve` owns the [`Supervisor`], and hands
//! each run a [`SupervisorHandle`] to report its renders and send reload signals through. A
//! handle, not a process-wide global: a run reaches the supervisor it is given, and the
//! default handle, for a run without one (`--once`, `--dry-run`, no `exec`), does nothing.
//!
//! The child leads a process group of its own. When it dies, whatever is left in that group
//! (an nginx master killed with `kill -9` leaves its workers, which still hold the listening
//! sockets) is killed, so the restarted proxy can bind again; confd makes itself a child
//! subreaper so those orphans become its children and are reaped, not left as zombies, also
//! when it runs as PID 1 in a container.

use crate::duration;
use crate::metrics::Telemetry;
use crate::signal::Signal;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchboard::Backoff;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// How long confd waits for the first good render before it starts the proxy on the files an
/// earlier run left (fail static). Long enough for a reachable store to answer, short enough
/// that a container whose store is down serves within seconds.
pub const FAIL_STATIC_AFTER: Duration = Duration::from_secs(2);

/// Restart backoff after an unexpected exit: first and longest wait (doubling in between).
pub const RESTART_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// A child that ran this long before it died counts as having worked: the next restart waits
/// the shortest time again.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// How long a reload signal waits for a just-started child to install its handler for it: a
/// proxy that has not yet would die of the signal's default action instead of reloading.
const HANDLER_WAIT: Duration = Duration::from_secs(2);

/// The program and its arguments. Written as a string (split by shell quoting rules, no shell
/// run) or as a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecCommand(pub Vec<String>);

impl ExecCommand {
    /// Splits `s` into words as a POSIX shell would (single and double quotes, backslash),
    /// without expanding anything; refuses what only a shell could run.
    pub fn parse(s: &str) -> Result<ExecCommand, String> {
        let words = split_words(s).map_err(|e| format!("exec command {s:?}: {e}"))?;
        if words.is_empty() || words[0].is_empty() {
            return Err(format!(
                "exec command {s:?} is empty: expected a program and its arguments"
            ));
        }
        Ok(ExecCommand(words))
    }
}

impl fmt::Display for ExecCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let words: Vec<String> = self
            .0
            .iter()
            .map(|w| {
                if !w.is_empty()
                    && w.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
                {
                    w.clone()
                } else {
                    crate::command::shell_quote(w)
                }
            })
            .collect();
        f.write_str(&words.join(" "))
    }
}

impl<'de> Deserialize<'de> for ExecCommand {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ExecCommand;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a command string or a non-empty list of arguments")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ExecCommand, E> {
                ExecCommand::parse(s).map_err(E::custom)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ExecCommand, A::Error> {
                let mut argv = Vec::new();
                while let Some(a) = seq.next_element::<String>()? {
                    argv.push(a);
                }
                if argv.is_empty() || argv[0].is_empty() {
                    return Err(de::Error::custom(
                        "empty exec command: expected [program, args...]",
                    ));
                }
                Ok(ExecCommand(argv))
            }
        }
        d.deserialize_any(V)
    }
}

/// Shell-style word splitting without a shell: quotes group, backslash escapes, nothing is
/// expanded. Characters a shell would act on are refused outside single quotes, since passing
/// them on as literal words would silently do something other than what was written.
pub fn split_words(s: &str) -> Result<Vec<String>, String> {
    let shell_only = |c: char| {
        format!(
            "{c:?} needs a shell, and the command runs without one: quote it, or write sh -c '...' to use a shell"
        )
    };
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err("unterminated single quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => cur.push(c),
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err("unterminated double quote".into()),
                        },
                        Some(c @ ('$' | '`')) => return Err(shell_only(c)),
                        Some(c) => cur.push(c),
                        None => return Err("unterminated double quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => cur.push(c),
                    None => return Err("trailing backslash".into()),
                }
            }
            ';' | '|' | '&' | '<' | '>' | '$' | '`' | '(' | ')' | '*' | '?' => {
                return Err(shell_only(c))
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

fn default_reload_signal() -> Signal {
    Signal::HUP
}
fn default_kill_timeout() -> Duration {
    Duration::from_secs(30)
}

/// The config file's `exec:` block (`--exec` and `--exec-reload-signal` set the same).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    /// The proxy in the foreground (`nginx -g 'daemon off;'`, `haproxy -W -db -f ...`).
    pub command: ExecCommand,
    /// Sent to the child after a render, for templates without a reload command of their own.
    #[serde(default = "default_reload_signal")]
    pub reload_signal: Signal,
    /// How long a stopping child may take after the forwarded signal before it is killed.
    #[serde(default = "default_kill_timeout", with = "duration::serde_text")]
    pub kill_timeout: Duration,
}

impl ExecConfig {
    /// A command alone, with the default reload signal and kill timeout.
    pub fn new(command: ExecCommand) -> ExecConfig {
        ExecConfig {
            command,
            reload_signal: default_reload_signal(),
            kill_timeout: default_kill_timeout(),
        }
    }
}

/// Where the child is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting for the first good render (or for fail static).
    NotStarted,
    /// Running with this PID.
    Running(i32),
    /// Died; restarted at this time.
    Backoff(Instant),
    /// Stop signal forwarded to this PID; waiting for it to exit.
    Stopping(i32),
}

/// What the render loop and the supervisor share.
struct Shared {
    state: Mutex<State>,
    /// Templates rendered at least once (by index), and out of how many.
    progress: Mutex<(usize, std::collections::BTreeSet<usize>)>,
    /// Every template has been rendered once.
    ready: watch::Sender<bool>,
}

impl Shared {
    /// Not started, nothing rendered yet.
    fn new() -> Shared {
        let (ready, _) = watch::channel(false);
        Shared {
            state: Mutex::new(State::NotStarted),
            progress: Mutex::new((usize::MAX, Default::default())),
            ready,
        }
    }
    fn set(&self, s: State) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }
    fn get(&self) -> State {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How a run of the render loop reaches the supervisor: it reports what it rendered
/// ([`SupervisorHandle::rendered`]) and reloads the child by signal
/// ([`SupervisorHandle::reload`]). Handed to each run by whoever owns the [`Supervisor`] (see
/// the module docs); the default reaches none and does nothing, as a run without one
/// (`--once`, `--dry-run`, no `exec`) needs. Cheap to clone.
#[derive(Clone, Default)]
pub struct SupervisorHandle(Option<Arc<Shared>>);

impl fmt::Debug for SupervisorHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(shared) => write!(f, "SupervisorHandle({:?})", shared.get()),
            None => f.write_str("SupervisorHandle(none)"),
        }
    }
}

impl SupervisorHandle {
    /// The render loop's report after a pass: `rendered` are the templates (of `total`) whose
    /// destination now holds a render of the current snapshot (written, or already equal).
    /// Once every template has been, the child may start. A no-op without a supervisor.
    pub fn rendered(&self, total: usize, rendered: impl IntoIterator<Item = usize>) {
        let Some(shared) = &self.0 else { return };
        let mut p = shared.progress.lock().unwrap_or_else(|e| e.into_inner());
        if p.0 != total {
            // A SIGHUP changed the template list before the first start: count afresh.
            *p = (total, Default::default());
        }
        p.1.extend(rendered);
        if p.1.len() >= total {
            shared
                .ready
                .send_if_modified(|r| !std::mem::replace(r, true));
        }
    }

    /// Whether a supervised child is running now.
    pub fn running(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|s| matches!(s.get(), State::Running(_)))
    }

    /// Reloads the child with `sig` (a template's reload when it has no command of its own).
    /// Returns what was done, for the `reloaded` log line. A child that is not running has
    /// nothing to reload: it reads the new file when it starts, so that is not a failure.
    pub async fn reload(&self, sig: Signal) -> Result<String, String> {
        let Some(shared) = &self.0 else {
            return Ok(format!("{sig} not sent: no supervised process in this run"));
        };
        let pid = match shared.get() {
            State::Running(pid) => pid,
            other => {
                return Ok(format!(
                    "{sig} not sent: the supervised process is not running ({other:?}); it reads the file when it starts"
                ))
            }
        };
        // A proxy started a moment ago may not have installed its handler yet; the default
        // action of SIGHUP would kill it.
        let deadline = Instant::now() + HANDLER_WAIT;
        while !catches(pid, sig) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if shared.get() != State::Running(pid) {
            return Ok(format!(
                "{sig} not sent: the supervised process restarted meanwhile and reads the new file"
            ));
        }
        send(pid, sig)
            .map_err(|e| format!("cannot send {sig} to the supervised process {pid}: {e}"))?;
        Ok(format!("{sig} sent to the supervised process {pid}"))
    }
}

/// Whether `pid` has a handler installed for `sig` (`SigCgt` in `/proc/<pid>/status`).
/// Unknown (no `/proc`) counts as yes.
fn catches(pid: i32, sig: Signal) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return true;
    };
    let Some(mask) = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
    else {
        return true;
    };
    mask & (1u64 << (sig.0 - 1)) != 0
}

fn send(pid: i32, sig: Signal) -> std::io::Result<()> {
    // SAFETY: kill(2) with a PID this supervisor started and has not reaped yet.
    if unsafe { libc::kill(pid, sig.0) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Kills what is left of the child's process group and reaps those processes (they are this
/// process's children once it is a subreaper), for at most a second.
async fn clean_group(pgid: i32) {
    // SAFETY: kill(2) of the group the child led; ESRCH when it is already empty.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let mut st = 0;
        // SAFETY: waitpid(2) on the child's process group only: processes tokio waits for
        // (check and reload commands) lead groups of their own and are never taken here.
        let r = unsafe { libc::waitpid(-pgid, &mut st, libc::WNOHANG) };
        if r < 0 || Instant::now() >= deadline {
            return; // ECHILD: nothing of that group is left to reap.
        }
        if r == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The exit code confd ends with, given how the child ended: its code, or 128 + the signal
/// that killed it (as a shell reports it).
pub fn exit_code(st: &ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(s)) => (128 + s) as u8,
        _ => 1,
    }
}

/// The running supervisor: stop it with [`Supervisor::stop`].
pub struct Supervisor {
    stop: Option<oneshot::Sender<Signal>>,
    task: tokio::task::JoinHandle<Option<ExitStatus>>,
    shared: Arc<Shared>,
    command: String,
}

impl Supervisor {
    /// Starts supervising `cfg.command`: it is started once every template has been rendered
    /// (see [`SupervisorHandle::rendered`]), or after [`FAIL_STATIC_AFTER`] if every one of
    /// `dests` exists. Whether it runs is the `proxy` condition of `telemetry`.
    pub fn spawn(
        cfg: ExecConfig,
        dests: Vec<PathBuf>,
        telemetry: Telemetry,
    ) -> anyhow::Result<Supervisor> {
        let shared = Arc::new(Shared::new());
        // Orphans of the child's group (workers of a killed master) become ours, to reap.
        // SAFETY: prctl(2) with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "cannot become a child subreaper: processes the supervised command leaves behind are not reaped"
            );
        }
        let (stop, stop_rx) = oneshot::channel();
        let command = cfg.command.to_string();
        let task = tokio::spawn(supervise(cfg, dests, shared.clone(), telemetry, stop_rx));
        Ok(Supervisor {
            stop: Some(stop),
            task,
            shared,
            command,
        })
    }

    /// What each run of the render loop is handed to reach this supervisor.
    pub fn handle(&self) -> SupervisorHandle {
        SupervisorHandle(Some(self.shared.clone()))
    }

    /// Passes `sig` on to the running child (SIGUSR1, SIGUSR2: the proxy's own uses).
    pub fn forward(&self, sig: Signal) {
        if let State::Running(pid) = self.shared.get() {
            tracing::info!(command = %self.command, pid, "forwarding {sig}");
            if let Err(e) = send(pid, sig) {
                tracing::warn!(pid, error = %e, "cannot forward {sig}");
            }
        }
    }

    /// Forwards `sig` to the child and waits for it to exit (killing its group after the
    /// kill timeout). Returns how it ended, or `None` if it never ran.
    pub async fn stop(mut self, sig: Signal) -> Option<ExitStatus> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(sig);
        }
        (&mut self.task).await.ok().flatten()
    }
}

/// The supervisor's life: wait for the start condition, then run, restart and stop the child.
async fn supervise(
    cfg: ExecConfig,
    dests: Vec<PathBuf>,
    shared: Arc<Shared>,
    telemetry: Telemetry,
    mut stop: oneshot::Receiver<Signal>,
) -> Option<ExitStatus> {
    let command = cfg.command.to_string();
    telemetry.proxy_down(&"not started yet: waiting for the first complete render");
    let mut ready = shared.ready.subscribe();
    let grace = tokio::time::sleep(FAIL_STATIC_AFTER);
    tokio::pin!(grace);
    let mut grace_over = false;
    loop {
        tokio::select! {
            _ = &mut stop => return None,
            r = ready.wait_for(|r| *r) => {
                if r.is_ok() {
                    tracing::info!(command = %command, "every template rendered; starting the supervised process");
                }
                break;
            }
            _ = &mut grace, if !grace_over => {
                grace_over = true;
                let missing: Vec<String> = dests
                    .iter()
                    .filter(|d| !d.is_file())
                    .map(|d| d.display().to_string())
                    .collect();
                if missing.is_empty() {
                    // Not the word "reloaded": operators (and the compose tests) count reloads
                    // by the runner's `reloaded` lines.
                    tracing::warn!(
                        command = %command,
                        files = ?dests,
                        "no complete render within {FAIL_STATIC_AFTER:?} (store unreachable or a template failing): starting on the files an earlier run left (fail static); they are brought up to date once the store answers"
                    );
                    break;
                }
                tracing::warn!(
                    command = %command,
                    missing = ?missing,
                    "no complete render within {FAIL_STATIC_AFTER:?} and no earlier files to start on: waiting for the first render"
                );
            }
        }
    }
    let spawner = match Spawner::start() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(command = %command, "cannot start the thread that starts the supervised process: {e}");
            return None;
        }
    };
    let mut backoff = Backoff::new(RESTART_BACKOFF.0, RESTART_BACKOFF.1);
    let mut last: Option<ExitStatus> = None;
    loop {
        let started = Instant::now();
        let why = match spawner.spawn(&cfg.command).await {
            Err(e) => format!("cannot start it: {e}"),
            Ok(mut child) => {
                let pid = child.id().map_or(0, |p| p as i32);
                shared.set(State::Running(pid));
                telemetry.proxy_up();
                tracing::info!(command = %command, pid, "supervised process started");
                tokio::select! {
                    st = child.wait() => {
                        clean_group(pid).await;
                        match st {
                            Ok(st) => {
                                last = Some(st);
                                format!("it exited unexpectedly ({st})")
                            }
                            Err(e) => format!("cannot wait for it: {e}"),
                        }
                    }
                    sig = &mut stop => {
                        let sig = sig.unwrap_or(Signal::TERM);
                        shared.set(State::Stopping(pid));
                        return Some(stop_child(&cfg, &command, child, pid, sig).await);
                    }
                }
            }
        };
        if started.elapsed() >= STABLE_AFTER {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        shared.set(State::Backoff(Instant::now() + delay));
        telemetry.proxy_down(&format_args!("{why}; restarting in {delay:.1?}"));
        tracing::error!(
            command = %command,
            attempt = backoff.attempts(),
            "supervised process: {why}; restarting in {delay:?}"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut stop => return last,
        }
    }
}

/// The thread the supervised process is started from, for as long as the supervisor runs.
///
/// `PR_SET_PDEATHSIG` (see [`spawn`]) fires when the thread that forked the child exits, even
/// while confd runs on. A runtime thread is no such anchor: tokio retires idle blocking-pool
/// threads after 10 s, and a worker that ran `block_in_place` (the render loop does, to
/// render off the runtime) becomes one. A proxy forked from such a thread was sent SIGTERM
/// about 10 s later, exited 0 and was restarted, failing every request meanwhile. This
/// thread only forks, and ends when the supervisor drops it, after its child has stopped.
struct Spawner {
    jobs: Option<std::sync::mpsc::Sender<SpawnJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A command to start, and where to send the child (or why it did not start).
type SpawnJob = (
    ExecCommand,
    oneshot::Sender<std::io::Result<tokio::process::Child>>,
);

impl Spawner {
    /// Starts the thread, inside the current runtime (children are reaped through it).
    fn start() -> std::io::Result<Spawner> {
        let runtime = tokio::runtime::Handle::current();
        let (jobs, rx) = std::sync::mpsc::channel::<SpawnJob>();
        let thread = std::thread::Builder::new()
            .name("confd-exec".into())
            .spawn(move || {
                let _in_runtime = runtime.enter();
                for (cmd, reply) in rx {
                    let _ = reply.send(spawn(&cmd));
                }
            })?;
        Ok(Spawner {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Starts `cmd` on the spawner's thread.
    async fn spawn(&self, cmd: &ExecCommand) -> std::io::Result<tokio::process::Child> {
        let gone = || std::io::Error::other("the thread that starts it has ended");
        let (reply, child) = oneshot::channel();
        self.jobs
            .as_ref()
            .ok_or_else(gone)?
            .send((cmd.clone(), reply))
            .map_err(|_| gone())?;
        child.await.map_err(|_| gone())?
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        // Closing the queue ends the thread's loop at once.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the command in a process group of its own (signals to confd's group, e.g. a
/// terminal's ^C, do not reach it; confd forwards what it should).
///
/// The proxy never outlives confd: it gets SIGTERM when confd dies, even by SIGKILL
/// (`PR_SET_PDEATHSIG`). Otherwise an orphaned proxy would keep its ports, and the next confd's
/// proxy could not bind them. The signal follows the *thread* that forked the child, not the
/// process: call this only on the [`Spawner`]'s thread, which lives as long as the supervisor.
fn spawn(cmd: &ExecCommand) -> std::io::Result<tokio::process::Child> {
    let parent = std::process::id() as libc::pid_t;
    let mut command = tokio::process::Command::new(&cmd.0[0]);
    command
        .args(&cmd.0[1..])
        .stdin(Stdio::null())
        .process_group(0);
    // SAFETY: between fork and exec only async-signal-safe calls (prctl, getppid), and no
    // allocation.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // confd died between fork and prctl: the signal was missed, so do not start.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    command.spawn()
}

/// Forwards `sig`, waits up to the kill timeout, then kills the group; reaps what is left.
async fn stop_child(
    cfg: &ExecConfig,
    command: &str,
    mut child: tokio::process::Child,
    pid: i32,
    sig: Signal,
) -> ExitStatus {
    tracing::info!(command = %command, pid, "forwarding {sig}; waiting up to {:?} for it to exit", cfg.kill_timeout);
    if let Err(e) = send(pid, sig) {
        tracing::warn!(pid, error = %e, "cannot forward {sig}");
    }
    let st = match tokio::time::timeout(cfg.kill_timeout, child.wait()).await {
        Ok(Ok(st)) => st,
        _ => {
            tracing::warn!(command = %command, pid, "still running {:?} after {sig}: killing it", cfg.kill_timeout);
            // SAFETY: kill(2) of the group the child leads.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
            match child.wait().await {
                Ok(st) => st,
                Err(_) => std::os::unix::process::ExitStatusExt::from_raw(libc::SIGKILL),
            }
        }
    };
    clean_group(pid).await;
    tracing::info!(command = %command, pid, "supervised process exited ({st})");
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child started through the [`Spawner`] outlives the thread that asked for it; one
    /// forked on that thread itself gets its parent-death SIGTERM when the thread ends. The
    /// second is the control: once it is dead, the ended thread's signals have all been sent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_child_outlives_the_thread_that_asked_for_it() {
        let spawner = Arc::new(Spawner::start().unwrap());
        let sleep = ExecCommand(vec!["sleep".into(), "30".into()]);
        let runtime = tokio::runtime::Handle::current();
        let (s, cmd) = (spawner.clone(), sleep.clone());
        let (mut kept, mut forked) = std::thread::spawn(move || {
            let _in_runtime = runtime.enter();
            let forked = spawn(&cmd).unwrap();
            let kept = runtime.block_on(s.spawn(&cmd)).unwrap();
            (kept, forked)
        })
        .join()
        .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(10), forked.wait())
            .await
            .expect("the child forked on the ended thread got no SIGTERM")
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
        assert!(
            kept.try_wait().unwrap().is_none(),
            "the spawner's child died with the thread that asked for it"
        );
        let _ = kept.kill().await;
    }

    #[test]
    fn commands_split_like_a_shell_without_running_one() {
        let ok = [
            ("nginx -g 'daemon off;'", vec!["nginx", "-g", "daemon off;"]),
            (
                r#"nginx -c /etc/n.conf -g "daemon off; pid /run/n.pid;""#,
                vec![
                    "nginx",
                    "-c",
                    "/etc/n.conf",
                    "-g",
                    "daemon off; pid /run/n.pid;",
                ],
            ),
            (
                "  haproxy  -W\t-db -f a\\ b  ",
                vec!["haproxy", "-W", "-db", "-f", "a b"],
            ),
            (r#"x "a\"b" '' c"#, vec!["x", "a\"b", "", "c"]),
            (
                "sh -c 'rm -f /run/x; exec nginx'",
                vec!["sh", "-c", "rm -f /run/x; exec nginx"],
            ),
        ];
        for (s, want) in ok {
            assert_eq!(ExecCommand::parse(s).unwrap().0, want, "{s}");
        }
        for (s, why) in [
            ("nginx; rm -rf /", "needs a shell"),
            ("nginx && x", "needs a shell"),
            ("nginx > /tmp/x", "needs a shell"),
            ("nginx $HOME", "needs a shell"),
            ("nginx \"$HOME\"", "needs a shell"),
            ("nginx 'daemon off;", "unterminated single quote"),
            ("nginx \"x", "unterminated double quote"),
            ("   ", "is empty"),
        ] {
            let e = ExecCommand::parse(s).unwrap_err();
            assert!(e.contains(why) && e.starts_with("exec command"), "{s}: {e}");
        }
        // Display quotes what needs it, so the log shows what runs.
        let c = ExecCommand::parse("nginx -g 'daemon off;'").unwrap();
        assert_eq!(c.to_string(), "nginx -g 'daemon off;'");
    }

    /// The handle a run is given: without a supervisor it does nothing; with one, the child
    /// may start once every template was reported in place, counted afresh when a SIGHUP
    /// changed how many there are.
    #[tokio::test]
    async fn runs_reach_the_supervisor_through_their_handle() {
        let none = SupervisorHandle::default();
        none.rendered(1, [0]);
        assert!(!none.running());
        assert_eq!(
            none.reload(Signal::HUP).await.unwrap(),
            "SIGHUP not sent: no supervised process in this run"
        );

        let shared = Arc::new(Shared::new());
        let h = SupervisorHandle(Some(shared.clone()));
        let ready = || *shared.ready.borrow();
        h.rendered(3, [0, 2]);
        assert!(!ready());
        h.rendered(2, [1]);
        assert!(!ready(), "a new template count starts afresh");
        h.rendered(2, [0]);
        assert!(ready());
        assert!(!h.running());
        let not_running = h.reload(Signal::HUP).await.unwrap();
        assert!(
            not_running.contains("not running (NotStarted)"),
            "{not_running}"
        );
    }

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(&ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(&ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(&ExitStatus::from_raw(libc::SIGKILL)), 137);
    }

    #[tokio::test]
    async fn a_handler_shows_in_the_caught_mask() {
        let pid = std::process::id() as i32;
        // Nothing in a test process handles SIGWINCH, until tokio is asked to.
        assert!(!catches(pid, Signal(libc::SIGWINCH)));
        let _s =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).unwrap();
        assert!(catches(pid, Signal(libc::SIGWINCH)));
    }
}
