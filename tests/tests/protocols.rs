//! Protocols through both shipped templates, end to end: real Consul, the real `confd` binary,
//! a real nginx (Lua balancer, `nginx_lua` live channel) and a real HAProxy (runtime API,
//! `haproxy` live channel), and an in-test application on loopback that speaks plain HTTP and
//! websockets and reports the headers the proxy forwarded to it.
//!
//! Websockets need no label: the default route carries them. A socket opened before a
//! membership change (another instance of the service added, then removed, with no reload)
//! keeps echoing. The app sees `X-Forwarded-For`, `-Proto`, `-Host` and an `X-Request-ID`
//! (the client's when it is one sane token, else one the proxy made).

use futures_util::{SinkExt, StreamExt};
use std::collections::BTreeMap;
use std::time::Duration;
use switchboard::{RegistryUri, Store};
use switchboard_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Upper bound for any single wait in these tests.
const WAIT: Duration = Duration::from_secs(30);
/// The headers the app reports (lower case), in this order.
const FORWARDED: [&str; 4] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
];

/// The in-test application on a free loopback port. `GET /` answers its name (so
/// [`wait_routes`] sees which instance answered); `GET /headers` its name, then one
/// `name: value` line per [`FORWARDED`] header it received; a websocket handshake is
/// accepted, the first message is the same report for the handshake, and every text message
/// after that is echoed as `<name>: <text>`. Stops on drop.
struct App {
    name: String,
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    async fn start(name: &str) -> App {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let name_owned = name.to_string();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, name_owned.clone()));
            }
        });
        App {
            name: name.to_string(),
            port,
            task,
        }
    }

    /// This app as an instance of service `http`, tagged `backend`, ID = its name.
    fn service(&self) -> switchboard::Service {
        switchboard::Service {
            id: self.name.clone(),
            name: "http".into(),
            address: "127.0.0.1".into(),
            port: self.port,
            tags: vec!["backend".into()],
            meta: Default::default(),
            check: None,
            ttl: None,
            docker_health: None,
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One connection to the app: a request head, then an answer or a websocket.
async fn serve(mut sock: TcpStream, name: String) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 64 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("/")
        .to_string();
    // Every value of a header, in order, joined by ", " (as a repeated header reads).
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in lines.take_while(|l| !l.is_empty()) {
        if let Some((k, v)) = l.split_once(':') {
            headers
                .entry(k.trim().to_ascii_lowercase())
                .or_default()
                .push(v.trim().to_string());
        }
    }
    let report = {
        let mut r = format!("{name}\n");
        for h in FORWARDED {
            if let Some(v) = headers.get(h) {
                r.push_str(&format!("{h}: {}\n", v.join(", ")));
            }
        }
        r
    };
    let upgrade = headers
        .get("upgrade")
        .is_some_and(|v| v.iter().any(|v| v.eq_ignore_ascii_case("websocket")));
    if upgrade {
        let Some(key) = headers.get("sec-websocket-key").and_then(|v| v.first()) else {
            return;
        };
        let accept = derive_accept_key(key.as_bytes());
        let resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        if sock.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
        let mut ws = WebSocketStream::from_raw_socket(sock, Role::Server, None).await;
        if ws.send(Message::text(report)).await.is_err() {
            return;
        }
        while let Some(Ok(msg)) = ws.next().await {
            let out = match msg {
                Message::Text(t) => Message::text(format!("{name}: {}", t.as_str())),
                Message::Close(_) => break,
                _ => continue,
            };
            if ws.send(out).await.is_err() {
                return;
            }
        }
        let _ = ws.close(None).await;
        return;
    }
    let body = if path == "/headers" { report } else { name };
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
}

/// `name: value` lines of an app report (its first line, the app's name, under `""`).
fn parse_report(report: &str) -> BTreeMap<String, String> {
    let mut lines = report.lines();
    let mut out = BTreeMap::from([("".to_string(), lines.next().unwrap_or("").to_string())]);
    for l in lines {
        if let Some((k, v)) = l.split_once(": ") {
            out.insert(k.to_string(), v.to_string());
        }
    }
    out
}

/// What a request ID may look like for the app to log it: one token, no spaces.
fn sane_token(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

type Ws = WebSocketStream<TcpStream>;

/// Opens a websocket to `ws://<host>/chat` through the proxy on `port`, sending
/// `X-Request-ID: <rid>`; returns it and the app's report of the handshake.
async fn open_ws(port: u16, host: &str, rid: &str) -> (Ws, BTreeMap<String, String>) {
    let mut req = format!("ws://{host}/chat").into_client_request().unwrap();
    req.headers_mut()
        .insert("x-request-id", rid.parse().unwrap());
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(req, tcp))
        .await
        .expect("websocket handshake timed out")
        .expect("websocket handshake through the proxy");
    assert_eq!(resp.status().as_u16(), 101);
    // An upgrade never says `close` (nginx's workers add it to every other response before a
    // reload).
    let connection: Vec<_> = resp.headers().get_all("connection").iter().collect();
    assert!(
        connection.iter().all(|v| !v
            .to_str()
            .unwrap_or_default()
            .to_ascii_lowercase()
            .contains("close")),
        "{connection:?}"
    );
    let report = next_text(&mut ws).await;
    (ws, parse_report(&report))
}

async fn next_text(ws: &mut Ws) -> String {
    match tokio::time::timeout(WAIT, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t.as_str().to_string(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// Sends `text` and expects the echo from `app`.
async fn echo(ws: &mut Ws, app: &str, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
    assert_eq!(next_text(ws).await, format!("{app}: {text}"));
}

/// The app's report of one `GET /headers` through the proxy, with `Host: host` and, when
/// given, `X-Request-ID: rid`.
async fn headers_seen(port: u16, host: &str, rid: Option<&str>) -> BTreeMap<String, String> {
    let mut req = fresh_client()
        .get(format!("http://127.0.0.1:{port}/headers"))
        .header("Host", host)
        .header("X-Forwarded-Proto", "https")
        .header("X-Forwarded-Host", "spoofed.example");
    if let Some(r) = rid {
        req = req.header("X-Request-ID", r);
    }
    let resp = req.send().await.expect("GET /headers through the proxy");
    assert!(resp.status().is_success(), "status {}", resp.status());
    parse_report(&resp.text().await.unwrap())
}

/// Forwarded headers on plain requests: set from what the proxy saw, the client's
/// `X-Forwarded-Proto`/`-Host` replaced, a sane `X-Request-ID` kept, any other replaced.
async fn assert_forwarded_headers(port: u16) {
    let host = "app.example";
    let seen = headers_seen(port, host, Some("client-id.42:a_b")).await;
    assert_eq!(seen[""], "a");
    assert!(
        seen["x-forwarded-for"].contains("127.0.0.1"),
        "X-Forwarded-For: {seen:?}"
    );
    assert_eq!(seen["x-forwarded-proto"], "http", "{seen:?}");
    assert_eq!(seen["x-forwarded-host"], host, "{seen:?}");
    assert_eq!(seen["x-request-id"], "client-id.42:a_b", "{seen:?}");

    let mut ids = std::collections::BTreeSet::new();
    for bad in [
        None,
        Some("two words"),
        Some("x;y=<z>"),
        Some(&*"a".repeat(200)),
    ] {
        let seen = headers_seen(port, host, bad).await;
        let id = seen.get("x-request-id").cloned().unwrap_or_default();
        assert!(
            sane_token(&id) && Some(id.as_str()) != bad,
            "a client X-Request-ID {bad:?} must be replaced by a generated token, app saw {id:?}"
        );
        ids.insert(id);
    }
    assert_eq!(ids.len(), 4, "generated request IDs must differ: {ids:?}");
}

/// The websocket scenario on one proxy: open a socket (the app reports the handshake's
/// forwarded headers), echo, add and remove a second instance through the live path (no
/// reload) while it stays open and keeps echoing, then close it cleanly.
async fn websocket_through_membership_change(
    what: &str,
    port: u16,
    confd: &Process,
    st: &Store,
    b: &App,
) {
    let reloads = || {
        confd
            .output()
            .matches("confd::runner: reloaded reload=")
            .count()
    };
    let lives = || confd.output().matches("applied live, no reload").count();
    wait_routes(&format!("{what}: a alone"), port, None, &["a"], WAIT).await;

    let (mut ws, seen) = open_ws(port, "chat.example", "ws-client-7").await;
    assert_eq!(seen[""], "a");
    assert!(seen["x-forwarded-for"].contains("127.0.0.1"), "{seen:?}");
    assert_eq!(seen["x-forwarded-proto"], "http", "{seen:?}");
    assert_eq!(seen["x-forwarded-host"], "chat.example", "{seen:?}");
    assert_eq!(seen["x-request-id"], "ws-client-7", "{seen:?}");
    echo(&mut ws, "a", "hello before").await;

    let (reloads0, lives0) = (reloads(), lives());
    st.register(&b.service()).await.unwrap();
    wait_routes(&format!("{what}: a and b"), port, None, &["a", "b"], WAIT).await;
    echo(&mut ws, "a", "hello while b serves").await;
    st.deregister(&b.service()).await.unwrap();
    wait_routes(&format!("{what}: a alone again"), port, None, &["a"], WAIT).await;
    echo(&mut ws, "a", "hello after b left").await;
    assert_eq!(
        reloads(),
        reloads0,
        "{what}: a membership change reloaded the proxy; confd output:\n{}",
        confd.output()
    );
    assert!(
        lives() >= lives0 + 2,
        "{what}: expected two live updates; confd output:\n{}",
        confd.output()
    );

    ws.send(Message::Close(None)).await.expect("close");
    let closed = tokio::time::timeout(WAIT, async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Close(_)) | Err(_) => return true,
                Ok(_) => {}
            }
        }
        true
    })
    .await;
    assert_eq!(
        closed,
        Ok(true),
        "{what}: the close handshake did not finish"
    );
}

async fn store_with_a(consul: &Consul) -> (Store, App, App) {
    let st = Store::new(&RegistryUri::parse(&consul.uri()).unwrap());
    let (a, b) = (App::start("a").await, App::start("b").await);
    st.register(&a.service()).await.unwrap();
    (st, a, b)
}

#[tokio::test]
async fn nginx_websocket_and_forwarded_headers() {
    let consul = Consul::start().await;
    let (st, a, b) = store_with_a(&consul).await;
    let lb = NginxConfd::start(
        &consul.uri(),
        &[("default_service", "http".into())],
        &format!("127.0.0.1:{}", a.port),
    )
    .await;
    websocket_through_membership_change("nginx", lb.port, &lb.confd, &st, &b).await;
    assert_forwarded_headers(lb.port).await;
    // While the workers close client connections (as before a reload), a websocket opens.
    let (status, reason) = post_unix(
        &lb.socket(),
        "/switchboard/closing",
        b"switchboard-closing 1\n60000\n",
    )
    .await;
    assert_eq!(status, 200, "{reason}");
    let (mut ws, seen) = open_ws(lb.port, "chat.example", "ws-client-8").await;
    assert_eq!(seen[""], "a");
    echo(&mut ws, "a", "hello while closing").await;
}

#[tokio::test]
async fn haproxy_websocket_and_forwarded_headers() {
    let consul = Consul::start().await;
    let (st, a, b) = store_with_a(&consul).await;
    let needle = format!("127.0.0.1:{}", a.port);
    let lb = HaproxyConfd::start_live(
        &consul.uri(),
        "127.0.0.1",
        "wait: { min: 100ms, max: 1s }",
        &[("default_service", "http".into())],
        true,
        |t| t.contains(&needle),
    )
    .await;
    // confd's first reload (refused while HAProxy was not up yet) is retried until it lands.
    lb.confd
        .wait_output("confd::runner: reloaded reload=", WAIT)
        .await;
    websocket_through_membership_change("HAProxy", lb.port, &lb.confd, &st, &b).await;
    assert_forwarded_headers(lb.port).await;
}
