//! The render loop: when to render (quiescence), and one pass of render → stage → check →
//! swap → reload, with rollback.
//!
//! A pass takes the templates that are due. Each is rendered, compared with its destination,
//! staged and checked; only then is it renamed into place. Templates that share a reload
//! command are grouped so the command runs once per pass. If a reload fails, every file of
//! its group is put back as it was and the reload runs again, so the proxy keeps serving the
//! previous config. A template with a live channel whose change is membership-only (see
//! [`crate::live`]) is committed and applied to the running proxy instead of reloaded; if that
//! fails it joins the reloads. Any failure is one error line naming the template and the reason; the
//! template is tried again on the next change (snapshot or template edit). Nothing here ever
//! ends the daemon.

use crate::command::{self, CommandError, CommandSpec};
use crate::config::{Config, TemplateConfig, Wait};
use crate::exec::SupervisorHandle;
use crate::metrics::Telemetry;
use crate::model::Snapshot;
use crate::outcome::{Failure, Outcome};
use crate::render::Renderer;
use crate::source;
use crate::watch::watch_templates;
use crate::writer;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use switchboard::store::KvStore;
use switchboard::{Backoff, Shutdown};
use tokio::sync::watch;
use tokio::time::Instant;

/// How a run behaves, and what it reports to beside the log: both handed in by whoever owns
/// the process's lifetime (confd's `serve`), so they outlive the run, across SIGHUP restarts.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Render every template once (after the first healthy snapshot) and return.
    pub once: bool,
    /// Print a unified diff per changed template to stdout; write and run nothing. Implies
    /// `once`.
    pub dry_run: bool,
    /// Where renders, checks, reloads, live updates and each template's health are recorded.
    pub telemetry: Telemetry,
    /// The proxy confd supervises (`--exec`): told when every file is in place, and reloaded
    /// by signal for templates without a reload command. The default reaches none.
    pub supervisor: SupervisorHandle,
    /// The certificates the ACME loop holds ([`crate::acme::run`], which outlives runs), served
    /// beside those from files and the store.
    pub acme_certs: Option<watch::Receiver<crate::acme::Certificates>>,
}

/// Pending-change bookkeeping for one template (pure, so it is unit-tested).
#[derive(Debug, Clone, Default)]
pub struct Quiescence {
    first: Option<Instant>,
    last: Option<Instant>,
    now_due: bool,
    edited: Option<Instant>,
    retry: Option<Instant>,
}

/// A template file being written shows up as several events (truncate, write, close); wait
/// this long after the last one so a half-written file is never rendered.
pub const EDIT_SETTLE: Duration = Duration::from_millis(100);

impl Quiescence {
    /// A store change arrived at `t`.
    pub fn change(&mut self, t: Instant) {
        self.first.get_or_insert(t);
        self.last = Some(t);
    }

    /// Render at the next pass regardless of the window (first snapshot, template edit).
    pub fn force(&mut self) {
        self.now_due = true;
    }

    /// The template file changed at `t`: render once it has settled, whatever the window.
    pub fn edit(&mut self, t: Instant) {
        self.edited = Some(t + EDIT_SETTLE);
    }

    /// A failed reload is to be tried again at `t` (whatever the window).
    pub fn retry(&mut self, t: Instant) {
        self.retry = Some(t);
    }

    /// When this template becomes due, if anything is pending.
    pub fn due_at(&self, w: Wait) -> Option<Instant> {
        if self.now_due {
            return Some(Instant::now());
        }
        let window = match (self.first, self.last) {
            (Some(first), Some(last)) => Some((last + w.min).min(first + w.max)),
            _ => None,
        };
        [window, self.edited, self.retry]
            .into_iter()
            .flatten()
            .min()
    }

    /// Whether it is due at `t`.
    pub fn is_due(&self, w: Wait, t: Instant) -> bool {
        self.now_due || self.due_at(w).is_some_and(|d| d <= t)
    }

    /// Forget what was pending (a pass took it).
    pub fn clear(&mut self) {
        *self = Quiescence::default();
    }
}

/// Reloads run and live updates applied since confd started (all templates), carried by the
/// `reloaded` and `applied live` log lines so that the log alone tells how often the proxy
/// was reloaded and how often it was changed in place.
static RELOADS: AtomicU64 = AtomicU64::new(0);
static LIVE_UPDATES: AtomicU64 = AtomicU64::new(0);

/// How long a template whose reload failed waits before it is tried again, at first and at
/// most (doubling in between).
const RELOAD_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// Runs confd until `shutdown` (or, with `once`/`dry_run`, until every template was rendered
/// once), reading snapshots from `source`. Returns whether every template succeeded (always
/// `true` for a daemon that was shut down).
///
/// The source is not the run's: its owner ([`crate::source::Source`], held by confd's
/// `serve`) may keep it across runs, so a SIGHUP that changes only templates opens no new
/// connection to the store. A run renders the source's current snapshot at once.
pub async fn run(
    cfg: Config,
    opts: RunOptions,
    mut source: source::SourceHandle,
    shutdown: Shutdown,
) -> anyhow::Result<bool> {
    // What a crash between staging and replacing left behind (a dry run writes nothing).
    if !opts.dry_run {
        let dests: Vec<_> = cfg.templates.iter().map(|t| t.dest.clone()).collect();
        for d in &dests {
            writer::remove_staged(d, &dests);
        }
    }
    let once = opts.once || opts.dry_run;
    let mut renderer = Renderer::stopping_on(shutdown.clone());
    let mut acme_certs = opts.acme_certs.clone();
    let cert_store = cert_store(&cfg);
    // A one-shot render reads the store once; a daemon keeps reading it.
    let mut store_pairs = match &cert_store {
        Some(kv) if once => {
            let pairs = match tokio::time::timeout(cfg.once_timeout, kv.list()).await {
                Ok(Ok(values)) => crate::certs::store::decode(kv.prefix(), &values).0,
                _ => Vec::new(),
            };
            Some(watch::channel(Arc::new(pairs)).1)
        }
        Some(kv) => {
            let (tx, rx) = watch::channel(Default::default());
            tokio::spawn(crate::certs::store::run(kv.clone(), tx, shutdown.clone()));
            Some(rx)
        }
        None => None,
    };
    let mut certs = load_certs(&cfg, None, &supplied(&store_pairs, &acme_certs));
    if let Some(c) = &certs {
        renderer.set_certs(c.clone());
    }
    let telemetry = &opts.telemetry;
    telemetry.new_run(cfg.templates.iter().map(|t| t.dest.as_path()));

    if once {
        let wait = source.snapshots.wait_for(Option::is_some);
        let snap = tokio::select! {
            r = tokio::time::timeout(cfg.once_timeout, wait) => match r {
                Ok(Ok(s)) => s.clone().expect("waited for Some"),
                Ok(Err(_)) => anyhow::bail!("the source stopped before its first snapshot"),
                Err(_) => anyhow::bail!(
                    "no healthy snapshot from {:?} within {:?}",
                    cfg.backend.primary().base_url(),
                    cfg.once_timeout
                ),
            },
            _ = shutdown.cancelled() => return Ok(true),
        };
        let all: Vec<usize> = (0..cfg.templates.len()).collect();
        let mut owed = BTreeSet::new();
        let outcomes = pass(&cfg, &opts, &mut renderer, &snap, &all, &mut owed).await;
        for (t, o) in cfg.templates.iter().zip(&outcomes) {
            telemetry.outcome(&t.src, &t.dest, o);
        }
        return Ok(outcomes
            .iter()
            .all(|o| !matches!(o, Outcome::Failed(_) | Outcome::ReloadFailed(_))));
    }

    let (tpl_tx, mut tpl_rx) = tokio::sync::mpsc::unbounded_channel();
    let _watcher = match watch_templates(
        &cfg.templates
            .iter()
            .map(|t| t.src.clone())
            .collect::<Vec<_>>(),
        tpl_tx,
    ) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch template files; edits apply on the next change");
            None
        }
    };
    // Certificate files change in bursts (a crt then its key): they are read again once the
    // directory has been quiet this long.
    const CERTS_QUIET: Duration = Duration::from_millis(200);
    let (certs_tx, mut certs_rx) = tokio::sync::mpsc::unbounded_channel();
    let _certs_watcher = cfg.https.as_ref().and_then(|h| {
        let dir = h.certs_dir.as_ref()?;
        crate::watch::watch_dir(dir, certs_tx)
            .map_err(|e| {
                tracing::warn!(error = %e, dir = %dir.display(),
                    "cannot watch the certificates directory; certificates are read at start only")
            })
            .ok()
    });
    let mut certs_due: Option<Instant> = None;
    let waits: Vec<Wait> = cfg
        .templates
        .iter()
        .map(|t| t.wait.unwrap_or(cfg.wait))
        .collect();
    let mut pending = vec![Quiescence::default(); cfg.templates.len()];
    let mut retries = vec![Backoff::new(RELOAD_RETRY.0, RELOAD_RETRY.1); cfg.templates.len()];
    // Templates whose file on disk is newer than what the proxy has loaded: its reload failed
    // and there was nothing to put back. Their reload runs again at every pass until it works.
    let mut owed: BTreeSet<usize> = BTreeSet::new();
    let mut snap: Option<Arc<Snapshot>> = None;
    tracing::info!(
        backend = %cfg.backend.primary().base_url(),
        templates = cfg.templates.len(),
        "confd running"
    );
    loop {
        let next = pending
            .iter()
            .zip(&waits)
            .filter_map(|(p, w)| p.due_at(*w))
            .min();
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(true),
            r = source.snapshots.changed() => {
                if r.is_err() {
                    anyhow::bail!("the source stopped");
                }
                let new = source.snapshots.borrow_and_update().clone();
                // The first snapshot and any withdrawal render at once; only additions and
                // other changes wait for quiescence.
                let urgent = match (&snap, &new) {
                    (None, _) => true,
                    (Some(old), Some(new)) => new.withdraws_from(old),
                    (Some(_), None) => false,
                };
                snap = new;
                let now = Instant::now();
                for p in &mut pending {
                    if urgent { p.force() } else { p.change(now) }
                }
            }
            Some(()) = certs_rx.recv() => {
                certs_due = Some(Instant::now() + CERTS_QUIET);
            }
            // The store's and ACME's certificates arrive whole: served at once.
            () = changed(&mut store_pairs) => certs_due = Some(Instant::now()),
            () = changed(&mut acme_certs) => certs_due = Some(Instant::now()),
            _ = sleep_until(certs_due), if certs_due.is_some() => {
                certs_due = None;
                let new = load_certs(&cfg, certs.as_deref(), &supplied(&store_pairs, &acme_certs));
                if new != certs {
                    if let (Some(old), Some(c)) = (&certs, &new) {
                        let renewed = crate::certs::renewed(old, c);
                        if !renewed.is_empty() {
                            certs_renewed(&cfg, &opts, &renewed, c, &mut owed).await;
                        }
                    }
                    if let Some(c) = &new {
                        renderer.set_certs(c.clone());
                    }
                    certs = new;
                    for p in &mut pending {
                        p.force();
                    }
                }
            }
            Some(i) = tpl_rx.recv() => {
                tracing::info!(template = %cfg.templates[i].src.display(), "template file changed");
                pending[i].edit(Instant::now());
            }
            _ = sleep_until(next), if next.is_some() => {}
        }
        let Some(s) = &snap else { continue };
        let now = Instant::now();
        let due: Vec<usize> = (0..pending.len())
            .filter(|&i| pending[i].is_due(waits[i], now))
            .collect();
        if due.is_empty() {
            continue;
        }
        for &i in &due {
            pending[i].clear();
        }
        let outcomes = pass(&cfg, &opts, &mut renderer, s, &due, &mut owed).await;
        // `--exec` starts its proxy once every file is in place.
        let in_place = due
            .iter()
            .filter(|&&i| !matches!(outcomes[i], Outcome::Failed(_)));
        opts.supervisor
            .rendered(cfg.templates.len(), in_place.copied());
        switchboard::memory::after_pass();
        for (i, o) in outcomes.iter().enumerate() {
            if due.contains(&i) || *o != Outcome::Unchanged {
                let t = &cfg.templates[i];
                telemetry.outcome(&t.src, &t.dest, o);
            }
            match o {
                Outcome::ReloadFailed(_) => {
                    let delay = retries[i].next_delay();
                    tracing::warn!(
                        template = %label(&cfg.templates[i]),
                        attempt = retries[i].attempts(),
                        "reload failed; trying again in {delay:?}"
                    );
                    pending[i].retry(Instant::now() + delay);
                }
                Outcome::Updated | Outcome::Live => retries[i].reset(),
                Outcome::Unchanged if due.contains(&i) => retries[i].reset(),
                _ => {}
            }
        }
    }
}

/// The store holding operators' certificates (`https.store_prefix`), if it is to be read.
fn cert_store(cfg: &Config) -> Option<KvStore> {
    let h = cfg.https.as_ref().filter(|h| !h.store_prefix.is_empty())?;
    KvStore::with_settings(&cfg.backend, &h.store_prefix, &cfg.store)
        .map_err(|e| {
            tracing::warn!(
                "https store_prefix {}: cannot read the store: {e}",
                h.store_prefix
            )
        })
        .ok()
}

/// The next change on `rx`; never once it is closed, or without one.
async fn changed<T>(rx: &mut Option<watch::Receiver<T>>) {
    let closed = match rx {
        Some(r) => r.changed().await.is_err(),
        None => true,
    };
    if closed {
        *rx = None;
        std::future::pending::<()>().await;
    }
}

/// The store's pairs and ACME's certificates, as [`crate::certs::load`] takes them.
fn supplied(
    store: &Option<watch::Receiver<crate::certs::store::StorePairs>>,
    acme: &Option<watch::Receiver<crate::acme::Certificates>>,
) -> Vec<crate::certs::Supplied> {
    let mut out: Vec<crate::certs::Supplied> = store
        .as_ref()
        .map(|r| r.borrow().as_ref().clone())
        .unwrap_or_default();
    if let Some(r) = acme {
        out.extend(r.borrow().values().map(|c| crate::certs::Supplied {
            origin: crate::certs::Origin::Acme,
            name: c.host.clone(),
            crt: c.chain_pem.clone().into_bytes(),
            key: c.key_pem.clone().into_bytes(),
            what: format!("acme certificate of {}", c.host),
        }));
    }
    out
}

/// The certificates of `https:` (files, then `supplied`) checked again (`None` without
/// `https:`), with a warning per bad pair; `was` is the set served until now, whose pairs
/// are logged again only when they change.
fn load_certs(
    cfg: &Config,
    was: Option<&crate::certs::CertSet>,
    supplied: &[crate::certs::Supplied],
) -> Option<Arc<crate::certs::CertSet>> {
    let h = cfg.https.as_ref()?;
    let (set, warnings) = crate::certs::load(h.certs_dir.as_deref(), supplied, &h.serve_dir);
    for w in warnings {
        tracing::warn!("{w}");
    }
    if was != Some(&set) {
        tracing::info!(
            pairs = set.pairs.len(),
            names = %set.pairs.keys().cloned().collect::<Vec<_>>().join(" "),
            "certificates loaded"
        );
    }
    Some(Arc::new(set))
}

/// Renewed certificates (same name and file, another certificate) reach each template's proxy
/// through its live channel: the rendered files do not change for them, so no pass would
/// reload. A template whose channel fails, or that has none, is owed a reload instead (the
/// pass that follows runs it), which makes its proxy read the PEM files again.
async fn certs_renewed(
    cfg: &Config,
    opts: &RunOptions,
    renewed: &[Arc<crate::certs::Pair>],
    all: &crate::certs::CertSet,
    owed: &mut BTreeSet<usize>,
) {
    let names: Vec<&str> = renewed.iter().map(|p| p.name.as_str()).collect();
    for (i, t) in cfg.templates.iter().enumerate() {
        let Some(live) = &t.live else {
            if t.reload.is_some() {
                tracing::info!(template = %label(t), certificates = ?names, "certificates renewed; reloading (no live channel)");
                owed.insert(i);
            }
            continue;
        };
        match live.certs_renewed(renewed, all).await {
            Ok(()) => {
                opts.telemetry.live(&t.dest, true);
                tracing::info!(
                    template = %label(t),
                    certificates = ?names,
                    reloads = RELOADS.load(Ordering::Relaxed),
                    live_updates = LIVE_UPDATES.fetch_add(1, Ordering::Relaxed) + 1,
                    "certificates renewed; applied live, no reload"
                );
            }
            Err(e) => {
                opts.telemetry.live(&t.dest, false);
                tracing::warn!(template = %label(t), certificates = ?names, error = %e, "live certificate update failed; reloading instead");
                owed.insert(i);
            }
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn label(t: &TemplateConfig) -> String {
    format!("{} -> {}", t.src.display(), t.dest.display())
}

/// What a failed reload does to a file this pass put in place (or found owed).
enum Undo {
    /// Put this previous content back: the proxy keeps serving the config it had.
    Restore(Vec<u8>),
    /// Keep the file: there was none before (the first render), or the one before was still
    /// owed a reload (never loaded), or it is itself the one owed. Removing it, or putting
    /// back a file no proxy loaded, would leave a proxy that is still starting with no config
    /// or a stale one; the file passed its check, so it stays and its reload is retried.
    Keep,
}

/// A template whose reload runs in this pass.
struct Reloading {
    idx: usize,
    undo: Undo,
}

/// Templates that go through one pass together: those sharing a reload command (it runs once
/// for all of them), or one template alone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum UnitKey {
    Reload(CommandSpec),
    Alone(usize),
}

/// One template of a unit.
struct UnitItem {
    idx: usize,
    /// Its render, if it was due.
    render: Option<Result<Rendered, Failure>>,
    /// Whether its file is owed a reload.
    owed: bool,
}

/// What one unit did, applied to the pass's bookkeeping once every unit is done.
#[derive(Default)]
struct UnitResult {
    outcomes: Vec<(usize, Outcome)>,
    owed_now: Vec<usize>,
    settled: Vec<usize>,
}

/// Renders, checks, swaps and reloads the templates `due` against `snap`, or prints their
/// diffs (`opts.dry_run`).
///
/// `owed` holds the templates whose file is in place but not yet loaded by their proxy (a
/// reload failed with nothing to restore): their reload runs in this pass whether or not
/// they are due or changed, and they leave `owed` once it succeeds.
///
/// Rendering is done first, in order (it is fast, and the renderer caches parsed templates).
/// Then each unit (the templates sharing a reload command, or a template alone) checks, swaps
/// and reloads concurrently with the others: a check or reload command that hangs holds its
/// own unit until its `command_timeout`, never an independent template.
pub async fn pass(
    cfg: &Config,
    opts: &RunOptions,
    renderer: &mut Renderer,
    snap: &Arc<Snapshot>,
    due: &[usize],
    owed: &mut BTreeSet<usize>,
) -> Vec<Outcome> {
    let dry_run = opts.dry_run;
    // Built once per snapshot (updated where it changed) and shared by every template.
    renderer.update_data(snap.clone(), &cfg.vars);
    opts.telemetry.route_warnings(&renderer.route_warnings());
    let mut rendered: BTreeMap<usize, Result<Rendered, Failure>> = BTreeMap::new();
    off_the_runtime(|| {
        for &i in due {
            let start = std::time::Instant::now();
            let r = render_one(&cfg.templates[i], renderer, snap);
            opts.telemetry
                .rendered(&cfg.templates[i].dest, start.elapsed(), r.is_ok());
            rendered.insert(i, r);
        }
    });
    let mut units: BTreeMap<UnitKey, Vec<usize>> = BTreeMap::new();
    let members = due
        .iter()
        .copied()
        .chain(owed.iter().copied().filter(|_| !dry_run))
        .collect::<BTreeSet<usize>>();
    for i in members {
        let key = match &cfg.templates[i].reload {
            Some(r) => UnitKey::Reload(r.clone()),
            None => UnitKey::Alone(i),
        };
        units.entry(key).or_default().push(i);
    }
    let runs = units.into_iter().map(|(key, idxs)| {
        let items: Vec<UnitItem> = idxs
            .into_iter()
            .map(|i| UnitItem {
                idx: i,
                render: rendered.remove(&i),
                owed: owed.contains(&i),
            })
            .collect();
        run_unit(cfg, opts, key, items)
    });
    let results = futures_util::future::join_all(runs).await;
    let mut outcomes = vec![Outcome::Unchanged; cfg.templates.len()];
    for r in results {
        for (i, o) in r.outcomes {
            outcomes[i] = o;
        }
        for i in r.settled {
            owed.remove(&i);
        }
        for i in r.owed_now {
            owed.insert(i);
        }
    }
    outcomes
}

/// One unit's pass: apply each rendered template, then run the unit's reload once if any of
/// its files changed (or is owed a reload), with rollback when it fails.
async fn run_unit(
    cfg: &Config,
    opts: &RunOptions,
    key: UnitKey,
    items: Vec<UnitItem>,
) -> UnitResult {
    let dry_run = opts.dry_run;
    let mut res = UnitResult::default();
    let mut reloading: Vec<Reloading> = Vec::new();
    let mut timeout = Duration::ZERO;
    for UnitItem {
        idx: i,
        render,
        owed: is_owed,
    } in items
    {
        let t = &cfg.templates[i];
        timeout = timeout.max(t.command_timeout);
        let applied = match render {
            None => Ok(Applied::Unchanged),
            Some(Err(reason)) => Err(reason),
            Some(Ok(Rendered::Unchanged)) => Ok(Applied::Unchanged),
            Some(Ok(Rendered::Changed { content, current })) => {
                apply_rendered(t, opts, content, current).await
            }
        };
        match applied {
            Ok(Applied::Swapped(previous)) => {
                res.outcomes.push((i, Outcome::Updated));
                res.settled.push(i);
                // The file replaced is worth putting back only if its proxy loaded it: one
                // still owed a reload never was (the proxy is not up yet, or not taking
                // reloads), and the newest checked file is what a starting proxy should read.
                let undo = match previous {
                    Some(p) if !is_owed => Undo::Restore(p),
                    _ => Undo::Keep,
                };
                reloading.push(Reloading { idx: i, undo });
                continue;
            }
            Ok(Applied::Unchanged) => {
                tracing::debug!(template = %label(t), "unchanged");
            }
            Ok(Applied::WouldChange) => res.outcomes.push((i, Outcome::WouldChange)),
            Ok(Applied::Live) => res.outcomes.push((i, Outcome::Live)),
            Err(reason) => {
                // Say what is really on disk: there may be no previous file.
                if t.dest.exists() {
                    tracing::error!(template = %label(t), reason = %reason, "template not applied; previous file kept");
                } else {
                    tracing::error!(template = %label(t), reason = %reason, "template not applied; no file written yet");
                }
                res.outcomes.push((i, Outcome::Failed(reason)));
            }
        }
        if is_owed && !dry_run {
            reloading.push(Reloading {
                idx: i,
                undo: Undo::Keep,
            });
        }
    }
    let UnitKey::Reload(cmd) = key else {
        return res;
    };
    if reloading.is_empty() {
        return res;
    }
    let names: Vec<String> = reloading
        .iter()
        .map(|r| label(&cfg.templates[r.idx]))
        .collect();
    before_reload(cfg, opts, &cmd, &reloading, timeout).await;
    let start = std::time::Instant::now();
    let result = reload(&cmd, &opts.supervisor, timeout).await;
    opts.telemetry.reloaded(
        reloading
            .iter()
            .map(|r| cfg.templates[r.idx].dest.as_path()),
        start.elapsed(),
        result.is_ok(),
    );
    match result {
        Ok(out) => {
            tracing::info!(
                reload = %cmd,
                templates = ?names,
                output = %out,
                reloads = RELOADS.fetch_add(1, Ordering::Relaxed) + 1,
                live_updates = LIVE_UPDATES.load(Ordering::Relaxed),
                "reloaded"
            );
            for r in &reloading {
                if matches!(r.undo, Undo::Keep) {
                    res.settled.push(r.idx);
                    res.outcomes.push((r.idx, Outcome::Updated));
                }
            }
            // A signal for an `--exec` proxy that has not started reloaded nothing: there is
            // no running proxy for the live channels to follow; it reads the files at start.
            let reloaded_nothing =
                matches!(cmd, CommandSpec::Signal(_)) && !opts.supervisor.running();
            if !reloaded_nothing {
                after_reload(cfg, &reloading).await;
            }
        }
        Err(e) => {
            let reason = Failure::Reload(e.to_string());
            let mut restored = false;
            for r in &reloading {
                let t = &cfg.templates[r.idx];
                res.outcomes
                    .push((r.idx, Outcome::ReloadFailed(reason.clone())));
                match &r.undo {
                    Undo::Restore(previous) => {
                        tracing::error!(
                            template = %label(t),
                            reason = %reason,
                            "reload failed; restoring the previous file"
                        );
                        if let Err(e) =
                            writer::restore(&t.dest, Some(previous), t.mode.map(|m| m.0))
                        {
                            tracing::error!(template = %label(t), error = %e, "cannot restore the previous file");
                        }
                        restored = true;
                    }
                    Undo::Keep => {
                        tracing::warn!(
                            template = %label(t),
                            reason = %reason,
                            "reload failed; keeping the new file, as its proxy has loaded no earlier one (is the proxy running yet?)"
                        );
                        res.owed_now.push(r.idx);
                    }
                }
            }
            if restored {
                before_reload(cfg, opts, &cmd, &reloading, timeout).await;
                match reload(&cmd, &opts.supervisor, timeout).await {
                    Ok(_) => {
                        tracing::info!(reload = %cmd, "reloaded with the previous files");
                        after_reload(cfg, &reloading).await;
                    }
                    Err(e) => {
                        tracing::error!(reload = %cmd, error = %e, "reload with the previous files failed too")
                    }
                }
            }
        }
    }
    res
}

/// Runs a unit's reload: its command, or its signal to the supervised proxy.
async fn reload(
    cmd: &CommandSpec,
    supervisor: &SupervisorHandle,
    timeout: Duration,
) -> Result<String, CommandError> {
    match cmd {
        CommandSpec::Signal(sig) => {
            supervisor
                .reload(*sig)
                .await
                .map_err(|reason| CommandError::Spawn {
                    cmd: cmd.to_string(),
                    reason,
                })
        }
        _ => command::run(cmd, None, timeout).await,
    }
}

/// Right before a unit's reload, the live channels of the templates it reloads ready their
/// proxy (see [`crate::live::LiveChannel::before_reload`]: so that the reload closes no idle
/// client connection a request is racing on), together, so the reload waits for the longest
/// of them only. Not for a signal to an `--exec` proxy that has not started: no proxy runs.
async fn before_reload(
    cfg: &Config,
    opts: &RunOptions,
    cmd: &CommandSpec,
    reloading: &[Reloading],
    timeout: Duration,
) {
    if matches!(cmd, CommandSpec::Signal(_)) && !opts.supervisor.running() {
        return;
    }
    let channels = reloading
        .iter()
        .filter_map(|r| cfg.templates[r.idx].live.as_ref())
        .map(|live| live.before_reload(timeout));
    futures_util::future::join_all(channels).await;
}

/// After a successful reload, each live channel learns the file its proxy just loaded: the one
/// on disk now (new, restored or owed alike).
async fn after_reload(cfg: &Config, reloading: &[Reloading]) {
    for r in reloading {
        let t = &cfg.templates[r.idx];
        let Some(live) = &t.live else { continue };
        match std::fs::read_to_string(&t.dest) {
            Ok(text) => live.after_reload(&text).await,
            Err(e) => tracing::warn!(
                template = %label(t),
                error = %e,
                "cannot read the reloaded file for its live channel"
            ),
        }
    }
}

enum Applied {
    Unchanged,
    WouldChange,
    /// Renamed into place; holds the previous content (`None`: there was no file).
    Swapped(Option<Vec<u8>>),
    /// Renamed into place and applied through the template's live channel: no reload.
    Live,
}

/// A template rendered against a snapshot.
enum Rendered {
    /// The destination already holds this content.
    Unchanged,
    /// New content, and what the destination holds now (`None`: no file yet).
    Changed {
        content: String,
        current: Option<Vec<u8>>,
    },
}

/// Runs `f`, the renders of a pass, on a thread of their own with a stack of
/// [`RENDER_STACK`](crate::render::RENDER_STACK), which the deepest render the bounds allow
/// fits (a runtime worker's 2 MiB does not). Meanwhile, on a multi-thread runtime, the
/// worker's other tasks (signals, the source's polls, `/metrics`) move to another thread, even
/// on one core, for as long as the renders take (up to `max_render_time` each). Should no
/// thread be available, `f` runs where it is, within the same bounds.
fn off_the_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let on_a_thread = || {
        let mut job = Some(f);
        let mut out = None;
        let spawned = std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("confd-render".into())
                .stack_size(crate::render::RENDER_STACK)
                .spawn_scoped(s, || out = job.take().map(|f| f()))
                .map(|h| h.join())
        });
        match (spawned, out) {
            (Ok(Ok(())), Some(out)) => out,
            (Ok(Err(panic)), _) => std::panic::resume_unwind(panic),
            (spawned, _) => {
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a render thread; rendering on the runtime's");
                }
                (job.take().expect("not run"))()
            }
        }
    };
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(on_a_thread),
        _ => on_a_thread(),
    }
}

/// Guard → read → render → compare for one template (no I/O but reading files). The error
/// is the reason, one line.
fn render_one(
    t: &TemplateConfig,
    renderer: &mut Renderer,
    snap: &Snapshot,
) -> Result<Rendered, Failure> {
    let total = snap.total_instances();
    if total < t.min_instances {
        return Err(Failure::TooFewInstances {
            have: total,
            min: t.min_instances,
        });
    }
    let source = std::fs::read_to_string(&t.src).map_err(|e| Failure::ReadTemplate {
        path: t.src.display().to_string(),
        reason: e.to_string(),
    })?;
    let name = t.src.display().to_string();
    let content = renderer.render_current(&name, &source, t.limits())?;
    let current = writer::read_current(&t.dest).map_err(|e| Failure::file("read", &t.dest, e))?;
    if !writer::changed(current.as_deref(), content.as_bytes()) {
        return Ok(Rendered::Unchanged);
    }
    Ok(Rendered::Changed { content, current })
}

/// Stage → check → swap (→ live update) for one rendered template, or print its diff in a dry
/// run. The error is the reason, one line, including the check command's output.
async fn apply_rendered(
    t: &TemplateConfig,
    opts: &RunOptions,
    content: String,
    current: Option<Vec<u8>>,
) -> Result<Applied, Failure> {
    if opts.dry_run {
        let d = writer::diff(&t.dest, current.as_deref(), content.as_bytes());
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(d.as_bytes());
        let _ = out.flush();
        return Ok(Applied::WouldChange);
    }
    let staged = writer::stage(&t.dest, content.as_bytes(), t.mode.map(|m| m.0))
        .map_err(|e| Failure::file("stage beside", &t.dest, e))?;
    if let Some(check) = &t.check {
        command::run(check, Some(staged.path()), t.command_timeout)
            .await
            .map_err(|e| {
                opts.telemetry.check_failed(&t.dest);
                Failure::Check(e.to_string())
            })?;
    }
    // Decided on the checked file before it is committed: membership-only changes skip the
    // reload. The file is committed either way, so the proxy's next start or reload agrees.
    let live = t.live.as_ref().and_then(|live| {
        let old = std::str::from_utf8(current.as_deref()?).ok()?;
        Some((live, live.plan(old, &content)?))
    });
    staged
        .commit()
        .map_err(|e| Failure::file("replace", &t.dest, e))?;
    if let Some((live, plan)) = live {
        match live.apply(plan).await {
            Ok(s) => {
                opts.telemetry.live(&t.dest, true);
                tracing::info!(
                    template = %label(t),
                    bytes = content.len(),
                    changed = ?s.changed,
                    pools = s.pools,
                    peers = s.peers,
                    reloads = RELOADS.load(Ordering::Relaxed),
                    live_updates = LIVE_UPDATES.fetch_add(1, Ordering::Relaxed) + 1,
                    "rendered and replaced; applied live, no reload: {s}"
                );
                return Ok(Applied::Live);
            }
            Err(e) => {
                opts.telemetry.live(&t.dest, false);
                tracing::warn!(template = %label(t), error = %e, "live update failed; reloading instead");
            }
        }
    }
    tracing::info!(template = %label(t), bytes = content.len(), "rendered and replaced");
    Ok(Applied::Swapped(current))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::inst;
    use std::path::Path;

    fn wait(min: u64, max: u64) -> Wait {
        Wait::new(Duration::from_millis(min), Some(Duration::from_millis(max))).unwrap()
    }

    #[test]
    fn quiescence_waits_for_quiet_but_not_past_max() {
        let w = wait(100, 300);
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut q = Quiescence::default();
        assert_eq!(q.due_at(w), None);
        q.change(t0);
        assert!(!q.is_due(w, ms(50)));
        assert!(q.is_due(w, ms(100)));
        // Changes every 80ms keep pushing min, until max from the first change.
        for n in [80, 160, 240] {
            q.change(ms(n));
        }
        assert!(!q.is_due(w, ms(299)));
        assert!(q.is_due(w, ms(300)));
        q.clear();
        assert_eq!(q.due_at(w), None);
        q.force();
        assert!(q.is_due(w, t0));
        q.clear();
        // Template edits settle briefly, each event pushing the render back.
        q.edit(t0);
        q.edit(ms(50));
        assert!(!q.is_due(w, ms(120)));
        assert!(q.is_due(w, ms(150)));
        q.clear();
        // A reload retry is due at its time, before a change's window ends.
        q.change(t0);
        q.retry(ms(30));
        assert!(!q.is_due(w, ms(20)));
        assert!(q.is_due(w, ms(30)));
        q.clear();
        assert_eq!(q.due_at(w), None);
    }

    fn cfg(_dir: &Path, templates: Vec<TemplateConfig>) -> Config {
        Config {
            backend: switchboard::RegistryUri::parse("consul://127.0.0.1:1").unwrap(),
            wait: Wait::default(),
            include_unhealthy: false,
            kv_prefixes: vec![],
            vars: Default::default(),
            templates,
            poll_wait: Duration::from_secs(1),
            max_long_polls: 64,
            ignore_services: vec![],
            once_timeout: Duration::from_secs(1),
            metrics_addr: None,
            store: Default::default(),
            exec: None,
            acme: None,
            https: None,
        }
    }

    fn tpl(dir: &Path, name: &str, body: &str, reload: Option<&str>) -> TemplateConfig {
        let src = dir.join(format!("{name}.hbs"));
        std::fs::write(&src, body).unwrap();
        let mut t =
            TemplateConfig::parse_flag(&format!("{}:{}", src.display(), dir.join(name).display()))
                .unwrap();
        t.reload = reload.map(|r| CommandSpec::Shell(r.into()));
        t
    }

    /// A daemon's run with a registry of its own and no supervisor.
    fn opts() -> RunOptions {
        RunOptions::default()
    }

    fn dry_run() -> RunOptions {
        RunOptions {
            dry_run: true,
            ..RunOptions::default()
        }
    }

    fn snap(n: usize) -> Arc<Snapshot> {
        Arc::new(Snapshot::build(
            (0..n).map(|i| inst("web", &format!("i{i}"), "10.0.0.1", 80 + i as u16)),
            Default::default(),
            &[],
        ))
    }

    #[tokio::test]
    async fn shared_reload_runs_once_and_unchanged_files_are_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("reloads");
        let reload = format!("echo x >> {}", log.display());
        let body = "{{#each service.web}}{{port}} {{/each}}";
        let c = cfg(
            d.path(),
            vec![
                tpl(d.path(), "a", body, Some(&reload)),
                tpl(d.path(), "b", body, Some(&reload)),
            ],
        );
        let mut r = Renderer::default();
        let o = pass(&c, &opts(), &mut r, &snap(2), &[0, 1], &mut BTreeSet::new()).await;
        assert_eq!(o, vec![Outcome::Updated, Outcome::Updated]);
        assert_eq!(
            std::fs::read_to_string(d.path().join("a")).unwrap(),
            "80 81 "
        );
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 1);
        let o = pass(&c, &opts(), &mut r, &snap(2), &[0, 1], &mut BTreeSet::new()).await;
        assert_eq!(o, vec![Outcome::Unchanged, Outcome::Unchanged]);
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 1);
    }

    /// Passes share one document per snapshot and render a template only when its inputs
    /// changed; the destination is still compared, so a file edited behind confd's back is
    /// put back even when the render itself was skipped.
    #[tokio::test]
    async fn unchanged_inputs_are_not_rendered_again() {
        let d = tempfile::tempdir().unwrap();
        let body = "{{#each service.web}}{{port}} {{/each}}";
        let c = cfg(
            d.path(),
            vec![
                tpl(d.path(), "a", body, None),
                tpl(d.path(), "b", body, None),
            ],
        );
        let mut r = Renderer::default();
        let o = pass(&c, &opts(), &mut r, &snap(2), &[0, 1], &mut BTreeSet::new()).await;
        assert_eq!(o, vec![Outcome::Updated, Outcome::Updated]);
        assert_eq!(r.renders(), 2);
        // An equal snapshot (another allocation): nothing rendered, nothing changed.
        let o = pass(&c, &opts(), &mut r, &snap(2), &[0, 1], &mut BTreeSet::new()).await;
        assert_eq!(o, vec![Outcome::Unchanged, Outcome::Unchanged]);
        assert_eq!(r.renders(), 2);
        // The file was edited by hand: put back from the kept output, still no render.
        std::fs::write(d.path().join("a"), "edited").unwrap();
        let o = pass(&c, &opts(), &mut r, &snap(2), &[0], &mut BTreeSet::new()).await;
        assert_eq!(o[0], Outcome::Updated);
        assert_eq!(
            std::fs::read_to_string(d.path().join("a")).unwrap(),
            "80 81 "
        );
        assert_eq!(r.renders(), 2);
        // A new snapshot: each due template rendered once.
        let o = pass(&c, &opts(), &mut r, &snap(3), &[0, 1], &mut BTreeSet::new()).await;
        assert_eq!(o, vec![Outcome::Updated, Outcome::Updated]);
        assert_eq!(r.renders(), 4);
        assert_eq!(
            std::fs::read_to_string(d.path().join("b")).unwrap(),
            "80 81 82 "
        );
    }

    /// The first render's reload fails (the proxy is not up yet): the new file stays, since
    /// there is nothing to put back, and its reload runs again at the next pass, changed or
    /// not, until it works. A change meanwhile replaces the file, never loaded, for good.
    #[tokio::test]
    async fn first_render_keeps_its_file_when_the_reload_fails() {
        let d = tempfile::tempdir().unwrap();
        let up = d.path().join("proxy-up");
        let log = d.path().join("reloads");
        let reload = format!(
            "test -e {up} || {{ echo not running >&2; exit 1; }}; echo x >> {log}",
            up = up.display(),
            log = log.display()
        );
        let c = cfg(
            d.path(),
            vec![tpl(
                d.path(),
                "a",
                "{{#each service.web}}{{port}} {{/each}}",
                Some(&reload),
            )],
        );
        let mut r = Renderer::default();
        let mut owed = BTreeSet::new();
        let o = pass(&c, &opts(), &mut r, &snap(1), &[0], &mut owed).await;
        assert!(
            matches!(&o[0], Outcome::ReloadFailed(m) if m.to_string().contains("not running")),
            "{o:?}"
        );
        assert_eq!(std::fs::read_to_string(d.path().join("a")).unwrap(), "80 ");
        assert_eq!(owed, BTreeSet::from([0]));
        // Still down: nothing changes, the reload is tried again and still owed.
        let o = pass(&c, &opts(), &mut r, &snap(1), &[0], &mut owed).await;
        assert!(matches!(&o[0], Outcome::ReloadFailed(_)), "{o:?}");
        assert!(!log.exists());
        // Still down, and the registry changes: the file owed a reload was never loaded, so
        // it is not put back; the newest file stays (what the proxy reads when it starts).
        let o = pass(&c, &opts(), &mut r, &snap(2), &[0], &mut owed).await;
        assert!(matches!(&o[0], Outcome::ReloadFailed(_)), "{o:?}");
        assert_eq!(
            std::fs::read_to_string(d.path().join("a")).unwrap(),
            "80 81 "
        );
        assert_eq!(owed, BTreeSet::from([0]));
        assert!(!log.exists());
        // The proxy is up: an unchanged file is reloaded, once, even when not due.
        std::fs::write(&up, "").unwrap();
        let o = pass(&c, &opts(), &mut r, &snap(2), &[], &mut owed).await;
        assert_eq!(o[0], Outcome::Updated);
        assert!(owed.is_empty());
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 1);
        let o = pass(&c, &opts(), &mut r, &snap(2), &[0], &mut owed).await;
        assert_eq!(o[0], Outcome::Unchanged);
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 1);
    }

    /// A slow check holds its own template only: an independent template's reload runs
    /// while the check is still going.
    #[tokio::test]
    async fn independent_templates_do_not_wait_for_each_other() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("order");
        let body = "{{#each service.web}}{{port}} {{/each}}";
        let mut slow = tpl(
            d.path(),
            "slow",
            body,
            Some(&format!("echo slow-reloaded >> {}", log.display())),
        );
        // The slow check finishes only once the fast template was reloaded (a bounded poll of
        // 30 s): run one after the other, the order in the log would be the slow one's first.
        slow.check = Some(CommandSpec::Shell(format!(
            "for i in $(seq 300); do grep -q fast-reloaded {log} 2>/dev/null && break; sleep 0.1; done; \
             echo slow-checked >> {log} # checks {{{{staged}}}}",
            log = log.display()
        )));
        let fast = tpl(
            d.path(),
            "fast",
            body,
            Some(&format!("echo fast-reloaded >> {}", log.display())),
        );
        let c = cfg(d.path(), vec![slow, fast]);
        let mut r = Renderer::default();
        let o = pass(&c, &opts(), &mut r, &snap(1), &[0, 1], &mut BTreeSet::new()).await;
        assert_eq!(o, vec![Outcome::Updated, Outcome::Updated]);
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "fast-reloaded\nslow-checked\nslow-reloaded\n"
        );
    }

    /// A pass records into the telemetry its run is handed, and sends a reload that is a
    /// signal through the run's supervisor handle: without a supervisor, nothing is sent and
    /// nothing failed (the proxy reads the file when it starts).
    #[tokio::test]
    async fn a_pass_reports_to_the_handles_of_its_run() {
        let d = tempfile::tempdir().unwrap();
        let mut t = tpl(
            d.path(),
            "a",
            "{{#each service.web}}{{port}} {{/each}}",
            None,
        );
        t.reload = Some(CommandSpec::Signal(crate::signal::Signal::HUP));
        let c = cfg(d.path(), vec![t]);
        let run = opts();
        let mut r = Renderer::default();
        let o = pass(&c, &run, &mut r, &snap(1), &[0], &mut BTreeSet::new()).await;
        assert_eq!(o, vec![Outcome::Updated]);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, run.telemetry.registry()).unwrap();
        let dest = d.path().join("a").display().to_string();
        for metric in ["confd_renders_total", "confd_reloads_total"] {
            let line = format!("{metric}{{template=\"{dest}\"}} 1");
            assert!(text.contains(&line), "no {line:?} in:\n{text}");
        }
    }

    #[tokio::test]
    async fn failures_keep_the_previous_file() {
        let d = tempfile::tempdir().unwrap();
        let mut ok = tpl(
            d.path(),
            "a",
            "{{#each service.web}}{{port}} {{/each}}",
            None,
        );
        let c = cfg(d.path(), vec![ok.clone()]);
        let mut r = Renderer::default();
        pass(&c, &opts(), &mut r, &snap(1), &[0], &mut BTreeSet::new()).await;
        let dest = d.path().join("a");
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "80 ");

        // Failing check.
        ok.check = Some(CommandSpec::Shell("echo nope >&2; false".into()));
        let c = cfg(d.path(), vec![ok.clone()]);
        let o = pass(&c, &opts(), &mut r, &snap(2), &[0], &mut BTreeSet::new()).await;
        assert!(
            matches!(&o[0], Outcome::Failed(Failure::Check(m)) if m.contains("nope")),
            "{o:?}"
        );
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "80 ");

        // Failing reload: file restored.
        ok.check = None;
        ok.reload = Some(CommandSpec::Shell("false".into()));
        let c = cfg(d.path(), vec![ok.clone()]);
        let o = pass(&c, &opts(), &mut r, &snap(2), &[0], &mut BTreeSet::new()).await;
        assert!(
            matches!(&o[0], Outcome::ReloadFailed(m) if m.to_string().contains("reload failed")),
            "{o:?}"
        );
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "80 ");

        // Render error names the key.
        std::fs::write(&ok.src, "{{servce.web}}").unwrap();
        ok.reload = None;
        let c = cfg(d.path(), vec![ok.clone()]);
        let o = pass(&c, &opts(), &mut r, &snap(2), &[0], &mut BTreeSet::new()).await;
        assert!(
            matches!(&o[0], Outcome::Failed(m) if m.to_string().contains("servce")),
            "{o:?}"
        );

        // Outage guard.
        std::fs::write(&ok.src, "{{#each service.web}}{{port}} {{/each}}").unwrap();
        ok.min_instances = 3;
        let c = cfg(d.path(), vec![ok.clone()]);
        let o = pass(&c, &opts(), &mut r, &snap(2), &[0], &mut BTreeSet::new()).await;
        assert!(
            matches!(&o[0], Outcome::Failed(m) if m.to_string().contains("min_instances")),
            "{o:?}"
        );
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "80 ");

        // Dry run writes nothing.
        ok.min_instances = 0;
        let c = cfg(d.path(), vec![ok]);
        let o = pass(&c, &dry_run(), &mut r, &snap(2), &[0], &mut BTreeSet::new()).await;
        assert_eq!(o[0], Outcome::WouldChange);
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "80 ");
    }
}
