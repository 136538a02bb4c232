//! The `registrator` binary end to end, what it derives from a container: service names,
//! ports and protocols, tags and metadata from labels and env, checks, the label filter and
//! scope, the address flags, health gating, and how flags and URIs are refused. A real Docker
//! engine, a real Consul dev agent or etcd member, and the binary as users run it (build it
//! first: `cargo build -p registrator`).
//!
//! Other tests' containers exist on the same engine, so every assertion looks only at this
//! test's own containers (by name, hence by service ID `<hostname>:<container>:<port>`).
//! The gliderlabs drop-in labels and setups are in `registrator_dropin.rs`, what stays
//! registered through outages and restarts in `registrator_store.rs`, stop signals and
//! drains in `registrator_drain.rs`.

use std::process::Command;
use switchboard_tests::registrator::*;
use switchboard_tests::*;

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
