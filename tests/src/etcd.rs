//! One etcd member on free loopback ports, plain or serving TLS with client certificates, and
//! the JSON gateway reads tests make of it. Its data directory outlives a restart, as a real
//! member's disk does.
//!
//! A three-member cluster is in [`crate::cluster`].

use crate::pki::Pki;
use crate::poll::{free_port, wait_for};
use crate::process::{find_program, Process};
use std::time::Duration;

/// One etcd member on free loopback ports, with its own data directory (kept across
/// [`Etcd::restart`], so data survives like a real restart).
pub struct Etcd {
    /// Client port.
    pub port: u16,
    peer_port: u16,
    data: tempfile::TempDir,
    /// Client TLS with client-certificate authentication, from these certificates.
    tls: Option<Pki>,
    /// More `etcd` arguments.
    extra: Vec<String>,
    proc: Option<Process>,
}

impl Etcd {
    /// Starts a member and waits until it answers.
    pub async fn start() -> Etcd {
        let mut e = Etcd {
            port: free_port(),
            peer_port: free_port(),
            data: tempfile::tempdir().unwrap(),
            tls: None,
            extra: Vec::new(),
            proc: None,
        };
        e.launch().await;
        e
    }

    /// Starts a member serving clients over HTTPS with `pki`'s server certificate, requiring
    /// client certificates signed by its CA (`--client-cert-auth`), and waits until it answers.
    pub async fn start_tls(pki: &Pki) -> Etcd {
        Etcd::start_tls_with(pki, &[]).await
    }

    /// As [`Etcd::start_tls`], with more `etcd` arguments.
    pub async fn start_tls_with(pki: &Pki, extra: &[&str]) -> Etcd {
        let mut e = Etcd {
            port: free_port(),
            peer_port: free_port(),
            data: tempfile::tempdir().unwrap(),
            tls: Some(pki.clone()),
            extra: extra.iter().map(|a| a.to_string()).collect(),
            proc: None,
        };
        e.launch().await;
        e
    }

    /// A client of this member's gateway: with the client certificate when it serves TLS.
    pub fn http_client(&self) -> reqwest::Client {
        match &self.tls {
            None => reqwest::Client::new(),
            Some(pki) => pki.client(),
        }
    }

    async fn launch(&mut self) {
        let bin = find_program("etcd", &["/usr/bin", "/opt/switchboard/bin"]);
        let client = self.http();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let data = self.data.path().join("member");
        let cluster = format!("sbtest={peer}");
        let mut args = vec![
            "--name",
            "sbtest",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &cluster,
        ];
        let tls_args = self.tls.as_ref().map(|pki| {
            [
                "--cert-file".to_string(),
                pki.path("server.pem"),
                "--key-file".to_string(),
                pki.path("server.key"),
                "--trusted-ca-file".to_string(),
                pki.path("ca.pem"),
                "--client-cert-auth".to_string(),
            ]
        });
        if let Some(t) = &tls_args {
            args.extend(t.iter().map(String::as_str));
        }
        args.extend(self.extra.iter().map(String::as_str));
        self.proc = Some(Process::spawn(
            &bin,
            &args,
            &[("ETCD_UNSUPPORTED_ARCH", "")],
        ));
        let url = format!("{client}/v3/kv/range");
        let http = self.http_client();
        wait_for("etcd to answer", Duration::from_secs(30), || {
            let http = http.clone();
            let url = url.clone();
            async move {
                let r = http
                    .post(&url)
                    .body(r#"{"key":"AA=="}"#)
                    .send()
                    .await
                    .ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
    }

    /// `http://127.0.0.1:<port>` (`https://` when it serves TLS).
    pub fn http(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// `etcd://127.0.0.1:<port>/<prefix>`.
    pub fn uri(&self, prefix: &str) -> String {
        format!("etcd://127.0.0.1:{}/{prefix}", self.port)
    }

    /// Stops the member (`kill -9`).
    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Starts it again on the same ports and data.
    pub async fn restart(&mut self) {
        self.stop();
        self.launch().await;
    }

    /// Every key and (UTF-8) value under `prefix`, through the JSON gateway.
    pub async fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().unwrap() += 1;
        let body = serde_json::json!({"key": b64.encode(prefix), "range_end": b64.encode(end)});
        let v: serde_json::Value = reqwest::Client::new()
            .post(format!("{}/v3/kv/range", self.http()))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut out = Vec::new();
        for kv in v["kvs"].as_array().cloned().unwrap_or_default() {
            let k = b64.decode(kv["key"].as_str().unwrap()).unwrap();
            let val = b64
                .decode(kv["value"].as_str().unwrap_or_default())
                .unwrap();
            out.push((
                String::from_utf8(k).unwrap(),
                String::from_utf8(val).unwrap(),
            ));
        }
        out
    }
}
