//! Routing labels through both shipped templates, end to end: real Consul, the real `confd`
//! binary, a real nginx (Lua balancer, `nginx_lua` live channel, an h2c listener of its own)
//! and a real HAProxy (runtime API, `haproxy` live channel), and in-test applications on
//! loopback that speak HTTP/1.1 and h2c, gRPC, TCP and UDP (`switchboard_tests::apps`).
//!
//! Per proxy: paths with and without stripping on a virtual host and on the default host, an
//! h2c pool reached over HTTP/1.1 and HTTP/2 (with `curl --http2-prior-knowledge` and h2load),
//! gRPC unary and server streaming, a TCP echo (and a UDP one on nginx), a bad label that is
//! warned about and routes nothing while the rest is served; weights shifted 10/90 → 50/50 →
//! 100/0 with no reload, measured as request shares over 2,000 requests; and gRPC streams held
//! open while the pool scales 1 → 3 → 1 with no reload, every stream finishing whole; new
//! routes and listeners under POST load, reloaded with not one request failing (nginx: while
//! its workers close client connections before the reload, every protocol still answers).

use std::collections::BTreeMap;
use std::time::Duration;
use switchboard::{RegistryUri, Service, Store};
use switchboard_tests::load::{Load, LoadSpec};
use switchboard_tests::*;
use tokio::process::Command;

/// Upper bound for any single wait in these tests.
const WAIT: Duration = Duration::from_secs(30);

/// How often a reply names each instance, over `n` sequential GETs of `/` on one kept-alive
/// HTTP/1.1 connection (the proxy balances every request, not every connection).
async fn shares(port: u16, n: usize) -> BTreeMap<String, usize> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let body = http
            .get(format!("http://127.0.0.1:{port}/"))
            .send()
            .await
            .expect("a GET through the proxy")
            .text()
            .await
            .unwrap();
        *seen.entry(body.trim().to_string()).or_insert(0) += 1;
    }
    seen
}

/// Whether `seen` gives `a` about `pct_a` percent (±5 points) and `b` the rest.
fn near(seen: &BTreeMap<String, usize>, a: &str, pct_a: f64, b: &str) -> bool {
    let total: usize = seen.values().sum();
    let pct = |k: &str| 100.0 * *seen.get(k).unwrap_or(&0) as f64 / total as f64;
    let others = total - seen.get(a).unwrap_or(&0) - seen.get(b).unwrap_or(&0);
    others == 0 && (pct(a) - pct_a).abs() <= 5.0 && (pct(b) - (100.0 - pct_a)).abs() <= 5.0
}

fn reloads(confd: &Process) -> usize {
    confd
        .output()
        .matches("confd::runner: reloaded reload=")
        .count()
}

fn lives(confd: &Process) -> usize {
    confd.output().matches("applied live, no reload").count()
}

/// confd and a live HAProxy on the shipped template, started once the rendered file holds
/// `needle`, after confd's first reload (refused while HAProxy was not up yet, then retried)
/// has landed: later reloads and live updates answer the test's own changes.
async fn haproxy(consul: &Consul, vars: &[(&str, String)], needle: &str) -> HaproxyConfd {
    let lb = HaproxyConfd::start_live(
        &consul.uri(),
        "127.0.0.1",
        "wait: { min: 100ms, max: 1s }",
        vars,
        true,
        |t| t.contains(needle),
    )
    .await;
    lb.confd
        .wait_output("confd::runner: reloaded reload=", WAIT)
        .await;
    lb
}

/// Two instances of the default service with `weights`, registered (again) in the store.
async fn weigh(st: &Store, a: &H2App, b: &H2App, weights: (u16, u16)) {
    for (app, w) in [(a, weights.0), (b, weights.1)] {
        let w = w.to_string();
        st.register(&app.service("http", &[("weight", &w)]))
            .await
            .unwrap();
    }
}

/// The weight scenario on one proxy serving `port`: 10/90, 50/50 and 100/0, each measured
/// over 2,000 requests once the proxy serves it, with no reload after the start.
async fn weights_shift_live(
    what: &str,
    port: u16,
    confd: &Process,
    st: &Store,
    a: &H2App,
    b: &H2App,
) {
    let start_reloads = reloads(confd);
    for (wa, wb) in [(10u16, 90u16), (50, 50), (100, 0)] {
        let lives0 = lives(confd);
        weigh(st, a, b, (wa, wb)).await;
        wait_for(
            &format!("{what}: the {wa}/{wb} weights applied live"),
            WAIT,
            || async { (lives(confd) > lives0).then_some(()) },
        )
        .await;
        let pct = 100.0 * wa as f64 / (wa + wb) as f64;
        // Both registrations may land in two live updates: wait until the proxy serves the
        // pair (a short sample), then measure.
        wait_for(&format!("{what}: {wa}/{wb} served"), WAIT, || async {
            near(&shares(port, 200).await, &a.name, pct, &b.name).then_some(())
        })
        .await;
        let seen = shares(port, 2_000).await;
        assert!(
            near(&seen, &a.name, pct, &b.name),
            "{what}: weights {wa}/{wb}: shares {seen:?} over 2,000 requests"
        );
        if wb == 0 {
            assert_eq!(
                seen.get(&b.name),
                None,
                "{what}: weight 0 took requests: {seen:?}"
            );
        }
    }
    assert_eq!(
        reloads(confd),
        start_reloads,
        "{what}: a weight change reloaded the proxy; confd output:\n{}",
        confd.output()
    );
}

async fn weighted_pair(consul: &Consul) -> (Store, H2App, H2App) {
    let st = Store::new(&RegistryUri::parse(&consul.uri()).unwrap());
    let (a, b) = (H2App::start("wa").await, H2App::start("wb").await);
    weigh(&st, &a, &b, (1, 1)).await;
    (st, a, b)
}

#[tokio::test]
async fn nginx_weights_shift_live() {
    let consul = Consul::start().await;
    let (st, a, b) = weighted_pair(&consul).await;
    let lb = NginxConfd::start(
        &consul.uri(),
        &[("default_service", "http".into())],
        &format!("127.0.0.1:{}", b.port),
    )
    .await;
    weights_shift_live("nginx", lb.port, &lb.confd, &st, &a, &b).await;
}

#[tokio::test]
async fn haproxy_weights_shift_live() {
    let consul = Consul::start().await;
    let (st, a, b) = weighted_pair(&consul).await;
    let needle = format!("127.0.0.1:{}", b.port);
    let lb = haproxy(&consul, &[("default_service", "http".into())], &needle).await;
    weights_shift_live("HAProxy", lb.port, &lb.confd, &st, &a, &b).await;
}

/// The applications of the routing scenario, registered in the store.
struct Apps {
    st: Store,
    /// `site`: the whole of `a.test`.
    site: H2App,
    /// `api`: `a.test/api`, stripped.
    api: H2App,
    /// `raw`: `a.test/raw`, not stripped.
    raw: H2App,
    /// `docs`: `/docs` of the default host, stripped.
    docs: H2App,
    /// `h2`: the whole of `h2.test`, over h2c.
    h2: H2App,
    /// `rpc`: the gRPC service's path on the default host.
    rpc: GrpcApp,
    /// `echo`: TCP on `tcp_port`.
    echo: TcpEcho,
    tcp_port: u16,
    /// `dgram`: UDP on `udp_port`.
    dgram: UdpEcho,
    udp_port: u16,
}

async fn register_apps(consul: &Consul) -> Apps {
    let st = Store::new(&RegistryUri::parse(&consul.uri()).unwrap());
    let tcp_port = free_port();
    let udp_port = free_udp_port();
    let apps = Apps {
        site: H2App::start("site").await,
        api: H2App::start("api").await,
        raw: H2App::start("raw").await,
        docs: H2App::start("docs").await,
        h2: H2App::start("h2").await,
        rpc: GrpcApp::start("g1").await,
        echo: TcpEcho::start("e1").await,
        dgram: UdpEcho::start("u1").await,
        st,
        tcp_port,
        udp_port,
    };
    let (tcp, udp) = (tcp_port.to_string(), udp_port.to_string());
    let services: Vec<Service> = vec![
        apps.site.service("site", &[("vhost", "a.test")]),
        apps.api.service(
            "api",
            &[
                ("vhost", "a.test"),
                ("path", "/api"),
                ("path_strip", "true"),
            ],
        ),
        apps.raw
            .service("raw", &[("vhost", "a.test"), ("path", "/raw/")]),
        apps.docs
            .service("docs", &[("path", "/docs"), ("path_strip", "true")]),
        apps.h2
            .service("h2", &[("vhost", "h2.test"), ("proto", "h2c")]),
        apps.rpc.service(
            "rpc",
            &[("proto", "grpc"), ("path", "/switchboard.test.Echo")],
        ),
        apps.echo
            .service("echo", &[("proto", "tcp"), ("listen", &tcp)]),
        apps.dgram
            .service("dgram", &[("proto", "udp"), ("listen", &udp)]),
    ];
    for s in &services {
        apps.st.register(s).await.unwrap();
    }
    apps
}

/// A bad label: a path that would inject config. Its instance answers "bad" if ever routed.
async fn register_bad(st: &Store) -> H2App {
    let bad = H2App::start("bad").await;
    st.register(&bad.service("bad", &[("vhost", "a.test"), ("path", "/x; return 200")]))
        .await
        .unwrap();
    bad
}

/// What `GET host path` over HTTP/1.1 (on `h1`) and HTTP/2 (on `h2`) reach: the instance
/// and the path it saw, asserted equal over both.
async fn reach(h1: u16, h2: u16, host: &str, path: &str) -> (String, String) {
    let one = http1_get(h1, host, path)
        .await
        .expect("HTTP/1.1 through the proxy");
    let two = h2c_get(h2, host, path)
        .await
        .expect("h2c through the proxy");
    let got = |r: &HttpReply| (r.body.clone(), r.seen_path.clone().unwrap_or_default());
    assert_eq!(
        got(&one),
        got(&two),
        "{host}{path}: HTTP/1.1 and HTTP/2 differ"
    );
    got(&one)
}

/// The routing scenario on one proxy: HTTP/1.1 on `h1`, h2c with prior knowledge on `h2`.
async fn routes_every_protocol(what: &str, h1: u16, h2: u16, apps: &Apps, udp: bool) {
    let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
    // Paths on a virtual host: longest prefix first, stripped or not, `/apix` is not `/api`.
    assert_eq!(
        reach(h1, h2, "a.test", "/api/users?id=1").await,
        pair("api", "/users?id=1")
    );
    assert_eq!(reach(h1, h2, "a.test", "/api").await, pair("api", "/"));
    assert_eq!(
        reach(h1, h2, "a.test", "/raw/x").await,
        pair("raw", "/raw/x")
    );
    assert_eq!(
        reach(h1, h2, "a.test", "/apix").await,
        pair("site", "/apix")
    );
    assert_eq!(reach(h1, h2, "a.test", "/").await, pair("site", "/"));
    // The bad path routes nothing: its prefix goes to the host's `/`.
    assert_eq!(reach(h1, h2, "a.test", "/x").await.0, "site");
    // A path on the default host.
    assert_eq!(
        reach(h1, h2, "other.test", "/docs/a").await,
        pair("docs", "/a")
    );
    // The h2c pool: HTTP/2 to the instance whatever the client spoke.
    for reply in [
        http1_get(h1, "h2.test", "/v").await.unwrap(),
        h2c_get(h2, "h2.test", "/v").await.unwrap(),
    ] {
        assert_eq!(reply.body, "h2", "{what}: {reply:?}");
        assert_eq!(
            reply.seen_version.as_deref(),
            Some("HTTP/2.0"),
            "{what}: {reply:?}"
        );
    }
    // Async commands: the apps answer on this test's runtime, which a blocking wait would stop.
    let curl = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--http2-prior-knowledge"])
        .args(["-H", "Host: h2.test"])
        .arg(format!("http://127.0.0.1:{h2}/"))
        .output()
        .await
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&curl.stdout).trim(),
        "h2",
        "{what}: curl --http2-prior-knowledge: {}",
        String::from_utf8_lossy(&curl.stderr)
    );
    let h2load = Command::new("timeout")
        .args(["30", "h2load", "-n", "200", "-c", "4", "-m", "10"])
        .args(["-H", ":authority: h2.test"])
        .arg(format!("http://127.0.0.1:{h2}/"))
        .output()
        .await
        .expect("h2load");
    let out = String::from_utf8_lossy(&h2load.stdout);
    assert!(
        out.contains("200 succeeded, 0 failed"),
        "{what}: h2load through the proxy:\n{out}"
    );
    // gRPC: unary and server streaming, over h2c with prior knowledge.
    let mut grpc = GrpcClient::connect(h2).await.expect("gRPC connection");
    let reply = grpc
        .echo("hello")
        .await
        .expect("gRPC unary through the proxy");
    assert_eq!(reply.name, "g1", "{what}: {reply:?}");
    let counted = grpc
        .count_all(5, Duration::from_millis(50))
        .await
        .expect("gRPC stream through the proxy");
    assert_eq!(counted.len(), 5);
    // TCP (and UDP).
    assert_eq!(
        tcp_echo(apps.tcp_port, "ping").await.unwrap(),
        "e1 ping",
        "{what}"
    );
    if udp {
        let got = udp_echo(apps.udp_port, "ping", Duration::from_secs(2)).await;
        assert_eq!(got.unwrap(), "u1 ping", "{what}");
    }
}

#[tokio::test]
async fn nginx_routes_every_protocol() {
    let consul = Consul::start().await;
    let apps = register_apps(&consul).await;
    let _bad = register_bad(&apps.st).await;
    let h2 = free_port();
    let lb = NginxConfd::start(
        &consul.uri(),
        &[
            ("default_service", "none".into()),
            ("default_tag", "none".into()),
            ("h2c_listen", format!("127.0.0.1:{h2}")),
        ],
        &format!("listen {};", apps.tcp_port),
    )
    .await;
    wait_for("nginx serves the routes", WAIT, || async {
        http1_get(lb.port, "a.test", "/api/x")
            .await
            .ok()
            .filter(|r| r.body == "api")
    })
    .await;
    routes_every_protocol("nginx", lb.port, h2, &apps, true).await;
    // While the workers close client connections (as before a reload), HTTP/2 and gRPC are
    // untouched: HTTP/2 has no `Connection` header, and a client refuses a response with one.
    let (status, reason) = post_unix(
        &lb.socket(),
        "/switchboard/closing",
        b"switchboard-closing 1\n60000\n",
    )
    .await;
    assert_eq!(status, 200, "{reason}");
    routes_every_protocol("nginx while closing", lb.port, h2, &apps, true).await;
    let out = lb.confd.output();
    assert!(
        out.contains(
            r#"route: service "bad" instance "bad": path "/x; return 200": expected a URL path"#
        ),
        "the bad path is not warned about; confd output:\n{out}"
    );
    drop((
        apps.site, apps.api, apps.raw, apps.docs, apps.h2, apps.rpc, apps.echo, apps.dgram,
    ));
}

#[tokio::test]
async fn haproxy_routes_every_protocol() {
    let consul = Consul::start().await;
    let apps = register_apps(&consul).await;
    let _bad = register_bad(&apps.st).await;
    let metrics = format!("127.0.0.1:{}", free_port());
    let needle = format!("bind 127.0.0.1:{}", apps.tcp_port);
    let lb = HaproxyConfd::start_live(
        &consul.uri(),
        "127.0.0.1",
        &format!("wait: {{ min: 100ms, max: 1s }}\nmetrics_addr: {metrics}"),
        &[
            ("default_service", "none".into()),
            ("default_tag", "none".into()),
        ],
        true,
        |t| t.contains(&needle),
    )
    .await;
    wait_for("HAProxy serves the routes", WAIT, || async {
        http1_get(lb.port, "a.test", "/api/x")
            .await
            .ok()
            .filter(|r| r.body == "api")
    })
    .await;
    // HAProxy takes HTTP/1.1 and h2c on one port; it does not proxy UDP.
    routes_every_protocol("HAProxy", lb.port, lb.port, &apps, false).await;
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(r#"confd_route_warnings{service="bad",reason="bad_path"} 1"#),
        "no warning on /metrics:\n{text}"
    );
    drop((
        apps.site, apps.api, apps.raw, apps.docs, apps.h2, apps.rpc, apps.echo, apps.dgram,
    ));
}

/// gRPC streams held open while the pool scales 1 → 3 → 1 through the live path: every
/// stream, on a kept instance or on a removed one (which drains: it keeps its open streams),
/// gets all its messages and ends cleanly, and the proxy is never reloaded.
async fn streams_through_scale(
    what: &str,
    port: u16,
    confd: &Process,
    st: &Store,
    extra: &[GrpcApp],
) {
    const N: u32 = 30;
    const EVERY: Duration = Duration::from_millis(100);
    let open = |n: usize| {
        (0..n)
            .map(|_| {
                tokio::spawn(async move {
                    let mut c = GrpcClient::connect(port).await.expect("gRPC connection");
                    c.count_all(N, EVERY).await
                })
            })
            .collect::<Vec<_>>()
    };
    let reloads0 = reloads(confd);
    let mut streams = open(3);
    for app in extra {
        st.register(&app.service(
            "rpc",
            &[("proto", "grpc"), ("path", "/switchboard.test.Echo")],
        ))
        .await
        .unwrap();
    }
    // All three serve before more streams open (unary calls until each has answered).
    let mut c = GrpcClient::connect(port).await.unwrap();
    let mut names = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while names.len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: only {names:?} answered; confd output:\n{}",
            confd.output()
        );
        if let Ok(r) = c.echo("who").await {
            names.insert(r.name);
        }
    }
    streams.extend(open(6));
    for app in extra {
        st.deregister(&app.service("rpc", &[])).await.unwrap();
    }
    wait_for(&format!("{what}: one instance answers again"), WAIT, || {
        let mut c = c.clone();
        async move {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..6 {
                seen.insert(c.echo("who").await.ok()?.name);
            }
            (seen.len() == 1 && seen.contains("g1")).then_some(())
        }
    })
    .await;
    for (i, s) in streams.into_iter().enumerate() {
        let got = s.await.unwrap();
        assert!(got.is_ok(), "{what}: stream {i} was cut: {got:?}");
    }
    assert_eq!(
        reloads(confd),
        reloads0,
        "{what}: scaling reloaded the proxy; confd output:\n{}",
        confd.output()
    );
    c.echo("still").await.expect("the pool still answers");
}

async fn grpc_pool(consul: &Consul) -> (Store, GrpcApp, Vec<GrpcApp>) {
    let st = Store::new(&RegistryUri::parse(&consul.uri()).unwrap());
    let g1 = GrpcApp::start("g1").await;
    st.register(&g1.service(
        "rpc",
        &[("proto", "grpc"), ("path", "/switchboard.test.Echo")],
    ))
    .await
    .unwrap();
    let extra = vec![GrpcApp::start("g2").await, GrpcApp::start("g3").await];
    (st, g1, extra)
}

#[tokio::test]
async fn nginx_grpc_streams_through_scale() {
    let consul = Consul::start().await;
    let (st, g1, extra) = grpc_pool(&consul).await;
    let h2 = free_port();
    let lb = NginxConfd::start(
        &consul.uri(),
        &[("h2c_listen", format!("127.0.0.1:{h2}"))],
        &format!("127.0.0.1:{}", g1.port),
    )
    .await;
    streams_through_scale("nginx", h2, &lb.confd, &st, &extra).await;
}

#[tokio::test]
async fn haproxy_grpc_streams_through_scale() {
    let consul = Consul::start().await;
    let (st, g1, extra) = grpc_pool(&consul).await;
    let needle = format!("127.0.0.1:{}", g1.port);
    let lb = haproxy(&consul, &[], &needle).await;
    streams_through_scale("HAProxy", lb.port, &lb.confd, &st, &extra).await;
}

/// New routes and listeners under POST load on the route already served: the path route and
/// the TCP port are structural (a reload), and not one request of the load fails; then a
/// second instance joins each new pool, through the live path where the proxy has one (every
/// HAProxy pool; nginx's HTTP pools, while its TCP pools reload).
async fn new_routes_under_load(what: &str, port: u16, confd: &Process, st: &Store, tcp_live: bool) {
    let load = Load::start(LoadSpec::post(&format!("http://127.0.0.1:{port}/"), 4));
    load.wait_flowing(200, WAIT).await;
    let reloads0 = reloads(confd);
    let (d1, d2) = (H2App::start("d1").await, H2App::start("d2").await);
    let (t1, t2) = (TcpEcho::start("t1").await, TcpEcho::start("t2").await);
    let tcp = free_port();
    let tcp_s = tcp.to_string();
    let path = [("path", "/docs"), ("path_strip", "true")];
    let listen = [("proto", "tcp"), ("listen", tcp_s.as_str())];
    st.register(&d1.service("docs", &path)).await.unwrap();
    st.register(&t1.service("echo", &listen)).await.unwrap();
    wait_for(&format!("{what}: the new routes serve"), WAIT, || async {
        let r = http1_get(port, "any.test", "/docs/x").await.ok()?;
        let t = tcp_echo(tcp, "hi").await.ok()?;
        (r.body == "d1" && t == "t1 hi").then_some(())
    })
    .await;
    // The new worker serves before confd logs the reload it waited for.
    wait_for(&format!("{what}: the reload logged"), WAIT, || async {
        (reloads(confd) > reloads0).then_some(())
    })
    .await;
    // A second instance of each new pool.
    let reloads1 = reloads(confd);
    st.register(&d2.service("docs", &path)).await.unwrap();
    wait_for(&format!("{what}: d2 joins /docs"), WAIT, || async {
        let r = http1_get(port, "any.test", "/docs/x").await.ok()?;
        (r.body == "d2").then_some(())
    })
    .await;
    assert_eq!(
        reloads(confd),
        reloads1,
        "{what}: a path pool's member reloaded"
    );
    st.register(&t2.service("echo", &listen)).await.unwrap();
    wait_for(&format!("{what}: t2 joins the TCP port"), WAIT, || async {
        let t = tcp_echo(tcp, "hi").await.ok()?;
        (t == "t2 hi").then_some(())
    })
    .await;
    if tcp_live {
        assert_eq!(
            reloads(confd),
            reloads1,
            "{what}: a TCP pool's member reloaded"
        );
    }
    let report = load.stop().await;
    assert!(report.requests > 200, "{what}: {}", report.summary());
    assert_eq!(report.failed, 0, "{what}: {}", report.summary());
}

#[tokio::test]
async fn nginx_new_routes_reload_without_failing_requests() {
    let consul = Consul::start().await;
    let st = Store::new(&RegistryUri::parse(&consul.uri()).unwrap());
    let web = H2App::start("web").await;
    st.register(&web.service("http", &[])).await.unwrap();
    let lb = NginxConfd::start(
        &consul.uri(),
        &[("default_service", "http".into())],
        &format!("127.0.0.1:{}", web.port),
    )
    .await;
    new_routes_under_load("nginx", lb.port, &lb.confd, &st, false).await;
}

#[tokio::test]
async fn haproxy_new_routes_reload_without_failing_requests() {
    let consul = Consul::start().await;
    let st = Store::new(&RegistryUri::parse(&consul.uri()).unwrap());
    let web = H2App::start("web").await;
    st.register(&web.service("http", &[])).await.unwrap();
    let needle = format!("127.0.0.1:{}", web.port);
    let lb = haproxy(&consul, &[("default_service", "http".into())], &needle).await;
    new_routes_under_load("HAProxy", lb.port, &lb.confd, &st, true).await;
}
