//! nginx membership without reloads, as Kubernetes' ingress-nginx does it.
//!
//! The shipped template (with `vars.lua_peers: true`) gives every upstream a
//! `balancer_by_lua_block { require("switchboard_peers").balance("<upstream>") }` that picks a
//! peer from the `lua_shared_dict switchboard_peers`, and a `server` listening only on a unix
//! socket whose `POST /switchboard/peers` replaces that table. This module decides, from the old
//! and new rendered files alone, whether a change is membership-only (the files differ only in
//! the `server` lines of such upstreams) and then posts the new file's peer table to the socket.
//!
//! The file stays the truth: it still lists every upstream's servers, and when the shared dict
//! has no entry for an upstream, or only one pushed before the running config was loaded, the
//! Lua balancer leaves the choice to nginx's own round robin over the file's servers (verified
//! with Debian 12's lua-nginx-module 0.10.23: without `set_current_peer` the upstream's round
//! robin picks). So a fresh start or a reload serves the right peers before any push.
//!
//! The wire format is deliberately not JSON (Debian's Lua module has no JSON library): a first
//! line `switchboard-peers 1`, then one line per upstream, `<name> <ip:port> <ip:port>...`. The
//! whole table is sent every time; the Lua side validates all of it before storing any, and
//! drops upstreams the table no longer names.

use super::{LiveError, Summary};
use crate::duration;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The socket the shipped template listens on unless `vars.lua_peers_socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/nginx-peers.sock";
/// The path of the peers endpoint on that socket.
pub const ENDPOINT_PATH: &str = "/switchboard/peers";
/// First line of every update: the format's name and version.
const HEADER: &str = "switchboard-peers 1";
/// Longest answer read from the endpoint (it says one short line).
const MAX_ANSWER: u64 = 64 * 1024;

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

/// The `nginx_lua` live channel: where nginx's peers endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NginxLua {
    /// The peers endpoint's unix socket; must match the template's `vars.lua_peers_socket`.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Time limit for one update (connect, send, answer).
    #[serde(default = "default_timeout", with = "duration::serde_text")]
    pub timeout: Duration,
}

impl Default for NginxLua {
    fn default() -> Self {
        NginxLua {
            socket: default_socket(),
            timeout: default_timeout(),
        }
    }
}

/// Upstream name → its live peers, in file order: the whole table nginx should hold.
pub type PeerTable = BTreeMap<String, Vec<SocketAddr>>;

/// A membership-only change: the new file's complete peer table and what changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Every Lua-balanced upstream of the new file with its peers.
    pub peers: PeerTable,
    /// Upstreams whose `server` lines changed.
    pub changed: Vec<String>,
    /// Peers in the changed upstreams that were not there before (for the log line).
    pub added: usize,
    /// Peers gone from the changed upstreams (for the log line).
    pub removed: usize,
}

impl NginxLua {
    /// See [`super::LiveChannel::plan`]. `Some` only when both files parse, everything outside
    /// the `server` lines of upstreams is identical, and every upstream whose servers changed
    /// is Lua-balanced and pushable (IP peers, only `max_fails`/`fail_timeout`/`down`).
    pub fn plan(&self, old: &str, new: &str) -> Option<Plan> {
        let old = Parsed::parse(old)?;
        let new = Parsed::parse(new)?;
        if old.skeleton != new.skeleton {
            return None;
        }
        let mut changed = Vec::new();
        let (mut added, mut removed) = (0, 0);
        for (name, u) in &new.upstreams {
            let before = old.upstreams.get(name)?;
            if before.server_lines != u.server_lines {
                let now = u.peers.as_ref()?;
                let was = before.peers.as_deref().unwrap_or_default();
                added += now.iter().filter(|p| !was.contains(p)).count();
                removed += was.iter().filter(|p| !now.contains(p)).count();
                changed.push(name.to_string());
            }
        }
        Some(Plan {
            peers: new.table(),
            changed,
            added,
            removed,
        })
    }

    /// See [`super::LiveChannel::apply`].
    pub async fn apply(&self, plan: Plan) -> Result<Summary, LiveError> {
        self.post(&plan.peers).await?;
        Ok(Summary {
            changed: plan.changed,
            pools: plan.peers.len(),
            peers: plan.peers.values().map(Vec::len).sum(),
            added: plan.added,
            removed: plan.removed,
            updated: 0,
        })
    }

    /// See [`super::LiveChannel::after_reload`]: pushes the complete table of `new`, so the
    /// dict holds the file's peers rather than waiting for the next membership change.
    pub async fn after_reload(&self, new: &str) {
        let Some(parsed) = Parsed::parse(new) else {
            tracing::debug!("nginx_lua: rendered file not understood; nothing pushed after reload");
            return;
        };
        let table = parsed.table();
        if table.is_empty() {
            tracing::debug!("nginx_lua: no Lua-balanced upstream; nothing pushed after reload");
            return;
        }
        match self.post(&table).await {
            Ok(()) => tracing::info!(
                socket = %self.socket.display(),
                upstreams = table.len(),
                "nginx_lua: peer lists pushed after reload"
            ),
            // nginx may not be running yet (first render) or may still be starting: the file
            // it loads has the same peers, so this costs nothing but the log line.
            Err(e) => tracing::warn!(error = %e, "nginx_lua: peer lists not pushed after reload"),
        }
    }

    /// One update: HTTP/1.0 (so the answer is neither chunked nor kept alive) over the unix
    /// socket, bounded by `timeout`.
    async fn post(&self, table: &PeerTable) -> Result<(), LiveError> {
        let endpoint = self.socket.display().to_string();
        let body = encode(table).map_err(|reason| LiveError::Invalid {
            endpoint: endpoint.clone(),
            reason,
        })?;
        let exchange = async {
            let unreachable = |e: std::io::Error| LiveError::Unreachable {
                endpoint: endpoint.clone(),
                reason: e.to_string(),
            };
            let mut stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(unreachable)?;
            let request = format!(
                "POST {ENDPOINT_PATH} HTTP/1.0\r\nHost: localhost\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(unreachable)?;
            let mut answer = Vec::new();
            stream
                .take(MAX_ANSWER)
                .read_to_end(&mut answer)
                .await
                .map_err(unreachable)?;
            check_answer(&answer).map_err(|reason| LiveError::Refused {
                endpoint: endpoint.clone(),
                reason,
            })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(LiveError::Timeout {
                endpoint,
                after: self.timeout,
            }),
        }
    }
}

/// The update body for `table`, refusing what the Lua side would: a name outside
/// `[A-Za-z0-9_.-]` (what `nginx_name` gives and the parser accepts; also what keeps the
/// line format unambiguous), an IPv6 scope, port 0. Peers are IP socket addresses by type.
pub fn encode(table: &PeerTable) -> Result<String, String> {
    let mut out = format!("{HEADER}\n");
    for (name, peers) in table {
        let name_ok = !name.is_empty()
            && name.len() <= 256
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !name_ok {
            return Err(format!("invalid upstream name {name:?}"));
        }
        if let Some(p) = peers.iter().find(|p| !pushable(p)) {
            return Err(format!("upstream {name}: invalid peer {p}"));
        }
        out.push_str(name);
        for p in peers {
            out.push(' ');
            out.push_str(&p.to_string());
        }
        out.push('\n');
    }
    Ok(out)
}

/// Whether the Lua side takes `p` (`set_current_peer` gets the address text as nginx parses
/// it: no IPv6 zone, a real port).
fn pushable(p: &SocketAddr) -> bool {
    p.port() != 0 && !matches!(p, SocketAddr::V6(v6) if v6.scope_id() != 0)
}

/// `Ok` for a `200` answer, else the status line and the first line of the body.
fn check_answer(raw: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or_default();
    let code = status_line.split_whitespace().nth(1).unwrap_or_default();
    let first = body.lines().next().unwrap_or_default().trim();
    if code == "200" {
        return Ok(());
    }
    if status_line.is_empty() {
        return Err("empty answer".into());
    }
    let first: String = first.chars().take(200).collect();
    Err(format!("{status_line}: {first}"))
}

/// A rendered nginx config seen as "everything else" plus each upstream's `server` lines.
#[derive(Debug, PartialEq, Eq)]
struct Parsed<'a> {
    /// Every line outside upstream `server` lines (and outside blank or comment lines within
    /// upstreams, which mean nothing to nginx), in order.
    skeleton: Vec<&'a str>,
    upstreams: BTreeMap<&'a str, Upstream<'a>>,
}

#[derive(Debug, PartialEq, Eq)]
struct Upstream<'a> {
    /// The `server` lines as written, in order (what a change is detected on).
    server_lines: Vec<&'a str>,
    /// The peers to push (non-`down` servers), or `None` when this upstream cannot be updated
    /// live: no `.balance("<name>")` Lua balancer, a peer that is not an IP address (Lua's
    /// `set_current_peer` takes no DNS name), or a server parameter the Lua does not honour.
    peers: Option<Vec<SocketAddr>>,
}

impl<'a> Parsed<'a> {
    /// `None` when the file's upstream blocks are not laid out one directive per line (an
    /// unterminated block, a nested block, several directives on a line): such a file is never
    /// taken as membership-only, so the worst a surprise layout costs is a reload.
    fn parse(text: &'a str) -> Option<Parsed<'a>> {
        let mut skeleton = Vec::new();
        let mut upstreams = BTreeMap::new();
        let mut current: Option<(&'a str, Vec<&'a str>, bool)> = None;
        for line in text.lines() {
            let t = line.trim();
            let Some((name, servers, balanced)) = current.as_mut() else {
                if let Some(name) = upstream_header(t) {
                    if upstreams.contains_key(name) {
                        return None;
                    }
                    current = Some((name, Vec::new(), false));
                }
                skeleton.push(line);
                continue;
            };
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            if t.split_whitespace().next() == Some("server") {
                if t.contains(['{', '}']) {
                    return None;
                }
                servers.push(t);
                continue;
            }
            skeleton.push(line);
            if t != "}" {
                if t.matches('{').count() != t.matches('}').count() {
                    return None;
                }
                if t.starts_with("balancer_by_lua_block")
                    && t.contains(&format!(".balance(\"{name}\")"))
                {
                    *balanced = true;
                }
                continue;
            }
            let (name, server_lines, balanced) = current.take().expect("inside an upstream");
            let peers = if balanced {
                server_peers(&server_lines)
            } else {
                None
            };
            upstreams.insert(
                name,
                Upstream {
                    server_lines,
                    peers,
                },
            );
        }
        if current.is_some() {
            return None;
        }
        Some(Parsed {
            skeleton,
            upstreams,
        })
    }

    /// The table to push: every upstream that can be updated live.
    fn table(&self) -> PeerTable {
        self.upstreams
            .iter()
            .filter_map(|(name, u)| Some((name.to_string(), u.peers.clone()?)))
            .collect()
    }
}

/// `upstream NAME {` alone on a line, with NAME in `[A-Za-z0-9_.-]` (what `nginx_name` gives).
fn upstream_header(t: &str) -> Option<&str> {
    let rest = t.strip_prefix("upstream")?;
    let rest = rest.strip_suffix('{')?.trim();
    if !t["upstream".len()..].starts_with(char::is_whitespace) || rest.is_empty() {
        return None;
    }
    rest.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        .then_some(rest)
}

/// The peers of one upstream's `server` lines (each `server ADDR [PARAMS];`, optionally with a
/// trailing comment), or `None` if one is not pushable.
fn server_peers(lines: &[&str]) -> Option<Vec<SocketAddr>> {
    let mut peers = Vec::new();
    for line in lines {
        let directive = line.split('#').next().unwrap_or_default().trim();
        let words: Vec<&str> = directive.strip_suffix(';')?.split_whitespace().collect();
        let [_server, addr, params @ ..] = words.as_slice() else {
            return None;
        };
        let mut down = false;
        for p in params {
            match *p {
                "down" => down = true,
                p if p.starts_with("max_fails=") || p.starts_with("fail_timeout=") => {}
                _ => return None,
            }
        }
        if down {
            continue;
        }
        let peer: SocketAddr = addr.parse().ok()?;
        if !pushable(&peer) {
            return None;
        }
        peers.push(peer);
    }
    Some(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BALANCER: &str =
        "balancer_by_lua_block { require(\"switchboard_peers\").balance(\"NAME\") }";

    /// A config shaped like the shipped template's output: upstream `svc_web` with `servers`
    /// lines, an optional Lua balancer, and a server block.
    fn conf(servers: &[&str], lua: bool, listen: u16) -> String {
        let mut s = String::from("worker_processes 1;\nhttp {\n    upstream svc_web {\n");
        if servers.is_empty() {
            s.push_str("        # No live instance: a placeholder keeps the upstream valid.\n");
            s.push_str("        server 127.0.0.1:65535 down;\n");
        }
        for a in servers {
            s.push_str(&format!(
                "        server {a} max_fails=1 fail_timeout=5s;\n"
            ));
        }
        if lua {
            s.push_str(&format!(
                "        {}\n",
                BALANCER.replace("NAME", "svc_web")
            ));
        }
        s.push_str(&format!(
            "    }}\n    server {{\n        listen {listen};\n        location / {{ proxy_pass http://svc_web; }}\n    }}\n}}\n"
        ));
        s
    }

    fn addrs(a: &[&str]) -> Vec<SocketAddr> {
        a.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn ch() -> NginxLua {
        NginxLua::default()
    }

    #[test]
    fn membership_only_changes_are_planned() {
        let one = ["10.0.0.1:80"];
        let three = ["10.0.0.1:80", "10.0.0.2:80", "[fd00::3]:8080"];
        // Scale up, scale down, down to none (placeholder), and back.
        let cases: [(&[&str], &[&str]); 4] =
            [(&one, &three), (&three, &one), (&one, &[]), (&[], &one)];
        for (a, b) in cases {
            let p = ch()
                .plan(&conf(a, true, 80), &conf(b, true, 80))
                .unwrap_or_else(|| panic!("{a:?} -> {b:?} should be live"));
            assert_eq!(p.changed, vec!["svc_web".to_string()]);
            assert_eq!(p.peers["svc_web"], addrs(b), "{a:?} -> {b:?}");
        }
    }

    #[test]
    fn anything_else_is_not_membership_only() {
        let one = ["10.0.0.1:80"];
        let two = ["10.0.0.1:80", "10.0.0.2:80"];
        let base = conf(&one, true, 80);
        let cases: Vec<(&str, String)> = vec![
            ("another listen port", conf(&two, true, 81)),
            ("no Lua balancer", conf(&two, false, 80)),
            ("a DNS name", conf(&["10.0.0.1:80", "web.internal:80"], true, 80)),
            (
                "a parameter the Lua does not honour",
                base.replace("max_fails=1 fail_timeout=5s;", "weight=2;"),
            ),
            (
                "a new upstream",
                base.replace(
                    "    server {\n",
                    &format!(
                        "    upstream svc_new {{\n        server 10.0.0.9:80;\n        {}\n    }}\n    server {{\n",
                        BALANCER.replace("NAME", "svc_new")
                    ),
                ),
            ),
            (
                "a balancer for another upstream's name",
                conf(&two, true, 80).replace(".balance(\"svc_web\")", ".balance(\"svc_x\")"),
            ),
            ("an unterminated upstream", base.replace("    }\n    server {", "    server {")),
            (
                "two servers on one line",
                base.replace(
                    "fail_timeout=5s;\n",
                    "fail_timeout=5s; server 10.0.0.2:80;\n",
                ),
            ),
        ];
        for (what, new) in cases {
            assert_eq!(ch().plan(&base, &new), None, "{what}:\n{new}");
        }
        // A file with a non-Lua upstream changing beside a Lua one is not live either way.
        let mixed = |s: &str| {
            format!(
                "http {{\n    upstream plain {{\n        server {s};\n    }}\n    upstream svc_web {{\n        server 10.0.0.1:80;\n        {}\n    }}\n}}\n",
                BALANCER.replace("NAME", "svc_web")
            )
        };
        assert_eq!(
            ch().plan(&mixed("10.0.0.5:80"), &mixed("10.0.0.6:80")),
            None
        );
    }

    #[test]
    fn the_table_holds_every_pushable_upstream() {
        let text = format!(
            "http {{\n    upstream a {{\n        server 10.0.0.1:80;\n        server 10.0.0.2:80 down;\n        {}\n    }}\n    upstream b {{\n        server name.example:80;\n        {}\n    }}\n    upstream c {{\n        server 10.0.0.3:80;\n    }}\n}}\n",
            BALANCER.replace("NAME", "a"),
            BALANCER.replace("NAME", "b"),
        );
        let p = Parsed::parse(&text).unwrap();
        let t = p.table();
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!(t["a"], addrs(&["10.0.0.1:80"]));
        assert_eq!(encode(&t).unwrap(), "switchboard-peers 1\na 10.0.0.1:80\n");
        let mut t2 = t.clone();
        t2.insert("v6".into(), addrs(&["[::1]:81"]));
        t2.insert("empty".into(), vec![]);
        assert_eq!(
            encode(&t2).unwrap(),
            "switchboard-peers 1\na 10.0.0.1:80\nempty\nv6 [::1]:81\n"
        );
        // What the Lua side would refuse is never sent.
        for (name, peer) in [
            ("a b", "10.0.0.1:80"),
            ("a\nb", "10.0.0.1:80"),
            ("", "10.0.0.1:80"),
            ("ok", "10.0.0.1:0"),
            ("ok", "[fe80::1%2]:80"),
        ] {
            let t = PeerTable::from([(name.to_string(), addrs(&[peer]))]);
            assert!(encode(&t).is_err(), "{name:?} {peer}");
        }
    }

    #[test]
    fn the_shipped_template_renders_plannable_files() {
        use crate::model::{tests::inst, Snapshot};
        use crate::render::data::template_data;
        let src = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../templates/nginx.conf.hbs"
        ))
        .unwrap();
        let render = |lua: bool, n: u16, extra: bool| {
            let mut vars = BTreeMap::new();
            if lua {
                vars.insert("lua_peers".to_string(), serde_json::json!(true));
            }
            let mut instances: Vec<_> = (0..n)
                .map(|i| inst("http", &format!("i{i}"), "10.0.0.1", 8000 + i))
                .collect();
            if extra {
                instances.push(inst("other", "o1", "10.0.0.9", 80));
            }
            let snap = Snapshot::build(instances, Default::default(), &[]);
            crate::render::Renderer::default()
                .render("nginx.conf.hbs", &src, &template_data(&snap, &vars))
                .unwrap()
        };
        let p = ch()
            .plan(&render(true, 1, false), &render(true, 3, false))
            .unwrap();
        assert_eq!(p.changed, vec!["svc_http".to_string()]);
        assert_eq!(p.peers["svc_http"].len(), 3);
        assert!(ch()
            .plan(&render(true, 3, false), &render(true, 1, false))
            .is_some());
        // A new service, or the last instance of one going (its upstream goes with it), is
        // structural; without Lua nothing is live.
        assert!(ch()
            .plan(&render(true, 1, false), &render(true, 0, false))
            .is_none());
        assert!(ch()
            .plan(&render(true, 1, false), &render(true, 1, true))
            .is_none());
        assert!(ch()
            .plan(&render(false, 1, false), &render(false, 3, false))
            .is_none());
        let plain = render(false, 2, false);
        assert!(!plain.contains("lua"), "{plain}");
    }

    #[test]
    fn answers() {
        assert_eq!(
            check_answer(b"HTTP/1.1 200 OK\r\nServer: nginx\r\n\r\nok 1 upstreams 2 peers\n"),
            Ok(())
        );
        assert_eq!(
            check_answer(b"HTTP/1.1 400 Bad Request\r\n\r\nline 2: x is not ip:port\n")
                .unwrap_err(),
            "HTTP/1.1 400 Bad Request: line 2: x is not ip:port"
        );
        assert_eq!(check_answer(b"").unwrap_err(), "empty answer");
    }

    #[tokio::test]
    async fn an_absent_endpoint_is_an_error_naming_the_socket() {
        let d = tempfile::tempdir().unwrap();
        let c = NginxLua {
            socket: d.path().join("nope.sock"),
            ..NginxLua::default()
        };
        let plan = Plan {
            peers: PeerTable::new(),
            changed: vec![],
            added: 0,
            removed: 0,
        };
        let e = c.apply(plan).await.unwrap_err().to_string();
        assert!(e.contains("nope.sock"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }
}
