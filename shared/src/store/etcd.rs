//! etcd v3 through its JSON gateway (`/v3/kv/*`, `/v3/lease/*`, `/v3/watch`), with failover
//! between members. Keys and values are base64 on the wire; this module hides that.

use super::StoreError;
use crate::Endpoint;
use std::time::Duration;

/// A client of an etcd cluster: requests go to the current member and move to the next one
/// when it does not answer.
#[derive(Debug, Clone)]
pub struct EtcdClient {
    http: reqwest::Client,
    endpoints: Vec<Endpoint>,
}

/// One key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key, as text.
    pub key: String,
    /// The raw value.
    pub value: Vec<u8>,
    /// Revision of the last change to this key.
    pub mod_revision: i64,
    /// Lease the key is attached to (0 for none).
    pub lease: i64,
}

/// The answer to a prefix range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeResult {
    /// Keys in order.
    pub kvs: Vec<KeyValue>,
    /// Store revision the range was read at; a watch resumes from `revision + 1`.
    pub revision: i64,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// Key created or changed.
    Put(KeyValue),
    /// Key deleted (or its lease expired).
    Delete {
        /// The key.
        key: String,
        /// Revision of the deletion.
        mod_revision: i64,
    },
}

/// Events delivered together by one watch response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    /// Header revision of the response.
    pub revision: i64,
    /// The changes, in order.
    pub events: Vec<WatchEvent>,
}

/// A running watch (one streamed HTTP response).
pub struct WatchStream {
    _private: (),
}

impl WatchStream {
    /// The next batch of events. `Ok(None)` when the stream ended (reconnect and resume from
    /// the last revision + 1); [`StoreError::Compacted`] when the start revision is gone.
    ///
    /// Cancel-safe: a batch is only consumed from the buffer once it is returned.
    pub async fn next(&mut self) -> Result<Option<WatchBatch>, StoreError> {
        todo!()
    }
}

impl EtcdClient {
    /// A client trying `endpoints` in order.
    pub fn new(endpoints: Vec<Endpoint>) -> Self {
        todo!("{endpoints:?}")
    }

    /// `POST /v3/kv/put`, optionally attached to `lease`. Returns the new revision.
    pub async fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<i64, StoreError> {
        todo!("{key} {value:?} {lease:?}")
    }

    /// `POST /v3/kv/deleterange` of one key.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        todo!("{key}")
    }

    /// `POST /v3/kv/range` of every key starting with `prefix`.
    pub async fn range_prefix(&self, prefix: &str) -> Result<RangeResult, StoreError> {
        todo!("{prefix}")
    }

    /// `POST /v3/lease/grant`: a new lease with this TTL. Returns its ID.
    pub async fn lease_grant(&self, ttl: Duration) -> Result<i64, StoreError> {
        todo!("{ttl:?}")
    }

    /// `POST /v3/lease/keepalive`: renews the lease; [`StoreError::Expired`] if it is gone.
    pub async fn lease_keepalive(&self, id: i64) -> Result<(), StoreError> {
        todo!("{id}")
    }

    /// `POST /v3/lease/revoke`: drops the lease and every key attached to it.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), StoreError> {
        todo!("{id}")
    }

    /// `POST /v3/watch` on every key starting with `prefix`, from `start_revision` (0: now).
    pub async fn watch_prefix(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<WatchStream, StoreError> {
        todo!("{prefix} {start_revision}")
    }
}
