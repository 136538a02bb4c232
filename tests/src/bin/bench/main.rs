//! Switchboard benchmark: real Docker engine, real Consul and etcd, the real binaries.
//!
//! Suites (`--suite registrator|confd|all`, default all), each printing markdown tables;
//! nothing is asserted (speed targets are read from these tables, never from timed tests):
//! - `registrator` ([`registrator`]): Docker `start` event -> registration visible in the
//!   store, per store and container count, and the registrator's peak RSS.
//! - `confd`: in-process render time of the shipped templates ([`confd_render`]); store
//!   change -> reload command ran, bursts, and the daemon's peak RSS ([`confd_live`]).
//!
//! Run: `cargo build --release -p confd -p registrator -p switchboard-tests &&
//! target/release/bench`. The release builds of `registrator` and `confd` are measured when
//! present.
//! Options: `--suite S`, `--stores consul,etcd`, `--counts 1,50,200` (registrator containers),
//! `--render-counts 10,1000,10000`, `--samples 50` (confd latency samples per run),
//! `--burst 200`, `--rss-counts 10,1000,10000`.

mod common;
mod confd_live;
mod confd_render;
mod registrator;
mod workload;

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
    confd: bool,
    stores: Vec<Which>,
    counts: Vec<usize>,
    render_counts: Vec<usize>,
    samples: usize,
    burst: usize,
    rss_counts: Vec<usize>,
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

const USAGE: &str = "usage: bench [--suite registrator|confd|all] [--stores consul,etcd] \
[--counts N,..] [--render-counts N,..] [--rss-counts N,..] [--samples N] [--burst N]";

/// Bad arguments: one line naming the input and what was expected, exit status 2.
fn usage(msg: &str) -> ! {
    eprintln!("bench: {msg}\n{USAGE}");
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut a = Args {
        registrator: true,
        confd: true,
        stores: vec![Which::Consul, Which::Etcd],
        counts: vec![1, 50, 200],
        render_counts: vec![10, 1_000, 10_000],
        samples: 50,
        burst: 200,
        rss_counts: vec![10, 1_000, 10_000],
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--suite" => match args.next().as_deref() {
                Some("registrator") => (a.registrator, a.confd) = (true, false),
                Some("confd") => (a.registrator, a.confd) = (false, true),
                Some("all") => (a.registrator, a.confd) = (true, true),
                other => usage(&format!(
                    "--suite {other:?}: expected registrator, confd or all"
                )),
            },
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
    if a.confd {
        confd_render::run(&a.render_counts);
        confd_live::run(&a.stores, a.samples, a.burst, &a.rss_counts).await;
    }
    if a.registrator {
        registrator::run(&a.counts, &a.stores).await;
    }
}
