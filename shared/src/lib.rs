//! Switchboard's shared library: what `registrator` and `confd` both need.
//!
//! - [`Service`] and [`Check`]: the service model a registrator writes and confd reads.
//! - [`RegistryUri`]: parsing of `consul://`, `consulkv://` and `etcd://` URIs.
//! - [`store`]: the Consul and etcd clients behind one [`Store`] enum.
//! - [`Backoff`]: retry pacing that races against shutdown.
//! - [`GoFlags`]: Go-style `-flag` command lines rewritten for clap, from clap's own arguments.
//! - [`validate`]: which service names and IDs every store accepts (checked once, here).
//! - [`excerpt()`]: untrusted values quoted in logs without megabyte lines.
//! - [`memory`]: how the heap returns memory (one glibc arena, trimming after bursts).
//! - [`telemetry`]: the `/metrics` + `/healthz` endpoint, health conditions, log setup.
//!
//! Modules are private; everything a caller needs is re-exported here.

mod backoff;
mod cli;
mod excerpt;
pub mod memory;
mod service;
pub mod store;
pub mod telemetry;
mod uri;
pub mod validate;

pub use backoff::Backoff;
pub use cli::GoFlags;
pub use excerpt::{excerpt, Excerpt, EXCERPT_CHARS};
pub use service::{consul_duration, Check, CheckKind, DockerHealth, Service};
pub use store::{Scope, Store, StoreError};
pub use tokio_util::sync::CancellationToken as Shutdown;
pub use uri::{Endpoint, RegistryUri, UriError};
pub use validate::ValidationError;

/// What `--version` prints after a binary's name: the release and the commit it was built
/// from (`SWITCHBOARD_COMMIT` at build time, else the checkout's HEAD, else `unknown`).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SWITCHBOARD_COMMIT"),
    ")"
);
