//! Checks the harness itself: real Consul, etcd and Docker start and answer.

use std::time::Duration;
use switchboard_tests::*;

#[tokio::test]
async fn consul_etcd_and_docker_start() {
    let mut consul = Consul::start().await;
    assert!(consul
        .get_json("/v1/catalog/services")
        .await
        .get("consul")
        .is_some());
    consul.restart().await;
    assert!(consul
        .get_json("/v1/catalog/services")
        .await
        .get("consul")
        .is_some());

    let mut etcd = Etcd::start().await;
    reqwest::Client::new()
        .post(format!("{}/v3/kv/put", etcd.http()))
        .body(r#"{"key":"L3Rlc3QvYQ==","value":"MQ=="}"#)
        .send()
        .await
        .unwrap();
    etcd.restart().await;
    assert_eq!(
        etcd.get_prefix("/test/").await,
        vec![("/test/a".into(), "1".into())]
    );

    let c = Container::run(
        "harness",
        &[
            "-p", "80", TEST_IMAGE, "httpd", "-f", "-p", "80", "-h", "/www",
        ],
    );
    let port = c.host_port("80/tcp");
    let body = wait_for("httpd answers", Duration::from_secs(10), || async move {
        reqwest::get(format!("http://127.0.0.1:{port}/"))
            .await
            .ok()?
            .text()
            .await
            .ok()
    })
    .await;
    assert_eq!(body.trim(), "ok");
}

/// Both binaries name their release and the commit they were built from: the tests run the
/// binaries `cargo build` made from this checkout, so the commit is its HEAD.
#[test]
fn version_names_the_commit() {
    let head = run_cmd("git", &["rev-parse", "--short=12", "HEAD"]).expect("git rev-parse");
    for (name, flag) in [("confd", "--version"), ("registrator", "-version")] {
        let out = std::process::Command::new(bin(name))
            .arg(flag)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name} {flag}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let want = format!(
            "{name} {} (commit {})",
            env!("CARGO_PKG_VERSION"),
            head.trim()
        );
        assert_eq!(text.trim(), want, "{name} {flag}");
    }
}
