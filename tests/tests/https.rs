//! HTTPS from certificate files through both shipped templates, end to end: real Consul, the
//! real `confd` binary with `https: { certs_dir }`, a real nginx and a real HAProxy, and
//! certificates made in the test (a test CA, host certificates, a wildcard).
//!
//! Per proxy: `curl --cacert` checks the chain on a host and on a wildcard's subdomain; HTTP/2
//! over ALPN; plain HTTP redirects with 308 to HTTPS except the ACME challenge path (sent to
//! `vars.acme_challenge`) and an opted-out host; a host without a certificate is HTTP only
//! (its TLS handshake is refused); a bad pair (key of another certificate) is skipped with a
//! warning naming its file while the others are served; a replaced certificate and a new
//! host's first certificate are served once confd has seen them. A renewed certificate goes
//! in live (HAProxy's runtime API, nginx's `ssl_certificate_by_lua_block`) under HTTPS
//! keep-alive load and h2load: no failed request, no reload.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use std::path::{Path, PathBuf};
use std::time::Duration;
use switchboard::{RegistryUri, Store};
use switchboard_tests::load::{Load, LoadSpec};
use switchboard_tests::*;
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(30);

/// A test CA that signs host certificates into a certificates directory.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Switchboard test CA");
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// `(chain PEM, key PEM)` for `names`.
    fn sign(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (format!("{}{}", cert.pem(), self.pem), key.serialize_pem())
    }

    /// Writes `<stem>.crt` and `<stem>.key` for `names` into `dir`, key first (the pair is
    /// whole once the crt lands), each by rename. Returns the leaf's serial (hex, as openssl
    /// prints it).
    fn write(&self, dir: &Path, stem: &str, names: &[&str]) -> String {
        let (crt, key) = self.sign(names);
        write_atomic(&dir.join(format!("{stem}.key")), &key);
        write_atomic(&dir.join(format!("{stem}.crt")), &crt);
        serial_of(&crt)
    }
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn serial_of(pem: &str) -> String {
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map(|c: rustls_pki_types::CertificateDer| c.to_vec())
        .unwrap();
    let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
    normal_serial(&x.raw_serial_as_string().replace(':', ""))
}

/// Hex digits in upper case without leading zeros (openssl prints the number, DER may carry a
/// leading zero byte).
fn normal_serial(hex: &str) -> String {
    hex.trim_start_matches('0').to_uppercase()
}

/// One curl through the proxy: `(exit code, HTTP version, status, Location, body)`.
async fn curl(args: &[&str]) -> (i32, String, String, String, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-w",
            "\n%{http_version} %{http_code} %{redirect_url}",
        ])
        .args(args)
        .output()
        .await
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let mut t = tail.splitn(3, ' ');
    let (v, s, l) = (
        t.next().unwrap_or("").to_string(),
        t.next().unwrap_or("").to_string(),
        t.next().unwrap_or("").to_string(),
    );
    (
        out.status.code().unwrap_or(-1),
        v,
        s,
        l,
        body.trim().to_string(),
    )
}

/// GET `https://host:port/` verified against `ca`.
async fn https(
    ca: &Path,
    host: &str,
    port: u16,
    extra: &[&str],
) -> (i32, String, String, String, String) {
    let resolve = format!("{host}:{port}:127.0.0.1");
    let url = format!("https://{host}:{port}/");
    let mut args = vec!["--cacert", ca.to_str().unwrap(), "--resolve", &resolve];
    args.extend_from_slice(extra);
    args.push(&url);
    curl(&args).await
}

/// GET `http://127.0.0.1:port<path>` with `Host: host`.
async fn http(host: &str, port: u16, path: &str) -> (i32, String, String, String, String) {
    let h = format!("Host: {host}");
    curl(&["-H", &h, &format!("http://127.0.0.1:{port}{path}")]).await
}

/// The serial of the certificate served for `host` on `port`, as openssl prints it.
async fn served_serial(host: &str, port: u16) -> Option<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername {host} </dev/null 2>/dev/null | openssl x509 -noout -serial"
        ))
        .output()
        .await
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout);
    s.trim().strip_prefix("serial=").map(normal_serial)
}

struct Scene {
    _consul: Consul,
    _apps: Vec<Backend>,
    ca: Ca,
    ca_file: PathBuf,
    certs: PathBuf,
    serve: PathBuf,
    acme_port: u16,
    https_port: u16,
}

async fn scene(dir: &Path) -> Scene {
    let consul = Consul::start().await;
    let st = Store::new(&RegistryUri::parse(&consul.uri()).unwrap());
    let mut apps = Vec::new();
    for (id, host, meta) in [
        ("a", "a.test", vec![]),
        ("w", "x.w.test", vec![]),
        ("o", "o.test", vec![("https_redirect", "false")]),
        ("n", "n.test", vec![]),
        ("bad", "bad.test", vec![]),
    ] {
        let b = Backend::start(id).await;
        let mut s = b.service(&format!("svc-{id}"));
        s.meta.insert("vhost".into(), host.into());
        for (k, v) in meta {
            s.meta.insert(k.into(), v.into());
        }
        st.register(&s).await.unwrap();
        apps.push(b);
    }
    let acme = Backend::start("acme").await;
    let acme_port = acme.port;
    apps.push(acme);
    let ca = Ca::new();
    let certs = dir.join("certs");
    let serve = dir.join("serve");
    std::fs::create_dir_all(&certs).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    ca.write(&certs, "a.test", &["a.test"]);
    ca.write(&certs, "_wildcard.w.test", &["*.w.test"]);
    ca.write(&certs, "o.test", &["o.test"]);
    // A bad pair: bad.test's certificate with another certificate's key.
    let (crt, _) = ca.sign(&["bad.test"]);
    let (_, other_key) = ca.sign(&["bad.test"]);
    write_atomic(&certs.join("bad.test.key"), &other_key);
    write_atomic(&certs.join("bad.test.crt"), &crt);
    Scene {
        _consul: consul,
        _apps: apps,
        ca,
        ca_file,
        certs,
        serve,
        acme_port,
        https_port: free_port(),
    }
}

impl Scene {
    fn settings(&self) -> String {
        format!(
            "https: {{ certs_dir: {}, serve_dir: {} }}",
            self.certs.display(),
            self.serve.display()
        )
    }

    fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("https_listen", self.https_port.to_string()),
            ("acme_challenge", format!("127.0.0.1:{}", self.acme_port)),
        ]
    }

    /// Everything but the certificate changes, through the proxy's HTTP `port`.
    async fn check(&self, what: &str, port: u16, confd: &Process) {
        let hp = self.https_port;
        let ca = &self.ca_file;
        // The chain, over HTTP/1.1 and HTTP/2 (ALPN).
        let (rc, v, s, _, body) = https(ca, "a.test", hp, &["--http1.1"]).await;
        assert_eq!(
            (rc, v.as_str(), s.as_str(), body.as_str()),
            (0, "1.1", "200", "a"),
            "{what}: https a.test"
        );
        let (rc, v, s, _, body) = https(ca, "a.test", hp, &["--http2"]).await;
        assert_eq!(
            (rc, v.as_str(), s.as_str(), body.as_str()),
            (0, "2", "200", "a"),
            "{what}: h2 a.test"
        );
        // The wildcard pair covers its subdomain.
        let (rc, _, s, _, body) = https(ca, "x.w.test", hp, &[]).await;
        assert_eq!(
            (rc, s.as_str(), body.as_str()),
            (0, "200", "w"),
            "{what}: https x.w.test"
        );
        // Plain HTTP: 308 to the same path on HTTPS...
        let (_, _, s, loc, _) = http("a.test", port, "/p/x?q=1").await;
        assert_eq!(
            (s.as_str(), loc.as_str()),
            ("308", format!("https://a.test:{hp}/p/x?q=1").as_str()),
            "{what}: redirect"
        );
        // ... except the ACME challenge path, proxied to vars.acme_challenge...
        let (_, _, s, _, body) = http("a.test", port, "/.well-known/acme-challenge/tok").await;
        assert_eq!(
            (s.as_str(), body.as_str()),
            ("200", "acme"),
            "{what}: challenge"
        );
        // ... and a host that opted out, served on both.
        let (_, _, s, _, body) = http("o.test", port, "/").await;
        assert_eq!(
            (s.as_str(), body.as_str()),
            ("200", "o"),
            "{what}: opted out, http"
        );
        let (rc, _, s, _, body) = https(ca, "o.test", hp, &[]).await;
        assert_eq!(
            (rc, s.as_str(), body.as_str()),
            (0, "200", "o"),
            "{what}: opted out, https"
        );
        // No certificate: HTTP only, the handshake refused.
        let (_, _, s, _, body) = http("n.test", port, "/").await;
        assert_eq!(
            (s.as_str(), body.as_str()),
            ("200", "n"),
            "{what}: n.test over http"
        );
        let (rc, ..) = https(ca, "n.test", hp, &[]).await;
        assert_ne!(rc, 0, "{what}: n.test must not be served over HTTPS");
        // The bad pair is skipped, with a warning naming its file; its host is HTTP only.
        let (_, _, s, _, body) = http("bad.test", port, "/").await;
        assert_eq!(
            (s.as_str(), body.as_str()),
            ("200", "bad"),
            "{what}: bad.test over http"
        );
        let (rc, ..) = https(ca, "bad.test", hp, &[]).await;
        assert_ne!(rc, 0, "{what}: bad.test must not be served over HTTPS");
        assert!(
            confd
                .output()
                .contains("bad.test.crt: skipped: the private key does not match the certificate"),
            "{what}: no warning for the bad pair:\n{}",
            confd.output()
        );
    }

    /// A replaced certificate and a new host's first one are served.
    async fn check_changes(&self, what: &str) {
        let hp = self.https_port;
        let serial = self.ca.write(&self.certs, "a.test", &["a.test"]);
        wait_for(
            &format!("{what}: the new a.test certificate"),
            WAIT,
            || async {
                (served_serial("a.test", hp).await.as_deref() == Some(serial.as_str()))
                    .then_some(())
            },
        )
        .await;
        let (rc, _, s, _, body) = https(&self.ca_file, "a.test", hp, &[]).await;
        assert_eq!(
            (rc, s.as_str(), body.as_str()),
            (0, "200", "a"),
            "{what}: a.test after"
        );
        self.ca.write(&self.certs, "n.test", &["n.test"]);
        wait_for(&format!("{what}: n.test over HTTPS"), WAIT, || async {
            let (rc, _, s, _, body) = https(&self.ca_file, "n.test", hp, &[]).await;
            (rc == 0 && s == "200" && body == "n").then_some(())
        })
        .await;
    }
}

/// Reloads confd has run so far, by its log.
fn reloads(confd: &Process) -> usize {
    confd
        .output()
        .lines()
        .filter(|l| l.contains("reloaded"))
        .count()
}

/// Certificates applied live so far, by confd's log.
fn live_renewals(confd: &Process) -> usize {
    confd
        .output()
        .matches("certificates renewed; applied live, no reload")
        .count()
}

impl Scene {
    /// a.test's certificate renewed (a new serial) `RENEWALS` times under HTTPS keep-alive
    /// load, and once more under h2load (HTTP/2 over TLS): no request fails, confd reloads
    /// nothing, and each new serial is what a new handshake gets.
    async fn renew_under_load(&self, what: &str, confd: &Process) {
        const RENEWALS: usize = 3;
        let hp = self.https_port;
        // A proxy started after confd's first render owes it a reload, retried after a second:
        // wait for it, so that the count below sees only what the renewals do.
        wait_for(&format!("{what}: the first reload"), WAIT, || async {
            let out = confd.output();
            (out.matches("trying again").count() <= reloads(confd)).then_some(())
        })
        .await;
        let addr: std::net::SocketAddr = format!("127.0.0.1:{hp}").parse().unwrap();
        let load = Load::start(LoadSpec::get(&format!("https://a.test:{hp}/"), 4).https(
            &self.ca.pem,
            "a.test",
            addr,
        ));
        load.wait_flowing(50, WAIT).await;
        let reloads_before = reloads(confd);
        let live_before = live_renewals(confd);
        let renew = |n: usize| async move {
            let serial = self.ca.write(&self.certs, "a.test", &["a.test"]);
            wait_for(&format!("{what}: renewal {n} served"), WAIT, || async {
                (served_serial("a.test", hp).await.as_deref() == Some(serial.as_str()))
                    .then_some(())
            })
            .await;
            wait_for(
                &format!("{what}: renewal {n} applied live"),
                WAIT,
                || async { (live_renewals(confd) >= live_before + n).then_some(()) },
            )
            .await;
        };
        for n in 1..=RENEWALS {
            renew(n).await;
            load.wait_flowing(20, WAIT).await;
        }
        // HTTP/2 over TLS (h2load checks no certificate; SNI a.test, to the loopback proxy).
        let h2 = Command::new("h2load")
            .args(["-n", "1200", "-c", "3", "-m", "4", "--rps", "200"])
            .arg(format!("--connect-to=127.0.0.1:{hp}"))
            .arg(format!("https://a.test:{hp}/"))
            .output();
        let (h2, ()) = tokio::join!(h2, async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            renew(RENEWALS + 1).await;
        });
        let h2 = h2.expect("h2load runs");
        let h2_out = String::from_utf8_lossy(&h2.stdout);
        let report = load.stop().await;
        eprintln!(
            "{what}: {} renewals; keep-alive HTTPS load: {}; h2load: {}",
            RENEWALS + 1,
            report.summary(),
            h2_out
                .lines()
                .find(|l| l.starts_with("requests:"))
                .unwrap_or("?")
        );
        assert_eq!(report.failed, 0, "{what}: {}", report.summary());
        assert!(
            h2_out.contains("requests: 1200 total, 1200 started, 1200 done, 1200 succeeded, 0 failed, 0 errored, 0 timeout")
                && h2_out.contains("1200 2xx"),
            "{what}: h2load:\n{h2_out}"
        );
        assert_eq!(
            reloads(confd),
            reloads_before,
            "{what}: a renewal reloaded the proxy:\n{}",
            confd.output()
        );
        let (rc, v, s, _, body) = https(&self.ca_file, "a.test", hp, &["--http2"]).await;
        assert_eq!(
            (rc, v.as_str(), s.as_str(), body.as_str()),
            (0, "2", "200", "a"),
            "{what}: h2 a.test after the renewals"
        );
    }
}

#[tokio::test]
async fn https_from_files_through_nginx() {
    let dir = tempfile::tempdir().unwrap();
    let sc = scene(dir.path()).await;
    let mut vars = sc.vars();
    vars.push(("bind_address", "127.0.0.1".into()));
    let nginx = NginxConfd::start_in(
        tempfile::tempdir().unwrap(),
        &sc._consul.uri(),
        &sc.settings(),
        &vars,
        "ssl_certificate",
    )
    .await;
    sc.check("nginx", nginx.port, &nginx.confd).await;
    sc.renew_under_load("nginx", &nginx.confd).await;
    sc.check_changes("nginx").await;
}

#[tokio::test]
async fn https_from_files_through_haproxy() {
    let dir = tempfile::tempdir().unwrap();
    let sc = scene(dir.path()).await;
    let settings = format!("wait: {{ min: 100ms, max: 1s }}\n{}", sc.settings());
    let hap = HaproxyConfd::start_live(
        &sc._consul.uri(),
        "127.0.0.1",
        &settings,
        &sc.vars(),
        true,
        |t| t.contains("crt-list") && t.contains("bad.test"),
    )
    .await;
    sc.check("haproxy", hap.port, &hap.confd).await;
    sc.renew_under_load("haproxy", &hap.confd).await;
    sc.check_changes("haproxy").await;
}
