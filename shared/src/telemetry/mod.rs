//! What operators watch: `/metrics` and `/healthz` on `--metrics-addr`, and the log format.
//!
//! One owner for the parts both binaries share: the HTTP endpoint ([`TelemetryServer`]), the
//! health conditions it reports ([`Health`]), the `--healthcheck` client ([`probe`]) and the
//! log setup ([`init_logging`]). Each binary defines its own metric families (in its
//! `metrics` module) in a `prometheus-client` [`Registry`] and records them where things
//! happen.

mod health;
mod logs;
mod server;

pub use health::Health;
pub use logs::{init_logging, LogFormat};
pub use prometheus_client::registry::Registry;
pub use server::{healthcheck, parse_listen_addr, probe, TelemetryServer};
