//! The `registrator` binary end to end: a real Docker engine, a real Consul dev agent or etcd
//! member, and the binary as users run it (build it first: `cargo build -p registrator`).
//!
//! Other tests' containers exist on the same engine, so every assertion looks only at this
//! test's own containers (by name, hence by service ID `<hostname>:<container>:<port>`).

use serde_json::Value;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use switchboard_tests::*;

const WAIT: Duration = Duration::from_secs(30);

/// `-ip 127.0.0.1` (predictable addresses) and a fast store verification, then `args`, then
/// the URI.
fn registrator(uri: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
    let mut full = vec!["-ip", "127.0.0.1", "--verify-interval", "1"];
    full.extend_from_slice(args);
    full.push(uri);
    Process::spawn(&bin("registrator"), &full, env)
}

/// A container serving HTTP on port 80, published on a random host port.
fn web(tag: &str, opts: &[&str]) -> Container {
    let mut args = vec!["-p", "80"];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[TEST_IMAGE, "httpd", "-f", "-p", "80", "-h", "/www"]);
    Container::run(tag, &args)
}

fn id_of(c: &Container, port: &str) -> String {
    format!("{}:{}:{port}", hostname(), c.name)
}

/// The agent's view of one service ID, if registered.
async fn consul_service(consul: &Consul, id: &str) -> Option<Value> {
    let all = consul.get_json("/v1/agent/services").await;
    all.get(id).cloned()
}

async fn wait_consul(consul: &Consul, id: &str) -> Value {
    wait_for(&format!("{id} in Consul"), WAIT, || {
        consul_service(consul, id)
    })
    .await
}

async fn wait_consul_gone(consul: &Consul, id: &str) {
    wait_for(&format!("{id} gone from Consul"), WAIT, || async {
        consul_service(consul, id).await.is_none().then_some(())
    })
    .await
}

/// The etcd value (JSON) of a service ID under `/<prefix>/`, if registered.
async fn etcd_service(etcd: &Etcd, prefix: &str, id: &str) -> Option<(String, Value)> {
    etcd.get_prefix(&format!("/{prefix}/"))
        .await
        .into_iter()
        .find(|(k, _)| k.ends_with(&format!("/{id}")))
        .map(|(k, v)| (k, serde_json::from_str(&v).unwrap()))
}

async fn wait_etcd(etcd: &Etcd, prefix: &str, id: &str) -> (String, Value) {
    wait_for(&format!("{id} in etcd"), WAIT, || {
        etcd_service(etcd, prefix, id)
    })
    .await
}

async fn wait_etcd_gone(etcd: &Etcd, prefix: &str, id: &str) {
    wait_for(&format!("{id} gone from etcd"), WAIT, || async {
        etcd_service(etcd, prefix, id).await.is_none().then_some(())
    })
    .await
}

/// Status of one check of the agent (`/v1/agent/checks`).
async fn consul_check(consul: &Consul, check_id: &str) -> Option<Value> {
    consul
        .get_json("/v1/agent/checks")
        .await
        .get(check_id)
        .cloned()
}

#[tokio::test]
async fn consul_publish_stop_restart_with_tags_meta_and_http_check() {
    let consul = Consul::start().await;
    let reg = registrator(&consul.uri(), &["-tags", "extra,a"], &[]);
    let c = web(
        "reg-basic",
        &[
            "-e",
            "SERVICE_TAGS=a,b",
            "-l",
            "SERVICE_REGION=eu",
            "-e",
            "SERVICE_REGION=ignored-env",
            "-e",
            "SERVICE_CHECK_HTTP=/",
            "-e",
            "SERVICE_CHECK_INTERVAL=1s",
        ],
    );
    let id = id_of(&c, "80");
    let port = c.host_port("80/tcp");
    let s = wait_consul(&consul, &id).await;
    assert_eq!(s["Service"], "busybox");
    assert_eq!(s["Address"], "127.0.0.1");
    assert_eq!(s["Port"], port);
    assert_eq!(s["Tags"], serde_json::json!(["a", "b", "extra"]));
    assert_eq!(s["Meta"]["region"], "eu");
    reg.wait_output(&format!("registered {id} busybox 127.0.0.1:{port}"), WAIT)
        .await;

    // The HTTP check probes the published port, and passes.
    let check = wait_for("HTTP check passing", WAIT, || async {
        let checks = consul.get_json("/v1/health/checks/busybox").await;
        checks
            .as_array()?
            .iter()
            .find(|ch| ch["ServiceID"] == id.as_str() && ch["Status"] == "passing")
            .cloned()
    })
    .await;
    assert_eq!(check["Type"], "http", "{check}");
    // Consul 1.8 reports no check definition; the probe's output names the URL.
    let output = check["Output"].as_str().unwrap_or_default();
    assert!(
        output.contains(&format!("HTTP GET http://127.0.0.1:{port}/")),
        "{check}"
    );

    c.stop(1);
    wait_consul_gone(&consul, &id).await;
    reg.wait_output(&format!("deregistered {id} busybox"), WAIT)
        .await;

    c.start();
    let port = c.host_port("80/tcp");
    let s = wait_consul(&consul, &id).await;
    assert_eq!(s["Port"], port);
}

#[tokio::test]
async fn etcd_json_and_removal() {
    let etcd = Etcd::start().await;
    let _reg = registrator(&etcd.uri("services"), &[], &[]);
    let c = web(
        "reg-etcd",
        &[
            "-e",
            "SERVICE_NAME=etcdweb",
            "-l",
            "SERVICE_TAGS=x",
            "-e",
            "SERVICE_OWNER=team",
        ],
    );
    let id = id_of(&c, "80");
    let (key, v) = wait_etcd(&etcd, "services", &id).await;
    assert_eq!(key, format!("/services/etcdweb/{id}"));
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["name"], "etcdweb");
    assert_eq!(v["address"], "127.0.0.1");
    assert_eq!(v["port"], c.host_port("80/tcp"));
    assert_eq!(v["tags"], serde_json::json!(["x"]));
    assert_eq!(v["meta"]["owner"], "team");
    c.stop(1);
    wait_etcd_gone(&etcd, "services", &id).await;
}

/// A registrator whose store is etcd behind a [`StoreFront`], registering only containers
/// with `label`.
fn registrator_behind(front: &StoreFront, label: &str) -> Process {
    registrator(
        &format!("etcd://127.0.0.1:{}/services", front.port()),
        &["--label-filter", label],
        &[],
    )
}

/// Waits until the front holds `n` writes (or more) at once.
async fn wait_outstanding(front: &StoreFront, n: usize, reg: &Process) {
    let reached = poll(WAIT, Duration::from_millis(20), || async {
        (front.outstanding() >= n).then_some(())
    })
    .await;
    assert!(
        reached.is_some(),
        "never {n} writes outstanding at once (at most {}); registrator's output:\n{}",
        front.max_outstanding(),
        reg.output()
    );
}

/// The writes of a pass overlap (issue 14: one at a time, the last of a batch of containers
/// started together waited for every write before it). Six containers already run when the
/// registrator starts, so its first pass has six registrations to write; the store front holds
/// every write until the test sees several outstanding at once, which one at a time never are.
#[tokio::test]
async fn writes_of_a_pass_overlap() {
    let etcd = Etcd::start().await;
    let front = StoreFront::start(etcd.port).await;
    let label = format!("switchboard.test.overlap={}", std::process::id());
    let containers: Vec<Container> = (0..6)
        .map(|i| web(&format!("reg-overlap{i}"), &["-l", &label]))
        .collect();
    front.close();
    let reg = registrator_behind(&front, &label);
    wait_outstanding(&front, 2, &reg).await;
    front.open();
    for c in &containers {
        wait_etcd(&etcd, "services", &id_of(c, "80")).await;
    }
}

/// A registration published while a pass's writes are out joins them, rather than waiting
/// for the slowest (issue 14: etcd's p99). The front holds the first container's write, so
/// that pass cannot end; the second container's write must start all the same, while the
/// first is still out. (A pass that did not take it in would give the held write up at the
/// store client's 10 s request timeout, log the store unavailable and write both again in a
/// new pass: that is what the last assertion tells apart.)
#[tokio::test]
async fn a_registration_joins_a_running_pass() {
    let etcd = Etcd::start().await;
    let front = StoreFront::start(etcd.port).await;
    let label = format!("switchboard.test.joins={}", std::process::id());
    let reg = registrator_behind(&front, &label);
    let first = web("reg-joins-a", &["-l", &label]);
    wait_etcd(&etcd, "services", &id_of(&first, "80")).await;
    front.close();
    let held = web("reg-joins-b", &["-l", &label]);
    wait_outstanding(&front, 1, &reg).await;
    let joining = web("reg-joins-c", &["-l", &label]);
    wait_outstanding(&front, 2, &reg).await;
    front.open();
    for c in [&held, &joining] {
        wait_etcd(&etcd, "services", &id_of(c, "80")).await;
    }
    let out = reg.output();
    assert!(
        !out.contains("store unavailable"),
        "the held write was given up, so the second did not join it:\n{out}"
    );
}

#[tokio::test]
async fn go_style_flags_and_internal() {
    let consul = Consul::start().await;
    let args = [
        "-ip=127.0.0.1",
        "-internal",
        "-verify-interval=1",
        &consul.uri(),
    ];
    let _reg = Process::spawn(&bin("registrator"), &args, &[]);
    let c = web("reg-internal", &[]);
    let s = wait_consul(&consul, &id_of(&c, "80")).await;
    assert_eq!(s["Address"], c.ip().as_str());
    assert_eq!(s["Port"], 80);
}

#[tokio::test]
async fn names_ports_udp_and_ignore() {
    let consul = Consul::start().await;
    let multi = web("reg-multi", &["-p", "81", "-e", "SERVICE_81_NAME=special"]);
    let udp = Container::run("reg-udp", &["-p", "53/udp", TEST_IMAGE, "sleep", "600"]);
    let ignored = web("reg-ignored", &["-l", "SERVICE_IGNORE=yes"]);
    let not_ignored = web("reg-notignored", &["-e", "SERVICE_IGNORE=false"]);
    let port_ignored = web(
        "reg-portignored",
        &["-p", "81", "-e", "SERVICE_81_IGNORE=1"],
    );
    // Started after the containers: nothing is registered before the first listing is fully
    // inspected, so once anything is there, every container above has been judged.
    let _reg = registrator(&consul.uri(), &[], &[]);

    let s80 = wait_consul(&consul, &id_of(&multi, "80")).await;
    assert_eq!(s80["Service"], "busybox-80");
    let s81 = wait_consul(&consul, &id_of(&multi, "81")).await;
    assert_eq!(s81["Service"], "special");
    assert_eq!(s81["Port"], multi.host_port("81/tcp"));

    let su = wait_consul(&consul, &format!("{}:udp", id_of(&udp, "53"))).await;
    assert_eq!(su["Service"], "busybox");
    assert_eq!(su["Port"], udp.host_port("53/udp"));

    wait_consul(&consul, &id_of(&not_ignored, "80")).await;
    let kept = wait_consul(&consul, &id_of(&port_ignored, "80")).await;
    assert_eq!(kept["Service"], "busybox-80");
    let ids = consul.agent_service_ids().await;
    assert!(!ids.iter().any(|i| i.contains(&ignored.name)), "{ids:?}");
    assert!(!ids.contains(&id_of(&port_ignored, "81")), "{ids:?}");
}

#[tokio::test]
async fn label_filter_registers_only_matching_containers() {
    let consul = Consul::start().await;
    let project = format!("shop{}", std::process::id());
    let label = format!("com.docker.compose.project={project}");
    let ours = web("reg-filter-in", &["-l", &label]);
    let other = web(
        "reg-filter-out",
        &["-l", "com.docker.compose.project=other"],
    );
    let unlabelled = web("reg-filter-none", &[]);
    // The filter from the environment, as the compose files pass it.
    let _reg = registrator(&consul.uri(), &[], &[("REGISTRATOR_LABEL_FILTER", &label)]);
    // Nothing is registered before the first listing is judged whole, so once `ours` is
    // there, the others have been judged too.
    wait_consul(&consul, &id_of(&ours, "80")).await;
    let later = web("reg-filter-later", &["-l", &label]);
    wait_consul(&consul, &id_of(&later, "80")).await;
    let ids = consul.agent_service_ids().await;
    for c in [&other, &unlabelled] {
        assert!(
            !ids.iter().any(|i| i.contains(&c.name)),
            "{} in {ids:?}",
            c.name
        );
    }
}

/// `--scope-label` reads the value from registrator's own container; run on the host, there
/// is none, and it stops at start saying so rather than registering every container.
#[tokio::test]
async fn scope_label_outside_a_container_stops_at_start() {
    let consul = Consul::start().await;
    let mut reg = registrator(
        &consul.uri(),
        &[],
        &[("REGISTRATOR_SCOPE_LABEL", "com.docker.compose.project")],
    );
    let status = reg.wait_exit(WAIT).await;
    assert!(!status.success(), "registrator ran on: {}", reg.output());
    assert!(
        reg.output().contains(
            "--scope-label com.docker.compose.project: registrator does not run in a container"
        ),
        "{}",
        reg.output()
    );
}

/// A flag that does nothing with the chosen store is named at start.
#[tokio::test]
async fn ttl_with_consul_kv_warns_at_start() {
    let consul = Consul::start().await;
    let uri = format!(
        "consulkv://{}/services",
        consul.http().trim_start_matches("http://")
    );
    let reg = registrator(&uri, &["-ttl", "30"], &[]);
    reg.wait_output("-ttl does nothing with consulkv://", WAIT)
        .await;
}

#[tokio::test]
async fn tcp_check_and_a_malformed_label_warn_once() {
    let consul = Consul::start().await;
    let reg = registrator(&consul.uri(), &[], &[]);
    let c = web(
        "reg-badlabel",
        &[
            "-e",
            "SERVICE_NAME=tcpweb",
            "-e",
            "SERVICE_CHECK_TCP=true",
            "-l",
            "SERVICE_CHECK_INTERVAL=abc",
        ],
    );
    let id = id_of(&c, "80");
    wait_consul(&consul, &id).await;
    let port = c.host_port("80/tcp");
    // Consul 1.8 reports no check definition; the first probe's output names the target.
    let want = format!("TCP connect 127.0.0.1:{port}");
    let check = wait_for("TCP check probed", WAIT, || async {
        let checks = consul.get_json("/v1/health/checks/tcpweb").await;
        checks
            .as_array()?
            .iter()
            .find(|ch| {
                ch["ServiceID"] == id.as_str()
                    && ch["Output"].as_str().unwrap_or_default().contains(&want)
            })
            .cloned()
    })
    .await;
    assert_eq!(check["Type"], "tcp", "{check}");
    assert_eq!(check["Status"], "passing", "{check}");

    // Pausing and resuming re-derives the services: the warning must not repeat.
    docker(&["pause", &c.id]);
    wait_consul_gone(&consul, &id).await;
    docker(&["unpause", &c.id]);
    wait_consul(&consul, &id).await;
    let out = reg.output();
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("SERVICE_CHECK_INTERVAL"))
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(lines[0].contains("WARN"), "{}", lines[0]);
    assert!(lines[0].contains(&c.name), "{}", lines[0]);
    assert!(lines[0].contains("abc"), "{}", lines[0]);
    assert!(lines[0].contains("expected a duration"), "{}", lines[0]);
}

#[tokio::test]
async fn cleanup_removes_only_this_hosts_stale_entries() {
    let consul = Consul::start().await;
    let mut first = registrator(&consul.uri(), &[], &[]);
    let c = web("reg-cleanup", &[]);
    let id = id_of(&c, "80");
    wait_consul(&consul, &id).await;
    // A registrator killed without a chance to deregister leaves its entry behind.
    first.kill9();
    drop(c);
    let other = serde_json::json!({
        "ID": "otherhost:web:80", "Name": "busybox", "Address": "10.0.0.9", "Port": 80
    });
    let resp = reqwest::Client::new()
        .put(format!("{}/v1/agent/service/register", consul.http()))
        .json(&other)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    assert!(consul_service(&consul, &id).await.is_some());

    let reg = registrator(&consul.uri(), &["-cleanup"], &[]);
    wait_consul_gone(&consul, &id).await;
    reg.wait_output(&format!("deregistered {id}"), WAIT).await;
    assert!(consul_service(&consul, "otherhost:web:80").await.is_some());
}

#[tokio::test]
async fn ttl_expires_after_kill9_in_etcd_and_consul() {
    let etcd = Etcd::start().await;
    let consul = Consul::start().await;
    let ttl = ["-ttl", "3", "-ttl-refresh", "1"];
    let mut reg_e = registrator(&etcd.uri("ttl"), &ttl, &[]);
    let mut reg_c = registrator(&consul.uri(), &ttl, &[]);
    let c = web("reg-ttl", &[]);
    let id = id_of(&c, "80");
    wait_etcd(&etcd, "ttl", &id).await;
    wait_consul(&consul, &id).await;
    let check_id = format!("service:{id}:ttl");
    wait_for("TTL check passing", WAIT, || async {
        let ch = consul_check(&consul, &check_id).await?;
        (ch["Status"] == "passing").then_some(())
    })
    .await;
    // Refreshes keep it alive past the TTL.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        assert!(etcd_service(&etcd, "ttl", &id).await.is_some());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    reg_e.kill9();
    reg_c.kill9();
    wait_etcd_gone(&etcd, "ttl", &id).await;
    wait_for("TTL check critical", WAIT, || async {
        let ch = consul_check(&consul, &check_id).await?;
        (ch["Status"] == "critical").then_some(())
    })
    .await;
}

#[tokio::test]
async fn consul_restart_brings_registrations_back() {
    let mut consul = Consul::start().await;
    let reg = registrator(&consul.uri(), &[], &[]);
    let c = web("reg-consulrestart", &[]);
    let id = id_of(&c, "80");
    wait_consul(&consul, &id).await;
    consul.restart().await;
    wait_consul(&consul, &id).await;
    reg.wait_output("store lost", WAIT).await;
}

#[tokio::test]
async fn etcd_outage_and_recovery() {
    let mut etcd = Etcd::start().await;
    let reg = registrator(&etcd.uri("outage"), &[], &[]);
    let before = web("reg-etcd-before", &[]);
    wait_etcd(&etcd, "outage", &id_of(&before, "80")).await;
    etcd.stop();
    let during = web("reg-etcd-during", &[]);
    reg.wait_output("store unavailable", WAIT).await;
    etcd.restart().await;
    wait_etcd(&etcd, "outage", &id_of(&during, "80")).await;
    assert!(etcd_service(&etcd, "outage", &id_of(&before, "80"))
        .await
        .is_some());
    reg.wait_output("store reachable again", WAIT).await;
    let out = reg.output();
    assert_eq!(out.matches("store unavailable").count(), 1, "{out}");
}

#[tokio::test]
async fn docker_event_stream_loss_reconnects_and_resyncs() {
    let consul = Consul::start().await;
    let proxy = DockerProxy::start().await;
    let host = proxy.docker_host();
    let reg = registrator(&consul.uri(), &[], &[("DOCKER_HOST", &host)]);
    let removed = web("reg-proxy-removed", &[]);
    let removed_id = id_of(&removed, "80");
    wait_consul(&consul, &removed_id).await;

    proxy.cut();
    reg.wait_output("docker event stream", WAIT).await;
    let started = web("reg-proxy-started", &[]);
    drop(removed);
    proxy.restore();

    wait_consul(&consul, &id_of(&started, "80")).await;
    wait_consul_gone(&consul, &removed_id).await;
    reg.wait_output("docker engine reachable again", WAIT).await;
}

#[tokio::test]
async fn sigterm_leaves_registrations_and_deregister_on_exit_removes_them() {
    let consul = Consul::start().await;
    let c = web("reg-sigterm", &[]);
    let id = id_of(&c, "80");
    // The default, and the old `--keep-on-exit` (accepted, now a no-op): they stay.
    for args in [&[][..], &["--keep-on-exit"][..]] {
        let mut reg = registrator(&consul.uri(), args, &[]);
        wait_consul(&consul, &id).await;
        // Its first sync is done (it was already there for the second run).
        reg.wait_output("adopted ", WAIT).await;
        reg.signal(libc::SIGTERM);
        let st = reg.wait_exit(WAIT).await;
        let out = reg.output();
        assert!(st.success(), "{args:?} {st:?}: {out}");
        assert!(
            consul_service(&consul, &id).await.is_some(),
            "{args:?}: {out}"
        );
        assert!(!out.contains(&format!("deregistered {id}")), "{out}");
        assert!(out.contains("leaving"), "{out}");
    }
    // The opt-in restores the old behaviour.
    let mut reg = registrator(&consul.uri(), &["--deregister-on-exit"], &[]);
    wait_consul(&consul, &id).await;
    reg.wait_output("adopted ", WAIT).await;
    reg.signal(libc::SIGTERM);
    let st = reg.wait_exit(WAIT).await;
    assert!(st.success(), "{st:?}: {}", reg.output());
    assert!(consul_service(&consul, &id).await.is_none());
    reg.wait_output(&format!("deregistered {id}"), WAIT).await;
}

#[tokio::test]
async fn bad_uris_exit_2_with_one_line() {
    for uri in ["foo://x", "consul://", "consul://h:99999"] {
        let out = Command::new(bin("registrator")).arg(uri).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{uri}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{uri}: {stderr}");
        assert!(stderr.contains(uri), "{uri}: {stderr}");
        assert!(
            stderr.contains("expected") || stderr.contains("bad port"),
            "{stderr}"
        );
    }
}

/// A store without checks (etcd) hears only of healthy containers. (Consul gets a check that
/// follows Docker's health instead: `dropin_docker_health_drives_a_consul_check`.)
#[tokio::test]
async fn docker_healthcheck_gates_registration() {
    let etcd = Etcd::start().await;
    let c = web(
        "reg-health",
        &[
            "--health-cmd",
            "test -f /tmp/ok",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
        ],
    );
    let sentinel = web("reg-health-sentinel", &[]);
    let reg = registrator(&etcd.uri("health"), &[], &[]);
    let id = id_of(&c, "80");
    // Nothing is registered before the first listing is fully inspected, so once the
    // sentinel is there, the unhealthy container was judged too.
    wait_etcd(&etcd, "health", &id_of(&sentinel, "80")).await;
    assert!(
        etcd_service(&etcd, "health", &id).await.is_none(),
        "{}",
        reg.output()
    );

    docker(&["exec", &c.id, "sh", "-c", "echo > /tmp/ok"]);
    let (_, v) = wait_etcd(&etcd, "health", &id).await;
    assert!(v.get("docker_health").is_none(), "{v}");
    docker(&["exec", &c.id, "busybox", "rm", "/tmp/ok"]);
    wait_etcd_gone(&etcd, "health", &id).await;
}

#[tokio::test]
async fn deregister_on_success_keeps_crashed_containers_until_removed() {
    let consul = Consul::start().await;
    let _reg = registrator(&consul.uri(), &["-deregister", "on-success"], &[]);
    let crashed = web("reg-onsuccess-crash", &[]);
    let clean = Container::run(
        "reg-onsuccess-clean",
        &[
            "-p",
            "80",
            TEST_IMAGE,
            "sh",
            "-c",
            "trap 'exit 0' TERM; while true; do sleep 1; done",
        ],
    );
    let crashed_id = id_of(&crashed, "80");
    let clean_id = id_of(&clean, "80");
    wait_consul(&consul, &crashed_id).await;
    wait_consul(&consul, &clean_id).await;
    docker(&["kill", &crashed.id]); // exit status 137
    clean.stop(5); // exit status 0 via the trap
    wait_consul_gone(&consul, &clean_id).await;
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.ExitCode}}", &crashed.id]),
        "137"
    );
    assert!(consul_service(&consul, &crashed_id).await.is_some());
    drop(crashed);
    wait_consul_gone(&consul, &crashed_id).await;
}

#[tokio::test]
async fn unreachable_store_fails_after_retry_attempts() {
    let port = free_port(); // nothing listens there
    let uri = format!("consul://127.0.0.1:{port}");
    let mut reg = Process::spawn(
        &bin("registrator"),
        &["-retry-attempts", "2", "-retry-interval", "100", &uri],
        &[],
    );
    let st = reg.wait_exit(WAIT).await;
    assert_eq!(st.code(), Some(1), "{}", reg.output());
    let out = reg.output();
    let last = out
        .trim_end()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert!(last.starts_with("registrator: "), "{out}");
    assert!(last.contains(&format!("127.0.0.1:{port}")), "{out}");
    assert!(last.contains("after 3 attempt(s)"), "{out}");
    assert_eq!(out.matches("not reachable yet").count(), 2, "{out}");
}

// ---------------------------------------------------------------------------------------------
// Issue 9: registrations mirror running containers, not the registrator's lifetime; a
// container's stop signal withdraws it before it exits.
//
// Helpers below are local to this file for now (candidates for tests/src/lib.rs): a presence
// monitor, exact etcd key reads with revisions and lease, Consul catalog indexes.

/// How often the presence monitor looks: far below the ~0.7 s gap a deregister-on-exit
/// restart used to leave.
const PRESENCE_EVERY: Duration = Duration::from_millis(20);

/// Watches one registration on a task, from `start` until `finish`, counting every look and
/// every look at which it was absent. A bounded loop (it gives up after two minutes), never a
/// sleep-wait.
struct Presence {
    looks: Arc<AtomicU32>,
    misses: Arc<AtomicU32>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Presence {
    fn start<F, Fut>(present: F) -> Presence
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = bool> + Send,
    {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let looks = Arc::new(AtomicU32::new(0));
        let misses = Arc::new(AtomicU32::new(0));
        let (l, m) = (looks.clone(), misses.clone());
        let task = tokio::spawn(async move {
            let limit = std::time::Instant::now() + Duration::from_secs(120);
            while !*stopped.borrow() && std::time::Instant::now() < limit {
                if !present().await {
                    m.fetch_add(1, Ordering::SeqCst);
                }
                l.fetch_add(1, Ordering::SeqCst);
                tokio::select! {
                    _ = tokio::time::sleep(PRESENCE_EVERY) => {}
                    _ = stopped.changed() => {}
                }
            }
        });
        Presence {
            looks,
            misses,
            stop,
            task,
        }
    }

    /// Waits until the monitor has looked `n` more times: a window it certainly covered.
    async fn cover(&self, n: u32) {
        let target = self.looks.load(Ordering::SeqCst) + n;
        wait_for(&format!("{n} more looks"), WAIT, || async {
            (self.looks.load(Ordering::SeqCst) >= target).then_some(())
        })
        .await
    }

    /// Stops watching: `(looks, misses)`.
    async fn finish(self) -> (u32, u32) {
        let _ = self.stop.send(true);
        self.task.await.unwrap();
        (
            self.looks.load(Ordering::SeqCst),
            self.misses.load(Ordering::SeqCst),
        )
    }
}

/// One etcd key with its metadata (`create_revision`, `mod_revision`, `lease`, as the JSON
/// gateway spells them), if present.
async fn etcd_key(etcd_http: &str, key: &str) -> Option<Value> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = serde_json::json!({ "key": b64.encode(key) });
    let v: Value = reqwest::Client::new()
        .post(format!("{etcd_http}/v3/kv/range"))
        .json(&body)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v["kvs"].as_array()?.first().cloned()
}

/// `(CreateIndex, ModifyIndex)` of a service instance in Consul's catalog.
async fn consul_indexes(consul: &Consul, name: &str, id: &str) -> Option<(u64, u64)> {
    let v = consul
        .get_json(&format!("/v1/catalog/service/{name}"))
        .await;
    let e = v.as_array()?.iter().find(|e| e["ServiceID"] == id)?;
    Some((e["CreateIndex"].as_u64()?, e["ModifyIndex"].as_u64()?))
}

/// Whether `id` is among the passing instances of `name` (what confd renders).
async fn consul_passing(http: &str, name: &str, id: &str) -> bool {
    let url = format!("{http}/v1/health/service/{name}?passing");
    let Ok(r) = reqwest::get(&url).await else {
        return false;
    };
    let Ok(v) = r.json::<Value>().await else {
        return false;
    };
    v.as_array()
        .is_some_and(|a| a.iter().any(|e| e["Service"]["ID"] == id))
}

/// The store a restart scenario runs against.
enum Backend {
    Consul(Consul),
    Etcd(Etcd),
}

const PREFIX: &str = "adopt";

impl Backend {
    fn uri(&self) -> String {
        match self {
            Backend::Consul(c) => c.uri(),
            Backend::Etcd(e) => e.uri(PREFIX),
        }
    }

    /// Registered and (Consul) passing.
    async fn present(&self, name: &str, id: &str) -> bool {
        match self {
            Backend::Consul(c) => consul_passing(&c.http(), name, id).await,
            Backend::Etcd(e) => etcd_key(&e.http(), &format!("/{PREFIX}/{name}/{id}"))
                .await
                .is_some(),
        }
    }

    async fn wait_present(&self, name: &str, id: &str) {
        wait_for(&format!("{id} registered"), WAIT, || async {
            self.present(name, id).await.then_some(())
        })
        .await
    }

    async fn wait_absent(&self, name: &str, id: &str) {
        wait_for(&format!("{id} gone"), WAIT, || async {
            (!self.present(name, id).await).then_some(())
        })
        .await
    }

    /// A presence monitor on `id`.
    fn monitor(&self, name: &str, id: &str) -> Presence {
        let (name, id) = (name.to_string(), id.to_string());
        match self {
            Backend::Consul(c) => {
                let http = c.http();
                Presence::start(move || {
                    let (http, name, id) = (http.clone(), name.clone(), id.clone());
                    async move { consul_passing(&http, &name, &id).await }
                })
            }
            Backend::Etcd(e) => {
                let http = e.http();
                let key = format!("/{PREFIX}/{name}/{id}");
                Presence::start(move || {
                    let (http, key) = (http.clone(), key.clone());
                    async move { etcd_key(&http, &key).await.is_some() }
                })
            }
        }
    }

    /// What changes when a registration is removed and written again: Consul's catalog
    /// `(CreateIndex, ModifyIndex)`; etcd's `create_revision` (a put in place, e.g. to move
    /// the key to a new lease, keeps it).
    async fn identity(&self, name: &str, id: &str) -> Value {
        match self {
            Backend::Consul(c) => {
                let (create, modify) = consul_indexes(c, name, id).await.unwrap();
                serde_json::json!([create, modify])
            }
            Backend::Etcd(e) => {
                let kv = etcd_key(&e.http(), &format!("/{PREFIX}/{name}/{id}"))
                    .await
                    .unwrap();
                kv["create_revision"].clone()
            }
        }
    }

    /// The etcd lease a key hangs on (`None` for Consul or no lease).
    async fn lease(&self, name: &str, id: &str) -> Option<String> {
        match self {
            Backend::Consul(_) => None,
            Backend::Etcd(e) => etcd_key(&e.http(), &format!("/{PREFIX}/{name}/{id}"))
                .await?
                .get("lease")
                .and_then(Value::as_str)
                .map(String::from),
        }
    }
}

/// How the registrator goes away in a restart.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Sigterm,
    Kill9,
}

/// A running container stays registered through registrator restarts (SIGTERM, then
/// `kill -9`): never absent at any look of the monitor, never removed and written again
/// (same catalog indexes / etcd create_revision), and with `-ttl` kept alive by the new
/// process past the TTL (etcd: the key moves to the new process's lease). Containers that
/// stopped or started while no registrator ran are removed or added by the next one.
async fn restart_scenario(backend: Backend, ttl: bool) {
    // A TTL that covers the restart with room to spare on a loaded 2-core machine (the
    // registrator is gone for 1 to 3 s here), as a production TTL covers a restart.
    let ttl_secs = 5;
    let ttl_args: &[&str] = if ttl {
        &["-ttl", "5", "-ttl-refresh", "1"]
    } else {
        &[]
    };
    let name = unique_name("kept").replace('-', "");
    let kept = web("reg-kept", &["-e", &format!("SERVICE_NAME={name}")]);
    let kept_id = id_of(&kept, "80");
    let mut reg = registrator(&backend.uri(), ttl_args, &[]);
    backend.wait_present(&name, &kept_id).await;
    let identity = backend.identity(&name, &kept_id).await;
    let monitor = backend.monitor(&name, &kept_id);

    for how in [Stop::Sigterm, Stop::Kill9] {
        let gone = web("reg-gone", &["-e", &format!("SERVICE_NAME={name}")]);
        let gone_id = id_of(&gone, "80");
        backend.wait_present(&name, &gone_id).await;
        let old_lease = backend.lease(&name, &kept_id).await;
        match how {
            Stop::Sigterm => {
                reg.signal(libc::SIGTERM);
                let st = reg.wait_exit(WAIT).await;
                assert!(st.success(), "{st:?}: {}", reg.output());
            }
            Stop::Kill9 => reg.kill9(),
        }
        let stopped = std::time::Instant::now();
        // While no registrator runs (the monitor looks meanwhile: a registrator that
        // deregistered on exit would be caught here): one container goes away, another comes.
        monitor.cover(5).await;
        docker(&["kill", &gone.id]);
        let added = web("reg-added", &["-e", &format!("SERVICE_NAME={name}")]);
        let added_id = id_of(&added, "80");
        reg = registrator(&backend.uri(), ttl_args, &[]);
        backend.wait_present(&name, &added_id).await;
        backend.wait_absent(&name, &gone_id).await;
        reg.wait_output(&format!("deregistered {gone_id}"), WAIT)
            .await;
        reg.wait_output("adopted ", WAIT).await;
        if ttl {
            if let Backend::Etcd(_) = backend {
                let new_lease = wait_for("the kept key on the new lease", WAIT, || async {
                    let l = backend.lease(&name, &kept_id).await?;
                    (Some(&l) != old_lease.as_ref()).then_some(l)
                })
                .await;
                assert_ne!(new_lease, "0", "{how:?}");
            }
            // Past a TTL (and then some) after the old process went: only the new one keeps
            // it alive (etcd: the old lease has expired by then).
            let until = stopped + Duration::from_secs(ttl_secs + 2);
            while std::time::Instant::now() < until {
                assert!(
                    backend.present(&name, &kept_id).await,
                    "{how:?}: {}",
                    reg.output()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        assert_eq!(
            backend.identity(&name, &kept_id).await,
            identity,
            "{how:?}: the kept registration was removed and written again"
        );
        let out = reg.output();
        assert!(!out.contains(&format!("deregistered {kept_id}")), "{out}");
        if !(ttl && matches!(backend, Backend::Etcd(_))) {
            // Adopted as it was: not a single write (etcd with -ttl rewrites it in place to
            // move it to the new lease).
            assert!(!out.contains(&format!("registered {kept_id}")), "{out}");
        }
        drop(added);
    }
    let (looks, misses) = monitor.finish().await;
    println!("kept registration watched {looks} times through two registrator restarts: absent {misses} times");
    assert_eq!(misses, 0, "absent at {misses} of {looks} looks");
}

#[tokio::test]
async fn restart_keeps_and_adopts_registrations_consul() {
    restart_scenario(Backend::Consul(Consul::start().await), false).await;
}

#[tokio::test]
async fn restart_keeps_and_adopts_registrations_consul_ttl() {
    restart_scenario(Backend::Consul(Consul::start().await), true).await;
}

#[tokio::test]
async fn restart_keeps_and_adopts_registrations_etcd() {
    restart_scenario(Backend::Etcd(Etcd::start().await), false).await;
}

#[tokio::test]
async fn restart_keeps_and_adopts_registrations_etcd_ttl() {
    restart_scenario(Backend::Etcd(Etcd::start().await), true).await;
}

/// A busybox container serving HTTP on a published port 80 that finishes its work on `TERM`
/// for 3 s (then exits 0) and treats `HUP` as a reload, as apps behind a proxy do.
/// `opts` go before the image.
fn draining_web(tag: &str, name: &str, opts: &[&str]) -> Container {
    let service = format!("SERVICE_NAME={name}");
    let mut args = vec!["-p", "80", "-e", &service];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[
        TEST_IMAGE,
        "sh",
        "-c",
        "trap 'sleep 3; exit 0' TERM; trap 'echo reload' HUP; httpd -p 80 -h /www; \
         while true; do sleep 1; done",
    ]);
    Container::run(tag, &args)
}

/// Nanoseconds since the epoch, now.
fn unix_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// `timeNano` of the first `kill` event with `signal` Docker logged for container `id` since
/// `since_ns`.
fn kill_event_ns(id: &str, signal: &str, since_ns: i64) -> i64 {
    let since = (since_ns / 1_000_000_000 - 1).to_string();
    let until = (unix_ns() / 1_000_000_000 + 1).to_string();
    let filter = format!("container={id}");
    let out = docker(&[
        "events",
        "--since",
        &since,
        "--until",
        &until,
        "--filter",
        &filter,
        "--filter",
        "event=kill",
        "--format",
        "{{.TimeNano}} {{index .Actor.Attributes \"signal\"}}",
    ]);
    out.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(_, sig)| *sig == signal)
        .and_then(|(t, _)| t.parse().ok())
        .unwrap_or_else(|| panic!("no kill {signal} event for {id}: {out}"))
}

/// Nanoseconds into the (UTC) day of a log line's timestamp (`2026-11-26T14:27:06.919209Z ...`,
/// tracing's format), to compare with an event's time of day.
fn log_time_of_day_ns(line: &str) -> Option<i64> {
    let t = line.get(11..)?.split(['Z', ' ']).next()?;
    let (hms, frac) = t.split_once('.').unwrap_or((t, "0"));
    let mut parts = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, sec) = (parts.next()??, parts.next()??, parts.next()??);
    let frac_ns = format!("{frac:0<9}").get(..9)?.parse::<i64>().ok()?;
    Some(((h * 60 + m) * 60 + sec) * 1_000_000_000 + frac_ns)
}

fn running(c: &Container) -> bool {
    docker(&["inspect", "-f", "{{.State.Running}}", &c.id]) == "true"
}

/// Asserts `present` holds at every look for `window`: a bounded negative check.
async fn stays_for<F, Fut>(window: Duration, what: &str, present: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = std::time::Instant::now() + window;
    while std::time::Instant::now() < until {
        assert!(present().await, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `docker kill -s HUP` withdraws nothing; `docker stop` withdraws at the signal, while the
/// container still runs (finishing its work), and the time from the `docker stop` call to
/// the store no longer having it is printed.
async fn drain_scenario(backend: Backend) {
    let name = unique_name("drain").replace('-', "");
    let reg = registrator(&backend.uri(), &[], &[]);
    let c = draining_web("reg-drain", &name, &[]);
    let id = id_of(&c, "80");
    backend.wait_present(&name, &id).await;

    docker(&["kill", "-s", "HUP", &c.id]);
    stays_for(Duration::from_secs(2), "registered after HUP", || {
        backend.present(&name, &id)
    })
    .await;
    assert!(running(&c));

    let cid = c.id.clone();
    let called = std::time::Instant::now();
    let called_ns = unix_ns();
    let stop = tokio::task::spawn_blocking(move || {
        docker(&["stop", "-t", "10", &cid]);
        std::time::Instant::now()
    });
    let (gone, gone_ns) = poll(WAIT, Duration::from_millis(2), || async {
        (!backend.present(&name, &id).await).then(|| (std::time::Instant::now(), unix_ns()))
    })
    .await
    .expect("withdrawn on docker stop");
    // The container is still finishing its work: it was withdrawn before it exited.
    assert!(running(&c), "the container exited before it was withdrawn");
    assert!(!stop.is_finished());
    let returned = stop.await.unwrap();
    assert!(!running(&c));
    // From Docker's kill event: to the registrator's log line, and to a reader seeing it gone.
    let kill_ns = kill_event_ns(&c.id, "15", called_ns);
    let needle = format!("deregistered {id}");
    let out = reg.output();
    let line = out
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_default();
    let day = 86_400 * 1_000_000_000i64;
    let logged = log_time_of_day_ns(line)
        .map(|t| ((t - kill_ns.rem_euclid(day)).rem_euclid(day)) as f64 / 1e6);
    println!(
        "drain ({}): docker stop called -> gone from the store {:.1} ms; kill event -> \
         registrator logged the deregistration {:.1} ms, -> a reader saw it gone {:.1} ms; \
         the container exited {:.0} ms after the call",
        match backend {
            Backend::Consul(_) => "consul",
            Backend::Etcd(_) => "etcd",
        },
        (gone - called).as_secs_f64() * 1000.0,
        logged.unwrap_or(f64::NAN),
        (gone_ns - kill_ns) as f64 / 1e6,
        (returned - called).as_secs_f64() * 1000.0
    );
    assert!(
        gone - called < Duration::from_secs(2),
        "{:?}",
        gone - called
    );
}

#[tokio::test]
async fn stop_signal_drains_before_exit_reload_signal_does_not_consul() {
    drain_scenario(Backend::Consul(Consul::start().await)).await;
}

#[tokio::test]
async fn stop_signal_drains_before_exit_reload_signal_does_not_etcd() {
    drain_scenario(Backend::Etcd(Etcd::start().await)).await;
}

/// A stop signal the container ignores (sent with `docker kill -s TERM`, so no SIGKILL
/// follows) withdraws it, and it is served again once its stop timeout (1 s) plus the 5 s
/// margin has passed and it still runs. A container whose stop signal is `SIGUSR1` drains on
/// USR1, not on TERM.
#[tokio::test]
async fn ignored_stop_signal_is_served_again_and_custom_stop_signals_drain() {
    let consul = Consul::start().await;
    let backend = Backend::Consul(consul);
    let name = unique_name("ignore").replace('-', "");
    let _reg = registrator(&backend.uri(), &[], &[]);
    let service = format!("SERVICE_NAME={name}");
    let deaf = Container::run(
        "reg-deaf",
        &[
            "-p",
            "80",
            "-e",
            &service,
            "--stop-timeout",
            "1",
            TEST_IMAGE,
            "sh",
            "-c",
            "trap '' TERM; httpd -p 80 -h /www; while true; do sleep 1; done",
        ],
    );
    let usr1 = Container::run(
        "reg-usr1",
        &[
            "-p",
            "80",
            "-e",
            &service,
            "--stop-signal",
            "SIGUSR1",
            TEST_IMAGE,
            "sh",
            "-c",
            "trap '' TERM; trap 'sleep 2; exit 0' USR1; httpd -p 80 -h /www; \
             while true; do sleep 1; done",
        ],
    );
    let (deaf_id, usr1_id) = (id_of(&deaf, "80"), id_of(&usr1, "80"));
    backend.wait_present(&name, &deaf_id).await;
    backend.wait_present(&name, &usr1_id).await;

    let killed = std::time::Instant::now();
    docker(&["kill", "-s", "TERM", &deaf.id]);
    docker(&["kill", "-s", "TERM", &usr1.id]);
    backend.wait_absent(&name, &deaf_id).await;
    let withdrawn = killed.elapsed();
    // TERM is not usr1's stop signal: nothing withdrawn.
    stays_for(Duration::from_secs(2), "usr1 registered after TERM", || {
        backend.present(&name, &usr1_id)
    })
    .await;
    let cid = usr1.id.clone();
    let stop = tokio::task::spawn_blocking(move || docker(&["stop", "-t", "10", &cid]));
    backend.wait_absent(&name, &usr1_id).await;
    assert!(running(&usr1), "usr1 exited before it was withdrawn");
    stop.await.unwrap();

    // The deaf container still runs after its stop timeout + margin: served again.
    backend.wait_present(&name, &deaf_id).await;
    let back = killed.elapsed();
    assert!(running(&deaf));
    println!("ignored TERM: withdrawn after {withdrawn:?}, registered again after {back:?}");
    assert!(withdrawn < Duration::from_secs(2), "{withdrawn:?}");
    assert!(back >= Duration::from_secs(5), "{back:?}");
}

/// `SERVICE_DRAIN=false`: the container stays registered through its stop signal and leaves
/// when it exits, as before.
#[tokio::test]
async fn drain_opt_out_stays_registered_until_exit() {
    let consul = Consul::start().await;
    let backend = Backend::Consul(consul);
    let name = unique_name("optout").replace('-', "");
    let _reg = registrator(&backend.uri(), &[], &[]);
    let c = draining_web("reg-optout", &name, &["-l", "SERVICE_DRAIN=false"]);
    let id = id_of(&c, "80");
    backend.wait_present(&name, &id).await;
    let cid = c.id.clone();
    let stop = tokio::task::spawn_blocking(move || docker(&["stop", "-t", "10", &cid]));
    // It takes at least 2 s to exit (its TERM trap sleeps 3 s after the current `sleep 1`).
    stays_for(
        Duration::from_millis(1500),
        "registered while stopping",
        || backend.present(&name, &id),
    )
    .await;
    assert!(running(&c));
    stop.await.unwrap();
    backend.wait_absent(&name, &id).await;
}

// ---- Drop-in gaps (issue 13): gliderlabs' check labels, image IDs, networks, Docker health.

/// The agent's checks of one service ID (`/v1/agent/checks`), by check ID.
async fn checks_of(consul: &Consul, service_id: &str) -> Vec<Value> {
    let all = consul.get_json("/v1/agent/checks").await;
    all.as_object()
        .map(|m| {
            m.values()
                .filter(|c| c["ServiceID"] == service_id)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `service_id` has a check of `kind` (Consul's `Type`) for which `ok` holds.
async fn wait_check(
    consul: &Consul,
    service_id: &str,
    kind: &str,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    wait_for(
        &format!("{service_id}: {kind} check {what}"),
        WAIT,
        || async {
            checks_of(consul, service_id)
                .await
                .into_iter()
                .find(|c| c["Type"] == kind && ok(c))
        },
    )
    .await
}

/// `SERVICE_CHECK_CMD` becomes a Consul Docker check run inside the container, whose status
/// is real (the agent reaches this engine's socket); `SERVICE_CHECK_HTTP_METHOD` reaches the
/// HTTP check; `SERVICE_CHECK_GRPC` a gRPC check; none of them is metadata; a bad method is
/// one warning and the check stays.
#[tokio::test]
async fn dropin_cmd_grpc_and_method_checks_reach_consul() {
    // Checks registered over the API need `enable_script_checks` (the local variant only
    // covers the agent's own config files); `Consul::start` enables it.
    let consul = Consul::start().await;
    let reg = registrator(&consul.uri(), &[], &[]);
    let cmd = web(
        "dropin-cmd",
        &[
            "-l",
            "SERVICE_CHECK_CMD=busybox test -f /tmp/ok",
            "-l",
            "SERVICE_CHECK_INTERVAL=1s",
        ],
    );
    let head = web(
        "dropin-head",
        &[
            "-l",
            "SERVICE_CHECK_HTTP=/",
            "-l",
            "SERVICE_CHECK_HTTP_METHOD=HEAD",
            "-l",
            "SERVICE_CHECK_INTERVAL=1s",
        ],
    );
    let grpc = web(
        "dropin-grpc",
        &[
            "-l",
            "SERVICE_CHECK_GRPC=grpc.health.v1.Health",
            "-l",
            "SERVICE_CHECK_GRPC_USE_TLS=true",
            "-l",
            "SERVICE_CHECK_INTERVAL=1s",
        ],
    );
    let https = web(
        "dropin-https",
        &[
            "-l",
            "SERVICE_CHECK_HTTPS=/",
            "-l",
            "SERVICE_CHECK_HTTPS_METHOD=POST",
            "-l",
            "SERVICE_CHECK_TLS_SKIP_VERIFY=true",
            "-l",
            "SERVICE_CHECK_INTERVAL=1s",
        ],
    );
    let bad = web(
        "dropin-badmethod",
        &[
            "-l",
            "SERVICE_CHECK_HTTP=/",
            "-l",
            "SERVICE_CHECK_HTTP_METHOD=GET / HTTP/1.0",
            "-l",
            "SERVICE_CHECK_INTERVAL=1s",
        ],
    );
    let (cmd_id, head_id, grpc_id, bad_id) = (
        id_of(&cmd, "80"),
        id_of(&head, "80"),
        id_of(&grpc, "80"),
        id_of(&bad, "80"),
    );
    for id in [&cmd_id, &head_id, &grpc_id, &bad_id] {
        let s = wait_consul(&consul, id).await;
        assert_eq!(s["Meta"], serde_json::json!({}), "{id}: {s}");
    }

    // The Docker check runs `busybox test -f /tmp/ok` in the container. Consul reads exit
    // status 1 as warning (0 passing, anything else critical): warning, then passing once
    // the file exists, then warning again.
    wait_check(&consul, &cmd_id, "docker", "warning", |c| {
        c["Status"] == "warning"
    })
    .await;
    docker(&["exec", &cmd.id, "sh", "-c", "echo > /tmp/ok"]);
    wait_check(&consul, &cmd_id, "docker", "passing", |c| {
        c["Status"] == "passing"
    })
    .await;
    docker(&["exec", &cmd.id, "busybox", "rm", "/tmp/ok"]);
    wait_check(&consul, &cmd_id, "docker", "warning again", |c| {
        c["Status"] == "warning"
    })
    .await;

    // The HTTP check sends HEAD (Consul's output names the method) and passes.
    let port = head.host_port("80/tcp");
    let want = format!("HTTP HEAD http://127.0.0.1:{port}/");
    wait_check(&consul, &head_id, "http", "probing with HEAD", |c| {
        c["Status"] == "passing" && c["Output"].as_str().unwrap_or_default().contains(&want)
    })
    .await;

    // The HTTPS check POSTs (Go's error names the method; the server speaks plain HTTP, so
    // the check fails, as it must).
    let https_id = id_of(&https, "80");
    let c = wait_check(&consul, &https_id, "http", "probing with POST", |c| {
        c["Output"].as_str().unwrap_or_default().contains("Post")
    })
    .await;
    assert_eq!(c["Status"], "critical", "{c}");
    assert_eq!(
        consul_service(&consul, &https_id).await.unwrap()["Meta"],
        serde_json::json!({})
    );

    // A gRPC check (over TLS, against a plain HTTP server: it fails, as it must).
    wait_check(&consul, &grpc_id, "grpc", "critical", |c| {
        c["Status"] == "critical"
    })
    .await;

    // The bad method: one warning naming it, and the check still probes with GET.
    let port = bad.host_port("80/tcp");
    let want = format!("HTTP GET http://127.0.0.1:{port}/");
    wait_check(&consul, &bad_id, "http", "probing with GET", |c| {
        c["Output"].as_str().unwrap_or_default().contains(&want)
    })
    .await;
    let out = reg.output();
    let warned: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("SERVICE_CHECK_HTTP_METHOD") && l.contains(&bad.name))
        .collect();
    assert_eq!(warned.len(), 1, "{out}");
    assert!(warned[0].contains("an HTTP method"), "{}", warned[0]);
}

/// A container created from an image ID (`sha256:...`, as after its tag moved on) is named
/// after the container, with a warning, never `sha256`.
#[tokio::test]
async fn dropin_image_by_id_is_not_named_sha256() {
    let consul = Consul::start().await;
    let reg = registrator(&consul.uri(), &[], &[]);
    ensure_test_image();
    let image_id = docker(&["image", "inspect", "-f", "{{.Id}}", TEST_IMAGE]);
    assert!(image_id.starts_with("sha256:"), "{image_id}");
    let c = Container::run(
        "dropin-byid",
        &[
            "-p", "80", &image_id, "httpd", "-f", "-p", "80", "-h", "/www",
        ],
    );
    let s = wait_consul(&consul, &id_of(&c, "80")).await;
    assert_eq!(s["Service"], c.name.as_str(), "{s}");
    reg.wait_output("set SERVICE_NAME", WAIT).await;
    let named = Container::run(
        "dropin-byid-named",
        &[
            "-p",
            "80",
            "-l",
            "SERVICE_NAME=byid",
            &image_id,
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            "/www",
        ],
    );
    let s = wait_consul(&consul, &id_of(&named, "80")).await;
    assert_eq!(s["Service"], "byid", "{s}");
    let names = consul.get_json("/v1/agent/services").await;
    assert!(
        names
            .as_object()
            .unwrap()
            .values()
            .all(|s| s["Service"] != "sha256"),
        "{names}"
    );
}

/// A user-defined Docker network, removed on drop.
struct Network(String);

impl Network {
    fn create(tag: &str) -> Network {
        let name = format!("dropin-{tag}-{}", std::process::id());
        docker(&["network", "create", "--label", TEST_LABEL, &name]);
        Network(name)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["network", "rm", &self.0])
            .output();
    }
}

/// The container's address on one network.
fn ip_on(c: &Container, network: &str) -> String {
    let ip = docker(&[
        "inspect",
        "-f",
        &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
        &c.id,
    ]);
    assert!(!ip.is_empty(), "{} has no address on {network}", c.name);
    ip
}

/// Containers on two networks: `-internal -network` picks the flag's network for every
/// container on it, `SERVICE_NETWORK` overrides it per container, and a container not on the
/// flag's network keeps its own address.
#[tokio::test]
async fn dropin_network_choice_on_multi_network_containers() {
    let (front, back) = (Network::create("front"), Network::create("back"));
    let on_both = |tag: &str, extra: &[&str]| {
        let mut args = vec!["--network", front.0.as_str()];
        args.extend_from_slice(extra);
        let c = web(tag, &args);
        docker(&["network", "connect", &back.0, &c.id]);
        c
    };
    let by_flag = on_both("dropin-net-flag", &[]);
    let by_label = on_both(
        "dropin-net-label",
        &["-l", &format!("SERVICE_NETWORK={}", front.0)],
    );
    let typo = on_both("dropin-net-typo", &["-l", "SERVICE_NETWORK=no-such-net"]);
    let front_only = web("dropin-net-one", &["--network", &front.0]);
    let consul = Consul::start().await;
    // Inspected after both networks are attached: the first listing sees them all.
    let reg = registrator(&consul.uri(), &["-internal", "-network", &back.0], &[]);
    let cases = [
        (&by_flag, ip_on(&by_flag, &back.0)),
        (&by_label, ip_on(&by_label, &front.0)),
        (&typo, ip_on(&typo, &back.0)),
        (&front_only, ip_on(&front_only, &front.0)),
    ];
    for (c, want) in &cases {
        let s = wait_consul(&consul, &id_of(c, "80")).await;
        assert_eq!(s["Address"], want.as_str(), "{}: {s}", c.name);
        assert_eq!(s["Port"], 80, "{}: {s}", c.name);
    }
    assert_ne!(ip_on(&by_flag, &front.0), ip_on(&by_flag, &back.0));
    let out = reg.output();
    let warned: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("SERVICE_NETWORK"))
        .collect();
    assert_eq!(warned.len(), 1, "{out}");
    assert!(
        warned[0].contains(&typo.name) && warned[0].contains(&back.0),
        "{}",
        warned[0]
    );
    // The containers, declared after the networks, are removed before them (a network in
    // use cannot be removed).
}

/// `consul-unix://` and `consulkv-unix://`: a Consul agent listening on a Unix socket (as well
/// as loopback TCP, which the test reads through).
#[tokio::test]
async fn dropin_consul_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("consul.sock");
    let sock = sock.to_str().unwrap();
    let consul = Consul::start_with(&format!(
        "addresses {{ http = \"127.0.0.1 unix://{sock}\" }}"
    ))
    .await;
    let reg = registrator(&format!("consul-unix://{sock}"), &[], &[]);
    let kv = registrator(&format!("consulkv-unix://{sock}:/dropin"), &[], &[]);
    let c = web("dropin-unix", &[]);
    let id = id_of(&c, "80");
    let port = c.host_port("80/tcp");
    let s = wait_consul(&consul, &id).await;
    assert_eq!(s["Port"], port);
    reg.wait_output(&format!("store unix://{sock}"), WAIT).await;
    let key = format!("/v1/kv/dropin/busybox/{id}?raw");
    let value = wait_for("the KV entry", WAIT, || async {
        let r = reqwest::get(format!("{}{key}", consul.http())).await.ok()?;
        r.status().is_success().then_some(r.text().await.ok()?)
    })
    .await;
    assert_eq!(value, format!("127.0.0.1:{port}"));
    drop(c);
    wait_consul_gone(&consul, &id).await;
    wait_for("the KV entry removed", WAIT, || async {
        let r = reqwest::get(format!("{}{key}", consul.http())).await.ok()?;
        (r.status() == 404).then_some(())
    })
    .await;
    drop(kv);
}

/// A container with a Docker HEALTHCHECK stays registered in Consul with a check whose status
/// follows Docker's: critical while unhealthy (with Docker's word for it), passing once
/// healthy, critical again when it fails, instead of the service vanishing (gliderlabs#578).
/// A registrator restarted meanwhile sets the status it finds.
#[tokio::test]
async fn dropin_docker_health_drives_a_consul_check() {
    let consul = Consul::start().await;
    let c = web(
        "dropin-health",
        &[
            "--health-cmd",
            "test -f /tmp/ok",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
        ],
    );
    let mut reg = registrator(&consul.uri(), &[], &[]);
    let id = id_of(&c, "80");
    let check_id = format!("service:{id}:docker-health");
    let status = |want: &'static str| {
        let (consul, check_id) = (&consul, &check_id);
        async move {
            wait_for(&format!("{check_id} {want}"), WAIT, || async move {
                let c = consul_check(consul, check_id).await?;
                // The status and its output are set together, after the registration.
                let said = c["Output"].as_str()?.starts_with("Docker health: ");
                (c["Status"] == want && said).then_some(c)
            })
            .await
        }
    };
    // Registered while starting or unhealthy, with a critical check saying so.
    wait_consul(&consul, &id).await;
    let check = status("critical").await;
    assert_eq!(check["Type"], "ttl", "{check}");
    docker(&["exec", &c.id, "sh", "-c", "echo > /tmp/ok"]);
    let check = status("passing").await;
    assert_eq!(check["Output"], "Docker health: healthy", "{check}");
    docker(&["exec", &c.id, "busybox", "rm", "/tmp/ok"]);
    let check = status("critical").await;
    assert_eq!(check["Output"], "Docker health: unhealthy", "{check}");
    // Still registered throughout: Consul shows why instead of forgetting it.
    assert!(consul_service(&consul, &id).await.is_some());

    // Healthy again while no registrator runs: the next one sets the status it finds.
    reg.signal(libc::SIGTERM);
    reg.wait_exit(WAIT).await;
    docker(&["exec", &c.id, "sh", "-c", "echo > /tmp/ok"]);
    wait_for("docker reports healthy", WAIT, || async {
        let s = docker(&["inspect", "-f", "{{.State.Health.Status}}", &c.id]);
        (s == "healthy").then_some(())
    })
    .await;
    assert_eq!(
        consul_check(&consul, &check_id).await.unwrap()["Status"],
        "critical"
    );
    let _reg = registrator(&consul.uri(), &[], &[]);
    status("passing").await;
}

/// An image of this build's registrator (the project's Dockerfile, the debug binary), removed
/// on drop. Named for this test process, so nothing shared is touched.
struct RegistratorImage(String);

impl RegistratorImage {
    fn build() -> RegistratorImage {
        let ctx = tempfile::tempdir().unwrap();
        std::fs::copy(bin("registrator"), ctx.path().join("registrator")).unwrap();
        let dockerfile = workspace_root().join("compose/images/registrator/Dockerfile");
        let tag = format!("dropin-registrator:{}", std::process::id());
        docker(&[
            "build",
            "-q",
            "-t",
            &tag,
            "-f",
            dockerfile.to_str().unwrap(),
            ctx.path().to_str().unwrap(),
        ]);
        RegistratorImage(tag)
    }
}

impl Drop for RegistratorImage {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
    }
}

/// gliderlabs' documented run line, verbatim but for the image name: the socket mounted at
/// `/tmp/docker.sock`, no DOCKER_HOST, the host's network.
#[tokio::test]
async fn dropin_gliderlabs_run_line_works_verbatim() {
    let consul = Consul::start().await;
    let image = RegistratorImage::build();
    let uri = format!("consul://localhost:{}", consul.port);
    let reg = Container::run(
        "dropin-gl-registrator",
        &[
            "--net=host",
            "--volume=/var/run/docker.sock:/tmp/docker.sock",
            &image.0,
            &uri,
        ],
    );
    let c = web("dropin-gl-web", &[]);
    let s = wait_consul(&consul, &id_of(&c, "80")).await;
    assert_eq!(s["Port"], c.host_port("80/tcp"), "{s}");
    // It found the engine at gliderlabs' path (its log goes to stderr).
    let out = Command::new("docker")
        .args(["logs", &reg.id])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("docker engine: the local socket /tmp/docker.sock"),
        "{log}"
    );
}

/// `SERVICE_CHECK_TLS_SKIP_VERIFY` against a real HTTPS server whose certificate no public
/// root signed: the check that skips verification passes, the one that verifies fails on the
/// certificate. (Both containers use the host's network, exposing the port `openssl
/// s_server` listens on, so the service address is that server's.)
#[tokio::test]
async fn dropin_tls_skip_verify_reaches_the_https_check() {
    let pki = Pki::generate("dropin-ca");
    let port = free_port().to_string();
    let _server = Process::spawn(
        std::path::Path::new("openssl"),
        &[
            "s_server",
            "-accept",
            &format!("127.0.0.1:{port}"),
            "-cert",
            &pki.path("server.pem"),
            "-key",
            &pki.path("server.key"),
            "-www",
        ],
        &[],
    );
    let consul = Consul::start().await;
    let _reg = registrator(&consul.uri(), &[], &[]);
    let https = |tag: &str, skip: &str| {
        Container::run(
            tag,
            &[
                "--net=host",
                "--expose",
                &port,
                "-l",
                "SERVICE_CHECK_HTTPS=/",
                "-l",
                &format!("SERVICE_CHECK_TLS_SKIP_VERIFY={skip}"),
                "-l",
                "SERVICE_CHECK_INTERVAL=1s",
                TEST_IMAGE,
                "sleep",
                "600",
            ],
        )
    };
    let (skip, verify) = (
        https("dropin-skip", "true"),
        https("dropin-verify", "false"),
    );
    let (skip_id, verify_id) = (id_of(&skip, &port), id_of(&verify, &port));
    wait_consul(&consul, &skip_id).await;
    wait_consul(&consul, &verify_id).await;
    let url = format!("https://127.0.0.1:{port}/");
    wait_check(
        &consul,
        &skip_id,
        "http",
        "passing without verification",
        |c| c["Status"] == "passing" && c["Output"].as_str().unwrap_or_default().contains(&url),
    )
    .await;
    let c = wait_check(&consul, &verify_id, "http", "failing verification", |c| {
        c["Status"] == "critical"
            && c["Output"]
                .as_str()
                .unwrap_or_default()
                .contains("certificate")
    })
    .await;
    assert!(c["Output"].as_str().unwrap().contains(&url), "{c}");
}
