//! Consul's HTTP API: agent service registration, KV, catalog and health (blocking queries).

use super::StoreError;
use crate::{Endpoint, Service};
use std::collections::BTreeMap;
use std::time::Duration;

/// A client of one Consul agent.
#[derive(Debug, Clone)]
pub struct ConsulClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// One instance of a service as `/v1/health/service/<name>` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthEntry {
    /// The registered service (check is `None`).
    pub service: Service,
    /// Node name the instance is registered on.
    pub node: String,
    /// Aggregate status of its checks: `passing`, `warning` or `critical`.
    pub status: String,
}

impl ConsulClient {
    /// A client of the agent at `endpoint`, sending `token` as `X-Consul-Token` when set.
    pub fn new(endpoint: &Endpoint, token: Option<String>) -> Self {
        todo!("{endpoint:?} {token:?}")
    }

    /// The agent's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// `GET /v1/agent/self`: does the agent answer?
    pub async fn agent_self(&self) -> Result<(), StoreError> {
        todo!()
    }

    /// `PUT /v1/agent/service/register` with the service and its checks.
    pub async fn agent_register(&self, svc: &Service) -> Result<(), StoreError> {
        todo!("{svc:?}")
    }

    /// `PUT /v1/agent/service/deregister/<id>`; an unknown ID is not an error.
    pub async fn agent_deregister(&self, id: &str) -> Result<(), StoreError> {
        todo!("{id}")
    }

    /// `GET /v1/agent/services`.
    pub async fn agent_services(&self) -> Result<Vec<Service>, StoreError> {
        todo!()
    }

    /// `PUT /v1/agent/check/pass/<check_id>`; an unknown check is [`StoreError::Expired`].
    pub async fn agent_check_pass(&self, check_id: &str) -> Result<(), StoreError> {
        todo!("{check_id}")
    }

    /// `PUT /v1/kv/<key>`.
    pub async fn kv_put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        todo!("{key} {value:?}")
    }

    /// `DELETE /v1/kv/<key>`.
    pub async fn kv_delete(&self, key: &str) -> Result<(), StoreError> {
        todo!("{key}")
    }

    /// `GET /v1/kv/<prefix>?recurse` as a blocking query: keys and values under `prefix`, and
    /// the index to pass next time. `index` 0 returns at once.
    pub async fn kv_list(
        &self,
        prefix: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(BTreeMap<String, Vec<u8>>, u64), StoreError> {
        todo!("{prefix} {index} {wait:?}")
    }

    /// `GET /v1/catalog/services` as a blocking query: service names with their tags.
    pub async fn catalog_services(
        &self,
        index: u64,
        wait: Duration,
    ) -> Result<(BTreeMap<String, Vec<String>>, u64), StoreError> {
        todo!("{index} {wait:?}")
    }

    /// `GET /v1/health/service/<name>` as a blocking query, optionally `?passing`.
    pub async fn health_service(
        &self,
        name: &str,
        passing_only: bool,
        index: u64,
        wait: Duration,
    ) -> Result<(Vec<HealthEntry>, u64), StoreError> {
        todo!("{name} {passing_only} {index} {wait:?}")
    }
}
