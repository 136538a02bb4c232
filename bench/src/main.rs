//! Switchboard benchmark: real Docker engine, real Consul and etcd, the real binaries.
//!
//! Suites (`--suite registrator|confd|drain|protocols|all`, default all; `confd` is
//! `confd-render` plus `confd-daemon`), each printing markdown
//! tables; nothing is asserted (speed targets are read from these tables, never from timed
//! tests):
//! - `registrator` ([`registrator`]): Docker `start` event -> registration visible in the
//!   store, per store and container count, beside the floor ([`floor`]: one inspection and one
//!   write per event, run at the same time) and as a ratio to it; the registrator's peak RSS;
//!   its RSS idle and over a sustained churn of containers (`--reg-churn-secs`, 0 skips it).
//! - `confd`: in-process render time of the shipped templates ([`confd_render`]); store
//!   change -> reload command ran, bursts, and the daemon's peak RSS ([`confd_live`]).
//! - `drain` ([`drain`]): registrator, confd and a real HAProxy or nginx with their live
//!   channels ([`lb`]): Docker stop signal -> out of the proxy; reloads and live updates per
//!   scale event, with and without the live channel; membership changes per second through
//!   HAProxy's runtime API with zero reloads.
//! - `protocols` ([`protocols`]): requests per second through nginx and HAProxy for HTTP/1.1,
//!   h2 and gRPC clients, the rendered shipped template beside a hand-written config for the
//!   same backends (`bench/static/`), and their ratio.
//!
//! Run: `cargo build --release -p confd -p switchboard-bench && cargo build --profile lean -p
//! registrator && target/release/bench`. The release builds of `confd` and `registrator` (its
//! `lean` build, as shipped, else `release`) are measured when present.
//! Options: `--suite S`, `--stores consul,etcd`, `--counts 1,50,200` (registrator containers),
//! `--render-counts 10,1000,10000`, `--samples 50` (confd latency samples per run),
//! `--burst 200` (confd burst and drain churn burst), `--rss-counts 10,1000,10000`,
//! `--proxies haproxy,nginx`, `--stops 20` (containers stopped per store and proxy),
//! `--cycles 5` (scale 1 -> 3 -> 1 cycles), `--churn-secs 10` (one-at-a-time churn),
//! `--reg-churn-secs 120` (registrator's RSS churn run), `--rounds 3` and `--load-secs 5`
//! (protocols: rounds per config, seconds of load per round).
//! A quick drain run: `bench --suite drain --stores etcd --stops 3 --cycles 1 --churn-secs 2
//! --burst 20`; a quick protocols run: `bench --suite protocols --rounds 1 --load-secs 1`.
//!
//! The bench is a crate of its own (`switchboard-bench`), beside the tests rather than inside
//! them: the tests assert and the bench measures, it is run by hand in a release build, and
//! what only it needs (a Docker client of its own for the floor, a counting allocator) stays
//! out of the tests' crate. It starts its services with the tests' fixtures
//! (`switchboard-tests`: Consul, etcd, containers, processes, proxy reloads), so a fixture is
//! written once, and it measures confd's render engine in process through the `confd` library.

mod common;
mod confd_live;
mod confd_render;
mod drain;
mod floor;
mod lb;
mod protocols;
mod registrator;
mod workload;

use lb::Proxy;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The system allocator, counting the bytes live: what [`confd_render`] reports as the size
/// of a snapshot and of a template document (bytes requested, without the allocator's own
/// per-block overhead).
struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(l.size(), Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE_BYTES.fetch_sub(l.size(), Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(l.size(), Ordering::Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(l.size(), Ordering::Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Heap bytes live in this process now.
pub fn live_bytes() -> usize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

/// Which store a run uses.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Which {
    /// A Consul dev agent (agent services).
    Consul,
    /// A single etcd member.
    Etcd,
}

impl Which {
    /// Name used in tables.
    pub fn name(self) -> &'static str {
        match self {
            Which::Consul => "consul",
            Which::Etcd => "etcd",
        }
    }
}

/// What to run, from the command line.
struct Args {
    registrator: bool,
    confd_render: bool,
    confd: bool,
    drain: bool,
    protocols: bool,
    stores: Vec<Which>,
    counts: Vec<usize>,
    render_counts: Vec<usize>,
    samples: usize,
    burst: usize,
    rss_counts: Vec<usize>,
    proxies: Vec<Proxy>,
    stops: usize,
    cycles: usize,
    churn_secs: usize,
    reg_churn_secs: usize,
    rounds: usize,
    load_secs: usize,
}

fn numbers(flag: &str, v: Option<String>) -> Vec<usize> {
    v.unwrap_or_else(|| usage(&format!("{flag} needs a value: N,N,...")))
        .split(',')
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| usage(&format!("{flag} takes numbers, got {s:?}")))
        })
        .collect()
}

const USAGE: &str = "usage: bench [--suite registrator|confd|confd-render|confd-daemon|drain|protocols|all] \
[--stores consul,etcd] [--counts N,..] [--render-counts N,..] [--rss-counts N,..] [--samples N] [--burst N] \
[--proxies haproxy,nginx] [--stops N] [--cycles N] [--churn-secs N] [--reg-churn-secs N] \
[--rounds N] [--load-secs N]";

/// Bad arguments: one line naming the input and what was expected, exit status 2.
fn usage(msg: &str) -> ! {
    eprintln!("bench: {msg}\n{USAGE}");
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut a = Args {
        registrator: true,
        confd_render: true,
        confd: true,
        drain: true,
        protocols: true,
        stores: vec![Which::Consul, Which::Etcd],
        counts: vec![1, 50, 200],
        render_counts: vec![10, 1_000, 10_000],
        samples: 50,
        burst: 200,
        rss_counts: vec![10, 1_000, 10_000],
        proxies: vec![Proxy::Haproxy, Proxy::Nginx],
        stops: 20,
        cycles: 5,
        churn_secs: 10,
        reg_churn_secs: 120,
        rounds: 3,
        load_secs: 5,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--suite" => {
                (a.registrator, a.confd_render, a.confd, a.drain, a.protocols) =
                    match args.next().as_deref() {
                        Some("registrator") => (true, false, false, false, false),
                        Some("confd") => (false, true, true, false, false),
                        Some("confd-render") => (false, true, false, false, false),
                        Some("confd-daemon") => (false, false, true, false, false),
                        Some("drain") => (false, false, false, true, false),
                        Some("protocols") => (false, false, false, false, true),
                        Some("all") => (true, true, true, true, true),
                        other => usage(&format!(
                            "--suite {other:?}: expected registrator, confd, confd-render, \
                             confd-daemon, drain, protocols or all"
                        )),
                    }
            }
            "--stores" => {
                a.stores = args
                    .next()
                    .unwrap_or_else(|| usage("--stores needs a value: consul,etcd"))
                    .split(',')
                    .map(|s| match s {
                        "consul" => Which::Consul,
                        "etcd" => Which::Etcd,
                        other => {
                            usage(&format!("unknown store {other:?}: expected consul or etcd"))
                        }
                    })
                    .collect()
            }
            "--proxies" => {
                a.proxies = args
                    .next()
                    .unwrap_or_else(|| usage("--proxies needs a value: haproxy,nginx"))
                    .split(',')
                    .map(|s| match s {
                        "haproxy" => Proxy::Haproxy,
                        "nginx" => Proxy::Nginx,
                        other => usage(&format!(
                            "unknown proxy {other:?}: expected haproxy or nginx"
                        )),
                    })
                    .collect()
            }
            "--stops" => a.stops = numbers("--stops", args.next())[0],
            "--cycles" => a.cycles = numbers("--cycles", args.next())[0],
            "--churn-secs" => a.churn_secs = numbers("--churn-secs", args.next())[0],
            "--reg-churn-secs" => a.reg_churn_secs = numbers("--reg-churn-secs", args.next())[0],
            "--rounds" => a.rounds = numbers("--rounds", args.next())[0].max(1),
            "--load-secs" => a.load_secs = numbers("--load-secs", args.next())[0].max(1),
            "--counts" => a.counts = numbers("--counts", args.next()),
            "--render-counts" => a.render_counts = numbers("--render-counts", args.next()),
            "--rss-counts" => a.rss_counts = numbers("--rss-counts", args.next()),
            "--samples" => a.samples = numbers("--samples", args.next())[0],
            "--burst" => a.burst = numbers("--burst", args.next())[0],
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    a
}

#[tokio::main]
async fn main() {
    let a = parse_args();
    if a.confd_render {
        confd_render::run(&a.render_counts);
    }
    if a.confd {
        confd_live::run(&a.stores, a.samples, a.burst, &a.rss_counts).await;
    }
    if a.registrator {
        registrator::run(&a.counts, &a.stores).await;
        if a.reg_churn_secs > 0 {
            registrator::run_churn(&a.stores, a.reg_churn_secs as u64).await;
        }
    }
    if a.drain {
        let o = drain::Opts {
            stops: a.stops,
            cycles: a.cycles,
            churn: Duration::from_secs(a.churn_secs as u64),
            burst: a.burst,
            proxies: a.proxies.clone(),
        };
        drain::run(&a.stores, &o).await;
    }
    if a.protocols {
        let o = protocols::Opts {
            rounds: a.rounds,
            secs: a.load_secs as u64,
            proxies: a.proxies.clone(),
        };
        protocols::run(&o).await;
    }
}
