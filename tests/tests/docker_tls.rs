//! registrator and a Docker engine over TLS, the docker CLI's way (`DOCKER_HOST=tcp://...`,
//! `DOCKER_TLS_VERIFY`, `DOCKER_CERT_PATH`): a real second dockerd listening with
//! `--tlsverify` on loopback, certificates made by openssl.

use std::path::Path;
use std::time::Duration;
use switchboard_tests::*;

/// Upper bound for any single wait in these tests.
const WAIT: Duration = Duration::from_secs(30);

/// The engine's bridge and subnet (unused elsewhere on these machines).
const BRIDGE: &str = "br-sbtls";
const BRIDGE_CIDR: &str = "10.213.59.1/24";

/// A DOCKER_CERT_PATH directory: `ca.pem`, `cert.pem`, `key.pem` copied from these files.
fn cert_dir(ca: &str, cert: &str, key: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (from, to) in [(ca, "ca.pem"), (cert, "cert.pem"), (key, "key.pem")] {
        std::fs::copy(from, d.path().join(to)).unwrap();
    }
    d
}

/// Runs registrator to its exit with this engine environment; (success, output).
async fn registrator_exit(consul: &Consul, host: &str, certs: &Path) -> (bool, String) {
    let mut p = Process::spawn(
        &bin("registrator"),
        &["--hostname", "sbtls", "-internal", &consul.uri()],
        &[
            ("DOCKER_HOST", host),
            ("DOCKER_TLS_VERIFY", "1"),
            ("DOCKER_CERT_PATH", &certs.display().to_string()),
        ],
    );
    let st = p.wait_exit(WAIT).await;
    (st.success(), p.output())
}

#[tokio::test]
async fn registrator_reaches_a_docker_engine_over_tls() {
    assert!(
        which("dockerd").is_some(),
        "dockerd is not installed: scripts/setup installs it"
    );
    ensure_test_image();
    let pki = Pki::generate("sbtls-ca");
    let other = Pki::generate("sbtls-other-ca");
    let port = free_port();
    let tcp = format!("tcp://127.0.0.1:{port}");
    let engine = DockerEngine::start_with(
        BRIDGE,
        BRIDGE_CIDR,
        &[
            "--host",
            &tcp,
            "--tlsverify",
            "--tlscacert",
            &pki.path("ca.pem"),
            "--tlscert",
            &pki.path("server.pem"),
            "--tlskey",
            &pki.path("server.key"),
        ],
    );
    let consul = Consul::start().await;

    // A CA that did not sign the engine's certificate: one line naming certificate
    // verification and DOCKER_HOST, non-zero exit, no key material.
    let wrong_ca = cert_dir(
        &other.path("ca.pem"),
        &pki.path("client.pem"),
        &pki.path("client.key"),
    );
    let (ok, out) = registrator_exit(&consul, &tcp, wrong_ca.path()).await;
    assert!(!ok, "registrator must fail:\n{out}");
    let line = out
        .lines()
        .find(|l| l.contains("certificate verification failed"))
        .unwrap_or_else(|| panic!("no certificate verification error:\n{out}"));
    println!("wrong CA: {line}");
    assert!(line.contains(&format!("DOCKER_HOST={tcp}")), "{line}");
    assert!(!out.contains("PRIVATE KEY"), "{out}");

    // A client certificate the engine does not trust: the engine refuses the handshake.
    let untrusted = cert_dir(
        &pki.path("ca.pem"),
        &other.path("client.pem"),
        &other.path("client.key"),
    );
    let (ok, out) = registrator_exit(&consul, &tcp, untrusted.path()).await;
    assert!(!ok, "registrator must fail:\n{out}");
    assert!(
        out.contains(&format!("DOCKER_HOST={tcp}"))
            && out.contains("refused the handshake (client certificate"),
        "{out}"
    );
    println!("untrusted client certificate: {}", out.trim());

    // No client certificate at all: refused at start, naming the file.
    let missing = cert_dir(
        &pki.path("ca.pem"),
        &pki.path("client.pem"),
        &pki.path("client.key"),
    );
    std::fs::remove_file(missing.path().join("cert.pem")).unwrap();
    let (ok, out) = registrator_exit(&consul, &tcp, missing.path()).await;
    assert!(!ok, "registrator must fail:\n{out}");
    assert!(
        out.contains(&format!("DOCKER_HOST={tcp}"))
            && out.contains(&format!("{}/cert.pem", missing.path().display())),
        "{out}"
    );
    println!("missing cert.pem: {}", out.trim());

    // The right certificates: registrator connects and registers a container of that engine.
    let good = cert_dir(
        &pki.path("ca.pem"),
        &pki.path("client.pem"),
        &pki.path("client.key"),
    );
    let reg = Process::spawn(
        &bin("registrator"),
        &["--hostname", "sbtls", "-internal", &consul.uri()],
        &[
            ("DOCKER_HOST", &tcp),
            ("DOCKER_TLS_VERIFY", "1"),
            ("DOCKER_CERT_PATH", &good.path().display().to_string()),
        ],
    );
    let (_, name) = engine.run(
        "tls",
        &[
            "--expose".into(),
            "8000".into(),
            TEST_IMAGE.into(),
            "httpd".into(),
            "-f".into(),
            "-p".into(),
            "8000".into(),
        ],
    );
    let id = format!("sbtls:{name}:8000");
    let found = poll(WAIT, Duration::from_millis(200), || {
        let id = id.clone();
        let consul = &consul;
        async move { consul.agent_service_ids().await.contains(&id).then_some(()) }
    })
    .await;
    assert!(
        found.is_some(),
        "{id} not registered; registrator output:\n{}",
        reg.output()
    );
}

/// The path of `program` on PATH, if any.
fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
