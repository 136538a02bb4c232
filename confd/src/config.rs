//! confd's configuration: the YAML file, merged with command-line flags and environment.
//!
//! Everything that can be wrong with a value is checked while deserialising, so serde_yaml
//! attaches the line and column and a bad file is refused with `file:line:column: what was
//! expected` on one line. Unknown keys are refused too (`deny_unknown_fields`): a misspelt
//! option silently ignored would be worse than a refusal at start.

use crate::command::CommandSpec;
use crate::duration;
use crate::exec::{ExecCommand, ExecConfig};
use crate::live::LiveChannel;
use crate::render::Limits;
use crate::signal::Signal;
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use switchboard::store::{Credentials, StoreSettings, TlsSettings};
use switchboard::RegistryUri;

/// Quiescence window: render once changes have stopped for `min`, but never later than `max`
/// after the first change of a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// Quiet time required after the last change.
    pub min: Duration,
    /// Upper bound on the delay after the first change.
    pub max: Duration,
}

impl Default for Wait {
    fn default() -> Self {
        Wait {
            min: Duration::from_millis(200),
            max: Duration::from_secs(2),
        }
    }
}

/// Written by hand so `max < min` is reported at the later of the two keys (a check after
/// the whole mapping was read would carry no location).
impl<'de> Deserialize<'de> for Wait {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Wait, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Wait;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a mapping like { min: 500ms, max: 5s }")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Wait, A::Error> {
                use serde::de::Error;
                #[derive(Deserialize)]
                struct Text(#[serde(with = "duration::serde_text")] Duration);
                let (mut min, mut max) = (None, None);
                while let Some(k) = m.next_key::<String>()? {
                    let v = match k.as_str() {
                        "min" | "max" => m.next_value::<Text>()?.0,
                        other => {
                            return Err(A::Error::unknown_field(other, &["min", "max"]));
                        }
                    };
                    if k == "min" {
                        min = Some(v)
                    } else {
                        max = Some(v)
                    }
                    if let (Some(a), Some(b)) = (min, max) {
                        if b < a {
                            return Err(A::Error::custom(format!(
                                "wait max ({b:?}) is shorter than min ({a:?}): expected max >= min"
                            )));
                        }
                    }
                }
                let min = min.ok_or_else(|| A::Error::missing_field("min"))?;
                Wait::new(min, max).map_err(A::Error::custom)
            }
        }
        d.deserialize_map(V)
    }
}

impl Wait {
    /// `min` and an optional `max` (default: 4 × `min`, as consul-template does).
    pub fn new(min: Duration, max: Option<Duration>) -> Result<Wait, String> {
        let max = max.unwrap_or(min * 4);
        if max < min {
            return Err(format!(
                "wait max ({max:?}) is shorter than min ({min:?}): expected max >= min"
            ));
        }
        Ok(Wait { min, max })
    }

    /// Parses `MIN:MAX` or `MIN` as `--wait` takes it.
    pub fn parse_flag(s: &str) -> Result<Wait, String> {
        match s.split_once(':') {
            Some((a, b)) => Wait::new(duration::parse(a)?, Some(duration::parse(b)?)),
            None => Wait::new(duration::parse(s)?, None),
        }
    }
}

/// File permission bits for a destination, written `"0644"` (or `644`, read as octal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u32);

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Mode, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Num(u64),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Text(s) => s,
            // YAML reads `0644` or `644` as a decimal number; its digits are what was meant.
            Raw::Num(n) => n.to_string(),
        };
        let digits = text.trim_start_matches("0o");
        match u32::from_str_radix(digits, 8) {
            Ok(m) if m <= 0o7777 && !digits.is_empty() => Ok(Mode(m)),
            _ => Err(serde::de::Error::custom(format!(
                "invalid mode {text:?}: expected octal permission bits like \"0644\""
            ))),
        }
    }
}

/// A backend URI, parsed while deserialising so a bad one is reported with its location.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Backend(RegistryUri);

impl<'de> Deserialize<'de> for Backend {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Backend, D::Error> {
        let s = String::deserialize(d)?;
        RegistryUri::parse(&s)
            .map(Backend)
            .map_err(serde::de::Error::custom)
    }
}

/// `max_render_depth`: levels of blocks and partials, from 1 to [`Limits::DEPTH_CEILING`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Depth(pub usize);

impl<'de> Deserialize<'de> for Depth {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Depth, D::Error> {
        let n = u64::deserialize(d)?;
        match usize::try_from(n) {
            Ok(n @ 1..=Limits::DEPTH_CEILING) => Ok(Depth(n)),
            _ => Err(serde::de::Error::custom(format!(
                "invalid max_render_depth \"{n}\": expected a number of levels from 1 to {}",
                Limits::DEPTH_CEILING
            ))),
        }
    }
}

/// `max_render_output`: a number of bytes, written as a number or with a unit (`512KiB`,
/// `256MiB`, `1GiB`, or `KB`, `MB`, `GB` in powers of ten); at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub usize);

impl Bytes {
    /// Parses `262144`, `256MiB`, `1.5GiB`, `100MB`.
    pub fn parse(s: &str) -> Result<Bytes, String> {
        let expected =
            || format!("invalid size {s:?}: expected bytes, e.g. 262144, 512KiB, 256MiB, 1GiB");
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, unit) = (&t[..split], t[split..].trim());
        let n: f64 = number.parse().map_err(|_| expected())?;
        let scale: f64 = match unit {
            "" | "B" => 1.0,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            "KB" => 1e3,
            "MB" => 1e6,
            "GB" => 1e9,
            _ => return Err(expected()),
        };
        let bytes = (n * scale).round();
        if !(1.0..=usize::MAX as f64).contains(&bytes) {
            return Err(expected());
        }
        Ok(Bytes(bytes as usize))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Num(n) => n.to_string(),
            Raw::Text(s) => s,
        };
        Bytes::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// `max_render_time`: a duration above zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenderTime(pub Duration);

impl<'de> Deserialize<'de> for RenderTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RenderTime, D::Error> {
        let s = String::deserialize(d)?;
        match duration::parse(&s).map_err(serde::de::Error::custom)? {
            Duration::ZERO => Err(serde::de::Error::custom(format!(
                "invalid max_render_time {s:?}: expected a duration above zero, e.g. 60s"
            ))),
            t => Ok(RenderTime(t)),
        }
    }
}

fn default_command_timeout() -> Duration {
    Duration::from_secs(30)
}

/// One template: where it comes from, where it goes, and how to validate and apply it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    /// Handlebars source file. In a config file a relative path is relative to the config
    /// file's directory (so `confd --config /etc/confd/confd.yaml` works from any directory);
    /// in `--template` it is relative to the working directory, as any command-line path.
    pub src: PathBuf,
    /// Destination file, replaced atomically (relative: to the working directory).
    pub dest: PathBuf,
    /// Run on the staged file before it replaces `dest`; non-zero exit refuses the change.
    #[serde(default)]
    pub check: Option<CommandSpec>,
    /// Run after `dest` was replaced; templates sharing one run it once per pass.
    #[serde(default)]
    pub reload: Option<CommandSpec>,
    /// Permission bits for `dest`; by default those of the file being replaced (or 0644).
    #[serde(default)]
    pub mode: Option<Mode>,
    /// Quiescence window for this template (default: the top-level `wait`).
    #[serde(default)]
    pub wait: Option<Wait>,
    /// Outage guard: do not render while the snapshot holds fewer instances in total.
    #[serde(default)]
    pub min_instances: usize,
    /// Time limit for the check and reload commands.
    #[serde(default = "default_command_timeout", with = "duration::serde_text")]
    pub command_timeout: Duration,
    /// Apply membership-only changes to the running proxy without a reload (e.g.
    /// `live: { nginx_lua: { socket: /run/nginx-peers.sock } }`); anything else still reloads.
    #[serde(default)]
    pub live: Option<LiveChannel>,
    /// How deep blocks and partials may nest in a render (default: the top-level key, else
    /// [`Limits::DEFAULT_MAX_DEPTH`]; see [`crate::render`]).
    #[serde(default)]
    pub max_render_depth: Option<Depth>,
    /// How many bytes a render may hold (default: the top-level key, else
    /// [`Limits::DEFAULT_MAX_OUTPUT`]).
    #[serde(default)]
    pub max_render_output: Option<Bytes>,
    /// How long a render may take (default: the top-level key, else
    /// [`Limits::DEFAULT_MAX_TIME`]).
    #[serde(default)]
    pub max_render_time: Option<RenderTime>,
}

impl TemplateConfig {
    /// A template from `--template SRC:DEST[:COMMAND]`; COMMAND (which may contain `:`) is the
    /// reload command, run through `sh -c`.
    pub fn parse_flag(s: &str) -> Result<TemplateConfig, String> {
        let mut parts = s.splitn(3, ':');
        let src = parts.next().unwrap_or_default();
        let dest = parts.next().unwrap_or_default();
        if src.is_empty() || dest.is_empty() {
            return Err(format!(
                "invalid --template {s:?}: expected SRC:DEST[:COMMAND]"
            ));
        }
        let reload = parts
            .next()
            .filter(|c| !c.trim().is_empty())
            .map(|c| CommandSpec::Shell(c.to_string()));
        Ok(TemplateConfig {
            src: src.into(),
            dest: dest.into(),
            check: None,
            reload,
            mode: None,
            wait: None,
            min_instances: 0,
            command_timeout: default_command_timeout(),
            live: None,
            max_render_depth: None,
            max_render_output: None,
            max_render_time: None,
        })
    }

    /// The limits its renders run within: its keys, and the defaults for the rest.
    pub fn limits(&self) -> Limits {
        let d = Limits::default();
        Limits {
            max_depth: self.max_render_depth.map_or(d.max_depth, |v| v.0),
            max_output: self.max_render_output.map_or(d.max_output, |v| v.0),
            max_time: self.max_render_time.map_or(d.max_time, |v| v.0),
        }
    }
}

fn default_poll_wait() -> Duration {
    Duration::from_secs(60)
}
fn default_max_long_polls() -> usize {
    64
}
fn default_once_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_ignore_services() -> Vec<String> {
    vec!["consul".to_string()]
}

/// The config file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    backend: Option<Backend>,
    #[serde(default)]
    wait: Option<Wait>,
    #[serde(default)]
    include_unhealthy: bool,
    #[serde(default)]
    kv_prefixes: Vec<String>,
    #[serde(default)]
    vars: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    templates: Vec<TemplateConfig>,
    #[serde(default = "default_poll_wait", with = "duration::serde_text")]
    poll_wait: Duration,
    #[serde(default = "default_max_long_polls")]
    max_long_polls: usize,
    #[serde(default = "default_ignore_services")]
    ignore_services: Vec<String>,
    #[serde(default = "default_once_timeout", with = "duration::serde_text")]
    once_timeout: Duration,
    /// Where `/metrics` and `/healthz` are served (`--metrics-addr` wins).
    #[serde(default, deserialize_with = "listen_addr")]
    metrics_addr: Option<SocketAddr>,
    /// TLS material for the store; each key set here wins over its environment variable.
    #[serde(default)]
    tls: Option<TlsSettings>,
    /// Certificates the proxies serve HTTPS with.
    #[serde(default)]
    https: Option<HttpsConfig>,
    /// Consul ACL token (over `CONSUL_HTTP_TOKEN`).
    #[serde(default)]
    token: Option<String>,
    /// File holding the Consul ACL token (over `CONSUL_HTTP_TOKEN_FILE`).
    #[serde(default)]
    token_file: Option<PathBuf>,
    /// etcd user, `name` or `name:password` (over `ETCDCTL_USER`).
    #[serde(default)]
    user: Option<String>,
    /// etcd password (over `ETCDCTL_PASSWORD`).
    #[serde(default)]
    password: Option<String>,
    /// Automatic HTTPS (`acme:`).
    #[serde(default)]
    acme: Option<crate::acme::AcmeFile>,
    /// The proxy confd supervises (`--exec`).
    #[serde(default)]
    exec: Option<ExecConfig>,
    /// Render bounds for the templates that set none of their own.
    #[serde(default)]
    max_render_depth: Option<Depth>,
    #[serde(default)]
    max_render_output: Option<Bytes>,
    #[serde(default)]
    max_render_time: Option<RenderTime>,
}

impl Default for FileConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("empty config")
    }
}

/// A config file that cannot be used: one line, `file:line:column: what was expected`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {reason}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// The file is not valid YAML or not a valid config.
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong and what was expected.
        message: String,
    },
    /// The merged configuration is incomplete (e.g. no backend anywhere).
    #[error("{0}")]
    Incomplete(String),
}

/// Command-line and environment inputs merged over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--backend`.
    pub backend: Option<String>,
    /// `--template`, appended to the file's templates.
    pub templates: Vec<String>,
    /// `--wait`.
    pub wait: Option<String>,
    /// `--var KEY=VALUE`, over the file's vars.
    pub vars: Vec<String>,
    /// `CONSUL_HTTP_ADDR`.
    pub consul_http_addr: Option<String>,
    /// `ETCDCTL_ENDPOINTS`.
    pub etcdctl_endpoints: Option<String>,
    /// `--exec`: the command confd supervises, over the file's `exec.command`.
    pub exec: Option<String>,
    /// `--exec-reload-signal`, over the file's `exec.reload_signal`.
    pub exec_reload_signal: Option<String>,
}

/// The complete, validated configuration a run uses.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where services are read from.
    pub backend: RegistryUri,
    /// Default quiescence window.
    pub wait: Wait,
    /// Also render instances whose checks do not pass (Consul).
    pub include_unhealthy: bool,
    /// KV prefixes exposed to templates as `kv`.
    pub kv_prefixes: Vec<String>,
    /// Template variables (`vars`).
    pub vars: BTreeMap<String, serde_json::Value>,
    /// The templates, each with its own wait resolved.
    pub templates: Vec<TemplateConfig>,
    /// Longest wait of one Consul blocking query.
    pub poll_wait: Duration,
    /// Most long polls open at once against Consul (see the Consul source).
    pub max_long_polls: usize,
    /// Services never shown to templates (default: Consul's own `consul`).
    pub ignore_services: Vec<String>,
    /// `--once`: how long to wait for the first healthy snapshot.
    pub once_timeout: Duration,
    /// `metrics_addr:`: where `/metrics` and `/healthz` are served (`None`: nowhere).
    pub metrics_addr: Option<SocketAddr>,
    /// TLS material and credentials for the store (YAML keys over the environment).
    pub store: StoreSettings,
    /// The proxy confd supervises, if any. Templates without a reload command then reload
    /// it with its `reload_signal` (set as their `reload` by [`Config::load`]).
    pub exec: Option<ExecConfig>,
    /// `acme:`: certificates for every virtual host, kept in the store.
    pub acme: Option<crate::acme::AcmeConfig>,
    /// `https:`: certificates from a directory (`None`: every host is served over HTTP only).
    pub https: Option<HttpsConfig>,
}

/// `https: { certs_dir: PATH, serve_dir: PATH, store_prefix: PREFIX }` (see [`crate::certs`]).
/// An `acme:` section without `https:` means `https: {}`: ACME certificates need somewhere to
/// be served from, and the defaults are that place.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsConfig {
    /// One `<host>.crt` + `<host>.key` pair per host (`_wildcard.<domain>` for `*.<domain>`),
    /// watched. Optional: certificates may come from the store and ACME alone.
    #[serde(default)]
    pub certs_dir: Option<PathBuf>,
    /// Where confd writes the checked pairs the proxies read (`<name>.pem`, `crt-list`).
    #[serde(default = "default_serve_dir")]
    pub serve_dir: PathBuf,
    /// Where operators put certificates in the store (`<prefix><name>`, JSON `{cert, key}`);
    /// empty: the store is not read for certificates.
    #[serde(default = "default_store_prefix")]
    pub store_prefix: String,
}

impl Default for HttpsConfig {
    fn default() -> HttpsConfig {
        HttpsConfig {
            certs_dir: None,
            serve_dir: default_serve_dir(),
            store_prefix: default_store_prefix(),
        }
    }
}

fn default_serve_dir() -> PathBuf {
    PathBuf::from("/run/switchboard-certs")
}

fn default_store_prefix() -> String {
    crate::certs::STORE_PREFIX.to_string()
}

impl Config {
    /// Reads the file (if any) and merges flags and environment over it.
    pub fn load(o: &Overrides) -> Result<Config, ConfigError> {
        let file = match &o.config {
            Some(p) => {
                let mut f = parse_file(p)?;
                resolve_sources(&mut f, p);
                f
            }
            None => FileConfig::default(),
        };
        let cfg = merge(file, o)?;
        if let Some(h) = &cfg.https {
            if let Some(d) = h.certs_dir.as_ref().filter(|d| !d.is_dir()) {
                return Err(ConfigError::Incomplete(format!(
                    "https certs_dir {}: expected a readable directory",
                    d.display()
                )));
            }
            if h.certs_dir.as_ref() == Some(&h.serve_dir) {
                return Err(ConfigError::Incomplete(format!(
                    "https serve_dir {}: expected a directory other than certs_dir",
                    h.serve_dir.display()
                )));
            }
        }
        // A template that cannot be read would only fail at the first render, so a SIGHUP
        // with a mistyped `src` would replace a working configuration with one that renders
        // nothing: refuse it here, at start and on SIGHUP alike.
        for t in &cfg.templates {
            if let Err(e) = std::fs::File::open(&t.src).and_then(|f| {
                if f.metadata()?.is_file() {
                    Ok(())
                } else {
                    Err(std::io::Error::other("not a regular file"))
                }
            }) {
                return Err(ConfigError::Incomplete(format!(
                    "template {}: cannot read it ({e}): expected a readable template file",
                    t.src.display()
                )));
            }
        }
        Ok(cfg)
    }
}

/// A relative `src:` in a config file names a template next to the config, not one in
/// whatever directory confd happened to be started from: that is what a reader of
/// the file expects, and it makes a config and its templates a directory that can be moved.
fn resolve_sources(file: &mut FileConfig, config_path: &Path) {
    let dir = config_path.parent().unwrap_or(Path::new(""));
    if let Some(h) = &mut file.https {
        for p in h.certs_dir.iter_mut().chain([&mut h.serve_dir]) {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }
    for t in &mut file.templates {
        if t.src.is_relative() {
            t.src = dir.join(&t.src);
        }
    }
}

fn parse_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    parse_text(&text, &path.display().to_string())
}

fn parse_text(text: &str, path: &str) -> Result<FileConfig, ConfigError> {
    // An empty file is an empty mapping, not an error.
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    serde_yaml::from_str(text).map_err(|e| {
        let message = strip_location(&e.to_string()).replace('\n', " ");
        let (index, line, column) = e
            .location()
            .map(|l| (l.index(), l.line(), l.column()))
            .unwrap_or((0, 1, 1));
        let (line, column) = refine_location(text, index, &message).unwrap_or((line, column));
        ConfigError::Invalid {
            path: path.to_string(),
            line,
            column,
            message,
        }
    })
}

/// serde_yaml places errors raised by our own validation (bad URI, duration, mode) at the
/// start of the enclosing mapping. Those messages quote the offending value, so point at the
/// first occurrence of that value after the reported position instead.
fn refine_location(text: &str, from: usize, message: &str) -> Option<(usize, usize)> {
    let start = message.find('"')? + 1;
    let len = message[start..].find('"')?;
    let value = &message[start..start + len];
    if value.is_empty() || value.contains('\\') {
        return None;
    }
    let at = from.min(text.len());
    let pos = at + text.get(at..)?.find(value)?;
    let line = text[..pos].matches('\n').count() + 1;
    let line_start = text[..pos].rfind('\n').map_or(0, |i| i + 1);
    Some((line, text[line_start..pos].chars().count() + 1))
}

/// serde_yaml (and libyaml, mid-message) writes ` at line N column M`; the location is
/// already in front, so every such mark is removed.
fn strip_location(msg: &str) -> String {
    let mut out = msg.to_string();
    let mut from = 0;
    while let Some(i) = out[from..].find(" at line ").map(|i| i + from) {
        let tail = &out[i + " at line ".len()..];
        let digits = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let n1 = digits(tail);
        let rest = &tail[n1..];
        match rest.strip_prefix(" column ") {
            Some(r) if n1 > 0 && digits(r) > 0 => {
                let end = i + " at line ".len() + n1 + " column ".len() + digits(r);
                out.replace_range(i..end, "");
                from = i;
            }
            _ => from = i + 1,
        }
    }
    out
}

fn merge(file: FileConfig, o: &Overrides) -> Result<Config, ConfigError> {
    let incomplete = ConfigError::Incomplete;
    let backend = match &o.backend {
        Some(b) => RegistryUri::parse(b).map_err(|e| incomplete(e.to_string()))?,
        None => match &file.backend {
            Some(Backend(b)) => b.clone(),
            None => backend_from_env(o).map_err(incomplete)?,
        },
    };
    let store = store_settings(&file, &backend).map_err(|e| incomplete(e.to_string()))?;
    let wait = match &o.wait {
        Some(w) => Wait::parse_flag(w).map_err(|e| incomplete(format!("--wait: {e}")))?,
        None => file.wait.unwrap_or_default(),
    };
    let mut templates = file.templates;
    for t in &o.templates {
        templates.push(TemplateConfig::parse_flag(t).map_err(incomplete)?);
    }
    if templates.is_empty() {
        return Err(incomplete(
            "no templates: expected `templates:` in the config file or --template SRC:DEST[:COMMAND]"
                .into(),
        ));
    }
    for t in &mut templates {
        t.wait.get_or_insert(wait);
        t.max_render_depth = t.max_render_depth.or(file.max_render_depth);
        t.max_render_output = t.max_render_output.or(file.max_render_output);
        t.max_render_time = t.max_render_time.or(file.max_render_time);
    }
    let exec = exec_config(file.exec, o)?;
    let acme = match file.acme {
        Some(a) => Some(a.validate().map_err(incomplete)?),
        None => None,
    };
    if let Some(x) = &exec {
        for t in &mut templates {
            t.reload.get_or_insert(CommandSpec::Signal(x.reload_signal));
        }
    }
    let mut vars = file.vars;
    for v in &o.vars {
        let (k, val) = v
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| incomplete(format!("invalid --var {v:?}: expected KEY=VALUE")))?;
        vars.insert(k.to_string(), serde_json::Value::String(val.to_string()));
    }
    let mut https = file.https;
    if let Some(a) = &acme {
        // The proxy's HTTP listener must send challenges to confd: that is what the
        // templates' `acme_challenge` does, so it needs no second setting.
        vars.entry("acme_challenge".to_string())
            .or_insert_with(|| challenge_target(a.challenge_addr).into());
        https.get_or_insert_with(HttpsConfig::default);
    }
    Ok(Config {
        store,
        backend,
        wait,
        include_unhealthy: file.include_unhealthy,
        kv_prefixes: file.kv_prefixes,
        vars,
        templates,
        poll_wait: file.poll_wait,
        max_long_polls: file.max_long_polls.max(2),
        ignore_services: file.ignore_services,
        once_timeout: file.once_timeout,
        metrics_addr: file.metrics_addr,
        exec,
        acme,
        https,
    })
}

/// Where a proxy on this machine reaches a challenge listener bound to `addr`: an unspecified
/// address (`0.0.0.0`, `::`) is reached on loopback.
fn challenge_target(addr: std::net::SocketAddr) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v) if v.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v) if v.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    std::net::SocketAddr::new(ip, addr.port()).to_string()
}

/// `--exec` and `--exec-reload-signal` over the file's `exec:` block.
fn exec_config(file: Option<ExecConfig>, o: &Overrides) -> Result<Option<ExecConfig>, ConfigError> {
    let incomplete = ConfigError::Incomplete;
    let mut exec = match (&o.exec, file) {
        (Some(cmd), file) => {
            let command =
                ExecCommand::parse(cmd).map_err(|e| incomplete(format!("--exec: {e}")))?;
            Some(match file {
                Some(f) => ExecConfig { command, ..f },
                None => ExecConfig::new(command),
            })
        }
        (None, file) => file,
    };
    if let Some(sig) = &o.exec_reload_signal {
        let sig =
            Signal::parse(sig).map_err(|e| incomplete(format!("--exec-reload-signal: {e}")))?;
        match &mut exec {
            Some(x) => x.reload_signal = sig,
            None => {
                return Err(incomplete(
                    "--exec-reload-signal without a command: expected --exec or `exec:` in the config file".into(),
                ))
            }
        }
    }
    Ok(exec)
}

/// `metrics_addr: HOST:PORT`, refused at its line when it is not one.
fn listen_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    switchboard::telemetry::parse_listen_addr("metrics_addr", &s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// The store settings: the YAML keys that are set, the environment for the rest.
fn store_settings(
    file: &FileConfig,
    backend: &RegistryUri,
) -> Result<StoreSettings, switchboard::store::SettingsError> {
    let given = Credentials {
        token: file.token.clone(),
        token_file: file.token_file.clone(),
        user: file.user.clone(),
        password: file.password.clone(),
    };
    let mut s = StoreSettings::from(backend, given)?;
    if let Some(t) = &file.tls {
        s.override_tls(t);
    }
    Ok(s)
}

/// No backend given: `CONSUL_HTTP_ADDR` (Consul agent services), then `ETCDCTL_ENDPOINTS`.
fn backend_from_env(o: &Overrides) -> Result<RegistryUri, String> {
    // `https://` means TLS, as it does to Consul's and etcd's own tools.
    let strip = |s: &str| {
        let s = s.trim();
        let tls = s.starts_with("https://");
        let rest = s
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        (tls, rest)
    };
    if let Some(addr) = o.consul_http_addr.as_deref().filter(|s| !s.is_empty()) {
        let (tls, host) = strip(addr);
        let scheme = if tls { "consul-tls" } else { "consul" };
        let uri = format!("{scheme}://{host}");
        return RegistryUri::parse(&uri).map_err(|e| format!("CONSUL_HTTP_ADDR: {e}"));
    }
    if let Some(eps) = o.etcdctl_endpoints.as_deref().filter(|s| !s.is_empty()) {
        let parts: Vec<(bool, String)> = eps.split(',').map(strip).collect();
        let scheme = if parts.iter().any(|(tls, _)| *tls) {
            "etcds"
        } else {
            "etcd"
        };
        let hosts: Vec<String> = parts.into_iter().map(|(_, h)| h).collect();
        let uri = format!("{scheme}://{}", hosts.join(","));
        return RegistryUri::parse(&uri).map_err(|e| format!("ETCDCTL_ENDPOINTS: {e}"));
    }
    Err("no backend: expected `backend:` in the config file, --backend URI, CONSUL_HTTP_ADDR or ETCDCTL_ENDPOINTS".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overrides() -> Overrides {
        Overrides {
            backend: Some("consul://127.0.0.1:8500".into()),
            ..Default::default()
        }
    }

    const FULL: &str = r#"
backend: consul://127.0.0.1:8500
wait: { min: 500ms, max: 5s }
include_unhealthy: true
kv_prefixes: [ "config/" ]
vars: { stats_user: admin, listen: 8080 }
templates:
  - src: templates/nginx.conf.hbs
    dest: /etc/nginx/nginx.conf
    check: "nginx -t -c {{staged}}"
    reload: ["nginx", "-s", "reload"]
    mode: "0640"
    wait: { min: 200ms, max: 2s }
    min_instances: 1
    command_timeout: 10s
  - src: a.hbs
    dest: b
    live: { haproxy: { socket: /run/haproxy/admin.sock, drain_timeout: 10s } }
"#;

    #[test]
    fn acme_implies_https_and_the_challenge_var() {
        let acme = "templates: [{ src: a, dest: b }]\n\
                    acme: { directory: https://acme.test/dir, challenge_addr: 0.0.0.0:8402 }\n";
        let c = merge(parse_text(acme, "c.yaml").unwrap(), &overrides()).unwrap();
        assert_eq!(
            c.vars["acme_challenge"],
            serde_json::json!("127.0.0.1:8402")
        );
        let h = c.https.unwrap();
        assert_eq!(
            (h.certs_dir, h.store_prefix.as_str()),
            (None, "switchboard/certs/")
        );
        // An operator's own var and https section win.
        let text = format!(
            "{acme}vars: {{ acme_challenge: \"10.0.0.9:80\" }}\nhttps: {{ store_prefix: \"\" }}\n"
        );
        let c = merge(parse_text(&text, "c.yaml").unwrap(), &overrides()).unwrap();
        assert_eq!(c.vars["acme_challenge"], serde_json::json!("10.0.0.9:80"));
        assert_eq!(c.https.unwrap().store_prefix, "");
        let c = merge(
            parse_text("templates: [{ src: a, dest: b }]\nhttps: {}\n", "c.yaml").unwrap(),
            &overrides(),
        )
        .unwrap();
        assert!(!c.vars.contains_key("acme_challenge"));
    }

    #[test]
    fn parses_the_documented_example() {
        let f = parse_text(FULL, "c.yaml").unwrap();
        let c = merge(
            f,
            &Overrides {
                vars: vec!["extra=1".into()],
                ..Default::default()
            },
        )
        .unwrap();
        assert!(matches!(c.backend, RegistryUri::Consul { .. }));
        assert_eq!(c.wait.max, Duration::from_secs(5));
        assert!(c.include_unhealthy);
        assert_eq!(c.vars["listen"], serde_json::json!(8080));
        assert_eq!(c.vars["extra"], serde_json::json!("1"));
        let t = &c.templates[0];
        assert_eq!(
            t.check,
            Some(CommandSpec::Shell("nginx -t -c {{staged}}".into()))
        );
        assert_eq!(
            t.reload,
            Some(CommandSpec::Argv(vec![
                "nginx".into(),
                "-s".into(),
                "reload".into()
            ]))
        );
        assert_eq!(t.mode, Some(Mode(0o640)));
        assert_eq!(t.wait.unwrap().min, Duration::from_millis(200));
        assert_eq!(t.command_timeout, Duration::from_secs(10));
        // The second template inherits the default wait.
        assert_eq!(c.templates[1].wait, Some(c.wait));
        assert_eq!(t.live, None);
        assert_eq!(
            c.templates[1].live,
            Some(crate::live::LiveChannel::Haproxy(
                crate::live::Haproxy::new(
                    "/run/haproxy/admin.sock".into(),
                    Duration::from_secs(10)
                )
            ))
        );
        assert_eq!(c.ignore_services, vec!["consul".to_string()]);
    }

    #[test]
    fn bad_files_name_line_column_and_expectation() {
        let cases = [
            (
                "templates:\n  - src: a\n    dset: b\n",
                3,
                5,
                "unknown field `dset`",
            ),
            ("wait: { min: 5 seconds }\n", 1, 14, "expected e.g. 500ms"),
            ("wait: { min: 5s, max: 1s }\n", 1, 7, "expected max >= min"),
            ("backend: zk://h:1\n", 1, 10, "unknown scheme"),
            (
                "templates:\n  - src: a\n    dest: b\n    mode: \"9z\"\n",
                4,
                12,
                "expected octal",
            ),
            ("templates: [\n", 2, 1, ""),
            ("vars: 3\n", 1, 7, "expected a map"),
            (
                "metrics_addr: 9102\n",
                1,
                15,
                "invalid value \"9102\" for metrics_addr: expected HOST:PORT",
            ),
            (
                "templates:\n  - src: a\n    dest: b\n    live: { haproxy: { socket: \"ipv4@0.0.0.0:9999\" } }\n",
                4,
                33,
                "expected the path of a unix socket",
            ),
            (
                "templates:\n  - src: a\n    dest: b\n    live: { haproxy: { sock: /a } }\n",
                4,
                24,
                "unknown field `sock`",
            ),
        ];
        for (text, line, col, want) in cases {
            let e = parse_text(text, "c.yaml").unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("c.yaml:{line}:{col}: ")),
                "{text:?}: {e}"
            );
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
            assert!(!e.contains(" at line "), "{e}");
        }
    }

    #[test]
    fn render_bounds_default_from_the_top_level_key_by_key() {
        let text = "max_render_depth: 8\nmax_render_output: 64MiB\ntemplates:\n  \
                    - { src: a, dest: b }\n  \
                    - { src: c, dest: d, max_render_output: 1000, max_render_time: 5s }\n";
        let c = merge(parse_text(text, "c.yaml").unwrap(), &overrides()).unwrap();
        let d = Limits::default();
        assert_eq!(
            c.templates[0].limits(),
            Limits {
                max_depth: 8,
                max_output: 64 << 20,
                max_time: d.max_time
            }
        );
        assert_eq!(
            c.templates[1].limits(),
            Limits {
                max_depth: 8,
                max_output: 1000,
                max_time: Duration::from_secs(5)
            }
        );
        // Flags' templates take the file's bounds; with none anywhere, the defaults.
        let o = Overrides {
            templates: vec!["x:y".into()],
            ..overrides()
        };
        let c = merge(parse_text(text, "c.yaml").unwrap(), &o).unwrap();
        assert_eq!(c.templates[2].limits().max_depth, 8);
        let c = merge(FileConfig::default(), &o).unwrap();
        assert_eq!(c.templates[0].limits(), d);

        for (s, want) in [
            ("262144", Some(262_144)),
            ("512KiB", Some(512 << 10)),
            ("256MiB", Some(256 << 20)),
            ("1.5GiB", Some(3 << 29)),
            ("100MB", Some(100_000_000)),
            ("1 GB", Some(1_000_000_000)),
            ("0", None),
            ("-1", None),
            ("12 parsecs", None),
            ("MiB", None),
            ("", None),
        ] {
            assert_eq!(Bytes::parse(s).ok().map(|b| b.0), want, "{s}");
        }
        for (text, line, col, want) in [
            (
                "max_render_depth: 0\n",
                1,
                19,
                "expected a number of levels from 1 to 512",
            ),
            ("max_render_depth: 513\n", 1, 19, "from 1 to 512"),
            (
                "max_render_output: \"12 parsecs\"\n",
                1,
                21,
                "expected bytes, e.g.",
            ),
            (
                "templates:\n  - { src: a, dest: b, max_render_time: 0s }\n",
                2,
                41,
                "expected a duration above zero",
            ),
        ] {
            let e = parse_text(text, "c.yaml").unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("c.yaml:{line}:{col}: ")),
                "{text:?}: {e}"
            );
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn metrics_addr_is_read() {
        let f = parse_text("metrics_addr: 127.0.0.1:9102\n", "c.yaml").unwrap();
        assert_eq!(f.metrics_addr, Some("127.0.0.1:9102".parse().unwrap()));
        let f = parse_text("{}", "c.yaml").unwrap();
        assert_eq!(f.metrics_addr, None);
    }

    #[test]
    fn flags_merge_over_the_file() {
        let f = parse_text(FULL, "c.yaml").unwrap();
        let o = Overrides {
            backend: Some("etcd://h1:2379,h2:2379/services".into()),
            templates: vec!["x.hbs:/tmp/x.conf:nginx -s reload; echo a:b".into()],
            wait: Some("1s:3s".into()),
            ..Default::default()
        };
        let c = merge(f, &o).unwrap();
        assert!(matches!(c.backend, RegistryUri::Etcd { .. }));
        assert_eq!(
            c.wait,
            Wait::new(Duration::from_secs(1), Some(Duration::from_secs(3))).unwrap()
        );
        let t = c.templates.last().unwrap();
        assert_eq!(t.dest, PathBuf::from("/tmp/x.conf"));
        assert_eq!(
            t.reload,
            Some(CommandSpec::Shell("nginx -s reload; echo a:b".into()))
        );
        assert_eq!(t.wait, Some(c.wait));
    }

    #[test]
    fn exec_block_and_flags() {
        let text = format!(
            "{FULL}exec:\n  command: \"nginx -g 'daemon off;'\"\n  reload_signal: SIGUSR2\n  kill_timeout: 5s\n"
        );
        let c = merge(parse_text(&text, "c.yaml").unwrap(), &overrides()).unwrap();
        let x = c.exec.clone().unwrap();
        assert_eq!(x.command.0, ["nginx", "-g", "daemon off;"]);
        assert_eq!(x.reload_signal, Signal::USR2);
        assert_eq!(x.kill_timeout, Duration::from_secs(5));
        // A template with a reload command keeps it; one without reloads by the signal.
        assert!(matches!(c.templates[0].reload, Some(CommandSpec::Argv(_))));
        assert_eq!(
            c.templates[1].reload,
            Some(CommandSpec::Signal(Signal::USR2))
        );

        // Flags over the file: the command, then the signal; the rest stays the file's.
        let o = Overrides {
            exec: Some("haproxy -W -db -f /etc/haproxy/haproxy.cfg".into()),
            exec_reload_signal: Some("hup".into()),
            ..overrides()
        };
        let c = merge(parse_text(&text, "c.yaml").unwrap(), &o).unwrap();
        let x = c.exec.unwrap();
        assert_eq!(x.command.0[0], "haproxy");
        assert_eq!(x.reload_signal, Signal::HUP);
        assert_eq!(x.kill_timeout, Duration::from_secs(5));

        // No exec: templates without a reload command have none.
        let c = merge(parse_text(FULL, "c.yaml").unwrap(), &overrides()).unwrap();
        assert!(c.exec.is_none());
        assert_eq!(c.templates[1].reload, None);

        for (o, want) in [
            (
                Overrides {
                    exec_reload_signal: Some("SIGHUP".into()),
                    ..overrides()
                },
                "--exec-reload-signal without a command",
            ),
            (
                Overrides {
                    exec: Some("nginx; rm -rf /".into()),
                    ..overrides()
                },
                "--exec: exec command",
            ),
            (
                Overrides {
                    exec: Some("nginx".into()),
                    exec_reload_signal: Some("SIGNOPE".into()),
                    ..overrides()
                },
                "--exec-reload-signal: invalid signal",
            ),
        ] {
            let e = merge(parse_text(FULL, "c.yaml").unwrap(), &o)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
        let e = parse_text("exec:\n  command: \"nginx > /tmp/log\"\n", "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("c.yaml:2:") && e.contains("needs a shell"),
            "{e}"
        );
        let e = parse_text("exec:\n  command: nginx\n  reload_signal: BOOM\n", "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("c.yaml:3:") && e.contains("invalid signal"),
            "{e}"
        );
    }

    #[test]
    fn store_tls_and_credentials_keys() {
        let o = Overrides {
            templates: vec!["a:b".into()],
            ..Default::default()
        };
        let text = "backend: consul-tls://127.0.0.1:8501\ntls:\n  ca_file: /c/ca.pem\n  \
                    server_name: s.dc1.consul\ntoken: t0k3n\n";
        let c = merge(parse_text(text, "c.yaml").unwrap(), &o).unwrap();
        assert_eq!(c.store.tls.ca_file.as_deref(), Some(Path::new("/c/ca.pem")));
        assert_eq!(c.store.tls.server_name.as_deref(), Some("s.dc1.consul"));
        assert_eq!(c.store.token.as_ref().map(|t| t.expose()), Some("t0k3n"));
        assert!(!format!("{c:?}").contains("t0k3n"));

        let text = "backend: etcds://127.0.0.1:2379/s\nuser: app:pw\n";
        let c = merge(parse_text(text, "c.yaml").unwrap(), &o).unwrap();
        let u = c.store.etcd_user.unwrap();
        assert_eq!((u.name.as_str(), u.password.expose()), ("app", "pw"));

        let e = parse_text("tls: { ca_fil: x }\n", "c.yaml").unwrap_err();
        assert!(e.to_string().contains("ca_fil"), "{e}");
        let text = "backend: consul://h:1\ntoken_file: /nonexistent/t\n";
        let e = merge(parse_text(text, "c.yaml").unwrap(), &o).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/t"), "{e}");
    }

    #[test]
    fn backend_falls_back_to_environment() {
        let base = Overrides {
            templates: vec!["a:b".into()],
            ..Default::default()
        };
        let cases = [
            (Some("http://10.0.0.1:8501"), None, "consul", "10.0.0.1"),
            (
                Some("consul:8500"),
                Some("http://e:2379"),
                "consul",
                "consul",
            ),
            (None, Some("http://e1:2379,http://e2:2380"), "etcd", "e1"),
            (Some("https://10.0.0.2:8501"), None, "consul", "10.0.0.2"),
            (None, Some("https://e1:2379,https://e2:2379"), "etcd", "e1"),
        ];
        for (consul, etcd, kind, host) in cases {
            let o = Overrides {
                consul_http_addr: consul.map(String::from),
                etcdctl_endpoints: etcd.map(String::from),
                ..base.clone()
            };
            let c = merge(FileConfig::default(), &o).unwrap();
            let got = match &c.backend {
                RegistryUri::Consul { .. } => "consul",
                RegistryUri::Etcd { endpoints, .. } => {
                    assert_eq!(endpoints.len(), 2);
                    "etcd"
                }
                RegistryUri::ConsulKv { .. } => "consulkv",
            };
            assert_eq!(got, kind);
            let tls = consul.or(etcd).unwrap().starts_with("https://");
            assert_eq!(c.backend.primary().tls, tls, "{consul:?} {etcd:?}");
            assert_eq!(c.backend.primary().host, host);
        }
        let e = merge(FileConfig::default(), &base).unwrap_err().to_string();
        assert!(e.contains("no backend"), "{e}");
    }

    #[test]
    fn relative_template_sources_are_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let conf_dir = dir.path().join("etc");
        std::fs::create_dir_all(conf_dir.join("templates")).unwrap();
        std::fs::write(conf_dir.join("templates/a.hbs"), "a").unwrap();
        std::fs::write(dir.path().join("b.hbs"), "b").unwrap();
        let config = conf_dir.join("confd.yaml");
        let abs = dir.path().join("b.hbs");
        std::fs::write(
            &config,
            format!(
                "backend: consul://127.0.0.1:8500\ntemplates:\n  - src: templates/a.hbs\n    dest: out/a\n  \
                 - src: {}\n    dest: /tmp/b\n",
                abs.display()
            ),
        )
        .unwrap();
        // The test's working directory is the crate, which has no templates/a.hbs: only the
        // config file's directory does.
        let c = Config::load(&Overrides {
            config: Some(config.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.templates[0].src, conf_dir.join("templates/a.hbs"));
        assert_eq!(
            c.templates[0].dest,
            PathBuf::from("out/a"),
            "dest is not moved"
        );
        assert_eq!(c.templates[1].src, abs, "absolute paths stay");
        // A --template flag is a command-line path: relative to the working directory.
        let e = Config::load(&Overrides {
            config: Some(config),
            templates: vec!["templates/a.hbs:/tmp/x".into()],
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("template templates/a.hbs: cannot read it"),
            "{e}"
        );
    }

    #[test]
    fn flag_errors() {
        assert!(Wait::parse_flag("2s").unwrap().max == Duration::from_secs(8));
        assert!(Wait::parse_flag("5s:1s").is_err());
        assert!(TemplateConfig::parse_flag("onlysrc").is_err());
        let o = Overrides {
            vars: vec!["novalue".into()],
            templates: vec!["a:b".into()],
            ..overrides()
        };
        assert!(merge(FileConfig::default(), &o).is_err());
        let o = Overrides { ..overrides() };
        assert!(merge(FileConfig::default(), &o)
            .unwrap_err()
            .to_string()
            .contains("no templates"));
    }
}
