//! The registrator's settings, as `run` takes them (parsed from the command line by `cli`).

use crate::derive::LabelMatch;
use std::net::SocketAddr;
use std::time::Duration;
use switchboard::telemetry::LogFormat;
use switchboard::RegistryUri;

/// When a stopped container's services are removed (`-deregister`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deregister {
    /// Whenever the container stops (gliderlabs default).
    Always,
    /// Only when it exited with status 0; a crashed container stays registered until it is
    /// removed, so a supervisor restarting it does not cause churn.
    OnSuccess,
}

/// Everything `run` needs to know.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where services are registered.
    pub uri: RegistryUri,
    /// `--metrics-addr`: where `/metrics` and `/healthz` are served (`None`: nowhere).
    pub metrics_addr: Option<SocketAddr>,
    /// `--log-format`.
    pub log_format: LogFormat,
    /// `-ip`: address to register published ports with, instead of the host's own.
    pub ip: Option<String>,
    /// `-internal`: register exposed ports with the container's own IP.
    pub internal: bool,
    /// `-explicit`: only containers naming their service (`SERVICE_NAME`).
    pub explicit: bool,
    /// `-tags`: appended to every service's tags.
    pub tags: Vec<String>,
    /// `-ttl`: registrations expire unless refreshed within this time.
    pub ttl: Option<Duration>,
    /// `-ttl-refresh`: how often TTL registrations are refreshed.
    pub ttl_refresh: Duration,
    /// `-resync`: re-list every container this often.
    pub resync: Option<Duration>,
    /// `-deregister`.
    pub deregister: Deregister,
    /// `-retry-attempts`: how often to try reaching the store at start (`None`: forever).
    pub retry_attempts: Option<u32>,
    /// `-retry-interval`: the wait between those attempts.
    pub retry_interval: Duration,
    /// `-cleanup`: remove this host's registrations that no running container backs.
    pub cleanup: bool,
    /// `-useIpFromLabel`: take the service address from this container label.
    pub use_ip_from_label: Option<String>,
    /// `-network`: with `-internal`, the Docker network whose address is registered.
    pub network: Option<String>,
    /// `--deregister-on-exit`: deregister everything on SIGTERM/SIGINT. Off by default:
    /// registrations outlive the process and the next registrator adopts them, so restarting
    /// or upgrading the registrator never takes a running container out of the load balancer.
    pub deregister_on_exit: bool,
    /// How often the store is listed to find lost registrations (and stale ones with cleanup).
    pub verify_interval: Duration,
    /// This host's name: the first part of every service ID, and the prefix `-cleanup` owns.
    pub hostname: String,
    /// `-label-filter`: only containers matching all of these are registered.
    pub label_filter: Vec<LabelMatch>,
    /// `--scope-label`: the label whose value on registrator's own container every
    /// registered container must share (resolved at start, then one more label filter).
    pub scope_label: Option<String>,
}

impl Config {
    /// Flags given that do nothing with the chosen store, each with why: `run` warns about
    /// them at start, since a flag accepted and silently ignored looks like one that works.
    pub fn ineffective_flags(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if matches!(self.uri, RegistryUri::ConsulKv { .. }) && self.ttl.is_some() {
            out.push(
                "-ttl does nothing with consulkv://: Consul KV entries cannot expire (consul:// uses a TTL check, etcd:// a lease)",
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ttl_is_ineffective_only_with_consul_kv() {
        // (argument line, warnings expected)
        let table = [
            ("-ttl 30 consulkv://h:8500/services", 1),
            ("consulkv://h:8500/services", 0),
            ("-ttl 30 consul://h:8500", 0),
            ("-ttl 30 etcd://h:2379/services", 0),
        ];
        for (line, want) in table {
            let argv: Vec<String> = std::iter::once("registrator")
                .chain(line.split(' '))
                .map(String::from)
                .collect();
            let Ok(c) = crate::cli::parse(argv, "host") else {
                panic!("{line} refused");
            };
            assert_eq!(c.ineffective_flags().len(), want, "{line}");
        }
    }
}
