//! Protocols suite: requests per second through nginx and HAProxy running the rendered
//! shipped template, beside the same proxy running a hand-written config for the same
//! backends, per protocol a client speaks.
//!
//! The goal is that our config does not make the proxy slower: rendered / hand-written at
//! least [`GOAL`]. The rendered config comes from the real `confd` on a Consul dev agent, with
//! the live channels on as the reference stacks run them ([`crate::lb`]: nginx's Lua peers,
//! HAProxy's admin socket), and a membership change (an instance added, then removed) applied
//! before the runs, as after any scale event. The hand-written ones are files under
//! `bench/static/` (each says what it is). For nginx two more configs split the difference:
//! a hand-written one with the template's policy of one upstream connection per request
//! (docs/protocols.md, "Why nginx opens a connection per request"), against which the
//! template's machinery alone shows, and the template rendered without its Lua balancer
//! (`lua_peers: false`), which shows what the balancer costs.
//!
//! Three pools of two in-process instances each ([`switchboard_tests::H2App`],
//! [`switchboard_tests::GrpcApp`]): `web` (HTTP/1.1 to the instances, the default route),
//! `h2` (`proto: h2c`, path `/h2`) and `grpc` (`proto: grpc`, path
//! `/switchboard.test.Echo`). Clients, the same for every config:
//! - HTTP/1.1 with keep-alive: `wrk`, one thread, [`CONNECTIONS`] connections, `GET /`;
//! - h2: `h2load` with prior knowledge (nginx: on its `h2c_listen` port; HAProxy: its one
//!   port), [`H2_CLIENTS`] connections of [`H2_STREAMS`] streams, `GET /h2/x`, in batches of
//!   [`PER_CONNECTION`] requests per connection;
//! - gRPC unary: the same h2load posting one gRPC message (the 5-byte prefix and an encoded
//!   [`EchoRequest`]) to [`ECHO_PATH`] with `content-type: application/grpc` and
//!   `te: trailers`. h2load counts HTTP statuses only, so before the runs every config answers
//!   the same bytes with `grpc-status: 0` (`nghttp`), and a tonic client's echo comes back
//!   from both instances.
//!
//! Each protocol runs `rounds` rounds; a round measures every config of the proxy for `secs`
//! seconds, in an order reversed every other round, so drift on a shared machine (the
//! clients, the proxy and the instances share its cores) falls on all of them alike. Each
//! config is warmed up (1 s) before its first round. Figures are the medians of the rounds, and
//! the proxy's CPU time (its master and workers, user + system) per request over them: less
//! sensitive than requests per second to what else the machine runs.

use crate::common::{group_cpu_time, release_bin};
use crate::lb::{lists, Lb, Proxy, Settings};
use crate::Which;
use prost::Message;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use switchboard_tests::{
    free_port, h2c_get, http1_get, poll, wait_for, wait_pid_file, EchoRequest, GrpcApp, GrpcClient,
    H2App, Process, ECHO_PATH,
};

/// Rendered / hand-written requests per second must be at least this.
pub const GOAL: f64 = 0.95;
/// wrk's connections (one thread).
const CONNECTIONS: usize = 32;
/// h2load's connections (one thread) for h2 and gRPC ...
const H2_CLIENTS: usize = 4;
/// ... and the concurrent streams on each: as many requests in flight as wrk's.
const H2_STREAMS: usize = 8;
/// h2load's requests per connection: nginx closes an HTTP/2 connection after 1,000 requests
/// (`keepalive_requests`, default 1000, in the template and the hand-written config alike) and
/// h2load does not reconnect, so h2 and gRPC load runs in batches of this many per connection
/// until the round's time is up.
const PER_CONNECTION: usize = 1000;
/// Warm-up before a config's first round.
const WARM_UP: u64 = 1;
/// Bound on each wait while the stacks start and answer.
const START: Duration = Duration::from_secs(30);
/// The h2c pool's route.
const H2_PATH: &str = "/h2";
/// The gRPC pool's route: its service name, as gRPC clients cannot add a prefix.
const GRPC_PATH: &str = "/switchboard.test.Echo";

/// The hand-written configs (see the comment at the top of each).
const STATIC_NGINX: &str = include_str!("../static/nginx.conf");
const STATIC_NGINX_CLOSE: &str = include_str!("../static/nginx-close.conf");
const STATIC_HAPROXY: &str = include_str!("../static/haproxy.cfg");

/// What to run, from the command line.
pub struct Opts {
    /// Rounds per protocol and proxy.
    pub rounds: usize,
    /// Seconds of load per config and round.
    pub secs: u64,
    /// The proxies to measure.
    pub proxies: Vec<Proxy>,
}

/// What the client speaks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    Http1,
    H2,
    Grpc,
}

impl Workload {
    const ALL: [Workload; 3] = [Workload::Http1, Workload::H2, Workload::Grpc];

    fn name(self) -> &'static str {
        match self {
            Workload::Http1 => "HTTP/1.1 keep-alive",
            Workload::H2 => "h2 to h2c",
            Workload::Grpc => "gRPC unary",
        }
    }
}

/// The backends: three pools of two in-process instances, stopped on drop.
struct Pools {
    web: [H2App; 2],
    h2: [H2App; 2],
    grpc: [GrpcApp; 2],
}

impl Pools {
    async fn start() -> Pools {
        Pools {
            web: [H2App::start("web-a").await, H2App::start("web-b").await],
            h2: [H2App::start("h2-a").await, H2App::start("h2-b").await],
            grpc: [
                GrpcApp::start("grpc-a").await,
                GrpcApp::start("grpc-b").await,
            ],
        }
    }

    /// The instances as the store holds them: `web` plain HTTP, `h2` h2c on a path, `grpc`
    /// gRPC on its service's path.
    fn services(&self) -> Vec<switchboard::Service> {
        let h2 = [("proto", "h2c"), ("path", H2_PATH)];
        let grpc = [("proto", "grpc"), ("path", GRPC_PATH)];
        let mut v: Vec<_> = self.web.iter().map(|a| a.service("web", &[])).collect();
        v.extend(self.h2.iter().map(|a| a.service("h2", &h2)));
        v.extend(self.grpc.iter().map(|a| a.service("grpc", &grpc)));
        v
    }

    fn addrs(&self) -> Vec<String> {
        let web = self.web.iter().map(|a| a.port);
        let h2 = self.h2.iter().map(|a| a.port);
        let grpc = self.grpc.iter().map(|a| a.port);
        web.chain(h2)
            .chain(grpc)
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// The words a hand-written config leaves to the bench, but for its ports and directory.
    fn words(&self) -> Vec<(&'static str, String)> {
        let a = self.addrs();
        ["WEB_A", "WEB_B", "H2_A", "H2_B", "GRPC_A", "GRPC_B"]
            .into_iter()
            .zip(a)
            .collect()
    }

    /// The names of the instances a workload reaches.
    fn names(&self, w: Workload) -> Vec<String> {
        match w {
            Workload::Http1 => self.web.iter().map(|a| a.name.clone()).collect(),
            Workload::H2 => self.h2.iter().map(|a| a.name.clone()).collect(),
            Workload::Grpc => self.grpc.iter().map(|a| a.name.clone()).collect(),
        }
    }
}

/// `text` with every `@WORD@` of `words` replaced; `Err` naming a placeholder left unfilled.
fn fill(text: &str, words: &[(&str, String)]) -> Result<String, String> {
    let mut out = text.to_string();
    for (k, v) in words {
        out = out.replace(&format!("@{k}@"), v);
    }
    // Every text between two `@` is a candidate: a placeholder is one in capitals.
    let parts: Vec<&str> = out.split('@').collect();
    let inner = &parts[1..parts.len().saturating_sub(1).max(1)];
    let left = inner
        .iter()
        .find(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'));
    match left {
        Some(w) => Err(format!("@{w}@: no value for this placeholder")),
        None => Ok(out),
    }
}

/// A proxy on a hand-written config in a scratch directory; stopped (its process group
/// killed) on drop, before the directory goes.
struct StaticProxy {
    proxy: Process,
    _dir: tempfile::TempDir,
}

impl StaticProxy {
    /// Writes `text` with its words filled in and starts `proxy` on it, checked first.
    async fn start(proxy: Proxy, text: &str, words: &[(&'static str, String)]) -> StaticProxy {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut all = words.to_vec();
        all.push(("DIR", d.display().to_string()));
        let cfg = fill(text, &all).unwrap_or_else(|e| panic!("hand-written config: {e}"));
        let (file, pid) = match proxy {
            Proxy::Haproxy => ("haproxy.cfg", "haproxy.pid"),
            Proxy::Nginx => ("nginx.conf", "nginx.pid"),
        };
        let path = d.join(file);
        std::fs::write(&path, cfg).unwrap();
        let p = path.display().to_string();
        let (check, args): (Vec<&str>, Vec<String>) = match proxy {
            Proxy::Haproxy => (
                vec!["-c", "-q", "-f", &p],
                vec![
                    "-W".into(),
                    "-f".into(),
                    p.clone(),
                    "-p".into(),
                    d.join(pid).display().to_string(),
                ],
            ),
            Proxy::Nginx => (
                vec!["-t", "-q", "-c", &p],
                vec!["-c".into(), p.clone(), "-g".into(), "daemon off;".into()],
            ),
        };
        let program = proxy.name();
        if let Err(e) = switchboard_tests::run_cmd(program, &check) {
            panic!("{program} refuses the hand-written config {p}: {e}");
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let proxy = Process::spawn(Path::new(program), &args, &[]);
        wait_pid_file(&d.join(pid), START).await;
        StaticProxy { proxy, _dir: dir }
    }
}

/// One config under test.
struct Target {
    label: &'static str,
    /// Rendered with the live channel: the membership change made before the runs went
    /// through a reload instead (confd found the change not membership-only).
    reloaded: bool,
    /// HTTP/1.1 clients' port.
    port: u16,
    /// HTTP/2 (prior knowledge) clients' port.
    h2c_port: u16,
    /// The proxy's process group, whose CPU time is counted.
    pgid: u32,
    /// What runs it: confd and the proxy, or the proxy on a hand-written file.
    _ours: Option<Lb>,
    _static: Option<StaticProxy>,
}

/// What one run of a load generator measured.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Load {
    /// Requests answered per second.
    rps: f64,
    /// Requests answered.
    requests: u64,
    /// Requests that failed or were answered with another status than 2xx/3xx.
    bad: u64,
}

/// wrk's summary: `N requests in ...`, `Requests/sec: R`, and the `Non-2xx or 3xx responses`
/// and `Socket errors` lines when there are any.
fn parse_wrk(out: &str) -> Option<Load> {
    let mut l = Load::default();
    let mut rps = None;
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            l.requests = n.trim().parse().ok()?;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            l.bad += v.trim().parse::<u64>().ok()?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for part in v.split(',') {
                l.bad += part.split_whitespace().nth(1)?.parse::<u64>().ok()?;
            }
        }
    }
    l.rps = rps?;
    Some(l)
}

/// h2load's summary: `finished in T, R req/s, ...`, `requests: N total, N started, N done, N
/// succeeded, N failed, N errored, N timeout` and `status codes: N 2xx, N 3xx, N 4xx, N 5xx`.
fn parse_h2load(out: &str) -> Option<Load> {
    let mut l = Load::default();
    let (mut rps, mut done, mut failed, mut non2xx) = (None, None, 0, 0);
    let count = |s: &str, what: &str| -> Option<u64> {
        s.split(',')
            .map(str::trim)
            .find_map(|p| p.strip_suffix(what))
            .and_then(|n| n.trim().parse().ok())
    };
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("finished in ") {
            rps = v
                .split(',')
                .map(str::trim)
                .find_map(|p| p.strip_suffix(" req/s"))
                .and_then(|n| n.parse::<f64>().ok());
        } else if let Some(v) = line.strip_prefix("requests:") {
            done = count(v, " done");
            failed = count(v, " failed")? + count(v, " errored")? + count(v, " timeout")?;
        } else if let Some(v) = line.strip_prefix("status codes:") {
            non2xx = count(v, " 4xx")? + count(v, " 5xx")?;
        }
    }
    l.rps = rps?;
    l.requests = done?;
    l.bad = failed + non2xx;
    Some(l)
}

/// The gRPC request body h2load sends: one uncompressed message, 5-byte prefix (flag 0, length
/// big-endian) and the encoded [`EchoRequest`].
fn grpc_frame() -> Vec<u8> {
    let msg = EchoRequest {
        text: "bench".into(),
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    frame
}

const GRPC_HEADERS: [&str; 2] = ["content-type: application/grpc", "te: trailers"];

/// The load generator's command line for one run of `w` against `t`: wrk for `secs`
/// seconds; h2load for one batch of [`PER_CONNECTION`] requests on each connection.
fn command(w: Workload, t: &Target, secs: u64, frame: &Path) -> (&'static str, Vec<String>) {
    let h2load = |url: String, extra: Vec<String>| {
        let mut a: Vec<String> = [
            "-t1".to_string(),
            format!("-c{H2_CLIENTS}"),
            format!("-m{H2_STREAMS}"),
            format!("-n{}", H2_CLIENTS * PER_CONNECTION),
        ]
        .into();
        a.extend(extra);
        a.push(url);
        ("h2load", a)
    };
    match w {
        Workload::Http1 => (
            "wrk",
            vec![
                "-t1".into(),
                format!("-c{CONNECTIONS}"),
                format!("-d{secs}s"),
                format!("http://127.0.0.1:{}/", t.port),
            ],
        ),
        Workload::H2 => h2load(
            format!("http://127.0.0.1:{}{H2_PATH}/x", t.h2c_port),
            vec![],
        ),
        Workload::Grpc => {
            let mut extra = vec!["-d".to_string(), frame.display().to_string()];
            for h in GRPC_HEADERS {
                extra.extend(["-H".to_string(), h.to_string()]);
            }
            h2load(format!("http://127.0.0.1:{}{ECHO_PATH}", t.h2c_port), extra)
        }
    }
}

/// One run of the load generator; panics naming it when it fails or its summary cannot be
/// read.
async fn run_client(w: Workload, t: &Target, secs: u64, frame: &Path) -> Load {
    let (program, args) = command(w, t, secs, frame);
    let out = tokio::time::timeout(
        Duration::from_secs(secs + 30),
        tokio::process::Command::new(program)
            .args(&args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{program} {}: still running after {secs} s + 30 s",
            args.join(" ")
        )
    })
    .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    let parsed = match w {
        Workload::Http1 => parse_wrk(&text),
        Workload::H2 | Workload::Grpc => parse_h2load(&text),
    };
    match parsed {
        Some(l) if out.status.success() => l,
        _ => panic!(
            "{program} {}: expected its summary, got status {}:\n{text}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// `secs` seconds of `w` against `t` (h2load: batches one after the other until then), and
/// the proxy's CPU time meanwhile.
async fn load(w: Workload, t: &Target, secs: u64, frame: &Path) -> (Load, Duration) {
    let cpu0 = group_cpu_time(t.pgid);
    let t0 = Instant::now();
    let mut total = Load::default();
    loop {
        let l = run_client(w, t, secs, frame).await;
        total.requests += l.requests;
        total.bad += l.bad;
        if w == Workload::Http1 || t0.elapsed() >= Duration::from_secs(secs) {
            break;
        }
    }
    total.rps = total.requests as f64 / t0.elapsed().as_secs_f64();
    (total, group_cpu_time(t.pgid).saturating_sub(cpu0))
}

/// Waits until `t` routes `w` to both instances of its pool with the harness's clients (over
/// HTTP/2 to the h2c instances), and, for gRPC, until the bytes h2load sends are answered
/// `grpc-status: 0`; panics naming what never came.
async fn verify(w: Workload, t: &Target, pools: &Pools, frame: &Path) {
    let want = pools.names(w);
    let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let (seen, want) = (&seen, &want);
    let what = format!("{} via {} to reach {want:?}", w.name(), t.label);
    wait_for(&what, START, || async move {
        let name = match w {
            Workload::Http1 => http1_get(t.port, "bench", "/")
                .await
                .ok()
                .filter(|r| r.status == 200)
                .map(|r| r.body),
            Workload::H2 => h2c_get(t.h2c_port, "bench", &format!("{H2_PATH}/x"))
                .await
                .ok()
                .filter(|r| r.status == 200 && r.seen_version.as_deref() == Some("HTTP/2.0"))
                .map(|r| r.body),
            Workload::Grpc => match GrpcClient::connect(t.h2c_port).await {
                Ok(mut c) => c.echo("bench").await.ok().map(|r| r.name),
                Err(_) => None,
            },
        };
        let mut seen = seen.lock().unwrap();
        seen.extend(name);
        want.iter().all(|n| seen.contains(n)).then_some(())
    })
    .await;
    if w == Workload::Grpc {
        let url = format!("http://127.0.0.1:{}{ECHO_PATH}", t.h2c_port);
        let mut args = vec!["-v", "-d", frame.to_str().unwrap()];
        for h in GRPC_HEADERS {
            args.extend(["-H", h]);
        }
        args.push(&url);
        let out = switchboard_tests::run_cmd("nghttp", &args)
            .unwrap_or_else(|e| panic!("nghttp {}: {e}", args.join(" ")));
        assert!(
            out.contains("grpc-status: 0") && out.contains(":status: 200"),
            "h2load's gRPC request via {}: expected `:status: 200` and `grpc-status: 0`, \
             nghttp got:\n{out}",
            t.label
        );
    }
}

/// Median of a non-empty set of figures.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One config's rounds for one protocol.
#[derive(Default)]
struct Series {
    loads: Vec<Load>,
    cpu: Vec<Duration>,
}

impl Series {
    fn rps(&self) -> f64 {
        median(self.loads.iter().map(|l| l.rps).collect())
    }
    /// The proxy's CPU time per request over all rounds, in µs.
    fn cpu_us(&self) -> f64 {
        let n: u64 = self.loads.iter().map(|l| l.requests).sum();
        let cpu: Duration = self.cpu.iter().sum();
        cpu.as_secs_f64() * 1e6 / n.max(1) as f64
    }
    fn bad(&self) -> u64 {
        self.loads.iter().map(|l| l.bad).sum()
    }
}

/// One row of the table: a rendered config against a hand-written one.
struct Row {
    proxy: Proxy,
    workload: Workload,
    subject: &'static str,
    baseline: &'static str,
    ours: f64,
    theirs: f64,
    per_round: Vec<f64>,
    cpu: (f64, f64),
    bad: (u64, u64),
}

/// The configs measured for `proxy`, and the rows compared: `(label, rendered with the live
/// channel or hand-written file)`, then `(subject, baseline)` pairs of labels.
type Plan = (
    &'static [(&'static str, Config)],
    &'static [(&'static str, &'static str)],
);

/// What a target runs.
#[derive(Clone, Copy)]
enum Config {
    /// The shipped template rendered by confd, with the live channel or without it (nginx:
    /// `lua_peers: false`, no Lua balancer).
    Ours { live: bool },
    /// A hand-written file.
    Static(&'static str),
}

/// nginx: ours against the hand-written config, against the same with the template's
/// one-connection-per-request policy, and ours without the Lua balancer against that too (what
/// the Lua balancer costs).
const NGINX: Plan = (
    &[
        ("ours", Config::Ours { live: true }),
        ("ours, no Lua balancer", Config::Ours { live: false }),
        ("static", Config::Static(STATIC_NGINX)),
        (
            "static, connection per request",
            Config::Static(STATIC_NGINX_CLOSE),
        ),
    ],
    &[
        ("ours", "static"),
        ("ours", "static, connection per request"),
        ("ours, no Lua balancer", "static, connection per request"),
    ],
);

const HAPROXY: Plan = (
    &[
        ("ours", Config::Ours { live: true }),
        ("static", Config::Static(STATIC_HAPROXY)),
    ],
    &[("ours", "static")],
);

/// Starts the stack of `config` for `proxy` on the same `pools`; a rendered one once the file
/// lists every instance, and, with the live channel, once a membership change went through it
/// (an instance added, then removed), so nginx's Lua balancer picks from the lists confd
/// pushed, as it does after any scale event.
async fn target(
    label: &'static str,
    proxy: Proxy,
    config: Config,
    store: &crate::common::Backend,
    pools: &Pools,
) -> Target {
    match config {
        Config::Ours { live } => {
            let settings = Settings {
                proxy,
                live,
                wait: ("200ms", "2s"),
                check: true,
                service: "web",
                h2c_listen: true,
            };
            let addrs = pools.addrs();
            let lb = Lb::start(&store.uri, settings, |f| addrs.iter().all(|a| lists(f, a))).await;
            let mut reloaded = false;
            if live {
                let extra = H2App::start("web-extra").await;
                let svc = extra.service("web", &[]);
                for step in 0..2 {
                    let before = lb.counters();
                    if step == 0 {
                        store.store.register(&svc).await.expect("register");
                    } else {
                        store.store.deregister(&svc).await.expect("deregister");
                    }
                    let applied = poll(START, Duration::from_millis(50), || async {
                        let now = lb.counters();
                        (now.live + now.reloads > before.live + before.reloads).then_some(now)
                    })
                    .await;
                    let Some(now) = applied else {
                        panic!(
                            "{}: a membership change not applied within {START:?}; confd:\n{}",
                            proxy.name(),
                            lb.log()
                        )
                    };
                    reloaded |= now.reloads > before.reloads;
                }
                if reloaded {
                    eprintln!(
                        "  warning: {} {label}: confd reloaded the proxy for a membership \
                         change instead of applying it live",
                        proxy.name()
                    );
                }
            }
            Target {
                label,
                reloaded,
                port: lb.port,
                h2c_port: lb.h2c_port,
                pgid: lb.proxy_pid(),
                _ours: Some(lb),
                _static: None,
            }
        }
        Config::Static(text) => {
            let port = free_port();
            let h2c_port = match proxy {
                Proxy::Nginx => free_port(),
                Proxy::Haproxy => port,
            };
            let mut words = pools.words();
            words.push(("LISTEN", port.to_string()));
            words.push(("H2C_LISTEN", h2c_port.to_string()));
            let s = StaticProxy::start(proxy, text, &words).await;
            let up = poll(START, Duration::from_millis(50), || async {
                std::net::TcpStream::connect(("127.0.0.1", h2c_port))
                    .and(std::net::TcpStream::connect(("127.0.0.1", port)))
                    .ok()
                    .map(|_| ())
            })
            .await;
            assert!(
                up.is_some(),
                "{} on {label}: not listening: {}",
                proxy.name(),
                s.proxy.output()
            );
            Target {
                label,
                reloaded: false,
                port,
                h2c_port,
                pgid: s.proxy.pid(),
                _ours: None,
                _static: Some(s),
            }
        }
    }
}

/// Measures every protocol through every proxy in `o`, then prints the table.
pub async fn run(o: &Opts) {
    for tool in ["wrk", "h2load", "nghttp"] {
        if switchboard_tests::run_cmd("sh", &["-c", &format!("command -v {tool}")]).is_err() {
            panic!("{tool} not found: scripts/setup installs it (wrk, nghttp2-client)");
        }
    }
    let _ = release_bin("confd");
    let store = crate::common::Backend::start(Which::Consul).await;
    let pools = Pools::start().await;
    for svc in pools.services() {
        store.store.register(&svc).await.expect("register");
    }
    let scratch = tempfile::tempdir().unwrap();
    let frame: PathBuf = scratch.path().join("echo.grpc");
    std::fs::write(&frame, grpc_frame()).unwrap();

    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for &proxy in &o.proxies {
        eprintln!(
            "protocols: {} ({} rounds of {} s)",
            proxy.name(),
            o.rounds,
            o.secs
        );
        let (configs, pairs) = match proxy {
            Proxy::Nginx => NGINX,
            Proxy::Haproxy => HAPROXY,
        };
        let mut targets = Vec::new();
        for &(label, config) in configs {
            targets.push(target(label, proxy, config, &store, &pools).await);
        }
        for t in targets.iter().filter(|t| t.reloaded) {
            notes.push(format!(
                "{} \"{}\": confd applied the membership change made before the runs with a \
                 reload, not through the live channel.",
                proxy.name(),
                t.label
            ));
        }
        for w in Workload::ALL {
            for t in &targets {
                verify(w, t, &pools, &frame).await;
                load(w, t, WARM_UP, &frame).await;
            }
            let mut series: Vec<Series> = targets.iter().map(|_| Series::default()).collect();
            for round in 0..o.rounds {
                let mut order: Vec<usize> = (0..targets.len()).collect();
                if round % 2 == 1 {
                    order.reverse();
                }
                for i in order {
                    let (l, cpu) = load(w, &targets[i], o.secs, &frame).await;
                    eprintln!(
                        "  {} {} round {}: {:.0} req/s, {:.1} µs CPU/req, {} failed",
                        w.name(),
                        targets[i].label,
                        round + 1,
                        l.rps,
                        cpu.as_secs_f64() * 1e6 / l.requests.max(1) as f64,
                        l.bad
                    );
                    series[i].loads.push(l);
                    series[i].cpu.push(cpu);
                }
            }
            let by = |label: &str| {
                let i = targets.iter().position(|t| t.label == label).unwrap();
                &series[i]
            };
            for &(subject, baseline) in pairs {
                let (a, b) = (by(subject), by(baseline));
                rows.push(Row {
                    proxy,
                    workload: w,
                    subject,
                    baseline,
                    ours: a.rps(),
                    theirs: b.rps(),
                    per_round: a
                        .loads
                        .iter()
                        .zip(&b.loads)
                        .map(|(x, y)| x.rps / y.rps.max(1e-9))
                        .collect(),
                    cpu: (a.cpu_us(), b.cpu_us()),
                    bad: (a.bad(), b.bad()),
                });
            }
        }
    }
    print_table(&rows, o);
    for n in notes {
        println!("\nNote: {n}");
    }
}

fn print_table(rows: &[Row], o: &Opts) {
    println!("\n### protocols: requests per second, rendered config / hand-written config\n");
    println!("Goal: ours / static >= {GOAL:.2} (our config must not make the proxy slower).\n");
    println!("| proxy   | protocol            | rendered              | hand-written                   | rendered req/s | hand-written req/s | ratio | ratio per round              | proxy CPU µs/req | failed | goal   |");
    println!("|---------|---------------------|-----------------------|--------------------------------|---------------:|-------------------:|------:|------------------------------|------------------|--------|--------|");
    for r in rows {
        let ratio = r.ours / r.theirs.max(1e-9);
        let rounds: Vec<String> = r.per_round.iter().map(|v| format!("{v:.2}")).collect();
        println!(
            "| {:<7} | {:<19} | {:<21} | {:<30} | {:>14.0} | {:>18.0} | {:>5.2} | {:<28} | {:<16} | {:<6} | {:<6} |",
            r.proxy.name(),
            r.workload.name(),
            r.subject,
            r.baseline,
            r.ours,
            r.theirs,
            ratio,
            rounds.join(", "),
            format!("{:.1} / {:.1}", r.cpu.0, r.cpu.1),
            format!("{} / {}", r.bad.0, r.bad.1),
            if ratio >= GOAL { "met" } else { "missed" }
        );
    }
    println!(
        "\nratio: rendered / hand-written, medians of {rounds} rounds of {secs} s per config, \
         the configs alternated (order reversed every other round); per round: that round's \
         ratio. Proxy CPU: the proxy's processes (user + system) per request answered, rendered \
         / hand-written; failed: requests that failed or got neither 2xx nor 3xx, rendered / \
         hand-written. Clients: HTTP/1.1 `wrk -t1 -c{CONNECTIONS}` on `/` (pool `web`, HTTP/1.1 \
         to the instances); h2 `h2load -t1 -c{H2_CLIENTS} -m{H2_STREAMS}` with prior knowledge on \
         `{H2_PATH}/x` (pool `h2`, `proto: h2c`); gRPC unary, the same h2load posting one message \
         to `{ECHO_PATH}` (pool `grpc`, `proto: grpc`); h2load in batches of {PER_CONNECTION} \
         requests per connection. Two in-process instances per pool. Rendered: the shipped \
         template by confd from Consul, with its live channel (a membership change applied \
         through it first), or nginx without it (`lua_peers: false`). Hand-written: \
         bench/static/ (nginx: upstream keep-alive; \"connection per request\": the template's \
         upstream policy).",
        rounds = o.rounds,
        secs = o.secs
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk() {
        let out = "Running 5s test @ http://127.0.0.1:1/\n  1 threads and 32 connections\n  \
            Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     1.20ms  \
            300.00us   9.00ms   90.00%\n  61234 requests in 5.00s, 9.10MB read\n  \
            Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 4\n\
            Requests/sec:  12246.80\nTransfer/sec:      1.82MB\n";
        assert_eq!(
            parse_wrk(out),
            Some(Load {
                rps: 12246.8,
                requests: 61234,
                bad: 7
            })
        );
        let clean = "  100 requests in 1.00s, 1KB read\nRequests/sec:    100.00\n";
        assert_eq!(
            parse_wrk(clean),
            Some(Load {
                rps: 100.0,
                requests: 100,
                bad: 0
            })
        );
        assert_eq!(
            parse_wrk("unable to connect to 127.0.0.1:1 Connection refused"),
            None
        );
    }

    #[test]
    fn reads_h2load() {
        let out = "starting benchmark...\nspawning thread #0: 4 total client(s). Timing-based \
            test with 0s of warm-up time and 5s of main duration for measurements.\n\
            finished in 5.00s, 20112.40 req/s, 1.53MB/s\n\
            requests: 100562 total, 100594 started, 100562 done, 100560 succeeded, 2 failed, \
            1 errored, 0 timeout\n\
            status codes: 100560 2xx, 0 3xx, 3 4xx, 0 5xx\n";
        assert_eq!(
            parse_h2load(out),
            Some(Load {
                rps: 20112.4,
                requests: 100562,
                bad: 6
            })
        );
        assert_eq!(parse_h2load("connect: Connection refused"), None);
    }

    #[test]
    fn fills_every_placeholder() {
        let words = [("A", "1".to_string()), ("DIR", "/tmp/x".to_string())];
        assert_eq!(fill("@A@ @DIR@/p", &words), Ok("1 /tmp/x/p".into()));
        assert_eq!(
            fill("@A@ @B@", &words),
            Err("@B@: no value for this placeholder".into())
        );
        // An `@` that is not a placeholder (HAProxy's `unix@`) stays.
        assert_eq!(
            fill("unix@/run/a.sock", &words),
            Ok("unix@/run/a.sock".into())
        );
        assert_eq!(
            fill("x@y @C@", &words),
            Err("@C@: no value for this placeholder".into())
        );
        // The shipped hand-written configs take exactly the bench's words.
        let all: Vec<(&str, String)> = [
            "WEB_A",
            "WEB_B",
            "H2_A",
            "H2_B",
            "GRPC_A",
            "GRPC_B",
            "LISTEN",
            "H2C_LISTEN",
            "DIR",
        ]
        .into_iter()
        .map(|w| (w, "1".to_string()))
        .collect();
        for text in [STATIC_NGINX, STATIC_NGINX_CLOSE, STATIC_HAPROXY] {
            let out = fill(text, &all).unwrap();
            assert!(!out.contains("@WEB") && !out.contains("@DIR"), "{out}");
        }
    }

    #[test]
    fn grpc_frame_is_one_prefixed_message() {
        let f = grpc_frame();
        assert_eq!(f[0], 0, "uncompressed");
        let len = u32::from_be_bytes(f[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, f.len() - 5);
        assert_eq!(
            EchoRequest::decode(&f[5..]).unwrap(),
            EchoRequest {
                text: "bench".into()
            }
        );
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![5.0]), 5.0);
    }
}
