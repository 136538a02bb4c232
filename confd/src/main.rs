//! `confd`: parses flags, sets up logging and signals, then runs [`confd::run`].
//!
//! SIGINT/SIGTERM cancel the run and exit 0. SIGHUP re-reads the config file (templates are
//! read from disk at every render anyway): a valid new config replaces the running one, an
//! invalid one is refused with its error and the old one keeps running.
//!
//! A burst of SIGHUPs is one reload: the config is re-read once the signals have settled
//! ([`HUP_SETTLE`]), and one reload at a time runs. The store source ([`Source`]) belongs to
//! [`serve`], not to a run: a reload whose new config watches the same things the same way
//! keeps it, long polls and all, so reloading costs the store no connection. Otherwise the
//! old source is stopped, every one of its tasks joined and its connections closed, before
//! the new one starts.
//!
//! With `--exec` (or `exec:`), confd supervises the proxy ([`confd::exec`]): SIGINT, SIGTERM
//! and SIGQUIT are forwarded to it and confd exits with its status once it has exited;
//! SIGUSR1 and SIGUSR2 are forwarded as they are; SIGHUP stays confd's own (the proxy keeps
//! running and is reloaded only if the new configuration renders a different file).

use anyhow::Context;
use clap::{CommandFactory, Parser};
use confd::config::Wait;
use confd::exec::{self, Supervisor, SupervisorHandle};
use confd::metrics::Telemetry;
use confd::runner::Quiescence;
use confd::signal::Signal;
use confd::source::{Prepared, Source};
use confd::{Config, Overrides, RunOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use switchboard::telemetry::{parse_listen_addr, LogFormat, TelemetryServer};
use switchboard::{GoFlags, Shutdown};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

/// How SIGHUPs are coalesced: the config is re-read once no SIGHUP came for the first value,
/// and at the latest the second value after the first of a burst (a steady stream still
/// reloads, at that pace). Long enough for a script's or an orchestrator's volley of signals,
/// short enough not to be noticed by whoever sent one.
const HUP_SETTLE: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(2));

/// Renders proxy configs from Consul or etcd through Handlebars templates.
#[derive(Debug, Parser)]
#[command(
    version = switchboard::VERSION,
    about,
    after_help = "Flags may be written with one dash, as kelseyhightower/confd users type them \
(-config, -backend, -onetime, -noop). The backend is one URI (confd's `-backend consul -node \
H:P` is `-backend consul://H:P`).\n\nEnvironment: CONSUL_HTTP_ADDR, ETCDCTL_ENDPOINTS (backend \
when none is given); CONSUL_CACERT, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY, \
CONSUL_HTTP_TOKEN(_FILE), ETCDCTL_CACERT, ETCDCTL_CERT, ETCDCTL_KEY, ETCDCTL_USER, \
ETCDCTL_PASSWORD (TLS and credentials); RUST_LOG (log level, default info; logs go to stderr)."
)]
struct Args {
    /// YAML config file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Backend URI: consul://h:p, consulkv://h:p/prefix, etcd://h1:p1,h2:p2/prefix.
    /// Default: CONSUL_HTTP_ADDR, then ETCDCTL_ENDPOINTS.
    #[arg(long)]
    backend: Option<String>,
    /// SRC:DEST[:COMMAND], COMMAND being the reload command (run with sh -c). Repeatable.
    #[arg(long = "template")]
    templates: Vec<String>,
    /// Render every template once and exit (non-zero if any failed).
    #[arg(long, visible_alias = "onetime")]
    once: bool,
    /// Print a unified diff per template to stdout; write nothing, run nothing.
    #[arg(long, visible_alias = "noop")]
    dry_run: bool,
    /// Quiescence window MIN[:MAX], e.g. 500ms:5s.
    #[arg(long)]
    wait: Option<String>,
    /// Template variable KEY=VALUE (exposed as `vars`). Repeatable.
    #[arg(long = "var")]
    vars: Vec<String>,
    /// Serve GET /metrics (Prometheus) and GET /healthz on HOST:PORT (over `metrics_addr:`).
    #[arg(long = "metrics-addr", value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
    /// Log format on stderr: text or json (one JSON object per line).
    #[arg(long = "log-format", value_name = "FORMAT", default_value = "text")]
    log_format: String,
    /// Ask a running confd's /healthz at URL; exit 0 if healthy, 1 if not (for container
    /// healthchecks). Nothing else runs.
    #[arg(long, value_name = "URL")]
    healthcheck: Option<String>,
    /// Supervise this command (the proxy, in the foreground): start it after the first good
    /// render, reload it by signal, restart it when it dies, stop with it. Split like a shell
    /// command line, never run through a shell.
    #[arg(long)]
    exec: Option<String>,
    /// Signal that reloads the --exec command, for templates without a reload command
    /// (default SIGHUP).
    #[arg(long)]
    exec_reload_signal: Option<String>,
}

impl Args {
    fn overrides(&self) -> Overrides {
        Overrides {
            config: self.config.clone(),
            backend: self.backend.clone(),
            templates: self.templates.clone(),
            wait: self.wait.clone(),
            vars: self.vars.clone(),
            consul_http_addr: std::env::var("CONSUL_HTTP_ADDR").ok(),
            etcdctl_endpoints: std::env::var("ETCDCTL_ENDPOINTS").ok(),
            exec: self.exec.clone(),
            exec_reload_signal: self.exec_reload_signal.clone(),
        }
    }
}

/// Parses the command line, Go-style single-dash flags included ([`GoFlags`], built from
/// [`Args`]' own flags and aliases). A bad one gets clap's message, with an unknown flag named
/// as it was typed, and exit status 2.
fn parse_args(argv: Vec<String>) -> Args {
    match Args::try_parse_from(GoFlags::of(&Args::command()).normalise(argv.clone())) {
        Ok(args) => args,
        Err(e) => {
            let text = e.to_string();
            let typed = GoFlags::as_typed(&text, &argv);
            if typed == text {
                e.exit()
            }
            eprint!("{typed}");
            std::process::exit(e.exit_code())
        }
    }
}

fn main() -> ExitCode {
    confd::memory::limit_arenas();
    let args = parse_args(std::env::args().collect());
    if let Some(url) = &args.healthcheck {
        return if switchboard::telemetry::healthcheck("confd", url) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let log_format = match LogFormat::parse(&args.log_format) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("confd: {e}");
            return ExitCode::from(2);
        }
    };
    switchboard::telemetry::init_logging(log_format);
    let flag_addr = match args
        .metrics_addr
        .as_deref()
        .map(|a| parse_listen_addr("--metrics-addr", a))
    {
        Some(Ok(a)) => Some(a),
        Some(Err(e)) => {
            eprintln!("confd: {e}");
            return ExitCode::from(2);
        }
        None => None,
    };
    let overrides = args.overrides();
    let cfg = match Config::load(&overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("confd: {e}");
            return ExitCode::from(2);
        }
    };
    // One-shot runs serve nothing: they end at once, and a daemon reading the same config file
    // (`confd --dry-run` beside it, the image's first `--once` render) holds the address.
    let metrics_addr = flag_addr
        .or(cfg.metrics_addr)
        .filter(|_| !(args.once || args.dry_run));
    let opts = RunOptions {
        once: args.once,
        dry_run: args.dry_run,
        // One for the process: its counters run on across SIGHUP restarts of the run.
        telemetry: Telemetry::new(),
        // Reaches the supervisor once `serve` has started one.
        supervisor: SupervisorHandle::default(),
        // Set once `serve` has started the ACME loop.
        acme_certs: None,
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("confd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(cfg, overrides, opts, metrics_addr)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs until a terminating signal (or the end of a `--once` run), restarting the run with
/// the new configuration on SIGHUP. With `exec`, the supervised process lives across those
/// restarts and confd's exit code is its. The store source lives across them too, unless the
/// new configuration needs another one (see the module docs).
async fn serve(
    mut cfg: Config,
    overrides: Overrides,
    mut opts: RunOptions,
    metrics_addr: Option<SocketAddr>,
) -> anyhow::Result<ExitCode> {
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    // Bound once, before the first run (and before a supervised proxy starts, so a taken
    // address fails alone), and kept across SIGHUP: scrapers and healthchecks must not see the
    // endpoint vanish while the configuration is replaced.
    let server = match metrics_addr {
        Some(addr) => {
            let server = TelemetryServer::bind("--metrics-addr", addr)
                .await
                .map_err(anyhow::Error::msg)?;
            tracing::info!("serving /metrics and /healthz on {}", server.local_addr()?);
            Some(server)
        }
        None => None,
    };
    // `--once` and `--dry-run` render and exit: they never start the command.
    let exec_cfg = cfg.exec.clone().filter(|_| !(opts.once || opts.dry_run));
    let mut supervisor = match &exec_cfg {
        Some(x) => {
            let dests = cfg.templates.iter().map(|t| t.dest.clone()).collect();
            Some(Supervisor::spawn(x.clone(), dests, opts.telemetry.clone())?)
        }
        None => None,
    };
    if let Some(s) = &supervisor {
        opts.supervisor = s.handle();
    }
    // Only a supervisor gives these a use; without one they keep their default actions.
    let extra = |kind: SignalKind, name: &str| -> anyhow::Result<Option<_>> {
        match &exec_cfg {
            Some(_) => Ok(Some(
                signal(kind).with_context(|| format!("{name} handler"))?,
            )),
            None => Ok(None),
        }
    };
    let mut quit = extra(SignalKind::quit(), "SIGQUIT")?;
    let mut usr1 = extra(SignalKind::user_defined1(), "SIGUSR1")?;
    let mut usr2 = extra(SignalKind::user_defined2(), "SIGUSR2")?;
    let shutdown = Shutdown::new();
    if let Some(server) = server {
        // The server wants a registry that lives as long as the process, as this one does.
        let t: &'static Telemetry = Box::leak(Box::new(opts.telemetry.clone()));
        tokio::spawn(server.serve(t.registry(), t.health().clone(), shutdown.clone()));
    }
    let mut source = match Source::start(&cfg, &opts.telemetry, &shutdown) {
        Ok(s) => s,
        Err(e) => {
            if let Some(s) = supervisor.take() {
                s.stop(Signal::TERM).await;
            }
            return Err(e);
        }
    };
    // Automatic HTTPS: restarted by a reload that changes its settings or the source (see
    // `reacme`); the certificates channel lives as long as the process.
    let (certs, served) = tokio::sync::watch::channel(Default::default());
    // Every run serves them, beside the certificates from files and the store.
    opts.acme_certs = Some(served);
    let once = opts.once || opts.dry_run;
    let mut acme = match cfg.acme.clone().filter(|_| !once) {
        Some(a) => Some(
            confd::acme::Running::start(
                a,
                &cfg.backend,
                &cfg.store,
                source.handle().snapshots,
                &opts.telemetry,
                certs.clone(),
                &shutdown,
            )
            .await
            .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    let settle = Wait::new(HUP_SETTLE.0, Some(HUP_SETTLE.1)).expect("min below max");
    // SIGHUPs received and not yet acted on.
    let mut hups = Quiescence::default();
    let mut hup_count = 0u64;
    loop {
        let run_token = shutdown.child_token();
        let mut handle = tokio::spawn(confd::run(
            cfg.clone(),
            opts.clone(),
            source.handle(),
            run_token.clone(),
        ));
        loop {
            let reload_at = hups.due_at(settle);
            tokio::select! {
                _ = term.recv() => return stop(&shutdown, handle, source, supervisor, Signal::TERM).await,
                _ = int.recv() => return stop(&shutdown, handle, source, supervisor, Signal::INT).await,
                Some(_) = recv(&mut quit) => return stop(&shutdown, handle, source, supervisor, Signal::QUIT).await,
                Some(_) = recv(&mut usr1) => if let Some(s) = &supervisor { s.forward(Signal::USR1) },
                Some(_) = recv(&mut usr2) => if let Some(s) = &supervisor { s.forward(Signal::USR2) },
                _ = hup.recv() => {
                    hups.change(Instant::now());
                    hup_count += 1;
                }
                _ = tokio::time::sleep_until(reload_at.unwrap_or_else(Instant::now)), if reload_at.is_some() => {
                    hups.clear();
                    let signals = std::mem::take(&mut hup_count);
                    let Some(change) = reconfigure(&overrides, &cfg, &source, signals) else {
                        continue;
                    };
                    // One reload at a time: the old run ends, then (if it must) the old
                    // source with every connection it held, then the new ones start.
                    run_token.cancel();
                    let _ = (&mut handle).await;
                    let new_source = change.source.is_some();
                    if let Some(prepared) = change.source {
                        source.stop().await;
                        source = prepared.start(&opts.telemetry, &shutdown);
                    }
                    cfg = change.cfg;
                    acme = reacme(acme, &cfg, &source, new_source, &opts.telemetry, &certs, &shutdown).await;
                    break;
                }
                r = &mut handle => {
                    let r = r.context("confd run panicked")?;
                    source.stop().await;
                    if let Some(s) = supervisor.take() {
                        // The render loop ended on its own (an error): the proxy goes with it.
                        s.stop(Signal::TERM).await;
                    }
                    return Ok(if r? { ExitCode::SUCCESS } else { ExitCode::FAILURE });
                }
            }
        }
    }
}

/// What a reload changes.
struct Change {
    /// The new configuration.
    cfg: Config,
    /// The new source's clients, when the running source does not serve the new
    /// configuration.
    source: Option<Prepared>,
}

/// Re-reads the configuration after `signals` SIGHUPs. `None` (logged) when it is refused:
/// the running configuration and source stay. A new source's clients are built here, before
/// anything is stopped, so unusable TLS material refuses the new configuration too.
fn reconfigure(
    overrides: &Overrides,
    cfg: &Config,
    source: &Source,
    signals: u64,
) -> Option<Change> {
    let new = match Config::load(overrides) {
        Ok(new) => new,
        Err(e) => {
            tracing::error!("SIGHUP: new configuration refused, keeping the running one: {e}");
            return None;
        }
    };
    if new.metrics_addr != cfg.metrics_addr {
        tracing::warn!("SIGHUP: a new metrics_addr takes effect at the next start");
    }
    if new.exec != cfg.exec {
        tracing::warn!("SIGHUP: the exec settings changed; they apply when confd is started again (the supervised process keeps running as it is)");
    }
    let source_change = if source.serves(&new) {
        None
    } else {
        match Prepared::new(&new) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::error!(
                    "SIGHUP: new configuration refused, keeping the running one: {e:#}"
                );
                return None;
            }
        }
    };
    if source_change.is_some() {
        tracing::info!(signals, "SIGHUP: configuration re-read; the store settings changed: restarting the source and the render loop");
    } else {
        tracing::info!(signals, "SIGHUP: configuration re-read; restarting the render loop (the store source and its long polls are kept)");
    }
    Some(Change {
        cfg: new,
        source: source_change,
    })
}

/// The ACME part after a reload to `cfg`: kept when its settings are the same and the source
/// was kept (`new_source` false), else stopped and started again on the current source. A
/// new one that cannot start (its challenge address taken) is logged, and confd runs without.
async fn reacme(
    running: Option<confd::acme::Running>,
    cfg: &Config,
    source: &Source,
    new_source: bool,
    telemetry: &Telemetry,
    certs: &tokio::sync::watch::Sender<confd::acme::Certificates>,
    shutdown: &Shutdown,
) -> Option<confd::acme::Running> {
    match (running, &cfg.acme) {
        (Some(r), Some(a)) if !new_source && r.runs(a) => return Some(r),
        (Some(r), _) => r.stop().await,
        (None, _) => {}
    }
    let a = cfg.acme.clone()?;
    tracing::info!("SIGHUP: (re)starting ACME with the new configuration");
    match confd::acme::Running::start(
        a,
        &cfg.backend,
        &cfg.store,
        source.handle().snapshots,
        telemetry,
        certs.clone(),
        shutdown,
    )
    .await
    {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!("SIGHUP: ACME not started: {e}");
            None
        }
    }
}

/// The next delivery of an optional signal stream; never, without one.
async fn recv(s: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

async fn stop(
    shutdown: &Shutdown,
    handle: tokio::task::JoinHandle<anyhow::Result<bool>>,
    source: Source,
    supervisor: Option<Supervisor>,
    sig: Signal,
) -> anyhow::Result<ExitCode> {
    tracing::info!("{sig}: shutting down");
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), source.stop()).await;
    let Some(s) = supervisor else {
        return Ok(ExitCode::SUCCESS);
    };
    Ok(match s.stop(sig).await {
        Some(st) => ExitCode::from(exec::exit_code(&st)),
        None => ExitCode::SUCCESS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        std::iter::once("confd")
            .chain(s.split_whitespace())
            .map(String::from)
            .collect()
    }

    fn normalise(argv: Vec<String>) -> Vec<String> {
        GoFlags::of(&Args::command()).normalise(argv)
    }

    #[test]
    fn accepts_confd_style_single_dash_flags() {
        let cases = [
            (
                "-backend consul://h:1 -onetime",
                "--backend=consul://h:1 --onetime",
            ),
            ("-config=c.yaml -noop", "--config=c.yaml --noop"),
            ("--config c.yaml --once", "--config=c.yaml --once"),
            ("-var k=-x -wait 1s", "--var=k=-x --wait=1s"),
            (
                "-exec nginx -metrics-addr 127.0.0.1:1 -log-format json",
                "--exec=nginx --metrics-addr=127.0.0.1:1 --log-format=json",
            ),
            // A value is never a flag, and an unknown flag is named whole.
            ("--template -once:b", "--template=-once:b"),
            ("-h -bogus", "-h --bogus"),
        ];
        for (input, want) in cases {
            assert_eq!(normalise(argv(input))[1..].join(" "), want, "{input}");
        }
        let a =
            Args::try_parse_from(normalise(argv("-backend consul://h:1 -onetime -noop"))).unwrap();
        assert!(a.once && a.dry_run);
        assert_eq!(a.backend.as_deref(), Some("consul://h:1"));
        let a = Args::try_parse_from(normalise(argv("-template -once:b -var k=-x"))).unwrap();
        assert_eq!(
            (a.templates, a.vars),
            (vec!["-once:b".into()], vec!["k=-x".into()])
        );
        let typed = argv("-noop -bogus");
        let e = Args::try_parse_from(normalise(typed.clone())).unwrap_err();
        let message = GoFlags::as_typed(&e.to_string(), &typed);
        assert!(message.contains("'-bogus'"), "{message}");
    }

    #[test]
    fn every_long_flag_is_normalised_from_its_single_dash_form() {
        let names = GoFlags::verify(&Args::command()).unwrap_or_else(|p| panic!("{p:#?}"));
        for flag in [
            "config", "backend", "onetime", "noop", "template", "version", "help",
        ] {
            assert!(names.iter().any(|n| n == flag), "-{flag}: {names:?}");
        }
    }
}
