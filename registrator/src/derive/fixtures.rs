//! Containers and options the derive rooms' unit tests build on: one published web
//! container and the flags of a plain registrator, varied per case.

use super::{ContainerInfo, ContainerPort, DeriveOptions, Derived};
use std::collections::BTreeMap;

pub(super) fn port(port: u16, proto: &str, bindings: &[(&str, u16)]) -> ContainerPort {
    ContainerPort {
        port,
        proto: proto.into(),
        bindings: bindings.iter().map(|(i, p)| (i.to_string(), *p)).collect(),
    }
}

pub(super) fn web() -> ContainerInfo {
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

pub(super) fn opts() -> DeriveOptions {
    DeriveOptions {
        hostname: "host".into(),
        host_ip: "192.0.2.2".into(),
        ..Default::default()
    }
}

pub(super) fn with_env(mut c: ContainerInfo, env: &[&str]) -> ContainerInfo {
    c.env.extend(env.iter().map(|s| s.to_string()));
    c
}

pub(super) fn with_labels(mut c: ContainerInfo, labels: &[(&str, &str)]) -> ContainerInfo {
    c.labels
        .extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    c
}

/// `(id, name, addr)` of each derived service.
pub(super) fn summary(d: &Derived) -> Vec<(String, String, String)> {
    d.services
        .iter()
        .map(|s| (s.id.clone(), s.name.clone(), s.addr()))
        .collect()
}

/// Two published ports: 80 and 443.
pub(super) fn two_ports() -> ContainerInfo {
    let mut c = web();
    c.ports = vec![
        port(80, "tcp", &[("0.0.0.0", 8000)]),
        port(443, "tcp", &[("0.0.0.0", 8443)]),
    ];
    c
}
