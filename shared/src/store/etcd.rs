//! etcd v3 through its JSON gateway (`/v3/kv/*`, `/v3/lease/*`, `/v3/watch`), with failover
//! between members. Keys and values are base64 on the wire; this module hides that.
//!
//! The gateway is grpc-gateway: int64 fields (revisions, lease IDs, TTLs) arrive as JSON
//! strings, zero-valued fields are left out, and streaming calls (`watch`, `keepalive`) answer
//! with one JSON object per line, each wrapped in `{"result": ...}`.

use super::{one_line, transport_error, EtcdUser, SettingsError, StoreError, StoreSettings};
use crate::Endpoint;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use reqwest::header::HeaderValue;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long to wait for a TCP connection before trying the next member.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Total time for one unary request (response body included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Keepalive probes on watch connections: a watch has no total timeout, so a silently dead
/// peer must be noticed by TCP itself.
const WATCH_TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// A client of an etcd cluster: requests go to the current member and move to the next one
/// when it does not answer.
///
/// Clones share the "current member" index, so once one task fails over, the others follow.
#[derive(Debug, Clone)]
pub struct EtcdClient {
    /// For unary calls: connect and total timeouts.
    http: reqwest::Client,
    /// For watches: connect timeout only, the response streams for as long as it lives.
    watch_http: reqwest::Client,
    endpoints: Vec<Endpoint>,
    /// Where requests to each endpoint go (its base URL, or the TLS server name's).
    bases: Vec<String>,
    /// Index into `endpoints` of the member requests go to first.
    current: Arc<AtomicUsize>,
    /// The user to authenticate as, and the token it holds; shared by clones.
    auth: Option<Arc<Auth>>,
}

/// etcd authentication: the user and the current token (`None` until the first request, and
/// again once etcd calls it invalid, which is how an expired token shows).
#[derive(Debug)]
struct Auth {
    user: EtcdUser,
    token: tokio::sync::Mutex<Option<HeaderValue>>,
}

/// Whether an etcd error says the auth token is no longer valid (expired, or the member
/// restarted and forgot it): then authenticating again and retrying once is right.
fn is_invalid_token(e: &StoreError) -> bool {
    match e {
        StoreError::Denied { reason, .. } | StoreError::Status { body: reason, .. } => {
            let r = reason.to_ascii_lowercase();
            r.contains("invalid auth token") || r.contains("user name is empty")
        }
        _ => false,
    }
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
    /// The changes, in order. Empty for a progress notification, whose `revision` still tells
    /// the caller how far the store has got.
    pub events: Vec<WatchEvent>,
}

/// A running watch (one streamed HTTP response).
pub struct WatchStream {
    /// Chunks of the response body as they arrive.
    body: BoxStream<'static, reqwest::Result<Vec<u8>>>,
    /// Bytes received but not yet returned as a batch: may hold a partial line.
    buf: Vec<u8>,
    /// The body has ended (what is left in `buf` is the last line, if any).
    ended: bool,
    /// Member serving the watch, for errors.
    endpoint: String,
    /// Start revision asked for, for [`StoreError::Compacted`].
    requested: i64,
    /// The client's authentication, so a watch ended by an invalid token makes the next
    /// request authenticate again.
    auth: Option<Arc<Auth>>,
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream")
            .field("endpoint", &self.endpoint)
            .field("requested", &self.requested)
            .field("buffered", &self.buf.len())
            .field("ended", &self.ended)
            .finish()
    }
}

impl WatchStream {
    /// The next batch of events. `Ok(None)` when the stream ended (reconnect and resume from
    /// the last revision + 1); [`StoreError::Compacted`] when the start revision is gone;
    /// [`StoreError::Unreachable`] when the connection broke mid-stream.
    ///
    /// Cancel-safe: a batch is only consumed from the buffer once it is returned, and bytes
    /// read from the connection go into the buffer before the next await.
    pub async fn next(&mut self) -> Result<Option<WatchBatch>, StoreError> {
        loop {
            // Decoding is synchronous: between taking a line and returning its batch there is
            // no await, so a dropped `next()` never loses one.
            while let Some(line) = take_line(&mut self.buf, self.ended) {
                match decode_watch_line(&line, self.requested, &self.endpoint) {
                    Ok(Some(batch)) => return Ok(Some(batch)),
                    Ok(None) => {}
                    Err(e) => {
                        if let (true, Some(auth)) = (is_invalid_token(&e), &self.auth) {
                            // The next request authenticates again; a lock held elsewhere
                            // means that request is already doing it.
                            if let Ok(mut held) = auth.token.try_lock() {
                                *held = None;
                            }
                        }
                        return Err(e);
                    }
                }
            }
            if self.ended {
                return Ok(None);
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    self.ended = true;
                    self.buf.clear();
                    return Err(StoreError::Unreachable {
                        endpoint: self.endpoint.clone(),
                        reason: one_line(&e),
                    });
                }
                None => self.ended = true,
            }
        }
    }
}

impl EtcdClient {
    /// A client trying `endpoints` in order, without TLS material or credentials.
    pub fn new(endpoints: Vec<Endpoint>) -> Self {
        Self::with_settings(endpoints, &StoreSettings::default())
            .expect("a client without TLS files always builds")
    }

    /// A client trying `endpoints` in order, with `settings`' TLS material and etcd user.
    pub fn with_settings(
        endpoints: Vec<Endpoint>,
        settings: &StoreSettings,
    ) -> Result<Self, SettingsError> {
        let http = settings.http_client(&endpoints, |b| {
            b.connect_timeout(CONNECT_TIMEOUT).timeout(REQUEST_TIMEOUT)
        })?;
        let watch_http = settings.http_client(&endpoints, |b| {
            b.connect_timeout(CONNECT_TIMEOUT)
                .tcp_keepalive(WATCH_TCP_KEEPALIVE)
        })?;
        Ok(EtcdClient {
            http,
            watch_http,
            bases: endpoints.iter().map(|e| settings.request_base(e)).collect(),
            endpoints,
            current: Arc::new(AtomicUsize::new(0)),
            auth: settings.etcd_user.clone().map(|user| {
                Arc::new(Auth {
                    user,
                    token: tokio::sync::Mutex::new(None),
                })
            }),
        })
    }

    /// The auth token to send: `None` without a user; the held one, or a new one from
    /// `/v3/auth/authenticate` when none is held or `renew` is set.
    async fn auth_token(&self, renew: bool) -> Result<Option<HeaderValue>, StoreError> {
        let Some(auth) = &self.auth else {
            return Ok(None);
        };
        let mut held = auth.token.lock().await;
        if let (Some(t), false) = (held.as_ref(), renew) {
            return Ok(Some(t.clone()));
        }
        *held = None;
        let body = json!({"name": auth.user.name, "password": auth.user.password.expose()});
        let what = format!("authentication as etcd user {:?}", auth.user.name);
        let (endpoint, resp) = match self
            .send_once(&self.http, "/v3/auth/authenticate", &body, None)
            .await
        {
            Ok(r) => r,
            Err(StoreError::Status { endpoint, body, .. })
            | Err(StoreError::Denied {
                endpoint,
                reason: body,
                ..
            }) => {
                return Err(StoreError::Denied {
                    endpoint,
                    what,
                    reason: body,
                })
            }
            Err(e) => return Err(e),
        };
        let text = resp.text().await.map_err(|e| StoreError::Unreachable {
            endpoint: endpoint.clone(),
            reason: one_line(&e),
        })?;
        let wire: WireAuth =
            serde_json::from_str(&text).map_err(|e| decode_err("etcd authenticate answer", e))?;
        let mut token = HeaderValue::from_str(&wire.token)
            .map_err(|_| decode_err("etcd authenticate answer", "token is not a header value"))?;
        if wire.token.is_empty() {
            return Err(decode_err("etcd authenticate answer", "no token"));
        }
        token.set_sensitive(true);
        *held = Some(token.clone());
        Ok(Some(token))
    }

    /// `POST /v3/kv/put`, optionally attached to `lease`. Returns the new revision.
    pub async fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<i64, StoreError> {
        let mut body = json!({"key": B64.encode(key), "value": B64.encode(value)});
        if let Some(id) = lease {
            body["lease"] = json!(id);
        }
        let resp: HeaderOnly = self.post("/v3/kv/put", &body).await?;
        Ok(resp.header.revision)
    }

    /// `POST /v3/kv/deleterange` of one key. Deleting a missing key is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let body = json!({"key": B64.encode(key)});
        let _: HeaderOnly = self.post("/v3/kv/deleterange", &body).await?;
        Ok(())
    }

    /// `POST /v3/kv/range` of every key starting with `prefix` (all keys for `""`).
    pub async fn range_prefix(&self, prefix: &str) -> Result<RangeResult, StoreError> {
        let (key, end) = prefix_range(prefix.as_bytes());
        let body = json!({"key": B64.encode(key), "range_end": B64.encode(end)});
        let resp: WireRange = self.post("/v3/kv/range", &body).await?;
        resp.into_result()
    }

    /// `POST /v3/kv/range` of one key: the key, if it exists.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let body = json!({"key": B64.encode(key)});
        let resp: WireRange = self.post("/v3/kv/range", &body).await?;
        Ok(resp.into_result()?.kvs.into_iter().next())
    }

    /// `POST /v3/kv/txn`: puts `value` at `key` (attached to `lease`, if any) only if the key's
    /// mod revision is still `mod_revision` (0: only if the key does not exist). Returns
    /// whether it was written.
    pub async fn put_if(
        &self,
        key: &str,
        value: &[u8],
        mod_revision: i64,
        lease: Option<i64>,
    ) -> Result<bool, StoreError> {
        let mut put = json!({"key": B64.encode(key), "value": B64.encode(value)});
        if let Some(id) = lease {
            put["lease"] = json!(id);
        }
        self.txn(key, mod_revision, json!({"request_put": put}))
            .await
    }

    /// `POST /v3/kv/txn`: deletes `key` only if its mod revision is still `mod_revision`.
    /// Returns whether it was deleted.
    pub async fn delete_if(&self, key: &str, mod_revision: i64) -> Result<bool, StoreError> {
        let op = json!({"request_delete_range": {"key": B64.encode(key)}});
        self.txn(key, mod_revision, op).await
    }

    /// One transaction: `op` if `key`'s mod revision equals `mod_revision` (a missing key's is
    /// 0), nothing otherwise. Returns whether `op` ran.
    async fn txn(
        &self,
        key: &str,
        mod_revision: i64,
        op: serde_json::Value,
    ) -> Result<bool, StoreError> {
        let body = json!({
            "compare": [{
                "key": B64.encode(key),
                "result": "EQUAL",
                "target": "MOD",
                "mod_revision": mod_revision.to_string(),
            }],
            "success": [op],
        });
        let resp: WireTxn = self.post("/v3/kv/txn", &body).await?;
        Ok(resp.succeeded)
    }

    /// `POST /v3/lease/grant`: a new lease with this TTL (rounded up to whole seconds, at
    /// least one). Returns its ID.
    pub async fn lease_grant(&self, ttl: Duration) -> Result<i64, StoreError> {
        let body = json!({"TTL": ttl_secs(ttl)});
        let resp: WireLease = self.post("/v3/lease/grant", &body).await?;
        if resp.id == 0 {
            return Err(decode_err("etcd lease grant", "no lease ID in the answer"));
        }
        Ok(resp.id)
    }

    /// `POST /v3/lease/keepalive`: renews the lease; [`StoreError::Expired`] if it is gone.
    pub async fn lease_keepalive(&self, id: i64) -> Result<(), StoreError> {
        // A streaming call on the gateway: `post` reads only the first line of the answer.
        let resp: WireKeepalive = self.post("/v3/lease/keepalive", &json!({"ID": id})).await?;
        match resp.result {
            Some(r) if r.ttl > 0 => Ok(()),
            // The gateway answers a lease it does not know with the ID and no TTL.
            _ => Err(StoreError::Expired {
                what: format!("etcd lease {id}"),
            }),
        }
    }

    /// `POST /v3/lease/revoke`: drops the lease and every key attached to it.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), StoreError> {
        let _: HeaderOnly = self.post("/v3/lease/revoke", &json!({"ID": id})).await?;
        Ok(())
    }

    /// `POST /v3/watch` on every key starting with `prefix`, from `start_revision` (0: now).
    ///
    /// Progress notifications are asked for, so an idle watch still reports the store's
    /// revision now and then (as batches without events).
    pub async fn watch_prefix(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<WatchStream, StoreError> {
        let (key, end) = prefix_range(prefix.as_bytes());
        let body = json!({"create_request": {
            "key": B64.encode(key),
            "range_end": B64.encode(end),
            "start_revision": start_revision,
            "progress_notify": true,
        }});
        let (endpoint, resp) = self.send(&self.watch_http, "/v3/watch", &body).await?;
        Ok(WatchStream {
            body: resp
                .bytes_stream()
                .map(|chunk| chunk.map(|b| b.to_vec()))
                .boxed(),
            buf: Vec::new(),
            ended: false,
            endpoint,
            requested: start_revision,
            auth: self.auth.clone(),
        })
    }

    /// A unary call: sends with failover, then decodes the first JSON object of the answer.
    /// Reading stops at the first newline so streaming endpoints (keepalive) work too.
    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, StoreError> {
        let (endpoint, mut resp) = self.send(&self.http, path, body).await?;
        let mut buf = Vec::new();
        while !buf.contains(&b'\n') {
            match resp.chunk().await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
                Ok(None) => break,
                Err(e) => {
                    return Err(StoreError::Unreachable {
                        endpoint,
                        reason: one_line(&e),
                    })
                }
            }
        }
        let first = buf.split(|&b| b == b'\n').next().unwrap_or_default();
        serde_json::from_slice(first).map_err(|e| decode_err(&format!("etcd {path} answer"), e))
    }

    /// Sends `POST <path>` to the current member, moving on to the next one on a transport
    /// error; each member is tried at most once. A non-2xx answer is [`StoreError::Status`]
    /// (the member is up, so failing over would not help). Returns the member's base URL and
    /// the response with its body unread.
    async fn send(
        &self,
        client: &reqwest::Client,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(String, reqwest::Response), StoreError> {
        let token = self.auth_token(false).await?;
        match self.send_once(client, path, body, token).await {
            // An expired token: authenticate again and retry once.
            Err(e) if self.auth.is_some() && is_invalid_token(&e) => {
                let token = self.auth_token(true).await?;
                self.send_once(client, path, body, token).await
            }
            other => other,
        }
    }

    /// [`EtcdClient::send`] with a given auth token and no retry.
    async fn send_once(
        &self,
        client: &reqwest::Client,
        path: &str,
        body: &serde_json::Value,
        token: Option<HeaderValue>,
    ) -> Result<(String, reqwest::Response), StoreError> {
        let n = self.endpoints.len();
        if n == 0 {
            return Err(StoreError::Unreachable {
                endpoint: "etcd".into(),
                reason: "no endpoints configured".into(),
            });
        }
        let start = self.current.load(Ordering::Relaxed) % n;
        let mut last = None;
        for i in 0..n {
            let idx = (start + i) % n;
            let base = self.endpoints[idx].base_url();
            let mut req = client.post(format!("{}{path}", self.bases[idx])).json(body);
            if let Some(t) = &token {
                req = req.header(reqwest::header::AUTHORIZATION, t.clone());
            }
            match req.send().await {
                Ok(resp) if resp.status().is_success() => return Ok((base, resp)),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let text = resp.text().await.unwrap_or_default();
                    if text.contains("CommonName of client") {
                        // etcd 3.4+ refuses, through its JSON gateway with auth on, any client
                        // certificate carrying a Common Name (it cannot pass it on as the user).
                        return Err(StoreError::Denied {
                            endpoint: base,
                            what: format!("POST {path}"),
                            reason: "the client certificate has a Common Name, which etcd's \
                                     JSON gateway refuses when auth is enabled: expected a \
                                     client certificate without CN"
                                .into(),
                        });
                    }
                    if status == 401 || status == 403 {
                        return Err(StoreError::Denied {
                            endpoint: base,
                            what: format!("POST {path}"),
                            reason: gateway_message(&text),
                        });
                    }
                    return Err(StoreError::Status {
                        endpoint: base,
                        what: format!("POST {path}"),
                        status,
                        body: gateway_message(&text),
                    });
                }
                Err(e) => {
                    let e = transport_error(&base, &format!("POST {path}"), &e.without_url());
                    if matches!(e, StoreError::Tls { .. }) {
                        // Every member shares the CA and the client certificate: failing over
                        // would fail the same way and hide the reason.
                        return Err(e);
                    }
                    let reason = match e {
                        StoreError::Unreachable { reason, .. } => reason,
                        other => other.to_string(),
                    };
                    tracing::warn!(endpoint = %base, %reason, "etcd member unreachable, trying the next");
                    // Only move the shared index if no other task has already moved it.
                    let _ = self.current.compare_exchange(
                        idx,
                        (idx + 1) % n,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    last = Some((base, reason));
                }
            }
        }
        let (endpoint, reason) = last.expect("at least one endpoint tried");
        Err(StoreError::Unreachable { endpoint, reason })
    }
}

/// The `[key, range_end)` pair covering every key that starts with `prefix`: `range_end` is
/// the prefix with its last byte incremented, dropping trailing `0xff` bytes that cannot be.
/// `"\0"` as `range_end` means "no upper bound" to etcd: used for an empty prefix (then `key`
/// is `"\0"` too, i.e. all keys) and for a prefix made only of `0xff` bytes.
fn prefix_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if prefix.is_empty() {
        return (vec![0], vec![0]);
    }
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return (prefix.to_vec(), end);
        }
    }
    (prefix.to_vec(), vec![0])
}

/// A lease TTL in whole seconds, rounded up, at least 1 (etcd's unit; 0 would be invalid).
fn ttl_secs(ttl: Duration) -> u64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    secs.max(1)
}

/// Removes and returns the first complete line of `buf` (without its `\n`), skipping blank
/// ones. With `eof`, a final unterminated line counts as complete.
fn take_line(buf: &mut Vec<u8>, eof: bool) -> Option<Vec<u8>> {
    loop {
        let line = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let mut line: Vec<u8> = buf.drain(..=i).collect();
                line.pop();
                line
            }
            None if eof && !buf.is_empty() => std::mem::take(buf),
            None => return None,
        };
        if !line.iter().all(u8::is_ascii_whitespace) {
            return Some(line);
        }
    }
}

/// One line of a watch stream: `Ok(None)` for lines that carry nothing for the caller (the
/// `created` acknowledgement), a batch for events or progress, an error for a cancellation.
fn decode_watch_line(
    line: &[u8],
    requested: i64,
    endpoint: &str,
) -> Result<Option<WatchBatch>, StoreError> {
    let msg: WireWatchLine =
        serde_json::from_slice(line).map_err(|e| decode_err("etcd watch message", e))?;
    if let Some(err) = msg.error {
        return Err(StoreError::Status {
            endpoint: endpoint.to_string(),
            what: "POST /v3/watch".into(),
            status: err.http_code.unwrap_or(500),
            body: first_line(&err.message),
        });
    }
    let Some(r) = msg.result else {
        return Err(decode_err("etcd watch message", "neither result nor error"));
    };
    if r.canceled {
        if r.compact_revision > 0 {
            return Err(StoreError::Compacted {
                requested,
                compact_revision: r.compact_revision,
            });
        }
        return Err(StoreError::Status {
            endpoint: endpoint.to_string(),
            what: "POST /v3/watch".into(),
            status: 200,
            body: format!("watch canceled: {}", first_line(&r.cancel_reason)),
        });
    }
    if r.created && r.events.is_empty() {
        return Ok(None);
    }
    let events = r
        .events
        .into_iter()
        .map(|ev| {
            let kv = ev.kv.decode()?;
            Ok(match ev.kind.as_deref() {
                Some("DELETE") => WatchEvent::Delete {
                    key: kv.key,
                    mod_revision: kv.mod_revision,
                },
                _ => WatchEvent::Put(kv),
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Some(WatchBatch {
        revision: r.header.revision,
        events,
    }))
}

fn decode_err(what: &str, reason: impl std::fmt::Display) -> StoreError {
    StoreError::Decode {
        what: what.to_string(),
        reason: reason.to_string(),
    }
}

/// The first line of `text`, trimmed and cut to a readable length.
/// The message of a gateway error answer (`{"error": .., "message": .., "code": ..}`), or its
/// first line when it is not one.
fn gateway_message(text: &str) -> String {
    #[derive(Deserialize)]
    struct WireError {
        #[serde(default)]
        message: String,
    }
    match serde_json::from_str::<WireError>(text) {
        Ok(w) if !w.message.is_empty() => first_line(&w.message),
        _ => first_line(text),
    }
}

fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default().trim();
    match line.char_indices().nth(300) {
        Some((i, _)) => format!("{}...", &line[..i]),
        None => line.to_string(),
    }
}

/// An int64 as the gateway sends it: a JSON string, or a number from other encoders.
fn int64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        Num(i64),
        Str(String),
    }
    match Int::deserialize(d)? {
        Int::Num(n) => Ok(n),
        Int::Str(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, Default, Deserialize)]
struct WireHeader {
    #[serde(default, deserialize_with = "int64")]
    revision: i64,
}

/// Answers where only the header matters (put, deleterange, revoke).
#[derive(Debug, Deserialize)]
struct HeaderOnly {
    #[serde(default)]
    header: WireHeader,
}

/// The answer to `/v3/kv/txn`: proto3 JSON leaves `succeeded` out when it is false.
#[derive(Debug, Deserialize)]
struct WireTxn {
    #[serde(default)]
    succeeded: bool,
}

#[derive(Debug, Default, Deserialize)]
struct WireKv {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default, deserialize_with = "int64")]
    mod_revision: i64,
    #[serde(default, deserialize_with = "int64")]
    lease: i64,
}

impl WireKv {
    fn decode(self) -> Result<KeyValue, StoreError> {
        let key = B64
            .decode(&self.key)
            .map_err(|e| decode_err("etcd key (base64)", e))?;
        let value = B64
            .decode(&self.value)
            .map_err(|e| decode_err("etcd value (base64)", e))?;
        Ok(KeyValue {
            key: String::from_utf8_lossy(&key).into_owned(),
            value,
            mod_revision: self.mod_revision,
            lease: self.lease,
        })
    }
}

#[derive(Debug, Deserialize)]
struct WireRange {
    #[serde(default)]
    header: WireHeader,
    #[serde(default)]
    kvs: Vec<WireKv>,
}

impl WireRange {
    fn into_result(self) -> Result<RangeResult, StoreError> {
        Ok(RangeResult {
            kvs: self
                .kvs
                .into_iter()
                .map(WireKv::decode)
                .collect::<Result<_, _>>()?,
            revision: self.header.revision,
        })
    }
}

/// A lease grant answer, or the `result` of a keepalive one.
#[derive(Debug, Deserialize)]
struct WireLease {
    #[serde(rename = "ID", default, deserialize_with = "int64")]
    id: i64,
    #[serde(rename = "TTL", default, deserialize_with = "int64")]
    ttl: i64,
}

#[derive(Debug, Deserialize)]
struct WireKeepalive {
    #[serde(default)]
    result: Option<WireLease>,
}

#[derive(Deserialize)]
struct WireAuth {
    #[serde(default)]
    token: String,
}

#[derive(Debug, Deserialize)]
struct WireWatchLine {
    #[serde(default)]
    result: Option<WireWatch>,
    #[serde(default)]
    error: Option<WireStreamError>,
}

/// An error grpc-gateway puts into a stream after it has started (the status is already 200).
#[derive(Debug, Deserialize)]
struct WireStreamError {
    #[serde(default)]
    http_code: Option<u16>,
    #[serde(default)]
    message: String,
}

#[derive(Debug, Deserialize)]
struct WireWatch {
    #[serde(default)]
    header: WireHeader,
    #[serde(default)]
    created: bool,
    #[serde(default)]
    canceled: bool,
    #[serde(default, deserialize_with = "int64")]
    compact_revision: i64,
    #[serde(default)]
    cancel_reason: String,
    #[serde(default)]
    events: Vec<WireEvent>,
}

#[derive(Debug, Deserialize)]
struct WireEvent {
    /// `"DELETE"`, or absent for a put (the zero value of the enum is left out).
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    kv: WireKv,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ranges() {
        let cases: [(&[u8], &[u8], &[u8]); 6] = [
            (b"/services/", b"/services/", b"/services0"),
            (b"a", b"a", b"b"),
            (b"", b"\0", b"\0"),
            (b"a\xff", b"a\xff", b"b"),
            (b"a\xfe\xff\xff", b"a\xfe\xff\xff", b"a\xff"),
            (b"\xff\xff", b"\xff\xff", b"\0"),
        ];
        for (prefix, key, end) in cases {
            assert_eq!(
                prefix_range(prefix),
                (key.to_vec(), end.to_vec()),
                "{prefix:?}"
            );
        }
    }

    #[test]
    fn ttl_rounding() {
        let cases = [
            (Duration::ZERO, 1),
            (Duration::from_millis(1), 1),
            (Duration::from_secs(1), 1),
            (Duration::from_millis(1500), 2),
            (Duration::from_secs(30), 30),
        ];
        for (ttl, want) in cases {
            assert_eq!(ttl_secs(ttl), want, "{ttl:?}");
        }
    }

    #[test]
    fn decodes_range_with_string_and_number_int64s() {
        let text = r#"{"header":{"cluster_id":"1","revision":"42","raft_term":"2"},
            "kvs":[{"key":"L2EvYg==","create_revision":"2","mod_revision":"7","version":"1",
                    "value":"MQ==","lease":"7587849128391"},
                   {"key":"L2Ev/w==","mod_revision":9}],"count":"2"}"#;
        let r: WireRange = serde_json::from_str(text).unwrap();
        let r = r.into_result().unwrap();
        assert_eq!(r.revision, 42);
        assert_eq!(
            r.kvs,
            vec![
                KeyValue {
                    key: "/a/b".into(),
                    value: b"1".to_vec(),
                    mod_revision: 7,
                    lease: 7587849128391,
                },
                KeyValue {
                    key: "/a/\u{fffd}".into(),
                    value: vec![],
                    mod_revision: 9,
                    lease: 0,
                },
            ]
        );
        // An empty range leaves `kvs` out altogether.
        let r: WireRange = serde_json::from_str(r#"{"header":{"revision":"3"}}"#).unwrap();
        assert_eq!(r.into_result().unwrap().kvs, vec![]);
        // Bad base64 and bad int64 strings are decode errors, not panics.
        let r: WireRange = serde_json::from_str(r#"{"kvs":[{"key":"!!"}]}"#).unwrap();
        assert!(matches!(r.into_result(), Err(StoreError::Decode { .. })));
        assert!(serde_json::from_str::<WireRange>(r#"{"header":{"revision":"x"}}"#).is_err());
    }

    #[test]
    fn decodes_leases() {
        let g: WireLease =
            serde_json::from_str(r#"{"header":{},"ID":"4111120247185638149","TTL":"5"}"#).unwrap();
        assert_eq!((g.id, g.ttl), (4111120247185638149, 5));
        let alive: WireKeepalive =
            serde_json::from_str(r#"{"result":{"ID":"7","TTL":"5"}}"#).unwrap();
        assert_eq!(alive.result.unwrap().ttl, 5);
        // A revoked lease: the ID comes back, the TTL is left out.
        let gone: WireKeepalive = serde_json::from_str(r#"{"result":{"ID":"7"}}"#).unwrap();
        assert_eq!(gone.result.unwrap().ttl, 0);
    }

    fn watch(line: &str) -> Result<Option<WatchBatch>, StoreError> {
        decode_watch_line(line.as_bytes(), 5, "http://e:1")
    }

    #[test]
    fn decodes_watch_messages() {
        assert_eq!(
            watch(r#"{"result":{"header":{"revision":"2"},"created":true}}"#).unwrap(),
            None
        );
        let b = watch(
            r#"{"result":{"header":{"revision":"7"},"events":[
                {"kv":{"key":"L2EvYg==","mod_revision":"6","value":"MQ=="}},
                {"type":"DELETE","kv":{"key":"L2EvYg==","mod_revision":"7"}}]}}"#
                .replace('\n', "")
                .as_str(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            b,
            WatchBatch {
                revision: 7,
                events: vec![
                    WatchEvent::Put(KeyValue {
                        key: "/a/b".into(),
                        value: b"1".to_vec(),
                        mod_revision: 6,
                        lease: 0
                    }),
                    WatchEvent::Delete {
                        key: "/a/b".into(),
                        mod_revision: 7
                    },
                ]
            }
        );
        // Progress notification: a revision, no events.
        assert_eq!(
            watch(r#"{"result":{"header":{"revision":"9"}}}"#).unwrap(),
            Some(WatchBatch {
                revision: 9,
                events: vec![]
            })
        );
        match watch(r#"{"result":{"header":{},"canceled":true,"compact_revision":"4"}}"#) {
            Err(StoreError::Compacted {
                requested: 5,
                compact_revision: 4,
            }) => {}
            other => panic!("{other:?}"),
        }
        match watch(r#"{"result":{"canceled":true,"cancel_reason":"gone"}}"#) {
            Err(StoreError::Status { body, .. }) => assert!(body.contains("gone"), "{body}"),
            other => panic!("{other:?}"),
        }
        match watch(r#"{"error":{"grpc_code":14,"http_code":503,"message":"no leader"}}"#) {
            Err(StoreError::Status {
                status: 503, body, ..
            }) => assert_eq!(body, "no leader"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(watch("{not json"), Err(StoreError::Decode { .. })));
        assert!(matches!(watch("{}"), Err(StoreError::Decode { .. })));
    }

    #[test]
    fn splits_lines_across_chunks() {
        let stream = b"{\"a\":1}\n\n{\"b\":\n2}\n{\"c\":3}";
        for chunk_len in 1..stream.len() {
            let mut buf = Vec::new();
            let mut lines = Vec::new();
            for chunk in stream.chunks(chunk_len) {
                buf.extend_from_slice(chunk);
                while let Some(l) = take_line(&mut buf, false) {
                    lines.push(String::from_utf8(l).unwrap());
                }
            }
            while let Some(l) = take_line(&mut buf, true) {
                lines.push(String::from_utf8(l).unwrap());
            }
            assert_eq!(
                lines,
                ["{\"a\":1}", "{\"b\":", "2}", "{\"c\":3}"],
                "chunk length {chunk_len}"
            );
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn first_line_cuts() {
        assert_eq!(first_line("  a\nb"), "a");
        assert_eq!(first_line(""), "");
        let long = "x".repeat(400);
        assert_eq!(first_line(&long).len(), 303);
    }
}
