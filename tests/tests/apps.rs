//! The in-test protocol apps and their clients, directly (no proxy): what the protocol tests
//! through nginx and HAProxy stand on. Each app answers with its own name, reports what it
//! received, and stops on drop with its open connections and streams.

use std::time::Duration;
use switchboard_tests::*;

/// Upper bound for any single wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn h2_app_speaks_h2c_and_http1_on_one_port() {
    let (a, b) = (H2App::start("a").await, H2App::start("b").await);

    let h2 = h2c_get(a.port, "app.example", "/x/y?q=1").await.unwrap();
    assert_eq!(h2.status, 200, "{h2:?}");
    assert_eq!(h2.version, "HTTP/2.0", "{h2:?}");
    assert_eq!(h2.body, "a", "{h2:?}");
    assert_eq!(h2.seen_path.as_deref(), Some("/x/y?q=1"), "{h2:?}");
    assert_eq!(h2.seen_version.as_deref(), Some("HTTP/2.0"), "{h2:?}");
    assert_eq!(h2.seen_host.as_deref(), Some("app.example"), "{h2:?}");

    let h1 = http1_get(b.port, "other.example", "/").await.unwrap();
    assert_eq!(h1.status, 200, "{h1:?}");
    assert_eq!(h1.version, "HTTP/1.1", "{h1:?}");
    assert_eq!(h1.body, "b", "{h1:?}");
    assert_eq!(h1.seen_path.as_deref(), Some("/"), "{h1:?}");
    assert_eq!(h1.seen_version.as_deref(), Some("HTTP/1.1"), "{h1:?}");
    assert_eq!(h1.seen_host.as_deref(), Some("other.example"), "{h1:?}");

    // The harness's plain HTTP client (what `wait_routes` uses) sees the name alone.
    assert_eq!(answer(&fresh_client(), a.port, None).await, "a");

    let port = a.port;
    drop(a);
    assert!(
        h2c_get(port, "app.example", "/").await.is_err(),
        "a dropped H2App still answers"
    );
}

#[tokio::test]
async fn grpc_app_unary_and_server_streaming() {
    let (a, b) = (GrpcApp::start("ga").await, GrpcApp::start("gb").await);

    let mut client = GrpcClient::connect(a.port).await.unwrap();
    let reply = client.echo("hello").await.unwrap();
    assert_eq!(reply.name, "ga");
    assert_eq!(reply.text, "hello");
    assert_eq!(reply.authority, format!("127.0.0.1:{}", a.port));

    let mut vhost = GrpcClient::connect_as(b.port, "grpc.example")
        .await
        .unwrap();
    let reply = vhost.echo("hi").await.unwrap();
    assert_eq!(
        (reply.name.as_str(), reply.authority.as_str()),
        ("gb", "grpc.example")
    );

    let msgs = client
        .count_all(3, Duration::from_millis(20))
        .await
        .unwrap();
    let seen: Vec<(String, u32)> = msgs.into_iter().map(|m| (m.name, m.i)).collect();
    assert_eq!(
        seen,
        vec![("ga".into(), 1), ("ga".into(), 2), ("ga".into(), 3)]
    );

    // gRPC needs HTTP/2: the app refuses HTTP/1.1, so a proxy that downgrades fails visibly.
    assert!(
        http1_get(a.port, "x", "/").await.is_err(),
        "GrpcApp answered HTTP/1.1"
    );
}

#[tokio::test]
async fn grpc_stream_ends_when_its_app_stops() {
    let app = GrpcApp::start("ga").await;
    let mut client = GrpcClient::connect(app.port).await.unwrap();
    // Long enough never to finish within the test: only the app's stop can end it.
    let mut stream = client.count(1000, Duration::from_millis(50)).await.unwrap();
    let first = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("first stream message")
        .unwrap()
        .expect("a message, not the end");
    assert_eq!((first.name.as_str(), first.i), ("ga", 1));

    drop(app);
    let mut after = 0;
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => after += 1,
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the stream was still open {WAIT:?} after its app stopped"
    );
    assert!(
        after < 999,
        "the whole stream arrived after the app stopped"
    );
}

#[tokio::test]
async fn tcp_echo_keeps_a_connection_and_closes_it_on_stop() {
    let (a, b) = (TcpEcho::start("ta").await, TcpEcho::start("tb").await);
    assert_eq!(tcp_echo(b.port, "one").await.unwrap(), "tb one");

    let mut conn = TcpEchoClient::connect(a.port).await.unwrap();
    assert_eq!(conn.say("hello").await.unwrap(), "ta hello");
    assert_eq!(conn.say("again").await.unwrap(), "ta again");
    assert!(conn.say("two\nlines").await.is_err());

    drop(a);
    assert!(
        conn.say("after stop").await.is_err(),
        "a connection to a stopped TcpEcho still echoes"
    );
}

#[tokio::test]
async fn udp_echo_answers_each_datagram() {
    let (a, b) = (UdpEcho::start("ua").await, UdpEcho::start("ub").await);
    assert_eq!(udp_echo(a.port, "hello", WAIT).await.unwrap(), "ua hello");
    assert_eq!(udp_echo(b.port, "hi", WAIT).await.unwrap(), "ub hi");

    let port = free_udp_port();
    assert!(
        std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "free_udp_port gave {port}, not free for both UDP and TCP"
    );
    assert_ne!(free_udp_port(), port, "free_udp_port repeated a port");

    let gone = a.port;
    drop(a);
    assert!(
        udp_echo(gone, "anyone?", Duration::from_millis(300))
            .await
            .is_err(),
        "a stopped UdpEcho still answers"
    );
}
