//! Log setup shared by both binaries: `RUST_LOG` for the level (default `info`), stderr,
//! and `--log-format text|json`.

use std::io::IsTerminal;

/// How log events are written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event (colours only on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log shippers: `timestamp`, `level`, `message`, `target`
    /// and the event's own fields at the top level.
    Json,
}

impl LogFormat {
    /// Parses `--log-format`'s value; the error is one line naming the flag.
    pub fn parse(value: &str) -> Result<LogFormat, String> {
        match value {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "invalid value {other:?} for --log-format: expected text or json"
            )),
        }
    }
}

/// Installs the process-wide subscriber: level from `RUST_LOG` (default `info`), events to
/// stderr in `format`. Call once, first thing after parsing arguments.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        // Flattened, so `message` and `level` are top-level keys as shippers expect; no span
        // context (we log no spans), and never ANSI colours inside JSON strings.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_ansi(false)
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(LogFormat::parse("json"), Ok(LogFormat::Json));
        assert_eq!(LogFormat::parse("text"), Ok(LogFormat::Text));
        let e = LogFormat::parse("yaml").unwrap_err();
        assert!(
            e.contains("--log-format") && e.contains("text or json"),
            "{e}"
        );
    }
}
