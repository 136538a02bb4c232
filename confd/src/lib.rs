//! confd: renders proxy configs from Consul or etcd through Handlebars templates, validates
//! them, swaps them in atomically and reloads the proxy.
//!
//! The pipeline, one module per stage: [`config`] (YAML + flags) → [`source`] (store watchers
//! publishing [`model::Snapshot`]s) → [`runner`] (quiescence, passes) → [`render`] (the render
//! engine, a folder of its own: the document templates see, built once per snapshot
//! ([`render::data`]), each template analysed once when parsed, Handlebars with confd's
//! helpers, loops that reuse what they wrote for unchanged entries, and the bounds every render
//! runs within) → [`writer`] (stage, swap, restore) → [`command`] (check and reload with
//! timeouts). [`watch`] re-renders when a template file changes. [`live`] applies
//! membership-only changes to a running proxy without a reload. [`exec`] supervises the proxy
//! itself (`--exec`). [`names`] holds the validation rules the model and the helpers share;
//! [`routes`] how an instance asks to be routed (protocol, path, port, weight) and the pools
//! those asks form; [`memory`] how the heap returns memory; [`metrics`] what `/metrics` reports.
//!
//! [`acme`] keeps a certificate for every virtual host in the store (automatic HTTPS).
//!
//! Between the render loop, the store sources, the metrics and the supervisor, imports run one
//! way, from the [`runner`] down: none imports a module that imports it back. Three cuts keep
//! it so:
//!
//! - What a pass did to a template is [`outcome`], a module of its own: the runner produces
//!   outcomes, [`metrics`] records them, and neither imports the other for it.
//! - [`metrics`] is given plain values (a template's paths, durations, counts) and outcomes,
//!   never the configuration's types, so anything may record into it. Its registry is a
//!   [`metrics::Telemetry`] handle, made once per process by confd's `main` and passed to the
//!   source, each run ([`RunOptions`]) and the supervisor; a process-wide global would be an
//!   import in disguise, from every module that records.
//! - The supervisor ([`exec`]) is reached through the [`exec::SupervisorHandle`] each run is
//!   handed in [`RunOptions`], not through a global. The runner reports its renders to it and
//!   sends a reload that is a signal through it, so [`command`] (check and reload commands)
//!   knows nothing of the supervisor, and the supervisor imports only the quoting from
//!   [`command`]. Signals themselves are a leaf, [`signal`], which the configuration, the
//!   commands and the supervisor all name.

pub mod acme;
pub mod certs;
pub mod command;
pub mod config;
pub mod duration;
pub mod exec;
pub mod live;
pub mod metrics;
pub mod model;
pub mod names;
pub mod outcome;
pub mod render;
pub mod routes;
pub mod runner;
pub mod signal;
pub mod source;
pub mod watch;
pub mod writer;

pub use config::{Config, ConfigError, Overrides};
pub use runner::{run, RunOptions};
/// How the heap returns memory: shared with registrator.
pub use switchboard::memory;
