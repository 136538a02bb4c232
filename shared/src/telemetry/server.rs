//! The HTTP endpoint both binaries serve with `--metrics-addr`: `GET /metrics` (Prometheus'
//! text exposition, OpenMetrics flavour) and `GET /healthz` (200 `ok`, or 503 and one line
//! saying what fails). Also the client side of `/healthz`, for container healthchecks in
//! images that have no curl.

use super::Health;
use crate::Shutdown;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use std::convert::Infallible;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// What Prometheus asks for and `prometheus-client` writes.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";
/// Connections served at once; more wait to be accepted. Scrapers and probes hold one each.
const MAX_CONNECTIONS: usize = 32;
/// A client that sends no complete request headers within this is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `--healthcheck` waits for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Parses `--metrics-addr`'s `HOST:PORT` (`127.0.0.1:9100`, `[::1]:9100`, `0.0.0.0:9100`,
/// `localhost:9100`). `flag` names the option in the error, which is one line.
pub fn parse_listen_addr(flag: &str, value: &str) -> Result<SocketAddr, String> {
    let bad =
        || format!("invalid value {value:?} for {flag}: expected HOST:PORT, e.g. 127.0.0.1:9100");
    if let Ok(a) = value.parse::<SocketAddr>() {
        return Ok(a);
    }
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || host.contains(['/', ' ']) || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    // A name (`localhost`): its first address, looked up once at start.
    value
        .to_socket_addrs()
        .map_err(|e| format!("{}: {e}", bad()))?
        .next()
        .ok_or_else(bad)
}

/// A bound `/metrics` + `/healthz` endpoint, not serving yet. Binding first, at start, makes
/// an address in use fail the binary with one line before it does anything else.
#[derive(Debug)]
pub struct TelemetryServer {
    listener: TcpListener,
}

impl TelemetryServer {
    /// Listens on `addr`. The error names the address and `flag`.
    pub async fn bind(flag: &str, addr: SocketAddr) -> Result<TelemetryServer, String> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} ({flag}): {e}"))?;
        Ok(TelemetryServer { listener })
    }

    /// The address it listens on (the real port when asked for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown`; open connections are dropped then (a scrape is cheap to
    /// repeat). Cancel-safe: dropping the future stops the server the same way.
    pub async fn serve(self, registry: &'static Registry, health: Health, shutdown: Shutdown) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = shutdown.cancelled() => return,
            };
            let stream = tokio::select! {
                r = self.listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        tracing::warn!("metrics endpoint cannot accept a connection: {e}");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                            _ = shutdown.cancelled() => return,
                        }
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            let health = health.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = service_fn(move |req| {
                    let health = health.clone();
                    async move { Ok::<_, Infallible>(answer(&req, registry, &health)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = conn => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    }
}

/// The answer to one request (pure apart from reading the metrics and conditions).
fn answer<B>(req: &Request<B>, registry: &Registry, health: &Health) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "expected GET\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => reply(StatusCode::OK, OPENMETRICS, body),
                Err(_) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    "cannot encode the metrics\n".into(),
                ),
            }
        }
        // The first line is the verdict (`ok`, or every failing condition); each note
        // follows on a line of its own.
        "/healthz" => {
            let notes: String = health.notes().iter().map(|n| format!("{n}\n")).collect();
            match health.status() {
                Ok(()) => reply(StatusCode::OK, TEXT, format!("ok\n{notes}")),
                Err(why) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("{why}\n{notes}"),
                ),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: the endpoints are /metrics and /healthz\n".into(),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// `--healthcheck URL` as a whole command, for either binary: [`probe`] on a runtime of its
/// own. `true` when healthy; otherwise `<program>: unhealthy: <why>` (or why it could not
/// ask) on stderr, and `false`.
pub fn healthcheck(program: &str, url: &str) -> bool {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{program}: cannot start the async runtime: {e}");
            return false;
        }
    };
    match rt.block_on(probe(url)) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("{program}: unhealthy: {e}");
            false
        }
    }
}

/// `--healthcheck URL`: asks a running binary's `/healthz`. `Ok` on 200; otherwise one line:
/// what answered and why it is unhealthy, or why it could not be asked.
pub async fn probe(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url)
        .ok()
        .filter(|u| u.scheme() == "http" && u.host().is_some())
        .ok_or_else(|| {
            format!("invalid value {url:?} for --healthcheck: expected http://HOST:PORT/healthz")
        })?;
    let client = reqwest::Client::builder()
        .timeout(PROBE_TIMEOUT)
        .no_proxy()
        .build()
        .map_err(|e| format!("cannot set up an HTTP client: {e}"))?;
    let resp = client
        .get(parsed)
        .send()
        .await
        .map_err(|e| format!("cannot reach {url}: {}", chain(&e)))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if status.is_success() {
        return Ok(());
    }
    // The server bounds its reasons; this bounds what another server might send.
    let why: String = body
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(1000)
        .collect();
    Err(format!("{url} answered {}: {why}", status.as_u16()))
}

/// An error and its causes on one line (reqwest's own message leaves out why).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        let ok = |s: &str| parse_listen_addr("--metrics-addr", s).unwrap().to_string();
        assert_eq!(ok("127.0.0.1:9100"), "127.0.0.1:9100");
        assert_eq!(ok("0.0.0.0:0"), "0.0.0.0:0");
        assert_eq!(ok("[::1]:9100"), "[::1]:9100");
        assert!(ok("localhost:9100").ends_with(":9100"));
        for bad in [
            "",
            "9100",
            ":9100",
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:99999",
            "a b:1",
            "http://x:1",
        ] {
            let e = parse_listen_addr("--metrics-addr", bad).unwrap_err();
            assert!(
                e.contains("--metrics-addr")
                    && e.contains("expected HOST:PORT")
                    && !e.contains('\n'),
                "{bad:?}: {e}"
            );
        }
    }

    fn get(path: &str, method: Method) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap()
    }

    fn body(r: Response<Full<Bytes>>) -> (StatusCode, String, String) {
        use http_body_util::BodyExt;
        let status = r.status();
        let ct = r.headers()[CONTENT_TYPE].to_str().unwrap().to_string();
        let bytes = futures_util::FutureExt::now_or_never(r.into_body().collect())
            .unwrap()
            .unwrap()
            .to_bytes();
        (status, ct, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[test]
    fn answers() {
        let mut registry = Registry::default();
        let c = prometheus_client::metrics::counter::Counter::<u64>::default();
        registry.register("things", "Things done", c.clone());
        c.inc();
        let health = Health::new();
        let (s, ct, b) = body(answer(&get("/metrics", Method::GET), &registry, &health));
        assert_eq!((s, ct.as_str()), (StatusCode::OK, OPENMETRICS));
        assert!(
            b.contains("things_total 1\n") && b.ends_with("# EOF\n"),
            "{b}"
        );
        let (s, _, b) = body(answer(&get("/healthz", Method::GET), &registry, &health));
        assert_eq!((s, b.as_str()), (StatusCode::OK, "ok\n"));
        health.fail("store", "connection refused");
        let (s, _, b) = body(answer(&get("/healthz", Method::GET), &registry, &health));
        assert_eq!(
            (s, b.as_str()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "store: connection refused\n"
            )
        );
        health.ok("store");
        health.set_notes("acme ", [("acme a.test".into(), "renewal due".into())]);
        let (s, _, b) = body(answer(&get("/healthz", Method::GET), &registry, &health));
        assert_eq!(
            (s, b.as_str()),
            (StatusCode::OK, "ok\nacme a.test: renewal due\n")
        );
        let (s, _, _) = body(answer(&get("/other", Method::GET), &registry, &health));
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, _, _) = body(answer(&get("/healthz", Method::POST), &registry, &health));
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    }
}
