//! What a client sees through a proxy over HTTPS and plain HTTP, asked with the real `curl`
//! (certificate chain checked against a given CA, SNI and ALPN as a browser sends them) and
//! `openssl s_client` (which certificate a proxy serves).

use std::path::Path;
use tokio::process::Command;

/// One curl answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Curl {
    /// curl's exit code (0: the connection, TLS included, worked).
    pub code: i32,
    /// `1.1` or `2`.
    pub version: String,
    /// The HTTP status.
    pub status: String,
    /// The redirect target, if any.
    pub location: String,
    /// The body, trimmed.
    pub body: String,
}

/// `curl` with `args`, at most 5 s.
pub async fn curl(args: &[&str]) -> Curl {
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
    let mut next = || t.next().unwrap_or("").to_string();
    Curl {
        code: out.status.code().unwrap_or(-1),
        version: next(),
        status: next(),
        location: next(),
        body: body.trim().to_string(),
    }
}

/// GET `https://host:port/` on 127.0.0.1, the chain verified against `ca` (`--cacert`).
pub async fn https_get(ca: &Path, host: &str, port: u16, extra: &[&str]) -> Curl {
    let resolve = format!("{host}:{port}:127.0.0.1");
    let url = format!("https://{host}:{port}/");
    let mut args = vec!["--cacert", ca.to_str().unwrap(), "--resolve", &resolve];
    args.extend_from_slice(extra);
    args.push(&url);
    curl(&args).await
}

/// GET `http://127.0.0.1:port<path>` with `Host: host`.
pub async fn http_get(host: &str, port: u16, path: &str) -> Curl {
    let h = format!("Host: {host}");
    curl(&["-H", &h, &format!("http://127.0.0.1:{port}{path}")]).await
}

/// The serial of the certificate served for `host` on 127.0.0.1:`port`, as openssl prints it.
pub async fn served_serial(host: &str, port: u16) -> Option<String> {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", host])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .ok()?;
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    use tokio::io::AsyncWriteExt;
    x509.stdin.take()?.write_all(&out.stdout).await.ok()?;
    let s = x509.wait_with_output().await.ok()?;
    let s = String::from_utf8_lossy(&s.stdout);
    s.trim().strip_prefix("serial=").map(str::to_string)
}
