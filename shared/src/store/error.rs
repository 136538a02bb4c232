//! Why a store operation failed ([`StoreError`]), and whom a failure concerns ([`Scope`]):
//! one registration, or the whole store. Callers decide from the scope whether to retry one
//! item later or to treat the store as down.

use crate::validate::{self, ValidationError};

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
/// Consul's `Scripts are disabled on this agent` to one registration's script check is about
/// that registration; taken for an outage, it would stall every other registration.
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

    /// What kind of failure this is, as one stable word for logs and health reasons
    /// (`tls`, `unreachable`, `denied`...): the message says the rest.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Unreachable { .. } => "unreachable",
            StoreError::Tls { .. } => "tls",
            StoreError::Denied { .. } => "denied",
            StoreError::Status { .. } => "status",
            StoreError::Compacted { .. } => "compacted",
            StoreError::Expired { .. } => "expired",
            StoreError::Decode { .. } => "decode",
            StoreError::Invalid(_) => "invalid",
        }
    }
}

/// The failure a retry loop reported last, so that it logs a failure when its cause changes
/// (its kind or its message: the store went from refusing connections to presenting a
/// certificate from another CA) rather than only the first of a run of failures, which kept
/// naming a cause long gone, and never at every retry.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FailureLog {
    last: Option<String>,
}

impl FailureLog {
    /// Nothing failing.
    pub fn new() -> Self {
        FailureLog::default()
    }

    /// Records a failure. Returns whether it is news: the first of a run, or a cause other
    /// than the last one reported (then the caller logs it).
    pub fn failed(&mut self, e: &StoreError) -> bool {
        let cause = format!("{}: {e}", e.kind());
        if self.last.as_deref() == Some(cause.as_str()) {
            return false;
        }
        self.last = Some(cause);
        true
    }

    /// Records a success. Returns whether failures were being reported (then the caller may
    /// say that they ended).
    pub fn succeeded(&mut self) -> bool {
        self.last.take().is_some()
    }

    /// Whether the last outcome was a failure.
    pub fn is_failing(&self) -> bool {
        self.last.is_some()
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

/// What the store clients refuse before sending: every [`validate`] failure except an empty
/// value. An empty name or ID escapes no key layout and breaks no URL; the store refuses it
/// itself with its own reason (Consul answers 400), which callers already
/// treat as an item failure.
pub(super) fn guard(checked: Result<(), ValidationError>) -> Result<(), StoreError> {
    match checked {
        Err(e) if e.problem != validate::Problem::Empty => Err(StoreError::Invalid(e)),
        _ => Ok(()),
    }
}

/// A failed exchange with `endpoint`, as the store error it is: [`StoreError::Tls`] when the
/// TLS handshake failed (told apart by rustls' own phrases, the only stable mark reqwest
/// leaves), [`StoreError::Unreachable`] otherwise. `what` names the request.
pub(super) fn transport_error(endpoint: &str, what: &str, e: &reqwest::Error) -> StoreError {
    let reason = one_line(e);
    match tls_failure(&reason, endpoint.starts_with("https://")) {
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
/// the Docker engine's TLS, whose client is rustls too). `over_tls`: the connection was a TLS
/// one. In TLS 1.3 the client's side of the handshake is over before the server has judged
/// the client's certificate, so a server refusing it (or its absence) closes a connection the
/// client already counts as ready; whether the client then reads the server's alert or only
/// finds the connection gone depends on timing. Both are the same refusal.
pub fn tls_failure(reason: &str, over_tls: bool) -> Option<&'static str> {
    let r = reason.to_ascii_lowercase();
    let closed_after_handshake = over_tls
        && (r.contains("connection was not ready")
            || r.contains("connection closed before message completed"));
    if r.contains("invalid peer certificate") || r.contains("unknownissuer") {
        Some("server certificate verification failed (check the CA and the server name)")
    } else if r.contains("certificaterequired")
        || r.contains("badcertificate")
        || r.contains("unknownca")
        || r.contains("certificateunknown")
        || r.contains("received fatal alert")
    {
        Some("the server refused the handshake (client certificate missing or not trusted)")
    } else if closed_after_handshake {
        Some("the server closed the connection right after the handshake, before answering (client certificate missing or not trusted?)")
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_failure_is_news_when_its_cause_changes() {
        let refused = StoreError::Unreachable {
            endpoint: "https://127.0.0.1:8501".into(),
            reason: "GET /v1/catalog/services: connection refused".into(),
        };
        let tls = StoreError::Tls {
            endpoint: "https://127.0.0.1:8501".into(),
            reason: "server certificate verification failed".into(),
        };
        let mut log = FailureLog::new();
        // (outcome, news): None is a success.
        let table: Vec<(Option<&StoreError>, bool)> = vec![
            (Some(&refused), true),
            (Some(&refused), false),
            (Some(&tls), true),
            (Some(&tls), false),
            (Some(&refused), true),
            (None, true),
            (None, false),
            (Some(&refused), true),
        ];
        for (i, (outcome, news)) in table.into_iter().enumerate() {
            let got = match outcome {
                Some(e) => log.failed(e),
                None => log.succeeded(),
            };
            assert_eq!(got, news, "step {i}");
            assert_eq!(log.is_failing(), outcome.is_some(), "step {i}");
        }
        assert_eq!(tls.kind(), "tls");
        assert_eq!(refused.kind(), "unreachable");
    }

    #[test]
    fn tls_failures_are_named() {
        let refused =
            Some("the server refused the handshake (client certificate missing or not trusted)");
        let closed = Some("the server closed the connection right after the handshake, before answering (client certificate missing or not trusted?)");
        let table = [
            (
                "invalid peer certificate: UnknownIssuer",
                true,
                Some("server certificate verification failed (check the CA and the server name)"),
            ),
            ("received fatal alert: CertificateRequired", true, refused),
            // TLS 1.3: the refusal raced the request (seen in a full run).
            (
                "GET /v1/agent/services: error sending request: client error (Canceled): operation was canceled: connection was not ready",
                true,
                closed,
            ),
            ("connection closed before message completed", true, closed),
            // Without TLS a closed connection is only a closed connection.
            ("connection was not ready", false, None),
            ("connection refused", true, None),
        ];
        for (reason, over_tls, want) in table {
            assert_eq!(tls_failure(reason, over_tls), want, "{reason}");
        }
    }
}
