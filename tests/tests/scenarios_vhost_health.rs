//! Scenarios 2 and 3 of the user stories, end to end: the real Docker engine, a Consul dev
//! agent, the `registrator` and `confd` binaries on the host (build them first:
//! `cargo build -p registrator -p confd`), the shipped HAProxy template and a real HAProxy
//! that this test starts on free ports. Recipes: `docs/scenario-2-virtual-hosts.md` and
//! `docs/scenario-3-health-checks.md`.
//!
//! The Docker engine is shared with tests running in parallel, and registrator sees every
//! container on it. It runs with `-explicit` here (only containers naming their service are
//! registered) and every assertion looks at this test's own containers, found by name in the
//! HAProxy server names.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};
use switchboard_tests::*;

/// Upper bound for any single wait.
const WAIT: Duration = Duration::from_secs(45);

/// confd's quiescence window in these tests (`wait: { min: 100ms, max: 1s }`).
const QUIESCENCE_MAX: Duration = Duration::from_secs(1);

/// The app: busybox httpd answering with the container's hostname (its short ID).
const SERVE_HOSTNAME: &str = "hostname > /www/index.html; exec httpd -f -p 80 -h /www";

/// `-internal`: services are registered at the container's bridge IP and port 80, which the
/// host (HAProxy, Consul's probes) reaches directly.
fn registrator(consul: &Consul) -> Process {
    Process::spawn(
        &bin("registrator"),
        &[
            "-internal",
            "-explicit",
            "--verify-interval",
            "1",
            &consul.uri(),
        ],
        &[("RUST_LOG", "info")],
    )
}

/// What `haproxy_name` makes of a service ID, up to the hash suffix it appends when a
/// character had to be replaced (`:` always is).
fn server_prefix(c: &Container) -> String {
    let id = format!("{}:{}:80", hostname(), c.name);
    let mapped: String = id
        .chars()
        .map(|ch| {
            if ch.is_ascii_alphanumeric() || matches!(ch, '_' | '.' | '-') {
                ch
            } else {
                '_'
            }
        })
        .collect();
    format!("{mapped}-")
}

/// The hostname a container's page answers with.
fn short_id(c: &Container) -> String {
    c.id[..12].to_string()
}

/// confd + HAProxy: the confd config owns HAProxy's listen address, port, pid file and stats.
struct Router(HaproxyConfd);

impl Router {
    /// Starts confd on `consul` with the shipped HAProxy template and `extra_vars`, waits for
    /// the first render, then starts HAProxy on it.
    async fn start(consul: &Consul, bind: &str, extra_vars: &[(&str, String)]) -> Router {
        let settings = format!(
            "wait: {{ min: 100ms, max: {}ms }}\npoll_wait: 5s",
            QUIESCENCE_MAX.as_millis()
        );
        Router(HaproxyConfd::start(&consul.uri(), bind, &settings, extra_vars, |_| true).await)
    }

    /// The rendered haproxy.cfg.
    fn cfg(&self) -> String {
        self.0.cfg()
    }

    /// Whether the rendered config has a server for container `c`.
    fn has_server(&self, c: &Container) -> bool {
        self.cfg().contains(&format!("server {}", server_prefix(c)))
    }
}

// ---------------------------------------------------------------------------------------
// Scenario 2: virtual hosts and the protected stats page
// ---------------------------------------------------------------------------------------

const STATS_USER: &str = "admin";
const STATS_PASSWORD: &str = "s3cret-2048";
const VHOST: &str = "2048.local.com";

fn app_2048() -> Container {
    Container::run(
        "vh2048",
        &[
            "--expose",
            "80",
            "-l",
            "SERVICE_NAME=app2048",
            "-l",
            "SERVICE_HOSTNAME=2048",
            "-l",
            "SERVICE_DOMAIN=local.com",
            TEST_IMAGE,
            "sh",
            "-c",
            SERVE_HOSTNAME,
        ],
    )
}

/// The servers the stats CSV lists in backend `backend` (name -> status).
fn stats_servers(csv: &str, backend: &str) -> BTreeMap<String, String> {
    let mut header: Vec<&str> = Vec::new();
    let mut out = BTreeMap::new();
    for line in csv.lines() {
        if let Some(h) = line.strip_prefix("# ") {
            header = h.split(',').collect();
            continue;
        }
        let cols: Vec<&str> = line.split(',').collect();
        let col = |name: &str| {
            header
                .iter()
                .position(|h| *h == name)
                .and_then(|i| cols.get(i).copied())
                .unwrap_or_default()
        };
        let sv = col("svname");
        if col("pxname") == backend && sv != "BACKEND" && sv != "FRONTEND" {
            out.insert(sv.to_string(), col("status").to_string());
        }
    }
    out
}

/// GET `/stats;csv` with the given credentials: (status, body).
async fn stats(port: u16, auth: Option<(&str, &str)>) -> (u16, String) {
    let mut req = reqwest::Client::new().get(format!("http://127.0.0.1:{port}/stats;csv"));
    if let Some((u, p)) = auth {
        req = req.basic_auth(u, Some(p));
    }
    let r = req.send().await.expect("stats page answers");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

/// Waits until the stats page lists exactly `live` (all UP) in the vhost backend.
async fn wait_stats_exactly(port: u16, live: &[&Container], what: &str) {
    let backend = format!("vhost_{VHOST}");
    let mut last = BTreeMap::new();
    let ok = tokio::time::timeout(WAIT, async {
        loop {
            let (status, body) = stats(port, Some((STATS_USER, STATS_PASSWORD))).await;
            assert_eq!(status, 200, "stats with credentials");
            last = stats_servers(&body, &backend);
            let matches = last.len() == live.len()
                && live.iter().all(|c| {
                    let p = server_prefix(c);
                    last.iter()
                        .any(|(name, st)| name.starts_with(&p) && st == "UP")
                });
            if matches {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let want: Vec<String> = live.iter().map(|c| server_prefix(c)).collect();
    assert!(
        ok.is_ok(),
        "{what}: stats should list exactly {want:?} UP, last saw {last:?}"
    );
}

/// Waits until requests for `host` reach exactly `live` (each at least once, nothing else).
async fn wait_routes_exactly(port: u16, host: &str, live: &[&Container], what: &str) {
    let want: Vec<String> = live.iter().map(|c| short_id(c)).collect();
    wait_routes(what, port, Some(host), &want, WAIT).await;
}

#[tokio::test]
async fn scenario_2_virtual_hosts_behind_haproxy_with_protected_stats() {
    let consul = Consul::start().await;
    let _reg = registrator(&consul);
    let stats_port = free_port();
    let router = Router::start(
        &consul,
        "127.0.0.1",
        &[
            ("stats_port", stats_port.to_string()),
            ("stats_user", STATS_USER.to_string()),
            ("stats_password", STATS_PASSWORD.to_string()),
        ],
    )
    .await;

    // Five instances, discovered with no config edit.
    let mut apps: Vec<Container> = (0..5).map(|_| app_2048()).collect();
    let live: Vec<&Container> = apps.iter().collect();
    wait_stats_exactly(stats_port, &live, "five instances").await;
    wait_routes_exactly(router.0.port, VHOST, &live, "Host: 2048.local.com, five").await;
    let cfg = router.cfg();
    assert!(
        cfg.contains(&format!("-i {VHOST}\n")),
        "the vhost comes from SERVICE_HOSTNAME + SERVICE_DOMAIN:\n{cfg}"
    );
    // Another name reaches nothing: no service is the default here.
    assert_eq!(
        answers(router.0.port, Some("other.local.com"), 2).await,
        BTreeSet::from(["status 503".to_string()])
    );

    // The stats page demands the user and password.
    let (anon, _) = stats(stats_port, None).await;
    assert_eq!(anon, 401, "stats without credentials");
    let (wrong, _) = stats(stats_port, Some((STATS_USER, "wrong"))).await;
    assert_eq!(wrong, 401, "stats with a wrong password");

    // Scale up by two: seven listed, seven answer.
    apps.push(app_2048());
    apps.push(app_2048());
    let live: Vec<&Container> = apps.iter().collect();
    wait_stats_exactly(stats_port, &live, "seven instances").await;
    wait_routes_exactly(router.0.port, VHOST, &live, "Host: 2048.local.com, seven").await;

    // Stop three: four listed, only those four answer.
    let t0 = Instant::now();
    for c in &apps[..3] {
        c.stop(1);
    }
    let live: Vec<&Container> = apps[3..].iter().collect();
    wait_stats_exactly(stats_port, &live, "four instances after stopping three").await;
    println!(
        "scenario 2: three stopped instances left the stats page {:?} after the first docker stop",
        t0.elapsed()
    );
    wait_routes_exactly(router.0.port, VHOST, &live, "Host: 2048.local.com, four").await;

    let out = router.0.confd.output();
    assert!(!out.contains("ERROR"), "confd output:\n{out}");
}

// ---------------------------------------------------------------------------------------
// Scenario 3: internal routing with health checks and sticky sessions
// ---------------------------------------------------------------------------------------

const REST_VHOST: &str = "restserver.local";
const COOKIE: &str = "SRV";

/// A REST server instance: port 80 is `restserver.local`, probed on `/health` every second.
/// `healthy`: whether `/health` exists from the start.
fn rest_server(healthy: bool) -> Container {
    let cmd = if healthy {
        format!("echo ok > /www/health; {SERVE_HOSTNAME}")
    } else {
        SERVE_HOSTNAME.to_string()
    };
    Container::run(
        "rest",
        &[
            "--expose",
            "80",
            "-l",
            "SERVICE_NAME=restserver",
            "-l",
            &format!("SERVICE_80_VHOST={REST_VHOST}"),
            "-l",
            "SERVICE_80_CHECK_HTTP=/health",
            "-l",
            "SERVICE_80_CHECK_INTERVAL=1s",
            "-l",
            "SERVICE_80_CHECK_TIMEOUT=1s",
            "-l",
            "SERVICE_80_CHECK_INITIAL_STATUS=critical",
            TEST_IMAGE,
            "sh",
            "-c",
            &cmd,
        ],
    )
}

/// The client container: `restserver.local` resolves to the router on the bridge gateway.
struct Client {
    c: Container,
    url: String,
}

/// What one request through the router returned.
#[derive(Debug)]
struct Reply {
    /// The hostname of the instance that answered.
    body: String,
    /// The sticky cookie's value, when the proxy set one.
    cookie: Option<String>,
}

impl Client {
    /// `wget` inside the client container, optionally sending the sticky cookie back.
    fn get(&self, cookie: Option<&str>) -> Option<Reply> {
        self.try_get(cookie).ok()
    }

    /// Like [`Client::get`], with wget's complaint on failure.
    fn try_get(&self, cookie: Option<&str>) -> Result<Reply, String> {
        let mut args = vec!["exec".to_string(), self.c.id.clone(), "wget".into()];
        // No `-T`: the static busybox wget crashes (SIGSEGV) with it; HAProxy's own timeouts
        // bound each request.
        args.extend(["-S", "-O", "-"].map(String::from));
        if let Some(v) = cookie {
            args.push("--header".into());
            args.push(format!("Cookie: {COOKIE}={v}"));
        }
        args.push(self.url.clone());
        let out = Command::new("docker")
            .args(&args)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(format!(
                "- {} {}",
                out.status,
                err.trim().replace('\n', " | ")
            ));
        }
        // wget -S prints the response headers on stderr.
        let headers = String::from_utf8_lossy(&out.stderr);
        let cookie = headers.lines().find_map(|l| {
            let l = l.trim();
            let (name, value) = l.split_once(':')?;
            if !name.eq_ignore_ascii_case("set-cookie") {
                return None;
            }
            let value = value.trim().strip_prefix(&format!("{COOKIE}="))?;
            Some(value.split(';').next().unwrap_or_default().to_string())
        });
        Ok(Reply {
            body: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            cookie,
        })
    }

    /// `n` requests; who answered each (`"- <wget's error>"` for a failed request).
    fn bodies(&self, n: usize, cookie: Option<&str>) -> Vec<String> {
        (0..n)
            .map(|_| self.try_get(cookie).map_or_else(|e| e, |r| r.body))
            .collect()
    }
}

/// Status of the check of service `id` on the agent.
async fn check_status(consul: &Consul, id: &str) -> Option<String> {
    let checks = consul.get_json("/v1/agent/checks").await;
    checks
        .as_object()?
        .values()
        .find(|c| c["ServiceID"] == id)
        .and_then(|c| c["Status"].as_str().map(String::from))
}

/// Polls every 50 ms until `cond` holds; returns how long it took (panics after `WAIT`).
async fn time_until(what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t0.elapsed()
}

#[tokio::test]
async fn scenario_3_internal_routing_health_checks_and_sticky_sessions() {
    let consul = Consul::start().await;
    let _reg = registrator(&consul);

    // The router listens on the bridge gateway, the address containers reach the host at;
    // the client resolves restserver.local to it.
    let probe = Container::run("rest-gw", &[TEST_IMAGE, "sleep", "60"]);
    let gateway = docker(&["inspect", "-f", "{{.NetworkSettings.Gateway}}", &probe.id]);
    drop(probe);
    assert!(
        gateway.parse::<std::net::Ipv4Addr>().is_ok(),
        "bridge gateway {gateway:?}"
    );
    let router = Router::start(&consul, &gateway, &[("sticky_cookie", COOKIE.to_string())]).await;
    let client = Client {
        c: Container::run(
            "rest-client",
            &[
                "--add-host",
                &format!("{REST_VHOST}:{gateway}"),
                TEST_IMAGE,
                "sleep",
                "600",
            ],
        ),
        url: format!("http://{REST_VHOST}:{}/", router.0.port),
    };

    // Initial delay: an instance starts critical and takes no traffic until its first probe
    // passes. `b` starts without /health: registered, critical, not in the proxy.
    let a = rest_server(true);
    let b = rest_server(false);
    let b_id = format!("{}:{}:80", hostname(), b.name);
    time_until("a in the proxy", || router.has_server(&a)).await;
    wait_for("b's check registered", WAIT, || async {
        check_status(&consul, &b_id).await
    })
    .await;
    assert_eq!(
        check_status(&consul, &b_id).await.as_deref(),
        Some("critical")
    );
    assert!(
        !router.has_server(&b),
        "critical b is not routed:\n{}",
        router.cfg()
    );
    // The file is replaced just before HAProxy reloads: wait for the reload to take effect.
    wait_for("the client reaches a", WAIT, || async {
        client.get(None).filter(|r| r.body == short_id(&a))
    })
    .await;
    assert_eq!(client.bodies(3, None), vec![short_id(&a); 3]);
    docker(&["exec", &b.id, "sh", "-c", "echo ok > /www/health"]);
    let entered = time_until("b in the proxy after its first passing probe", || {
        router.has_server(&b)
    })
    .await;
    println!("scenario 3: b entered the proxy {entered:?} after /health appeared");

    // Requests from the client container alternate between both instances.
    let both = BTreeSet::from([short_id(&a), short_id(&b)]);
    let seen = wait_for("both instances answer the client", WAIT, || async {
        let seen = client.bodies(6, None);
        let set: BTreeSet<String> = seen.iter().cloned().collect();
        (set == both).then_some(seen)
    })
    .await;
    for id in &both {
        let n = seen.iter().filter(|s| *s == id).count();
        assert!(n >= 2, "requests spread over both instances: {seen:?}");
    }

    // Sticky sessions: the cookie names the instance that answered, as a safe token; sending
    // it back stays there.
    let first = client.get(None).expect("a reply");
    let cookie = first
        .cookie
        .clone()
        .expect("the proxy sets the sticky cookie");
    assert!(
        cookie
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)),
        "cookie value is a safe token: {cookie:?}"
    );
    let (sticky, other) = if first.body == short_id(&a) {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert!(
        cookie.starts_with(&server_prefix(sticky)),
        "cookie {cookie:?} names the container that answered ({})",
        sticky.name
    );
    assert_eq!(client.bodies(6, Some(&cookie)), vec![short_id(sticky); 6]);

    // The sticky instance's probe fails: it leaves the proxy within the check interval plus
    // the probe timeout plus confd's quiescence window (and a little for the reload).
    docker(&["exec", &sticky.id, "busybox", "rm", "/www/health"]);
    let left = time_until("the failing instance leaves the proxy", || {
        !router.has_server(sticky)
    })
    .await;
    println!("scenario 3: failing instance left the proxy {left:?} after its /health was removed");
    let bound =
        Duration::from_secs(1) + Duration::from_secs(1) + QUIESCENCE_MAX + Duration::from_secs(3);
    assert!(left < bound, "left after {left:?}, bound {bound:?}");
    // The client holding its cookie moves to the healthy instance (and is told so).
    let moved = wait_for("the sticky client moved", WAIT, || async {
        client
            .get(Some(&cookie))
            .filter(|r| r.body == short_id(other))
    })
    .await;
    let new_cookie = moved
        .cookie
        .expect("a new cookie naming the healthy instance");
    assert!(
        new_cookie.starts_with(&server_prefix(other)),
        "{new_cookie}"
    );
    assert_eq!(client.bodies(4, Some(&cookie)), vec![short_id(other); 4]);
    assert_eq!(client.bodies(4, None), vec![short_id(other); 4]);

    // It recovers: back in the proxy, and its cookie leads to it again.
    docker(&["exec", &sticky.id, "sh", "-c", "echo ok > /www/health"]);
    let back = time_until("the recovered instance is back", || {
        router.has_server(sticky)
    })
    .await;
    println!(
        "scenario 3: recovered instance was back in the proxy {back:?} after /health returned"
    );
    wait_for(
        "the sticky client is back on its instance",
        WAIT,
        || async {
            client
                .get(Some(&cookie))
                .filter(|r| r.body == short_id(sticky))
        },
    )
    .await;
    assert_eq!(client.bodies(4, Some(&cookie)), vec![short_id(sticky); 4]);
    assert_eq!(
        client.bodies(4, Some(&new_cookie)),
        vec![short_id(other); 4]
    );

    let out = router.0.confd.output();
    assert!(!out.contains("ERROR"), "confd output:\n{out}");
}
