//! The `registrator` binary end to end: a real Docker engine, a real Consul dev agent or etcd
//! member, and the binary as users run it (build it first: `cargo build -p registrator`).
//!
//! Other tests' containers exist on the same engine, so every assertion looks only at this
//! test's own containers (by name, hence by service ID `<hostname>:<container>:<port>`).

use serde_json::Value;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchboard_tests::*;
use tokio::net::{TcpListener, UnixStream};
use tokio_util_free::Token;

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

/// A TCP front for the Docker socket whose connections can be cut (all dropped, new ones
/// refused) and restored: an engine outage as the registrator sees it, without touching the
/// engine other tests share.
struct DockerProxy {
    port: u16,
    state: Arc<Mutex<Token>>,
    task: tokio::task::JoinHandle<()>,
}

mod tokio_util_free {
    //! A tiny cancellation token (the tests crate does not depend on tokio-util).
    use tokio::sync::watch;

    /// Fires once; clones share it.
    #[derive(Clone)]
    pub struct Token(watch::Sender<bool>);

    impl Token {
        pub fn new() -> Token {
            Token(watch::channel(false).0)
        }
        pub fn cancel(&self) {
            self.0.send_replace(true);
        }
        pub fn is_cancelled(&self) -> bool {
            *self.0.borrow()
        }
        pub async fn cancelled(&self) {
            let mut rx = self.0.subscribe();
            let _ = rx.wait_for(|c| *c).await;
        }
    }
}

impl DockerProxy {
    async fn start() -> DockerProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(Token::new()));
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    continue;
                };
                let token = st.lock().unwrap().clone();
                if token.is_cancelled() {
                    drop(tcp);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut unix) = UnixStream::connect("/var/run/docker.sock").await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix) => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        DockerProxy { port, state, task }
    }

    fn docker_host(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.state.lock().unwrap().cancel();
    }

    fn restore(&self) {
        *self.state.lock().unwrap() = Token::new();
    }
}

impl Drop for DockerProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
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
async fn sigterm_deregisters_and_keep_on_exit_keeps() {
    let consul = Consul::start().await;
    let mut reg = registrator(&consul.uri(), &[], &[]);
    let c = web("reg-sigterm", &[]);
    let id = id_of(&c, "80");
    wait_consul(&consul, &id).await;
    reg.signal(libc::SIGTERM);
    let st = reg.wait_exit(WAIT).await;
    assert!(st.success(), "{st:?}: {}", reg.output());
    assert!(consul_service(&consul, &id).await.is_none());

    let mut keep = registrator(&consul.uri(), &["--keep-on-exit"], &[]);
    wait_consul(&consul, &id).await;
    keep.signal(libc::SIGTERM);
    let st = keep.wait_exit(WAIT).await;
    assert!(st.success(), "{st:?}: {}", keep.output());
    assert!(consul_service(&consul, &id).await.is_some());
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

#[tokio::test]
async fn docker_healthcheck_gates_registration() {
    let consul = Consul::start().await;
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
    let reg = registrator(&consul.uri(), &[], &[]);
    let id = id_of(&c, "80");
    // Nothing is registered before the first listing is fully inspected, so once the
    // sentinel is there, the unhealthy container was judged too.
    wait_consul(&consul, &id_of(&sentinel, "80")).await;
    assert!(
        consul_service(&consul, &id).await.is_none(),
        "{}",
        reg.output()
    );

    docker(&["exec", &c.id, "sh", "-c", "echo > /tmp/ok"]);
    wait_consul(&consul, &id).await;
    docker(&["exec", &c.id, "busybox", "rm", "/tmp/ok"]);
    wait_consul_gone(&consul, &id).await;
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
