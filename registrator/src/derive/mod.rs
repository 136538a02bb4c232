//! Which services a container provides: gliderlabs/registrator's rules, as a pure function.
//!
//! [`derive`] maps what `docker inspect` says about a running container (reduced to
//! [`ContainerInfo`], so tests need no Docker) plus the registrator's flags to the services to
//! register, and to warnings about `SERVICE_*` values it had to drop. A malformed value never
//! stops a container from being registered: only the malformed part is left out. The one
//! exception is a name or ID that cannot be used: that service (that port) is not registered
//! at all, since registering it under another name would put it behind the wrong proxy
//! entry, while the container's other ports still are.
//!
//! Work per container is bounded and linear in its labels (issue 10: one 2 MB `SERVICE_TAGS`
//! label took 51 CPU-seconds of quadratic de-duplication, during which no container anywhere
//! on the host was registered): values over [`MAX_VALUE_BYTES`] and tag lists over
//! [`MAX_TAGS`] are refused with a warning before any work is done on them, tags are
//! de-duplicated with a hash set, and the general `SERVICE_*` values are parsed once, not once
//! per port.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;
use switchboard::{excerpt, validate, Check, CheckKind, Service};

/// Longest `SERVICE_*` value (env or label) read, in bytes. Real values are a few dozen
/// bytes; a longer one is refused whole rather than cut, since any cut would be arbitrary.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Most tags one `SERVICE_TAGS` value may hold (after de-duplication). A longer list is
/// refused whole: the service is registered without those tags.
pub const MAX_TAGS: usize = 128;
/// Most metadata pairs per service: Consul's own limit, applied to every store alike.
pub use switchboard::validate::META_MAX_PAIRS as MAX_META_PAIRS;

/// One port a container exposes, with the host bindings Docker published for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPort {
    /// Port inside the container.
    pub port: u16,
    /// `tcp`, `udp` or `sctp`.
    pub proto: String,
    /// `(host_ip, host_port)` bindings; empty when the port is only exposed.
    pub bindings: Vec<(String, u16)>,
}

/// The parts of a container's inspect data that decide its services.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    /// Full container ID.
    pub id: String,
    /// Name without Docker's leading `/`.
    pub name: String,
    /// `Config.Image` as the container was created with (`registry/path/name:tag@digest`).
    pub image: String,
    /// `Config.Env`, `KEY=value` strings.
    pub env: Vec<String>,
    /// `Config.Labels`.
    pub labels: BTreeMap<String, String>,
    /// Exposed ports, sorted by port then protocol.
    pub ports: Vec<ContainerPort>,
    /// The container's IP address on its (first) network, if it has one.
    pub ip: Option<String>,
    /// Its address on each network it is attached to, by network name (networks without an
    /// IPv4 address left out). `-network` / `SERVICE_NETWORK` pick one of these.
    pub networks: BTreeMap<String, String>,
    /// `HostConfig.NetworkMode == "host"`: exposed ports are the host's ports.
    pub host_network: bool,
}

/// The flags and host facts derivation depends on.
#[derive(Debug, Clone, Default)]
pub struct DeriveOptions {
    /// First part of default service IDs.
    pub hostname: String,
    /// This host's address, resolved once at start.
    pub host_ip: String,
    /// `-ip`.
    pub ip: Option<String>,
    /// `-internal`.
    pub internal: bool,
    /// `-explicit`.
    pub explicit: bool,
    /// `-tags`.
    pub tags: Vec<String>,
    /// `-ttl`.
    pub ttl: Option<Duration>,
    /// `-useIpFromLabel`.
    pub use_ip_from_label: Option<String>,
    /// `-network`: with `-internal`, the network whose address is registered for containers
    /// on several networks (a container's `SERVICE_NETWORK` wins).
    pub network: Option<String>,
    /// `-label-filter`: only containers matching every one of these are registered.
    pub label_filter: Vec<LabelMatch>,
}

/// One `-label-filter` term, as `docker ps --filter label=…` spells it: `KEY` (the label is
/// present, any value) or `KEY=VALUE` (exactly that value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMatch {
    /// The label's key.
    pub key: String,
    /// The value it must have; `None`: any.
    pub value: Option<String>,
}

impl LabelMatch {
    /// Parses `KEY` or `KEY=VALUE`; the error says what was expected.
    pub fn parse(s: &str) -> Result<LabelMatch, String> {
        let (key, value) = match s.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (s, None),
        };
        if key.is_empty() || key.chars().any(char::is_whitespace) {
            return Err(format!(
                "invalid value {s:?} for -label-filter: expected KEY or KEY=VALUE (a label key without spaces)"
            ));
        }
        Ok(LabelMatch {
            key: key.to_string(),
            value,
        })
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match (labels.get(&self.key), &self.value) {
            (Some(_), None) => true,
            (Some(have), Some(want)) => have == want,
            (None, _) => false,
        }
    }
}

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

/// The outcome of [`derive()`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Derived {
    /// Services to register, in port order.
    pub services: Vec<Service>,
    /// Dropped values, each key once.
    pub warnings: Vec<Warning>,
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
struct MetaValue {
    source: String,
    value: String,
}

/// `SERVICE_*` values from env and labels, general and per port.
#[derive(Debug, Default)]
struct Metadata {
    general: BTreeMap<String, MetaValue>,
    per_port: BTreeMap<u16, BTreeMap<String, MetaValue>>,
}

/// Collects `SERVICE_*` env entries then labels (labels win), noting malformed port keys.
fn collect_metadata(info: &ContainerInfo, warnings: &mut Vec<Warning>) -> Metadata {
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

/// The default service name: the image's last path segment without tag or digest
/// (`reg:5000/team/web:1.2@sha256:...` -> `web`). `None` when the container was created
/// from an image ID (`sha256:<hex>`, or the bare 64-hex-digit ID), which names no service:
/// gliderlabs registered all of those under the name `sha256`, one service for unrelated
/// containers.
pub fn image_basename(image: &str) -> Option<String> {
    if is_image_id(image) {
        return None;
    }
    let no_digest = image.split('@').next().unwrap_or(image);
    let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
    let name = last.split(':').next().unwrap_or(last);
    (!name.is_empty()).then(|| name.to_string())
}

/// `sha256:<hex>` or 64 hex digits: an image ID, as `docker run` accepts one.
fn is_image_id(image: &str) -> bool {
    let hex = image.strip_prefix("sha256:").unwrap_or(image);
    let all_hex = !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit());
    all_hex && (hex.len() == 64 || image.starts_with("sha256:"))
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
fn truthy(v: &str) -> bool {
    let v = v.trim();
    !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false"))
}

/// Checks a service name or ID: [`switchboard::validate`]'s rules (what every store accepts
/// and can address again), plus one of the registrator's own: no whitespace. Stores accept
/// spaces, but a label value with one is never a name anybody meant (and it breaks Consul
/// DNS), so it is refused here as gliderlabs users would expect. On failure: what would have
/// been accepted, and what is wrong with this value.
fn check_name(field: validate::Field, value: &str) -> Result<(), String> {
    let checked = match field {
        validate::Field::Name => validate::service_name(value),
        validate::Field::Id => validate::service_id(value),
    };
    let problem = match checked {
        Err(e) => e.problem.to_string(),
        Ok(()) if value.chars().any(char::is_whitespace) => "it contains whitespace".into(),
        Ok(()) => return Ok(()),
    };
    Err(format!(
        "a {field} of 1 to {} bytes, not only dots, without '/', whitespace or control \
         characters ({problem}); not registered",
        field.max()
    ))
}

fn url_host(addr: &str) -> String {
    if addr.contains(':') {
        format!("[{addr}]")
    } else {
        addr.to_string()
    }
}

/// One port that becomes a service: the container port and where clients reach it.
struct Candidate<'a> {
    exposed: &'a ContainerPort,
    address: String,
    port: u16,
}

/// Where each service port is reached, per gliderlabs: host network -> exposed ports on the
/// host address; `-internal` -> exposed ports on the container IP; otherwise published ports
/// on `-ip`, else the binding's own IP, else the host address.
fn candidates<'a>(
    info: &'a ContainerInfo,
    opts: &DeriveOptions,
    container_ip: Option<&String>,
) -> Vec<Candidate<'a>> {
    let host_addr = || opts.ip.clone().unwrap_or_else(|| opts.host_ip.clone());
    let mut out = Vec::new();
    for p in &info.ports {
        if info.host_network {
            out.push(Candidate {
                exposed: p,
                address: host_addr(),
                port: p.port,
            });
        } else if opts.internal {
            out.push(Candidate {
                exposed: p,
                address: container_ip.cloned().unwrap_or_else(host_addr),
                port: p.port,
            });
        } else {
            // `-p 80` publishes on 0.0.0.0 and :: with the same port: take one, IPv4 first.
            let binding = p
                .bindings
                .iter()
                .find(|(ip, _)| !ip.contains(':'))
                .or_else(|| p.bindings.first());
            if let Some((bind_ip, host_port)) = binding {
                let address = match &opts.ip {
                    Some(ip) => ip.clone(),
                    None if !matches!(bind_ip.as_str(), "" | "0.0.0.0" | "::") => bind_ip.clone(),
                    None => opts.host_ip.clone(),
                };
                out.push(Candidate {
                    exposed: p,
                    address,
                    port: *host_port,
                });
            }
        }
    }
    out
}

/// The container address `-internal` registers: on the network its `SERVICE_NETWORK` label
/// (or env) names, else on `-network`'s, else on its first network (the only one, for most
/// containers). Docker lists a container's networks in no useful order, so on a container
/// attached to several (#498, #291: a frontend network and a backend one) the address used to
/// be a coin toss. A label naming a network the container is not on warns and falls back (a
/// typo must not unregister it); `-network` applies to every container, so a container not on
/// that network quietly falls back.
fn container_ip(
    info: &ContainerInfo,
    opts: &DeriveOptions,
    md: &Metadata,
    warnings: &mut Vec<Warning>,
) -> Option<String> {
    if !opts.internal || info.host_network {
        return info.ip.clone();
    }
    if let Some(v) = md.general.get("network") {
        if let Some(ip) = info.networks.get(v.value.trim()) {
            return Some(ip.clone());
        }
        // Network names are Docker's own (it allows `[a-zA-Z0-9][a-zA-Z0-9_.-]*`).
        let on: Vec<&str> = info.networks.keys().map(String::as_str).collect();
        Ctx { warnings }.warn(
            v,
            &format!(
                "the name of a network this container is on ({}); using its address on \
                 another",
                on.join(", ")
            ),
        );
    }
    opts.network
        .as_ref()
        .and_then(|n| info.networks.get(n))
        .cloned()
        .or_else(|| info.ip.clone())
}

/// The services `info` provides under `opts`, and the values that had to be dropped.
pub fn derive(info: &ContainerInfo, opts: &DeriveOptions) -> Derived {
    // Outside the filter a container is not ours to look at: no services and no warnings
    // about metadata we will never use.
    if !opts.label_filter.iter().all(|f| f.matches(&info.labels)) {
        return Derived::default();
    }
    let mut warnings = Vec::new();
    let md = collect_metadata(info, &mut warnings);
    let label_ip = opts.use_ip_from_label.as_ref().and_then(|label| {
        let raw = info.labels.get(label)?;
        let ip = raw.rsplit_once('/').map_or(raw.as_str(), |(ip, _)| ip);
        match ip.parse::<IpAddr>() {
            Ok(_) => Some(ip.to_string()),
            Err(_) => {
                warnings.push(Warning {
                    key: label.clone(),
                    value: excerpt(raw).to_string(),
                    expected: "an IP address, optionally with a /prefix length".into(),
                });
                None
            }
        }
    });
    let container_ip = container_ip(info, opts, &md, &mut warnings);
    let cands = candidates(info, opts, container_ip.as_ref());
    let group = cands.len() > 1;
    // An image referenced by ID names nothing; the container's name stands in (a warning
    // says so, once, unless every port has a name of its own).
    let default_name = image_basename(&info.image).unwrap_or_else(|| info.name.clone());
    let mut image_id_warned = false;
    // General values are parsed once, not once per port: a container may publish thousands.
    let general_tags = md.general.get("tags").map(|v| parse_tags(v, &mut warnings));
    let general_meta = meta_pairs(&md.general, &mut warnings);
    let mut services = Vec::new();
    for c in cands {
        let empty = BTreeMap::new();
        let port_md = md.per_port.get(&c.exposed.port).unwrap_or(&empty);
        let get = |k: &str| port_md.get(k).or_else(|| md.general.get(k));
        if get("ignore").is_some_and(|v| truthy(&v.value)) {
            continue;
        }
        let address = label_ip.clone().unwrap_or(c.address);
        let mut ctx = Ctx {
            warnings: &mut warnings,
        };
        let named = match get("name") {
            None => None,
            Some(v) => match check_name(validate::Field::Name, &v.value) {
                Ok(()) => Some(v),
                Err(expected) => {
                    ctx.warn(v, &expected);
                    continue;
                }
            },
        };
        if opts.explicit && named.is_none() {
            continue;
        }
        if named.is_none() && !image_id_warned && image_basename(&info.image).is_none() {
            image_id_warned = true;
            ctx.warnings.push(Warning {
                key: "image".into(),
                value: excerpt(&info.image).to_string(),
                expected: format!(
                    "an image name to name the service after (the container was created from \
                     an image ID): registered under the container name {:?}; set SERVICE_NAME",
                    excerpt(&info.name).to_string()
                ),
            });
        }
        let mut name = named.map_or_else(|| default_name.clone(), |v| v.value.clone());
        if group && !port_md.contains_key("name") {
            name = format!("{name}-{}", c.exposed.port);
        }
        let id = match get("id") {
            Some(v) => match check_name(validate::Field::Id, &v.value) {
                Ok(()) => v.value.clone(),
                Err(expected) => {
                    ctx.warn(v, &expected);
                    continue;
                }
            },
            None => {
                let mut id = format!("{}:{}:{}", opts.hostname, info.name, c.exposed.port);
                if c.exposed.proto == "udp" {
                    id.push_str(":udp");
                }
                id
            }
        };
        // What was composed (an image name with a port suffix, a default ID) must pass too.
        if let Err(e) = validate::service_name(&name).and_then(|()| validate::service_id(&id)) {
            ctx.warnings.push(Warning {
                key: format!("derived {}", e.field),
                value: excerpt(if e.field == validate::Field::Name {
                    &name
                } else {
                    &id
                })
                .to_string(),
                expected: format!("{} ({}); not registered", e.field.expected(), e.problem),
            });
            continue;
        }
        let port_tags = port_md.get("tags").map(|v| parse_tags(v, ctx.warnings));
        let mut tags = port_tags
            .or_else(|| general_tags.clone())
            .unwrap_or_default();
        let mut seen: HashSet<String> = tags.iter().cloned().collect();
        for t in &opts.tags {
            if seen.insert(t.clone()) {
                tags.push(t.clone());
            }
        }
        let check = derive_check(&get, &info.id, &address, c.port, &mut ctx);
        let meta = merge_meta(
            &general_meta,
            meta_pairs(port_md, ctx.warnings),
            ctx.warnings,
        );
        services.push(Service {
            id,
            name,
            address,
            port: c.port,
            tags,
            meta,
            check,
            ttl: opts.ttl,
            docker_health: None,
        });
    }
    warnings.sort();
    warnings.dedup_by(|a, b| a.key == b.key);
    Derived { services, warnings }
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
fn parse_tags(v: &MetaValue, warnings: &mut Vec<Warning>) -> Vec<String> {
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
fn meta_pairs<'m>(
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
fn merge_meta(
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

// `claim_ids` and its types are for the Docker side's `publish`, which another change is
// rewriting; until it calls them they are only used by the tests below.

/// A service ID that more than one container asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateId {
    /// The ID.
    pub id: String,
    /// The container (ID) whose service is registered under it.
    pub kept: String,
    /// The other containers asking for it: their service with this ID is not registered.
    pub refused: Vec<String>,
}

/// The outcome of [`claim_ids`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    /// The services to register, by ID: one per ID.
    pub services: BTreeMap<String, Service>,
    /// Which container holds each ID: pass it to the next call.
    pub owners: BTreeMap<String, String>,
    /// IDs asked for by several containers, sorted by ID.
    pub duplicates: Vec<DuplicateId>,
}

/// One registration per service ID, from every container's derived services.
///
/// Every store holds one registration per ID, so two containers with the same `SERVICE_ID`
/// used to overwrite each other, the last one inspected silently winning. Here the winner is
/// stable: the container that held the ID last time (`owners`, from the previous call) keeps
/// it, so a newcomer never takes over a live registration; with no holder, the container
/// whose ID sorts first. When the holder goes, another claimant takes over on the next call.
/// The caller warns once per duplicate, naming the containers. Linear in the number of
/// services (plus a sort of the duplicates).
pub fn claim_ids<'a>(
    containers: impl IntoIterator<Item = (&'a str, &'a [Service])>,
    owners: &BTreeMap<String, String>,
) -> Claims {
    let mut claimants: BTreeMap<&str, Vec<(&str, &Service)>> = BTreeMap::new();
    for (container, services) in containers {
        for svc in services {
            claimants
                .entry(svc.id.as_str())
                .or_default()
                .push((container, svc));
        }
    }
    let mut out = Claims::default();
    for (id, mut by) in claimants {
        by.sort_by(|a, b| a.0.cmp(b.0));
        by.dedup_by(|a, b| a.0 == b.0);
        let held = owners.get(id).map(String::as_str);
        let winner = by.iter().position(|(c, _)| Some(*c) == held).unwrap_or(0);
        let (container, svc) = by[winner];
        out.services.insert(id.to_string(), svc.clone());
        out.owners.insert(id.to_string(), container.to_string());
        if by.len() > 1 {
            out.duplicates.push(DuplicateId {
                id: id.to_string(),
                kept: container.to_string(),
                refused: by
                    .iter()
                    .filter(|(c, _)| *c != container)
                    .map(|(c, _)| c.to_string())
                    .collect(),
            });
        }
    }
    out
}

/// Collects warnings while deriving one service.
struct Ctx<'w> {
    warnings: &'w mut Vec<Warning>,
}

impl Ctx<'_> {
    fn warn(&mut self, v: &MetaValue, expected: &str) {
        self.warnings.push(Warning {
            key: v.source.clone(),
            value: excerpt(&v.value).to_string(),
            expected: expected.to_string(),
        });
    }

    /// `Some(v)` when `ok`, else a warning and `None`.
    fn check<'v>(&mut self, v: &'v MetaValue, ok: bool, expected: &str) -> Option<&'v MetaValue> {
        if ok {
            Some(v)
        } else {
            self.warn(v, expected);
            None
        }
    }

    fn duration(&mut self, v: Option<&MetaValue>, must_be_positive: bool) -> Option<Duration> {
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

const PATH_EXPECTED: &str = "a URL path such as /health (no whitespace or control characters)";

const FLAG_EXPECTED: &str = "true or false (also 1/0, yes/no, on/off)";

/// A yes/no `SERVICE_*` value. Unlike gliderlabs (any non-empty value, `false` included,
/// meant yes), `false` means no; anything unrecognised warns and means no.
fn flag(v: Option<&MetaValue>, ctx: &mut Ctx) -> bool {
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

/// An HTTP method as RFC 9110 spells one: a token (letters, digits and ``!#$%&'*+-.^_`|~``),
/// at most 32 bytes. Consul sends it verbatim in the request line, so nothing else may pass.
fn http_method(v: &str) -> bool {
    (1..=32).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A gRPC service name for `host:port/service`: letters, digits, `.`, `_` and `-`
/// (`grpc.health.v1.Health`, `pkg.Service`), at most 255 bytes.
fn grpc_service(v: &str) -> bool {
    (1..=255).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `SERVICE_CHECK_*`: at most one check, the first kind set in the order HTTP, HTTPS, CMD,
/// script, TTL, TCP, gRPC (gliderlabs' precedence).
fn derive_check<'m>(
    get: &dyn Fn(&str) -> Option<&'m MetaValue>,
    container_id: &str,
    address: &str,
    port: u16,
    ctx: &mut Ctx,
) -> Option<Check> {
    let path_ok = |p: &str| !p.chars().any(|c| c.is_whitespace() || c.is_control());
    let url = |scheme: &str, path: &str| {
        let sep = if path.starts_with('/') { "" } else { "/" };
        format!("{scheme}://{}:{port}{sep}{path}", url_host(address))
    };
    let mut kind = None;
    if let Some(v) = get("check_http").filter(|v| !v.value.is_empty()) {
        if ctx.check(v, path_ok(&v.value), PATH_EXPECTED).is_some() {
            kind = Some(CheckKind::Http(url("http", &v.value)));
        }
    }
    if let Some(v) = get("check_https").filter(|v| !v.value.is_empty()) {
        if kind.is_some() {
            // Both set: gliderlabs silently used HTTP; say so.
            ctx.warn(
                v,
                "only one of SERVICE_CHECK_HTTP and SERVICE_CHECK_HTTPS \
                 (both are set: SERVICE_CHECK_HTTP is used)",
            );
        } else if ctx.check(v, path_ok(&v.value), PATH_EXPECTED).is_some() {
            kind = Some(CheckKind::Https(url("https", &v.value)));
        }
    }
    if kind.is_none() {
        // Run in the container by the agent (a Consul Docker check), as an argv: the value
        // is split on whitespace, never given to a shell.
        if let Some(v) = get("check_cmd") {
            let args: Vec<String> = v.value.split_whitespace().map(String::from).collect();
            if !args.is_empty() && !container_id.is_empty() {
                kind = Some(CheckKind::Docker {
                    container: container_id.to_string(),
                    args,
                });
            }
        }
    }
    if kind.is_none() {
        if let Some(v) = get("check_script") {
            let port = port.to_string();
            let argv: Vec<String> = v
                .value
                .split_whitespace()
                .map(|a| {
                    a.replace("$SERVICE_IP", address)
                        .replace("$SERVICE_PORT", &port)
                })
                .collect();
            if !argv.is_empty() {
                kind = Some(CheckKind::Script(argv));
            }
        }
    }
    if kind.is_none() {
        if let Some(d) = ctx.duration(get("check_ttl"), true) {
            kind = Some(CheckKind::Ttl(d));
        }
    }
    if kind.is_none() && get("check_tcp").is_some_and(|v| truthy(&v.value)) {
        kind = Some(CheckKind::Tcp(format!("{}:{port}", url_host(address))));
    }
    if kind.is_none() {
        // `true` (gliderlabs' spelling) probes the server as a whole; a gRPC service name
        // asks about that service.
        if let Some(v) = get("check_grpc").filter(|v| truthy(&v.value)) {
            let target = format!("{}:{port}", url_host(address));
            let value = v.value.trim();
            let target = match value.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Some(target),
                _ if grpc_service(value) => Some(format!("{target}/{value}")),
                _ => {
                    ctx.warn(
                        v,
                        "true, or a gRPC service name (letters, digits, '.', '_', '-') to check",
                    );
                    None
                }
            };
            if let Some(target) = target {
                let tls = flag(get("check_grpc_use_tls"), ctx);
                kind = Some(CheckKind::Grpc { target, tls });
            }
        }
    }
    let kind = kind?;
    let method_key = match &kind {
        CheckKind::Http(_) => Some("check_http_method"),
        CheckKind::Https(_) => Some("check_https_method"),
        _ => None,
    };
    let method = method_key.and_then(get).and_then(|v| {
        ctx.check(
            v,
            http_method(&v.value),
            "an HTTP method such as GET, HEAD or POST (a token of at most 32 letters, digits \
             or !#$%&'*+-.^_`|~)",
        )
        .map(|v| v.value.clone())
    });
    let tls = matches!(
        kind,
        CheckKind::Https(_) | CheckKind::Grpc { tls: true, .. }
    );
    let skip = get("check_tls_skip_verify");
    let tls_skip_verify = match skip {
        Some(v) if !tls && flag(Some(v), ctx) => {
            ctx.warn(
                v,
                "SERVICE_CHECK_TLS_SKIP_VERIFY only with SERVICE_CHECK_HTTPS or \
                 SERVICE_CHECK_GRPC_USE_TLS (this check speaks no TLS; ignored)",
            );
            false
        }
        _ => tls && flag(skip, ctx),
    };
    let initial_status = get("check_initial_status").and_then(|v| {
        let ok = matches!(v.value.as_str(), "passing" | "warning" | "critical");
        ctx.check(v, ok, "passing, warning or critical")
            .map(|v| v.value.clone())
    });
    Some(Check {
        kind,
        interval: ctx.duration(get("check_interval"), true),
        timeout: ctx.duration(get("check_timeout"), true),
        initial_status,
        deregister_after: ctx.duration(get("check_deregister_after"), true),
        method,
        tls_skip_verify,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(port: u16, proto: &str, bindings: &[(&str, u16)]) -> ContainerPort {
        ContainerPort {
            port,
            proto: proto.into(),
            bindings: bindings.iter().map(|(i, p)| (i.to_string(), *p)).collect(),
        }
    }

    fn web() -> ContainerInfo {
        ContainerInfo {
            id: "abc".into(),
            name: "web1".into(),
            image: "reg.example:5000/team/web:1.2".into(),
            env: vec!["PATH=/bin".into()],
            labels: BTreeMap::new(),
            ports: vec![port(80, "tcp", &[("0.0.0.0", 32768), ("::", 32768)])],
            ip: Some("172.17.0.5".into()),
            networks: [("bridge".to_string(), "172.17.0.5".to_string())].into(),
            host_network: false,
        }
    }

    fn opts() -> DeriveOptions {
        DeriveOptions {
            hostname: "host".into(),
            host_ip: "192.0.2.2".into(),
            ..Default::default()
        }
    }

    fn with_env(mut c: ContainerInfo, env: &[&str]) -> ContainerInfo {
        c.env.extend(env.iter().map(|s| s.to_string()));
        c
    }

    fn with_labels(mut c: ContainerInfo, labels: &[(&str, &str)]) -> ContainerInfo {
        c.labels
            .extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        c
    }

    /// `(id, name, addr)` of each derived service.
    fn summary(d: &Derived) -> Vec<(String, String, String)> {
        d.services
            .iter()
            .map(|s| (s.id.clone(), s.name.clone(), s.addr()))
            .collect()
    }

    #[test]
    fn label_filter_keeps_only_matching_containers() {
        let shop = with_labels(web(), &[("com.docker.compose.project", "shop")]);
        let filter = |terms: &[&str]| DeriveOptions {
            label_filter: terms
                .iter()
                .map(|t| LabelMatch::parse(t).unwrap())
                .collect(),
            ..opts()
        };
        let count = |c: &ContainerInfo, o: &DeriveOptions| derive(c, o).services.len();
        assert!(count(&shop, &filter(&[])) > 0);
        assert!(count(&shop, &filter(&["com.docker.compose.project=shop"])) > 0);
        assert!(count(&shop, &filter(&["com.docker.compose.project"])) > 0);
        assert_eq!(
            count(&shop, &filter(&["com.docker.compose.project=other"])),
            0
        );
        assert_eq!(count(&web(), &filter(&["com.docker.compose.project"])), 0);
        // Every term must match.
        assert_eq!(
            count(&shop, &filter(&["com.docker.compose.project=shop", "tier"])),
            0
        );
        // A filtered-out container is not ours: its bad metadata is not reported either.
        let noisy = with_env(web(), &["SERVICE_NAME=bad name!"]);
        assert!(derive(&noisy, &filter(&["tier"])).warnings.is_empty());
    }

    #[test]
    fn image_basenames() {
        let cases = [
            ("web", "web"),
            ("web:1.2", "web"),
            ("team/web", "web"),
            ("a.b:5000/x/web:1.2@sha256:0123", "web"),
            ("a.b:5000/web", "web"),
            ("web@sha256:0123", "web"),
        ];
        for (image, want) in cases {
            assert_eq!(image_basename(image).as_deref(), Some(want), "{image}");
        }
        let id = "0123456789abcdef".repeat(4);
        for image in [format!("sha256:{id}"), id.clone(), "sha256:0123".into()] {
            assert_eq!(image_basename(&image), None, "{image}");
        }
        // A short hex name may be a real image name: it stays one.
        assert_eq!(image_basename("cafe").as_deref(), Some("cafe"));
    }

    #[test]
    fn image_id_names_the_service_after_the_container() {
        let mut c = web();
        c.image = format!("sha256:{}", "ab".repeat(32));
        let d = derive(&c, &opts());
        assert_eq!(
            summary(&d),
            vec![(
                "host:web1:80".into(),
                "web1".into(),
                "192.0.2.2:32768".into()
            )]
        );
        assert_eq!(d.warnings.len(), 1, "{:?}", d.warnings);
        assert_eq!(d.warnings[0].key, "image");
        assert!(
            d.warnings[0].expected.contains("SERVICE_NAME"),
            "{:?}",
            d.warnings
        );
        // With SERVICE_NAME there is nothing to warn about.
        let d = derive(&with_env(c, &["SERVICE_NAME=api"]), &opts());
        assert_eq!(d.services[0].name, "api");
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
    }

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
    fn addresses_ids_and_names() {
        let mut host_net = web();
        host_net.host_network = true;
        host_net.ports = vec![port(8080, "tcp", &[])];
        let mut bound = web();
        bound.ports = vec![port(80, "tcp", &[("10.1.1.1", 8000)])];
        let mut multi = web();
        multi.ports = vec![
            port(80, "tcp", &[("0.0.0.0", 8000)]),
            port(443, "tcp", &[("0.0.0.0", 8443)]),
            port(9000, "tcp", &[]),
        ];
        let mut udp = web();
        udp.ports = vec![port(53, "udp", &[("0.0.0.0", 5353)])];
        let internal = DeriveOptions {
            internal: true,
            ip: Some("127.0.0.1".into()),
            ..opts()
        };
        let with_ip = DeriveOptions {
            ip: Some("127.0.0.1".into()),
            ..opts()
        };
        let t =
            |id: &str, name: &str, addr: &str| (id.to_string(), name.to_string(), addr.to_string());
        type Case = (
            &'static str,
            ContainerInfo,
            DeriveOptions,
            Vec<(String, String, String)>,
        );
        let cases: Vec<Case> = vec![
            (
                "published, host address",
                web(),
                opts(),
                vec![t("host:web1:80", "web", "192.0.2.2:32768")],
            ),
            (
                "-ip wins",
                web(),
                with_ip.clone(),
                vec![t("host:web1:80", "web", "127.0.0.1:32768")],
            ),
            (
                "binding ip",
                bound,
                opts(),
                vec![t("host:web1:80", "web", "10.1.1.1:8000")],
            ),
            (
                "-internal",
                web(),
                internal.clone(),
                vec![t("host:web1:80", "web", "172.17.0.5:80")],
            ),
            (
                "host network",
                host_net,
                opts(),
                vec![t("host:web1:8080", "web", "192.0.2.2:8080")],
            ),
            (
                "several ports: suffixes, unpublished skipped",
                multi.clone(),
                opts(),
                vec![
                    t("host:web1:80", "web-80", "192.0.2.2:8000"),
                    t("host:web1:443", "web-443", "192.0.2.2:8443"),
                ],
            ),
            (
                "several ports -internal",
                multi.clone(),
                internal,
                vec![
                    t("host:web1:80", "web-80", "172.17.0.5:80"),
                    t("host:web1:443", "web-443", "172.17.0.5:443"),
                    t("host:web1:9000", "web-9000", "172.17.0.5:9000"),
                ],
            ),
            (
                "port-specific name has no suffix, general name does",
                with_env(
                    multi.clone(),
                    &["SERVICE_NAME=app", "SERVICE_443_NAME=secure"],
                ),
                opts(),
                vec![
                    t("host:web1:80", "app-80", "192.0.2.2:8000"),
                    t("host:web1:443", "secure", "192.0.2.2:8443"),
                ],
            ),
            (
                "udp",
                udp,
                opts(),
                vec![t("host:web1:53:udp", "web", "192.0.2.2:5353")],
            ),
            (
                "SERVICE_ID and NAME, label wins over env",
                with_labels(
                    with_env(web(), &["SERVICE_NAME=envname", "SERVICE_ID=x1"]),
                    &[("SERVICE_NAME", "lbl")],
                ),
                opts(),
                vec![t("x1", "lbl", "192.0.2.2:32768")],
            ),
            (
                "ignore",
                with_env(web(), &["SERVICE_IGNORE=1"]),
                opts(),
                vec![],
            ),
            (
                "ignore=yes",
                with_labels(web(), &[("SERVICE_IGNORE", "yes")]),
                opts(),
                vec![],
            ),
            (
                "ignore=false registers",
                with_env(web(), &["SERVICE_IGNORE=false"]),
                opts(),
                vec![t("host:web1:80", "web", "192.0.2.2:32768")],
            ),
            (
                "ignore=0 registers",
                with_env(web(), &["SERVICE_IGNORE=0"]),
                opts(),
                vec![t("host:web1:80", "web", "192.0.2.2:32768")],
            ),
            (
                "port-specific ignore",
                with_env(multi.clone(), &["SERVICE_80_IGNORE=true"]),
                opts(),
                vec![t("host:web1:443", "web-443", "192.0.2.2:8443")],
            ),
            (
                "explicit without name",
                web(),
                DeriveOptions {
                    explicit: true,
                    ..opts()
                },
                vec![],
            ),
            (
                "explicit with name",
                with_env(web(), &["SERVICE_NAME=n"]),
                DeriveOptions {
                    explicit: true,
                    ..opts()
                },
                vec![t("host:web1:80", "n", "192.0.2.2:32768")],
            ),
            (
                "explicit with port name only registers that port",
                with_env(multi, &["SERVICE_443_NAME=s"]),
                DeriveOptions {
                    explicit: true,
                    ..opts()
                },
                vec![t("host:web1:443", "s", "192.0.2.2:8443")],
            ),
            (
                "useIpFromLabel strips the prefix length",
                with_labels(web(), &[("ip", "10.9.9.9/24")]),
                DeriveOptions {
                    use_ip_from_label: Some("ip".into()),
                    ..opts()
                },
                vec![t("host:web1:80", "web", "10.9.9.9:32768")],
            ),
            (
                "useIpFromLabel missing label",
                web(),
                DeriveOptions {
                    use_ip_from_label: Some("ip".into()),
                    ..with_ip
                },
                vec![t("host:web1:80", "web", "127.0.0.1:32768")],
            ),
        ];
        for (what, info, o, want) in cases {
            assert_eq!(summary(&derive(&info, &o)), want, "{what}");
        }
    }

    #[test]
    fn network_choice_for_internal_addresses() {
        let mut two = web();
        two.networks = [
            ("dropin-back".to_string(), "10.20.0.2".to_string()),
            ("dropin-front".to_string(), "10.10.0.2".to_string()),
        ]
        .into();
        two.ip = Some("10.20.0.2".into());
        let internal = |network: Option<&str>| DeriveOptions {
            internal: true,
            network: network.map(String::from),
            ..opts()
        };
        // (container, options, address registered, warned key)
        type Case = (
            ContainerInfo,
            DeriveOptions,
            &'static str,
            Option<&'static str>,
        );
        let cases: Vec<Case> = vec![
            (two.clone(), internal(None), "10.20.0.2:80", None),
            (
                two.clone(),
                internal(Some("dropin-front")),
                "10.10.0.2:80",
                None,
            ),
            (
                two.clone(),
                internal(Some("elsewhere")),
                "10.20.0.2:80",
                None,
            ),
            (
                with_labels(two.clone(), &[("SERVICE_NETWORK", "dropin-front")]),
                internal(Some("dropin-back")),
                "10.10.0.2:80",
                None,
            ),
            (
                with_env(two.clone(), &["SERVICE_NETWORK=dropin-front"]),
                internal(None),
                "10.10.0.2:80",
                None,
            ),
            (
                with_labels(two.clone(), &[("SERVICE_NETWORK", "typo")]),
                internal(Some("dropin-front")),
                "10.10.0.2:80",
                Some("SERVICE_NETWORK"),
            ),
            // Without -internal the published port is registered: networks do not matter.
            (
                with_labels(two.clone(), &[("SERVICE_NETWORK", "dropin-front")]),
                opts(),
                "192.0.2.2:32768",
                None,
            ),
        ];
        for (info, o, addr, warned) in cases {
            let d = derive(&info, &o);
            assert_eq!(
                d.services[0].addr(),
                addr,
                "{:?} {:?}",
                info.labels,
                o.network
            );
            let keys: Vec<&str> = d.warnings.iter().map(|w| w.key.as_str()).collect();
            assert_eq!(keys, warned.into_iter().collect::<Vec<_>>());
            assert!(
                d.services[0].meta.is_empty(),
                "SERVICE_NETWORK is not metadata"
            );
        }
        let d = derive(
            &with_labels(two, &[("SERVICE_NETWORK", "typo")]),
            &internal(None),
        );
        assert!(
            d.warnings[0].expected.contains("dropin-back, dropin-front"),
            "{:?}",
            d.warnings
        );
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
    fn checks() {
        let http = |path: &str| CheckKind::Http(format!("http://192.0.2.2:32768{path}"));
        let cases: Vec<(&[&str], Option<CheckKind>)> = vec![
            (&[], None),
            (&["SERVICE_CHECK_HTTP=/health"], Some(http("/health"))),
            (&["SERVICE_CHECK_HTTP=health"], Some(http("/health"))),
            (&["SERVICE_80_CHECK_HTTP=/p"], Some(http("/p"))),
            (
                &["SERVICE_CHECK_HTTPS=/s"],
                Some(CheckKind::Https("https://192.0.2.2:32768/s".into())),
            ),
            (
                &["SERVICE_CHECK_TCP=true"],
                Some(CheckKind::Tcp("192.0.2.2:32768".into())),
            ),
            (&["SERVICE_CHECK_TCP=false"], None),
            (
                &["SERVICE_CHECK_TTL=30s"],
                Some(CheckKind::Ttl(Duration::from_secs(30))),
            ),
            (
                &["SERVICE_CHECK_SCRIPT=check.sh  $SERVICE_IP:$SERVICE_PORT ;rm -rf"],
                Some(CheckKind::Script(vec![
                    "check.sh".into(),
                    "192.0.2.2:32768".into(),
                    ";rm".into(),
                    "-rf".into(),
                ])),
            ),
            (
                &["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_TCP=1"],
                Some(http("/h")),
            ),
            (&["SERVICE_CHECK_INTERVAL=5s"], None),
        ];
        for (env, want) in cases {
            let d = derive(&with_env(web(), env), &opts());
            assert_eq!(
                d.services[0].check.as_ref().map(|c| c.kind.clone()),
                want,
                "{env:?}"
            );
        }
        let d = derive(
            &with_env(
                web(),
                &[
                    "SERVICE_CHECK_HTTP=/h",
                    "SERVICE_CHECK_INTERVAL=1m30s",
                    "SERVICE_CHECK_TIMEOUT=2",
                    "SERVICE_CHECK_INITIAL_STATUS=passing",
                    "SERVICE_CHECK_DEREGISTER_AFTER=10m",
                ],
            ),
            &opts(),
        );
        let c = d.services[0].check.clone().unwrap();
        assert_eq!(c.interval, Some(Duration::from_secs(90)));
        assert_eq!(c.timeout, Some(Duration::from_secs(2)));
        assert_eq!(c.initial_status.as_deref(), Some("passing"));
        assert_eq!(c.deregister_after, Some(Duration::from_secs(600)));
    }

    #[test]
    fn grpc_cmd_method_and_tls_options() {
        let grpc = |target: &str, tls: bool| CheckKind::Grpc {
            target: target.into(),
            tls,
        };
        /// Check labels and the check they make: kind, HTTP method, TLS verification skipped, and the key warned about.
        struct CheckCase<'a> {
            env: &'a [&'a str],
            kind: Option<CheckKind>,
            method: Option<&'a str>,
            tls_skip_verify: bool,
            warned: Option<&'a str>,
        }
        let cases = vec![
            CheckCase {
                env: &["SERVICE_CHECK_GRPC=true"],
                kind: Some(grpc("192.0.2.2:32768", false)),
                method: None,
                tls_skip_verify: false,
                warned: None,
            },
            CheckCase {
                env: &[
                    "SERVICE_CHECK_GRPC=grpc.health.v1.Health",
                    "SERVICE_CHECK_GRPC_USE_TLS=1",
                ],
                kind: Some(grpc("192.0.2.2:32768/grpc.health.v1.Health", true)),
                method: None,
                tls_skip_verify: false,
                warned: None,
            },
            CheckCase {
                env: &[
                    "SERVICE_CHECK_GRPC=true",
                    "SERVICE_CHECK_GRPC_USE_TLS=true",
                    "SERVICE_CHECK_TLS_SKIP_VERIFY=true",
                ],
                kind: Some(grpc("192.0.2.2:32768", true)),
                method: None,
                tls_skip_verify: true,
                warned: None,
            },
            CheckCase {
                env: &["SERVICE_CHECK_GRPC=false"],
                kind: None,
                method: None,
                tls_skip_verify: false,
                warned: None,
            },
            CheckCase {
                env: &["SERVICE_CHECK_GRPC=a/b"],
                kind: None,
                method: None,
                tls_skip_verify: false,
                warned: Some("SERVICE_CHECK_GRPC"),
            },
            CheckCase {
                env: &[
                    "SERVICE_CHECK_GRPC=true",
                    "SERVICE_CHECK_GRPC_USE_TLS=maybe",
                ],
                kind: Some(grpc("192.0.2.2:32768", false)),
                method: None,
                tls_skip_verify: false,
                warned: Some("SERVICE_CHECK_GRPC_USE_TLS"),
            },
            CheckCase {
                env: &["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_HTTP_METHOD=HEAD"],
                kind: Some(CheckKind::Http("http://192.0.2.2:32768/h".into())),
                method: Some("HEAD"),
                tls_skip_verify: false,
                warned: None,
            },
            CheckCase {
                env: &[
                    "SERVICE_CHECK_HTTP=/h",
                    "SERVICE_CHECK_HTTP_METHOD=GET /x HTTP/1.1\r\n",
                ],
                kind: Some(CheckKind::Http("http://192.0.2.2:32768/h".into())),
                method: None,
                tls_skip_verify: false,
                warned: Some("SERVICE_CHECK_HTTP_METHOD"),
            },
            // The HTTPS check reads its own method key, not HTTP's.
            CheckCase {
                env: &[
                    "SERVICE_CHECK_HTTPS=/s",
                    "SERVICE_CHECK_HTTP_METHOD=PUT",
                    "SERVICE_CHECK_HTTPS_METHOD=POST",
                    "SERVICE_CHECK_TLS_SKIP_VERIFY=yes",
                ],
                kind: Some(CheckKind::Https("https://192.0.2.2:32768/s".into())),
                method: Some("POST"),
                tls_skip_verify: true,
                warned: None,
            },
            CheckCase {
                env: &[
                    "SERVICE_CHECK_HTTP=/h",
                    "SERVICE_CHECK_TLS_SKIP_VERIFY=true",
                ],
                kind: Some(CheckKind::Http("http://192.0.2.2:32768/h".into())),
                method: None,
                tls_skip_verify: false,
                warned: Some("SERVICE_CHECK_TLS_SKIP_VERIFY"),
            },
            CheckCase {
                env: &["SERVICE_CHECK_CMD=test -f /tmp/ok;reboot $(id)"],
                kind: Some(CheckKind::Docker {
                    container: "abc".into(),
                    args: vec![
                        "test".into(),
                        "-f".into(),
                        "/tmp/ok;reboot".into(),
                        "$(id)".into(),
                    ],
                }),
                method: None,
                tls_skip_verify: false,
                warned: None,
            },
            // gliderlabs' order: CMD before script.
            CheckCase {
                env: &["SERVICE_CHECK_SCRIPT=/bin/x", "SERVICE_CHECK_CMD=true"],
                kind: Some(CheckKind::Docker {
                    container: "abc".into(),
                    args: vec!["true".into()],
                }),
                method: None,
                tls_skip_verify: false,
                warned: None,
            },
        ];
        for CheckCase {
            env,
            kind,
            method,
            tls_skip_verify: skip,
            warned,
        } in cases
        {
            let d = derive(&with_env(web(), env), &opts());
            let check = d.services[0].check.clone();
            assert_eq!(check.as_ref().map(|c| c.kind.clone()), kind, "{env:?}");
            assert_eq!(
                check.as_ref().and_then(|c| c.method.as_deref()),
                method,
                "{env:?}"
            );
            assert_eq!(check.is_some_and(|c| c.tls_skip_verify), skip, "{env:?}");
            let keys: Vec<&str> = d.warnings.iter().map(|w| w.key.as_str()).collect();
            assert_eq!(keys, warned.into_iter().collect::<Vec<_>>(), "{env:?}");
            // None of these keys is ever metadata.
            assert!(d.services[0].meta.is_empty(), "{env:?}");
        }
    }

    #[test]
    fn malformed_values_warn_and_still_register() {
        let cases: Vec<(&[&str], &str, &str)> = vec![
            (
                &["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_INTERVAL=abc"],
                "SERVICE_CHECK_INTERVAL",
                "duration",
            ),
            (
                &["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_TIMEOUT=-1"],
                "SERVICE_CHECK_TIMEOUT",
                "duration",
            ),
            (
                &["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_INITIAL_STATUS=ok"],
                "SERVICE_CHECK_INITIAL_STATUS",
                "passing",
            ),
            (&["SERVICE_CHECK_TTL=soon"], "SERVICE_CHECK_TTL", "duration"),
            (&["SERVICE_99999_NAME=x"], "SERVICE_99999_NAME", "port"),
            (&["SERVICE_0_NAME=x"], "SERVICE_0_NAME", "port"),
            (&["SERVICE_CHECK_HTTP=/a b"], "SERVICE_CHECK_HTTP", "path"),
            (
                &["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_HTTPS=/s"],
                "SERVICE_CHECK_HTTPS",
                "SERVICE_CHECK_HTTP is used",
            ),
            (&["SERVICE_FOO.BAR=1"], "SERVICE_FOO.BAR", "key"),
            (&["SERVICE_TAGS=ok,bad\u{7}"], "SERVICE_TAGS", "tags"),
        ];
        for (env, key, expected) in cases {
            let d = derive(&with_env(web(), env), &opts());
            assert_eq!(d.services.len(), 1, "{env:?}");
            assert_eq!(d.services[0].id, "host:web1:80", "{env:?}");
            assert_eq!(d.services[0].name, "web", "{env:?}");
            assert_eq!(d.warnings.len(), 1, "{env:?}: {:?}", d.warnings);
            assert_eq!(d.warnings[0].key, key, "{env:?}");
            assert!(
                d.warnings[0].expected.contains(expected),
                "{env:?}: {:?}",
                d.warnings
            );
        }
        // The check survives without the bad interval.
        let d = derive(
            &with_env(
                web(),
                &["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_INTERVAL=abc"],
            ),
            &opts(),
        );
        let c = d.services[0].check.clone().unwrap();
        assert_eq!(c.interval, None);
        // A general bad key warns once even with several ports.
        let mut multi = with_env(
            web(),
            &["SERVICE_CHECK_TCP=1", "SERVICE_CHECK_INTERVAL=abc"],
        );
        multi.ports.push(port(81, "tcp", &[("0.0.0.0", 1)]));
        assert_eq!(derive(&multi, &opts()).warnings.len(), 1);
        // Both HTTP and HTTPS: HTTP wins, as in gliderlabs, and the warning says so.
        let d = derive(
            &with_env(web(), &["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_HTTPS=/s"]),
            &opts(),
        );
        let c = d.services[0].check.clone().unwrap();
        assert_eq!(c.kind, CheckKind::Http("http://192.0.2.2:32768/h".into()));
    }

    /// Two published ports: 80 and 443.
    fn two_ports() -> ContainerInfo {
        let mut c = web();
        c.ports = vec![
            port(80, "tcp", &[("0.0.0.0", 8000)]),
            port(443, "tcp", &[("0.0.0.0", 8443)]),
        ];
        c
    }

    #[test]
    fn unusable_names_and_ids_refuse_that_service_only() {
        let long = format!("SERVICE_NAME={}", "n".repeat(256));
        let huge_id = format!("SERVICE_ID={}", "i".repeat(513));
        // (env, key warned about, words of the warning, IDs still registered)
        type Case<'a> = (Vec<&'a str>, &'a str, &'a str, Vec<&'a str>);
        let cases: Vec<Case> = vec![
            (
                vec!["SERVICE_NAME=."],
                "SERVICE_NAME",
                "(it is only dots)",
                vec![],
            ),
            (
                vec!["SERVICE_NAME=.."],
                "SERVICE_NAME",
                "(it is only dots)",
                vec![],
            ),
            (
                vec!["SERVICE_NAME=a/b"],
                "SERVICE_NAME",
                "(it contains '/')",
                vec![],
            ),
            (
                vec!["SERVICE_NAME=a b"],
                "SERVICE_NAME",
                "(it contains whitespace)",
                vec![],
            ),
            (
                vec!["SERVICE_NAME=a\tb"],
                "SERVICE_NAME",
                "(it contains a control",
                vec![],
            ),
            (vec![&long], "SERVICE_NAME", "(it has 256 bytes", vec![]),
            (
                vec!["SERVICE_ID=.."],
                "SERVICE_ID",
                "(it is only dots)",
                vec![],
            ),
            (
                vec!["SERVICE_ID=has space"],
                "SERVICE_ID",
                "(it contains whitespace)",
                vec![],
            ),
            (vec![&huge_id], "SERVICE_ID", "(it has 513 bytes", vec![]),
            (
                vec!["SERVICE_80_NAME=.."],
                "SERVICE_80_NAME",
                "(it is only dots)",
                vec!["host:web1:443"],
            ),
            (
                vec!["SERVICE_443_ID=.", "SERVICE_NAME=app"],
                "SERVICE_443_ID",
                "(it is only dots)",
                vec!["host:web1:80"],
            ),
        ];
        for (env, key, words, ids) in cases {
            let d = derive(&with_env(two_ports(), &env), &opts());
            let got: Vec<&str> = d.services.iter().map(|s| s.id.as_str()).collect();
            assert_eq!(got, ids, "{key}: {:?}", d.warnings);
            assert_eq!(d.warnings.len(), 1, "{key}: {:?}", d.warnings);
            let w = &d.warnings[0];
            assert_eq!(w.key, key);
            assert!(w.expected.contains(words), "{key}: {w:?}");
            assert!(w.expected.contains("not registered"), "{key}: {w:?}");
            assert!(w.value.len() < 100, "{key}: value not shortened: {w:?}");
        }
        // A derived name that grows too long with its port suffix is refused too.
        let mut c = two_ports();
        c.image = "i".repeat(253);
        let d = derive(&c, &opts());
        assert!(d.services.is_empty(), "{:?}", d.services);
        assert_eq!(d.warnings[0].key, "derived service name");
        // -explicit with an unusable name: nothing, and a warning.
        let d = derive(
            &with_env(web(), &["SERVICE_NAME=.."]),
            &DeriveOptions {
                explicit: true,
                ..opts()
            },
        );
        assert!(d.services.is_empty());
        assert_eq!(d.warnings.len(), 1);
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
            // Quadratic de-duplication took 51 s for 200,000 tags; bounded work takes
            // milliseconds, so even a slow debug build stays far below this.
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

    fn svc(id: &str, port: u16) -> Service {
        Service {
            id: id.into(),
            name: "web".into(),
            address: "10.0.0.1".into(),
            port,
            tags: vec![],
            meta: Default::default(),
            check: None,
            ttl: None,
            docker_health: None,
        }
    }

    #[test]
    fn duplicate_ids_keep_their_holder() {
        let a = vec![svc("shared", 1), svc("a:80", 2)];
        let b = vec![svc("shared", 3)];
        let c = vec![svc("shared", 4), svc("c:80", 5)];
        let all = || {
            vec![
                ("ccc", c.as_slice()),
                ("aaa", a.as_slice()),
                ("bbb", b.as_slice()),
            ]
        };
        let owners = |held: &str| -> BTreeMap<String, String> {
            [("shared".to_string(), held.to_string())].into()
        };
        // (holder from the previous call, expected winner and its port)
        let cases = [
            ("", "aaa", 1),
            ("bbb", "bbb", 3),
            ("ccc", "ccc", 4),
            ("gone", "aaa", 1),
        ];
        for (held, winner, port) in cases {
            let got = claim_ids(all(), &owners(held));
            assert_eq!(got.services.len(), 3, "{held}");
            assert_eq!(got.services["shared"].port, port, "{held}");
            assert_eq!(got.owners["shared"], winner, "{held}");
            assert_eq!(got.owners["c:80"], "ccc");
            assert_eq!(got.duplicates.len(), 1, "{held}");
            let dup = &got.duplicates[0];
            assert_eq!((dup.id.as_str(), dup.kept.as_str()), ("shared", winner));
            assert_eq!(dup.refused.len(), 2, "{held}");
            assert!(!dup.refused.contains(&winner.to_string()));
        }
        // No duplicates: nothing to report.
        let got = claim_ids(vec![("aaa", a.as_slice())], &BTreeMap::new());
        assert!(got.duplicates.is_empty());
        assert_eq!(got.services.len(), 2);
    }
}
