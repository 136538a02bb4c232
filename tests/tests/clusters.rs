//! Store clusters under load: a 3-server Consul cluster (registrator and confd talking to a
//! client agent) and a 3-member etcd cluster (registrator and confd given every member).
//! Killing the leader under POST load loses no request and no registration, and a container
//! started during the election, and one stopped after it, reach the proxy.
//!
//! The app is the reference stack's demo app (`switchboard/demo-web`, built by
//! `scripts/images`): slow POSTs, and 2 s of serving on after SIGTERM.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use switchboard_tests::cluster::{ConsulCluster, EtcdCluster};
use switchboard_tests::load::{Load, LoadSpec};
use switchboard_tests::*;

/// Time for a change to reach the proxy, election included.
const CONVERGE: Duration = Duration::from_secs(30);

/// One instance of the app, registered as `service` (only containers naming their service
/// are registered here: `-explicit`, so other tests' containers stay out).
fn app(service: &str) -> Container {
    let env = format!("SERVICE_NAME={service}");
    Container::run(
        "cluster-app",
        &[
            "-p",
            "127.0.0.1::80",
            "-e",
            &env,
            "--stop-timeout",
            "10",
            &image("demo-web"),
        ],
    )
}

fn registrator(uri: &str) -> Process {
    Process::spawn(
        &bin("registrator"),
        &["-ip", "127.0.0.1", "-explicit", "-resync", "0", uri],
        &[("RUST_LOG", "info")],
    )
}

/// Waits until exactly the instances `want` (their short container IDs) answer.
async fn wait_routes(what: &str, port: u16, want: &[&Container]) {
    let ids: BTreeSet<String> = want.iter().map(|c| c.id[..12].to_string()).collect();
    wait_for(what, CONVERGE, || async {
        let seen = answers(port, None, want.len() * 3 + 2).await;
        let hosts: BTreeSet<String> = seen
            .iter()
            .filter_map(|b| b.strip_prefix("Hello from "))
            .filter_map(|b| b.split_whitespace().next())
            .map(String::from)
            .collect();
        (hosts == ids && seen.len() == ids.len()).then_some(())
    })
    .await;
}

/// The shared scenario: two instances behind HAProxy, POST load, `kill_leader` runs, a third
/// instance starts while the store elects, then one instance is stopped; nothing may fail.
async fn leader_loss_under_load<F, Fut>(uri: &str, service: &str, kill_leader: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let _reg = registrator(uri);
    let a = app(service);
    let b = app(service);
    let proxy = HaproxyConfd::start(
        uri,
        "127.0.0.1",
        "wait: { min: 100ms, max: 1s }",
        &[("default_service", service.to_string())],
        |cfg| cfg.matches("    server ").count() >= 2,
    )
    .await;
    wait_routes("two instances", proxy.port, &[&a, &b]).await;

    let load = Load::start(LoadSpec::post(
        &format!("http://127.0.0.1:{}/cgi-bin/slow", proxy.port),
        8,
    ));
    load.wait_flowing(16, CONVERGE).await;
    let t = Instant::now();
    kill_leader().await;
    let c = app(service);
    eprintln!(
        "cluster: leader killed and a new leader elected in {:?}",
        t.elapsed()
    );
    wait_routes(
        "three instances, one started during the election",
        proxy.port,
        &[&a, &b, &c],
    )
    .await;
    eprintln!(
        "cluster: the new instance routed {:?} after the kill",
        t.elapsed()
    );
    load.wait_flowing(16, CONVERGE).await;
    b.stop(10);
    wait_routes("two instances after a stop", proxy.port, &[&a, &c]).await;
    load.wait_flowing(16, CONVERGE).await;
    let report = load.stop().await;
    eprintln!("cluster: {}", report.summary());
    assert_eq!(
        report.failed,
        0,
        "{}\nconfd:\n{}",
        report.summary(),
        proxy.confd.output()
    );
}

#[tokio::test]
async fn consul_cluster_leader_loss_loses_nothing() {
    require_images(&[image("demo-web")]);
    let mut cluster = ConsulCluster::start().await;
    let uri = cluster.uri();
    let service = format!("zlc{}", std::process::id());
    let leader = cluster.leader().await;
    let cluster_ref = &mut cluster;
    leader_loss_under_load(&uri, &service, || async move {
        let name = cluster_ref.kill_server(leader);
        eprintln!("cluster: killed Consul leader {name}");
        cluster_ref.wait_formed().await;
    })
    .await;
}

#[tokio::test]
async fn etcd_cluster_leader_loss_loses_nothing() {
    require_images(&[image("demo-web")]);
    let mut cluster = EtcdCluster::start().await;
    let uri = cluster.uri("services");
    let service = format!("zle{}", std::process::id());
    let leader = cluster.leader().await;
    let cluster_ref = &mut cluster;
    leader_loss_under_load(&uri, &service, || async move {
        eprintln!("cluster: killing etcd leader m{leader}");
        cluster_ref.kill_member(leader).await;
    })
    .await;
}
