//! Whether two rendered HAProxy configs differ only in the servers of existing backends, and
//! if so, which servers: pure, so every rule is a row in the tests below.
//!
//! The rule is strict on purpose: with the `server` lines of `backend` and `listen` sections
//! taken out, the two files must be identical byte for byte (comments and blank lines too). Then
//! whatever HAProxy would do differently after a reload is confined to those servers, and each
//! server change is checked against what HAProxy 2.6's runtime API can express. Anything else,
//! or anything we cannot be sure of, is `Err(reason)`: the caller reloads, which is always
//! correct, only slower.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

/// Section keywords (HAProxy recognises them whatever the indentation).
const SECTIONS: &[&str] = &[
    "global",
    "defaults",
    "frontend",
    "backend",
    "listen",
    "peers",
    "resolvers",
    "mailers",
    "userlist",
    "program",
    "http-errors",
    "ring",
    "cache",
    "fcgi-app",
];

/// Balance algorithms whose backends accept `add server` in 2.6 ("dynamic" load balancing;
/// each tried against 2.6.12); `static-rr` and the map-based hashes refuse it. Hashes made
/// consistent by `hash-type consistent` accept it too but are left to reloads here. No
/// `balance` at all means roundrobin.
const DYNAMIC_BALANCE: &[&str] = &["roundrobin", "leastconn", "first", "random"];

fn dynamic_balance(algo: &str) -> bool {
    // `random(<draws>)` takes an argument.
    let name = algo.split('(').next().unwrap_or(algo);
    DYNAMIC_BALANCE.contains(&name)
}

/// `server` keywords that `add server` accepts in 2.6 (management guide, "add server"), with
/// the number of arguments each takes. Left out although the guide lists them: `track` and the
/// `agent-*` family (removal needs extra steps), `id` (could collide with a configured id),
/// `source`/`usesrc` (variable syntax). `cookie` is not accepted by 2.6 at all. A server
/// carrying any other keyword is applied by a reload.
const ADD_KEYWORDS: &[(&str, usize)] = &[
    ("addr", 1),
    ("allow-0rtt", 0),
    ("alpn", 1),
    ("backup", 0),
    ("ca-file", 1),
    ("check", 0),
    ("check-alpn", 1),
    ("check-proto", 1),
    ("check-send-proxy", 0),
    ("check-sni", 1),
    ("check-ssl", 0),
    ("check-via-socks4", 0),
    ("ciphers", 1),
    ("ciphersuites", 1),
    ("crl-file", 1),
    ("crt", 1),
    ("disabled", 0),
    ("downinter", 1),
    ("enabled", 0),
    ("error-limit", 1),
    ("fall", 1),
    ("fastinter", 1),
    ("force-sslv3", 0),
    ("force-tlsv10", 0),
    ("force-tlsv11", 0),
    ("force-tlsv12", 0),
    ("force-tlsv13", 0),
    ("inter", 1),
    ("maxconn", 1),
    ("maxqueue", 1),
    ("minconn", 1),
    ("no-ssl-reuse", 0),
    ("no-sslv3", 0),
    ("no-tls-tickets", 0),
    ("no-tlsv10", 0),
    ("no-tlsv11", 0),
    ("no-tlsv12", 0),
    ("no-tlsv13", 0),
    ("npn", 1),
    ("observe", 1),
    ("on-error", 1),
    ("on-marked-down", 1),
    ("on-marked-up", 1),
    ("pool-low-conn", 1),
    ("pool-max-conn", 1),
    ("pool-purge-delay", 1),
    ("port", 1),
    ("proto", 1),
    ("proxy-v2-options", 1),
    ("rise", 1),
    ("send-proxy", 0),
    ("send-proxy-v2", 0),
    ("send-proxy-v2-ssl", 0),
    ("send-proxy-v2-ssl-cn", 0),
    ("slowstart", 1),
    ("sni", 1),
    ("ssl", 0),
    ("ssl-max-ver", 1),
    ("ssl-min-ver", 1),
    ("tfo", 0),
    ("tls-tickets", 0),
    ("verify", 1),
    ("verifyhost", 1),
    ("weight", 1),
    ("ws", 1),
];

/// One `server NAME ADDR [options...]` line of a backend, as HAProxy would tokenize it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// Server name (unique in its backend).
    pub name: String,
    /// The address word as written (`10.0.0.1:80`, `[::1]:80`, `db.local:5432`, ...).
    pub addr: String,
    /// Everything after the address.
    pub options: Vec<String>,
}

impl Server {
    /// The address as an IP literal and a port, `None` for anything else (a DNS name, no port,
    /// a port range or offset, an `ipv4@`-style prefix). Runtime commands only take these:
    /// a dynamic server never resolves names in 2.6.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        let (host, port) = self.addr.rsplit_once(':')?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
        let ip: IpAddr = host.parse().ok()?;
        Some(SocketAddr::new(ip, port))
    }

    fn has(&self, flag: &str) -> bool {
        self.options.iter().any(|o| o == flag)
    }

    /// Whether the server starts in maintenance (`disabled`, unless a later `enabled`).
    pub fn disabled(&self) -> bool {
        let d = self.options.iter().rposition(|o| o == "disabled");
        let e = self.options.iter().rposition(|o| o == "enabled");
        d > e
    }

    /// Whether it has health checks (`check`), which a dynamic server needs switched on.
    pub fn checked(&self) -> bool {
        self.has("check")
    }

    /// Options as keyword/arguments groups, if every keyword is one `add server` accepts.
    fn add_options(&self) -> Result<Vec<(String, Vec<String>)>, String> {
        let mut out = Vec::new();
        let mut it = self.options.iter();
        while let Some(kw) = it.next() {
            let Some((_, n)) = ADD_KEYWORDS.iter().find(|(k, _)| k == kw) else {
                return Err(format!(
                    "server option {kw:?} cannot be given to a server added at runtime"
                ));
            };
            let args: Vec<String> = it.by_ref().take(*n).cloned().collect();
            if args.len() != *n {
                return Err(format!("server option {kw:?} lacks its argument"));
            }
            out.push((kw.clone(), args));
        }
        Ok(out)
    }

    /// The options `add server` is given: all of them but the state flags, which the commands
    /// after it set (a dynamic server starts in maintenance whatever it says).
    fn add_words(&self) -> Result<Vec<String>, String> {
        Ok(self
            .add_options()?
            .into_iter()
            .filter(|(k, _)| k != "disabled" && k != "enabled")
            .flat_map(|(k, a)| std::iter::once(k).chain(a))
            .collect())
    }

    /// `weight` (default 1), if the options parse.
    fn weight(&self) -> Option<String> {
        let opts = self.add_options().ok()?;
        Some(
            opts.iter()
                .rev()
                .find(|(k, _)| k == "weight")
                .map_or("1".to_string(), |(_, a)| a[0].clone()),
        )
    }

    /// Options other than state and weight, which runtime commands can change in place.
    fn fixed_options(&self) -> Option<Vec<String>> {
        let opts = self.add_options().ok()?;
        Some(
            opts.into_iter()
                .filter(|(k, _)| !matches!(k.as_str(), "disabled" | "enabled" | "weight"))
                .flat_map(|(k, a)| std::iter::once(k).chain(a))
                .collect(),
        )
    }
}

/// One backend (or listen section): its servers and what decides whether servers may be added.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backend {
    /// Servers in file order.
    pub servers: Vec<Server>,
    /// The algorithm of its own `balance` line, if it has one.
    balance: Option<String>,
    /// It has a `default-server` line.
    default_server: bool,
}

/// What a membership diff needs from one rendered file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// Every line but the server lines of backends, verbatim.
    skeleton: Vec<String>,
    /// Backends and listen sections by name.
    pub backends: BTreeMap<String, Backend>,
    /// `balance` algorithms of `defaults` sections (they apply to backends without their own).
    defaults_balance: Vec<String>,
    /// Some `defaults` section has a `default-server` line.
    defaults_default_server: bool,
    /// Paths of `stats socket` lines at `level admin` in `global`.
    pub admin_sockets: Vec<String>,
}

/// Splits one config line into words as HAProxy does: blanks separate, `"..."` and `'...'`
/// quote, `\` escapes, an unquoted `#` starts a comment.
pub fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '#' => break,
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\\' => {
                in_word = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '"' => {
                in_word = true;
                while let Some(n) = chars.next() {
                    match n {
                        '"' => break,
                        '\\' => {
                            if let Some(e) = chars.next() {
                                cur.push(e);
                            }
                        }
                        n => cur.push(n),
                    }
                }
            }
            '\'' => {
                in_word = true;
                for n in chars.by_ref() {
                    if n == '\'' {
                        break;
                    }
                    cur.push(n);
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// Reads the sections, servers and admin sockets of a rendered config.
pub fn parse(text: &str) -> Parsed {
    let mut p = Parsed::default();
    // (keyword, name) of the current section.
    let mut section: Option<(String, String)> = None;
    for line in text.lines() {
        let w = words(line);
        let first = w.first().map(String::as_str);
        if let Some(kw) = first.filter(|k| SECTIONS.contains(k)) {
            let name = w.get(1).cloned().unwrap_or_default();
            if kw == "backend" || kw == "listen" {
                p.backends.entry(name.clone()).or_default();
            }
            section = Some((kw.to_string(), name));
            p.skeleton.push(line.to_string());
            continue;
        }
        let kind = section.as_ref().map(|(k, _)| k.as_str());
        match (kind, first) {
            (Some("backend" | "listen"), Some("server")) if w.len() >= 3 => {
                let name = &section.as_ref().expect("in a section").1;
                p.backends
                    .get_mut(name)
                    .expect("section registered")
                    .servers
                    .push(Server {
                        name: w[1].clone(),
                        addr: w[2].clone(),
                        options: w[3..].to_vec(),
                    });
                continue;
            }
            (Some("backend" | "listen"), Some("balance")) => {
                let name = &section.as_ref().expect("in a section").1;
                p.backends
                    .get_mut(name)
                    .expect("section registered")
                    .balance = w.get(1).cloned();
            }
            (Some("backend" | "listen"), Some("default-server")) => {
                let name = &section.as_ref().expect("in a section").1;
                p.backends
                    .get_mut(name)
                    .expect("section registered")
                    .default_server = true;
            }
            (Some("defaults"), Some("balance")) => {
                p.defaults_balance
                    .push(w.get(1).cloned().unwrap_or_default());
            }
            (Some("defaults"), Some("default-server")) => p.defaults_default_server = true,
            (Some("global"), Some("stats")) if w.get(1).is_some_and(|s| s == "socket") => {
                let admin = w[2..]
                    .windows(2)
                    .any(|x| x[0] == "level" && x[1] == "admin");
                if let (true, Some(path)) = (admin, w.get(2)) {
                    let path = path.strip_prefix("unix@").unwrap_or(path);
                    p.admin_sockets.push(path.to_string());
                }
            }
            _ => {}
        }
        p.skeleton.push(line.to_string());
    }
    p
}

/// One server-level difference between the old and the new file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new server line.
    Add {
        /// Backend name.
        backend: String,
        /// The new line.
        server: Server,
    },
    /// A server line that is gone.
    Remove {
        /// Backend name.
        backend: String,
        /// The old line.
        server: Server,
    },
    /// Same name, different address, port, weight or state.
    Update {
        /// Backend name.
        backend: String,
        /// The old line.
        old: Server,
        /// The new line.
        new: Server,
    },
}

impl Change {
    /// The backend it touches.
    pub fn backend(&self) -> &str {
        match self {
            Change::Add { backend, .. }
            | Change::Remove { backend, .. }
            | Change::Update { backend, .. } => backend,
        }
    }
}

/// Characters a word sent to the runtime API may contain. The CLI splits on blanks and `;`
/// and has its own quoting; a word outside this set (which only a user's template could
/// produce) is applied by a reload rather than escaped.
fn cli_safe(word: &str) -> bool {
    !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-/[],".contains(&b))
}

/// A membership-only difference.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// Server changes, by backend then server name.
    pub changes: Vec<Change>,
    /// The old file's servers of each backend a change touches: what the running process must
    /// have before the changes are applied.
    pub before: BTreeMap<String, Vec<Server>>,
    /// Backends (and listen sections) in the new file.
    pub pools: usize,
    /// Servers across them.
    pub peers: usize,
}

/// The changes that turn `old` into `new`, or why a reload is needed instead. `socket` is the
/// admin socket confd was told to use: the new file must still open it at `level admin`.
pub fn diff(old: &str, new: &str, socket: &str) -> Result<Diff, String> {
    let (old, new) = (parse(old), parse(new));
    if old.skeleton != new.skeleton {
        let at = old
            .skeleton
            .iter()
            .zip(&new.skeleton)
            .position(|(a, b)| a != b)
            .map_or_else(
                || "a line was added or removed".to_string(),
                |i| {
                    format!(
                        "{:?} became {:?}",
                        old.skeleton[i].trim(),
                        new.skeleton[i].trim()
                    )
                },
            );
        return Err(format!("more than servers changed: {at}"));
    }
    if !new.admin_sockets.iter().any(|s| s == socket) {
        return Err(format!(
            "the config has no `stats socket {socket} ... level admin` in `global`"
        ));
    }
    let mut changes = Vec::new();
    for (be, nb) in &new.backends {
        let ob = &old.backends[be];
        let before: BTreeMap<&str, &Server> =
            ob.servers.iter().map(|s| (s.name.as_str(), s)).collect();
        let after: BTreeMap<&str, &Server> =
            nb.servers.iter().map(|s| (s.name.as_str(), s)).collect();
        if before.len() != ob.servers.len() || after.len() != nb.servers.len() {
            return Err(format!("backend {be} names two servers alike"));
        }
        let names: BTreeSet<&str> = before.keys().chain(after.keys()).copied().collect();
        for name in names {
            let change = match (before.get(name), after.get(name)) {
                (Some(o), Some(n)) if o == n => continue,
                (Some(o), Some(n)) => update_in_place(be, o, n)?,
                (None, Some(n)) => {
                    membership_allowed(be, nb, &new)?;
                    if n.socket_addr().is_none() {
                        return Err(format!(
                            "server {be}/{name}: address {:?} is not an IP address and port (a server added at runtime resolves no names)",
                            n.addr
                        ));
                    }
                    n.add_words()
                        .map_err(|e| format!("server {be}/{name}: {e}"))?;
                    Change::Add {
                        backend: be.clone(),
                        server: (*n).clone(),
                    }
                }
                (Some(o), None) => {
                    membership_allowed(be, nb, &new)?;
                    Change::Remove {
                        backend: be.clone(),
                        server: (*o).clone(),
                    }
                }
                (None, None) => unreachable!("name from one of the maps"),
            };
            check_words(&change)?;
            changes.push(change);
        }
    }
    let before = changes
        .iter()
        .map(|c| {
            (
                c.backend().to_string(),
                old.backends[c.backend()].servers.clone(),
            )
        })
        .collect();
    Ok(Diff {
        changes,
        before,
        pools: new.backends.len(),
        peers: new.backends.values().map(|b| b.servers.len()).sum(),
    })
}

/// Whether servers may come and go in backend `be` at runtime.
fn membership_allowed(be: &str, b: &Backend, p: &Parsed) -> Result<(), String> {
    let algos: Vec<&String> = match &b.balance {
        Some(a) => vec![a],
        None => p.defaults_balance.iter().collect(),
    };
    if let Some(a) = algos.iter().find(|a| !dynamic_balance(a)) {
        return Err(format!(
            "backend {be} balances with {a:?}, which cannot add or remove servers at runtime"
        ));
    }
    // A dynamic server ignores `default-server`: added at runtime it would differ from the
    // same line loaded from the file.
    if b.default_server || p.defaults_default_server {
        return Err(format!(
            "backend {be} has a default-server line, which servers added at runtime ignore"
        ));
    }
    Ok(())
}

/// Same server name, new line: only address, port, weight and state can change in place.
pub fn update_in_place(be: &str, o: &Server, n: &Server) -> Result<Change, String> {
    let what = format!("server {be}/{}", n.name);
    if o.addr != n.addr && (o.socket_addr().is_none() || n.socket_addr().is_none()) {
        return Err(format!(
            "{what}: address {:?} -> {:?} is not an IP address and port on both sides",
            o.addr, n.addr
        ));
    }
    if o.options != n.options {
        match (o.fixed_options(), n.fixed_options()) {
            (Some(a), Some(b)) if a == b => {}
            _ => {
                return Err(format!(
                    "{what}: options {:?} -> {:?} cannot change at runtime",
                    o.options.join(" "),
                    n.options.join(" ")
                ))
            }
        }
    }
    Ok(Change::Update {
        backend: be.to_string(),
        old: o.clone(),
        new: n.clone(),
    })
}

fn check_words(c: &Change) -> Result<(), String> {
    let (be, s) = match c {
        Change::Add { backend, server } | Change::Remove { backend, server } => (backend, server),
        Change::Update { backend, new, .. } => (backend, new),
    };
    let mut ws = vec![be.as_str(), s.name.as_str()];
    if !matches!(c, Change::Remove { .. }) {
        ws.push(&s.addr);
        ws.extend(s.options.iter().map(String::as_str));
    }
    match ws.into_iter().find(|w| !cli_safe(w)) {
        Some(w) => Err(format!(
            "server {be}/{}: {w:?} cannot be sent to the runtime API as one word",
            s.name
        )),
        None => Ok(()),
    }
}

/// Runtime commands that create `s` in `be` and put it in service.
pub fn add_commands(be: &str, s: &Server) -> Vec<String> {
    let id = format!("{be}/{}", s.name);
    let mut words = vec![format!("add server {id} {}", s.addr)];
    words.extend(s.add_words().unwrap_or_default());
    let mut cmds = vec![words.join(" ")];
    if s.checked() {
        cmds.push(format!("enable health {id}"));
    }
    if !s.disabled() {
        cmds.push(format!("enable server {id}"));
    }
    cmds
}

/// Runtime commands that turn server `old` into `new` in `be` (same name). `resume` also puts
/// it back in service when it should be (a server that was being drained).
pub fn update_commands(be: &str, old: &Server, new: &Server, resume: bool) -> Vec<String> {
    let id = format!("{be}/{}", new.name);
    let mut cmds = Vec::new();
    if let (Some(a), Some(b)) = (old.socket_addr(), new.socket_addr()) {
        if a != b {
            cmds.push(format!("set server {id} addr {} port {}", b.ip(), b.port()));
        }
    }
    if let (Some(a), Some(b)) = (old.weight(), new.weight()) {
        if a != b {
            cmds.push(format!("set server {id} weight {b}"));
        }
    }
    if new.disabled() && (resume || !old.disabled()) {
        cmds.push(format!("set server {id} state maint"));
    } else if !new.disabled() && (resume || old.disabled()) {
        cmds.push(format!("set server {id} state ready"));
    }
    cmds
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCK: &str = "/run/haproxy/admin.sock";

    /// A config with backend `web` holding `servers` (one line each) and `extra` lines after
    /// its `balance` line.
    fn cfg(extra: &str, servers: &[&str]) -> String {
        let mut s = format!(
            "global\n    stats socket \"{SOCK}\" mode 600 level admin\n\ndefaults\n    mode http\n\
             \nfrontend f\n    bind *:80\n    default_backend web\n\nbackend web\n    balance roundrobin\n{extra}"
        );
        for l in servers {
            s.push_str(&format!("    server {l}\n"));
        }
        s.push_str("\nbackend other\n    server o1 10.0.0.9:80 check\n");
        s
    }

    const A: &str = "a 10.0.0.1:80 check inter 2s fall 2 rise 1";
    const B: &str = "b 10.0.0.2:80 check inter 2s fall 2 rise 1";
    const C: &str = "c 10.0.0.3:80 check inter 2s fall 2 rise 1";

    fn kinds(r: &Result<Diff, String>) -> Vec<String> {
        r.as_ref()
            .unwrap()
            .changes
            .iter()
            .map(|c| match c {
                Change::Add { backend, server } => format!("+{backend}/{}", server.name),
                Change::Remove { backend, server } => format!("-{backend}/{}", server.name),
                Change::Update { backend, new, .. } => format!("~{backend}/{}", new.name),
            })
            .collect()
    }

    /// (what, old servers, new servers, expected changes)
    type Case = (
        &'static str,
        &'static [&'static str],
        &'static [&'static str],
        &'static [&'static str],
    );

    #[test]
    fn membership_only_changes_are_planned() {
        let cases: &[Case] = &[
            ("scale up", &[A], &[A, B, C], &["+web/b", "+web/c"]),
            ("scale down", &[A, B, C], &[A], &["-web/b", "-web/c"]),
            ("replace", &[A, B], &[A, C], &["-web/b", "+web/c"]),
            ("from empty", &[], &[A], &["+web/a"]),
            ("to empty", &[A], &[], &["-web/a"]),
            ("reordered", &[A, B], &[B, A], &[]),
            (
                "port moved",
                &[A],
                &["a 10.0.0.1:81 check inter 2s fall 2 rise 1"],
                &["~web/a"],
            ),
            (
                "drained by the template",
                &[A],
                &["a 10.0.0.1:80 check inter 2s fall 2 rise 1 disabled"],
                &["~web/a"],
            ),
            (
                "weight",
                &[A],
                &["a 10.0.0.1:80 check inter 2s fall 2 rise 1 weight 5"],
                &["~web/a"],
            ),
            ("ipv6", &[A], &[A, "v6 [fd00::1]:8080 check"], &["+web/v6"]),
        ];
        for (what, old, new, want) in cases {
            let r = diff(&cfg("", old), &cfg("", new), SOCK);
            assert_eq!(kinds(&r), *want, "{what}: {r:?}");
        }
    }

    #[test]
    fn anything_else_reloads_and_says_why() {
        let dns = "d db.local:80 check";
        let cases: &[(&str, String, String, &str)] = &[
            (
                "a non-server line",
                cfg("", &[A]),
                cfg("    option httpchk GET /health\n", &[A]),
                "more than servers changed",
            ),
            (
                "a comment",
                cfg("", &[A]),
                cfg("    # hello\n", &[A]),
                "more than servers changed",
            ),
            (
                "a new backend",
                cfg("", &[A]),
                cfg("", &[A]) + "\nbackend api\n    server x 10.0.0.5:80\n",
                "more than servers changed",
            ),
            (
                "cookie (not accepted by 2.6)",
                cfg("", &[A]),
                cfg("", &[A, "b 10.0.0.2:80 check cookie b"]),
                "\"cookie\" cannot be given",
            ),
            (
                "unknown option",
                cfg("", &[A]),
                cfg("", &[A, "b 10.0.0.2:80 track web/a"]),
                "\"track\"",
            ),
            (
                "a DNS name",
                cfg("", &[A]),
                cfg("", &[A, dns]),
                "not an IP address",
            ),
            (
                "options changed",
                cfg("", &[A]),
                cfg("", &["a 10.0.0.1:80 check inter 5s fall 2 rise 1"]),
                "cannot change at runtime",
            ),
            (
                "static-rr",
                cfg("", &[A]).replace("roundrobin", "static-rr"),
                cfg("", &[A, B]).replace("roundrobin", "static-rr"),
                "\"static-rr\"",
            ),
            (
                "default-server",
                cfg("    default-server inter 3s\n", &[A]),
                cfg("    default-server inter 3s\n", &[A, B]),
                "default-server",
            ),
            (
                "no admin socket",
                cfg("", &[A]).replace(" level admin", ""),
                cfg("", &[A, B]).replace(" level admin", ""),
                "no `stats socket",
            ),
            (
                "a word the CLI would split",
                cfg("", &[A]),
                cfg("", &[A, "\"b;shutdown\" 10.0.0.2:80"]),
                "one word",
            ),
            (
                "duplicate names",
                cfg("", &[A]),
                cfg("", &[A, "a 10.0.0.2:80"]),
                "two servers alike",
            ),
        ];
        for (what, old, new, want) in cases {
            let e = diff(old, new, SOCK).unwrap_err();
            assert!(e.contains(want), "{what}: {e}");
            assert!(!e.contains('\n'), "{what}: {e}");
        }
        // The wrong socket is refused too.
        let e = diff(&cfg("", &[A]), &cfg("", &[A, B]), "/other.sock").unwrap_err();
        assert!(e.contains("/other.sock"), "{e}");
    }

    #[test]
    fn servers_outside_backends_are_structure() {
        // `server` lines of a peers or ring section are not backend membership.
        let old = cfg("", &[A]) + "\npeers p\n    server h1 10.0.0.7:1024\n";
        let new = cfg("", &[A]) + "\npeers p\n    server h1 10.0.0.8:1024\n";
        assert!(diff(&old, &new, SOCK)
            .unwrap_err()
            .contains("more than servers"));
    }

    #[test]
    fn balance_from_defaults_counts() {
        let old = cfg("", &[A]).replace("    balance roundrobin\n", "");
        let new = cfg("", &[A, B]).replace("    balance roundrobin\n", "");
        assert_eq!(kinds(&diff(&old, &new, SOCK)), ["+web/b"]);
        let random = |t: &str| t.replace("mode http\n", "mode http\n    balance random(2)\n");
        assert_eq!(kinds(&diff(&random(&old), &random(&new), SOCK)), ["+web/b"]);
        let old = old.replace("mode http\n", "mode http\n    balance source\n");
        let new = new.replace("mode http\n", "mode http\n    balance source\n");
        assert!(diff(&old, &new, SOCK).unwrap_err().contains("source"));
    }

    #[test]
    fn words_follow_haproxy_quoting() {
        let cases = [
            (
                "  server a 1.2.3.4:80 check",
                &["server", "a", "1.2.3.4:80", "check"][..],
            ),
            (
                "stats socket \"/run/a b.sock\" level admin",
                &["stats", "socket", "/run/a b.sock", "level", "admin"],
            ),
            ("x 'a\"b' c\\ d # comment", &["x", "a\"b", "c d"]),
            ("   # only a comment", &[]),
            ("a\"b\"c", &["abc"]),
        ];
        for (line, want) in cases {
            assert_eq!(words(line), want, "{line}");
        }
    }

    #[test]
    fn commands_for_each_change() {
        let s = |l: &str| {
            let w = words(&format!("server {l}"));
            Server {
                name: w[1].clone(),
                addr: w[2].clone(),
                options: w[3..].to_vec(),
            }
        };
        assert_eq!(
            add_commands("web", &s(A)),
            [
                "add server web/a 10.0.0.1:80 check inter 2s fall 2 rise 1",
                "enable health web/a",
                "enable server web/a"
            ]
        );
        assert_eq!(
            add_commands("web", &s("x [::1]:81 weight 3 disabled")),
            ["add server web/x [::1]:81 weight 3"]
        );
        let moved = s("a [fd00::2]:81 check inter 2s fall 2 rise 1 weight 7 disabled");
        assert_eq!(
            update_commands("web", &s(A), &moved, false),
            [
                "set server web/a addr fd00::2 port 81",
                "set server web/a weight 7",
                "set server web/a state maint"
            ]
        );
        assert_eq!(
            update_commands("web", &moved, &s(A), false),
            [
                "set server web/a addr 10.0.0.1 port 80",
                "set server web/a weight 1",
                "set server web/a state ready"
            ]
        );
        // A server being drained comes back: same line, put back in service.
        assert_eq!(
            update_commands("web", &s(A), &s(A), true),
            ["set server web/a state ready"]
        );
        assert!(update_commands("web", &s(A), &s(A), false).is_empty());
    }
}
