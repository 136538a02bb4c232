//! The `registrator` binary as a drop-in for gliderlabs/registrator: its check labels
//! (`SERVICE_CHECK_CMD`, `_GRPC`, `_HTTP_METHOD`, `_TLS_SKIP_VERIFY`), containers created from
//! an image ID, the network choice on multi-network containers, Consul over a Unix socket,
//! Docker health as a Consul check, and gliderlabs' documented run line in a container.
//!
//! As in the other `registrator_*` binaries, every assertion looks only at this test's own
//! containers (by service ID).

use serde_json::Value;
use std::process::Command;
use switchboard_tests::registrator::*;
use switchboard_tests::*;

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
        consul.agent_service(&https_id).await.unwrap()["Meta"],
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
                let c = consul.agent_check(check_id).await?;
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
    assert!(consul.agent_service(&id).await.is_some());

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
        consul.agent_check(&check_id).await.unwrap()["Status"],
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
