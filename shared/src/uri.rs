//! Registry URIs: `consul://`, `consulkv://` and `etcd://` (and their `-tls` and `-unix`
//! forms), as gliderlabs/registrator takes them.
//!
//! Parsed by hand rather than with a URL crate because etcd URIs carry a comma-separated host
//! list (`etcd://h1:2379,h2:2379/prefix`), which is not a valid URL authority.

use std::fmt;

/// One `host:port` to reach a store on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Speak HTTPS (`consul-tls://`, `etcds://`).
    pub tls: bool,
    /// A Unix socket every request goes through instead (`consul-unix://`); `host` is then
    /// `localhost` and `port` unused.
    pub socket: Option<String>,
}

impl Endpoint {
    /// `http://host:port` (or `https://`), without a trailing slash; `http://localhost` for a
    /// Unix socket (the HTTP client is bound to the socket, see `StoreSettings::http_client`).
    pub fn base_url(&self) -> String {
        if self.socket.is_some() {
            return "http://localhost".into();
        }
        let scheme = if self.tls { "https" } else { "http" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// The base URL, or `unix://<path>` for a socket: what log lines and errors name.
impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.socket {
            Some(path) => write!(f, "unix://{path}"),
            None => f.write_str(&self.base_url()),
        }
    }
}

/// Where services are registered (registrator) or read from (confd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryUri {
    /// Consul agent API: services and checks registered with the local agent.
    Consul {
        /// The agent.
        endpoint: Endpoint,
    },
    /// Consul KV: key `<prefix>/<name>/<id>`, value `ip:port`.
    ConsulKv {
        /// The agent.
        endpoint: Endpoint,
        /// Key prefix without leading or trailing `/` (may be empty).
        prefix: String,
    },
    /// etcd v3 through its JSON gateway: key `/<prefix>/<name>/<id>`, value the service as JSON.
    Etcd {
        /// Members to try, in order; the client fails over between them.
        endpoints: Vec<Endpoint>,
        /// Key prefix without leading or trailing `/` (may be empty).
        prefix: String,
    },
}

/// A registry URI that cannot be used. Displays as one line naming the URI and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid registry URI {uri:?}: {reason}")]
pub struct UriError {
    /// The URI as given.
    pub uri: String,
    /// What was wrong and what was expected.
    pub reason: String,
}

const EXPECTED: &str = "expected consul://host:port, consulkv://host:port/prefix, \
     etcd://host:port[,host:port...]/prefix, consul-unix:///path/to/socket or \
     consulkv-unix:///path/to/socket:/prefix";

impl RegistryUri {
    /// Parses a registry URI.
    pub fn parse(uri: &str) -> Result<Self, UriError> {
        let err = |reason: String| UriError {
            uri: uri.to_string(),
            reason,
        };
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| err(format!("missing scheme; {EXPECTED}")))?;
        if let Some(kv) = match scheme {
            "consul-unix" => Some(false),
            "consulkv-unix" => Some(true),
            _ => None,
        } {
            return parse_unix(rest, kv).map_err(err);
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if path.contains(['?', '#']) {
            return Err(err("query strings and fragments are not supported".into()));
        }
        let prefix = path.trim_matches('/').to_string();
        let (kind, tls, default_port) = match scheme {
            "consul" => ("consul", false, 8500),
            "consul-tls" => ("consul", true, 8500),
            "consulkv" => ("consulkv", false, 8500),
            "consulkv-tls" => ("consulkv", true, 8500),
            "etcd" => ("etcd", false, 2379),
            "etcds" => ("etcd", true, 2379),
            other => return Err(err(format!("unknown scheme {other:?}; {EXPECTED}"))),
        };
        let mut endpoints = Vec::new();
        for part in authority.split(',') {
            endpoints.push(parse_host_port(part, default_port, tls).map_err(&err)?);
        }
        match kind {
            "consul" | "consulkv" if endpoints.len() > 1 => Err(err(
                "Consul takes one agent address; run registrator against the local agent".into(),
            )),
            "consul" => Ok(RegistryUri::Consul {
                endpoint: endpoints.remove(0),
            }),
            "consulkv" => Ok(RegistryUri::ConsulKv {
                endpoint: endpoints.remove(0),
                prefix,
            }),
            _ => Ok(RegistryUri::Etcd { endpoints, prefix }),
        }
    }

    /// The endpoint tried first (the only one for Consul).
    pub fn primary(&self) -> &Endpoint {
        match self {
            RegistryUri::Consul { endpoint } | RegistryUri::ConsulKv { endpoint, .. } => endpoint,
            RegistryUri::Etcd { endpoints, .. } => &endpoints[0],
        }
    }
}

/// `consul-unix:///run/consul.sock` and `consulkv-unix:///run/consul.sock:/prefix` (gliderlabs'
/// forms: the socket path, then for KV `:` and the prefix). `rest` is what follows `://`.
fn parse_unix(rest: &str, kv: bool) -> Result<RegistryUri, String> {
    let (socket, prefix) = match rest.split_once(':') {
        Some((socket, prefix)) if kv => (socket, prefix.trim_matches('/')),
        _ => (rest, ""),
    };
    if !socket.starts_with('/') || socket.len() < 2 {
        return Err(format!(
            "expected an absolute socket path after the scheme (three slashes: \
             consul-unix:///path/to/consul.sock), got {socket:?}"
        ));
    }
    if rest.contains(['?', '#']) || socket.chars().any(|c| c.is_control()) {
        return Err("query strings, fragments and control characters are not supported".into());
    }
    let endpoint = Endpoint {
        host: "localhost".into(),
        port: 0,
        tls: false,
        socket: Some(socket.to_string()),
    };
    Ok(if kv {
        RegistryUri::ConsulKv {
            endpoint,
            prefix: prefix.to_string(),
        }
    } else {
        RegistryUri::Consul { endpoint }
    })
}

fn parse_host_port(s: &str, default_port: u16, tls: bool) -> Result<Endpoint, String> {
    if s.is_empty() {
        return Err(format!("missing host; {EXPECTED}"));
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("unclosed '[' in host {s:?}"))?;
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return Err(format!("unexpected {after:?} after host {h:?}")),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err(format!("missing host in {s:?}; {EXPECTED}"));
    }
    if host.contains(|c: char| c.is_whitespace() || c == '@' || c == '/') {
        return Err(format!("bad host {host:?}"));
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("bad port {p:?}: expected a number from 1 to 65535")),
        },
    };
    Ok(Endpoint {
        host: host.to_string(),
        port,
        tls,
        socket: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(host: &str, port: u16) -> Endpoint {
        Endpoint {
            host: host.into(),
            port,
            tls: false,
            socket: None,
        }
    }

    #[test]
    fn parses_good_uris() {
        let cases: &[(&str, RegistryUri)] = &[
            (
                "consul://localhost:8500",
                RegistryUri::Consul {
                    endpoint: ep("localhost", 8500),
                },
            ),
            (
                "consul://consul",
                RegistryUri::Consul {
                    endpoint: ep("consul", 8500),
                },
            ),
            (
                "consulkv://127.0.0.1:8501/services/",
                RegistryUri::ConsulKv {
                    endpoint: ep("127.0.0.1", 8501),
                    prefix: "services".into(),
                },
            ),
            (
                "etcd://h1:2379,h2:2380,h3/skydns/local",
                RegistryUri::Etcd {
                    endpoints: vec![ep("h1", 2379), ep("h2", 2380), ep("h3", 2379)],
                    prefix: "skydns/local".into(),
                },
            ),
            (
                "consul-unix:///var/run/consul/consul.sock",
                RegistryUri::Consul {
                    endpoint: unix("/var/run/consul/consul.sock"),
                },
            ),
            (
                "consulkv-unix:///tmp/c.sock:/services/",
                RegistryUri::ConsulKv {
                    endpoint: unix("/tmp/c.sock"),
                    prefix: "services".into(),
                },
            ),
            (
                "consulkv-unix:///tmp/c.sock",
                RegistryUri::ConsulKv {
                    endpoint: unix("/tmp/c.sock"),
                    prefix: "".into(),
                },
            ),
            (
                "etcd://[::1]:2379",
                RegistryUri::Etcd {
                    endpoints: vec![ep("::1", 2379)],
                    prefix: "".into(),
                },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(&RegistryUri::parse(input).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn rejects_bad_uris_naming_them() {
        let cases = [
            ("zookeeper://h:1", "unknown scheme"),
            ("consul://", "missing host"),
            ("consul://:8500", "missing host"),
            ("consul://h:0", "bad port"),
            ("consul://h:99999", "bad port"),
            ("consul://h:abc", "bad port"),
            ("localhost:8500", "missing scheme"),
            ("etcd://h1:2379,,h2", "missing host"),
            ("consul://a:1,b:2", "one agent"),
            ("consul-unix://relative.sock", "absolute socket path"),
            ("consul-unix://", "absolute socket path"),
            ("consul-unix:///", "absolute socket path"),
            ("consulkv-unix://:/p", "absolute socket path"),
            ("consul-unix:///s.sock?x=1", "query strings"),
        ];
        for (input, want) in cases {
            let e = RegistryUri::parse(input).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(want), "{input}: {msg}");
            assert!(msg.contains(input), "{input}: {msg}");
            assert!(!msg.contains('\n'));
        }
    }

    fn unix(path: &str) -> Endpoint {
        Endpoint {
            host: "localhost".into(),
            port: 0,
            tls: false,
            socket: Some(path.into()),
        }
    }

    #[test]
    fn base_urls() {
        assert_eq!(unix("/s.sock").base_url(), "http://localhost");
        assert_eq!(unix("/s.sock").to_string(), "unix:///s.sock");
        assert_eq!(ep("::1", 1).base_url(), "http://[::1]:1");
        let mut e = ep("c", 8500);
        e.tls = true;
        assert_eq!(e.base_url(), "https://c:8500");
    }
}
