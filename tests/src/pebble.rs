//! A real ACME server: Debian's `pebble`, with `pebble-challtestsrv` as its DNS server
//! answering every name with 127.0.0.1, on free loopback ports. Pebble's own HTTPS certificate
//! comes from a [`Pki`] made for the test; its issuing roots from its management port.
//!
//! [`Gate`] sits between pebble's validation requests and the confds' challenge listeners and
//! holds them until the test opens it: an order stalls mid-validation for as long as the test
//! needs.

use crate::{free_port, wait_for, Pki, Process};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running pebble and its DNS server, stopped on drop.
pub struct Pebble {
    _dns: Process,
    _pebble: Process,
    pki: Pki,
    _dir: tempfile::TempDir,
    port: u16,
    mgmt: u16,
}

impl Pebble {
    /// Starts pebble validating HTTP-01 challenges on `http_port` (of 127.0.0.1, as every
    /// name resolves there), without the random sleeps and nonce rejections it adds by default.
    pub async fn start(http_port: u16) -> Pebble {
        Pebble::start_with(http_port, &[]).await
    }

    /// [`Pebble::start`], refusing orders for names under `blocked` (pebble's
    /// `domainBlocklist`: a `rejectedIdentifier` error at the new order).
    pub async fn start_with(http_port: u16, blocked: &[&str]) -> Pebble {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::generate("pebble test CA");
        let (port, mgmt, dns, dns_mgmt) = (free_port(), free_port(), free_port(), free_port());
        let dns_addr = format!("127.0.0.1:{dns}");
        let dns_proc = Process::spawn(
            Path::new("pebble-challtestsrv"),
            &[
                "-defaultIPv6",
                "",
                "-defaultIPv4",
                "127.0.0.1",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-dns01",
                &dns_addr,
                "-management",
                &format!("127.0.0.1:{dns_mgmt}"),
            ],
            &[],
        );
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": pki.path("server.pem"),
            "privateKey": pki.path("server.key"),
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "domainBlocklist": blocked,
        }});
        let config_path = dir.path().join("pebble.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let pebble = Process::spawn(
            Path::new("pebble"),
            &[
                "-config",
                &config_path.display().to_string(),
                "-dnsserver",
                &dns_addr,
            ],
            &[("PEBBLE_VA_NOSLEEP", "1"), ("PEBBLE_WFE_NONCEREJECT", "0")],
        );
        let p = Pebble {
            _dns: dns_proc,
            _pebble: pebble,
            pki,
            _dir: dir,
            port,
            mgmt,
        };
        let client = p.client();
        let dir_url = p.directory();
        wait_for("pebble's directory", Duration::from_secs(20), || {
            let (client, url) = (client.clone(), dir_url.clone());
            async move {
                let r = client.get(url).send().await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
        p
    }

    /// The directory URL.
    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    /// The CA file that trusts pebble's own HTTPS certificate (confd's `acme.ca_file`).
    pub fn ca_file(&self) -> PathBuf {
        PathBuf::from(self.pki.path("ca.pem"))
    }

    /// A client trusting pebble's HTTPS certificate.
    pub fn client(&self) -> reqwest::Client {
        let ca = std::fs::read(self.ca_file()).unwrap();
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }

    /// The root pebble issues under (management port `/roots/0`), PEM.
    pub async fn root_pem(&self) -> String {
        let url = format!("https://127.0.0.1:{}/roots/0", self.mgmt);
        let r = self.client().get(url).send().await.unwrap();
        assert!(r.status().is_success(), "pebble /roots/0: {}", r.status());
        r.text().await.unwrap()
    }

    /// Whether `chain_pem` (leaf first) chains to pebble's root and names `host`; `Err` says
    /// what openssl said otherwise.
    pub async fn verify(&self, chain_pem: &str, host: &str) -> Result<(), String> {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root.pem");
        let chain = dir.path().join("chain.pem");
        std::fs::write(&root, self.root_pem().await).unwrap();
        std::fs::write(&chain, chain_pem).unwrap();
        let out = std::process::Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(&root)
            .arg("-untrusted")
            .arg(&chain)
            .args(["-verify_hostname", host])
            .arg(&chain)
            .output()
            .unwrap();
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

/// A TCP relay on a free loopback port that accepts connections and holds them, unanswered,
/// until [`Gate::open`]; then relays each (held or new) to the target port. Stopped on drop.
pub struct Gate {
    port: u16,
    arrived: Arc<AtomicUsize>,
    open: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    /// A closed gate in front of `127.0.0.1:target`.
    pub async fn start(target: u16) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let arrived = Arc::new(AtomicUsize::new(0));
        let (open, rx) = watch::channel(false);
        let count = arrived.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    if rx.wait_for(|o| *o).await.is_err() {
                        return;
                    }
                    if let Ok(mut up) = TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                    }
                });
            }
        });
        Gate {
            port,
            arrived,
            open,
            task,
        }
    }

    /// The port to give pebble as its HTTP-01 port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many connections have arrived so far.
    pub fn arrived(&self) -> usize {
        self.arrived.load(Ordering::SeqCst)
    }

    /// Lets every held and later connection through.
    pub fn open(&self) {
        let _ = self.open.send(true);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}
