//! Drain suite: what a stop, a scale event and a stream of membership changes cost on a real
//! load balancer.
//!
//! Every run starts a fresh store, and (except the churn runs) the release `registrator` on the
//! local Docker engine and containers of the test image that serve HTTP and, like real servers,
//! keep serving for 0.5 s after SIGTERM; then a load balancer ([`crate::lb`]): confd with the
//! reference stack's settings (quiescence 200ms:2s, the proxy's check on every render) in
//! front of a real HAProxy or nginx.
//!
//! - stop -> out: `docker stop` of N containers, one after the other. From the engine's `kill`
//!   event (`docker events`, the same wall clock as the daemons' log lines) to registrator's
//!   `deregistered` line, to confd's `applied live` (or `reloaded`) line for the change, and,
//!   with HAProxy, to the first `show servers state` on the admin socket (polled every 2 ms)
//!   that shows the server drained or gone. nginx's peers endpoint answers once the new table
//!   is stored, and the next request's balancer reads it, so there confd's line is the moment.
//! - reloads per scale event: scale 1 -> 3 -> 1 (two containers started together, then stopped
//!   together), repeated; reloads and live updates from confd's running totals, with the live
//!   channel and without it (every change a check and a reload).
//! - churn (HAProxy, live, quiescence 0s:0s): instances registered and deregistered straight in
//!   the store, one at a time (each waiting for confd's `applied live` line) for a bounded
//!   time, then a burst written by 16 concurrent writers; changes per second, live updates and
//!   reloads (the goal is none).
//!
//! Other containers on the engine that set `SERVICE_NAME` and publish a port (another test
//! run) reach the store too and cost passes and reloads of their own: a run whose confd saw
//! more services than its own is measured again (up to three runs), and a row still perturbed
//! is marked.

use crate::common::{docker_async, ms, now_ns, Backend, DockerEvents, Summary};
use crate::lb::{lists, Counters, Lb, Proxy, Settings};
use crate::Which;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};
use switchboard::{Service, Store};
use switchboard_tests::{poll, unique_name, Container, Process, TEST_IMAGE, TEST_LABEL};

/// Bound on each wait for one change to show.
const WAIT: Duration = Duration::from_secs(15);
/// The reference stacks' quiescence window.
const STACK_WAIT: (&str, &str) = ("200ms", "2s");
/// No quiescence: a pass per snapshot.
const NO_WAIT: (&str, &str) = ("0s", "0s");
/// Concurrent writers in a churn burst.
const WRITERS: usize = 16;
/// Instances the churn runs start with (and keep).
const CHURN_BASE: usize = 10;
/// How long a stopping container keeps serving after SIGTERM (its stop grace).
const GRACE: &str = "0.5";

/// What to run, from the command line.
pub struct Opts {
    /// Containers stopped per store and proxy.
    pub stops: usize,
    /// Scale 1 -> 3 -> 1 cycles per store, proxy and channel.
    pub cycles: usize,
    /// How long the one-at-a-time churn runs.
    pub churn: Duration,
    /// Instances in a churn burst (each registered, then deregistered).
    pub burst: usize,
    /// The proxies to measure.
    pub proxies: Vec<Proxy>,
}

/// The container's command: busybox httpd answering with the hostname; on SIGTERM the shell
/// serves on for [`GRACE`], then stops httpd and exits 0, as a graceful server does.
fn web_command() -> String {
    format!(
        "hostname > /www/index.html; httpd -f -p 80 -h /www & h=$!; \
         trap \"sleep {GRACE}; kill $h; exit 0\" TERM; wait"
    )
}

/// One web container, removed on drop.
struct Web {
    c: Container,
    port: u16,
}

impl Web {
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn socket(&self) -> (IpAddr, u16) {
        (IpAddr::V4(Ipv4Addr::LOCALHOST), self.port)
    }
}

/// A Docker host as registrator sees it: the release registrator on one store (only
/// containers that name their service, `-explicit`), the run's `kill` events, and the web
/// containers it starts.
struct Host {
    run: String,
    hostname: String,
    service: String,
    registrator: Process,
    kills: DockerEvents,
}

impl Host {
    fn start(uri: &str) -> Host {
        let run = format!("drain-{}-{}", std::process::id(), now_ns() % 1_000_000_000);
        // Alphanumeric, so the HAProxy backend is `svc_<service>` exactly.
        let service = format!("benchweb{}", now_ns() % 1_000_000_000);
        let hostname = format!("benchhost{}", std::process::id());
        let registrator = Process::spawn(
            &crate::common::release_bin("registrator"),
            &["-explicit", "-ip", "127.0.0.1", "-hostname", &hostname, uri],
            &[("RUST_LOG", "info")],
        );
        let kills = DockerEvents::watch(&run, "kill");
        Host {
            run,
            hostname,
            service,
            registrator,
            kills,
        }
    }

    async fn web(&self) -> Web {
        let name = unique_name("drain");
        let id = docker_async(&[
            "run",
            "-d",
            "--name",
            &name,
            "--label",
            TEST_LABEL,
            "--label",
            &format!("switchboard.bench={}", self.run),
            "-e",
            &format!("SERVICE_NAME={}", self.service),
            "-p",
            "127.0.0.1::80",
            TEST_IMAGE,
            "sh",
            "-c",
            &web_command(),
        ])
        .await;
        let c = Container { id, name };
        let out = docker_async(&["port", &c.id, "80/tcp"]).await;
        let port = out
            .lines()
            .next()
            .and_then(|l| l.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no published port for {}: {out:?}", c.name));
        Web { c, port }
    }

    /// `n` web containers, started four at a time.
    async fn webs(&self, n: usize) -> Vec<Web> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let k = (n - out.len()).min(4);
            let batch = futures_join(k, || self.web()).await;
            out.extend(batch);
        }
        out
    }

    /// When registrator logged the withdrawal of `web`'s service.
    fn deregistered_at(&self, web: &Web) -> Option<u128> {
        let needle = format!("deregistered {}:{}:80 ", self.hostname, web.c.name);
        self.registrator
            .output()
            .lines()
            .find(|l| l.contains(&needle))
            .and_then(crate::common::log_ts_ns)
    }
}

/// Runs `k` futures made by `f` concurrently on this task and returns their outputs.
async fn futures_join<T, F, Fut>(k: usize, f: F) -> Vec<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = T>,
{
    let mut futs: Vec<_> = (0..k).map(|_| Box::pin(f())).collect();
    let mut out: Vec<Option<T>> = (0..k).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, fut) in out.iter_mut().zip(futs.iter_mut()) {
            if slot.is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

/// `docker stop` of several containers at once (each keeps serving through its grace).
async fn stop_all(webs: &[&Web]) {
    let ids: Vec<&str> = webs.iter().map(|w| w.c.id.as_str()).collect();
    let mut args = vec!["stop", "-t", "10"];
    args.extend(ids);
    docker_async(&args).await;
}

// ---------------------------------------------------------------------------------------
// Stop signal -> out of the proxy
// ---------------------------------------------------------------------------------------

struct StopRow {
    store: &'static str,
    proxy: Proxy,
    stops: usize,
    /// Samples missing a timestamp (event, log line or proxy state not seen in time).
    missed: usize,
    dereg: Summary,
    applied: Summary,
    /// HAProxy only.
    out: Option<Summary>,
    c: Counters,
    foreign: bool,
}

async fn stop_to_out(which: Which, proxy: Proxy, n: usize) -> StopRow {
    let b = Backend::start(which).await;
    let host = Host::start(&b.uri);
    // One more than is stopped: the last instance of a service going takes its backend with
    // it, a structural change (a reload), which is not what a stop of one of several costs.
    let mut webs = host.webs(n + 1).await;
    let keeper = webs.pop().unwrap();
    let settings = Settings {
        proxy,
        live: true,
        wait: STACK_WAIT,
        check: true,
        service: &host.service,
        h2c_listen: false,
    };
    let lb = Lb::start(&b.uri, settings, |t| {
        webs.iter().chain([&keeper]).all(|w| lists(t, &w.addr()))
    })
    .await;
    let backend = format!("svc_{}", host.service);
    let before = lb.counters();
    let (mut dereg, mut applied, mut out) = (Vec::new(), Vec::new(), Vec::new());
    let mut missed = 0;
    for w in webs {
        let in_proxy = lb.out_of_proxy(&backend, w.socket()).await == Some(false);
        let mark = lb.mark();
        let id = w.c.id.clone();
        let stop = tokio::spawn(async move { docker_async(&["stop", "-t", "10", &id]).await });
        let out_at = if proxy == Proxy::Haproxy && in_proxy {
            poll(WAIT, Duration::from_millis(2), || async {
                (lb.out_of_proxy(&backend, w.socket()).await == Some(true)).then(now_ns)
            })
            .await
        } else {
            None
        };
        let applied_at = poll(WAIT, Duration::from_millis(5), || async {
            lb.applied_after(mark, &backend)
        })
        .await;
        stop.await.expect("docker stop");
        let kill = host.kills.wait(&w.c.name, WAIT).await;
        let dereg_at = poll(WAIT, Duration::from_millis(10), || async {
            host.deregistered_at(&w)
        })
        .await;
        let since = |t: u128, k: u128| Duration::from_nanos(t.saturating_sub(k) as u64);
        let Some(kill) = kill else {
            missed += 1;
            continue;
        };
        let complete = dereg_at.is_some()
            && applied_at.is_some()
            && (proxy != Proxy::Haproxy || out_at.is_some());
        if !complete {
            missed += 1;
        }
        if let Some(t) = dereg_at {
            dereg.push(since(t, kill));
        }
        if let Some((t, _)) = applied_at {
            applied.push(since(t, kill));
        }
        if let Some(t) = out_at {
            out.push(since(t, kill));
        }
    }
    StopRow {
        store: which.name(),
        proxy,
        stops: n,
        missed,
        dereg: Summary::of(dereg),
        applied: Summary::of(applied),
        out: (proxy == Proxy::Haproxy).then(|| Summary::of(out)),
        c: lb.counters() - before,
        foreign: lb.most_services() > 1,
    }
}

// ---------------------------------------------------------------------------------------
// Reloads per scale event
// ---------------------------------------------------------------------------------------

struct ScaleRow {
    store: &'static str,
    proxy: Proxy,
    channel: &'static str,
    events: usize,
    /// Events whose change did not show within the bound.
    missed: usize,
    up: Counters,
    down: Counters,
    foreign: bool,
}

/// Waits until the file holds every address of `present` and none of `absent`, confd has
/// applied what it wrote and applied something since `from`. Returns whether it did in time.
async fn converged(lb: &Lb, present: &[&Web], absent: &[&Web], from: Counters) -> bool {
    poll(WAIT, Duration::from_millis(10), || async {
        let file = lb.file();
        let has = |w: &Web| lists(&file, &w.addr());
        (present.iter().all(|w| has(w))
            && !absent.iter().any(|w| has(w))
            && lb.settled()
            && lb.counters() != from)
            .then_some(())
    })
    .await
    .is_some()
}

async fn scale(which: Which, proxy: Proxy, live: bool, cycles: usize) -> ScaleRow {
    let b = Backend::start(which).await;
    let host = Host::start(&b.uri);
    let base = host.web().await;
    let settings = Settings {
        proxy,
        live,
        wait: STACK_WAIT,
        check: true,
        service: &host.service,
        h2c_listen: false,
    };
    let lb = Lb::start(&b.uri, settings, |t| lists(t, &base.addr())).await;
    let (mut up, mut down) = (Counters::default(), Counters::default());
    let mut missed = 0;
    for _ in 0..cycles {
        let c0 = lb.counters();
        let (x, y) = tokio::join!(host.web(), host.web());
        if !converged(&lb, &[&base, &x, &y], &[], c0).await {
            missed += 1;
        }
        let c1 = lb.counters();
        up = up + (c1 - c0);
        stop_all(&[&x, &y]).await;
        if !converged(&lb, &[&base], &[&x, &y], c1).await {
            missed += 1;
        }
        let c2 = lb.counters();
        down = down + (c2 - c1);
    }
    // A pass still under way when the last event converged (its file written, its line not
    // yet logged) is counted with the scale-downs.
    let last = lb.counters();
    tokio::time::sleep(Duration::from_secs(1)).await;
    down = down + (lb.counters() - last);
    ScaleRow {
        store: which.name(),
        proxy,
        channel: settings.channel(),
        events: 2 * cycles,
        missed,
        up,
        down,
        foreign: lb.most_services() > 1,
    }
}

// ---------------------------------------------------------------------------------------
// Membership churn through HAProxy's runtime API
// ---------------------------------------------------------------------------------------

struct ChurnRow {
    store: &'static str,
    check: bool,
    mode: String,
    changes: usize,
    /// Changes whose `applied` line did not come within the bound.
    missed: usize,
    elapsed: Duration,
    c: Counters,
    lat: Option<Summary>,
}

/// Instance `k` of the churn service: an address nothing listens on (HAProxy's health checks
/// mark it down, which changes nothing in the file).
fn churn_instance(service: &str, k: usize) -> Service {
    Service {
        id: format!("churn-{k}"),
        name: service.into(),
        address: "127.0.0.1".into(),
        port: 40_000 + (k % 20_000) as u16,
        tags: vec!["backend".into()],
        meta: BTreeMap::new(),
        check: None,
        ttl: None,
        docker_health: None,
    }
}

/// Registers (or deregisters) every service in `svcs` with [`WRITERS`] concurrent writers.
async fn write_all(store: &Store, svcs: &[Service], register: bool) {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WRITERS.min(svcs.len()) {
        let store = store.clone();
        let mine: Vec<Service> = svcs.iter().skip(w).step_by(WRITERS).cloned().collect();
        tasks.spawn(async move {
            for svc in mine {
                let r = if register {
                    store.register(&svc).await
                } else {
                    store.deregister(&svc).await
                };
                r.unwrap_or_else(|e| panic!("store write {}: {e}", svc.id));
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("writer task");
    }
}

/// Whether the file holds exactly the churn instances `want` of `all`.
fn holds(lb: &Lb, all: &[Service], want: impl Fn(usize) -> bool) -> bool {
    let file = lb.file();
    all.iter()
        .enumerate()
        .all(|(k, s)| lists(&file, &format!("{}:{}", s.address, s.port)) == want(k))
}

async fn churn(which: Which, check: bool, secs: Duration, burst: usize) -> Vec<ChurnRow> {
    let b = Backend::start(which).await;
    let service = "churn";
    let base: Vec<Service> = (0..CHURN_BASE)
        .map(|k| churn_instance(service, k))
        .collect();
    write_all(&b.store, &base, true).await;
    let settings = Settings {
        proxy: Proxy::Haproxy,
        live: true,
        wait: NO_WAIT,
        check,
        service,
        h2c_listen: false,
    };
    let lb = Lb::start(&b.uri, settings, |t| {
        base.iter()
            .all(|s| lists(t, &format!("{}:{}", s.address, s.port)))
    })
    .await;
    let mut rows = Vec::new();
    let pool = format!("svc_{service}");

    // One at a time: add a new instance, remove it, add the next...
    let before = lb.counters();
    let t0 = Instant::now();
    let (mut changes, mut missed, mut lat) = (0, 0, Vec::new());
    let mut k = CHURN_BASE;
    while t0.elapsed() < secs {
        let svc = churn_instance(service, k);
        let mark = lb.mark();
        let start = now_ns();
        let r = if changes % 2 == 0 {
            b.store.register(&svc).await
        } else {
            k += 1;
            b.store.deregister(&svc).await
        };
        r.unwrap_or_else(|e| panic!("store write {}: {e}", svc.id));
        changes += 1;
        match poll(WAIT, Duration::from_millis(1), || async {
            lb.applied_after(mark, &pool)
        })
        .await
        {
            Some((t, _)) => lat.push(Duration::from_nanos(t.saturating_sub(start) as u64)),
            None => missed += 1,
        }
    }
    rows.push(ChurnRow {
        store: which.name(),
        check,
        mode: "one at a time".into(),
        changes,
        missed,
        elapsed: t0.elapsed(),
        c: lb.counters() - before,
        lat: Some(Summary::of(lat)),
    });

    // A burst: `burst` new instances written at once, then all of them removed at once.
    let all: Vec<Service> = (k + 1..k + 1 + burst)
        .map(|k| churn_instance(service, k))
        .collect();
    let before = lb.counters();
    let t0 = Instant::now();
    write_all(&b.store, &all, true).await;
    let added = poll(WAIT, Duration::from_millis(5), || async {
        (holds(&lb, &all, |_| true) && lb.settled()).then_some(())
    })
    .await;
    write_all(&b.store, &all, false).await;
    let removed = poll(WAIT, Duration::from_millis(5), || async {
        (holds(&lb, &all, |_| false) && lb.settled()).then_some(())
    })
    .await;
    rows.push(ChurnRow {
        store: which.name(),
        check,
        mode: format!("burst {burst} + {burst}"),
        changes: 2 * burst,
        missed: usize::from(added.is_none()) + usize::from(removed.is_none()),
        elapsed: t0.elapsed(),
        c: lb.counters() - before,
        lat: None,
    });
    rows
}

// ---------------------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------------------

/// `median / p99 / max` in ms, or `-` without samples.
fn mpm(s: &Summary) -> String {
    if s.n == 0 {
        return "-".into();
    }
    format!("{} / {} / {}", ms(s.median), ms(s.p99), ms(s.max))
}

/// Runs of a measurement at most (see [`unperturbed`]).
const ATTEMPTS: usize = 3;

/// Runs a measurement again, up to [`ATTEMPTS`] runs in all, while `foreign` says another
/// run's services reached its store: their changes cost passes and reloads that are not the
/// measurement's. (registrator cannot be told to watch only some containers of an engine.)
async fn unperturbed<R, F, Fut>(run: F, foreign: impl Fn(&R) -> bool) -> R
where
    F: Fn() -> Fut,
    Fut: Future<Output = R>,
{
    let mut r = run().await;
    for attempt in 2..=ATTEMPTS {
        if !foreign(&r) {
            break;
        }
        eprintln!(
            "  another run's services reached the store; measuring again ({attempt}/{ATTEMPTS})"
        );
        r = run().await;
    }
    r
}

fn star(foreign: bool) -> &'static str {
    if foreign {
        " *"
    } else {
        ""
    }
}

/// Runs the three measurements for every store and the chosen proxies, printing each table
/// as soon as it is complete.
pub async fn run(stores: &[Which], o: &Opts) {
    switchboard_tests::ensure_test_image();
    let mut foreign = false;

    let mut rows = Vec::new();
    for &which in stores {
        for &proxy in &o.proxies {
            eprintln!(
                "drain stop -> out: {} {} ({} stops)",
                which.name(),
                proxy.name(),
                o.stops
            );
            let row = unperturbed(|| stop_to_out(which, proxy, o.stops), |r| r.foreign).await;
            rows.push(row);
        }
    }
    println!("\n### drain: Docker stop signal -> out of the proxy (live channel)\n");
    println!("| store  | proxy   | stops | missed | deregistered ms        | confd applied ms       | out of HAProxy ms      | reloads | live updates |");
    println!("|--------|---------|------:|-------:|------------------------|------------------------|------------------------|--------:|-------------:|");
    for r in &rows {
        foreign |= r.foreign;
        println!(
            "| {:<6} | {:<7} | {:>5} | {:>6} | {:<22} | {:<22} | {:<22} | {:>7} | {:>12} |",
            r.store,
            r.proxy.name(),
            format!("{}{}", r.stops, star(r.foreign)),
            r.missed,
            mpm(&r.dereg),
            mpm(&r.applied),
            r.out.as_ref().map_or_else(|| "(= applied)".into(), mpm),
            r.c.reloads,
            r.c.live
        );
    }
    println!(
        "\nEach cell: median / p99 / max from the container's Docker `kill` event (its stop \
         signal, sent by `docker stop`) to registrator's `deregistered` line, to confd's line \
         applying the removal, and (HAProxy) to the first `show servers state` on the admin \
         socket showing the server drained or gone (polled every 2 ms, so it trails confd's \
         line, logged after the drain command was answered, by about the poll interval). nginx's \
         peers endpoint answers after the new table is stored, which the next request's \
         balancer reads: there confd's line is the moment. {n} of {m} containers stopped one \
         after the other, each serving for {GRACE} s after SIGTERM; confd as in the reference \
         stacks (quiescence 200ms:2s, which a withdrawal skips; the proxy's check on every \
         render).",
        n = o.stops,
        m = o.stops + 1,
    );

    let mut rows = Vec::new();
    for &which in stores {
        for &proxy in &o.proxies {
            for live in [true, false] {
                eprintln!(
                    "drain scale 1 -> 3 -> 1: {} {} live={live} ({} cycles)",
                    which.name(),
                    proxy.name(),
                    o.cycles
                );
                let row = unperturbed(|| scale(which, proxy, live, o.cycles), |r| r.foreign).await;
                rows.push(row);
            }
        }
    }
    println!(
        "\n### drain: reloads per scale event (scale 1 -> 3 -> 1, {} times)\n",
        o.cycles
    );
    println!("| store  | proxy   | channel     | events | missed | reloads up | live up | reloads down | live down | reloads per event | live updates per event |");
    println!("|--------|---------|-------------|-------:|-------:|-----------:|--------:|-------------:|----------:|------------------:|-----------------------:|");
    for r in &rows {
        foreign |= r.foreign;
        let per = |v: u64| format!("{:.2}", v as f64 / r.events.max(1) as f64);
        println!(
            "| {:<6} | {:<7} | {:<11} | {:>6} | {:>6} | {:>10} | {:>7} | {:>12} | {:>9} | {:>17} | {:>22} |",
            r.store,
            r.proxy.name(),
            r.channel,
            format!("{}{}", r.events, star(r.foreign)),
            r.missed,
            r.up.reloads,
            r.up.live,
            r.down.reloads,
            r.down.live,
            per(r.up.reloads + r.down.reloads),
            per(r.up.live + r.down.live)
        );
    }
    println!(
        "\nA scale event is two containers started together (up) or stopped together (down); \
         counts are the differences of confd's running totals (`reloads=`, `live_updates=`) \
         over the events. Two changes that arrive within the quiescence window share one pass."
    );

    if o.proxies.contains(&Proxy::Haproxy) {
        let mut rows = Vec::new();
        for &which in stores {
            for check in [true, false] {
                eprintln!(
                    "drain churn: {} check={check} ({:?}, burst {})",
                    which.name(),
                    o.churn,
                    o.burst
                );
                rows.extend(churn(which, check, o.churn, o.burst).await);
            }
        }
        println!(
            "\n### drain: membership changes through HAProxy's runtime API (quiescence 0s:0s)\n"
        );
        println!("| store  | check | mode            | changes | missed | seconds | changes/s | live updates | reloads | store write -> applied ms (median / p99 / max) |");
        println!("|--------|-------|-----------------|--------:|-------:|--------:|----------:|-------------:|--------:|-------------------------------------------------|");
        for r in &rows {
            println!(
                "| {:<6} | {:<5} | {:<15} | {:>7} | {:>6} | {:>7.2} | {:>9.1} | {:>12} | {:>7} | {:<47} |",
                r.store,
                if r.check { "yes" } else { "no" },
                r.mode,
                r.changes,
                r.missed,
                r.elapsed.as_secs_f64(),
                r.changes as f64 / r.elapsed.as_secs_f64().max(1e-9),
                r.c.live,
                r.c.reloads,
                r.lat.as_ref().map_or_else(|| "-".into(), mpm)
            );
        }
        println!(
            "\nInstances written straight to the store ({CHURN_BASE} kept throughout). One at a \
             time: register a new instance, wait for confd's `applied live` line, deregister \
             it, wait, and so on for {:?}. Burst: {} new instances by {WRITERS} concurrent \
             writers, until confd has applied a file holding them all, then all removed the \
             same way; the time includes the store writes, and confd coalesces what arrives \
             during a pass. \"check\": `haproxy -c` on every render (the reference stack's \
             setting) or not.",
            o.churn, o.burst
        );
    }
    if foreign {
        println!(
            "\n\\* Other services reached that run's store in each of {ATTEMPTS} attempts \
             (containers of another run on this engine that name a service and publish a port): \
             some reloads and live updates may be theirs."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_concurrently() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let t0 = Instant::now();
        let out = rt.block_on(futures_join(4, || async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            7
        }));
        assert_eq!(out, vec![7; 4]);
        assert!(
            t0.elapsed() < Duration::from_millis(350),
            "{:?}",
            t0.elapsed()
        );
    }

    #[test]
    fn web_command_quotes_the_trap() {
        let c = web_command();
        assert!(
            c.contains("trap \"sleep 0.5; kill $h; exit 0\" TERM"),
            "{c}"
        );
    }
}
