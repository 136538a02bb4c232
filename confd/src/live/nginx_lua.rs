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
//! line `switchboard-peers 2`, then one line per upstream, `<name> <peer> <peer>...`, where a
//! peer is `ip:port` (weight 1) or `ip:port*W` (weight W, 1 to 256, the file's `weight=W`). The
//! Lua picks among them by smooth weighted round robin, as nginx's own balancer does, so a
//! weight change is a live change too. A `down` server (how a weight of 0 is rendered: nginx
//! refuses `weight=0`) is left out of the table, so it gets no new requests. The whole table is
//! sent every time; the Lua side validates all of it before storing any, and drops upstreams
//! the table no longer names.
//!
//! Before a reload (a change that is not membership-only), [`NginxLua::before_reload`] posts
//! `switchboard-closing 1` and a time to `POST /switchboard/closing` on the same socket and
//! waits `close_before_reload`: a graceful reload closes the old workers' idle keep-alive client
//! connections at once, racing requests clients are just sending on them (nginx 1.22 has no
//! equivalent of HAProxy's `option idle-close-on-response`), so for that moment every response
//! of the running workers says `Connection: close`, and the clients that are active reconnect
//! instead of sitting idle on a worker about to quit. The workers of the reload itself ignore
//! the request (it predates their config load), and it lapses by itself after the time given.
//!
//! Only `http` upstreams can be live: Debian has no stream Lua module, so an upstream inside a
//! `stream { }` block has no Lua balancer, and a change to its servers is always a reload. The
//! parser reads the file's block nesting as nginx does (quotes, comments, Lua blocks) to know
//! which block an upstream is in, so a Lua balancer line alone never makes a stream upstream
//! live. Whether an upstream is used by `proxy_pass`, `grpc_pass` or both does not matter: the
//! balancer belongs to the upstream.

use super::{LiveError, Summary};
use crate::duration;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The socket the shipped template listens on unless `vars.lua_peers_socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/nginx-peers.sock";
/// The path of the peers endpoint on that socket.
pub const ENDPOINT_PATH: &str = "/switchboard/peers";
/// The path of the closing endpoint on that socket (see [`NginxLua::before_reload`]).
pub const CLOSING_PATH: &str = "/switchboard/closing";
/// The path of the certificates endpoint on that socket (see [`NginxLua::certs_renewed`]).
pub const CERTS_PATH: &str = "/switchboard/certs";
/// First line of a certificates table: the format's name and version.
const CERTS_HEADER: &str = "switchboard-certs 1";
/// Largest PEM file (chain and key) the Lua side takes for one pair.
const MAX_PEM: usize = 100_000;
/// First line of a close request: the format's name and version.
const CLOSING_HEADER: &str = "switchboard-closing 1";
/// Longest close request the Lua side takes (1 h, in ms); the shortest is 1 ms.
const MAX_CLOSING_MS: u128 = 3_600_000;
/// First line of every update: the format's name and version.
const HEADER: &str = "switchboard-peers 2";
/// Highest weight the wire format (and the Lua side) takes; the lowest is 1.
pub const MAX_WEIGHT: u16 = 256;
/// Longest answer read from the endpoint (it says one short line).
const MAX_ANSWER: u64 = 64 * 1024;

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_close_before_reload() -> Duration {
    Duration::from_millis(500)
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
    /// How long the running workers answer with `Connection: close` before a reload, so that
    /// every client active in that time has reconnected rather than sit on an idle keep-alive
    /// connection the reload closes under it; `0` reloads at once, without asking.
    #[serde(default = "default_close_before_reload", with = "duration::serde_text")]
    pub close_before_reload: Duration,
}

impl Default for NginxLua {
    fn default() -> Self {
        NginxLua {
            socket: default_socket(),
            timeout: default_timeout(),
            close_before_reload: default_close_before_reload(),
        }
    }
}

/// Upstream name → its live peers, in file order: the whole table nginx should hold.
pub type PeerTable = BTreeMap<String, Vec<Peer>>;

/// One live peer and its share of new requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Where nginx connects.
    pub addr: SocketAddr,
    /// The `weight=` of its `server` line (1 without one), 1 to [`MAX_WEIGHT`].
    pub weight: u16,
}

impl fmt::Display for Peer {
    /// The wire form: `ip:port`, or `ip:port*W` for a weight other than 1.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.weight {
            1 => write!(f, "{}", self.addr),
            w => write!(f, "{}*{w}", self.addr),
        }
    }
}

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
    /// Peers of the changed upstreams that stayed with another weight (for the log line).
    pub updated: usize,
}

impl NginxLua {
    /// See [`super::LiveChannel::plan`]. `Some` only when both files parse, everything outside
    /// the `server` lines of upstreams is identical, and every upstream whose servers changed
    /// is an `http` upstream, Lua-balanced and pushable (IP peers, only `weight` (1 to 256),
    /// `max_fails`, `fail_timeout` and `down`).
    pub fn plan(&self, old: &str, new: &str) -> Option<Plan> {
        let old = Parsed::parse(old)?;
        let new = Parsed::parse(new)?;
        if old.skeleton != new.skeleton {
            return None;
        }
        let mut changed = Vec::new();
        let (mut added, mut removed, mut updated) = (0, 0, 0);
        for (name, u) in &new.upstreams {
            let before = old.upstreams.get(name)?;
            if before.server_lines != u.server_lines {
                let now = u.peers.as_ref()?;
                let was = before.peers.as_deref().unwrap_or_default();
                let weight_in = |list: &[Peer], p: &Peer| {
                    list.iter().find(|q| q.addr == p.addr).map(|q| q.weight)
                };
                for p in now {
                    match weight_in(was, p) {
                        None => added += 1,
                        Some(w) if w != p.weight => updated += 1,
                        Some(_) => {}
                    }
                }
                removed += was.iter().filter(|p| weight_in(now, p).is_none()).count();
                changed.push(name.to_string());
            }
        }
        Some(Plan {
            peers: new.table(),
            changed,
            added,
            removed,
            updated,
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
            updated: plan.updated,
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

    /// See [`super::LiveChannel::before_reload`]: asks the running workers to close every
    /// client connection after its next response, for `close_before_reload` plus
    /// `reload_timeout` (the reload has happened by then, or failed), then waits
    /// `close_before_reload` so the clients active meanwhile get that response. Its workers
    /// then quit with no idle keep-alive connection but those of clients silent all along.
    /// Never fails: unreachable (no nginx running yet, so no connection either) or refused (a
    /// running config without the endpoint), it is logged and the reload goes on at once.
    pub async fn before_reload(&self, reload_timeout: Duration) {
        if self.close_before_reload.is_zero() {
            return;
        }
        let body = closing_body(self.close_before_reload + reload_timeout);
        match self.exchange(CLOSING_PATH, &body).await {
            Ok(()) => {
                tracing::info!(
                    socket = %self.socket.display(),
                    wait = ?self.close_before_reload,
                    "nginx_lua: client connections closing before the reload"
                );
                tokio::time::sleep(self.close_before_reload).await;
            }
            Err(e @ LiveError::Unreachable { .. }) => tracing::info!(
                error = %e,
                "nginx_lua: client connections not closed before the reload"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "nginx_lua: client connections not closed before the reload"
            ),
        }
    }

    /// See [`super::LiveChannel::certs_renewed`]: posts every pair of `all` (name and PEM, the
    /// file confd wrote to `serve_dir`) to `POST /switchboard/certs`. Each TLS server of the
    /// shipped template has an `ssl_certificate_by_lua_block` that serves its pair from that
    /// table when it was pushed since the running config was loaded (the peers' generation
    /// rule), else the file's `ssl_certificate` as loaded. The Lua parses every pair before
    /// storing any, so a refused table changes nothing.
    pub async fn certs_renewed(&self, all: &crate::certs::CertSet) -> Result<(), LiveError> {
        let invalid = |reason: String| LiveError::Invalid {
            endpoint: self.socket.display().to_string(),
            reason,
        };
        let mut pairs = Vec::new();
        for p in all.pairs.values() {
            let pem = std::fs::read_to_string(&p.pem)
                .map_err(|e| invalid(format!("cannot read {}: {e}", p.pem.display())))?;
            pairs.push((p.name.as_str(), pem));
        }
        let body = encode_certs(&pairs).map_err(invalid)?;
        self.exchange(CERTS_PATH, &body).await
    }

    /// One peer table update.
    async fn post(&self, table: &PeerTable) -> Result<(), LiveError> {
        let body = encode(table).map_err(|reason| LiveError::Invalid {
            endpoint: self.socket.display().to_string(),
            reason,
        })?;
        self.exchange(ENDPOINT_PATH, &body).await
    }

    /// One POST of `body` to `path`: HTTP/1.0 (so the answer is neither chunked nor kept
    /// alive) over the unix socket, bounded by `timeout`.
    async fn exchange(&self, path: &str, body: &str) -> Result<(), LiveError> {
        let endpoint = self.socket.display().to_string();
        let exchange = async {
            let unreachable = |e: std::io::Error| LiveError::Unreachable {
                endpoint: endpoint.clone(),
                reason: e.to_string(),
            };
            let mut stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(unreachable)?;
            let request = format!(
                "POST {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
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
/// line format unambiguous), an IPv6 scope, port 0, a weight outside 1 to 256. Peers are IP
/// socket addresses by type.
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

/// The certificates body: `switchboard-certs 1`, then per pair a line `<name> <bytes>` and
/// that many bytes of PEM, then a newline. Refuses what the Lua side would: a name outside
/// `[a-z0-9_.-]` (pair names are lower-case DNS names or `_wildcard.` ones), an empty PEM or
/// one larger than `MAX_PEM`.
pub fn encode_certs(pairs: &[(&str, String)]) -> Result<String, String> {
    let mut out = format!("{CERTS_HEADER}\n");
    for (name, pem) in pairs {
        let name_ok = !name.is_empty()
            && name.len() <= 253
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
            });
        if !name_ok {
            return Err(format!("invalid certificate name {name:?}"));
        }
        if pem.is_empty() || pem.len() > MAX_PEM {
            return Err(format!(
                "certificate {name}: expected 1 to {MAX_PEM} bytes of PEM, found {}",
                pem.len()
            ));
        }
        out.push_str(&format!("{name} {}\n{pem}\n", pem.len()));
    }
    Ok(out)
}

/// Whether the Lua side takes `p` (`set_current_peer` gets the address text as nginx parses
/// it: no IPv6 zone, a real port; a weight in range).
fn pushable(p: &Peer) -> bool {
    p.addr.port() != 0
        && !matches!(p.addr, SocketAddr::V6(v6) if v6.scope_id() != 0)
        && (1..=MAX_WEIGHT).contains(&p.weight)
}

/// The close request for `span`, in whole milliseconds within what the Lua side takes (1 ms
/// to 1 h).
fn closing_body(span: Duration) -> String {
    let ms = span.as_millis().clamp(1, MAX_CLOSING_MS);
    format!("{CLOSING_HEADER}\n{ms}\n")
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
    /// live: in `stream` (or a block other than `http`), no `.balance("<name>")` Lua balancer, a peer
    /// that is not an IP address (Lua's `set_current_peer` takes no DNS name), or a server
    /// parameter the Lua does not honour.
    peers: Option<Vec<Peer>>,
}

impl<'a> Parsed<'a> {
    /// `None` when the file's upstream blocks are not laid out one directive per line (an
    /// unterminated block, a nested block, several directives on a line), or its braces do not
    /// nest as nginx reads them: such a file is never taken as membership-only, so the worst a
    /// surprise layout costs is a reload.
    fn parse(text: &'a str) -> Option<Parsed<'a>> {
        let nesting = nesting(text)?;
        let mut skeleton = Vec::new();
        let mut upstreams = BTreeMap::new();
        // (name, server lines, balanced, in http, depth at its header)
        let mut current: Option<(&'a str, Vec<&'a str>, bool, bool, usize)> = None;
        for (i, line) in text.lines().enumerate() {
            let t = line.trim();
            let Some((name, servers, balanced, _, _)) = current.as_mut() else {
                if let Some(name) = upstream_header(t) {
                    // A header the line view sees must be one nginx sees: at a statement's
                    // start, not inside a string or Lua code.
                    let at = nesting[i]?;
                    if upstreams.contains_key(name) {
                        return None;
                    }
                    current = Some((
                        name,
                        Vec::new(),
                        false,
                        matches!(at.block, Block::Http | Block::Top),
                        at.depth,
                    ));
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
            let (name, server_lines, balanced, in_http, depth) =
                current.take().expect("inside an upstream");
            // The line view's end of the block must be nginx's too.
            if nesting[i + 1].map(|n| n.depth) != Some(depth) {
                return None;
            }
            let peers = if balanced && in_http {
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
/// trailing comment), or `None` if one is not pushable: a parameter other than `weight=N`
/// (N 1 to 256), `max_fails=`, `fail_timeout=` and `down`, or one given twice.
fn server_peers(lines: &[&str]) -> Option<Vec<Peer>> {
    let mut peers = Vec::new();
    for line in lines {
        let directive = line.split('#').next().unwrap_or_default().trim();
        let words: Vec<&str> = directive.strip_suffix(';')?.split_whitespace().collect();
        let [_server, addr, params @ ..] = words.as_slice() else {
            return None;
        };
        let (mut down, mut weight, mut max_fails, mut fail_timeout) = (false, None, false, false);
        for p in params {
            let seen = match p.split_once('=') {
                None if *p == "down" => std::mem::replace(&mut down, true),
                Some(("weight", w)) => weight.replace(parse_weight(w)?).is_some(),
                Some(("max_fails", _)) => std::mem::replace(&mut max_fails, true),
                Some(("fail_timeout", _)) => std::mem::replace(&mut fail_timeout, true),
                _ => return None,
            };
            if seen {
                return None;
            }
        }
        if down {
            continue;
        }
        let peer = Peer {
            addr: addr.parse().ok()?,
            weight: weight.unwrap_or(1),
        };
        if !pushable(&peer) {
            return None;
        }
        peers.push(peer);
    }
    Some(peers)
}

/// A `weight=` value the Lua side takes: decimal digits, 1 to [`MAX_WEIGHT`].
fn parse_weight(w: &str) -> Option<u16> {
    if w.is_empty() || w.len() > 5 || !w.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    w.parse().ok().filter(|w| (1..=MAX_WEIGHT).contains(w))
}

/// The innermost block a line starts in, as far as upstreams care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    /// Outside every block: a file a hand-written config includes into `http` (the Lua
    /// balancer and the peers endpoint exist in `http` only), so its upstreams can be live.
    Top,
    /// Directly or deeper in `http { }`.
    Http,
    /// Directly or deeper in `stream { }` (or in both, which nginx refuses).
    Stream,
    /// Deeper in anything else (`events`, `mail`, a block nginx would refuse).
    Other,
}

/// Where a line starts in the file's nesting: at a statement's start, `depth` blocks deep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct At {
    depth: usize,
    block: Block,
}

/// For each line of `text` (as `str::lines` splits it) and for the end of the file, where it
/// starts: `Some` at a statement's start, `None` inside a statement, a quoted string or a Lua
/// block. `None` overall when the braces do not nest (an extra `}`, an unclosed block).
///
/// Reads as nginx's own tokenizer does (`#` comments at a token's start, `'`/`"` strings and
/// `\` escapes, `${var}`), and `*_by_lua_block { }` as lua-nginx-module does: Lua code whose
/// strings, long brackets and `--` comments may hold any brace. So a brace inside a regex, a
/// string or Lua code never moves an upstream into another block.
fn nesting(text: &str) -> Option<Vec<Option<At>>> {
    #[derive(PartialEq)]
    enum Quote {
        None,
        Double,
        Single,
    }
    #[derive(PartialEq)]
    enum Lua {
        Off,
        /// Code, with the open braces (the block's own counts).
        Code(usize),
        /// A string closed by its quote, in code with that many braces.
        Short(u8, usize),
        /// A long string or comment closed by `]`, that many `=`, `]`.
        Long(usize, usize),
    }
    let mut blocks: Vec<&str> = Vec::new();
    let mut out = Vec::new();
    // nginx's tokenizer: the current statement's first word (its directive) and how many
    // words it has, and whether a word is being read (only the first one's text is kept).
    let mut directive = String::new();
    let mut words = 0usize;
    let mut in_word = false;
    let (mut quote, mut escaped, mut variable) = (Quote::None, false, false);
    let mut lua = Lua::Off;
    let at = |blocks: &[&str]| {
        let block = if blocks.contains(&"stream") {
            Block::Stream
        } else if blocks.first() == Some(&"http") {
            Block::Http
        } else if blocks.is_empty() {
            Block::Top
        } else {
            Block::Other
        };
        At {
            depth: blocks.len(),
            block,
        }
    };
    for line in text.lines() {
        let boundary = words == 0 && !in_word && quote == Quote::None && !escaped;
        out.push((boundary && lua == Lua::Off).then(|| at(&blocks)));
        let b = line.as_bytes();
        let mut i = 0;
        // One byte past the line: the newline `lines` took away.
        while i <= b.len() {
            let c = b.get(i).copied().unwrap_or(b'\n');
            i += 1;
            match lua {
                Lua::Off => {}
                Lua::Code(depth) => {
                    match c {
                        b'-' if b.get(i) == Some(&b'-') => {
                            i += 1;
                            match long_bracket(&b[i..]) {
                                Some((level, len)) => {
                                    i += len;
                                    lua = Lua::Long(level, depth);
                                }
                                None => i = b.len() + 1,
                            }
                        }
                        b'[' => {
                            if let Some((level, len)) = long_bracket(&b[i - 1..]) {
                                i += len - 1;
                                lua = Lua::Long(level, depth);
                            }
                        }
                        b'"' | b'\'' => lua = Lua::Short(c, depth),
                        b'{' => lua = Lua::Code(depth + 1),
                        b'}' if depth == 1 => lua = Lua::Off,
                        b'}' => lua = Lua::Code(depth - 1),
                        _ => {}
                    }
                    continue;
                }
                Lua::Short(q, depth) => {
                    if c == b'\\' {
                        i += 1;
                    } else if c == q {
                        lua = Lua::Code(depth);
                    }
                    continue;
                }
                Lua::Long(level, depth) => {
                    if c == b']'
                        && b.len() > i + level
                        && b[i..i + level].iter().all(|&x| x == b'=')
                        && b[i + level] == b']'
                    {
                        i += level + 1;
                        lua = Lua::Code(depth);
                    }
                    continue;
                }
            }
            if escaped {
                escaped = false;
                continue;
            }
            if quote != Quote::None {
                match (c, &quote) {
                    (b'\\', _) => escaped = true,
                    (b'"', Quote::Double) | (b'\'', Quote::Single) => {
                        quote = Quote::None;
                        in_word = false;
                        words += 1;
                    }
                    _ => {}
                }
                continue;
            }
            if in_word {
                // `${name}`: the brace belongs to the word.
                let in_variable = std::mem::replace(&mut variable, c == b'$');
                match c {
                    b'{' if in_variable => {}
                    b'\\' => escaped = true,
                    // Ends the word; `;` and `{` also act below.
                    b' ' | b'\t' | b'\r' | b'\n' | b';' | b'{' => {
                        in_word = false;
                        words += 1;
                    }
                    _ if words == 0 => directive.push(c as char),
                    _ => {}
                }
                if !matches!(c, b';' | b'{') || in_variable {
                    continue;
                }
            }
            match c {
                b' ' | b'\t' | b'\r' | b'\n' => {}
                b'#' => i = b.len() + 1,
                b';' | b'{' if words == 0 => return None,
                b';' => {}
                b'{' if directive.ends_with("_by_lua_block") => lua = Lua::Code(1),
                // Only the names `at` tells apart matter; any other is "other".
                b'{' => blocks.push(match directive.as_str() {
                    "http" => "http",
                    "stream" => "stream",
                    _ => "other",
                }),
                b'}' if words > 0 => return None,
                b'}' => {
                    blocks.pop()?;
                }
                // A word starts: quoted, escaped, a variable or plain.
                _ => {
                    quote = match c {
                        b'"' => Quote::Double,
                        b'\'' => Quote::Single,
                        _ => Quote::None,
                    };
                    escaped = c == b'\\';
                    variable = c == b'$';
                    in_word = true;
                    if words == 0 && quote == Quote::None && !escaped {
                        directive.push(c as char);
                    }
                }
            }
            if matches!(c, b';' | b'{') {
                directive.clear();
                words = 0;
            }
        }
    }
    let closed = blocks.is_empty() && words == 0 && !in_word && lua == Lua::Off;
    out.push(closed.then(|| at(&blocks)));
    closed.then_some(out)
}

/// A Lua long bracket at the start of `b` (`[[`, `[=[`, `[==[`...): its level and length.
fn long_bracket(b: &[u8]) -> Option<(usize, usize)> {
    if b.first() != Some(&b'[') {
        return None;
    }
    let level = b[1..].iter().take_while(|&&x| x == b'=').count();
    (b.get(1 + level) == Some(&b'[')).then_some((level, level + 2))
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

    /// Weight-1 peers.
    fn addrs(a: &[&str]) -> Vec<Peer> {
        a.iter()
            .map(|s| Peer {
                addr: s.parse().unwrap(),
                weight: 1,
            })
            .collect()
    }

    fn weighted(a: &[(&str, u16)]) -> Vec<Peer> {
        a.iter()
            .map(|(s, weight)| Peer {
                addr: s.parse().unwrap(),
                weight: *weight,
            })
            .collect()
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
                base.replace("max_fails=1 fail_timeout=5s;", "backup;"),
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
        assert_eq!(encode(&t).unwrap(), "switchboard-peers 2\na 10.0.0.1:80\n");
        let mut t2 = t.clone();
        t2.insert(
            "v6".into(),
            weighted(&[("[::1]:81", 256), ("10.0.0.2:80", 1)]),
        );
        t2.insert("empty".into(), vec![]);
        assert_eq!(
            encode(&t2).unwrap(),
            "switchboard-peers 2\na 10.0.0.1:80\nempty\nv6 [::1]:81*256 10.0.0.2:80\n"
        );
        // What the Lua side would refuse is never sent.
        for (name, peer, weight) in [
            ("a b", "10.0.0.1:80", 1),
            ("a\nb", "10.0.0.1:80", 1),
            ("", "10.0.0.1:80", 1),
            ("ok", "10.0.0.1:0", 1),
            ("ok", "[fe80::1%2]:80", 1),
            ("ok", "10.0.0.1:80", 0),
            ("ok", "10.0.0.1:80", 257),
        ] {
            let t = PeerTable::from([(name.to_string(), weighted(&[(peer, weight)]))]);
            assert!(encode(&t).is_err(), "{name:?} {peer} {weight}");
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

    /// `conf` with each server line's parameters given: `(addr, params)`.
    fn conf_with(servers: &[(&str, &str)]) -> String {
        let lines: String = servers
            .iter()
            .map(|(a, p)| format!("        server {a} {p};\n"))
            .collect();
        format!(
            "http {{\n    upstream svc_web {{\n{lines}        {}\n    }}\n    server {{\n        listen 80;\n        location / {{ proxy_pass http://svc_web; }}\n    }}\n}}\n",
            BALANCER.replace("NAME", "svc_web")
        )
    }

    #[test]
    fn weights_are_live_and_a_down_server_takes_no_new_requests() {
        let (a, b) = ("10.0.0.1:80", "10.0.0.2:80");
        let w = |n: u16| format!("weight={n} max_fails=1 fail_timeout=5s");
        let down = "max_fails=1 fail_timeout=5s down";
        let base = conf_with(&[(a, &w(10)), (b, &w(90))]);
        let cases: Vec<(String, Vec<Peer>, usize)> = vec![
            (
                conf_with(&[(a, &w(50)), (b, &w(50))]),
                weighted(&[(a, 50), (b, 50)]),
                2,
            ),
            (
                conf_with(&[(a, &w(100)), (b, down)]),
                weighted(&[(a, 100)]),
                1,
            ),
            // No `weight=` is weight 1, as in nginx.
            (
                conf_with(&[(a, "max_fails=1 fail_timeout=5s"), (b, &w(90))]),
                weighted(&[(a, 1), (b, 90)]),
                1,
            ),
            (
                conf_with(&[(a, &w(1)), (b, &w(256))]),
                weighted(&[(a, 1), (b, 256)]),
                2,
            ),
        ];
        for (new, want, updated) in cases {
            let p = ch()
                .plan(&base, &new)
                .unwrap_or_else(|| panic!("should be live:\n{new}"));
            assert_eq!(p.peers["svc_web"], want, "{new}");
            assert_eq!(p.changed, vec!["svc_web".to_string()]);
            assert_eq!(
                (p.added, p.removed, p.updated),
                (0, usize::from(want.len() == 1), updated),
                "{new}"
            );
        }
        // The Lua side's range and spelling, else a reload (nginx itself takes weights above
        // 256, and its own round robin serves them after the reload).
        for bad in [
            "weight=0",
            "weight=257",
            "weight=99999",
            "weight=-1",
            "weight=+2",
            "weight=2x",
            "weight=",
            "weight=2 weight=3",
            "down down",
            "max_fails=1 max_fails=2",
            "backup",
            "weight = 2",
        ] {
            let new = conf_with(&[(a, &w(10)), (b, bad)]);
            assert_eq!(ch().plan(&base, &new), None, "{bad}");
        }
    }

    /// The shape of a TCP service: a `stream` block with its own upstream and a proxying
    /// server, before or after `http`.
    fn with_stream(
        http_peer: &str,
        tcp_peer: &str,
        stream_first: bool,
        lua_in_stream: bool,
    ) -> String {
        let balancer = if lua_in_stream {
            format!("        {}\n", BALANCER.replace("NAME", "tcp_5432"))
        } else {
            String::new()
        };
        let stream = format!(
            "stream {{\n    upstream tcp_5432 {{\n        server {tcp_peer} max_fails=1 fail_timeout=5s;\n{balancer}    }}\n    server {{\n        listen 5432;\n        proxy_pass tcp_5432;\n    }}\n}}\n"
        );
        let http = format!(
            "http {{\n    upstream svc_web {{\n        server {http_peer} weight=2 max_fails=1 fail_timeout=5s;\n        {}\n    }}\n    server {{\n        listen 80;\n        location / {{ proxy_pass http://svc_web; }}\n    }}\n}}\n",
            BALANCER.replace("NAME", "svc_web")
        );
        if stream_first {
            format!("worker_processes 1;\n{stream}{http}")
        } else {
            format!("worker_processes 1;\n{http}{stream}")
        }
    }

    #[test]
    fn stream_upstreams_always_reload_and_http_ones_beside_them_stay_live() {
        for first in [true, false] {
            for lua in [true, false] {
                let old = with_stream("10.0.0.1:80", "10.0.1.1:5432", first, lua);
                // A stream peer changing is a reload, even with a Lua balancer line in it.
                let new = with_stream("10.0.0.1:80", "10.0.1.2:5432", first, lua);
                assert_eq!(ch().plan(&old, &new), None, "{new}");
                // The http upstream beside it is live, and the stream one is never pushed.
                let new = with_stream("10.0.0.2:80", "10.0.1.1:5432", first, lua);
                let p = ch()
                    .plan(&old, &new)
                    .unwrap_or_else(|| panic!("should be live:\n{new}"));
                assert_eq!(p.changed, vec!["svc_web".to_string()]);
                assert_eq!(
                    p.peers,
                    PeerTable::from([("svc_web".into(), weighted(&[("10.0.0.2:80", 2)]))]),
                    "{new}"
                );
            }
        }
    }

    #[test]
    fn an_upstream_behind_grpc_pass_is_live_like_any_other() {
        let conf = |servers: &str| {
            format!(
                "http {{\n    upstream svc_grpc {{\n{servers}        {}\n    }}\n    server {{\n        listen 8443 http2;\n        location / {{\n            grpc_pass grpc://svc_grpc;\n        }}\n    }}\n}}\n",
                BALANCER.replace("NAME", "svc_grpc")
            )
        };
        let one = conf("        server 10.0.0.1:50051 weight=1 max_fails=1 fail_timeout=5s;\n");
        let two = conf(
            "        server 10.0.0.1:50051 weight=3 max_fails=1 fail_timeout=5s;\n        server 10.0.0.2:50051 weight=1 max_fails=1 fail_timeout=5s;\n",
        );
        let p = ch().plan(&one, &two).unwrap();
        assert_eq!(p.changed, vec!["svc_grpc".to_string()]);
        assert_eq!(
            p.peers["svc_grpc"],
            weighted(&[("10.0.0.1:50051", 3), ("10.0.0.2:50051", 1)])
        );
        assert_eq!((p.added, p.removed, p.updated), (1, 0, 1));
        assert!(ch().plan(&two, &one).is_some());
    }

    #[test]
    fn nesting_reads_braces_as_nginx_and_lua_do() {
        let http = Some(At {
            depth: 1,
            block: Block::Http,
        });
        let stream = Some(At {
            depth: 1,
            block: Block::Stream,
        });
        let top = Some(At {
            depth: 0,
            block: Block::Top,
        });
        // (text, where its line `X ...` starts)
        let cases: Vec<(&str, Option<At>)> = vec![
            ("http {\nX;\n}", http),
            ("stream {\nX;\n}", stream),
            ("events { }\nX;", top),
            ("http { server {\nX;\n} }", Some(At { depth: 2, block: Block::Http })),
            ("stream { server {\nX;\n} }", Some(At { depth: 2, block: Block::Stream })),
            // Braces in strings, a regex, a variable, a comment, a word.
            ("http {\n map $a $b { \"~^x{1,2}$\" 1; '}' 2; }\nX;\n}", http),
            ("http {\n set $a \"${b}}{\"; add_header X ${host};\nX;\n}", http),
            ("http {\n # } {\nX;\n}", http),
            ("http {\n return 200 a}b;\nX;\n}", http),
            ("http {\n return 200 a\\{b\\};\nX;\n}", http),
            ("http {\n return 200 \"a\\\"}\";\nX;\n}", http),
            // Lua: braces in strings, comments, long brackets; tables nest.
            ("http {\n init_by_lua_block {\n local t = { a = { } }\n -- }\n s = \"}\" .. '}' .. \"\\\"}\"\n }\nX;\n}", http),
            ("http {\n init_by_lua_block { x = [[\n }}} ]] y = [==[ ]] } ]==] --[[ }\n ]] }\nX;\n}", http),
            ("http {\n init_by_lua_block { a = #t -- } {\n }\nX;\n}", http),
            ("http {\n content_by_lua_block { ngx.say(\"}\") }\nX;\n}", http),
            ("http {\n set_by_lua_block $v { return \"{\" }\nX;\n}", http),
            // A statement, string or Lua block across lines: not a statement's start.
            ("http {\n log_format a\nX;\n}", None),
            ("http {\n return 200 \"a\nX\";\n}", None),
            ("http {\n init_by_lua_block {\nX\n }\n}", None),
        ];
        for (text, want) in cases {
            let line = text.lines().position(|l| l.starts_with('X')).unwrap();
            let n = nesting(text).unwrap_or_else(|| panic!("should nest: {text}"));
            assert_eq!(n[line], want, "{text}");
            assert_eq!(n.last(), Some(&top), "{text}");
        }
        for bad in [
            "http {\n",
            "}\n",
            "http { } }\n",
            "http { ; }\n",
            "{ }\n",
            "http { a }\n",
        ] {
            assert_eq!(nesting(bad), None, "{bad}");
        }
        // An upstream the line view would see inside Lua code or a string is not one.
        for hidden in [
            "http {\n    init_by_lua_block {\n        s = [[\n    upstream svc_web {\n        server 10.0.0.1:80;\n    }\n]]\n    }\n}\n",
            "http {\n    return 200 \"\n    upstream svc_web {\n        server 10.0.0.1:80;\n    }\n\";\n}\n",
        ] {
            assert_eq!(Parsed::parse(hidden), None, "{hidden}");
        }
    }

    #[test]
    fn the_certificates_body_is_length_prefixed_and_refuses_bad_names() {
        let pem = "-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n".to_string();
        assert_eq!(
            encode_certs(&[("a.test", pem.clone()), ("_wildcard.w.test", "x".into())]).unwrap(),
            format!(
                "switchboard-certs 1\na.test {}\n{pem}\n_wildcard.w.test 1\nx\n",
                pem.len()
            )
        );
        assert_eq!(encode_certs(&[]).unwrap(), "switchboard-certs 1\n");
        for (name, pem, want) in [
            ("a test", "x".to_string(), "invalid certificate name"),
            ("A.test", "x".to_string(), "invalid certificate name"),
            ("a\"b", "x".to_string(), "invalid certificate name"),
            ("a.test", String::new(), "expected 1 to"),
            ("a.test", "x".repeat(MAX_PEM + 1), "expected 1 to"),
        ] {
            let e = encode_certs(&[(name, pem)]).unwrap_err();
            assert!(e.contains(want), "{name}: {e}");
        }
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
            updated: 0,
        };
        let e = c.apply(plan).await.unwrap_err().to_string();
        assert!(e.contains("nope.sock"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn a_close_request_spans_the_wait_and_the_reload_within_what_the_lua_takes() {
        for (span, want) in [
            (Duration::from_millis(30_500), "30500"),
            (Duration::from_micros(1_500), "1"),
            (Duration::ZERO, "1"),
            (Duration::from_secs(3_600), "3600000"),
            (Duration::from_secs(86_400), "3600000"),
        ] {
            assert_eq!(
                closing_body(span),
                format!("switchboard-closing 1\n{want}\n"),
                "{span:?}"
            );
        }
        let c: NginxLua = serde_yaml::from_str("{}").unwrap();
        assert_eq!(c.close_before_reload, Duration::from_millis(500));
        let c: NginxLua = serde_yaml::from_str("{ close_before_reload: 0 }").unwrap();
        assert!(c.close_before_reload.is_zero());
        let e = serde_yaml::from_str::<NginxLua>("{ close_before_reload: soon }").unwrap_err();
        assert!(e.to_string().contains("expected e.g. 500ms"), "{e}");
    }

    /// What `before_reload` sends, and that it waits only once the proxy took the request.
    #[tokio::test]
    async fn before_reload_asks_then_waits_and_never_waits_for_an_absent_proxy() {
        let d = tempfile::tempdir().unwrap();
        let socket = d.path().join("peers.sock");
        let c = NginxLua {
            socket: socket.clone(),
            close_before_reload: Duration::from_millis(50),
            ..NginxLua::default()
        };
        // No socket: back at once (the bound is far below the 10 s it would otherwise wait).
        let slow = NginxLua {
            close_before_reload: Duration::from_secs(10),
            ..c.clone()
        };
        tokio::time::timeout(Duration::from_secs(5), slow.before_reload(Duration::ZERO))
            .await
            .expect("an absent proxy is not waited for");

        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            // The request is whole once its body has the length its header says.
            loop {
                let text = String::from_utf8_lossy(&got).into_owned();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|n| n.parse::<usize>().ok());
                    if len == Some(body.len()) {
                        break;
                    }
                }
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "request cut short: {text}");
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\n\r\nok closing for 30050 ms\n")
                .await
                .unwrap();
            String::from_utf8(got).unwrap()
        });
        let start = std::time::Instant::now();
        c.before_reload(Duration::from_secs(30)).await;
        assert!(start.elapsed() >= Duration::from_millis(50));
        let request = server.await.unwrap();
        assert!(
            request.starts_with("POST /switchboard/closing HTTP/1.0\r\n"),
            "{request}"
        );
        assert!(
            request.ends_with("\r\n\r\nswitchboard-closing 1\n30050\n"),
            "{request}"
        );
    }
}
