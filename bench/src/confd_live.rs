//! confd daemon suite: the real `confd` binary against a real Consul dev agent or etcd member.
//!
//! Every run starts a fresh store and a fresh daemon whose count template writes one header
//! line plus one line per instance; its reload command (a shell script) appends
//! `<date +%s%N> <instances in the rendered file>` to a log. That line is the evidence that a
//! change went all the way through (source -> quiescence -> render -> swap -> reload) and its
//! timestamp is when the reload ran. Registrations go through `switchboard::Store`, the same
//! client registrator uses.
//!
//! - latency: register instances one at a time, each time waiting (bounded) for the reload
//!   that shows it; store write start -> reload timestamp.
//! - burst: register many instances as fast as possible; count snapshots, renders and reloads
//!   and time until the final config holds them all.
//! - RSS: register N instances with the shipped nginx and HAProxy templates rendered as well;
//!   peak RSS (VmHWM) of the daemon.

use crate::common::{
    cpu_time, mib, ms, now_ns, peak_rss_kib, release_bin, rss_kib, Backend, Summary,
};
use crate::{workload, Which};
use std::path::PathBuf;
use std::time::Duration;
use switchboard::store::Store;
use switchboard_tests::{poll, Process};

/// The minimum quiescence window confd accepts (`min: 0s`, `max: 0s`): render on every
/// snapshot. `None` below means confd's default window.
const NO_WAIT: &str = "0s:0s";
/// confd's default window, as printed in tables (`Wait::default()`).
const DEFAULT_WAIT: &str = "200ms:2s (default)";
/// Concurrent writers when registering as fast as possible.
const WRITERS: usize = 16;
/// Above this many instances a Consul agent registration run is skipped (see [`run`]).
const CONSUL_MAX: usize = 1_000;

const COUNT_TEMPLATE: &str = "# confd bench\n{{#each services}}\n{{#each instances}}\n{{id}} {{address}}:{{port}}\n{{/each}}\n{{/each}}\n";

/// A running confd with its config, templates and reload log in a temp dir.
struct Daemon {
    proc: Process,
    reload_log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts confd on `uri` with window `wait` (`None`: the default) rendering the count
    /// template, plus the shipped nginx and HAProxy templates when `proxies` is set.
    fn start(uri: &str, wait: Option<&str>, proxies: bool) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        std::fs::write(dir.path().join("count.hbs"), COUNT_TEMPLATE).unwrap();
        let reload_log = dir.path().join("reloads.log");
        std::fs::write(
            dir.path().join("reload.sh"),
            format!(
                "echo \"$(date +%s%N) $(( $(wc -l < {d}/count.out) - 1 ))\" >> {}\n",
                reload_log.display()
            ),
        )
        .unwrap();
        let wait_line = match wait.and_then(|w| w.split_once(':')) {
            Some((min, max)) => format!("wait: {{ min: {min}, max: {max} }}"),
            None => String::new(),
        };
        let mut cfg = format!(
            "backend: {uri}\npoll_wait: 30s\n{wait_line}\ntemplates:\n  \
             - src: {d}/count.hbs\n    dest: {d}/count.out\n    reload: \"sh {d}/reload.sh\"\n"
        );
        if proxies {
            let tpl = switchboard_tests::workspace_root().join("templates");
            for (src, dest) in [
                ("nginx.conf.hbs", "nginx.conf"),
                ("haproxy.cfg.hbs", "haproxy.cfg"),
            ] {
                cfg.push_str(&format!(
                    "  - src: {}\n    dest: {d}/{dest}\n",
                    tpl.join(src).display()
                ));
            }
        }
        let cfg_path = dir.path().join("confd.yaml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let proc = Process::spawn(
            &release_bin("confd"),
            &["--config", cfg_path.to_str().unwrap()],
            // The debug line of `switchboard::memory` (confd re-exports it as `confd::memory`): the
            // heap after each pass (see `Daemon::heap`). Its log target is where it is defined.
            &[("RUST_LOG", "info,switchboard::memory=debug")],
        );
        Daemon {
            proc,
            reload_log,
            _dir: dir,
        }
    }

    /// Every reload so far: (ns since epoch, instances in the file it reloaded).
    fn reloads(&self) -> Vec<(u128, usize)> {
        std::fs::read_to_string(&self.reload_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (ts, n) = l.split_once(' ')?;
                Some((ts.parse().ok()?, n.trim().parse().ok()?))
            })
            .collect()
    }

    /// Waits up to `timeout` for a reload after the first `after` reloads whose file held
    /// exactly `n` instances; panics with confd's output when none comes.
    async fn expect_reload_exactly(&self, after: usize, n: usize, timeout: Duration) {
        let seen = poll(timeout, Duration::from_millis(5), || async {
            self.reloads()
                .into_iter()
                .skip(after)
                .any(|(_, c)| c == n)
                .then_some(())
        })
        .await;
        if seen.is_none() {
            panic!(
                "no reload with exactly {n} instances within {timeout:?}; confd output:\n{}",
                tail(&self.proc.output(), 30)
            );
        }
    }

    /// Timestamp of the first reload whose file held at least `n` instances, waiting up to
    /// `timeout` for it.
    async fn reload_with(&self, n: usize, timeout: Duration) -> Option<u128> {
        poll(timeout, Duration::from_millis(2), || async {
            self.reloads()
                .into_iter()
                .find(|&(_, c)| c >= n)
                .map(|(ts, _)| ts)
        })
        .await
    }

    /// Like [`Daemon::reload_with`], panicking with confd's output when nothing comes.
    async fn expect_reload_with(&self, n: usize, timeout: Duration) -> u128 {
        match self.reload_with(n, timeout).await {
            Some(ts) => ts,
            None => panic!(
                "no reload with {n} instances within {timeout:?}; confd output:\n{}",
                tail(&self.proc.output(), 30)
            ),
        }
    }

    /// Log lines of confd containing `needle` (renders: "rendered and replaced").
    fn log_count(&self, needle: &str) -> usize {
        self.proc
            .output()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The heap as confd logged it after its last pass: (in use, held free, mapped) in KiB.
    fn heap(&self) -> Option<(u64, u64, u64)> {
        let out = self.proc.output();
        let line = out.lines().rev().find(|l| l.contains("heap after pass"))?;
        let field = |name: &str| -> Option<u64> {
            let rest = &line[line.find(name)? + name.len()..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        Some((
            field("in_use_kib=")?,
            field("free_kib=")?,
            field("mapped_kib=")?,
        ))
    }

    /// Counters at this moment, to take differences over a phase.
    fn counters(&self) -> Counters {
        Counters {
            snapshots: self.log_count("snapshot updated"),
            renders: self.log_count("rendered and replaced"),
            reloads: self.reloads().len(),
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Published snapshots, renders (files replaced) and reloads.
#[derive(Debug, Clone, Copy)]
struct Counters {
    snapshots: usize,
    renders: usize,
    reloads: usize,
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, o: Counters) -> Counters {
        Counters {
            snapshots: self.snapshots - o.snapshots,
            renders: self.renders - o.renders,
            reloads: self.reloads - o.reloads,
        }
    }
}

/// Registers instances `0..n` of an `n`-instance workload with `WRITERS` concurrent writers.
async fn register_all(store: &Store, n: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WRITERS.min(n.max(1)) {
        let store = store.clone();
        tasks.spawn(async move {
            for i in (w..n).step_by(WRITERS) {
                let svc = workload::service(i, n);
                store
                    .register(&svc)
                    .await
                    .unwrap_or_else(|e| panic!("register {}: {e}", svc.id));
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("writer task");
    }
}

struct LatencyRow {
    store: &'static str,
    window: &'static str,
    lat: Summary,
    missed: usize,
    c: Counters,
    rss_kib: u64,
}

/// One instance at a time: store write start -> the reload that shows it.
async fn latency(which: Which, wait: Option<&'static str>, samples: usize) -> LatencyRow {
    let b = Backend::start(which).await;
    let d = Daemon::start(&b.uri, wait, false);
    d.expect_reload_with(0, Duration::from_secs(30)).await;
    let before = d.counters();
    let mut lat = Vec::new();
    let mut missed = 0;
    for i in 0..samples {
        // `samples` instances over `samples / 10` services: mostly a new instance of a known
        // service, sometimes a new service.
        let svc = workload::service(i, samples);
        let t0 = now_ns();
        b.store.register(&svc).await.expect("register");
        match d.reload_with(i + 1, Duration::from_secs(10)).await {
            Some(ts) => lat.push(Duration::from_nanos(ts.saturating_sub(t0) as u64)),
            None => missed += 1,
        }
    }
    LatencyRow {
        store: which.name(),
        window: wait.unwrap_or(DEFAULT_WAIT),
        lat: Summary::of(lat),
        missed,
        c: d.counters() - before,
        rss_kib: peak_rss_kib(d.proc.pid()),
    }
}

struct BurstRow {
    store: &'static str,
    window: &'static str,
    n: usize,
    registered: Duration,
    complete: Duration,
    c: Counters,
    rss_kib: u64,
}

/// `n` instances as fast as possible: how many passes confd made and when it had them all.
async fn burst(which: Which, wait: Option<&'static str>, n: usize) -> BurstRow {
    let b = Backend::start(which).await;
    let d = Daemon::start(&b.uri, wait, false);
    d.expect_reload_with(0, Duration::from_secs(30)).await;
    let before = d.counters();
    let t0 = now_ns();
    register_all(&b.store, n).await;
    let registered = now_ns() - t0;
    let done = d.expect_reload_with(n, Duration::from_secs(120)).await;
    BurstRow {
        store: which.name(),
        window: wait.unwrap_or(DEFAULT_WAIT),
        n,
        registered: Duration::from_nanos(registered as u64),
        complete: Duration::from_nanos(done.saturating_sub(t0) as u64),
        c: d.counters() - before,
        rss_kib: peak_rss_kib(d.proc.pid()),
    }
}

struct RssRow {
    store: &'static str,
    n: usize,
    registered: Duration,
    /// `None`: the config did not hold all `n` within [`rss_timeout`].
    complete: Option<Duration>,
    /// Instances in the last reloaded config when the run ended.
    in_config: usize,
    c: Counters,
    cpu: Duration,
    rss_kib: u64,
    /// Resident set once the config held all `n` (the pass done): what holding them costs.
    settled_kib: u64,
    /// The heap after confd's last pass (in use, held free, mapped; KiB): `None` when confd
    /// logged none.
    heap: Option<(u64, u64, u64)>,
}

/// `n` instances registered, nginx + HAProxy + count templates rendered: the daemon's peak.
async fn rss(which: Which, n: usize) -> RssRow {
    let b = Backend::start(which).await;
    let d = Daemon::start(&b.uri, None, true);
    d.expect_reload_with(0, Duration::from_secs(30)).await;
    let before = d.counters();
    let t0 = now_ns();
    register_all(&b.store, n).await;
    let registered = now_ns() - t0;
    let done = d.reload_with(n, rss_timeout(n)).await;
    let in_config = d.reloads().iter().map(|&(_, c)| c).max().unwrap_or(0);
    RssRow {
        store: which.name(),
        n,
        registered: Duration::from_nanos(registered as u64),
        complete: done.map(|ts| Duration::from_nanos(ts.saturating_sub(t0) as u64)),
        in_config,
        c: d.counters() - before,
        cpu: cpu_time(d.proc.pid()),
        rss_kib: peak_rss_kib(d.proc.pid()),
        settled_kib: rss_kib(d.proc.pid()),
        heap: d.heap(),
    }
}

/// Idle and churn: the daemon's resident set with a few instances, then over rounds that each
/// register [`CHURN_BATCH`] new instances and remove them again.
struct ChurnRow {
    store: &'static str,
    idle_kib: u64,
    /// Resident set after each round (back to the idle instances).
    after_round: Vec<u64>,
    peak_kib: u64,
}

/// Instances present throughout a churn run, and those added and removed per round.
const CHURN_BASE: usize = 10;
const CHURN_BATCH: usize = 200;
const CHURN_ROUNDS: usize = 20;

async fn churn(which: Which) -> ChurnRow {
    let b = Backend::start(which).await;
    let d = Daemon::start(&b.uri, None, true);
    d.expect_reload_with(0, Duration::from_secs(30)).await;
    register_all(&b.store, CHURN_BASE).await;
    d.expect_reload_with(CHURN_BASE, Duration::from_secs(30))
        .await;
    let idle_kib = rss_kib(d.proc.pid());
    let mut after_round = Vec::new();
    for round in 0..CHURN_ROUNDS {
        // New IDs every round (another workload's instances), so nothing is reused.
        let batch: Vec<_> = (0..CHURN_BATCH)
            .map(|i| {
                let mut s = workload::service(i, CHURN_BATCH);
                s.id = format!("churn{round}-{}", s.id);
                s
            })
            .collect();
        let mark = d.reloads().len();
        for s in &batch {
            b.store.register(s).await.expect("register");
        }
        d.expect_reload_exactly(mark, CHURN_BASE + CHURN_BATCH, Duration::from_secs(30))
            .await;
        let mark = d.reloads().len();
        for s in &batch {
            b.store.deregister(s).await.expect("deregister");
        }
        d.expect_reload_exactly(mark, CHURN_BASE, Duration::from_secs(30))
            .await;
        after_round.push(rss_kib(d.proc.pid()));
    }
    ChurnRow {
        store: which.name(),
        idle_kib,
        after_round,
        peak_kib: peak_rss_kib(d.proc.pid()),
    }
}

/// How long an RSS run waits for the config to hold all `n` instances. Bounded so one slow
/// convergence is reported (with how far it got) instead of stalling the whole benchmark.
fn rss_timeout(n: usize) -> Duration {
    Duration::from_secs(60) + Duration::from_millis(25) * n as u32
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

/// Runs latency, burst and RSS for each store, printing each table as soon as it is complete
/// (a later section failing does not lose an earlier one).
pub async fn run(stores: &[Which], samples: usize, burst_n: usize, rss_counts: &[usize]) {
    let windows = [Some(NO_WAIT), None];

    let mut rows = Vec::new();
    for &which in stores {
        for w in windows {
            eprintln!(
                "confd latency: {} window {}",
                which.name(),
                w.unwrap_or(DEFAULT_WAIT)
            );
            rows.push(latency(which, w, samples).await);
        }
    }
    println!("\n### confd: store write -> reload command ran (one instance at a time)\n");
    println!("| store  | window (min:max)   | samples | missed | median ms | p99 ms | max ms | snapshots | renders | reloads | confd peak RSS MiB |");
    println!("|--------|--------------------|--------:|-------:|----------:|-------:|-------:|----------:|--------:|--------:|-------------------:|");
    for r in &rows {
        println!(
            "| {:<6} | {:<18} | {:>7} | {:>6} | {:>9} | {:>6} | {:>6} | {:>9} | {:>7} | {:>7} | {:>18} |",
            r.store,
            r.window,
            r.lat.n,
            r.missed,
            ms(r.lat.median),
            ms(r.lat.p99),
            ms(r.lat.max),
            r.c.snapshots,
            r.c.renders,
            r.c.reloads,
            mib(r.rss_kib)
        );
    }
    println!(
        "\nFrom just before the store write (HTTP PUT) to the `date +%s%N` in the reload command; \
         bounded wait 10 s per sample (\"missed\" counts samples that did not arrive). \
         Sample i registers instance i of {samples} spread over {} services; only the count \
         template is rendered.",
        workload::services_for(samples)
    );

    let mut rows = Vec::new();
    for &which in stores {
        for w in windows {
            eprintln!(
                "confd burst: {} window {}",
                which.name(),
                w.unwrap_or(DEFAULT_WAIT)
            );
            rows.push(burst(which, w, burst_n).await);
        }
    }
    println!("\n### confd: burst of {burst_n} registrations ({WRITERS} concurrent writers)\n");
    println!("| store  | window (min:max)   | instances | all written s | config complete s | snapshots | renders | reloads | confd peak RSS MiB |");
    println!("|--------|--------------------|----------:|--------------:|------------------:|----------:|--------:|--------:|-------------------:|");
    for r in &rows {
        println!(
            "| {:<6} | {:<18} | {:>9} | {:>13} | {:>17} | {:>9} | {:>7} | {:>7} | {:>18} |",
            r.store,
            r.window,
            r.n,
            secs(r.registered),
            secs(r.complete),
            r.c.snapshots,
            r.c.renders,
            r.c.reloads,
            mib(r.rss_kib)
        );
    }
    println!(
        "\nTimes from the first write; \"config complete\" is the reload whose file holds all \
         {burst_n}. Snapshots and renders are counted from confd's log (\"snapshot updated\", \
         \"rendered and replaced\"), reloads from the lines the reload command appended."
    );

    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    for &which in stores {
        for &n in rss_counts {
            // Consul agent registrations are one HTTP call each with anti-entropy behind
            // them; 10,000 of them take minutes on this machine, so large counts use etcd.
            if which == Which::Consul && n > CONSUL_MAX {
                skipped.push(n);
                continue;
            }
            eprintln!("confd RSS: {} {n} instances", which.name());
            rows.push(rss(which, n).await);
        }
    }
    println!("\n### confd: peak RSS with nginx + HAProxy + count templates (default window)\n");
    println!("| store  | instances | services | all written s | config complete s | in config at end | snapshots | renders | confd CPU s | confd peak RSS MiB | RSS at end MiB |");
    println!("|--------|----------:|---------:|--------------:|------------------:|-----------------:|----------:|--------:|------------:|-------------------:|---------------:|");
    for r in &rows {
        println!(
            "| {:<6} | {:>9} | {:>8} | {:>13} | {:>17} | {:>16} | {:>9} | {:>7} | {:>11} | {:>18} | {:>14} |",
            r.store,
            r.n,
            workload::services_for(r.n),
            secs(r.registered),
            r.complete.map_or_else(
                || format!("> {:.0} (timeout)", rss_timeout(r.n).as_secs_f64()),
                secs
            ),
            r.in_config,
            r.c.snapshots,
            r.c.renders,
            secs(r.cpu),
            mib(r.rss_kib),
            mib(r.settled_kib)
        );
    }
    println!(
        "\nRenders count files replaced (3 templates per pass). CPU is the daemon's user + system \
         time over its whole life. The wait for a complete config is bounded ({}s + 25 ms per \
         instance); a run that hits it reports how many instances the last reloaded config held.",
        60
    );
    if !skipped.is_empty() {
        println!(
            "\nNot run against Consul agent services: {skipped:?} instances (more than \
             {CONSUL_MAX} agent registrations take minutes); the etcd rows cover them."
        );
    }
    println!(
        "\nWhere the resident set at the end goes: the heap as confd's allocator accounts it \
         after its last pass. In use: live blocks with the allocator's per-block overhead \
         (`bench --suite confd-render` breaks it down by structure); mapped: large blocks \
         mapped on their own. Free: freed blocks the heap keeps (fragmentation), resident only \
         where touched and not trimmed, so it may exceed what the RSS shows. Beyond the live \
         heap: RSS minus in use and mapped, i.e. the binary, libraries and thread stacks (the \
         10-instance row) plus the free blocks still resident.\n"
    );
    println!("| store  | instances | RSS at end MiB | heap in use MiB | mapped MiB | heap free MiB | RSS beyond the live heap MiB |");
    println!("|--------|----------:|---------------:|----------------:|-----------:|--------------:|-----------------------------:|");
    for r in &rows {
        let Some((used, free, mapped)) = r.heap else {
            continue;
        };
        println!(
            "| {:<6} | {:>9} | {:>14} | {:>15} | {:>10} | {:>13} | {:>28} |",
            r.store,
            r.n,
            mib(r.settled_kib),
            mib(used),
            mib(mapped),
            mib(free),
            mib(r.settled_kib.saturating_sub(used + mapped))
        );
    }
    let small = rows.iter().find(|r| r.n <= CHURN_BASE);
    for r in rows.iter().filter(|r| r.n == 10_000) {
        let per = small.map_or(String::new(), |s| {
            let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / r.n as f64;
            format!(
                "; per instance over the 10-instance run: {:.1} KiB at the peak, {:.1} KiB held \
                 once the config is complete",
                per(r.rss_kib, s.rss_kib),
                per(r.settled_kib, s.settled_kib)
            )
        });
        println!(
            "\nGoal, confd peak RSS with 10,000 {} instances under 48 MiB: {} MiB, \
             {}{per}.",
            r.store,
            mib(r.rss_kib),
            crate::confd_render::met(r.rss_kib < 48 * 1024)
        );
    }

    let mut rows = Vec::new();
    for &which in stores {
        eprintln!("confd idle and churn: {}", which.name());
        rows.push(churn(which).await);
    }
    println!(
        "\n### confd: idle RSS and churn ({CHURN_BASE} instances, then {CHURN_ROUNDS} rounds of \
         {CHURN_BATCH} added and removed)\n"
    );
    println!("| store  | idle RSS MiB | after round 1 MiB | after round {CHURN_ROUNDS} MiB | growth rounds 1..{CHURN_ROUNDS} MiB | peak RSS MiB |");
    println!("|--------|-------------:|------------------:|-------------------:|----------------------:|-------------:|");
    for r in &rows {
        let first = r.after_round.first().copied().unwrap_or(0);
        let last = r.after_round.last().copied().unwrap_or(0);
        println!(
            "| {:<6} | {:>12} | {:>17} | {:>18} | {:>21} | {:>12} |",
            r.store,
            mib(r.idle_kib),
            mib(first),
            mib(last),
            format!("{:+.1}", (last as f64 - first as f64) / 1024.0),
            mib(r.peak_kib)
        );
    }
    println!(
        "\nResident set (VmRSS) read once the reload showing each state ran; nginx, HAProxy and \
         count templates rendered, default window."
    );
    for r in &rows {
        let each: Vec<String> = r.after_round.iter().map(|&k| mib(k)).collect();
        println!("\n{} after each round (MiB): {}", r.store, each.join(" "));
    }
    for r in &rows {
        println!(
            "\nGoal, {}: confd idle RSS under 10 MiB: {} MiB, {}; no growth over \
             churn: round 1 {} MiB, round {CHURN_ROUNDS} {} MiB.",
            r.store,
            mib(r.idle_kib),
            crate::confd_render::met(r.idle_kib < 10 * 1024),
            mib(r.after_round.first().copied().unwrap_or(0)),
            mib(r.after_round.last().copied().unwrap_or(0)),
        );
    }
}
