//! confd: renders proxy configs from Consul or etcd through Handlebars templates, validates
//! them, swaps them in atomically and reloads the proxy.
//!
//! The pipeline, one module per stage: [`config`] (YAML + flags) → [`source`] (store watchers
//! publishing [`model::Snapshot`]s) → [`runner`] (quiescence, passes) → [`data`] (the
//! document templates see, once per snapshot) → [`render`] with [`helpers`] and [`each`]
//! (loops that reuse what they wrote for unchanged entries) → [`writer`]
//! (stage, swap, restore) → [`command`] (check and reload with timeouts). [`watch`] re-renders
//! when a template file changes. [`live`] applies membership-only changes to a running proxy
//! without a reload. [`exec`] supervises the proxy itself (`--exec`). [`names`] holds the
//! validation rules the model and the helpers share; [`memory`] how the heap returns memory;
//! [`metrics`] what `/metrics` reports.

pub mod command;
pub mod config;
pub mod data;
pub mod duration;
pub mod each;
pub mod exec;
pub mod helpers;
pub mod live;
pub mod metrics;
pub mod model;
pub mod names;
pub mod outcome;
pub mod render;
pub mod runner;
pub mod signal;
pub mod source;
pub mod stream;
pub mod watch;
pub mod writer;

pub use config::{Config, ConfigError, Overrides};
pub use runner::{run, RunOptions};
/// How the heap returns memory: shared with registrator.
pub use switchboard::memory;
