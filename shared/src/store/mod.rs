//! Stores: where services are registered and read back.
//!
//! [`ConsulClient`] and [`EtcdClient`] are thin HTTP clients of each store's API (Consul's HTTP
//! API, etcd v3's JSON gateway). [`Store`] puts the registrator's operations (register,
//! deregister, list, refresh) over them, chosen at start from a [`RegistryUri`]; confd uses the
//! clients' read and watch calls directly.

mod consul;
mod etcd;
mod settings;

pub use consul::{BlockingIndex, ConsulClient, HealthEntry};
pub use etcd::{EtcdClient, KeyValue, RangeResult, WatchBatch, WatchEvent, WatchStream};
pub use settings::{
    etcd_user, Credentials, EtcdUser, Secret, SettingsError, StoreSettings, TlsSettings,
};

use crate::validate::{self, ValidationError};
use crate::{RegistryUri, Service};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

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
    /// The TLS handshake failed: the server's certificate did not verify against the trusted
    /// CA, or the server refused this client's certificate (or its absence).
    #[error("{endpoint}: TLS failed: {reason}")]
    Tls {
        /// Which endpoint (base URL).
        endpoint: String,
        /// What failed, on one line.
        reason: String,
    },
    /// The store refused the credentials or their rights: a Consul ACL token without the
    /// permission (403), unknown etcd credentials or an etcd role without the key (401, 403).
    #[error("{endpoint} denied {what}: {reason}")]
    Denied {
        /// Which endpoint (base URL).
        endpoint: String,
        /// What was asked (method and path).
        what: String,
        /// What the store said, first line (never the token).
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
    #[error(
        "etcd revision {requested} was compacted (oldest kept {compact_revision}); re-list needed"
    )]
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
    /// Refused before sending: a name or ID no store can hold and address again
    /// (see [`crate::validate`]).
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

/// Whom a failure concerns: see [`StoreError::scope`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Only the item the request was about (one registration, one service's health): the
    /// store is up and answering; other items go on. Retrying the same request will most
    /// likely fail the same way, so it is retried slowly, never in the way of the others.
    Item,
    /// The store as a whole: unreachable, timing out, without a leader, overloaded. Nothing
    /// else will succeed either, so pausing everything (and keeping the last good state) is
    /// right.
    Store,
}

/// Phrases of a 500 answer that mean the cluster cannot serve anything right now, rather than
/// "this request is wrong". Consul and etcd put their reasons in the body (Consul 1.8 answers
/// 500 for both kinds); matched case-insensitively. Anything else in a 500 is about the item:
/// Consul's `Scripts are disabled on this agent` to one registration's script check was taken
/// for an outage and stalled every other registration (issue 10).
const STORE_WIDE_PHRASES: &[&str] = &[
    "no cluster leader",
    "no leader",
    "leadership lost",
    "leader changed",
    "no path to datacenter",
    "no known consul servers",
    "raft",
    "not ready to serve",
    "rate limit",
    "too many requests",
    "timed out",
    "timeout",
    "deadline exceeded",
    "connection refused",
    "connection reset",
    "eof",
    "shutdown",
    "shutting down",
    "unavailable",
];

impl StoreError {
    /// Whether this failure concerns only the item asked about, or the whole store.
    ///
    /// The rule: a failure is store-wide when the store could not be asked or could not
    /// answer anything: no connection, a timeout ([`StoreError::Unreachable`]); 408, 429, 502,
    /// 503 and 504; a 500 whose body names a cluster-wide cause (`STORE_WIDE_PHRASES`: no
    /// leader, raft, rate limits, timeouts); a lost lease or compacted watch, which concern
    /// every registration or the whole watch. Everything else is an answer about the one
    /// item: any other 4xx (a 400 for a name Consul cannot route, 403 from an ACL policy that
    /// covers some names and not others, 413 for a too large value), any other 5xx (500
    /// `Scripts are disabled on this agent`), an answer we cannot decode (the store answered;
    /// what it said about this item is unusable) and a name or ID refused before sending.
    ///
    /// The scope describes the request. A request that covers everything (a listing, the
    /// catalog, a watch on the whole prefix) has no "other items", so its caller treats any
    /// failure as store-wide whatever this says.
    ///
    /// Misjudging in each direction has a different cost, which is why unknown 5xx answers
    /// count as item failures: an item failure taken for an outage stalls every other item
    /// until the bad one is gone (the bug this answers); an outage taken for item failures
    /// only costs a warning per item while the store is down, and the store-wide failures
    /// that come with it (connections refused, timeouts, 503) still pause everything.
    pub fn scope(&self) -> Scope {
        match self {
            StoreError::Unreachable { .. }
            | StoreError::Tls { .. }
            | StoreError::Expired { .. }
            | StoreError::Compacted { .. } => Scope::Store,
            StoreError::Status { status, body, .. } => status_scope(*status, body),
            StoreError::Decode { .. } | StoreError::Invalid(_) | StoreError::Denied { .. } => {
                Scope::Item
            }
        }
    }

    /// `true` when only the item asked about is concerned (see [`StoreError::scope`]).
    pub fn is_item_failure(&self) -> bool {
        self.scope() == Scope::Item
    }
}

/// The scope of an HTTP error answer (see [`StoreError::scope`]).
fn status_scope(status: u16, body: &str) -> Scope {
    match status {
        408 | 429 | 502 | 503 | 504 => Scope::Store,
        // etcd's gateway reports a broken watch in-stream with status 200.
        200 | 500 => {
            let body = body.to_ascii_lowercase();
            if STORE_WIDE_PHRASES.iter().any(|p| body.contains(p)) {
                Scope::Store
            } else {
                Scope::Item
            }
        }
        _ => Scope::Item,
    }
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
        /// The lease TTL registrations are attached to; granted on first use, replaced when
        /// the store reports it gone.
        lease: Arc<Mutex<Option<i64>>>,
    },
}

impl Store {
    /// A store for this URI with no TLS material or credentials beyond the URI (public web
    /// roots for HTTPS). The binaries use [`Store::with_settings`].
    pub fn new(uri: &RegistryUri) -> Store {
        Store::with_settings(uri, &StoreSettings::default())
            .expect("a client without TLS files always builds")
    }

    /// A store for this URI, reached with `settings` (see [`StoreSettings::from_env`]).
    /// Fails, naming the file or setting, when TLS material cannot be read or used.
    pub fn with_settings(
        uri: &RegistryUri,
        settings: &StoreSettings,
    ) -> Result<Store, SettingsError> {
        Ok(match uri {
            RegistryUri::Consul { endpoint } => {
                Store::Consul(ConsulClient::with_settings(endpoint, settings)?)
            }
            RegistryUri::ConsulKv { endpoint, prefix } => Store::ConsulKv {
                client: ConsulClient::with_settings(endpoint, settings)?,
                prefix: prefix.clone(),
            },
            RegistryUri::Etcd { endpoints, prefix } => Store::Etcd {
                client: EtcdClient::with_settings(endpoints.clone(), settings)?,
                prefix: prefix.clone(),
                lease: Arc::new(Mutex::new(None)),
            },
        })
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
        match self {
            // Not `/v1/agent/self`: it needs `agent:read`, which a registrator's token
            // (service:write, node:read) need not have. The service list needs no particular
            // right (Consul filters it) but still checks the token is known and TLS works.
            Store::Consul(c) | Store::ConsulKv { client: c, .. } => {
                c.agent_services().await.map(|_| ())
            }
            Store::Etcd { client, prefix, .. } => {
                client.range_prefix(&etcd_dir(prefix)).await.map(|_| ())
            }
        }
    }

    /// Registers `svc`, replacing any registration with the same ID. Idempotent.
    ///
    /// With `svc.ttl` set: Consul gets an extra TTL check ([`ttl_check_id`]); etcd puts the
    /// key under this store's lease, granting one if none is held.
    ///
    /// A name or ID [`validate`] refuses (except an empty one, which the store refuses itself)
    /// is [`StoreError::Invalid`] and nothing is sent: once written, such a registration
    /// could not be removed again (Consul answers 405 to deregistering `..`) or would sit
    /// outside the key prefix.
    pub async fn register(&self, svc: &Service) -> Result<(), StoreError> {
        guard(validate::service_name(&svc.name))?;
        guard(validate::service_id(&svc.id))?;
        match self {
            Store::Consul(c) => c.agent_register(svc).await,
            Store::ConsulKv { client, prefix } => {
                client
                    .kv_put(&consulkv_key(prefix, svc), svc.addr().as_bytes())
                    .await
            }
            Store::Etcd {
                client,
                prefix,
                lease,
            } => {
                let lease_id = match svc.ttl {
                    None => None,
                    Some(ttl) => {
                        let mut held = lease.lock().await;
                        match *held {
                            Some(id) => Some(id),
                            None => {
                                let id = client.lease_grant(ttl).await?;
                                *held = Some(id);
                                Some(id)
                            }
                        }
                    }
                };
                let value = serde_json::to_vec(&EtcdValue::from(svc)).expect("service JSON");
                client
                    .put(&etcd_key(prefix, svc), &value, lease_id)
                    .await
                    .map(|_| ())
            }
        }
    }

    /// Removes `svc` (by ID, and by name where the key needs it). Removing what is not there is
    /// not an error. An invalid name or ID is [`StoreError::Invalid`], as for [`Store::register`].
    pub async fn deregister(&self, svc: &Service) -> Result<(), StoreError> {
        guard(validate::service_id(&svc.id))?;
        if !matches!(self, Store::Consul(_)) {
            guard(validate::service_name(&svc.name))?;
        }
        match self {
            Store::Consul(c) => c.agent_deregister(&svc.id).await,
            Store::ConsulKv { client, prefix } => {
                client.kv_delete(&consulkv_key(prefix, svc)).await
            }
            Store::Etcd { client, prefix, .. } => client.delete(&etcd_key(prefix, svc)).await,
        }
    }

    /// Every registration whose ID starts with `id_prefix` (the registrator passes
    /// `<hostname>:`). Only `id`, `name`, `address` and `port` are guaranteed to be filled.
    ///
    /// Entries with a name or ID [`validate`] refuses are left out: this client would refuse
    /// to deregister them (and Consul could not), so a caller cleaning up must never be
    /// handed one, or it would fail on it at every pass.
    pub async fn list(&self, id_prefix: &str) -> Result<Vec<Service>, StoreError> {
        let all = match self {
            Store::Consul(c) => c.agent_services().await?,
            Store::ConsulKv { client, prefix } => {
                let dir = if prefix.is_empty() {
                    String::new()
                } else {
                    format!("{prefix}/")
                };
                let (kvs, _) = client.kv_list(&dir, 0, Duration::ZERO).await?;
                kvs.into_iter()
                    .filter_map(|(k, v)| consulkv_entry(&k[dir.len()..], &v))
                    .collect()
            }
            Store::Etcd { client, prefix, .. } => {
                let range = client.range_prefix(&etcd_dir(prefix)).await?;
                range
                    .kvs
                    .iter()
                    .filter_map(|kv| serde_json::from_slice::<EtcdValue>(&kv.value).ok())
                    .map(Service::from)
                    .collect()
            }
        };
        Ok(all
            .into_iter()
            .filter(|s| s.id.starts_with(id_prefix))
            .filter(|s| {
                validate::service_id(&s.id).is_ok() && validate::service_name(&s.name).is_ok()
            })
            .collect())
    }

    /// Keeps TTL registrations alive: passes each service's TTL check (Consul) or keeps the
    /// lease alive (etcd). Returns [`StoreError::Expired`] when the store no longer knows the
    /// check or lease, so the caller registers everything again. Consul KV has no TTL support
    /// here (sessions would be needed); refresh is a no-op for it.
    pub async fn refresh(&self, services: &[Service]) -> Result<(), StoreError> {
        match self {
            Store::Consul(c) => {
                for svc in services.iter().filter(|s| s.ttl.is_some()) {
                    c.agent_check_pass(&ttl_check_id(&svc.id)).await?;
                }
                Ok(())
            }
            Store::ConsulKv { .. } => Ok(()),
            Store::Etcd { client, lease, .. } => {
                let mut held = lease.lock().await;
                let Some(id) = *held else { return Ok(()) };
                match client.lease_keepalive(id).await {
                    Err(e @ StoreError::Expired { .. }) => {
                        // Forget it: the next register grants a fresh lease.
                        *held = None;
                        Err(e)
                    }
                    other => other,
                }
            }
        }
    }
}

/// What the store clients refuse before sending: every [`validate`] failure except an empty
/// value. An empty name or ID escapes no key layout and breaks no URL; the store refuses it
/// itself with its own reason (Consul answers 400), which callers already
/// treat as an item failure.
fn guard(checked: Result<(), ValidationError>) -> Result<(), StoreError> {
    match checked {
        Err(e) if e.problem != validate::Problem::Empty => Err(StoreError::Invalid(e)),
        _ => Ok(()),
    }
}

/// A failed exchange with `endpoint`, as the store error it is: [`StoreError::Tls`] when the
/// TLS handshake failed (told apart by rustls' own phrases, the only stable mark reqwest
/// leaves), [`StoreError::Unreachable`] otherwise. `what` names the request.
fn transport_error(endpoint: &str, what: &str, e: &reqwest::Error) -> StoreError {
    let reason = one_line(e);
    match tls_failure(&reason) {
        Some(kind) => StoreError::Tls {
            endpoint: endpoint.to_string(),
            reason: format!("{kind} ({what}: {reason})"),
        },
        None => StoreError::Unreachable {
            endpoint: endpoint.to_string(),
            reason: format!("{what}: {reason}"),
        },
    }
}

/// What kind of TLS failure a transport error's text describes, if it is one (also used for
/// the Docker engine's TLS, whose client is rustls too).
pub fn tls_failure(reason: &str) -> Option<&'static str> {
    let r = reason.to_ascii_lowercase();
    if r.contains("invalid peer certificate") || r.contains("unknownissuer") {
        Some("server certificate verification failed (check the CA and the server name)")
    } else if r.contains("certificaterequired")
        || r.contains("badcertificate")
        || r.contains("unknownca")
        || r.contains("certificateunknown")
        || r.contains("received fatal alert")
    {
        Some("the server refused the handshake (client certificate missing or not trusted)")
    } else if r.contains("invalidcontenttype") || r.contains("corrupt message") {
        Some("the server does not speak TLS on this port")
    } else {
        None
    }
}

/// An error and its causes on one line, so a log line stays a line: reqwest's own message
/// ("error sending request") says little; the cause (connection refused, timed out) is what an
/// operator needs. reqwest and hyper often repeat their source in their own message, so
/// repeats are skipped.
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let msg = s.to_string();
        if !text.contains(&msg) {
            text.push_str(": ");
            text.push_str(&msg);
        }
        source = s.source();
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// ID of the TTL check the registrator attaches to a Consul service when run with `-ttl`.
pub fn ttl_check_id(service_id: &str) -> String {
    format!("service:{service_id}:ttl")
}

/// Consul KV key of a service: `<prefix>/<name>/<id>` (gliderlabs' layout).
fn consulkv_key(prefix: &str, svc: &Service) -> String {
    if prefix.is_empty() {
        format!("{}/{}", svc.name, svc.id)
    } else {
        format!("{prefix}/{}/{}", svc.name, svc.id)
    }
}

/// A Consul KV entry in registrator's layout, `<name>/<id>` (relative to the prefix) =
/// `ip:port`, back into a service (only the parts a KV entry holds). `None` when the entry does
/// not have that shape.
pub fn consulkv_entry(rel_key: &str, value: &[u8]) -> Option<Service> {
    let (name, id) = rel_key.split_once('/')?;
    let text = std::str::from_utf8(value).ok()?.trim();
    let (host, port) = text.rsplit_once(':')?;
    Some(Service {
        id: id.to_string(),
        name: name.to_string(),
        address: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port: port.parse().ok()?,
        tags: Vec::new(),
        meta: Default::default(),
        check: None,
        ttl: None,
    })
}

/// The etcd directory services live under: `/<prefix>/` (or `/`).
pub fn etcd_dir(prefix: &str) -> String {
    if prefix.is_empty() {
        "/".to_string()
    } else {
        format!("/{prefix}/")
    }
}

/// etcd key of a service: `/<prefix>/<name>/<id>`.
fn etcd_key(prefix: &str, svc: &Service) -> String {
    format!("{}{}/{}", etcd_dir(prefix), svc.name, svc.id)
}

/// What an etcd value holds: the service as confd and other readers need it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EtcdValue {
    /// Service ID.
    pub id: String,
    /// Service name.
    pub name: String,
    /// Address to connect to.
    pub address: String,
    /// Port to connect to.
    pub port: u16,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Metadata (`SERVICE_<KEY>` values).
    #[serde(default)]
    pub meta: std::collections::BTreeMap<String, String>,
}

impl From<&Service> for EtcdValue {
    fn from(s: &Service) -> Self {
        EtcdValue {
            id: s.id.clone(),
            name: s.name.clone(),
            address: s.address.clone(),
            port: s.port,
            tags: s.tags.clone(),
            meta: s.meta.clone(),
        }
    }
}

impl From<EtcdValue> for Service {
    fn from(v: EtcdValue) -> Self {
        Service {
            id: v.id,
            name: v.name,
            address: v.address,
            port: v.port,
            tags: v.tags,
            meta: v.meta,
            check: None,
            ttl: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> Service {
        Service {
            id: "host:web:80".into(),
            name: "web".into(),
            address: "10.0.0.2".into(),
            port: 8080,
            tags: vec![],
            meta: Default::default(),
            check: None,
            ttl: None,
        }
    }

    #[test]
    fn keys() {
        assert_eq!(consulkv_key("services", &svc()), "services/web/host:web:80");
        assert_eq!(consulkv_key("", &svc()), "web/host:web:80");
        assert_eq!(etcd_key("services", &svc()), "/services/web/host:web:80");
        assert_eq!(etcd_key("", &svc()), "/web/host:web:80");
        assert_eq!(ttl_check_id("a:b:80"), "service:a:b:80:ttl");
    }

    fn status(status: u16, body: &str) -> StoreError {
        StoreError::Status {
            endpoint: "http://127.0.0.1:8500".into(),
            what: "PUT /v1/agent/service/register".into(),
            status,
            body: body.into(),
        }
    }

    #[test]
    fn item_failures_are_told_from_store_wide_ones() {
        use Scope::{Item, Store};
        let table: Vec<(&str, StoreError, Scope)> = vec![
            (
                "unreachable",
                StoreError::Unreachable {
                    endpoint: "e".into(),
                    reason: "connection refused".into(),
                },
                Store,
            ),
            (
                "script checks off",
                status(500, "Scripts are disabled on this agent"),
                Item,
            ),
            (
                "unknown 500",
                status(500, "Invalid check: TTL must be > 0"),
                Item,
            ),
            ("no leader", status(500, "No cluster leader"), Store),
            (
                "rpc to servers failed",
                status(500, "rpc error making call: i/o timeout"),
                Store,
            ),
            (
                "raft",
                status(500, "leadership lost while committing log"),
                Store,
            ),
            (
                "etcd no leader",
                status(503, "etcdserver: no leader"),
                Store,
            ),
            (
                "etcd timeout",
                status(500, "etcdserver: request timed out"),
                Store,
            ),
            ("bad gateway", status(502, ""), Store),
            ("unavailable", status(503, "anything"), Store),
            ("gateway timeout", status(504, ""), Store),
            ("request timeout", status(408, ""), Store),
            (
                "rate limited",
                status(429, "RPC rate limit exceeded"),
                Store,
            ),
            ("dot name", status(400, "Bad request"), Item),
            ("dot id", status(405, "method not allowed"), Item),
            ("acl", status(403, "Permission denied"), Item),
            (
                "denied",
                StoreError::Denied {
                    endpoint: "e".into(),
                    what: "PUT /v1/agent/service/register".into(),
                    reason: "Permission denied".into(),
                },
                Item,
            ),
            (
                "tls",
                StoreError::Tls {
                    endpoint: "e".into(),
                    reason: "certificate verification failed".into(),
                },
                Store,
            ),
            ("too large", status(413, "Request body too large"), Item),
            (
                "etcd too large",
                status(400, "etcdserver: request is too large"),
                Item,
            ),
            ("header too large", status(431, ""), Item),
            (
                "watch canceled",
                status(
                    200,
                    "watch canceled: etcdserver: mvcc: required revision is a future revision",
                ),
                Item,
            ),
            (
                "decode",
                StoreError::Decode {
                    what: "answer".into(),
                    reason: "invalid value: integer `70000`, expected u16".into(),
                },
                Item,
            ),
            (
                "invalid",
                StoreError::Invalid(crate::validate::service_name("..").unwrap_err()),
                Item,
            ),
            (
                "expired",
                StoreError::Expired {
                    what: "etcd lease 1".into(),
                },
                Store,
            ),
            (
                "compacted",
                StoreError::Compacted {
                    requested: 1,
                    compact_revision: 5,
                },
                Store,
            ),
        ];
        for (what, err, want) in table {
            assert_eq!(err.scope(), want, "{what}: {err}");
            assert_eq!(err.is_item_failure(), want == Item, "{what}");
        }
    }

    #[tokio::test]
    async fn invalid_names_and_ids_are_refused_before_sending() {
        // Nothing listens on port 9: a request would be `Unreachable`, not `Invalid`.
        let uri = RegistryUri::parse("consulkv://127.0.0.1:9/svc/reg").unwrap();
        let store = Store::new(&uri);
        let table: [(&str, &str); 4] = [
            ("..", "host:web:80"),
            (".", "host:web:80"),
            ("web", ".."),
            ("web", "a/../../b"),
        ];
        for (name, id) in table {
            let s = Service {
                name: name.into(),
                id: id.into(),
                ..svc()
            };
            for r in [store.register(&s).await, store.deregister(&s).await] {
                match r {
                    Err(StoreError::Invalid(_)) => {}
                    other => panic!("{name:?} {id:?}: {other:?}"),
                }
            }
        }
        // Valid ones, and an empty name (left for the store to refuse), are sent.
        let empty = Service {
            name: String::new(),
            ..svc()
        };
        for s in [svc(), empty] {
            assert!(
                matches!(
                    store.register(&s).await,
                    Err(StoreError::Unreachable { .. })
                ),
                "{s:?}"
            );
        }
    }

    #[test]
    fn consulkv_entry_round_trip() {
        let s = svc();
        let back = consulkv_entry("web/host:web:80", s.addr().as_bytes()).unwrap();
        assert_eq!(back, s);
        assert!(consulkv_entry("noslash", b"1.2.3.4:80").is_none());
        assert!(consulkv_entry("web/x", b"garbage").is_none());
    }
}
