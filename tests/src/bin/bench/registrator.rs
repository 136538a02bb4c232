//! Registrator suite: Docker `start` event -> registration visible in the store.
//!
//! For each store and each N (default 1, 50, 200) it starts N containers with a published port
//! and reports, from each container's Docker `start` event to its registration being visible in
//! the store: median, p99 and max; plus the registrator's peak RSS (VmHWM).

use crate::common::{
    docker_async, mib, ms, now_ns, peak_rss_kib, percentile, release_bin, DockerEvents,
};
use crate::Which;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchboard::store::{EtcdClient, WatchEvent};
use switchboard::{Endpoint, RegistryUri};
use switchboard_tests::*;

struct Row {
    store: &'static str,
    n: usize,
    median: Duration,
    p99: Duration,
    max: Duration,
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
    let mut _consul = None;
    let mut _etcd = None;
    let (uri, seen) = match which {
        Which::Consul => {
            let c = Consul::start().await;
            let uri = c.uri();
            let seen = watch_consul(c.http(), service.clone());
            _consul = Some(c);
            (uri, seen)
        }
        Which::Etcd => {
            let e = Etcd::start().await;
            let uri = e.uri("bench");
            let seen = watch_etcd(e.port, "/bench/".into()).await;
            _etcd = Some(e);
            (uri, seen)
        }
    };
    RegistryUri::parse(&uri).expect("uri");
    let mut reg = Process::spawn(
        &release_bin("registrator"),
        &["-ip", "127.0.0.1", &uri],
        &[("RUST_LOG", "warn")],
    );
    let starts = DockerEvents::watch(&run, "start");

    let names: Vec<String> = (0..n).map(|i| format!("sbtest-bench-{run}-{i}")).collect();
    let mut tasks = Vec::new();
    for chunk in names.chunks(n.div_ceil(8).max(1)) {
        let chunk = chunk.to_vec();
        let run = run.clone();
        let service = service.clone();
        tasks.push(tokio::spawn(async move {
            for name in chunk {
                docker_async(&[
                    "run",
                    "-d",
                    "--name",
                    &name,
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
            ids.keys().all(|id| seen.contains_key(id))
        };
        if all || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_kib = peak_rss_kib(reg.pid());
    let mut lat: Vec<Duration> = {
        let seen = seen.lock().unwrap();
        ids.iter()
            .filter_map(|(id, name)| {
                let s = starts.get(name)?;
                let v = seen.get(id)?;
                Some(Duration::from_nanos(v.saturating_sub(s) as u64))
            })
            .collect()
    };
    if lat.len() < n {
        eprintln!(
            "warning: {} of {n} registrations not measured on {}",
            n - lat.len(),
            which.name()
        );
    }
    lat.sort();
    let mut rm = vec!["rm", "-f"];
    rm.extend(names.iter().map(String::as_str));
    docker_async(&rm).await;
    reg.signal(libc::SIGTERM);
    let _ = reg.wait_exit(Duration::from_secs(60)).await;
    Row {
        store: which.name(),
        n,
        median: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        max: lat.last().copied().unwrap_or_default(),
        rss_kib,
    }
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
    println!("| store  | containers | median ms | p99 ms | max ms | registrator peak RSS |");
    println!("|--------|-----------:|----------:|-------:|-------:|---------------------:|");
    for r in rows {
        println!(
            "| {:<6} | {:>10} | {:>9} | {:>6} | {:>6} | {:>16} MiB |",
            r.store,
            r.n,
            ms(r.median),
            ms(r.p99),
            ms(r.max),
            mib(r.rss_kib)
        );
    }
}
