//! Where clients reach each service: which container ports become services, and at which
//! address and port (host network, `-internal` on the container's network, or the published
//! binding under `-ip`), with `-useIpFromLabel` and `SERVICE_NETWORK` on top.

use super::input::{ContainerInfo, ContainerPort, DeriveOptions};
use super::labels::{Ctx, Metadata, Warning};
use std::net::IpAddr;
use switchboard::excerpt;

/// One port that becomes a service: the container port and where clients reach it.
pub(super) struct Candidate<'a> {
    /// The container port.
    pub(super) exposed: &'a ContainerPort,
    /// The address clients reach it at.
    pub(super) address: String,
    /// The port clients reach it at.
    pub(super) port: u16,
}

/// Where each service port is reached, per gliderlabs: host network -> exposed ports on the
/// host address; `-internal` -> exposed ports on the container IP; otherwise published ports
/// on `-ip`, else the binding's own IP, else the host address.
pub(super) fn candidates<'a>(
    info: &'a ContainerInfo,
    opts: &DeriveOptions,
    container_ip: Option<&String>,
) -> Vec<Candidate<'a>> {
    let host_addr = || opts.ip.clone().unwrap_or_else(|| opts.host_ip.clone());
    let mut out = Vec::new();
    for p in &info.ports {
        if info.host_network {
            out.push(Candidate {
                exposed: p,
                address: host_addr(),
                port: p.port,
            });
        } else if opts.internal {
            out.push(Candidate {
                exposed: p,
                address: container_ip.cloned().unwrap_or_else(host_addr),
                port: p.port,
            });
        } else {
            // `-p 80` publishes on 0.0.0.0 and :: with the same port: take one, IPv4 first.
            let binding = p
                .bindings
                .iter()
                .find(|(ip, _)| !ip.contains(':'))
                .or_else(|| p.bindings.first());
            if let Some((bind_ip, host_port)) = binding {
                let address = match &opts.ip {
                    Some(ip) => ip.clone(),
                    None if !matches!(bind_ip.as_str(), "" | "0.0.0.0" | "::") => bind_ip.clone(),
                    None => opts.host_ip.clone(),
                };
                out.push(Candidate {
                    exposed: p,
                    address,
                    port: *host_port,
                });
            }
        }
    }
    out
}

/// The container address `-internal` registers: on the network its `SERVICE_NETWORK` label
/// (or env) names, else on `-network`'s, else on its first network (the only one, for most
/// containers). Docker lists a container's networks in no useful order, so for a container
/// attached to several (a frontend network and a backend one, as in
/// <https://github.com/gliderlabs/registrator/issues/498> and
/// <https://github.com/gliderlabs/registrator/issues/291>) "its first network" is a coin
/// toss. A label naming a network the container is not on warns and falls back (a typo must
/// not unregister it); `-network` applies to every container, so a container not on that
/// network quietly falls back.
pub(super) fn container_ip(
    info: &ContainerInfo,
    opts: &DeriveOptions,
    md: &Metadata,
    warnings: &mut Vec<Warning>,
) -> Option<String> {
    if !opts.internal || info.host_network {
        return info.ip.clone();
    }
    if let Some(v) = md.general.get("network") {
        if let Some(ip) = info.networks.get(v.value.trim()) {
            return Some(ip.clone());
        }
        // Network names are Docker's own (it allows `[a-zA-Z0-9][a-zA-Z0-9_.-]*`).
        let on: Vec<&str> = info.networks.keys().map(String::as_str).collect();
        Ctx { warnings }.warn(
            v,
            &format!(
                "the name of a network this container is on ({}); using its address on \
                 another",
                on.join(", ")
            ),
        );
    }
    opts.network
        .as_ref()
        .and_then(|n| info.networks.get(n))
        .cloned()
        .or_else(|| info.ip.clone())
}

/// The address `-useIpFromLabel` takes from the container's label, if it names one: an IP
/// address, a `/prefix` length dropped. A label that holds anything else warns and is not used.
pub(super) fn label_ip(
    info: &ContainerInfo,
    opts: &DeriveOptions,
    warnings: &mut Vec<Warning>,
) -> Option<String> {
    let label = opts.use_ip_from_label.as_ref()?;
    let raw = info.labels.get(label)?;
    let ip = raw.rsplit_once('/').map_or(raw.as_str(), |(ip, _)| ip);
    match ip.parse::<IpAddr>() {
        Ok(_) => Some(ip.to_string()),
        Err(_) => {
            warnings.push(Warning {
                key: label.clone(),
                value: excerpt(raw).to_string(),
                expected: "an IP address, optionally with a /prefix length".into(),
            });
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::derive::fixtures::*;
    use crate::derive::{derive, ContainerInfo, DeriveOptions};

    #[test]
    fn network_choice_for_internal_addresses() {
        let mut two = web();
        two.networks = [
            ("dropin-back".to_string(), "10.20.0.2".to_string()),
            ("dropin-front".to_string(), "10.10.0.2".to_string()),
        ]
        .into();
        two.ip = Some("10.20.0.2".into());
        let internal = |network: Option<&str>| DeriveOptions {
            internal: true,
            network: network.map(String::from),
            ..opts()
        };
        // (container, options, address registered, warned key)
        type Case = (
            ContainerInfo,
            DeriveOptions,
            &'static str,
            Option<&'static str>,
        );
        let cases: Vec<Case> = vec![
            (two.clone(), internal(None), "10.20.0.2:80", None),
            (
                two.clone(),
                internal(Some("dropin-front")),
                "10.10.0.2:80",
                None,
            ),
            (
                two.clone(),
                internal(Some("elsewhere")),
                "10.20.0.2:80",
                None,
            ),
            (
                with_labels(two.clone(), &[("SERVICE_NETWORK", "dropin-front")]),
                internal(Some("dropin-back")),
                "10.10.0.2:80",
                None,
            ),
            (
                with_env(two.clone(), &["SERVICE_NETWORK=dropin-front"]),
                internal(None),
                "10.10.0.2:80",
                None,
            ),
            (
                with_labels(two.clone(), &[("SERVICE_NETWORK", "typo")]),
                internal(Some("dropin-front")),
                "10.10.0.2:80",
                Some("SERVICE_NETWORK"),
            ),
            // Without -internal the published port is registered: networks do not matter.
            (
                with_labels(two.clone(), &[("SERVICE_NETWORK", "dropin-front")]),
                opts(),
                "192.0.2.2:32768",
                None,
            ),
        ];
        for (info, o, addr, warned) in cases {
            let d = derive(&info, &o);
            assert_eq!(
                d.services[0].addr(),
                addr,
                "{:?} {:?}",
                info.labels,
                o.network
            );
            let keys: Vec<&str> = d.warnings.iter().map(|w| w.key.as_str()).collect();
            assert_eq!(keys, warned.into_iter().collect::<Vec<_>>());
            assert!(
                d.services[0].meta.is_empty(),
                "SERVICE_NETWORK is not metadata"
            );
        }
        let d = derive(
            &with_labels(two, &[("SERVICE_NETWORK", "typo")]),
            &internal(None),
        );
        assert!(
            d.warnings[0].expected.contains("dropin-back, dropin-front"),
            "{:?}",
            d.warnings
        );
    }
}
