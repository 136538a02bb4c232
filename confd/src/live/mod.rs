//! Live channels: ways to apply a membership-only change to a running proxy without a reload.
//!
//! A graceful reload still fails requests (old workers close idle keep-alive connections,
//! racing requests already sent on them), so when a new render differs from the file on disk
//! only in which peers a pool holds, confd writes the file and tells the running proxy the new
//! peers instead of reloading it. Each proxy's protocol lives in its own module; the runner
//! only calls [`LiveChannel::plan`], [`LiveChannel::apply`] and [`LiveChannel::after_reload`],
//! so it never learns a proxy's protocol and another proxy is one more variant.
//!
//! The rendered file stays the single source of truth: a channel only ever pushes what the
//! file it was given says, so a fresh start or a reload of the proxy serves the same peers.

use serde::Deserialize;
use std::time::Duration;

pub mod nginx_lua;

pub use nginx_lua::NginxLua;

/// A template's live channel, from its `live:` setting (e.g. `live: { nginx_lua: {} }`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "LiveConfig")]
pub enum LiveChannel {
    /// nginx upstreams balanced by Lua from a shared dict (see [`nginx_lua`]).
    NginxLua(NginxLua),
}

/// `live:` as written: a mapping with exactly one channel key. (serde_yaml 0.9 reads enums only
/// from `!tags`; a plain mapping reads like the rest of the file.)
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LiveConfig {
    #[serde(default)]
    nginx_lua: Option<NginxLua>,
}

impl TryFrom<LiveConfig> for LiveChannel {
    type Error = String;
    fn try_from(c: LiveConfig) -> Result<LiveChannel, String> {
        match c.nginx_lua {
            Some(n) => Ok(LiveChannel::NginxLua(n)),
            None => Err("live: expected one channel, e.g. `live: { nginx_lua: {} }`".into()),
        }
    }
}

/// What a channel will push for one membership-only change (built by [`LiveChannel::plan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LivePlan {
    /// The complete upstream → peers table for nginx.
    NginxLua(nginx_lua::Plan),
}

/// What a successful live update changed, for the log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Pools (upstreams, backends) whose membership changed.
    pub changed: Vec<String>,
    /// Pools the proxy now holds live peers for.
    pub pools: usize,
    /// Peers across those pools.
    pub peers: usize,
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
}

impl LiveChannel {
    /// Whether `new` differs from `old` (both rendered files) only in what a live update can
    /// carry; `None` means "not membership-only": render, check, swap and reload as usual.
    /// Pure.
    pub fn plan(&self, old: &str, new: &str) -> Option<LivePlan> {
        match self {
            LiveChannel::NginxLua(c) => c.plan(old, new).map(LivePlan::NginxLua),
        }
    }

    /// Sends `plan` to the running proxy. Called after the new file was checked and committed;
    /// on an error the runner reloads instead. Cancel-safe in effect: dropping it mid-request
    /// leaves the proxy with either the old or the new peer table.
    pub async fn apply(&self, plan: LivePlan) -> Result<Summary, LiveError> {
        match (self, plan) {
            (LiveChannel::NginxLua(c), LivePlan::NginxLua(p)) => c.apply(p).await,
        }
    }

    /// Runs after a successful normal reload onto `new`, so the live state the proxy keeps
    /// across reloads matches the file it just loaded. Failures are logged, never returned:
    /// the reload already did the work.
    pub async fn after_reload(&self, new: &str) {
        match self {
            LiveChannel::NginxLua(c) => c.after_reload(new).await,
        }
    }
}
