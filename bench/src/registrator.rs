//! Registrator suite: Docker `start` event -> registration visible in the store.
//!
//! For each store and each N (default 1, 50, 200) it starts N containers with a published port
//! and reports, from each container's Docker `start` event to its registration being visible in
//! the store: median, p90, p99 and max; plus the registrator's peak RSS (VmHWM).
//!
//! The same events are registered at the same time by [`crate::floor`] (one inspection and one
//! write per `start`, nothing else) into the same store under another service name and ID
//! space, timed from the same engine timestamps to the same kind of store watch: the table
//! gives registrator's figures as a ratio to that floor, and a second table
//! splits the floor into the engine's share (event delivery, inspection) and the store's.

use crate::common::{
    docker_async, mib, ms, now_ns, peak_rss_kib, release_bin, rss_kib, DockerEvents, Summary,
};
use crate::floor::{ratio, Floor, Stages};
use crate::Which;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchboard::store::{EtcdClient, WatchEvent};
use switchboard::{Endpoint, RegistryUri, Store};
use switchboard_tests::*;

struct Row {
    store: &'static str,
    n: usize,
    /// Start event -> visible, registrator.
    reg: Summary,
    /// Start event -> visible, the floor.
    floor: Summary,
    /// The floor's stages: event delivery, inspection, store write (each from the previous).
    delivery: Summary,
    inspect: Summary,
    write: Summary,
    rss_kib: u64,
}

/// Service ID -> time (ns since epoch) it was first seen in the store.
type Seen = Arc<Mutex<HashMap<String, u128>>>;

fn watch_consul(http: String, service: String) -> Seen {
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut index = 0u64;
        loop {
            let url = format!("{http}/v1/catalog/service/{service}?index={index}&wait=30s");
            let Ok(resp) = client.get(&url).send().await else {
                continue;
            };
            let t = now_ns();
            index = resp
                .headers()
                .get("X-Consul-Index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let v: serde_json::Value = resp.json().await.unwrap_or_default();
            let mut seen = s2.lock().unwrap();
            for e in v.as_array().cloned().unwrap_or_default() {
                if let Some(id) = e["ServiceID"].as_str() {
                    seen.entry(id.to_string()).or_insert(t);
                }
            }
        }
    });
    seen
}

async fn watch_etcd(port: u16, prefix: String) -> Seen {
    let seen: Seen = Arc::default();
    let client = EtcdClient::new(vec![Endpoint {
        host: "127.0.0.1".into(),
        port,
        tls: false,
        socket: None,
    }]);
    let mut stream = client.watch_prefix(&prefix, 0).await.expect("etcd watch");
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok(Some(batch)) = stream.next().await {
            let t = now_ns();
            let mut seen = s2.lock().unwrap();
            for ev in batch.events {
                if let WatchEvent::Put(kv) = ev {
                    if let Some(id) = kv.key.rsplit('/').next() {
                        seen.entry(id.to_string()).or_insert(t);
                    }
                }
            }
        }
    });
    seen
}

async fn run_one(which: Which, n: usize, host: &str) -> Row {
    let run = format!("{}-{n}-{}", std::process::id(), now_ns() % 1_000_000);
    let service = format!("bench{n}");
    let floor_name = format!("floor{n}");
    let mut _consul = None;
    let mut _etcd = None;
    let (uri, floor_uri, seen, floor_seen) = match which {
        Which::Consul => {
            let c = Consul::start().await;
            let uri = c.uri();
            let seen = watch_consul(c.http(), service.clone());
            let floor_seen = watch_consul(c.http(), floor_name.clone());
            _consul = Some(c);
            (uri.clone(), uri, seen, floor_seen)
        }
        Which::Etcd => {
            let e = Etcd::start().await;
            let seen = watch_etcd(e.port, "/bench/".into()).await;
            let floor_seen = watch_etcd(e.port, "/floor/".into()).await;
            let uris = (e.uri("bench"), e.uri("floor"));
            _etcd = Some(e);
            (uris.0, uris.1, seen, floor_seen)
        }
    };
    RegistryUri::parse(&uri).expect("uri");
    let floor_store = Store::new(&RegistryUri::parse(&floor_uri).expect("floor uri"));
    let mut reg = Process::spawn(
        &release_bin("registrator"),
        &["-ip", "127.0.0.1", &uri],
        &[("RUST_LOG", "warn")],
    );
    let starts = DockerEvents::watch(&run, "start");
    let floor = Floor::start(&run, &floor_name, floor_store).await;

    let names: Vec<String> = (0..n).map(|i| format!("sbtest-bench-{run}-{i}")).collect();
    let mut tasks = Vec::new();
    for chunk in names.chunks(n.div_ceil(8).max(1)) {
        let chunk = chunk.to_vec();
        let run = run.clone();
        let service = service.clone();
        tasks.push(tokio::spawn(async move {
            for name in chunk {
                run_container(&name, &run, &service).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let ids: BTreeMap<String, String> = names
        .iter()
        .map(|name| (format!("{host}:{name}:80"), name.clone()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let all = {
            let seen = seen.lock().unwrap();
            let floor_seen = floor_seen.lock().unwrap();
            ids.keys().all(|id| seen.contains_key(id))
                && names
                    .iter()
                    .all(|name| floor_seen.contains_key(&floor_id(name)))
        };
        if all || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_kib = peak_rss_kib(reg.pid());
    let reg_lat: Vec<Duration> = {
        let seen = seen.lock().unwrap();
        ids.iter()
            .filter_map(|(id, name)| Some(since(starts.get(name)?, *seen.get(id)?)))
            .collect()
    };
    let floor_lat: Vec<Duration> = {
        let floor_seen = floor_seen.lock().unwrap();
        names
            .iter()
            .filter_map(|name| Some(since(starts.get(name)?, *floor_seen.get(&floor_id(name))?)))
            .collect()
    };
    let stages: Vec<Stages> = names.iter().filter_map(|name| floor.get(name)).collect();
    for (what, got) in [
        ("registrations", reg_lat.len()),
        ("floor registrations", floor_lat.len()),
    ] {
        if got < n {
            eprintln!(
                "warning: {} of {n} {what} not measured on {}",
                n - got,
                which.name()
            );
        }
    }
    drop(floor);
    let mut rm = vec!["rm", "-f"];
    rm.extend(names.iter().map(String::as_str));
    docker_async(&rm).await;
    reg.signal(libc::SIGTERM);
    let _ = reg.wait_exit(Duration::from_secs(60)).await;
    let stage = |f: fn(&Stages) -> Duration| Summary::of(stages.iter().map(f).collect());
    Row {
        store: which.name(),
        n,
        reg: Summary::of(reg_lat),
        floor: Summary::of(floor_lat),
        delivery: stage(|s| since(s.event, s.received)),
        inspect: stage(|s| since(s.received, s.inspected)),
        write: stage(|s| since(s.inspected, s.written)),
        rss_kib,
    }
}

/// From `a` to `b` (ns since the epoch); zero if `b` came first.
fn since(a: u128, b: u128) -> Duration {
    Duration::from_nanos(b.saturating_sub(a) as u64)
}

/// The ID the floor registers container `name` under.
fn floor_id(name: &str) -> String {
    crate::floor::floor_service("", name, 0).id
}

/// `median / p90 / p99 / max` in ms.
fn dist(s: &Summary) -> String {
    format!(
        "{} / {} / {} / {}",
        ms(s.median),
        ms(s.p90),
        ms(s.p99),
        ms(s.max)
    )
}

/// Runs the suite for every store and count and prints its table.
pub async fn run(counts: &[usize], stores: &[Which]) {
    ensure_test_image();
    let host = hostname();
    let mut rows = Vec::new();
    for &which in stores {
        for &n in counts {
            rows.push(run_one(which, n, &host).await);
        }
    }
    println!("\n### registrator: Docker start event -> registration visible in the store\n");
    println!(
        "Floor: one inspection and one store write per start event, run at the same time \
         (goals: median ratio <= 1.2, p99 ratio <= 1.5).\n"
    );
    println!("| store  | containers | registrator ms (median / p90 / p99 / max) | floor ms (median / p90 / p99 / max) | median ratio | p99 ratio | registrator peak RSS |");
    println!("|--------|-----------:|--------------------------------------------|-------------------------------------|-------------:|----------:|---------------------:|");
    for r in &rows {
        println!(
            "| {:<6} | {:>10} | {:<42} | {:<35} | {:>12} | {:>9} | {:>16} MiB |",
            r.store,
            r.n,
            dist(&r.reg),
            dist(&r.floor),
            ratio(r.reg.median, r.floor.median),
            ratio(r.reg.p99, r.floor.p99),
            mib(r.rss_kib)
        );
    }
    println!("\nThe floor's stages, ms (median / p90 / p99 / max): the engine's share is event delivery (engine timestamp -> event received) and inspection; the store's is the write.\n");
    println!("| store  | containers | event delivery             | inspection                 | store write                |");
    println!("|--------|-----------:|----------------------------|----------------------------|----------------------------|");
    for r in &rows {
        println!(
            "| {:<6} | {:>10} | {:<26} | {:<26} | {:<26} |",
            r.store,
            r.n,
            dist(&r.delivery),
            dist(&r.inspect),
            dist(&r.write)
        );
    }
}

/// Idle RSS and RSS under sustained churn.
struct ChurnRow {
    store: &'static str,
    idle_containers: usize,
    secs: u64,
    cycles: usize,
    /// VmRSS once the idle containers are registered and nothing happens.
    idle_kib: u64,
    /// VmRSS samples during the churn, one every [`RSS_EVERY`].
    samples: Vec<u64>,
    /// VmRSS once the churn is over and only the idle containers are left.
    after_kib: u64,
    peak_kib: u64,
}

/// How often RSS is sampled during the churn.
const RSS_EVERY: Duration = Duration::from_secs(5);

/// Containers kept by the churn at any time (each cycle starts one and removes the oldest).
const CHURN_ALIVE: usize = 4;

/// `docker run -d` of one bench container of `run` serving `service` on a published port.
async fn run_container(name: &str, run: &str, service: &str) {
    docker_async(&[
        "run",
        "-d",
        "--name",
        name,
        "--label",
        TEST_LABEL,
        "--label",
        &format!("switchboard.bench={run}"),
        "-e",
        &format!("SERVICE_NAME={service}"),
        "-p",
        "80",
        TEST_IMAGE,
        "sleep",
        "3600",
    ])
    .await;
}

/// How many of this host's registrations of `service` the store holds.
async fn registered(store: &Store, host: &str, service: &str) -> usize {
    store
        .list(&format!("{host}:"))
        .await
        .map(|v| v.iter().filter(|s| s.name == service).count())
        .unwrap_or(0)
}

/// Waits (bounded) until the store holds exactly `n` registrations of `service`.
async fn settle(store: &Store, host: &str, service: &str, n: usize) -> bool {
    poll(
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async { (registered(store, host, service).await == n).then_some(()) },
    )
    .await
    .is_some()
}

/// Registrator on `which` with `idle` containers, then `secs` of churn (start one container,
/// remove the oldest beyond [`CHURN_ALIVE`], as fast as the engine goes), RSS sampled.
async fn churn_one(which: Which, idle: usize, secs: u64, host: &str) -> ChurnRow {
    let run = format!("{}-churn-{}", std::process::id(), now_ns() % 1_000_000);
    let service = "benchchurn";
    let backend = crate::common::Backend::start(which).await;
    let reg = Process::spawn(
        &release_bin("registrator"),
        &["-ip", "127.0.0.1", &backend.uri],
        &[("RUST_LOG", "warn")],
    );
    let pid = reg.pid();
    let name = |k: usize| format!("sbtest-bench-{run}-{k}");
    for k in 0..idle {
        run_container(&name(k), &run, service).await;
    }
    if !settle(&backend.store, host, service, idle).await {
        eprintln!(
            "warning: the idle containers were not all registered on {}",
            which.name()
        );
    }
    // Let the start-up work (inspections, the first verify pass) finish before sampling.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_kib = rss_kib(pid);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut next_sample = Instant::now() + RSS_EVERY;
    let mut samples = Vec::new();
    let mut alive = std::collections::VecDeque::new();
    let mut cycles = 0;
    while Instant::now() < deadline {
        let k = idle + cycles;
        run_container(&name(k), &run, service).await;
        alive.push_back(k);
        if alive.len() > CHURN_ALIVE {
            let old = alive.pop_front().unwrap();
            docker_async(&["rm", "-f", &name(old)]).await;
        }
        cycles += 1;
        if Instant::now() >= next_sample {
            samples.push(rss_kib(pid));
            next_sample += RSS_EVERY;
        }
    }
    let gone: Vec<String> = alive.drain(..).map(name).collect();
    let mut rm = vec!["rm", "-f"];
    rm.extend(gone.iter().map(String::as_str));
    if !gone.is_empty() {
        docker_async(&rm).await;
    }
    if !settle(&backend.store, host, service, idle).await {
        eprintln!(
            "warning: registrations did not return to the idle set on {}",
            which.name()
        );
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after_kib = rss_kib(pid);
    let peak_kib = peak_rss_kib(pid);
    let idle_names: Vec<String> = (0..idle).map(name).collect();
    let mut rm = vec!["rm", "-f"];
    rm.extend(idle_names.iter().map(String::as_str));
    docker_async(&rm).await;
    let mut reg = reg;
    reg.signal(libc::SIGTERM);
    let _ = reg.wait_exit(Duration::from_secs(60)).await;
    ChurnRow {
        store: which.name(),
        idle_containers: idle,
        secs,
        cycles,
        idle_kib,
        samples,
        after_kib,
        peak_kib,
    }
}

/// The smallest and largest of a window of RSS samples, in MiB.
fn span(samples: &[u64]) -> String {
    match (samples.iter().min(), samples.iter().max()) {
        (Some(lo), Some(hi)) => format!("{} to {}", mib(*lo), mib(*hi)),
        _ => "-".into(),
    }
}

/// Runs registrator idle and under churn for `secs` on every store and prints the table.
pub async fn run_churn(stores: &[Which], secs: u64) {
    ensure_test_image();
    let host = hostname();
    let mut rows = Vec::new();
    for &which in stores {
        rows.push(churn_one(which, 5, secs, &host).await);
    }
    println!(
        "\n### registrator: RSS idle and under sustained churn (goal: idle < 8 MiB, no growth)\n"
    );
    println!("| store  | idle containers | churn s | containers started and removed | idle RSS MiB | churn RSS, first quarter MiB | churn RSS, last quarter MiB | RSS after churn MiB | peak RSS MiB |");
    println!("|--------|----------------:|--------:|-------------------------------:|-------------:|-----------------------------|----------------------------|--------------------:|-------------:|");
    for r in &rows {
        let q = r.samples.len().div_ceil(4).max(1).min(r.samples.len());
        println!(
            "| {:<6} | {:>15} | {:>7} | {:>30} | {:>12} | {:<27} | {:<26} | {:>19} | {:>12} |",
            r.store,
            r.idle_containers,
            r.secs,
            r.cycles,
            mib(r.idle_kib),
            span(&r.samples[..q]),
            span(&r.samples[r.samples.len() - q..]),
            mib(r.after_kib),
            mib(r.peak_kib)
        );
    }
}
