//! Switchboard's shared library: what `registrator` and `confd` both need.
//!
//! - [`Service`] and [`Check`]: the service model a registrator writes and confd reads.
//! - [`RegistryUri`]: parsing of `consul://`, `consulkv://` and `etcd://` URIs.
//! - [`store`]: the Consul and etcd clients behind one [`Store`] enum.
//! - [`Backoff`]: retry pacing that races against shutdown.
//!
//! Modules are private; everything a caller needs is re-exported here.

mod backoff;
mod service;
pub mod store;
mod uri;

pub use backoff::Backoff;
pub use service::{consul_duration, Check, CheckKind, Service};
pub use store::{Store, StoreError};
pub use tokio_util::sync::CancellationToken as Shutdown;
pub use uri::{Endpoint, RegistryUri, UriError};
