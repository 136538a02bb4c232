//! Stores: where services are registered and read back.
//!
//! [`ConsulClient`] and [`EtcdClient`] are thin HTTP clients of each store's API (Consul's HTTP
//! API, etcd v3's JSON gateway). [`Store`] puts the registrator's operations (register,
//! deregister, list, refresh) over them, chosen at start from a [`RegistryUri`]; confd uses the
//! clients' read and watch calls directly.

mod consul;
mod etcd;

pub use consul::{ConsulClient, HealthEntry};
pub use etcd::{EtcdClient, KeyValue, RangeResult, WatchBatch, WatchEvent, WatchStream};

use crate::{RegistryUri, Service};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No answer: connection refused, reset or timed out. Retry later.
    #[error("{endpoint} unreachable: {reason}")]
    Unreachable {
        /// Which endpoint (base URL).
        endpoint: String,
        /// The transport error, flattened to one line.
        reason: String,
    },
    /// The store answered with an HTTP error.
    #[error("{endpoint} answered {status} to {what}: {body}")]
    Status {
        /// Which endpoint (base URL).
        endpoint: String,
        /// What was asked (method and path).
        what: String,
        /// HTTP status code.
        status: u16,
        /// The first line of the body.
        body: String,
    },
    /// etcd compacted away the revision a watch wanted to resume from: re-list.
    #[error("etcd revision {requested} was compacted (oldest kept {compact_revision}); re-list needed")]
    Compacted {
        /// Revision asked for.
        requested: i64,
        /// Oldest revision still available.
        compact_revision: i64,
    },
    /// A TTL lease or check the store no longer knows: registrations must be written again.
    #[error("{what} expired or unknown to the store")]
    Expired {
        /// Which lease or check.
        what: String,
    },
    /// The store's answer could not be decoded.
    #[error("cannot decode {what}: {reason}")]
    Decode {
        /// What was being decoded.
        what: String,
        /// Why it failed.
        reason: String,
    },
}

/// The registrator's view of a store.
///
/// Every method is a complete request/response exchange, so all are cancel-safe in the sense
/// that dropping one leaves no client state half-updated; the store itself may or may not have
/// applied a dropped write, which is why callers re-list rather than trust their own bookkeeping
/// after an error.
#[derive(Debug, Clone)]
pub enum Store {
    /// `consul://`: agent services with checks.
    Consul(ConsulClient),
    /// `consulkv://`: `<prefix>/<name>/<id>` = `ip:port`.
    ConsulKv {
        /// The agent.
        client: ConsulClient,
        /// Key prefix, no leading or trailing `/`.
        prefix: String,
    },
    /// `etcd://`: `/<prefix>/<name>/<id>` = service JSON, optionally under a TTL lease.
    Etcd {
        /// The members.
        client: EtcdClient,
        /// Key prefix, no leading or trailing `/`.
        prefix: String,
    },
}

impl Store {
    /// A store for this URI. `CONSUL_HTTP_TOKEN` is sent to Consul when set.
    pub fn new(uri: &RegistryUri) -> Store {
        todo!("{uri:?}")
    }

    /// A short name for logs: `consul`, `consulkv` or `etcd`.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Consul(_) => "consul",
            Store::ConsulKv { .. } => "consulkv",
            Store::Etcd { .. } => "etcd",
        }
    }

    /// Checks the store answers (Consul: agent self; etcd: a range on the prefix).
    pub async fn ping(&self) -> Result<(), StoreError> {
        todo!()
    }

    /// Registers `svc`, replacing any registration with the same ID. Idempotent.
    ///
    /// With `svc.ttl` set: Consul gets an extra TTL check (`service:<id>:ttl`, deregistered
    /// after it has been critical for a while); etcd puts the key under this store's lease,
    /// granting one if none is held.
    pub async fn register(&self, svc: &Service) -> Result<(), StoreError> {
        todo!("{svc:?}")
    }

    /// Removes `svc` (by ID, and by name where the key needs it). Removing what is not there is
    /// not an error.
    pub async fn deregister(&self, svc: &Service) -> Result<(), StoreError> {
        todo!("{svc:?}")
    }

    /// Every registration whose ID starts with `id_prefix` (the registrator passes
    /// `<hostname>:`). Only `id`, `name`, `address` and `port` are guaranteed to be filled.
    pub async fn list(&self, id_prefix: &str) -> Result<Vec<Service>, StoreError> {
        todo!("{id_prefix}")
    }

    /// Keeps TTL registrations alive: passes each service's TTL check (Consul) or keeps the
    /// lease alive (etcd). Returns [`StoreError::Expired`] when the store no longer knows the
    /// check or lease, so the caller registers everything again.
    pub async fn refresh(&self, services: &[Service]) -> Result<(), StoreError> {
        todo!("{services:?}")
    }
}
