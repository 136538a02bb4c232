//! Automatic HTTPS end to end: real Consul, real pebble, the real `confd` binary with an
//! `acme:` section, and a real nginx or HAProxy rendered from the shipped templates. Pebble
//! validates HTTP-01 on the proxy's HTTP port, so each challenge goes through the proxy (its
//! `/.well-known/acme-challenge/` route, set from `acme.challenge_addr`) to confd.
//!
//! Per proxy: a virtual host registered after the proxy is up is served over HTTPS with a
//! certificate chaining to pebble's root (checked by curl), over HTTP/1.1 and HTTP/2 (ALPN),
//! and plain HTTP redirects with 308. The time from the registration to the first HTTPS
//! answer is printed (`first HTTPS answer`). Two confd + proxy pairs on one store serve the
//! host with one certificate, ordered once, and either proxy answers any pending challenge.
//! A certificate an operator puts in the store (`switchboard/certs/<host>`) is served, and
//! preferred over ACME's for the same host.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use switchboard::store::{KvStore, StoreSettings};
use switchboard::{RegistryUri, Store};
use switchboard_tests::curl::{http_get, https_get, served_serial};
use switchboard_tests::*;

const HOST: &str = "app.example.test";
const WAIT: Duration = Duration::from_secs(60);

enum Proxy {
    Nginx(NginxConfd),
    Haproxy(HaproxyConfd),
}

impl Proxy {
    /// A proxy of `kind` on HTTP `port` and HTTPS `https_port`, its confd on `consul` with
    /// automatic HTTPS from `pebble`, challenges answered on `challenge`.
    async fn start(
        kind: &str,
        consul: &Consul,
        pebble: &Pebble,
        port: u16,
        https_port: u16,
        challenge: u16,
    ) -> Proxy {
        let serve = tempfile::tempdir().unwrap().keep();
        let settings = format!(
            "acme:\n  directory: {}\n  ca_file: {}\n  challenge_addr: 127.0.0.1:{challenge}\n\
             https: {{ serve_dir: {} }}\n",
            pebble.directory(),
            pebble.ca_file().display(),
            serve.display(),
        );
        let mut vars = vec![
            ("https_listen", https_port.to_string()),
            ("bind_address", "127.0.0.1".to_string()),
        ];
        match kind {
            "nginx" => Proxy::Nginx(
                NginxConfd::start_on(
                    port,
                    tempfile::tempdir().unwrap(),
                    &consul.uri(),
                    &settings,
                    &vars,
                    "worker_processes",
                )
                .await,
            ),
            _ => {
                vars.retain(|(k, _)| *k != "bind_address");
                let settings = format!("wait: {{ min: 100ms, max: 1s }}\n{settings}");
                Proxy::Haproxy(
                    HaproxyConfd::start_on(
                        port,
                        &consul.uri(),
                        "127.0.0.1",
                        &settings,
                        &vars,
                        false,
                        |t| t.contains("frontend"),
                    )
                    .await,
                )
            }
        }
    }

    fn confd(&self) -> &Process {
        match self {
            Proxy::Nginx(p) => &p.confd,
            Proxy::Haproxy(p) => &p.confd,
        }
    }
}

/// Pebble's root, in a file for `curl --cacert`.
async fn root_file(pebble: &Pebble, dir: &Path) -> PathBuf {
    let path = dir.join("pebble-root.pem");
    std::fs::write(&path, pebble.root_pem().await).unwrap();
    path
}

/// Registers the virtual host `HOST` on `app`.
async fn register(consul: &Consul, app: &Backend) {
    let mut s = app.service("web");
    s.meta.insert("vhost".into(), HOST.into());
    Store::new(&RegistryUri::parse(&consul.uri()).unwrap())
        .register(&s)
        .await
        .unwrap();
}

/// Polls until `HOST` answers from the backend over HTTPS on `https_port`; returns the time
/// since `since`.
async fn first_https_answer(
    root: &Path,
    https_port: u16,
    proxy: &Proxy,
    since: Instant,
) -> Duration {
    let r = poll(WAIT, Duration::from_millis(50), || async {
        let r = https_get(root, HOST, https_port, &["--http1.1"]).await;
        (r.code == 0 && r.status == "200" && r.body == "app").then_some(())
    })
    .await;
    assert!(
        r.is_some(),
        "no HTTPS answer for {HOST} within {WAIT:?}; confd:\n{}",
        proxy.confd().output()
    );
    since.elapsed()
}

async fn first_certificate_through(kind: &str) {
    let consul = Consul::start().await;
    let (port, https_port, challenge) = (free_port(), free_port(), free_port());
    let pebble = Pebble::start(port).await;
    let dir = tempfile::tempdir().unwrap();
    let root = root_file(&pebble, dir.path()).await;
    let app = Backend::start("app").await;
    let proxy = Proxy::start(kind, &consul, &pebble, port, https_port, challenge).await;
    let t0 = Instant::now();
    register(&consul, &app).await;
    let took = first_https_answer(&root, https_port, &proxy, t0).await;
    eprintln!("{kind}: first HTTPS answer {took:?} after the registration (polled every 50 ms)");
    // HTTP/2 over ALPN.
    let r = https_get(&root, HOST, https_port, &["--http2"]).await;
    assert_eq!(
        (
            r.code,
            r.version.as_str(),
            r.status.as_str(),
            r.body.as_str()
        ),
        (0, "2", "200", "app"),
        "{kind}: h2"
    );
    // Plain HTTP redirects with 308; the challenge path goes to confd (an unknown token: 404
    // from its listener, not a redirect).
    // (nginx's workers from before the reload may answer plain HTTP a moment longer.)
    let want = format!("https://{HOST}:{https_port}/p?q=1");
    let redirected = poll(WAIT, Duration::from_millis(100), || async {
        let r = http_get(HOST, port, "/p?q=1").await;
        (r.status == "308" && r.location == want).then_some(())
    })
    .await;
    let r = http_get(HOST, port, "/p?q=1").await;
    assert!(redirected.is_some(), "{kind}: no 308 to {want}: {r:?}");
    let r = http_get(HOST, port, "/.well-known/acme-challenge/unknown").await;
    assert_eq!(
        (r.status.as_str(), r.body.as_str()),
        ("404", "no such challenge"),
        "{kind}: challenge path"
    );
}

#[tokio::test]
async fn first_certificate_through_nginx() {
    first_certificate_through("nginx").await;
}

#[tokio::test]
async fn first_certificate_through_haproxy() {
    first_certificate_through("haproxy").await;
}

/// Two confd + proxy pairs (nginx and HAProxy) on one Consul: pebble validates through the
/// first proxy only, whichever confd orders; both serve the one stored certificate.
#[tokio::test]
async fn two_proxies_share_one_certificate() {
    let consul = Consul::start().await;
    let (pa, pb) = (free_port(), free_port());
    let (ha, hb) = (free_port(), free_port());
    let pebble = Pebble::start(pa).await;
    let dir = tempfile::tempdir().unwrap();
    let root = root_file(&pebble, dir.path()).await;
    let app = Backend::start("app").await;
    let a = Proxy::start("nginx", &consul, &pebble, pa, ha, free_port()).await;
    let b = Proxy::start("haproxy", &consul, &pebble, pb, hb, free_port()).await;
    // Any proxy answers any pending challenge: the tokens are in the store.
    let kv = KvStore::with_settings(
        &RegistryUri::parse(&consul.uri()).unwrap(),
        "switchboard/acme/",
        &StoreSettings::default(),
    )
    .unwrap();
    kv.put("challenges/tok-1", b"tok-1.thumbprint")
        .await
        .unwrap();
    for port in [pa, pb] {
        let r = http_get(HOST, port, "/.well-known/acme-challenge/tok-1").await;
        assert_eq!(
            (r.status.as_str(), r.body.as_str()),
            ("200", "tok-1.thumbprint"),
            "challenge through port {port}"
        );
    }
    kv.delete("challenges/tok-1").await.unwrap();
    let t0 = Instant::now();
    register(&consul, &app).await;
    let ta = first_https_answer(&root, ha, &a, t0).await;
    let tb = first_https_answer(&root, hb, &b, t0).await;
    eprintln!("two proxies: first HTTPS answers {ta:?} (nginx), by {tb:?} (HAProxy)");
    let (sa, sb) = (served_serial(HOST, ha).await, served_serial(HOST, hb).await);
    assert!(
        sa.is_some() && sa == sb,
        "serials: nginx {sa:?}, HAProxy {sb:?}"
    );
    // Ordered once: exactly one confd stored it.
    let stored = |p: &Proxy| {
        p.confd()
            .output()
            .matches("acme: certificate stored")
            .count()
    };
    assert_eq!(
        stored(&a) + stored(&b),
        1,
        "nginx's confd:\n{}\nHAProxy's confd:\n{}",
        a.confd().output(),
        b.confd().output()
    );
}

/// An operator's certificate in the store is served, before and after ACME has one for the
/// same host; a bad record is skipped with a warning naming its key.
#[tokio::test]
async fn operator_certificate_from_the_store_wins_over_acme() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let consul = Consul::start().await;
    let (port, https_port) = (free_port(), free_port());
    let pebble = Pebble::start(port).await;
    let dir = tempfile::tempdir().unwrap();
    // The operator's private CA and a certificate for HOST.
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "operator test CA");
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![HOST.to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let ca_file = dir.path().join("operator-ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let ops = KvStore::with_settings(
        &RegistryUri::parse(&consul.uri()).unwrap(),
        "switchboard/certs/",
        &StoreSettings::default(),
    )
    .unwrap();
    let record = serde_json::json!({"cert": cert.pem(), "key": key.serialize_pem()});
    ops.put(HOST, record.to_string().as_bytes()).await.unwrap();
    ops.put("bad.example.test", b"{}").await.unwrap();
    let app = Backend::start("app").await;
    let proxy = Proxy::start("haproxy", &consul, &pebble, port, https_port, free_port()).await;
    register(&consul, &app).await;
    let served = |ca: PathBuf| async move {
        let r = https_get(&ca, HOST, https_port, &[]).await;
        (r.code == 0 && r.status == "200" && r.body == "app").then_some(())
    };
    let first = poll(WAIT, Duration::from_millis(100), || served(ca_file.clone())).await;
    assert!(
        first.is_some(),
        "the operator's certificate is not served; confd:\n{}",
        proxy.confd().output()
    );
    // ACME keeps a certificate for the host too; the operator's stays the one served.
    proxy
        .confd()
        .wait_output("acme: certificate stored", WAIT)
        .await;
    let root = root_file(&pebble, dir.path()).await;
    let acme_stored = KvStore::with_settings(
        &RegistryUri::parse(&consul.uri()).unwrap(),
        "switchboard/acme/",
        &StoreSettings::default(),
    )
    .unwrap();
    assert!(acme_stored
        .get(&format!("certs/{HOST}"))
        .await
        .unwrap()
        .is_some());
    // Were ACME's certificate to win, the proxy would serve it within a reload (well under a
    // second here): watch for that for a bounded while.
    let acme_served = poll(Duration::from_secs(3), Duration::from_millis(100), || {
        served(root.clone())
    })
    .await;
    assert!(
        acme_served.is_none(),
        "ACME's certificate must not be served"
    );
    assert!(
        served(ca_file.clone()).await.is_some(),
        "{}",
        proxy.confd().output()
    );
    assert!(
        proxy
            .confd()
            .output()
            .contains("store key switchboard/certs/bad.example.test: skipped: expected JSON"),
        "{}",
        proxy.confd().output()
    );
}
