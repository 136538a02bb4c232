//! Live channels: ways to apply a membership-only change to a running proxy without a reload.
//!
//! A graceful reload still fails requests (old workers close idle keep-alive connections,
//! racing requests already sent on them), and costs a new worker process each time, so when a
//! new render differs from the file on disk only in which peers a pool holds, confd writes the
//! file and tells the running proxy the new peers instead of reloading it. Each proxy's
//! protocol lives in its own module ([`nginx_lua`], [`haproxy`]); the runner only calls
//! [`LiveChannel::plan`], [`LiveChannel::apply`], [`LiveChannel::before_reload`] and
//! [`LiveChannel::after_reload`], so it never learns a proxy's protocol and another proxy is
//! one more variant. The reloads that remain (structural changes) go through the channel too,
//! so that they fail no request either: see [`LiveChannel::before_reload`].
//!
//! The rendered file stays the single source of truth: a channel only ever applies what the
//! files it was given say, so a fresh start or a reload of the proxy serves the same peers.

use serde::Deserialize;
use std::fmt;
use std::time::Duration;

pub mod haproxy;
pub mod nginx_lua;

pub use haproxy::Haproxy;
pub use nginx_lua::NginxLua;

/// A template's live channel, from its `live:` setting (e.g. `live: { nginx_lua: {} }` or
/// `live: { haproxy: { socket: /run/haproxy/admin.sock } }`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "LiveConfig")]
pub enum LiveChannel {
    /// nginx upstreams balanced by Lua from a shared dict (see [`nginx_lua`]).
    NginxLua(NginxLua),
    /// HAProxy's runtime API on its admin socket (see [`haproxy`]).
    Haproxy(Haproxy),
}

/// `live:` as written: a mapping with exactly one channel key. (serde_yaml 0.9 reads enums only
/// from `!tags`; a plain mapping reads like the rest of the file.)
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LiveConfig {
    #[serde(default)]
    nginx_lua: Option<NginxLua>,
    #[serde(default)]
    haproxy: Option<Haproxy>,
}

impl TryFrom<LiveConfig> for LiveChannel {
    type Error = String;
    fn try_from(c: LiveConfig) -> Result<LiveChannel, String> {
        match (c.nginx_lua, c.haproxy) {
            (Some(n), None) => Ok(LiveChannel::NginxLua(n)),
            (None, Some(h)) => Ok(LiveChannel::Haproxy(h)),
            (None, None) => Err(
                "live: expected one channel, e.g. `live: { nginx_lua: {} }` or `live: { haproxy: { socket: PATH } }`"
                    .into(),
            ),
            (Some(_), Some(_)) => {
                Err("live: expected one channel, found both nginx_lua and haproxy".into())
            }
        }
    }
}

/// What a channel will push for one membership-only change (built by [`LiveChannel::plan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LivePlan {
    /// The complete upstream → peers table for nginx.
    NginxLua(nginx_lua::Plan),
    /// Server changes for HAProxy.
    Haproxy(haproxy::Plan),
}

/// What a successful live update changed, for the log line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Pools (upstreams, backends) whose membership changed.
    pub changed: Vec<String>,
    /// Pools the proxy now holds live peers for.
    pub pools: usize,
    /// Peers across those pools.
    pub peers: usize,
    /// Peers (servers) added.
    pub added: usize,
    /// Peers removed (HAProxy: draining from now on, deleted when done).
    pub removed: usize,
    /// Peers changed in place (HAProxy: address, port, weight or state).
    pub updated: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "+{} -{} ~{} servers",
            self.added, self.removed, self.updated
        )
    }
}

/// Why a live update was not applied. The runner then falls back to a reload, so none of these
/// is fatal; each is one line naming the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// The endpoint could not be reached (proxy not running, wrong socket path, I/O error).
    #[error("cannot reach {endpoint}: {reason}")]
    Unreachable {
        /// The endpoint (a socket path).
        endpoint: String,
        /// The I/O error.
        reason: String,
    },
    /// The endpoint did not answer in time.
    #[error("{endpoint} did not answer within {after:?}")]
    Timeout {
        /// The endpoint.
        endpoint: String,
        /// The time limit.
        after: Duration,
    },
    /// The update was not sent: it holds something the proxy's side would refuse.
    #[error("{endpoint}: not sent: {reason}")]
    Invalid {
        /// The endpoint.
        endpoint: String,
        /// What is wrong, naming the pool or peer.
        reason: String,
    },
    /// The proxy answered but did not accept the update.
    #[error("{endpoint} refused the update: {reason}")]
    Refused {
        /// The endpoint.
        endpoint: String,
        /// Its answer (status and first line).
        reason: String,
    },
    /// The running proxy is not in the state the old file describes, so a delta on it would
    /// not give the new file's state.
    #[error("{endpoint}: running state differs from the file: {detail}")]
    Diverged {
        /// The endpoint.
        endpoint: String,
        /// The difference.
        detail: String,
    },
}

impl LiveChannel {
    /// Whether `new` differs from `old` (both rendered files) only in what a live update can
    /// carry; `None` means "not membership-only": render, check, swap and reload as usual.
    /// Pure.
    pub fn plan(&self, old: &str, new: &str) -> Option<LivePlan> {
        match self {
            LiveChannel::NginxLua(c) => c.plan(old, new).map(LivePlan::NginxLua),
            LiveChannel::Haproxy(c) => c.plan(old, new).map(LivePlan::Haproxy),
        }
    }

    /// Sends `plan` to the running proxy. Called after the new file was checked and committed;
    /// on an error the runner reloads instead. nginx: cancel-safe in effect (dropping it
    /// mid-request leaves the proxy with either the old or the new peer table). HAProxy: not
    /// cancel-safe (dropped midway, the proxy may hold part of the change; the next reload
    /// puts it right).
    pub async fn apply(&self, plan: LivePlan) -> Result<Summary, LiveError> {
        match (self, plan) {
            (LiveChannel::NginxLua(c), LivePlan::NginxLua(p)) => c.apply(p).await,
            (LiveChannel::Haproxy(c), LivePlan::Haproxy(p)) => c.apply(p).await,
            (c, p) => unreachable!("plan {p:?} from another channel than {c:?}"),
        }
    }

    /// Runs right before the proxy is reloaded (`reload_timeout`: the reload's time limit),
    /// and returns once the reload may go: a graceful reload closes the old workers' idle
    /// keep-alive client connections, racing a request a client is just sending on one, so
    /// the proxy first stops keeping client connections idle. nginx: every response says
    /// `Connection: close` for a moment, which this waits out (see
    /// [`NginxLua::before_reload`]). HAProxy: nothing to do, since its old process answers
    /// an idle connection's next request before closing it (`option idle-close-on-response`
    /// in the shipped template). Failures are logged, never returned: the reload goes on.
    pub async fn before_reload(&self, reload_timeout: Duration) {
        match self {
            LiveChannel::NginxLua(c) => c.before_reload(reload_timeout).await,
            LiveChannel::Haproxy(_) => {}
        }
    }

    /// Puts renewed certificates (`renewed`, pairs of `all` served before under the same name
    /// and file, see [`crate::certs::renewed`]) into the running proxy, which then needs no
    /// reload for them: the rendered file does not change for a renewal, and the PEM files in
    /// `serve_dir` already hold the new pairs (what a start or reload reads). HAProxy: `set ssl
    /// cert` and `commit ssl cert` per renewed pair. nginx: the whole table of `all` to its
    /// certificates endpoint. On an error the caller reloads the proxy instead. Not
    /// cancel-safe (dropped midway, the proxy may hold part of the renewals; a reload puts
    /// it right).
    pub async fn certs_renewed(
        &self,
        renewed: &[std::sync::Arc<crate::certs::Pair>],
        all: &crate::certs::CertSet,
    ) -> Result<(), LiveError> {
        match self {
            LiveChannel::NginxLua(c) => c.certs_renewed(all).await,
            LiveChannel::Haproxy(c) => c.certs_renewed(renewed).await,
        }
    }

    /// Runs after a successful normal reload onto `new`, so the live state the proxy keeps
    /// across reloads matches the file it just loaded. Failures are logged, never returned:
    /// the reload already did the work.
    pub async fn after_reload(&self, new: &str) {
        match self {
            LiveChannel::NginxLua(c) => c.after_reload(new).await,
            LiveChannel::Haproxy(c) => c.after_reload(new).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_names_exactly_one_channel() {
        let h: LiveChannel = serde_yaml::from_str(
            "{ haproxy: { socket: /run/haproxy/admin.sock, drain_timeout: 5s } }",
        )
        .unwrap();
        let LiveChannel::Haproxy(h) = h else {
            panic!("{h:?}")
        };
        assert_eq!(
            h.socket,
            std::path::PathBuf::from("/run/haproxy/admin.sock")
        );
        assert_eq!(h.drain_timeout, Duration::from_secs(5));
        let d: LiveChannel = serde_yaml::from_str("{ haproxy: { socket: /a.sock } }").unwrap();
        assert!(matches!(d, LiveChannel::Haproxy(h) if h.drain_timeout == Duration::from_secs(30)));
        for (text, want) in [
            (
                "{ haproxy: { socket: ipv4@127.0.0.1:9999 } }",
                "unix socket",
            ),
            (
                "{ haproxy: { socket: /a, sock: /b } }",
                "unknown field `sock`",
            ),
            ("{ haproxy: {} }", "missing field `socket`"),
            (
                "{ haproxy: { socket: /a, drain_timeout: soon } }",
                "expected e.g. 500ms",
            ),
            ("{}", "expected one channel"),
            ("{ haproxy: { socket: /a }, nginx_lua: {} }", "found both"),
        ] {
            let e = serde_yaml::from_str::<LiveChannel>(text)
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
            ..Summary::default()
        };
        assert_eq!(s.to_string(), "+2 -1 ~0 servers");
    }
}
