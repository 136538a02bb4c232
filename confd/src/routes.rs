//! How an instance asks to be routed, read from its metadata, and the pools those requests form.
//!
//! Registrator turns `SERVICE_<KEY>` labels into meta `<key>`; these keys say how a proxy
//! should route to the instance:
//!
//! | meta | values | default |
//! |---|---|---|
//! | `proto` | `http`, `h2c`, `grpc`, `tcp`, `udp` | `http` |
//! | `path` | a URL path prefix, e.g. `/api` | none: the whole host |
//! | `path_strip` | `true` or `false` | `false` |
//! | `listen` | a port the proxy opens, `tcp` and `udp` only | none |
//! | `weight` | `0` to `256`; `0` takes no new requests | `1` |
//! | `https_redirect` | `true` or `false`: plain HTTP to a host with a certificate redirects to HTTPS | `true` |
//!
//! Labels are untrusted, so every value is checked here, once, against a grammar that cannot
//! carry config syntax (a path is `/`-separated segments of `A-Z a-z 0-9 . _ ~ -`). An instance
//! whose routing values are bad is left out of every route (never routed somewhere it did not
//! ask for) and a [`Warning`] says why; a bad `weight` only falls back to `1`, since traffic
//! to an instance that asked for some is closer to its intent than none.
//!
//! Pure functions: [`crate::render::data`] calls them when a service changes and keeps what
//! they return.

use crate::model::{Instance, Meta};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// What a route speaks to its instances (meta `proto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// HTTP/1.1 (and websockets).
    Http,
    /// HTTP/2 without TLS, with prior knowledge.
    H2c,
    /// gRPC (HTTP/2 without TLS).
    Grpc,
    /// Raw TCP on a port of its own (`listen`).
    Tcp,
    /// UDP datagrams on a port of its own (`listen`).
    Udp,
}

impl Proto {
    /// The meta value that names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Http => "http",
            Proto::H2c => "h2c",
            Proto::Grpc => "grpc",
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// Whether it is routed by host and path (else by a port of its own).
    pub fn is_http(self) -> bool {
        matches!(self, Proto::Http | Proto::H2c | Proto::Grpc)
    }

    fn parse(s: &str) -> Option<Proto> {
        Some(match s.to_ascii_lowercase().as_str() {
            "" | "http" => Proto::Http,
            "h2c" => Proto::H2c,
            "grpc" => Proto::Grpc,
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return None,
        })
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The weight of an instance without a (valid) `weight`.
pub const DEFAULT_WEIGHT: u16 = 1;
/// The largest weight: HAProxy's limit.
pub const MAX_WEIGHT: u16 = 256;
/// The longest path accepted.
const MAX_PATH: usize = 256;

/// Where an instance asks to be routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// What it speaks.
    pub proto: Proto,
    /// Its path prefix, normalised (`/api`, never `/` or a trailing `/`); `None` for the whole
    /// host. Only for HTTP protocols.
    pub path: Option<String>,
    /// Whether the prefix is removed before proxying.
    pub strip: bool,
    /// The port the proxy opens for it: `tcp` and `udp` only, and always set for them.
    pub listen: Option<u16>,
}

/// Why an instance is not routed as it asked, or routed other than it asked. One line for the
/// log, and a fixed `reason` for the metric label.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Warning {
    /// The service.
    pub service: String,
    /// The instance, when one instance is meant.
    pub instance: Option<String>,
    /// A fixed token: `bad_proto`, `bad_path`, `bad_path_strip`, `bad_listen`, `bad_weight`,
    /// `bad_https_redirect`,
    /// `ignored`, `conflict`, `listen_taken`, `listen_refused`.
    pub reason: &'static str,
    /// What was wrong and what was expected (values quoted with `{:?}`, shortened).
    pub detail: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "service {:?}", self.service)?;
        if let Some(i) = &self.instance {
            write!(f, " instance {i:?}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// A value as a warning quotes it: debug-quoted, at most 64 characters.
fn quoted(v: &str) -> String {
    let short: String = v.chars().take(64).collect();
    if short.len() < v.len() {
        format!("{short:?}...")
    } else {
        format!("{short:?}")
    }
}

/// The instance's weight: meta `weight` when it is `0` to `256`, else [`DEFAULT_WEIGHT`].
pub fn weight(meta: &Meta) -> u16 {
    parse_weight(meta).unwrap_or(DEFAULT_WEIGHT)
}

fn parse_weight(meta: &Meta) -> Result<u16, String> {
    let Some(v) = meta.get("weight") else {
        return Ok(DEFAULT_WEIGHT);
    };
    let t = v.trim();
    match t.parse::<u16>() {
        Ok(w) if w <= MAX_WEIGHT && t.bytes().all(|b| b.is_ascii_digit()) => Ok(w),
        _ => Err(format!(
            "weight {}: expected an integer from 0 to {MAX_WEIGHT}; using {DEFAULT_WEIGHT}",
            quoted(v)
        )),
    }
}

/// A path prefix as routes use it: `None` for the whole host (`/` or empty), else the
/// normalised prefix. Segments are `A-Z a-z 0-9 . _ ~ -`, never `.` or `..` or empty.
pub fn path(v: &str) -> Result<Option<String>, String> {
    let expected = || {
        format!(
            "path {}: expected a URL path like /api/v1 (segments of A-Z a-z 0-9 . _ ~ -, at most {MAX_PATH} characters)",
            quoted(v)
        )
    };
    let t = v.trim();
    if t.is_empty() || t == "/" {
        return Ok(None);
    }
    if !t.starts_with('/') || t.len() > MAX_PATH {
        return Err(expected());
    }
    let body = t[1..].strip_suffix('/').unwrap_or(&t[1..]);
    let ok = body.split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
    });
    if !ok {
        return Err(expected());
    }
    Ok(Some(format!("/{body}")))
}

/// Whether plain HTTP to the instance's virtual host, when it has a certificate, redirects to
/// HTTPS (meta `https_redirect`, default `true`; a bad value keeps the default, warned by
/// [`route`]).
pub fn https_redirect(i: &Instance) -> bool {
    i.meta
        .get("https_redirect")
        .and_then(|v| flag(v))
        .unwrap_or(true)
}

fn flag(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" | "" => Some(false),
        _ => None,
    }
}

fn port(v: &str) -> Option<u16> {
    let t = v.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse::<u16>().ok().filter(|p| *p > 0)
}

/// Where `i` asks to be routed, with the warnings its values earn. `Err` when it must not be
/// routed at all (the warning says why).
pub fn route(i: &Instance) -> (Result<Route, Warning>, Vec<Warning>) {
    let warn = |reason, detail| Warning {
        service: i.name.clone(),
        instance: Some(i.id.clone()),
        reason,
        detail,
    };
    let mut warnings = Vec::new();
    if let Err(e) = parse_weight(&i.meta) {
        warnings.push(warn("bad_weight", e));
    }
    let meta = |k| i.meta.get(k).map(String::as_str);
    if let Some(v) = meta("https_redirect").filter(|v| flag(v).is_none()) {
        let e = format!(
            "https_redirect {}: expected true or false; redirecting",
            quoted(v)
        );
        warnings.push(warn("bad_https_redirect", e));
    }
    let proto = match meta("proto") {
        None => Proto::Http,
        Some(p) => match Proto::parse(p.trim()) {
            Some(p) => p,
            None => {
                let e = format!(
                    "proto {}: expected http, h2c, grpc, tcp or udp; not routed",
                    quoted(p)
                );
                return (Err(warn("bad_proto", e)), warnings);
            }
        },
    };
    let strip = match meta("path_strip").map(|v| (v, flag(v))) {
        None => false,
        Some((_, Some(s))) => s,
        Some((v, None)) => {
            let e = format!(
                "path_strip {}: expected true or false; not routed",
                quoted(v)
            );
            return (Err(warn("bad_path_strip", e)), warnings);
        }
    };
    if proto.is_http() {
        if let Some(l) = meta("listen") {
            warnings.push(warn(
                "ignored",
                format!(
                    "listen {} applies to tcp and udp services only; ignored for {proto}",
                    quoted(l)
                ),
            ));
        }
        let path = match meta("path").map(path) {
            None => None,
            Some(Ok(p)) => p,
            Some(Err(e)) => return (Err(warn("bad_path", format!("{e}; not routed"))), warnings),
        };
        if strip && proto != Proto::Http {
            let e = format!("path_strip applies to http routes only, not {proto}; not routed");
            return (Err(warn("bad_path_strip", e)), warnings);
        }
        let strip = strip && path.is_some();
        let r = Route {
            proto,
            path,
            strip,
            listen: None,
        };
        return (Ok(r), warnings);
    }
    for k in ["path", "path_strip"] {
        if meta(k).is_some() {
            warnings.push(warn(
                "ignored",
                format!("{k} applies to http, h2c and grpc services only; ignored for {proto}"),
            ));
        }
    }
    let listen = match meta("listen") {
        None => {
            let e = format!("proto {proto} needs listen (the port the proxy opens); not routed");
            return (Err(warn("bad_listen", e)), warnings);
        }
        Some(v) => match port(v) {
            Some(p) => p,
            None => {
                let e = format!(
                    "listen {}: expected a port from 1 to 65535; not routed",
                    quoted(v)
                );
                return (Err(warn("bad_listen", e)), warnings);
            }
        },
    };
    let r = Route {
        proto,
        path: None,
        strip: false,
        listen: Some(listen),
    };
    (Ok(r), warnings)
}

/// One pool of an HTTP host: a path prefix and the instances that asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRoute {
    /// The prefix (`/` for the whole host).
    pub path: String,
    /// Whether the prefix is removed before proxying.
    pub strip: bool,
    /// What the instances speak.
    pub proto: Proto,
    /// Its instances, in the order they were given.
    pub instances: Vec<Arc<Instance>>,
}

impl PathRoute {
    /// A config-safe name, unique among the routes of one host: empty for `/`, else the
    /// prefix as a safe token (`api_v1-<hash>` for `/api/v1`).
    pub fn name(&self) -> String {
        if self.path == "/" {
            String::new()
        } else {
            crate::names::safe_token(&self.path[1..])
        }
    }
}

/// Groups `instances` (one host's, or the default host's) into path routes, longest prefix
/// first (then by path), so a proxy that tries rules in order matches the most specific one.
/// The first instance of a path decides its protocol and stripping; later ones that disagree
/// are left out with a `conflict` warning, so one wrong label cannot change a working route.
/// `route_of` gives each instance's route (already worked out by the caller); instances it
/// gives `None` for (not routable, or not HTTP) are skipped.
pub fn group_paths<'a>(
    instances: impl IntoIterator<Item = (&'a Arc<Instance>, &'a Route)>,
    place: &str,
    warnings: &mut Vec<Warning>,
) -> Vec<PathRoute> {
    let mut by_path: BTreeMap<&str, PathRoute> = BTreeMap::new();
    for (i, r) in instances {
        if !r.proto.is_http() {
            continue;
        }
        let p = r.path.as_deref().unwrap_or("/");
        let route = by_path.entry(p).or_insert_with(|| PathRoute {
            path: p.to_string(),
            strip: r.strip,
            proto: r.proto,
            instances: Vec::new(),
        });
        if route.proto != r.proto || route.strip != r.strip {
            warnings.push(Warning {
                service: i.name.clone(),
                instance: Some(i.id.clone()),
                reason: "conflict",
                detail: format!(
                    "{place} path {} is served as proto {} path_strip {}; this instance asks for proto {} path_strip {}; not routed",
                    route.path, route.proto, route.strip, r.proto, r.strip
                ),
            });
            continue;
        }
        route.instances.push(i.clone());
    }
    let mut routes: Vec<PathRoute> = by_path.into_values().collect();
    routes.sort_by(|a, b| b.path.len().cmp(&a.path.len()).then(a.path.cmp(&b.path)));
    routes
}

/// The ports the proxy keeps for itself or refuses to open for services: from the template's
/// vars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenPolicy {
    /// Ports below this are refused (`vars.listen_floor`, default 1024) ...
    pub floor: u16,
    /// ... unless listed here (`vars.listen_allowed`).
    pub allowed: Vec<u16>,
    /// The proxy's own ports (`vars.listen`, `h2c_listen`, `https_listen`, `stats_port`).
    pub reserved: Vec<u16>,
}

impl ListenPolicy {
    /// The default floor.
    pub const FLOOR: u16 = 1024;

    /// The policy `vars` set.
    pub fn from_vars(vars: &BTreeMap<String, serde_json::Value>) -> ListenPolicy {
        let num = |v: &serde_json::Value| match v {
            serde_json::Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            // `127.0.0.1:8080` or `[::1]:8080` as the templates take them: the port is last.
            serde_json::Value::String(s) => port(s.rsplit(':').next().unwrap_or(s)),
            _ => None,
        };
        let floor = vars
            .get("listen_floor")
            .and_then(num)
            .unwrap_or(Self::FLOOR);
        let allowed = match vars.get("listen_allowed") {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(num).collect(),
            Some(v) => num(v).into_iter().collect(),
            None => Vec::new(),
        };
        let mut reserved: Vec<u16> = ["listen", "h2c_listen", "https_listen", "stats_port"]
            .iter()
            .filter_map(|k| vars.get(*k).and_then(num))
            .collect();
        if !vars.contains_key("listen") {
            reserved.push(80);
        }
        ListenPolicy {
            floor,
            allowed,
            reserved,
        }
    }

    /// Why `port` may not be opened for a service, if it may not.
    fn refuses(&self, port: u16) -> Option<String> {
        if self.reserved.contains(&port) {
            return Some(format!("listen {port} is one of the proxy's own ports"));
        }
        if port < self.floor && !self.allowed.contains(&port) {
            return Some(format!(
                "listen {port} is below the floor {} (vars.listen_floor; allow it in vars.listen_allowed)",
                self.floor
            ));
        }
        None
    }
}

impl Default for ListenPolicy {
    fn default() -> Self {
        ListenPolicy::from_vars(&BTreeMap::new())
    }
}

/// A port the proxy opens for one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// `tcp` or `udp`.
    pub proto: Proto,
    /// The port.
    pub port: u16,
    /// The service that holds it.
    pub service: String,
    /// That service's instances that asked for it.
    pub instances: Vec<Arc<Instance>>,
}

/// Per service (in name order), its instances asking for a port: (proto, port, instance).
pub type ListenAsks = BTreeMap<String, Vec<(Proto, u16, Arc<Instance>)>>;

/// Which service holds each port: the first to ask keeps it for as long as it asks, so a second
/// service asking for a taken port never takes it over (it gets a `listen_taken` warning).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims(BTreeMap<(Proto, u16), String>);

impl Claims {
    /// The listeners for `asks` (service -> its instances asking for (proto, port), services in
    /// name order), keeping the holders of earlier calls where they still ask. Refused and
    /// taken ports earn warnings.
    pub fn assign(
        &mut self,
        asks: &ListenAsks,
        policy: &ListenPolicy,
        warnings: &mut Vec<Warning>,
    ) -> Vec<Listener> {
        // Who asks for what, in service order.
        let mut wants: BTreeMap<(Proto, u16), Vec<&str>> = BTreeMap::new();
        for (svc, list) in asks {
            for (proto, port, _) in list {
                let w = wants.entry((*proto, *port)).or_default();
                if w.last() != Some(&svc.as_str()) {
                    w.push(svc);
                }
            }
        }
        self.0
            .retain(|k, holder| wants.get(k).is_some_and(|w| w.contains(&holder.as_str())));
        let mut out = Vec::new();
        for ((proto, port), services) in &wants {
            if let Some(why) = policy.refuses(*port) {
                for s in services {
                    warnings.push(Warning {
                        service: s.to_string(),
                        instance: None,
                        reason: "listen_refused",
                        detail: format!("{why}; not routed"),
                    });
                }
                self.0.remove(&(*proto, *port));
                continue;
            }
            let holder = self
                .0
                .entry((*proto, *port))
                .or_insert_with(|| services[0].to_string())
                .clone();
            for s in services.iter().filter(|s| **s != holder) {
                warnings.push(Warning {
                    service: s.to_string(),
                    instance: None,
                    reason: "listen_taken",
                    detail: format!(
                        "listen {port}/{proto} is held by service {holder:?}; not routed"
                    ),
                });
            }
            let instances = asks[&holder]
                .iter()
                .filter(|(p, n, _)| (*p, *n) == (*proto, *port))
                .map(|(_, _, i)| i.clone())
                .collect();
            out.push(Listener {
                proto: *proto,
                port: *port,
                service: holder,
                instances,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::inst;

    fn with(meta: &[(&str, &str)]) -> Instance {
        let mut i = inst("web", "w1", "10.0.0.1", 80);
        for (k, v) in meta {
            i.meta.insert(k.to_string(), v.to_string());
        }
        i
    }

    #[test]
    fn paths_are_normalised_or_refused() {
        for (v, want) in [
            ("", None),
            ("/", None),
            ("/api", Some("/api")),
            ("/api/", Some("/api")),
            (" /api/v1.2 ", Some("/api/v1.2")),
            ("/a~b/c_d-e", Some("/a~b/c_d-e")),
        ] {
            assert_eq!(path(v).unwrap().as_deref(), want, "{v:?}");
        }
        for v in [
            "api", "//", "/a//b", "/a/../b", "/./a", "/a b", "/a;b", "/a{", "/a}", "/a\nb", "/a'b",
            "/a\"b", "/a$b", "/a%20", "/a?b", "/a#b", "/a\\b", "/é",
        ] {
            let e = path(v).unwrap_err();
            assert!(e.starts_with("path "), "{e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        assert!(path(&format!("/{}", "a".repeat(300))).is_err());
    }

    #[test]
    fn routes_from_meta() {
        let ok = |m: &[(&str, &str)]| route(&with(m)).0.unwrap();
        assert_eq!(
            ok(&[]),
            Route {
                proto: Proto::Http,
                path: None,
                strip: false,
                listen: None
            }
        );
        let r = ok(&[("proto", "GRPC"), ("path", "/pkg.Svc")]);
        assert_eq!(
            (r.proto, r.path.as_deref()),
            (Proto::Grpc, Some("/pkg.Svc"))
        );
        let r = ok(&[("path", "/api"), ("path_strip", "true")]);
        assert!(r.strip);
        // Stripping nothing is not stripping.
        assert!(!ok(&[("path_strip", "true")]).strip);
        let r = ok(&[("proto", "tcp"), ("listen", "5432")]);
        assert_eq!((r.proto, r.listen), (Proto::Tcp, Some(5432)));

        let refused = |m: &[(&str, &str)], reason| {
            let (r, _) = route(&with(m));
            let w = r.unwrap_err();
            assert_eq!(w.reason, reason, "{m:?}: {w}");
            assert!(w.to_string().contains("not routed"), "{w}");
        };
        refused(&[("proto", "quic")], "bad_proto");
        refused(&[("path", "/a;b")], "bad_path");
        refused(&[("path_strip", "maybe")], "bad_path_strip");
        refused(
            &[("proto", "grpc"), ("path", "/x"), ("path_strip", "true")],
            "bad_path_strip",
        );
        refused(&[("proto", "tcp")], "bad_listen");
        refused(&[("proto", "udp"), ("listen", "0")], "bad_listen");
        refused(&[("proto", "tcp"), ("listen", "70000")], "bad_listen");
        refused(&[("proto", "tcp"), ("listen", "+80")], "bad_listen");

        // Warnings that keep the route.
        let (r, w) = route(&with(&[("weight", "300"), ("listen", "9000")]));
        assert!(r.is_ok());
        let reasons: Vec<_> = w.iter().map(|w| w.reason).collect();
        assert_eq!(reasons, ["bad_weight", "ignored"]);
    }

    #[test]
    fn weights() {
        for (v, want) in [
            ("0", 0),
            ("1", 1),
            (" 256 ", 256),
            ("257", 1),
            ("-1", 1),
            ("x", 1),
            ("+5", 1),
        ] {
            assert_eq!(weight(&with(&[("weight", v)]).meta), want, "{v:?}");
        }
        assert_eq!(weight(&with(&[]).meta), DEFAULT_WEIGHT);
    }

    #[test]
    fn paths_group_longest_first_and_the_first_instance_decides() {
        let a = Arc::new(with(&[("path", "/api")]));
        let mut b = with(&[("path", "/api/v2")]);
        b.id = "w2".into();
        let mut c = with(&[]);
        c.id = "w3".into();
        let mut d = with(&[("path", "/api"), ("proto", "h2c")]);
        d.id = "w4".into();
        let insts: Vec<Arc<Instance>> = vec![a, Arc::new(b), Arc::new(c), Arc::new(d)];
        let routes: Vec<Route> = insts.iter().map(|i| route(i).0.unwrap()).collect();
        let mut warnings = Vec::new();
        let g = group_paths(insts.iter().zip(&routes), "host x", &mut warnings);
        let paths: Vec<_> = g.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(paths, ["/api/v2", "/api", "/"]);
        assert_eq!(g[1].instances.len(), 1, "the h2c instance is refused");
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].reason, "conflict");
        assert_eq!(warnings[0].instance.as_deref(), Some("w4"));
        assert_eq!(g[2].name(), "");
        assert!(crate::names::is_safe_token(&g[0].name()));
        assert_ne!(g[0].name(), g[1].name());
    }

    #[test]
    fn the_first_service_on_a_port_keeps_it() {
        let i = |svc: &str| Arc::new(inst(svc, "1", "10.0.0.1", 5432));
        let ask = |svcs: &[&str], port| -> ListenAsks {
            svcs.iter()
                .map(|s| (s.to_string(), vec![(Proto::Tcp, port, i(s))]))
                .collect()
        };
        let policy = ListenPolicy::default();
        let mut claims = Claims::default();
        let mut w = Vec::new();
        // "pg" asks alone, then "aa" (first by name) asks too: "pg" keeps the port.
        let l = claims.assign(&ask(&["pg"], 5432), &policy, &mut w);
        assert_eq!(l[0].service, "pg");
        assert!(w.is_empty());
        let l = claims.assign(&ask(&["aa", "pg"], 5432), &policy, &mut w);
        assert_eq!((l.len(), l[0].service.as_str()), (1, "pg"));
        assert_eq!((w[0].reason, w[0].service.as_str()), ("listen_taken", "aa"));
        // "pg" goes: "aa" gets it.
        w.clear();
        let l = claims.assign(&ask(&["aa"], 5432), &policy, &mut w);
        assert_eq!(l[0].service, "aa");
        assert!(w.is_empty());
        // Below the floor, or the proxy's own: refused.
        for port in [25, 80] {
            w.clear();
            assert!(claims
                .assign(&ask(&["aa"], port), &policy, &mut w)
                .is_empty());
            assert_eq!(w[0].reason, "listen_refused", "{port}");
        }
        let own = ListenPolicy::from_vars(
            &[(
                "h2c_listen".to_string(),
                serde_json::json!("127.0.0.1:8081"),
            )]
            .into(),
        );
        assert_eq!(own.reserved, [8081, 80]);
        let allowing = ListenPolicy::from_vars(
            &[("listen_allowed".to_string(), serde_json::json!([25]))].into(),
        );
        w.clear();
        assert_eq!(claims.assign(&ask(&["aa"], 25), &allowing, &mut w).len(), 1);
        assert!(w.is_empty());
    }
}
