//! The `registrator` binary: arguments, logging and signals; the work is `registrator::run`.

use switchboard::telemetry::LogFormat;
use switchboard::Shutdown;
use tokio::signal::unix::{signal, SignalKind};

fn main() {
    // Before any thread starts: one heap arena (see `switchboard::memory`).
    switchboard::memory::limit_arenas();
    if let Some(url) = registrator::healthcheck_url(std::env::args()) {
        std::process::exit(
            if switchboard::telemetry::healthcheck("registrator", &url) {
                0
            } else {
                1
            },
        );
    }
    let hostname = match registrator::hostname() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("registrator: cannot read this host's name: {e}");
            std::process::exit(1);
        }
    };
    let config = match registrator::parse(std::env::args(), &hostname) {
        Ok(c) => c,
        Err(exit) => {
            if exit.code == 0 {
                println!("{}", exit.message.trim_end());
            } else {
                eprintln!("registrator: {}", exit.message);
            }
            std::process::exit(exit.code);
        }
    };
    let log_format = config.log_format;
    switchboard::telemetry::init_logging(log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("registrator: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async {
        let shutdown = Shutdown::new();
        install_signal_handlers(shutdown.clone())?;
        registrator::run(config, shutdown).await
    });
    if let Err(e) = result {
        // With JSON logs a shipper reads stderr line by line: the last line is JSON too.
        match log_format {
            LogFormat::Json => tracing::error!("{e:#}"),
            LogFormat::Text => eprintln!("registrator: {e:#}"),
        }
        std::process::exit(1);
    }
}

/// SIGTERM or SIGINT starts a graceful shutdown (exit 0; registrations stay for the next
/// registrator unless --deregister-on-exit); a second one exits at once, for when the store
/// does not answer and the deregistrations are not worth waiting for.
fn install_signal_handlers(shutdown: Shutdown) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        for n in 0.. {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if n == 0 {
                tracing::info!("signal received; exiting");
                shutdown.cancel();
            } else {
                tracing::warn!("second signal; exiting without waiting");
                std::process::exit(1);
            }
        }
    });
    Ok(())
}
