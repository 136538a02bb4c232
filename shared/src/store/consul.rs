//! Consul's HTTP API: agent service registration, KV, catalog and health (blocking queries).
//!
//! Every request goes through [`ConsulClient::send`], which builds the URL, adds the token and
//! turns transport failures into [`StoreError::Unreachable`]; the public methods only shape
//! payloads and read answers. Payload building and answer decoding are pure functions so they
//! can be unit-tested without an agent.

use super::layout::digest;
use super::{
    docker_health_check_id, transport_error, ttl_check_id, BadEntry, EntryProblem, SettingsError,
    StoreError, StoreSettings,
};
use crate::{consul_duration, validate, Check, CheckKind, Endpoint, Service};
use base64::Engine;
use reqwest::header::HeaderValue;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// How long to wait for a TCP connection: the agent is normally local, so a slow connect means
/// it is down or overloaded and the caller's retry loop should take over.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of a non-blocking request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of a service check that does not set one (gliderlabs sends the same).
const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// TTL of the check that follows a container's Docker health. Consul lets an outside process
/// set the status of TTL checks only; the registrator sets it at every health change and
/// never refreshes it, so the TTL is long enough never to expire in between (a year).
const DOCKER_HEALTH_TTL: &str = "8760h";
/// Consul reaps critical services at most about once a minute; asking for less is pointless.
const MIN_DEREGISTER_AFTER: Duration = Duration::from_secs(60);

/// One Consul KV entry as compare-and-set and locks see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    /// The value's bytes.
    pub value: Vec<u8>,
    /// The index of its last write: what `?cas=` compares.
    pub modify_index: u64,
    /// The session holding its lock, if any.
    pub session: Option<String>,
}

/// A client of one Consul agent.
#[derive(Debug, Clone)]
pub struct ConsulClient {
    http: reqwest::Client,
    base: String,
    /// Where requests go: `base`, or with the host replaced by the TLS server name.
    request_base: String,
    /// Marked sensitive, so `Debug` (and thus logs) never show it.
    token: Option<HeaderValue>,
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

/// What Consul says about a read besides the answer itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueryMeta {
    /// `X-Consul-Index`: where a blocking query resumes ([`BlockingIndex`]).
    pub index: u64,
    /// `X-Consul-Results-Filtered-By-ACLs: true`: the token's ACL rules left some results out.
    /// Only later Consul versions send it (1.8 never does), and it never says which results,
    /// so it cannot tell a hidden entry from a removed one.
    pub filtered_by_acls: bool,
}

/// An HTTP answer, whatever its status.
struct Reply {
    /// Method and path, for error messages.
    what: String,
    status: StatusCode,
    /// `X-Consul-Index`, when present and numeric.
    index: Option<u64>,
    /// `X-Consul-Results-Filtered-By-ACLs` was `true`.
    filtered_by_acls: bool,
    body: Vec<u8>,
}

impl Reply {
    /// The first line of the body (trimmed, bounded), as error messages carry it.
    fn first_line(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let line = text.lines().next().unwrap_or_default().trim();
        line.chars().take(200).collect()
    }

    /// Decodes the JSON body.
    fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, StoreError> {
        serde_json::from_slice(&self.body).map_err(|e| StoreError::Decode {
            what: format!("answer to {}", self.what),
            reason: e.to_string(),
        })
    }

    /// The index a blocking query resumes from; Consul always sends it on these endpoints.
    fn consul_index(&self) -> Result<u64, StoreError> {
        self.index.ok_or_else(|| StoreError::Decode {
            what: format!("answer to {}", self.what),
            reason: "missing or invalid X-Consul-Index header".into(),
        })
    }

    /// The index and what else Consul said about the read.
    fn meta(&self) -> Result<QueryMeta, StoreError> {
        Ok(QueryMeta {
            index: self.consul_index()?,
            filtered_by_acls: self.filtered_by_acls,
        })
    }
}

impl ConsulClient {
    /// A client of the agent at `endpoint`, sending `token` as `X-Consul-Token` when set, with
    /// the public web roots for HTTPS.
    pub fn new(endpoint: &Endpoint, token: Option<String>) -> Self {
        let settings = StoreSettings {
            token: token.map(super::Secret::new),
            ..Default::default()
        };
        Self::with_settings(endpoint, &settings).expect("a client without TLS files always builds")
    }

    /// A client of the agent at `endpoint` with `settings`' TLS material and ACL token.
    ///
    /// A token that cannot be an HTTP header value (control characters) is dropped with a
    /// warning: the agent then answers 403, which names the problem better than a panic here.
    pub fn with_settings(
        endpoint: &Endpoint,
        settings: &StoreSettings,
    ) -> Result<Self, SettingsError> {
        let http = settings.http_client(std::slice::from_ref(endpoint), |b| {
            b.connect_timeout(CONNECT_TIMEOUT).timeout(REQUEST_TIMEOUT)
        })?;
        let token = settings
            .token
            .as_ref()
            .and_then(|t| match HeaderValue::from_str(t.expose()) {
                Ok(mut v) => {
                    v.set_sensitive(true);
                    Some(v)
                }
                Err(_) => {
                    tracing::warn!("Consul token is not a valid HTTP header value; not sending it");
                    None
                }
            });
        Ok(ConsulClient {
            http,
            // Named in errors: `unix:///path` for a socket.
            base: endpoint.to_string(),
            request_base: settings.request_base(endpoint),
            token,
        })
    }

    /// The agent's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// `GET /v1/agent/self`: does the agent answer?
    pub async fn agent_self(&self) -> Result<(), StoreError> {
        let reply = self.send(Method::GET, "/v1/agent/self", None, None).await?;
        self.ok(reply).map(|_| ())
    }

    /// `PUT /v1/agent/service/register` with the service and its checks, then, for a
    /// container with a Docker HEALTHCHECK, `PUT /v1/agent/check/update/<id>` with its status:
    /// Consul keeps a registered check's status when the service is registered again, so the
    /// status in the registration only counts the first time.
    ///
    /// Metadata Consul would reject is dropped (with a warning) rather than failing the whole
    /// registration: container labels are untrusted and one bad key must not hide a service.
    pub async fn agent_register(&self, svc: &Service) -> Result<(), StoreError> {
        let body = serde_json::to_vec(&register_payload(svc)).expect("JSON of a Value");
        let reply = self
            .send(Method::PUT, "/v1/agent/service/register", None, Some(body))
            .await?;
        self.ok(reply)?;
        if let Some(health) = svc.docker_health {
            let path = format!(
                "/v1/agent/check/update/{}",
                encode_segment(&docker_health_check_id(&svc.id))
            );
            let body = json!({
                "Status": health.consul_status(),
                "Output": format!("Docker health: {}", health.as_str()),
            });
            let body = serde_json::to_vec(&body).expect("JSON of a Value");
            let reply = self.send(Method::PUT, &path, None, Some(body)).await?;
            self.ok(reply)?;
        }
        Ok(())
    }

    /// `PUT /v1/agent/service/deregister/<id>`; an unknown ID is not an error.
    pub async fn agent_deregister(&self, id: &str) -> Result<(), StoreError> {
        let path = format!("/v1/agent/service/deregister/{}", encode_segment(id));
        let reply = self.send(Method::PUT, &path, None, None).await?;
        if is_unknown(&reply, &["Unknown service"]) {
            return Ok(());
        }
        self.ok(reply).map(|_| ())
    }

    /// `GET /v1/agent/services`, sorted by ID. An entry that is not a usable service (a port
    /// [`validate::port`] refuses, which Consul accepts from any writer) is left out: no
    /// registrator wrote it, and it must not hide the others.
    pub async fn agent_services(&self) -> Result<Vec<Service>, StoreError> {
        let reply = self
            .send(Method::GET, "/v1/agent/services", None, None)
            .await?;
        let reply = self.ok(reply)?;
        let map: BTreeMap<String, Value> = reply.json()?;
        Ok(map
            .into_values()
            .filter_map(|v| ApiService::deserialize(&v).ok()?.into_service("").ok())
            .collect())
    }

    /// `PUT /v1/agent/check/pass/<check_id>`; an unknown check is [`StoreError::Expired`].
    pub async fn agent_check_pass(&self, check_id: &str) -> Result<(), StoreError> {
        let path = format!("/v1/agent/check/pass/{}", encode_segment(check_id));
        let reply = self.send(Method::PUT, &path, None, None).await?;
        // Consul 1.8 looks the ID up among TTL checks only, hence its second phrasing.
        if is_unknown(&reply, &["Unknown check", "does not have associated TTL"]) {
            return Err(StoreError::Expired {
                what: format!("Consul check {check_id:?}"),
            });
        }
        self.ok(reply).map(|_| ())
    }

    /// `PUT /v1/kv/<key>`.
    pub async fn kv_put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let path = format!("/v1/kv/{}", encode_key(key));
        let reply = self
            .send(Method::PUT, &path, None, Some(value.to_vec()))
            .await?;
        self.ok(reply).map(|_| ())
    }

    /// `DELETE /v1/kv/<key>`.
    pub async fn kv_delete(&self, key: &str) -> Result<(), StoreError> {
        let path = format!("/v1/kv/{}", encode_key(key));
        let reply = self.send(Method::DELETE, &path, None, None).await?;
        self.ok(reply).map(|_| ())
    }

    /// `GET /v1/kv/<key>` (one key) as a blocking query: the entry, if any, and the index to
    /// pass next time. `index` 0 returns at once.
    ///
    /// Cancel-safe (a read).
    pub async fn kv_get(
        &self,
        key: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(Option<KvEntry>, u64), StoreError> {
        let path = format!("/v1/kv/{}", encode_key(key));
        let reply = self
            .send(Method::GET, &path, Some(("", index, wait)), None)
            .await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Ok((None, reply.consul_index()?));
        }
        let reply = self.ok(reply)?;
        let entries: Vec<ApiKvEntry> = reply.json()?;
        let decode = |reason: String| StoreError::Decode {
            what: format!("answer to {}", reply.what),
            reason,
        };
        let entry = match entries.into_iter().next() {
            None => None,
            Some(e) => Some(KvEntry {
                value: match e.value {
                    None => Vec::new(),
                    Some(v) => base64::engine::general_purpose::STANDARD
                        .decode(v)
                        .map_err(|e| decode(e.to_string()))?,
                },
                modify_index: e.modify_index,
                session: e.session.filter(|s| !s.is_empty()),
            }),
        };
        Ok((entry, reply.consul_index()?))
    }

    /// `PUT /v1/kv/<key>?cas=<index>`: writes only if the key's modify index is still `index`
    /// (0: only if the key does not exist). Returns whether it was written.
    pub async fn kv_cas(&self, key: &str, value: &[u8], index: u64) -> Result<bool, StoreError> {
        let path = format!("/v1/kv/{}?cas={index}", encode_key(key));
        self.kv_bool(&path, value).await
    }

    /// `DELETE /v1/kv/<key>?cas=<index>`: deletes only if the key's modify index is still
    /// `index`. Returns whether it was deleted.
    pub async fn kv_delete_cas(&self, key: &str, index: u64) -> Result<bool, StoreError> {
        let path = format!("/v1/kv/{}?cas={index}", encode_key(key));
        let reply = self.send(Method::DELETE, &path, None, None).await?;
        let reply = self.ok(reply)?;
        reply.json()
    }

    /// `PUT /v1/kv/<key>?acquire=<session>`: takes the key's lock for `session` if no other
    /// session holds it. Returns whether it is held now.
    pub async fn kv_acquire(
        &self,
        key: &str,
        value: &[u8],
        session: &str,
    ) -> Result<bool, StoreError> {
        let path = format!(
            "/v1/kv/{}?acquire={}",
            encode_key(key),
            encode_segment(session)
        );
        self.kv_bool(&path, value).await
    }

    /// A KV write whose answer is `true` or `false`.
    async fn kv_bool(&self, path: &str, value: &[u8]) -> Result<bool, StoreError> {
        let reply = self
            .send(Method::PUT, path, None, Some(value.to_vec()))
            .await?;
        let reply = self.ok(reply)?;
        reply.json()
    }

    /// `PUT /v1/session/create`: a session with this TTL (Consul's floor is 10 s) whose
    /// invalidation deletes the keys it holds, and with no lock delay, so that a dead holder's
    /// lock is free as soon as its session expires. Returns the session ID.
    pub async fn session_create(&self, name: &str, ttl: Duration) -> Result<String, StoreError> {
        let body = serde_json::json!({
            "Name": name,
            "TTL": format!("{}s", ttl.as_secs().max(10)),
            "Behavior": "delete",
            "LockDelay": "0s",
        });
        let reply = self
            .send(
                Method::PUT,
                "/v1/session/create",
                None,
                Some(body.to_string().into_bytes()),
            )
            .await?;
        let reply = self.ok(reply)?;
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        let created: Created = reply.json()?;
        Ok(created.id)
    }

    /// `PUT /v1/session/renew/<id>`: [`StoreError::Expired`] when Consul no longer knows it.
    pub async fn session_renew(&self, id: &str) -> Result<(), StoreError> {
        let path = format!("/v1/session/renew/{}", encode_segment(id));
        let reply = self.send(Method::PUT, &path, None, None).await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Err(StoreError::Expired {
                what: format!("Consul session {id}"),
            });
        }
        self.ok(reply).map(|_| ())
    }

    /// `PUT /v1/session/destroy/<id>`: ends the session, deleting the keys it holds.
    pub async fn session_destroy(&self, id: &str) -> Result<(), StoreError> {
        let path = format!("/v1/session/destroy/{}", encode_segment(id));
        let reply = self.send(Method::PUT, &path, None, None).await?;
        self.ok(reply).map(|_| ())
    }

    /// `GET /v1/kv/<prefix>?recurse` as a blocking query: keys and values under `prefix`, and
    /// the index to pass next time. `index` 0 returns at once.
    ///
    /// Cancel-safe (a read). As for every blocking query here, Consul's rules apply to the
    /// returned index: if it goes backwards, start again from 0.
    pub async fn kv_list(
        &self,
        prefix: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(BTreeMap<String, Vec<u8>>, u64), StoreError> {
        let path = format!("/v1/kv/{}", encode_key(prefix));
        let reply = self
            .send(Method::GET, &path, Some(("recurse", index, wait)), None)
            .await?;
        // 404 means "no key under this prefix", and still carries the index to block on.
        if reply.status == StatusCode::NOT_FOUND {
            return Ok((BTreeMap::new(), reply.consul_index()?));
        }
        let reply = self.ok(reply)?;
        let entries: Vec<ApiKv> = reply.json()?;
        let kvs = decode_kvs(entries).map_err(|reason| StoreError::Decode {
            what: format!("answer to {}", reply.what),
            reason,
        })?;
        Ok((kvs, reply.consul_index()?))
    }

    /// `GET /v1/catalog/services` as a blocking query: service names with their tags.
    ///
    /// Cancel-safe (a read).
    pub async fn catalog_services(
        &self,
        index: u64,
        wait: Duration,
    ) -> Result<(BTreeMap<String, Vec<String>>, QueryMeta), StoreError> {
        let reply = self
            .send(
                Method::GET,
                "/v1/catalog/services",
                Some(("", index, wait)),
                None,
            )
            .await?;
        let reply = self.ok(reply)?;
        let map: BTreeMap<String, Option<Vec<String>>> = reply.json()?;
        let map = map
            .into_iter()
            .map(|(name, tags)| (name, tags.unwrap_or_default()))
            .collect();
        Ok((map, reply.meta()?))
    }

    /// `GET /v1/health/service/<name>` as a blocking query, optionally `?passing`.
    /// Entries are sorted by service ID. Each is decoded on its own: one that is not a usable
    /// service (a port out of range, which Consul accepts from any writer) comes back as a
    /// [`BadEntry`] among the others, never as a failure of the whole answer.
    ///
    /// Cancel-safe (a read).
    pub async fn health_service(
        &self,
        name: &str,
        passing_only: bool,
        index: u64,
        wait: Duration,
    ) -> Result<(Vec<Result<HealthEntry, BadEntry>>, QueryMeta), StoreError> {
        let path = format!("/v1/health/service/{}", encode_segment(name));
        let flag = if passing_only { "passing" } else { "" };
        let reply = self
            .send(Method::GET, &path, Some((flag, index, wait)), None)
            .await?;
        let reply = self.ok(reply)?;
        let out = decode_health(&reply.body, name).map_err(|reason| StoreError::Decode {
            what: format!("answer to {}", reply.what),
            reason,
        })?;
        Ok((out, reply.meta()?))
    }

    /// `GET /v1/health/state/any` as a blocking query, for its index only: it moves whenever
    /// any check anywhere changes, so one such query can stand for every service's health
    /// (the body, every check, is read and dropped). Returns the index to pass next time.
    ///
    /// Cancel-safe (a read).
    pub async fn health_state_index(&self, index: u64, wait: Duration) -> Result<u64, StoreError> {
        let reply = self
            .send(
                Method::GET,
                "/v1/health/state/any",
                Some(("", index, wait)),
                None,
            )
            .await?;
        self.ok(reply)?.consul_index()
    }

    /// The one place requests are made. `query` is `(flag, index, wait)`: an optional bare flag
    /// (`recurse`, `passing`) and the blocking-query parameters, sent only when `index` > 0.
    /// Any HTTP answer is returned as a [`Reply`]; only transport failures are errors here.
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: Option<(&str, u64, Duration)>,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, StoreError> {
        let what = request_what(&method, path);
        let (query, timeout) = match query {
            Some((flag, index, wait)) => blocking_query(flag, index, wait),
            None => (String::new(), REQUEST_TIMEOUT),
        };
        let url = format!("{}{path}{query}", self.request_base);
        let mut req = self.http.request(method, url).timeout(timeout);
        if let Some(token) = &self.token {
            req = req.header("X-Consul-Token", token.clone());
        }
        if let Some(body) = body {
            req = req.body(body);
        }
        let unreachable = |e: reqwest::Error| transport_error(&self.base, &what, &e.without_url());
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let filtered_by_acls = resp
            .headers()
            .get("X-Consul-Results-Filtered-By-ACLs")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let body = resp.bytes().await.map_err(unreachable)?.to_vec();
        Ok(Reply {
            what,
            status,
            index,
            filtered_by_acls,
            body,
        })
    }

    /// Passes a 2xx reply through; anything else becomes [`StoreError::Status`].
    fn ok(&self, reply: Reply) -> Result<Reply, StoreError> {
        if reply.status.is_success() {
            return Ok(reply);
        }
        if reply.status == StatusCode::FORBIDDEN {
            // "Permission denied" (the token lacks the right) or "ACL not found" (an unknown
            // token). Named as the store put it; the token itself is never in the message.
            return Err(StoreError::Denied {
                endpoint: self.base.clone(),
                reason: format!("{} (check the ACL token's policy)", reply.first_line()),
                what: reply.what,
            });
        }
        Err(StoreError::Status {
            endpoint: self.base.clone(),
            body: reply.first_line(),
            what: reply.what,
            status: reply.status.as_u16(),
        })
    }
}

/// Method and path of a request as error messages name it. Paths carry names from container
/// labels, so they are shortened: a megabyte name must not make a megabyte error message.
fn request_what(method: &Method, path: &str) -> String {
    format!("{method} {}", crate::excerpt(path))
}

/// Where a blocking query resumes, kept by Consul's rules for `X-Consul-Index`: resume from
/// the index of the last answer; when an answer's index goes backwards (a restarted agent or
/// a new leader with a shorter log), or after any error, start again from 0, which answers at
/// once. Keeping an old, higher index after an agent restart would make every query wait the
/// full `wait` for changes it would never see (a minute blind, by default). An index
/// of 0 in an answer is treated as 1 so a query never spins.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockingIndex(u64);

impl BlockingIndex {
    /// Starts from 0: the first query answers at once.
    pub fn new() -> Self {
        BlockingIndex(0)
    }

    /// The index to send.
    pub fn get(self) -> u64 {
        self.0
    }

    /// Records an answer's index. Returns whether the answer may differ from the last one
    /// (its index moved, or this was a fresh start), i.e. whether the caller should look at it.
    pub fn answered(&mut self, got: u64) -> bool {
        let news = self.0 == 0 || got != self.0;
        self.0 = if got < self.0 { 0 } else { got.max(1) };
        news
    }

    /// Records a failed query: the next one starts from 0.
    pub fn failed(&mut self) {
        self.0 = 0;
    }
}

/// Query string and request timeout of a (possibly) blocking query. Consul adds up to wait/16
/// of jitter to the wait, so the timeout leaves room for that plus a margin for the answer.
/// A zero wait would make Consul block for its 5-minute default, past our timeout, so the
/// wait is at least one second.
fn blocking_query(flag: &str, index: u64, wait: Duration) -> (String, Duration) {
    let wait = wait.max(Duration::from_secs(1));
    let mut params: Vec<String> = Vec::new();
    if !flag.is_empty() {
        params.push(flag.to_string());
    }
    let mut timeout = REQUEST_TIMEOUT;
    if index > 0 {
        params.push(format!("index={index}"));
        params.push(format!("wait={}", consul_duration(wait)));
        timeout = wait + wait / 16 + Duration::from_secs(5);
    }
    let query = if params.is_empty() {
        String::new()
    } else {
        format!("?{}", params.join("&"))
    };
    (query, timeout)
}

/// Did the agent say it does not know the service or check? Consul 1.8 answers 500 with one
/// of `phrases` in the body; later versions answer 404.
fn is_unknown(reply: &Reply, phrases: &[&str]) -> bool {
    let body = String::from_utf8_lossy(&reply.body);
    reply.status == StatusCode::NOT_FOUND
        || (reply.status == StatusCode::INTERNAL_SERVER_ERROR
            && phrases.iter().any(|p| body.contains(p)))
}

/// Percent-encodes one path segment: everything outside RFC 3986's unreserved characters.
/// Service IDs and names come from container labels, so `/`, `?`, `#` and `..` must not change
/// which endpoint a request reaches.
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    // A bare `.` or `..` segment would be normalised away by URL handling on either side.
    match out.as_str() {
        "." => "%2E".into(),
        ".." => "%2E%2E".into(),
        _ => out,
    }
}

/// Percent-encodes a KV key, keeping its `/` separators.
fn encode_key(key: &str) -> String {
    key.split('/')
        .map(encode_segment)
        .collect::<Vec<_>>()
        .join("/")
}

/// The body of `PUT /v1/agent/service/register` for `svc`.
fn register_payload(svc: &Service) -> Value {
    let mut checks = Vec::new();
    if let Some(check) = &svc.check {
        checks.push(check_json(check));
    }
    if let Some(ttl) = svc.ttl {
        checks.push(json!({
            "CheckID": ttl_check_id(&svc.id),
            "Name": "registrator TTL",
            "TTL": consul_duration(ttl),
            "Status": "passing",
            "DeregisterCriticalServiceAfter": consul_duration(MIN_DEREGISTER_AFTER.max(ttl * 3)),
        }));
    }
    if let Some(health) = svc.docker_health {
        checks.push(json!({
            "CheckID": docker_health_check_id(&svc.id),
            "Name": "Docker health",
            "Notes": "the container's Docker HEALTHCHECK status, set by registrator",
            "TTL": DOCKER_HEALTH_TTL,
            "Status": health.consul_status(),
        }));
    }
    json!({
        "ID": svc.id,
        "Name": svc.name,
        "Address": svc.address,
        "Port": svc.port,
        "Tags": svc.tags,
        "Meta": filter_meta(&svc.id, &svc.meta),
        "Checks": checks,
    })
}

/// One entry of `Checks` for a `SERVICE_CHECK_*` check.
fn check_json(check: &Check) -> Value {
    let mut c = Map::new();
    let mut periodic = true;
    match &check.kind {
        CheckKind::Http(url) => {
            c.insert("HTTP".into(), url.as_str().into());
            if let Some(m) = &check.method {
                c.insert("Method".into(), m.as_str().into());
            }
        }
        CheckKind::Https(url) => {
            c.insert("HTTP".into(), url.as_str().into());
            c.insert("TLSSkipVerify".into(), check.tls_skip_verify.into());
            if let Some(m) = &check.method {
                c.insert("Method".into(), m.as_str().into());
            }
        }
        CheckKind::Grpc { target, tls } => {
            c.insert("GRPC".into(), target.as_str().into());
            c.insert("GRPCUseTLS".into(), (*tls).into());
            if *tls {
                c.insert("TLSSkipVerify".into(), check.tls_skip_verify.into());
            }
        }
        // Run by the agent inside the container with `docker exec`, as an argv (no shell).
        CheckKind::Docker { container, args } => {
            c.insert("DockerContainerID".into(), container.as_str().into());
            c.insert("Args".into(), json!(args));
        }
        CheckKind::Tcp(addr) => {
            c.insert("TCP".into(), addr.as_str().into());
        }
        CheckKind::Ttl(ttl) => {
            c.insert("TTL".into(), consul_duration(*ttl).into());
            periodic = false;
        }
        // `Args` is an argv the agent executes directly; never `Script`, which is a shell line.
        CheckKind::Script(argv) => {
            c.insert("Args".into(), json!(argv));
        }
    }
    if periodic {
        let interval = check.interval.unwrap_or(DEFAULT_CHECK_INTERVAL);
        c.insert("Interval".into(), consul_duration(interval).into());
        if let Some(t) = check.timeout {
            c.insert("Timeout".into(), consul_duration(t).into());
        }
    }
    if let Some(status) = &check.initial_status {
        c.insert("Status".into(), status.as_str().into());
    }
    if let Some(after) = check.deregister_after {
        c.insert(
            "DeregisterCriticalServiceAfter".into(),
            consul_duration(after).into(),
        );
    }
    Value::Object(c)
}

/// The metadata Consul will accept: each bad pair, and pairs beyond the 64th, are dropped with
/// a warning naming the service and key.
fn filter_meta(service_id: &str, meta: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut kept = BTreeMap::new();
    for (key, value) in meta {
        let problem = match validate::meta_problem(key, value) {
            Some(p) => Some(p.reason()),
            None if kept.len() >= validate::META_MAX_PAIRS => Some("more than 64 metadata pairs"),
            None => None,
        };
        match problem {
            Some(p) => tracing::warn!(
                service = service_id,
                key = key.as_str(),
                "dropping Consul service metadata: {p}"
            ),
            None => {
                kept.insert(key.clone(), value.clone());
            }
        }
    }
    kept
}

/// `passing`, `warning` or `critical`: the worst of the statuses given (none is passing).
fn aggregate_status<'a>(statuses: impl IntoIterator<Item = &'a str>) -> &'static str {
    let mut worst = "passing";
    for s in statuses {
        match s {
            "critical" => return "critical",
            "warning" => worst = "warning",
            _ => {}
        }
    }
    worst
}

/// Base64 values of a recursive KV read, decoded. A `null` value is an empty one.
fn decode_kvs(entries: Vec<ApiKv>) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    entries
        .into_iter()
        .map(|e| {
            let value = match e.value {
                None => Vec::new(),
                Some(v) => b64
                    .decode(v)
                    .map_err(|err| format!("value of {:?}: {err}", e.key))?,
            };
            Ok((e.key, value))
        })
        .collect()
}

/// A service as the agent and health endpoints describe it. The port is read as Consul
/// stores it, any integer, and checked in [`ApiService::into_service`].
#[derive(Deserialize, Hash)]
#[serde(rename_all = "PascalCase")]
struct ApiService {
    #[serde(rename = "ID")]
    id: String,
    service: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    port: i64,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
}

impl ApiService {
    /// Into the service model; an empty address means "the node's", as Consul clients read it.
    /// Fails on a port [`validate::port`] refuses.
    fn into_service(self, node_address: &str) -> Result<Service, validate::PortError> {
        let port = validate::port(self.port)?;
        Ok(Service {
            id: self.id,
            name: self.service,
            address: if self.address.is_empty() {
                node_address.to_string()
            } else {
                self.address
            },
            port,
            tags: self.tags.unwrap_or_default(),
            meta: self.meta.unwrap_or_default(),
            check: None,
            ttl: None,
            docker_health: None,
        })
    }
}

/// One entry of `/v1/kv/<prefix>?recurse`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ApiKv {
    key: String,
    #[serde(default)]
    value: Option<String>,
}

/// One key of `/v1/kv/<key>`, with what compare-and-set and locks need.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ApiKvEntry {
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    modify_index: u64,
    #[serde(default)]
    session: Option<String>,
}

/// One entry of `/v1/health/service/<name>`.
#[derive(Deserialize, Hash)]
#[serde(rename_all = "PascalCase")]
struct ApiHealthEntry {
    node: ApiNode,
    service: ApiService,
    #[serde(default)]
    checks: Option<Vec<ApiCheck>>,
}

#[derive(Deserialize, Hash)]
#[serde(rename_all = "PascalCase")]
struct ApiNode {
    node: String,
    #[serde(default)]
    address: String,
}

#[derive(Deserialize, Hash)]
#[serde(rename_all = "PascalCase")]
struct ApiCheck {
    status: String,
}

impl ApiHealthEntry {
    /// Into a [`HealthEntry`], or a [`BadEntry`] naming the service and ID.
    fn into_entry(self) -> Result<HealthEntry, BadEntry> {
        let fingerprint = digest(&self);
        let checks = self.checks.unwrap_or_default();
        let status = aggregate_status(checks.iter().map(|c| c.status.as_str()));
        let (name, id) = (self.service.service.clone(), self.service.id.clone());
        match self.service.into_service(&self.node.address) {
            Ok(service) => Ok(HealthEntry {
                service,
                node: self.node.node,
                status: status.to_string(),
            }),
            Err(e) => Err(BadEntry {
                name: Some(name),
                id: Some(id),
                problem: EntryProblem::Port(e),
                digest: fingerprint,
            }),
        }
    }
}

/// The body of `/v1/health/service/<service>`, entry by entry, sorted by service ID. Only a
/// body that is not a JSON array fails as a whole.
///
/// The whole array is decoded in one pass first (every answer, in practice: the port is read
/// as any integer); only when some entry has another shape is each decoded on its own.
fn decode_health(body: &[u8], service: &str) -> Result<Vec<Result<HealthEntry, BadEntry>>, String> {
    let mut out: Vec<Result<HealthEntry, BadEntry>> =
        match serde_json::from_slice::<Vec<ApiHealthEntry>>(body) {
            Ok(entries) => entries
                .into_iter()
                .map(ApiHealthEntry::into_entry)
                .collect(),
            Err(_) => serde_json::from_slice::<Vec<Value>>(body)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|v| match ApiHealthEntry::deserialize(&v) {
                    Ok(e) => e.into_entry(),
                    Err(e) => {
                        let field = |ptr| v.pointer(ptr).and_then(Value::as_str).map(String::from);
                        Err(BadEntry {
                            name: field("/Service/Service").or_else(|| Some(service.to_string())),
                            id: field("/Service/ID"),
                            problem: EntryProblem::Decode(e.to_string()),
                            digest: digest(&v.to_string()),
                        })
                    }
                })
                .collect(),
        };
    out.sort_by(|a, b| entry_id(a).cmp(entry_id(b)));
    Ok(out)
}

/// The service ID of a decoded entry, or `""` when it could not be read.
fn entry_id(e: &Result<HealthEntry, BadEntry>) -> &str {
    match e {
        Ok(h) => &h.service.id,
        Err(b) => b.id.as_deref().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::one_line;

    fn svc() -> Service {
        Service {
            id: "host:web:80".into(),
            name: "web".into(),
            address: "10.0.0.2".into(),
            port: 8080,
            tags: vec!["a".into()],
            meta: [("version".to_string(), "1".to_string())].into(),
            check: None,
            ttl: None,
            docker_health: None,
        }
    }

    fn check(kind: CheckKind) -> Check {
        Check::new(kind)
    }

    #[test]
    fn payload_without_checks() {
        assert_eq!(
            register_payload(&svc()),
            json!({
                "ID": "host:web:80", "Name": "web", "Address": "10.0.0.2", "Port": 8080,
                "Tags": ["a"], "Meta": {"version": "1"}, "Checks": [],
            })
        );
    }

    #[test]
    fn payload_with_check_and_ttl() {
        let mut s = svc();
        s.check = Some(Check {
            interval: Some(Duration::from_secs(5)),
            timeout: Some(Duration::from_millis(1500)),
            initial_status: Some("critical".into()),
            deregister_after: Some(Duration::from_secs(90)),
            ..check(CheckKind::Http("http://10.0.0.2:8080/health".into()))
        });
        s.ttl = Some(Duration::from_secs(30));
        let p = register_payload(&s);
        assert_eq!(
            p["Checks"],
            json!([
                {"HTTP": "http://10.0.0.2:8080/health", "Interval": "5s", "Timeout": "1500ms",
                 "Status": "critical", "DeregisterCriticalServiceAfter": "90s"},
                {"CheckID": "service:host:web:80:ttl", "Name": "registrator TTL", "TTL": "30s",
                 "Status": "passing", "DeregisterCriticalServiceAfter": "90s"},
            ])
        );
    }

    #[test]
    fn payload_with_docker_health() {
        let mut s = svc();
        s.docker_health = Some(crate::DockerHealth::Unhealthy);
        let p = register_payload(&s);
        assert_eq!(p["Checks"].as_array().unwrap().len(), 1, "{p}");
        let c = &p["Checks"][0];
        assert_eq!(c["CheckID"], "service:host:web:80:docker-health");
        assert_eq!(c["TTL"], "8760h");
        assert_eq!(c["Status"], "critical");
        s.docker_health = Some(crate::DockerHealth::Healthy);
        assert_eq!(register_payload(&s)["Checks"][0]["Status"], "passing");
        s.docker_health = Some(crate::DockerHealth::Starting);
        assert_eq!(register_payload(&s)["Checks"][0]["Status"], "critical");
    }

    #[test]
    fn ttl_check_reaps_no_sooner_than_a_minute() {
        let mut s = svc();
        s.ttl = Some(Duration::from_secs(2));
        let p = register_payload(&s);
        assert_eq!(p["Checks"][0]["DeregisterCriticalServiceAfter"], "60s");
        assert_eq!(p["Checks"][0]["TTL"], "2s");
    }

    #[test]
    fn check_kinds() {
        let table = [
            (
                CheckKind::Https("https://h/".into()),
                json!({"HTTP": "https://h/", "TLSSkipVerify": false, "Interval": "10s"}),
            ),
            (
                CheckKind::Tcp("10.0.0.2:80".into()),
                json!({"TCP": "10.0.0.2:80", "Interval": "10s"}),
            ),
            (
                CheckKind::Ttl(Duration::from_secs(15)),
                json!({"TTL": "15s"}),
            ),
            (
                CheckKind::Script(vec!["/bin/check".into(), "a; rm -rf /".into()]),
                json!({"Args": ["/bin/check", "a; rm -rf /"], "Interval": "10s"}),
            ),
        ];
        for (kind, want) in table {
            assert_eq!(check_json(&check(kind.clone())), want, "{kind:?}");
        }
        // Options: a method on HTTP(S), skipping verification on HTTPS and gRPC over TLS.
        let with = |kind: CheckKind| Check {
            method: Some("HEAD".into()),
            tls_skip_verify: true,
            ..check(kind)
        };
        let table = [
            (
                CheckKind::Http("http://h/".into()),
                json!({"HTTP": "http://h/", "Method": "HEAD", "Interval": "10s"}),
            ),
            (
                CheckKind::Https("https://h/".into()),
                json!({"HTTP": "https://h/", "Method": "HEAD", "TLSSkipVerify": true,
                       "Interval": "10s"}),
            ),
            (
                CheckKind::Grpc {
                    target: "10.0.0.2:50051/pkg.Svc".into(),
                    tls: true,
                },
                json!({"GRPC": "10.0.0.2:50051/pkg.Svc", "GRPCUseTLS": true,
                       "TLSSkipVerify": true, "Interval": "10s"}),
            ),
            (
                CheckKind::Grpc {
                    target: "10.0.0.2:50051".into(),
                    tls: false,
                },
                json!({"GRPC": "10.0.0.2:50051", "GRPCUseTLS": false, "Interval": "10s"}),
            ),
            (
                CheckKind::Docker {
                    container: "abc123".into(),
                    args: vec!["test".into(), "-f".into(), "/tmp/ok; rm".into()],
                },
                json!({"DockerContainerID": "abc123", "Args": ["test", "-f", "/tmp/ok; rm"],
                       "Interval": "10s"}),
            ),
        ];
        for (kind, want) in table {
            assert_eq!(check_json(&with(kind.clone())), want, "{kind:?}");
        }
    }

    #[test]
    fn meta_filter_drops_bad_pairs_and_caps_count() {
        let mut meta: BTreeMap<String, String> = (0..70)
            .map(|i| (format!("k{i:02}"), "v".to_string()))
            .collect();
        meta.insert("a b".into(), "v".into());
        let kept = filter_meta("id", &meta);
        assert_eq!(kept.len(), 64);
        assert!(!kept.contains_key("a b"));
        assert!(kept.contains_key("k00") && kept.contains_key("k63"));
        assert!(!kept.contains_key("k64"));
    }

    #[test]
    fn status_aggregation() {
        let table: [(&[&str], &str); 5] = [
            (&[], "passing"),
            (&["passing", "passing"], "passing"),
            (&["passing", "warning"], "warning"),
            (&["warning", "critical", "passing"], "critical"),
            (&["maintenance"], "passing"),
        ];
        for (statuses, want) in table {
            assert_eq!(
                aggregate_status(statuses.iter().copied()),
                want,
                "{statuses:?}"
            );
        }
    }

    #[test]
    fn url_encoding() {
        let table = [
            ("host:web:80", "host%3Aweb%3A80"),
            ("a/b?c#d", "a%2Fb%3Fc%23d"),
            ("..", "%2E%2E"),
            (".", "%2E"),
            ("ok-._~", "ok-._~"),
            ("\u{e9} %", "%C3%A9%20%25"),
        ];
        for (raw, want) in table {
            assert_eq!(encode_segment(raw), want, "{raw:?}");
        }
        assert_eq!(encode_key("services/web/h:c:80"), "services/web/h%3Ac%3A80");
        assert_eq!(encode_key(""), "");
        assert_eq!(encode_key("services/"), "services/");
    }

    #[test]
    fn blocking_index_rules() {
        // (index before, answer's index, index after, is it news?)
        let table = [
            (0, 5, 5, true),
            (5, 5, 5, false),
            (5, 9, 9, true),
            (9, 3, 0, true),
            (0, 0, 1, true),
            (1, 0, 0, true),
        ];
        for (before, got, after, news) in table {
            let mut i = BlockingIndex(before);
            assert_eq!(i.answered(got), news, "{before} {got}");
            assert_eq!(i.get(), after, "{before} {got}");
        }
        let mut i = BlockingIndex::new();
        i.answered(150);
        i.failed();
        assert_eq!(i.get(), 0, "an error resets");
    }

    #[test]
    fn error_messages_stay_short_for_huge_names() {
        let huge = "n".repeat(1_200_000);
        let path = format!("/v1/health/service/{}", encode_segment(&huge));
        let what = request_what(&Method::GET, &path);
        assert!(what.len() < 200, "{what}");
        assert!(what.contains("(1200019 bytes)"), "{what}");
    }

    #[test]
    fn blocking_query_params() {
        let wait = Duration::from_secs(32);
        assert_eq!(
            blocking_query("recurse", 0, wait),
            ("?recurse".to_string(), REQUEST_TIMEOUT)
        );
        assert_eq!(
            blocking_query("", 7, wait),
            ("?index=7&wait=32s".to_string(), Duration::from_secs(39))
        );
        assert_eq!(
            blocking_query("passing", 7, wait).0,
            "?passing&index=7&wait=32s"
        );
        assert_eq!(blocking_query("", 0, wait).0, "");
        assert_eq!(
            blocking_query("", 3, Duration::ZERO),
            (
                "?index=3&wait=1s".to_string(),
                Duration::from_micros(6_062_500)
            )
        );
    }

    #[test]
    fn health_entry_decoding() {
        let body = json!([{
            "Node": {"Node": "n1", "Address": "192.168.1.5"},
            "Service": {"ID": "h:web:80", "Service": "web", "Address": "", "Port": 80,
                        "Tags": null, "Meta": null},
            "Checks": [{"Status": "passing"}, {"Status": "warning"}],
        }]);
        let entries = decode_health(body.to_string().as_bytes(), "web").unwrap();
        let e = entries.into_iter().next().unwrap().unwrap();
        assert_eq!(e.node, "n1");
        assert_eq!(e.status, "warning");
        assert_eq!(e.service.address, "192.168.1.5");
        assert_eq!(e.service.port, 80);
        assert!(e.service.tags.is_empty());
    }

    #[test]
    fn health_entries_are_decoded_one_by_one() {
        let entry = |id: &str, port: Value| {
            json!({
                "Node": {"Node": "n1", "Address": "10.0.0.9"},
                "Service": {"ID": id, "Service": "web", "Address": "10.0.0.1", "Port": port},
                "Checks": [],
            })
        };
        // (entries, IDs of the good ones, (ID or None, label) of the bad ones)
        type Case = (
            &'static str,
            Vec<Value>,
            Vec<&'static str>,
            Vec<(Option<&'static str>, &'static str)>,
        );
        let table: Vec<Case> = vec![
            (
                "all good",
                vec![entry("b", json!(81)), entry("a", json!(80))],
                vec!["a", "b"],
                vec![],
            ),
            (
                "port 0",
                vec![entry("a", json!(80)), entry("z", json!(0))],
                vec!["a"],
                vec![(Some("z"), "port")],
            ),
            (
                "port 65536",
                vec![entry("a", json!(80)), entry("z", json!(65536))],
                vec!["a"],
                vec![(Some("z"), "port")],
            ),
            (
                "port -5",
                vec![entry("z", json!(-5)), entry("a", json!(80))],
                vec!["a"],
                vec![(Some("z"), "port")],
            ),
            (
                "port as text",
                vec![entry("a", json!(80)), entry("z", json!("80"))],
                vec!["a"],
                vec![(Some("z"), "decode")],
            ),
            (
                "no service ID",
                vec![
                    entry("a", json!(80)),
                    json!({"Node": {"Node": "n"}, "Service": {"Port": 1}}),
                ],
                vec!["a"],
                vec![(None, "decode")],
            ),
            (
                "not an object",
                vec![json!(7), entry("a", json!(80))],
                vec!["a"],
                vec![(None, "decode")],
            ),
        ];
        for (what, entries, good, bad) in table {
            let body = Value::Array(entries).to_string();
            let out = decode_health(body.as_bytes(), "web").unwrap();
            let got_good: Vec<&str> = out
                .iter()
                .flatten()
                .map(|e| e.service.id.as_str())
                .collect();
            assert_eq!(got_good, good, "{what}");
            let got_bad: Vec<(Option<&str>, &str)> = out
                .iter()
                .filter_map(|e| e.as_ref().err())
                .map(|b| (b.id.as_deref(), b.problem.label()))
                .collect();
            assert_eq!(got_bad, bad, "{what}");
            for b in out.iter().filter_map(|e| e.as_ref().err()) {
                assert_eq!(b.name.as_deref(), Some("web"), "{what}");
            }
        }
        assert!(
            decode_health(b"{}", "web").is_err(),
            "not an array: the answer fails"
        );
        // The same entry twice gives the same digest; a changed one another.
        let digest_of = |e: Value| {
            let body = Value::Array(vec![e]).to_string();
            decode_health(body.as_bytes(), "web").unwrap()[0]
                .clone()
                .unwrap_err()
                .digest
        };
        assert_eq!(
            digest_of(entry("z", json!(0))),
            digest_of(entry("z", json!(0)))
        );
        assert_ne!(
            digest_of(entry("z", json!(0))),
            digest_of(entry("z", json!(-1)))
        );
    }

    #[test]
    fn kv_decoding() {
        let entries = vec![
            ApiKv {
                key: "p/a".into(),
                value: Some("MS4yLjMuNDo4MA==".into()),
            },
            ApiKv {
                key: "p/".into(),
                value: None,
            },
        ];
        let kvs = decode_kvs(entries).unwrap();
        assert_eq!(kvs["p/a"], b"1.2.3.4:80");
        assert_eq!(kvs["p/"], b"");
        let bad = vec![ApiKv {
            key: "k".into(),
            value: Some("***".into()),
        }];
        assert!(decode_kvs(bad).unwrap_err().contains("\"k\""));
    }

    #[test]
    fn one_line_flattens() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let e = E("outer\nline", Some(Box::new(E("inner", None))));
        assert_eq!(one_line(&e), "outer line: inner");
    }
}
