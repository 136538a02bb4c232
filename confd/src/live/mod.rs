//! Ways for a change to reach a proxy without a reload.
//!
//! A reload costs something (HAProxy forks a new worker and keeps the old one for its
//! connections; nginx does the same with its workers), so when only the members of existing
//! upstreams changed, a live channel applies that change to the running proxy instead. The
//! rendered file is still written, so the file on disk always equals what a reload would
//! load, and the template stays the one source of truth: a channel only ever compares the old
//! and the new rendered file.
//!
//! The runner knows three calls and nothing of any proxy's protocol:
//! [`Live::plan`] (pure: `None` means "reload"), [`Live::apply`], and [`Live::after_reload`]
//! (run after a successful reload of that template's file). When `apply` fails the runner
//! reloads instead, which is always correct. A new kind of proxy is one more variant here and
//! one more module beside [`haproxy`].

pub mod haproxy;

use crate::duration;
use serde::Deserialize;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}

/// A template's `live:` section: which channel reaches its proxy, and how.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawLiveConfig")]
pub struct LiveConfig {
    /// The channel.
    pub channel: ChannelConfig,
    /// How long a removed server may keep serving its open connections before it is taken
    /// out anyway.
    pub drain_timeout: Duration,
}

/// One channel's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelConfig {
    /// HAProxy's runtime API on this admin stats socket (a unix socket path; the rendered
    /// config must open it with `stats socket <path> ... level admin`).
    Haproxy {
        /// The socket path.
        socket: PathBuf,
    },
}

/// `live:` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLiveConfig {
    #[serde(default)]
    haproxy_socket: Option<PathBuf>,
    #[serde(default = "default_drain_timeout", with = "duration::serde_text")]
    drain_timeout: Duration,
}

impl TryFrom<RawLiveConfig> for LiveConfig {
    type Error = String;

    fn try_from(r: RawLiveConfig) -> Result<LiveConfig, String> {
        let Some(socket) = r.haproxy_socket else {
            return Err("live needs a channel: expected haproxy_socket: <unix socket path>".into());
        };
        // `ipv4@host:port` and friends are HAProxy's TCP listeners: an admin socket on TCP
        // would let anyone who reaches the port rewrite the proxy, so only a path is taken.
        let text = socket.to_string_lossy();
        if let Some((prefix, _)) = text.split_once('@') {
            if !prefix.contains('/') {
                return Err(format!(
                    "haproxy_socket {text:?}: expected the path of a unix socket (no {prefix}@ address)"
                ));
            }
        }
        if text.is_empty() {
            return Err("haproxy_socket \"\": expected the path of a unix socket".into());
        }
        Ok(LiveConfig {
            channel: ChannelConfig::Haproxy { socket },
            drain_timeout: r.drain_timeout,
        })
    }
}

/// A template's live channel, alive for a whole run (it remembers servers still draining).
#[derive(Debug)]
pub enum Live {
    /// HAProxy's runtime API.
    Haproxy(haproxy::Haproxy),
}

/// What [`Live::plan`] decided; only [`Live::apply`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LivePlan(PlanKind);

#[derive(Debug, Clone, PartialEq, Eq)]
enum PlanKind {
    Haproxy(haproxy::Plan),
}

/// What an apply did, for the log line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Servers (peers) added.
    pub added: usize,
    /// Servers removed (draining from now on).
    pub removed: usize,
    /// Servers changed in place (address, port, weight, state).
    pub changed: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "+{} -{} ~{} servers",
            self.added, self.removed, self.changed
        )
    }
}

/// Why a live apply did not happen (the runner then reloads).
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// The proxy could not be reached, or did not answer in time.
    #[error("{target}: {reason}")]
    Unreachable {
        /// What was being talked to.
        target: String,
        /// The I/O error or timeout.
        reason: String,
    },
    /// The proxy refused a command.
    #[error("{target}: `{command}` refused: {answer}")]
    Refused {
        /// What was being talked to.
        target: String,
        /// The command.
        command: String,
        /// Its answer, on one line.
        answer: String,
    },
    /// The running proxy is not in the state the old file describes.
    #[error("{target}: running state differs from the file: {detail}")]
    Diverged {
        /// What was being talked to.
        target: String,
        /// The difference.
        detail: String,
    },
}

impl Live {
    /// The channel `cfg` describes. Background work (draining) stops with `shutdown`.
    pub fn new(cfg: &LiveConfig, shutdown: CancellationToken) -> Live {
        match &cfg.channel {
            ChannelConfig::Haproxy { socket } => {
                Live::Haproxy(haproxy::Haproxy::new(socket, cfg.drain_timeout, shutdown))
            }
        }
    }

    /// What to do at runtime to go from the `old` rendered file to the `new` one; `None` when
    /// that is not only membership, or not all of it can be done at runtime: reload. Pure.
    pub fn plan(&self, old: &str, new: &str) -> Option<LivePlan> {
        match self {
            Live::Haproxy(h) => h.plan(old, new).map(|p| LivePlan(PlanKind::Haproxy(p))),
        }
    }

    /// Applies a plan from [`Live::plan`] to the running proxy. Not cancel-safe: dropped
    /// midway, the proxy may hold part of the change (the next reload puts it right).
    pub async fn apply(&self, plan: LivePlan) -> Result<Summary, LiveError> {
        match (self, plan.0) {
            (Live::Haproxy(h), PlanKind::Haproxy(p)) => h.apply(p).await,
        }
    }

    /// Runs after the proxy was reloaded with the `new` file: a channel re-synchronises with
    /// the reloaded proxy here (HAProxy: wait until its new worker answers).
    pub async fn after_reload(&self, _new: &str) {
        match self {
            Live::Haproxy(h) => h.after_reload().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_section_parses_and_refuses_tcp_and_unknown_keys() {
        let ok: LiveConfig =
            serde_yaml::from_str("{ haproxy_socket: /run/haproxy/admin.sock, drain_timeout: 5s }")
                .unwrap();
        assert_eq!(
            ok.channel,
            ChannelConfig::Haproxy {
                socket: "/run/haproxy/admin.sock".into()
            }
        );
        assert_eq!(ok.drain_timeout, Duration::from_secs(5));
        let d: LiveConfig = serde_yaml::from_str("{ haproxy_socket: /a.sock }").unwrap();
        assert_eq!(d.drain_timeout, Duration::from_secs(30));
        for (text, want) in [
            ("{ haproxy_socket: ipv4@127.0.0.1:9999 }", "unix socket"),
            ("{ haproxy_sock: /a.sock }", "unknown field `haproxy_sock`"),
            ("{ drain_timeout: 5s }", "expected haproxy_socket"),
            (
                "{ haproxy_socket: /a, drain_timeout: soon }",
                "expected e.g. 500ms",
            ),
        ] {
            let e = serde_yaml::from_str::<LiveConfig>(text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn summary_reads_as_counts() {
        let s = Summary {
            added: 2,
            removed: 1,
            changed: 0,
        };
        assert_eq!(s.to_string(), "+2 -1 ~0 servers");
    }
}
