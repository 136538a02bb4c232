//! What derivation reads: a container, reduced to the inspect data that decides its services
//! ([`ContainerInfo`], so tests need no Docker), and the registrator's flags and host facts
//! ([`DeriveOptions`]). Plain data, at the bottom of the folder: every other room reads it.

use super::filter::LabelMatch;
use std::collections::BTreeMap;
use std::time::Duration;

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
