//! Automatic HTTPS against a real ACME server (pebble) and a real Consul or etcd: confd
//! obtains a certificate for a registered virtual host and keeps it in the store; two confds
//! share one, and a holder killed mid-order is replaced; faults stay with their host; due and
//! expired certificates show on `/healthz`; a SIGHUP moves ACME to the new source.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use switchboard::store::{KvStore, StoreSettings};
use switchboard::{RegistryUri, Service, Store};
use switchboard_tests::*;

const HOST: &str = "app.example.test";
const WAIT: Duration = Duration::from_secs(60);

fn web(vhost: &str) -> Service {
    Service {
        id: format!("h:{vhost}:80"),
        name: "web".into(),
        address: "127.0.0.1".into(),
        port: 8080,
        tags: vec![],
        meta: BTreeMap::from([("vhost".to_string(), vhost.to_string())]),
        check: None,
        ttl: None,
        docker_health: None,
    }
}

/// A confd config with an `acme:` section (plus `extra`, lines of that section), in `dir`.
fn config_with(
    dir: &Path,
    backend: &str,
    directory: &str,
    ca_file: &Path,
    challenge: u16,
    metrics: u16,
    extra: &str,
) -> String {
    let tpl = dir.join("t.hbs");
    std::fs::write(&tpl, "rendered\n").unwrap();
    let path = dir.join(format!("confd-{challenge}.yaml"));
    std::fs::write(
        &path,
        format!(
            "backend: {backend}\nmetrics_addr: 127.0.0.1:{metrics}\ntemplates:\n  - src: {}\n    dest: {}\n\
             acme:\n  directory: {directory}\n  email: ops@example.test\n  ca_file: {}\n  challenge_addr: 127.0.0.1:{challenge}\n{extra}",
            tpl.display(),
            dir.join(format!("out-{challenge}")).display(),
            ca_file.display(),
        ),
    )
    .unwrap();
    path.display().to_string()
}

fn config(
    dir: &Path,
    backend: &str,
    directory: &str,
    ca_file: &Path,
    challenge: u16,
    metrics: u16,
) -> String {
    config_with(dir, backend, directory, ca_file, challenge, metrics, "")
}

/// The store a test runs against: its confd backend URI, kept alive with the test.
enum Backend {
    Consul(Consul),
    Etcd(Etcd),
}

impl Backend {
    async fn consul() -> Backend {
        Backend::Consul(Consul::start().await)
    }

    async fn etcd() -> Backend {
        Backend::Etcd(Etcd::start().await)
    }

    fn uri(&self) -> String {
        match self {
            Backend::Consul(c) => c.uri(),
            Backend::Etcd(e) => e.uri("svc"),
        }
    }

    async fn register(&self, vhost: &str) {
        Store::new(&RegistryUri::parse(&self.uri()).unwrap())
            .register(&web(vhost))
            .await
            .unwrap();
    }

    /// How long a dead holder keeps the lock at most, with `lock_ttl`: Consul frees a
    /// session between one and two TTLs (of at least 10 s) after its last renewal, etcd a
    /// lease one TTL after.
    fn dead_holder_bound(&self, lock_ttl: Duration) -> Duration {
        match self {
            Backend::Consul(_) => lock_ttl.max(Duration::from_secs(10)) * 2,
            Backend::Etcd(_) => lock_ttl,
        }
    }
}

fn kv(uri: &str) -> KvStore {
    KvStore::with_settings(
        &RegistryUri::parse(uri).unwrap(),
        "switchboard/acme/",
        &StoreSettings::default(),
    )
    .unwrap()
}

async fn stored_chain(store: &KvStore, host: &str) -> Option<String> {
    let v = store.get(&format!("certs/{host}")).await.ok()??;
    let rec: serde_json::Value = serde_json::from_slice(&v.value).ok()?;
    Some(rec["chain"].as_str()?.to_string())
}

/// confd on `backend` obtains a certificate from pebble, stores it and shows its expiry.
async fn obtains_a_certificate(backend: Backend) {
    let challenge = free_port();
    let pebble = Pebble::start(challenge).await;
    backend.register(HOST).await;
    let dir = tempfile::tempdir().unwrap();
    let metrics = free_port();
    let cfg = config(
        dir.path(),
        &backend.uri(),
        &pebble.directory(),
        &pebble.ca_file(),
        challenge,
        metrics,
    );
    let confd = spawn_confd(&["--config", &cfg]);
    let store = kv(&backend.uri());
    let chain = wait_for("a certificate in the store", WAIT, || {
        stored_chain(&store, HOST)
    })
    .await;
    pebble
        .verify(&chain, HOST)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", confd.output()));
    // The challenge tokens are gone once the order is done; the account stays.
    assert!(store.get("account").await.unwrap().is_some());
    let body = wait_for("the expiry gauge", WAIT, || async {
        let t = reqwest::get(format!("http://127.0.0.1:{metrics}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        t.contains(&format!(
            "confd_acme_certificate_expiry_timestamp_seconds{{host=\"{HOST}\"}}"
        ))
        .then_some(t)
    })
    .await;
    assert!(!body.contains("acme_order_failures_total{"), "{body}");
}

#[tokio::test]
async fn confd_obtains_a_certificate_from_pebble() {
    obtains_a_certificate(Backend::consul().await).await;
}

#[tokio::test]
async fn confd_obtains_a_certificate_on_etcd() {
    obtains_a_certificate(Backend::etcd().await).await;
}

#[tokio::test]
async fn two_confds_share_one_certificate() {
    let consul = Consul::start().await;
    // Pebble validates on one port: both confds' challenge listeners answer from the store,
    // so it does not matter which one pebble reaches.
    let (c1, c2) = (free_port(), free_port());
    let pebble = Pebble::start(c2).await;
    Store::new(&RegistryUri::parse(&consul.uri()).unwrap())
        .register(&web(HOST))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = spawn_confd(&[
        "--config",
        &config(
            dir.path(),
            &consul.uri(),
            &pebble.directory(),
            &pebble.ca_file(),
            c1,
            free_port(),
        ),
    ]);
    let b = spawn_confd(&[
        "--config",
        &config(
            dir.path(),
            &consul.uri(),
            &pebble.directory(),
            &pebble.ca_file(),
            c2,
            free_port(),
        ),
    ]);
    let store = kv(&consul.uri());
    let chain = wait_for("a certificate in the store", WAIT, || {
        stored_chain(&store, HOST)
    })
    .await;
    pebble.verify(&chain, HOST).await.unwrap();
    // Exactly one of them stored it; the other found it and stored nothing.
    let stored = |p: &Process| p.output().matches("acme: certificate stored").count();
    wait_for("both confds past their first pass", WAIT, || async {
        (stored(&a) + stored(&b) == 1).then_some(())
    })
    .await;
    assert_eq!(
        stored(&a) + stored(&b),
        1,
        "A:\n{}\nB:\n{}",
        a.output(),
        b.output()
    );
    assert_eq!(stored_chain(&store, HOST).await.unwrap(), chain);
}

#[tokio::test]
async fn unreachable_directory_backs_off_with_one_line_per_try() {
    let consul = Consul::start().await;
    Store::new(&RegistryUri::parse(&consul.uri()).unwrap())
        .register(&web(HOST))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate("unused");
    let directory = format!("https://127.0.0.1:{}/dir", free_port());
    let cfg = config(
        dir.path(),
        &consul.uri(),
        &directory,
        Path::new(&pki.path("ca.pem")),
        free_port(),
        free_port(),
    );
    let confd = spawn_confd(&["--config", &cfg]);
    // The render goes on.
    let out = dir.path().join(format!(
        "out-{}",
        cfg.trim_end_matches(".yaml").rsplit('-').next().unwrap()
    ));
    let rendered = poll(WAIT, Duration::from_millis(100), || async {
        std::fs::metadata(&out).ok()
    })
    .await;
    assert!(
        rendered.is_some(),
        "no render at {}:\n{}",
        out.display(),
        confd.output()
    );
    let line = format!("acme: {HOST}: ");
    wait_for("two failed tries", WAIT, || async {
        (confd.output().matches(&line).count() >= 2).then_some(())
    })
    .await;
    let log = confd.output();
    let first = log.lines().find(|l| l.contains(&line)).unwrap();
    assert!(first.contains("retrying in"), "{first}");
    assert!(first.contains(&directory[..20]), "{first}");
    // Backoff: over the first few seconds, far fewer tries than seconds x passes.
    let n = log.matches(&line).count();
    assert!(n <= 4, "{n} tries:\n{log}");
}

/// The lock holder is killed (`kill -9`) mid-order, while pebble's validation request is held
/// at a [`Gate`]: the other confd takes the lock once the store frees it and stores the
/// certificate, within the bound the lock's TTL gives.
async fn dead_holder_mid_order(backend: Backend, lock_ttl: Duration) {
    let (ca, cb) = (free_port(), free_port());
    // Pebble's validation goes through the gate to B's challenge listener (which answers
    // from the store whoever ordered).
    let gate = Gate::start(cb).await;
    let pebble = Pebble::start(gate.port()).await;
    backend.register(HOST).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("  lock_ttl: {}s\n", lock_ttl.as_secs());
    let cfg = |port| {
        config_with(
            dir.path(),
            &backend.uri(),
            &pebble.directory(),
            &pebble.ca_file(),
            port,
            free_port(),
            &extra,
        )
    };
    let mut a = spawn_confd(&["--config", &cfg(ca)]);
    // A holds the lock, its token is in the store, and pebble is validating it.
    wait_for("pebble's validation request at the gate", WAIT, || async {
        (gate.arrived() >= 1).then_some(())
    })
    .await;
    let store = kv(&backend.uri());
    let lock = String::from_utf8(store.get("lock").await.unwrap().unwrap().value).unwrap();
    assert!(
        lock.starts_with(&format!("confd pid {} on ", a.pid())),
        "{lock}"
    );
    assert!(a.output().contains("acme: took the lock"), "{}", a.output());
    let b = spawn_confd(&["--config", &cfg(cb)]);
    b.wait_output("answering ACME challenges on", WAIT).await;
    a.kill9();
    let killed = std::time::Instant::now();
    gate.open();
    // The lock's bound, plus one order (pebble answers in well under a second without its
    // sleeps) and a few store round trips.
    let bound = backend.dead_holder_bound(lock_ttl) + Duration::from_secs(10);
    let chain = poll(bound, Duration::from_millis(100), || {
        stored_chain(&store, HOST)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "no certificate within {bound:?} of the holder's death; B:\n{}",
            b.output()
        )
    });
    println!(
        "B stored the certificate {:?} after A died",
        killed.elapsed()
    );
    pebble.verify(&chain, HOST).await.unwrap();
    let log = b.output();
    assert!(log.contains("acme: took the lock"), "{log}");
    assert!(log.contains("acme: certificate stored"), "{log}");
    // B released the lock once done.
    wait_for("the lock released", WAIT, || async {
        store.get("lock").await.unwrap().is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn consul_dead_holder_mid_order_lets_the_other_finish() {
    dead_holder_mid_order(Backend::consul().await, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn etcd_dead_holder_mid_order_lets_the_other_finish() {
    dead_holder_mid_order(Backend::etcd().await, Duration::from_secs(2)).await;
}

/// `/metrics` of the confd serving it on `port`.
async fn metrics(port: u16) -> Option<String> {
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// A host the ACME server refuses and a host whose stored certificate is garbage: the first
/// fails alone (one line naming it, its own failure counter), the second is ordered again,
/// and the healthy host gets its certificate either way.
#[tokio::test]
async fn faults_affect_only_their_host() {
    const REFUSED: &str = "app.refused.test";
    const CORRUPT: &str = "corrupt.example.test";
    let backend = Backend::consul().await;
    let challenge = free_port();
    let pebble = Pebble::start_with(challenge, &["refused.test"]).await;
    for h in [HOST, REFUSED, CORRUPT] {
        backend.register(h).await;
    }
    let store = kv(&backend.uri());
    store
        .put(&format!("certs/{CORRUPT}"), b"\x00garbage{")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = config(
        dir.path(),
        &backend.uri(),
        &pebble.directory(),
        &pebble.ca_file(),
        challenge,
        port,
    );
    let confd = spawn_confd(&["--config", &cfg]);
    for h in [HOST, CORRUPT] {
        let chain = wait_for("a certificate in the store", WAIT, || {
            stored_chain(&store, h)
        })
        .await;
        pebble
            .verify(&chain, h)
            .await
            .unwrap_or_else(|e| panic!("{h}: {e}\n{}", confd.output()));
    }
    let refused = format!("acme: {REFUSED}: ");
    wait_for("two refused tries", WAIT, || async {
        (confd.output().matches(&refused).count() >= 2).then_some(())
    })
    .await;
    let log = confd.output();
    for line in log.lines().filter(|l| l.contains(&refused)) {
        assert!(line.contains("new order: "), "{line}");
        assert!(line.contains("retrying in"), "{line}");
    }
    let corrupt = log
        .lines()
        .find(|l| l.contains(&format!("acme: {CORRUPT}: ")))
        .unwrap_or_else(|| panic!("no line naming {CORRUPT}:\n{log}"));
    assert!(
        corrupt.contains("stored certificate unusable, ordering again"),
        "{corrupt}"
    );
    assert_eq!(store.get(&format!("certs/{REFUSED}")).await.unwrap(), None);
    let m = wait_for("the refused host's failures", WAIT, || async {
        metrics(port).await.filter(|m| {
            m.contains(&format!(
                "confd_acme_order_failures_total{{host=\"{REFUSED}\"}}"
            ))
        })
    })
    .await;
    for h in [HOST, CORRUPT] {
        assert!(
            !m.contains(&format!("confd_acme_order_failures_total{{host=\"{h}\"}}")),
            "{m}"
        );
        assert!(
            m.contains(&format!(
                "confd_acme_certificate_expiry_timestamp_seconds{{host=\"{h}\"}}"
            )),
            "{m}"
        );
    }
    assert!(
        !m.contains(&format!(
            "confd_acme_certificate_expiry_timestamp_seconds{{host=\"{REFUSED}\"}}"
        )),
        "{m}"
    );
}

/// A self-signed certificate for `host`, valid between the two dates (year, month, day), as
/// confd stores it (unsealed).
fn stored_record(host: &str, from: (i32, u8, u8), to: (i32, u8, u8)) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
    params.not_after = rcgen::date_time_ymd(to.0, to.1, to.2);
    let cert = params.self_signed(&key).unwrap();
    confd::acme::Certificate::from_pem(host, cert.pem(), key.serialize_pem())
        .unwrap()
        .to_record(&confd::acme::storage::Sealer::none())
}

/// Certificates within `renew_before` of their expiry, or past it, are noted on `/healthz`
/// (which stays healthy: the other hosts serve) while their renewal fails; the expiry gauge
/// shows each host. A certificate that is due as soon as it is issued (`renew_before` longer
/// than the ACME server's lifetimes) is not ordered again in a loop: it backs off.
#[tokio::test]
async fn healthz_notes_certificates_due_or_expired() {
    const DUE: &str = "due.refused.test";
    const EXPIRED: &str = "expired.refused.test";
    let backend = Backend::consul().await;
    let challenge = free_port();
    let pebble = Pebble::start_with(challenge, &["refused.test"]).await;
    let store = kv(&backend.uri());
    store
        .put(
            &format!("certs/{DUE}"),
            &stored_record(DUE, (2020, 1, 1), (2030, 1, 1)),
        )
        .await
        .unwrap();
    store
        .put(
            &format!("certs/{EXPIRED}"),
            &stored_record(EXPIRED, (2020, 1, 1), (2021, 1, 1)),
        )
        .await
        .unwrap();
    for h in [HOST, DUE, EXPIRED] {
        backend.register(h).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = config_with(
        dir.path(),
        &backend.uri(),
        &pebble.directory(),
        &pebble.ca_file(),
        challenge,
        port,
        "  renew_before: 87600h\n",
    );
    let confd = spawn_confd(&["--config", &cfg]);
    let healthz = format!("http://127.0.0.1:{port}/healthz");
    let body = wait_for("/healthz noting all three hosts", WAIT, || async {
        let r = reqwest::get(&healthz).await.ok()?;
        let status = r.status();
        let t = r.text().await.ok()?;
        (t.contains(&format!("acme {HOST}: ")) && t.contains(&format!("acme {DUE}: ")))
            .then_some((status, t))
    })
    .await;
    assert_eq!(body.0, 200, "{}", body.1);
    let lines: Vec<&str> = body.1.lines().collect();
    assert_eq!(lines[0], "ok", "{}", body.1);
    let due = format!("acme {DUE}: certificate expires 2030-01-01T00:00:00Z (in ");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&due) && l.ends_with("), renewal due")),
        "{}",
        body.1
    );
    assert!(
        lines.contains(
            &format!("acme {EXPIRED}: certificate expired 2021-01-01T00:00:00Z, not served until renewed")
                .as_str()
        ),
        "{}",
        body.1
    );
    let m = metrics(port).await.unwrap();
    assert!(
        m.contains(&format!(
            "confd_acme_certificate_expiry_timestamp_seconds{{host=\"{EXPIRED}\"}} 1609459200\n"
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "confd_acme_certificate_expiry_timestamp_seconds{{host=\"{DUE}\"}} 1893456000\n"
        )),
        "{m}"
    );
    // The host pebble serves got one certificate, due at once: it backs off, not loops.
    let log = confd.output();
    let line = log
        .lines()
        .find(|l| l.contains(&format!("acme: {HOST}: ")))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains("already within acme.renew_before") && line.contains("retrying in"),
        "{line}"
    );
    assert_eq!(
        log.matches(&format!("acme: certificate stored host={HOST}"))
            .count(),
        1,
        "{log}"
    );
}

/// SIGHUP with a new backend and a new `acme.prefix`: the ACME loop follows the new source
/// and settings (the new store gets the new host's certificate under the new prefix), and
/// leaves the old store alone.
#[tokio::test]
async fn sighup_moves_acme_to_the_new_source_and_settings() {
    const SECOND: &str = "second.example.test";
    const LATE: &str = "late.example.test";
    let (old, new) = (Backend::consul().await, Backend::etcd().await);
    let challenge = free_port();
    let pebble = Pebble::start(challenge).await;
    old.register(HOST).await;
    new.register(SECOND).await;
    let dir = tempfile::tempdir().unwrap();
    let write = |backend: &Backend, extra: &str| {
        config_with(
            dir.path(),
            &backend.uri(),
            &pebble.directory(),
            &pebble.ca_file(),
            challenge,
            0,
            extra,
        )
    };
    let cfg = write(&old, "");
    let confd = spawn_confd(&["--config", &cfg]);
    let old_store = kv(&old.uri());
    wait_for("the first certificate", WAIT, || {
        stored_chain(&old_store, HOST)
    })
    .await;
    write(&new, "  prefix: other/acme/\n");
    confd.signal(libc::SIGHUP);
    let new_store = KvStore::with_settings(
        &RegistryUri::parse(&new.uri()).unwrap(),
        "other/acme/",
        &StoreSettings::default(),
    )
    .unwrap();
    let chain = wait_for("the new store's certificate", WAIT, || {
        stored_chain(&new_store, SECOND)
    })
    .await;
    pebble
        .verify(&chain, SECOND)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", confd.output()));
    assert!(
        confd.output().contains("(re)starting ACME"),
        "{}",
        confd.output()
    );
    // A host registered in the old store now gets nothing there; one in the new store does.
    old.register(LATE).await;
    new.register(LATE).await;
    wait_for("the late host's certificate", WAIT, || {
        stored_chain(&new_store, LATE)
    })
    .await;
    assert_eq!(stored_chain(&old_store, LATE).await, None);
    assert_eq!(kv(&new.uri()).get("account").await.unwrap(), None);
}
