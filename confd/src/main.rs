//! `confd`: parses flags, sets up logging and signals, then runs [`confd::run`].
//!
//! SIGINT/SIGTERM cancel the run and exit 0. SIGHUP re-reads the config file (templates are
//! read from disk at every render anyway): a valid new config replaces the running one, an
//! invalid one is refused with its error and the old one keeps running.

use anyhow::Context;
use clap::Parser;
use confd::{Config, Overrides, RunOptions};
use std::path::PathBuf;
use std::process::ExitCode;
use switchboard::Shutdown;
use tokio::signal::unix::{signal, SignalKind};

/// Renders proxy configs from Consul or etcd through Handlebars templates.
#[derive(Debug, Parser)]
#[command(version, about)]
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
    #[arg(long)]
    once: bool,
    /// Print a unified diff per template to stdout; write nothing, run nothing.
    #[arg(long)]
    dry_run: bool,
    /// Quiescence window MIN[:MAX], e.g. 500ms:5s.
    #[arg(long)]
    wait: Option<String>,
    /// Template variable KEY=VALUE (exposed as `vars`). Repeatable.
    #[arg(long = "var")]
    vars: Vec<String>,
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
        }
    }
}

fn main() -> ExitCode {
    confd::memory::limit_arenas();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let overrides = args.overrides();
    let cfg = match Config::load(&overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("confd: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = RunOptions {
        once: args.once,
        dry_run: args.dry_run,
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("confd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(cfg, overrides, opts)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs until a terminating signal (or the end of a `--once` run), restarting the run with
/// the new configuration on SIGHUP.
async fn serve(mut cfg: Config, overrides: Overrides, opts: RunOptions) -> anyhow::Result<bool> {
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let shutdown = Shutdown::new();
    loop {
        let run_token = shutdown.child_token();
        let mut handle = tokio::spawn(confd::run(cfg.clone(), opts, run_token.clone()));
        loop {
            tokio::select! {
                _ = term.recv() => return stop(&shutdown, handle, "SIGTERM").await,
                _ = int.recv() => return stop(&shutdown, handle, "SIGINT").await,
                _ = hup.recv() => match Config::load(&overrides) {
                    Ok(new) => {
                        tracing::info!("SIGHUP: configuration re-read; restarting with it");
                        run_token.cancel();
                        let _ = handle.await;
                        cfg = new;
                        break;
                    }
                    Err(e) => tracing::error!(
                        "SIGHUP: new configuration refused, keeping the running one: {e}"
                    ),
                },
                r = &mut handle => return r.context("confd run panicked")?,
            }
        }
    }
}

async fn stop(
    shutdown: &Shutdown,
    handle: tokio::task::JoinHandle<anyhow::Result<bool>>,
    sig: &str,
) -> anyhow::Result<bool> {
    tracing::info!("{sig}: shutting down");
    shutdown.cancel();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), handle).await;
    Ok(true)
}
