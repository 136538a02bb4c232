//! The one place that decides which service names, IDs and ports Switchboard handles.
//!
//! Names and IDs come from container labels, so they are untrusted, and they end up as path
//! segments of Consul's HTTP API (`/v1/health/service/<name>`,
//! `/v1/agent/service/deregister/<id>`) and of key layouts (`<prefix>/<name>/<id>` in Consul
//! KV and etcd). The rules are what every store accepts AND can address again afterwards:
//!
//! - not empty;
//! - not only dots: `.` and `..` are path segments that URL handling collapses even when
//!   percent-encoded, so Consul answers 400 to a health query for `.` (which would hold back
//!   confd's snapshot for every service) and 405 to deregistering `..` (which could never be removed),
//!   and in a key `..` climbs out of the prefix. `...` is refused too: one rule a user can
//!   remember beats the exact set URL normalisers treat specially;
//! - no `/`: it would add levels to a key and change which endpoint a request reaches;
//! - no control characters: they split log lines and config lines;
//! - at most [`NAME_MAX_BYTES`] / [`ID_MAX_BYTES`] bytes: far above any real name, far below
//!   what makes one request, key or log line heavy (Consul's HTTP server refuses request
//!   lines over 1 MB; a 1.2 MB name once made every confd query about it fail).
//!
//! Everything else (spaces, `;`, `{`, non-ASCII) is accepted here because every store
//! accepts it; templates must still quote such values (confd's `*_name` / `*_string`
//! helpers). The registrator adds a stricter rule of its own for labels (no whitespace).
//!
//! Ports ([`port`]): 1 to 65535, checked on every entry read back from a store, since any
//! writer may have put any integer there (Consul accepts 65536, -5 and 0 on registration).

use crate::excerpt;
use std::fmt;

/// Longest service name accepted, in bytes.
pub const NAME_MAX_BYTES: usize = 255;
/// Longest service ID accepted, in bytes (default IDs are `<host>:<container>:<port>`).
pub const ID_MAX_BYTES: usize = 512;

/// Which value was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// A service name.
    Name,
    /// A service ID.
    Id,
}

impl Field {
    /// The length limit in bytes.
    pub fn max(self) -> usize {
        match self {
            Field::Name => NAME_MAX_BYTES,
            Field::Id => ID_MAX_BYTES,
        }
    }

    /// What would have been accepted, for messages.
    pub fn expected(self) -> String {
        format!(
            "1 to {} bytes, not only dots, without '/' or control characters",
            self.max()
        )
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Name => "service name",
            Field::Id => "service ID",
        })
    }
}

/// What is wrong with a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// The value is empty.
    Empty,
    /// Only dots (`.`, `..`): a path segment URL handling collapses.
    DotsOnly,
    /// Longer than the limit.
    TooLong {
        /// Length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// Contains `/`.
    Slash,
    /// Contains a control character (newline, NUL, ...).
    Control,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Empty => f.write_str("it is empty"),
            Problem::DotsOnly => f.write_str("it is only dots"),
            Problem::TooLong { len, max } => write!(f, "it has {len} bytes, more than {max}"),
            Problem::Slash => f.write_str("it contains '/'"),
            Problem::Control => f.write_str("it contains a control character"),
        }
    }
}

/// A name or ID refused by [`service_name`] or [`service_id`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} {value}: {problem}; expected {}", .field.expected())]
pub struct ValidationError {
    /// Name or ID.
    pub field: Field,
    /// The value, quoted and shortened for logs (see [`excerpt`](crate::excerpt())).
    pub value: String,
    /// What is wrong with it.
    pub problem: Problem,
}

/// Checks a service name (see the module docs for the rules and why).
pub fn service_name(name: &str) -> Result<(), ValidationError> {
    check(Field::Name, name)
}

/// Checks a service ID (see the module docs for the rules and why).
pub fn service_id(id: &str) -> Result<(), ValidationError> {
    check(Field::Id, id)
}

fn check(field: Field, value: &str) -> Result<(), ValidationError> {
    // Length first: it bounds the work of the scans below.
    let problem = if value.is_empty() {
        Problem::Empty
    } else if value.len() > field.max() {
        Problem::TooLong {
            len: value.len(),
            max: field.max(),
        }
    } else if value.bytes().all(|b| b == b'.') {
        Problem::DotsOnly
    } else if value.contains('/') {
        Problem::Slash
    } else if value.chars().any(char::is_control) {
        Problem::Control
    } else {
        return Ok(());
    };
    Err(ValidationError {
        field,
        value: format!("{:?}", excerpt(value)),
        problem,
    })
}

/// A port refused by [`port`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid port {value}; expected 1 to 65535")]
pub struct PortError {
    /// The port as stored.
    pub value: i64,
}

/// Checks a port as a store holds it (Consul any integer, an etcd value any JSON number):
/// 1 to 65535. 0 is refused too: nothing can connect to it, and the proxies' configs refuse
/// it (the shipped templates' `addr` helper fails the whole render on it).
pub fn port(value: i64) -> Result<u16, PortError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(PortError { value })
}

/// Most metadata pairs per service: Consul's own limit (`structs.ValidateServiceMetadata`),
/// applied to every store alike, so a service means the same wherever it is registered.
pub const META_MAX_PAIRS: usize = 64;
const META_MAX_KEY_LEN: usize = 128;
const META_MAX_VALUE_LEN: usize = 512;

/// Why Consul would reject this metadata pair (it refuses the whole registration then), if
/// it would. The registrator drops such pairs with a warning; the Consul client filters them
/// again before sending, for services from elsewhere.
pub fn meta_problem(key: &str, value: &str) -> Option<MetaProblem> {
    if key.is_empty() {
        Some(MetaProblem::Key("empty key"))
    } else if key.len() > META_MAX_KEY_LEN {
        Some(MetaProblem::Key("key longer than 128 characters"))
    } else if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        Some(MetaProblem::Key("key has characters outside [A-Za-z0-9_-]"))
    } else if key.starts_with("consul-") {
        Some(MetaProblem::Key("key prefix consul- is reserved"))
    } else if value.len() > META_MAX_VALUE_LEN {
        Some(MetaProblem::Value("value longer than 512 characters"))
    } else {
        None
    }
}

/// What is wrong with a metadata pair: its key or its value, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaProblem {
    /// The key breaks Consul's rules.
    Key(&'static str),
    /// The value is too long.
    Value(&'static str),
}

impl MetaProblem {
    /// Why, in a few words.
    pub fn reason(self) -> &'static str {
        match self {
            MetaProblem::Key(r) | MetaProblem::Value(r) => r,
        }
    }

    /// What would have been accepted, for a warning naming the pair.
    pub fn expected(self) -> &'static str {
        match self {
            MetaProblem::Key(_) => {
                "a key of letters, digits, '_' and '-' (at most 128, not starting with consul-)"
            }
            MetaProblem::Value(_) => "a value of at most 512 bytes",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids() {
        let long_name = "n".repeat(NAME_MAX_BYTES + 1);
        let max_name = "n".repeat(NAME_MAX_BYTES);
        let max_id = "i".repeat(ID_MAX_BYTES);
        let huge = "x".repeat(1_200_000);
        let table: Vec<(&str, Option<Problem>)> = vec![
            ("web", None),
            ("host:web1:80", None),
            ("host:web1:53:udp", None),
            ("a.b-c_d", None),
            (".hidden", None),
            ("a..b", None),
            ("a; } server { listen 81; }", None),
            ("caf\u{e9}", None),
            (&max_name, None),
            ("", Some(Problem::Empty)),
            (".", Some(Problem::DotsOnly)),
            ("..", Some(Problem::DotsOnly)),
            ("...", Some(Problem::DotsOnly)),
            ("a/b", Some(Problem::Slash)),
            ("../x", Some(Problem::Slash)),
            ("a\nb", Some(Problem::Control)),
            ("a\0", Some(Problem::Control)),
            ("a\u{7f}", Some(Problem::Control)),
            (
                &long_name,
                Some(Problem::TooLong {
                    len: 256,
                    max: NAME_MAX_BYTES,
                }),
            ),
            (
                &huge,
                Some(Problem::TooLong {
                    len: 1_200_000,
                    max: NAME_MAX_BYTES,
                }),
            ),
        ];
        for (value, want) in table {
            let got = service_name(value).err().map(|e| e.problem);
            assert_eq!(got, want, "{:?}", excerpt(value));
        }
        assert!(service_id(&long_name).is_ok(), "IDs may be longer");
        assert!(service_id(&max_id).is_ok());
        assert!(service_id(&format!("{max_id}i")).is_err());
        assert_eq!(service_id("..").unwrap_err().field, Field::Id);
    }

    #[test]
    fn message_names_the_value_shortened_and_what_was_expected() {
        let e = service_name("..").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid service name \"..\": it is only dots; expected 1 to 255 bytes, \
             not only dots, without '/' or control characters"
        );
        let e = service_id(&"x".repeat(1_200_000)).unwrap_err();
        let msg = e.to_string();
        assert!(msg.len() < 300, "{msg}");
        assert!(msg.contains("(1200000 bytes)"), "{msg}");
        assert!(msg.contains("more than 512"), "{msg}");
        let e = service_name("a\nb").unwrap_err();
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    #[test]
    fn ports() {
        let table: [(i64, Option<u16>); 8] = [
            (1, Some(1)),
            (80, Some(80)),
            (65535, Some(65535)),
            (0, None),
            (65536, None),
            (-5, None),
            (i64::MAX, None),
            (i64::MIN, None),
        ];
        for (value, want) in table {
            assert_eq!(port(value).ok(), want, "{value}");
        }
        assert_eq!(
            port(65536).unwrap_err().to_string(),
            "invalid port 65536; expected 1 to 65535"
        );
    }

    #[test]
    fn meta_rules() {
        let long_key = "k".repeat(129);
        let table: [(&str, &str, bool); 9] = [
            ("version", "1", true),
            ("a-b_C9", "x", true),
            ("a b", "x", false),
            ("x;y", "x", false),
            ("", "x", false),
            ("consul-x", "x", false),
            ("k\u{e9}", "x", false),
            (&long_key, "x", false),
            ("big", &"v".repeat(513), false),
        ];
        for (key, value, ok) in table {
            assert_eq!(meta_problem(key, value).is_none(), ok, "{key:?}");
        }
        assert!(meta_problem(&"k".repeat(128), &"v".repeat(512)).is_none());
    }
}
