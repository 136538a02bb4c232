//! The `SERVICE_*` values a container sets, as environment variables or labels: reading
//! them, their precedence, their limits and syntax, and the warnings about the ones dropped.
//!
//! Labels win over env; a port's own `SERVICE_<port>_<KEY>` wins over the container's
//! `SERVICE_<KEY>` ([`PortValues`]). Every key without a meaning of its own is metadata.
//!
//! Work per container is bounded and linear in its labels, since one container's values must
//! never hold up the registration of every other container on the host: values over
//! [`MAX_VALUE_BYTES`] and tag lists over [`MAX_TAGS`] are refused with a warning before any
//! work is done on them, tags are de-duplicated with a hash set, and the general `SERVICE_*`
//! values are parsed once, not once per port.

use super::input::ContainerInfo;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;
use switchboard::{excerpt, validate};

/// Longest `SERVICE_*` value (env or label) read, in bytes. Real values are a few dozen
/// bytes; a longer one is refused whole rather than cut, since any cut would be arbitrary.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Most tags one `SERVICE_TAGS` value may hold (after de-duplication). A longer list is
/// refused whole: the service is registered without those tags.
pub const MAX_TAGS: usize = 128;
/// Most metadata pairs per service: Consul's own limit, applied to every store alike.
pub use switchboard::validate::META_MAX_PAIRS as MAX_META_PAIRS;

/// A `SERVICE_*` value (or label) that was dropped, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Warning {
    /// The variable or label as the container spells it (`SERVICE_CHECK_INTERVAL`).
    pub key: String,
    /// Its value, shortened for log lines ([`switchboard::excerpt`]): at most 64 characters
    /// and, when cut, the full length.
    pub value: String,
    /// What would have been accepted.
    pub expected: String,
}

/// Keys with a meaning of their own; every other `SERVICE_<KEY>` becomes metadata. `drain` is
/// ours (the drain-on-stop opt-out, read by `drain`), not a service property.
const KNOWN_KEYS: &[&str] = &[
    "name",
    "id",
    "tags",
    "ignore",
    "check_http",
    "check_https",
    "check_tcp",
    "check_ttl",
    "check_script",
    "check_interval",
    "check_timeout",
    "check_initial_status",
    "check_deregister_after",
    "check_http_method",
    "check_https_method",
    "check_tls_skip_verify",
    "check_grpc",
    "check_grpc_use_tls",
    "check_cmd",
    "drain",
    "network",
];

/// A `SERVICE_*` value with the key it came from (for warnings).
#[derive(Debug, Clone)]
pub(super) struct MetaValue {
    /// The variable or label as the container spells it.
    pub(super) source: String,
    /// Its value.
    pub(super) value: String,
}

/// `SERVICE_*` values from env and labels, general and per port.
#[derive(Debug, Default)]
pub(super) struct Metadata {
    /// `SERVICE_<KEY>`, by lowercase key.
    pub(super) general: BTreeMap<String, MetaValue>,
    /// `SERVICE_<port>_<KEY>`, by port, then lowercase key.
    per_port: BTreeMap<u16, BTreeMap<String, MetaValue>>,
}

/// Collects `SERVICE_*` env entries then labels (labels win), noting malformed port keys.
pub(super) fn collect_metadata(info: &ContainerInfo, warnings: &mut Vec<Warning>) -> Metadata {
    let mut md = Metadata::default();
    let env = info.env.iter().filter_map(|e| e.split_once('='));
    let labels = info.labels.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    for (key, value) in env.chain(labels) {
        let Some(rest) = key.strip_prefix("SERVICE_") else {
            continue;
        };
        if rest.is_empty() {
            continue;
        }
        if value.len() > MAX_VALUE_BYTES {
            warnings.push(Warning {
                key: key.to_string(),
                value: excerpt(value).to_string(),
                expected: format!("a value of at most {MAX_VALUE_BYTES} bytes"),
            });
            continue;
        }
        let entry = MetaValue {
            source: key.to_string(),
            value: value.to_string(),
        };
        let (first, after) = rest.split_once('_').unwrap_or((rest, ""));
        if !first.is_empty() && first.bytes().all(|b| b.is_ascii_digit()) {
            match first.parse::<u16>() {
                Ok(port) if port > 0 && !after.is_empty() => {
                    md.per_port
                        .entry(port)
                        .or_default()
                        .insert(after.to_ascii_lowercase(), entry);
                }
                _ => warnings.push(Warning {
                    key: key.to_string(),
                    value: excerpt(value).to_string(),
                    expected: "SERVICE_<port>_<KEY> with a port from 1 to 65535".into(),
                }),
            }
        } else {
            md.general.insert(rest.to_ascii_lowercase(), entry);
        }
    }
    md
}

impl Metadata {
    /// The values that apply to container port `port`.
    pub(super) fn port(&self, port: u16) -> PortValues<'_> {
        static NONE: BTreeMap<String, MetaValue> = BTreeMap::new();
        PortValues {
            general: &self.general,
            own: self.per_port.get(&port).unwrap_or(&NONE),
        }
    }
}

/// The `SERVICE_*` values that apply to one port: its own over the container's general ones.
#[derive(Debug, Clone, Copy)]
pub(super) struct PortValues<'m> {
    general: &'m BTreeMap<String, MetaValue>,
    own: &'m BTreeMap<String, MetaValue>,
}

impl<'m> PortValues<'m> {
    /// The port's own value for `key`, else the container's.
    pub(super) fn get(&self, key: &str) -> Option<&'m MetaValue> {
        self.own.get(key).or_else(|| self.general.get(key))
    }

    /// The port's own values (`SERVICE_<port>_<KEY>`) alone.
    pub(super) fn own(&self) -> &'m BTreeMap<String, MetaValue> {
        self.own
    }
}

/// Parses a duration the way gliderlabs users write them: Go syntax (`10s`, `1m30s`, `500ms`,
/// `1.5h`) or a bare integer meaning seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let num: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += num * factor;
    }
    (total.is_finite() && total < 1e12).then(|| Duration::from_secs_f64(total))
}

/// IGNORE semantics: any value ignores, except `false`, `0` and empty.
pub(super) fn truthy(v: &str) -> bool {
    let v = v.trim();
    !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false"))
}

/// The `-tags` flag's list: `a, b,,c` -> `[a, b, c]`. Tags are derivation's business; the
/// flag's value is the operator's, so it is trusted (unlike `SERVICE_TAGS`, see [`parse_tags`]).
pub fn split_tags(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect()
}

/// The tags of one `SERVICE_TAGS` value: comma-separated, trimmed, de-duplicated in linear
/// time, in first-seen order. A tag with whitespace or control characters is dropped (one
/// warning); more than [`MAX_TAGS`] distinct tags refuse the whole value (one warning, no
/// tags), so the work stops there.
pub(super) fn parse_tags(v: &MetaValue, warnings: &mut Vec<Warning>) -> Vec<String> {
    let mut ctx = Ctx { warnings };
    let mut seen: HashSet<&str> = HashSet::new();
    let mut tags = Vec::new();
    let mut bad = false;
    for t in v.value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bad = true;
        } else if seen.insert(t) {
            if tags.len() == MAX_TAGS {
                ctx.warn(
                    v,
                    &format!("at most {MAX_TAGS} comma-separated tags; none of them are used"),
                );
                return Vec::new();
            }
            tags.push(t.to_string());
        }
    }
    if bad {
        ctx.warn(
            v,
            "comma-separated tags without whitespace or control characters",
        );
    }
    tags
}

/// The metadata pairs among `SERVICE_*` values: every key without a meaning of its own, if
/// Consul would accept it (warning otherwise), at most [`MAX_META_PAIRS`] + 1 of them (the
/// extra one tells [`merge_meta`] that some were cut), in key order.
pub(super) fn meta_pairs<'m>(
    md: &'m BTreeMap<String, MetaValue>,
    warnings: &mut Vec<Warning>,
) -> BTreeMap<&'m str, &'m MetaValue> {
    let mut ctx = Ctx { warnings };
    let mut out = BTreeMap::new();
    for (k, v) in md {
        if KNOWN_KEYS.contains(&k.as_str()) {
            continue;
        }
        if out.len() > MAX_META_PAIRS {
            break;
        }
        match validate::meta_problem(k, &v.value) {
            None => {
                out.insert(k.as_str(), v);
            }
            Some(problem) => ctx.warn(v, problem.expected()),
        }
    }
    out
}

/// A service's metadata: the general pairs overridden by the port's, the first
/// [`MAX_META_PAIRS`] keys in order (one warning names the first key dropped).
pub(super) fn merge_meta(
    general: &BTreeMap<&str, &MetaValue>,
    port: BTreeMap<&str, &MetaValue>,
    warnings: &mut Vec<Warning>,
) -> BTreeMap<String, String> {
    let mut merged = general.clone();
    merged.extend(port);
    let mut meta = BTreeMap::new();
    for (k, v) in merged {
        if meta.len() == MAX_META_PAIRS {
            Ctx { warnings }.warn(
                v,
                &format!(
                    "at most {MAX_META_PAIRS} metadata pairs per service (this key and the \
                     ones after it in alphabetical order are dropped)"
                ),
            );
            break;
        }
        meta.insert(k.to_string(), v.value.clone());
    }
    meta
}

/// A service's tags: its port's own `SERVICE_<port>_TAGS`, else the container's
/// `SERVICE_TAGS` (`general`, parsed once for all ports), then those of `-tags` (`extra`) not
/// among them yet.
pub(super) fn service_tags(
    values: &PortValues,
    general: Option<&Vec<String>>,
    extra: &[String],
    warnings: &mut Vec<Warning>,
) -> Vec<String> {
    let port_tags = values.own().get("tags").map(|v| parse_tags(v, warnings));
    let mut tags = port_tags.or_else(|| general.cloned()).unwrap_or_default();
    let mut seen: HashSet<String> = tags.iter().cloned().collect();
    for t in extra {
        if seen.insert(t.clone()) {
            tags.push(t.clone());
        }
    }
    tags
}

/// Collects warnings while deriving one service.
pub(super) struct Ctx<'w> {
    /// Where they go.
    pub(super) warnings: &'w mut Vec<Warning>,
}

impl Ctx<'_> {
    /// Warns that `v` was dropped: `expected` says what would have been accepted.
    pub(super) fn warn(&mut self, v: &MetaValue, expected: &str) {
        self.warnings.push(Warning {
            key: v.source.clone(),
            value: excerpt(&v.value).to_string(),
            expected: expected.to_string(),
        });
    }

    /// `Some(v)` when `ok`, else a warning and `None`.
    pub(super) fn check<'v>(
        &mut self,
        v: &'v MetaValue,
        ok: bool,
        expected: &str,
    ) -> Option<&'v MetaValue> {
        if ok {
            Some(v)
        } else {
            self.warn(v, expected);
            None
        }
    }

    /// A duration `SERVICE_*` value (see [`parse_duration`]); a malformed one (or zero, when
    /// `must_be_positive`) warns and is `None`.
    pub(super) fn duration(
        &mut self,
        v: Option<&MetaValue>,
        must_be_positive: bool,
    ) -> Option<Duration> {
        let v = v?;
        match parse_duration(&v.value) {
            Some(d) if !must_be_positive || !d.is_zero() => Some(d),
            _ => {
                self.warn(
                    v,
                    "a duration such as 10s, 1m30s or 500ms (a bare number means seconds)",
                );
                None
            }
        }
    }
}

const FLAG_EXPECTED: &str = "true or false (also 1/0, yes/no, on/off)";

/// A yes/no `SERVICE_*` value. Unlike gliderlabs (any non-empty value, `false` included,
/// meant yes), `false` means no; anything unrecognised warns and means no.
pub(super) fn flag(v: Option<&MetaValue>, ctx: &mut Ctx) -> bool {
    let Some(v) = v else { return false };
    match v.value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => true,
        "false" | "0" | "no" | "off" | "" => false,
        _ => {
            ctx.warn(v, FLAG_EXPECTED);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::derive::fixtures::*;
    use crate::derive::{derive, DeriveOptions};

    #[test]
    fn durations() {
        let cases = [
            ("10", Some(10_000)),
            ("10s", Some(10_000)),
            ("1m30s", Some(90_000)),
            ("500ms", Some(500)),
            ("1.5s", Some(1_500)),
            ("1h", Some(3_600_000)),
            ("0", Some(0)),
            ("abc", None),
            ("", None),
            ("10x", None),
            ("-5s", None),
            ("s", None),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse_duration(input).map(|d| d.as_millis() as u64),
                want,
                "{input}"
            );
        }
    }

    #[test]
    fn tags_meta_and_ttl() {
        let info = with_labels(
            with_env(
                web(),
                &[
                    "SERVICE_TAGS=a,b",
                    "SERVICE_REGION=eu",
                    "SERVICE_80_ZONE=z1",
                    "SERVICE_Mixed_Case=v",
                    "SERVICE_DRAIN=false",
                ],
            ),
            &[("SERVICE_TAGS", "b, c"), ("other", "x")],
        );
        let o = DeriveOptions {
            tags: vec!["c".into(), "d".into()],
            ttl: Some(Duration::from_secs(30)),
            ..opts()
        };
        let d = derive(&info, &o);
        let s = &d.services[0];
        assert_eq!(s.tags, vec!["b", "c", "d"]);
        let meta: Vec<_> = s.meta.iter().map(|(k, v)| format!("{k}={v}")).collect();
        // SERVICE_DRAIN is the registrator's own switch, not metadata.
        assert_eq!(meta, vec!["mixed_case=v", "region=eu", "zone=z1"]);
        assert_eq!(s.ttl, Some(Duration::from_secs(30)));
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
    }

    #[test]
    fn sizes_are_bounded_and_tags_deduplicated_in_linear_time() {
        let tags = |n: usize| {
            (0..n)
                .map(|i| format!("t{i}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let big = "x".repeat(MAX_VALUE_BYTES + 1);
        let two_mb_tags = format!("SERVICE_TAGS={}", tags(200_000));
        let dup_tags = format!("SERVICE_TAGS={}", vec!["same"; 10_000].join(","));
        let max_tags = format!("SERVICE_TAGS={}", tags(MAX_TAGS));
        let too_many = format!("SERVICE_TAGS={}", tags(MAX_TAGS + 1));
        let big_meta = format!("SERVICE_NOTE={big}");
        // (env, tags kept, warned key, words of the warning)
        type Case<'a> = (&'a str, usize, Option<(&'a str, &'a str)>);
        let cases: Vec<Case> = vec![
            (
                &two_mb_tags,
                0,
                Some(("SERVICE_TAGS", "at most 65536 bytes")),
            ),
            (&dup_tags, 1, None),
            (&max_tags, MAX_TAGS, None),
            (&too_many, 0, Some(("SERVICE_TAGS", "at most 128"))),
            (&big_meta, 0, Some(("SERVICE_NOTE", "at most 65536 bytes"))),
        ];
        for (env, kept, warned) in cases {
            let started = std::time::Instant::now();
            let d = derive(&with_env(web(), &[env]), &opts());
            // Quadratic de-duplication of 200,000 tags takes most of a minute; bounded work
            // takes milliseconds, so even a slow debug build stays far below this.
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{:?}",
                started.elapsed()
            );
            assert_eq!(d.services.len(), 1, "the service is still registered");
            assert_eq!(d.services[0].tags.len(), kept);
            match warned {
                None => assert!(d.warnings.is_empty(), "{:?}", d.warnings),
                Some((key, words)) => {
                    assert_eq!(d.warnings.len(), 1, "{:?}", d.warnings);
                    assert_eq!(d.warnings[0].key, key);
                    assert!(d.warnings[0].expected.contains(words), "{:?}", d.warnings);
                    assert!(d.warnings[0].value.len() < 100, "{:?}", d.warnings[0].value);
                }
            }
        }
        // The label form of the 2 MB value: its warning carries its length.
        let d = derive(
            &with_labels(web(), &[("SERVICE_TAGS", &"a,".repeat(1 << 20))]),
            &opts(),
        );
        assert!(
            d.warnings[0].value.ends_with("(2097152 bytes)"),
            "{:?}",
            d.warnings
        );
        // Tags from SERVICE_TAGS and -tags merged without repeats, in first-seen order.
        let d = derive(
            &with_env(web(), &["SERVICE_TAGS=b,a,b"]),
            &DeriveOptions {
                tags: vec!["a".into(), "c".into()],
                ..opts()
            },
        );
        assert_eq!(d.services[0].tags, vec!["b", "a", "c"]);
    }

    #[test]
    fn metadata_is_capped_at_consuls_limit() {
        let env: Vec<String> = (0..70).map(|i| format!("SERVICE_K{i:02}=v")).collect();
        let env: Vec<&str> = env.iter().map(String::as_str).collect();
        let mut c = with_env(two_ports(), &env);
        c.env.push("SERVICE_80_K00=port".into());
        let d = derive(&c, &opts());
        for s in &d.services {
            assert_eq!(s.meta.len(), MAX_META_PAIRS, "{}", s.id);
            assert!(s.meta.contains_key("k63") && !s.meta.contains_key("k64"));
        }
        assert_eq!(d.services[0].meta["k00"], "port", "the port's value wins");
        assert_eq!(d.services[1].meta["k00"], "v");
        assert_eq!(d.warnings.len(), 1, "{:?}", d.warnings);
        assert_eq!(d.warnings[0].key, "SERVICE_K64");
    }
}
