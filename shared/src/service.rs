//! The service model: one registered instance of a container port.
//!
//! This is the unit both halves of Switchboard agree on. The registrator derives it from a
//! container; the stores serialise it (Consul agent payload, Consul KV `ip:port`, etcd JSON);
//! confd reads it back as template data.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// One service instance, as registered in a store.
///
/// `Eq` matters: the registrator only rewrites a registration whose content changed. `Hash`
/// lets confd tell a changed refused entry from a repeat of the same one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Service {
    /// Unique ID, `<hostname>:<container-name>:<port>[:udp]` unless `SERVICE_ID` says otherwise.
    pub id: String,
    /// Service name; instances of one service share it.
    pub name: String,
    /// Address clients connect to (an IP address).
    pub address: String,
    /// Port clients connect to.
    pub port: u16,
    /// Tags from `SERVICE_TAGS` plus the registrator's `-tags`.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Every other `SERVICE_<KEY>` value, key lowercased.
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// Health check the store should run (Consul only; other stores ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
    /// Registrator-level TTL: the registration expires unless refreshed within it.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_secs")]
    pub ttl: Option<Duration>,
    /// The container's Docker HEALTHCHECK status, for a store that runs checks (Consul): the
    /// service is registered whatever its health, with a check whose status follows it.
    /// `None` for containers without a HEALTHCHECK and for other stores (which register only
    /// healthy containers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_health: Option<DockerHealth>,
}

/// A container's Docker HEALTHCHECK status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DockerHealth {
    /// No check has passed yet (within the start period, or before the first run).
    Starting,
    /// The last check passed.
    Healthy,
    /// The last `retries` checks failed.
    Unhealthy,
}

impl DockerHealth {
    /// Docker's spelling (`starting`, `healthy`, `unhealthy`); anything else is `None`.
    pub fn from_docker(status: &str) -> Option<Self> {
        match status {
            "starting" => Some(DockerHealth::Starting),
            "healthy" => Some(DockerHealth::Healthy),
            "unhealthy" => Some(DockerHealth::Unhealthy),
            _ => None,
        }
    }

    /// Docker's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DockerHealth::Starting => "starting",
            DockerHealth::Healthy => "healthy",
            DockerHealth::Unhealthy => "unhealthy",
        }
    }

    /// The Consul check status it maps to: only `healthy` passes (a starting container takes
    /// no traffic yet).
    pub fn consul_status(self) -> &'static str {
        match self {
            DockerHealth::Healthy => "passing",
            DockerHealth::Starting | DockerHealth::Unhealthy => "critical",
        }
    }
}

impl Service {
    /// `address:port`, the form log lines and Consul KV values use.
    pub fn addr(&self) -> String {
        if self.address.contains(':') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }
}

/// What a Consul health check probes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// HTTP GET of this URL; 2xx passes.
    Http(String),
    /// HTTPS GET of this URL.
    Https(String),
    /// TCP connect to `host:port`.
    Tcp(String),
    /// The service itself must report within this TTL.
    Ttl(Duration),
    /// A program run by the Consul agent, as an argument list (never through a shell).
    Script(Vec<String>),
    /// gRPC health checking protocol against `host:port[/service]`.
    Grpc {
        /// `host:port`, or `host:port/service` to ask about one gRPC service.
        target: String,
        /// Speak TLS to it.
        tls: bool,
    },
    /// A program run inside the container (`docker exec`) by the Consul agent, as an argument
    /// list (never through a shell). The agent needs script checks enabled and the Docker socket.
    Docker {
        /// Full container ID.
        container: String,
        /// The program and its arguments.
        args: Vec<String>,
    },
}

/// A health check attached to a service (`SERVICE_CHECK_*`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Check {
    /// What is probed.
    pub kind: CheckKind,
    /// How often; Consul's default applies when `None` (we send 10s, as gliderlabs does).
    #[serde(default, with = "opt_secs")]
    pub interval: Option<Duration>,
    /// Probe timeout.
    #[serde(default, with = "opt_secs")]
    pub timeout: Option<Duration>,
    /// `passing`, `warning` or `critical` until the first probe.
    #[serde(default)]
    pub initial_status: Option<String>,
    /// Consul removes the service after it has been critical this long.
    #[serde(default, with = "opt_secs")]
    pub deregister_after: Option<Duration>,
    /// HTTP method of an HTTP or HTTPS check (`GET` when `None`); an HTTP token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Accept any certificate (HTTPS checks, gRPC checks over TLS).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls_skip_verify: bool,
}

impl Check {
    /// A check of `kind` with every option at its default.
    pub fn new(kind: CheckKind) -> Self {
        Check {
            kind,
            interval: None,
            timeout: None,
            initial_status: None,
            deregister_after: None,
            method: None,
            tls_skip_verify: false,
        }
    }
}

/// Formats a duration the way Consul's API wants it (`10s`, `1500ms`).
pub fn consul_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Serialises `Option<Duration>` as fractional seconds, so the etcd JSON stays readable.
mod opt_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_f64(d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let v: Option<f64> = Option::deserialize(d)?;
        Ok(v.filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_brackets_ipv6() {
        let mut s = Service {
            id: "h:c:80".into(),
            name: "web".into(),
            address: "10.0.0.2".into(),
            port: 80,
            tags: vec![],
            meta: BTreeMap::new(),
            check: None,
            ttl: None,
            docker_health: None,
        };
        assert_eq!(s.addr(), "10.0.0.2:80");
        s.address = "fd00::2".into();
        assert_eq!(s.addr(), "[fd00::2]:80");
    }

    #[test]
    fn consul_durations() {
        assert_eq!(consul_duration(Duration::from_secs(10)), "10s");
        assert_eq!(consul_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn json_round_trip() {
        let s = Service {
            id: "h:c:80".into(),
            name: "web".into(),
            address: "10.0.0.2".into(),
            port: 80,
            tags: vec!["a".into()],
            meta: [("k".to_string(), "v".to_string())].into(),
            check: Some(Check {
                interval: Some(Duration::from_secs(5)),
                method: Some("HEAD".into()),
                ..Check::new(CheckKind::Grpc {
                    target: "10.0.0.2:80/health".into(),
                    tls: true,
                })
            }),
            ttl: Some(Duration::from_secs(30)),
            docker_health: None,
        };
        let j = serde_json::to_string(&s).unwrap();
        let back: Service = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s);
    }
}
