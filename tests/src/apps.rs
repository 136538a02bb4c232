//! In-test applications for the protocol tests, and the clients that talk to them: an HTTP/2
//! cleartext server ([`H2App`]), a gRPC server ([`GrpcApp`], client [`GrpcClient`]), a TCP
//! echo ([`TcpEcho`]) and a UDP echo ([`UdpEcho`]).
//!
//! Each runs in the test process on a free loopback port, answers with its own name (so a
//! test routing through a proxy tells which instance answered) and stops on drop, its open
//! connections and streams with it (a test can stop an instance under a held-open stream).
//! The clients are real protocol clients (hyper's HTTP/1.1 and HTTP/2, tonic's gRPC
//! channel), so what passes through a proxy is what a user's client would send, and every
//! call is bounded in time: a proxy that holds a request fails the test instead of hanging it.
//!
//! The gRPC service is written by hand, without protoc or generated code: the messages derive
//! `prost::Message`, and the server is `tonic::server::Grpc` with a `ProstCodec` on hyper's
//! HTTP/2 server. Its methods are [`ECHO_PATH`] (unary) and [`COUNT_PATH`] (server streaming).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures_util::Stream;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::{JoinHandle, JoinSet};
use tonic::codec::ProstCodec;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

/// How long one client call may take (connect, request, answer), unless it says otherwise.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The response header in which [`H2App`] reports the path (and query) of the request it got.
pub const SEEN_PATH: &str = "x-seen-path";
/// The response header in which [`H2App`] reports the HTTP version of the request it got
/// (`HTTP/1.1`, `HTTP/2.0`): whether a proxy spoke HTTP/2 to it.
pub const SEEN_VERSION: &str = "x-seen-version";
/// The response header in which [`H2App`] reports the host of the request it got (the
/// `:authority` of an HTTP/2 request, else `Host`).
pub const SEEN_HOST: &str = "x-seen-host";

/// The unary method of the test gRPC service: [`EchoRequest`] → [`EchoReply`].
pub const ECHO_PATH: &str = "/switchboard.test.Echo/Echo";
/// The server-streaming method of the test gRPC service: [`CountRequest`] → a stream of
/// [`CountReply`].
pub const COUNT_PATH: &str = "/switchboard.test.Echo/Count";

/// The accept loop of one app, and every connection it accepted: aborting the loop drops the
/// set, which aborts the connections, so a stopped app leaves no open connection or stream.
struct Serving(JoinHandle<()>);

impl Serving {
    fn tcp<F, Fut>(listener: TcpListener, conn: F) -> Serving
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        Serving(tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((sock, _)) => {
                            conns.spawn(conn(sock));
                        }
                        Err(_) => return,
                    },
                    // Reap finished connections so a long test does not keep them all.
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        }))
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A service instance for the store: `service` named, ID = the app's `name`, at 127.0.0.1 and
/// the app's port, tagged `backend`, with the given meta (`proto`, `path`, `listen`...).
fn instance(name: &str, port: u16, service: &str, meta: &[(&str, &str)]) -> switchboard::Service {
    switchboard::Service {
        id: name.to_string(),
        name: service.to_string(),
        address: "127.0.0.1".into(),
        port,
        tags: vec!["backend".into()],
        meta: meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        check: None,
        ttl: None,
        docker_health: None,
    }
}

/// Where the apps listen unless told otherwise: a free loopback port.
const LOOPBACK_ANY: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

async fn bind_tcp(addr: SocketAddr) -> anyhow::Result<(TcpListener, u16)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding TCP {addr}: expected a free local address"))?;
    let port = listener.local_addr()?.port();
    Ok((listener, port))
}

// ---------------------------------------------------------------------------------------
// HTTP/2 cleartext
// ---------------------------------------------------------------------------------------

/// An HTTP server on a free loopback port that speaks HTTP/2 cleartext with prior knowledge
/// (what a proxy's `proto h2` / `grpc_pass` backend connection, `h2load` and
/// `curl --http2-prior-knowledge` send) and HTTP/1.1 on the same port.
///
/// Every request, whatever its method and path, is answered `200` with the body
/// `<name>\n` (so [`crate::answer`] and [`crate::wait_routes`] see the instance's name) and
/// three headers saying what arrived: [`SEEN_PATH`] (path and query: a proxy's prefix
/// stripping shows there), [`SEEN_VERSION`] and [`SEEN_HOST`]. Stops on drop.
pub struct H2App {
    /// The name it answers with.
    pub name: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    _serving: Serving,
}

impl H2App {
    /// Starts it on a free loopback port.
    pub async fn start(name: &str) -> H2App {
        H2App::start_on(name, LOOPBACK_ANY)
            .await
            .expect("bind a loopback TCP port")
    }

    /// Starts it on `addr` (port 0: a free one); `protocol-demo` serves it on 0.0.0.0 in a
    /// container.
    pub async fn start_on(name: &str, addr: SocketAddr) -> anyhow::Result<H2App> {
        let (listener, port) = bind_tcp(addr).await?;
        let shared: Arc<str> = name.into();
        let serving = Serving::tcp(listener, move |sock| {
            let name = shared.clone();
            async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let name = name.clone();
                    async move { Ok::<_, Infallible>(h2_answer(&name, &req)) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            }
        });
        Ok(H2App {
            name: name.to_string(),
            port,
            _serving: serving,
        })
    }

    /// This app as an instance of `service` (ID = its name, tag `backend`, the given meta).
    pub fn service(&self, service: &str, meta: &[(&str, &str)]) -> switchboard::Service {
        instance(&self.name, self.port, service, meta)
    }
}

fn h2_answer(name: &str, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let header = |v: &str| {
        hyper::header::HeaderValue::from_str(v)
            .unwrap_or_else(|_| hyper::header::HeaderValue::from_static("?"))
    };
    let mut resp = Response::new(Full::new(Bytes::from(format!("{name}\n"))));
    let h = resp.headers_mut();
    h.insert(SEEN_PATH, header(path));
    h.insert(SEEN_VERSION, header(&format!("{:?}", req.version())));
    h.insert(SEEN_HOST, header(&host));
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    resp
}

/// What one HTTP request got back, from an [`H2App`] or from a proxy that answered itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    /// The status code.
    pub status: u16,
    /// The HTTP version of the response the client got (`HTTP/1.1`, `HTTP/2.0`).
    pub version: String,
    /// The body, trimmed: an [`H2App`]'s name, or a proxy's error page.
    pub body: String,
    /// [`SEEN_PATH`], when an [`H2App`] answered.
    pub seen_path: Option<String>,
    /// [`SEEN_VERSION`], when an [`H2App`] answered.
    pub seen_version: Option<String>,
    /// [`SEEN_HOST`], when an [`H2App`] answered.
    pub seen_host: Option<String>,
}

impl HttpReply {
    async fn read(resp: Response<Incoming>) -> anyhow::Result<HttpReply> {
        let (parts, body) = resp.into_parts();
        let header = |n: &str| {
            parts
                .headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let body = body
            .collect()
            .await
            .context("reading the response body")?
            .to_bytes();
        Ok(HttpReply {
            status: parts.status.as_u16(),
            version: format!("{:?}", parts.version),
            body: String::from_utf8_lossy(&body).trim().to_string(),
            seen_path: header(SEEN_PATH),
            seen_version: header(SEEN_VERSION),
            seen_host: header(SEEN_HOST),
        })
    }
}

fn get_request(host: &str, path: &str, h2: bool) -> anyhow::Result<Request<Empty<Bytes>>> {
    let builder = if h2 {
        // HTTP/2 carries the host in `:authority`, taken from an absolute URI.
        Request::get(format!("http://{host}{path}")).version(hyper::Version::HTTP_2)
    } else {
        Request::get(path).header(hyper::header::HOST, host)
    };
    builder.body(Empty::new()).with_context(|| {
        format!("request GET {path} for host {host:?}: expected a path and a host name")
    })
}

async fn connect(port: u16) -> anyhow::Result<TcpStream> {
    TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))
}

/// One `GET path` with `host` over a new HTTP/2 cleartext connection with prior knowledge
/// (no upgrade, as `curl --http2-prior-knowledge` does) to 127.0.0.1:`port`, within
/// [`CALL_TIMEOUT`]. `Err` when the connection or the HTTP/2 exchange fails (e.g. the port
/// speaks only HTTP/1.1), not for an error status.
pub async fn h2c_get(port: u16, host: &str, path: &str) -> anyhow::Result<HttpReply> {
    let call = async {
        let req = get_request(host, path, true)?;
        let io = TokioIo::new(connect(port).await?);
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .with_context(|| format!("HTTP/2 handshake with 127.0.0.1:{port}"))?;
        let driver = tokio::spawn(conn);
        let resp = send
            .send_request(req)
            .await
            .with_context(|| format!("HTTP/2 GET {path} on 127.0.0.1:{port}"));
        let reply = match resp {
            Ok(r) => HttpReply::read(r).await,
            Err(e) => Err(e),
        };
        driver.abort();
        reply
    };
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| {
            anyhow!("HTTP/2 GET {path} on 127.0.0.1:{port}: no answer within {CALL_TIMEOUT:?}")
        })?
}

/// One `GET path` with `Host: host` over a new HTTP/1.1 connection to 127.0.0.1:`port`,
/// within [`CALL_TIMEOUT`]. `Err` when the connection or the exchange fails, not for an error
/// status.
pub async fn http1_get(port: u16, host: &str, path: &str) -> anyhow::Result<HttpReply> {
    let call = async {
        let req = get_request(host, path, false)?;
        let io = TokioIo::new(connect(port).await?);
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .with_context(|| format!("HTTP/1.1 connection to 127.0.0.1:{port}"))?;
        let driver = tokio::spawn(conn);
        let resp = send
            .send_request(req)
            .await
            .with_context(|| format!("HTTP/1.1 GET {path} on 127.0.0.1:{port}"));
        let reply = match resp {
            Ok(r) => HttpReply::read(r).await,
            Err(e) => Err(e),
        };
        driver.abort();
        reply
    };
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| {
            anyhow!("HTTP/1.1 GET {path} on 127.0.0.1:{port}: no answer within {CALL_TIMEOUT:?}")
        })?
}

// ---------------------------------------------------------------------------------------
// gRPC
// ---------------------------------------------------------------------------------------

/// The request of [`ECHO_PATH`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    /// Echoed back in [`EchoReply::text`].
    #[prost(string, tag = "1")]
    pub text: String,
}

/// The answer of [`ECHO_PATH`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    /// The [`GrpcApp`]'s name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// The request's text.
    #[prost(string, tag = "2")]
    pub text: String,
    /// The `:authority` the server saw (a proxy may rewrite it).
    #[prost(string, tag = "3")]
    pub authority: String,
}

/// The request of [`COUNT_PATH`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct CountRequest {
    /// How many messages to send.
    #[prost(uint32, tag = "1")]
    pub n: u32,
    /// The pause before each message after the first, in milliseconds: a stream of `n`
    /// messages stays open about `(n - 1) * interval_ms`.
    #[prost(uint32, tag = "2")]
    pub interval_ms: u32,
}

/// One message of the [`COUNT_PATH`] stream.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CountReply {
    /// The [`GrpcApp`]'s name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// 1, 2, ... n.
    #[prost(uint32, tag = "2")]
    pub i: u32,
}

/// A gRPC server (HTTP/2 only, cleartext) on a free loopback port with one hand-written
/// service: [`ECHO_PATH`] answers an [`EchoRequest`] with its name, the text and the
/// `:authority` it saw; [`COUNT_PATH`] streams `n` [`CountReply`]s `interval_ms` apart, so a
/// test can hold a stream open across a proxy's changes. Any other path is `UNIMPLEMENTED`.
/// HTTP/1.1 is refused, so a proxy that does not speak HTTP/2 to it fails visibly. Stops on
/// drop, ending its open streams.
pub struct GrpcApp {
    /// The name it answers with.
    pub name: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    _serving: Serving,
}

impl GrpcApp {
    /// Starts it on a free loopback port.
    pub async fn start(name: &str) -> GrpcApp {
        GrpcApp::start_on(name, LOOPBACK_ANY)
            .await
            .expect("bind a loopback TCP port")
    }

    /// Starts it on `addr` (port 0: a free one).
    pub async fn start_on(name: &str, addr: SocketAddr) -> anyhow::Result<GrpcApp> {
        let (listener, port) = bind_tcp(addr).await?;
        let shared: Arc<str> = name.into();
        let serving = Serving::tcp(listener, move |sock| {
            let name = shared.clone();
            async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    grpc_route(name.clone(), req)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .http2_only()
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            }
        });
        Ok(GrpcApp {
            name: name.to_string(),
            port,
            _serving: serving,
        })
    }

    /// This app as an instance of `service` (ID = its name, tag `backend`, the given meta).
    pub fn service(&self, service: &str, meta: &[(&str, &str)]) -> switchboard::Service {
        instance(&self.name, self.port, service, meta)
    }
}

async fn grpc_route(
    name: Arc<str>,
    req: Request<Incoming>,
) -> Result<Response<tonic::body::Body>, Infallible> {
    let resp = match req.uri().path() {
        ECHO_PATH => {
            // tonic's request keeps the headers, not the URI: HTTP/2's `:authority` is there.
            let authority = req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .or_else(|| {
                    req.headers()
                        .get(hyper::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_string)
                })
                .unwrap_or_default();
            let mut grpc =
                tonic::server::Grpc::new(ProstCodec::<EchoReply, EchoRequest>::default());
            grpc.unary(EchoService(name, authority), req).await
        }
        COUNT_PATH => {
            let mut grpc =
                tonic::server::Grpc::new(ProstCodec::<CountReply, CountRequest>::default());
            grpc.server_streaming(CountService(name), req).await
        }
        other => tonic::Status::unimplemented(format!("no method {other}")).into_http(),
    };
    Ok(resp)
}

/// The unary method's handler: the app's name, and the authority of the request it answers.
struct EchoService(Arc<str>, String);

impl tonic::server::UnaryService<EchoRequest> for EchoService {
    type Response = EchoReply;
    type Future = std::future::Ready<Result<tonic::Response<EchoReply>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<EchoRequest>) -> Self::Future {
        let text = request.into_inner().text;
        std::future::ready(Ok(tonic::Response::new(EchoReply {
            name: self.0.to_string(),
            text,
            authority: std::mem::take(&mut self.1),
        })))
    }
}

struct CountService(Arc<str>);

type CountStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<CountReply, tonic::Status>> + Send + 'static>>;

impl tonic::server::ServerStreamingService<CountRequest> for CountService {
    type Response = CountReply;
    type ResponseStream = CountStream;
    type Future = std::future::Ready<Result<tonic::Response<CountStream>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<CountRequest>) -> Self::Future {
        let CountRequest { n, interval_ms } = request.into_inner();
        let name = self.0.clone();
        let every = Duration::from_millis(interval_ms.into());
        let stream = futures_util::stream::unfold(1u32, move |i| {
            let name = name.clone();
            async move {
                if i > n {
                    return None;
                }
                if i > 1 {
                    tokio::time::sleep(every).await;
                }
                let msg = CountReply {
                    name: name.to_string(),
                    i,
                };
                Some((Ok(msg), i + 1))
            }
        });
        std::future::ready(Ok(tonic::Response::new(Box::pin(stream) as CountStream)))
    }
}

/// A gRPC client of the test service over HTTP/2 cleartext (prior knowledge) to
/// 127.0.0.1:`port`, a [`GrpcApp`] or a proxy in front of some. Connection and each call's
/// response headers are bounded by [`CALL_TIMEOUT`]; a stream's messages by the caller.
#[derive(Clone)]
pub struct GrpcClient {
    grpc: tonic::client::Grpc<Channel>,
}

impl GrpcClient {
    /// Connects to 127.0.0.1:`port`, sending `:authority` `127.0.0.1:<port>`.
    pub async fn connect(port: u16) -> anyhow::Result<GrpcClient> {
        GrpcClient::connect_as(port, &format!("127.0.0.1:{port}")).await
    }

    /// Connects to 127.0.0.1:`port`, sending `:authority` `authority` (a virtual host's name,
    /// for a proxy that routes by host).
    pub async fn connect_as(port: u16, authority: &str) -> anyhow::Result<GrpcClient> {
        GrpcClient::connect_addr(([127, 0, 0, 1], port).into(), authority).await
    }

    /// Connects to `addr`, sending `:authority` `authority`.
    pub async fn connect_addr(addr: SocketAddr, authority: &str) -> anyhow::Result<GrpcClient> {
        let origin: tonic::codegen::http::Uri = format!("http://{authority}")
            .parse()
            .with_context(|| format!("gRPC authority {authority:?}: expected host[:port]"))?;
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .context("gRPC endpoint")?
            .origin(origin)
            .connect_timeout(CALL_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .connect()
            .await
            .with_context(|| format!("gRPC connection to {addr}"))?;
        Ok(GrpcClient {
            grpc: tonic::client::Grpc::new(channel),
        })
    }

    /// Calls [`ECHO_PATH`] with `text`.
    pub async fn echo(&mut self, text: &str) -> Result<EchoReply, tonic::Status> {
        self.ready().await?;
        let req = tonic::Request::new(EchoRequest {
            text: text.to_string(),
        });
        let codec = ProstCodec::<EchoRequest, EchoReply>::default();
        let resp = self
            .grpc
            .unary(req, PathAndQuery::from_static(ECHO_PATH), codec)
            .await?;
        Ok(resp.into_inner())
    }

    /// Calls [`COUNT_PATH`]: `n` messages, `interval` apart. Read them with
    /// `stream.message().await` (`Ok(None)` at the end of the stream). A stream a proxy cuts
    /// may end with `Ok(None)` and no error (tonic takes a response without trailers as a
    /// clean end): count the messages, as [`GrpcClient::count_all`] does.
    pub async fn count(
        &mut self,
        n: u32,
        interval: Duration,
    ) -> Result<tonic::Streaming<CountReply>, tonic::Status> {
        self.ready().await?;
        let req = tonic::Request::new(CountRequest {
            n,
            interval_ms: interval.as_millis().try_into().unwrap_or(u32::MAX),
        });
        let codec = ProstCodec::<CountRequest, CountReply>::default();
        let resp = self
            .grpc
            .server_streaming(req, PathAndQuery::from_static(COUNT_PATH), codec)
            .await?;
        Ok(resp.into_inner())
    }

    /// Every message of a [`GrpcClient::count`] stream of `n` messages `interval` apart, each
    /// read within [`CALL_TIMEOUT`] plus `interval`. `Err` unless exactly `n` arrived: a
    /// stream that ends early, even cleanly, is a cut stream.
    pub async fn count_all(
        &mut self,
        n: u32,
        interval: Duration,
    ) -> Result<Vec<CountReply>, tonic::Status> {
        let mut stream = self.count(n, interval).await?;
        let wait = CALL_TIMEOUT + interval;
        let mut out = Vec::new();
        loop {
            match tokio::time::timeout(wait, stream.message()).await {
                Ok(Ok(Some(m))) => out.push(m),
                Ok(Ok(None)) if out.len() == n as usize => return Ok(out),
                Ok(Ok(None)) => {
                    return Err(tonic::Status::aborted(format!(
                        "the stream ended after {} of {n} messages",
                        out.len()
                    )))
                }
                Ok(Err(status)) => return Err(status),
                Err(_) => {
                    return Err(tonic::Status::deadline_exceeded(format!(
                        "no stream message within {wait:?} after {} of {n}",
                        out.len()
                    )))
                }
            }
        }
    }

    async fn ready(&mut self) -> Result<(), tonic::Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("gRPC channel not ready: {e}")))
    }
}

// ---------------------------------------------------------------------------------------
// TCP and UDP echo
// ---------------------------------------------------------------------------------------

/// A TCP echo server on a free loopback port: every line it receives is answered
/// `<name> <line>\n` on the same connection, which stays open until the client closes it (a
/// test can hold one across a proxy's changes). A bare connect and close (a proxy's TCP
/// health check) is harmless. Stops on drop, closing its connections.
pub struct TcpEcho {
    /// The name it answers with.
    pub name: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    _serving: Serving,
}

impl TcpEcho {
    /// Starts it on a free loopback port.
    pub async fn start(name: &str) -> TcpEcho {
        TcpEcho::start_on(name, LOOPBACK_ANY)
            .await
            .expect("bind a loopback TCP port")
    }

    /// Starts it on `addr` (port 0: a free one).
    pub async fn start_on(name: &str, addr: SocketAddr) -> anyhow::Result<TcpEcho> {
        let (listener, port) = bind_tcp(addr).await?;
        let shared: Arc<str> = name.into();
        let serving = Serving::tcp(listener, move |sock| {
            let name = shared.clone();
            async move {
                let (read, mut write) = sock.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if write
                        .write_all(format!("{name} {line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        Ok(TcpEcho {
            name: name.to_string(),
            port,
            _serving: serving,
        })
    }

    /// This app as an instance of `service` (ID = its name, tag `backend`, the given meta).
    pub fn service(&self, service: &str, meta: &[(&str, &str)]) -> switchboard::Service {
        instance(&self.name, self.port, service, meta)
    }
}

/// One open connection to a [`TcpEcho`], directly or through a proxy.
pub struct TcpEchoClient {
    lines: tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    write: tokio::net::tcp::OwnedWriteHalf,
    addr: SocketAddr,
}

impl TcpEchoClient {
    /// Connects to 127.0.0.1:`port` within [`CALL_TIMEOUT`].
    pub async fn connect(port: u16) -> anyhow::Result<TcpEchoClient> {
        TcpEchoClient::connect_addr(([127, 0, 0, 1], port).into()).await
    }

    /// Connects to `addr` within [`CALL_TIMEOUT`].
    pub async fn connect_addr(addr: SocketAddr) -> anyhow::Result<TcpEchoClient> {
        let sock = tokio::time::timeout(CALL_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connecting to {addr}: no answer within {CALL_TIMEOUT:?}"))?
            .with_context(|| format!("connecting to {addr}"))?;
        let (read, write) = sock.into_split();
        Ok(TcpEchoClient {
            lines: BufReader::new(read).lines(),
            write,
            addr,
        })
    }

    /// Sends `text` (one line, no newline in it) and returns the echo, `<name> <text>`, read
    /// within [`CALL_TIMEOUT`]. `Err` when the connection is closed or reset (a proxy with no
    /// server accepts, then closes) or the echo does not come.
    pub async fn say(&mut self, text: &str) -> anyhow::Result<String> {
        if text.contains('\n') {
            bail!("TCP echo text {text:?}: expected one line");
        }
        let addr = self.addr;
        let call = async {
            self.write
                .write_all(format!("{text}\n").as_bytes())
                .await
                .with_context(|| format!("sending to {addr}"))?;
            match self.lines.next_line().await {
                Ok(Some(line)) => Ok(line),
                Ok(None) => Err(anyhow!("{addr} closed the connection with no echo")),
                Err(e) => Err(anyhow!("reading the echo from {addr}: {e}")),
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| anyhow!("no echo from {addr} within {CALL_TIMEOUT:?}"))?
    }
}

/// One line through a new connection to 127.0.0.1:`port`: the echo (`<name> <text>`) of the
/// [`TcpEcho`] that answered.
pub async fn tcp_echo(port: u16, text: &str) -> anyhow::Result<String> {
    TcpEchoClient::connect(port).await?.say(text).await
}

/// A UDP echo server on a free loopback port: every datagram is answered to its sender with
/// `<name> <datagram>`. Stops on drop.
pub struct UdpEcho {
    /// The name it answers with.
    pub name: String,
    /// Its UDP port on 127.0.0.1.
    pub port: u16,
    task: JoinHandle<()>,
}

impl UdpEcho {
    /// Starts it on a free loopback UDP port.
    pub async fn start(name: &str) -> UdpEcho {
        UdpEcho::start_on(name, LOOPBACK_ANY)
            .await
            .expect("bind a loopback UDP port")
    }

    /// Starts it on `addr` (port 0: a free one).
    pub async fn start_on(name: &str, addr: SocketAddr) -> anyhow::Result<UdpEcho> {
        let sock = UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding UDP {addr}: expected a free local address"))?;
        let port = sock.local_addr()?.port();
        let prefix = format!("{name} ").into_bytes();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let mut reply = prefix.clone();
                reply.extend_from_slice(&buf[..n]);
                let _ = sock.send_to(&reply, from).await;
            }
        });
        Ok(UdpEcho {
            name: name.to_string(),
            port,
            task,
        })
    }

    /// This app as an instance of `service` (ID = its name, tag `backend`, the given meta).
    pub fn service(&self, service: &str, meta: &[(&str, &str)]) -> switchboard::Service {
        instance(&self.name, self.port, service, meta)
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One datagram `text` to 127.0.0.1:`port` from a new socket, and the first answer within
/// `timeout` (`<name> <text>` from a [`UdpEcho`]). UDP may drop a datagram, a proxy's first
/// one too: callers poll ([`crate::wait_for`]) rather than expect every call to answer.
pub async fn udp_echo(port: u16, text: &str, timeout: Duration) -> anyhow::Result<String> {
    udp_echo_addr(([127, 0, 0, 1], port).into(), text, timeout).await
}

/// [`udp_echo`] to `to`, from a new socket: on loopback for a loopback `to` (the tests' own
/// traffic stays there), else on any local address of its family.
pub async fn udp_echo_addr(
    to: SocketAddr,
    text: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let local: SocketAddr = match to {
        SocketAddr::V4(a) if a.ip().is_loopback() => ([127, 0, 0, 1], 0).into(),
        SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
        SocketAddr::V6(a) if a.ip().is_loopback() => (std::net::Ipv6Addr::LOCALHOST, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local)
        .await
        .context("bind a local UDP port")?;
    sock.connect(to)
        .await
        .with_context(|| format!("UDP connect to {to}"))?;
    sock.send(text.as_bytes())
        .await
        .with_context(|| format!("UDP send to {to}"))?;
    let mut buf = vec![0u8; 65536];
    match tokio::time::timeout(timeout, sock.recv(&mut buf)).await {
        Ok(Ok(n)) => Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Ok(Err(e)) => Err(anyhow!("UDP answer from {to}: {e}")),
        Err(_) => Err(anyhow!("no UDP answer from {to} within {timeout:?}")),
    }
}
