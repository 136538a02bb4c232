//! Which services a container provides: gliderlabs/registrator's rules, as a pure function.
//!
//! [`derive()`] maps what `docker inspect` says about a running container (reduced to
//! [`ContainerInfo`], so tests need no Docker) plus the registrator's flags to the services to
//! register, and to warnings about `SERVICE_*` values it had to drop. A malformed value never
//! stops a container from being registered: only the malformed part is left out. The one
//! exception is a name or ID that cannot be used: that service (that port) is not registered
//! at all, since registering it under another name would put it behind the wrong proxy
//! entry, while the container's other ports still are.
//!
//! The rooms, one question each, so a rule is found by what it decides:
//! - `input`: what derivation reads (the container, the flags); plain data.
//! - `filter`: whether a container is ours at all (`-label-filter`).
//! - `labels`: the `SERVICE_*` values: precedence, limits, syntax, metadata, tags, and the
//!   warnings about dropped values.
//! - `addresses`: which ports become services, and the address and port clients reach.
//! - `ids`: service names and IDs, and one registration per ID across containers.
//! - `checks`: the `SERVICE_CHECK_*` keys -> one health check.
//!
//! This file only puts them together, one service per port; the rooms import downward
//! (`input` and `filter` at the bottom, then `labels`, then the rest), never this file, so
//! the folder has no circle. Everything outside `derive` needs is re-exported here.

mod addresses;
mod checks;
mod filter;
#[cfg(test)]
mod fixtures;
mod ids;
mod input;
mod labels;

pub use filter::LabelMatch;
pub use ids::claim_ids;
pub use input::{ContainerInfo, ContainerPort, DeriveOptions};
pub use labels::{split_tags, Warning};

use labels::{collect_metadata, merge_meta, meta_pairs, parse_tags, service_tags, truthy, Ctx};
use switchboard::Service;

/// The outcome of [`derive()`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Derived {
    /// Services to register, in port order.
    pub services: Vec<Service>,
    /// Dropped values, each key once.
    pub warnings: Vec<Warning>,
}

/// The services `info` provides under `opts`, and the values that had to be dropped.
pub fn derive(info: &ContainerInfo, opts: &DeriveOptions) -> Derived {
    // Outside the filter a container is not ours to look at: no services and no warnings
    // about metadata we will never use.
    if !opts.label_filter.iter().all(|f| f.matches(&info.labels)) {
        return Derived::default();
    }
    let mut warnings = Vec::new();
    let md = collect_metadata(info, &mut warnings);
    let label_ip = addresses::label_ip(info, opts, &mut warnings);
    let container_ip = addresses::container_ip(info, opts, &md, &mut warnings);
    let cands = addresses::candidates(info, opts, container_ip.as_ref());
    let mut naming = ids::Naming::new(info, opts, cands.len());
    // General values are parsed once, not once per port: a container may publish thousands.
    let general_tags = md.general.get("tags").map(|v| parse_tags(v, &mut warnings));
    let general_meta = meta_pairs(&md.general, &mut warnings);
    let mut services = Vec::new();
    for c in cands {
        let values = md.port(c.exposed.port);
        if values.get("ignore").is_some_and(|v| truthy(&v.value)) {
            continue;
        }
        let address = label_ip.clone().unwrap_or(c.address);
        let mut ctx = Ctx {
            warnings: &mut warnings,
        };
        let Some(ids::Identity { name, id }) = naming.identify(c.exposed, &values, &mut ctx) else {
            continue;
        };
        let tags = service_tags(&values, general_tags.as_ref(), &opts.tags, ctx.warnings);
        let check = checks::derive_check(&values, &info.id, &address, c.port, &mut ctx);
        let meta = merge_meta(
            &general_meta,
            meta_pairs(values.own(), ctx.warnings),
            ctx.warnings,
        );
        services.push(Service {
            id,
            name,
            address,
            port: c.port,
            tags,
            meta,
            check,
            ttl: opts.ttl,
            docker_health: None,
        });
    }
    warnings.sort();
    warnings.dedup_by(|a, b| a.key == b.key);
    Derived { services, warnings }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fixtures::*;
    use switchboard::CheckKind;

    #[test]
    fn addresses_ids_and_names() {
        let mut host_net = web();
        host_net.host_network = true;
        host_net.ports = vec![port(8080, "tcp", &[])];
        let mut bound = web();
        bound.ports = vec![port(80, "tcp", &[("10.1.1.1", 8000)])];
        let mut multi = web();
        multi.ports = vec![
            port(80, "tcp", &[("0.0.0.0", 8000)]),
            port(443, "tcp", &[("0.0.0.0", 8443)]),
            port(9000, "tcp", &[]),
        ];
        let mut udp = web();
        udp.ports = vec![port(53, "udp", &[("0.0.0.0", 5353)])];
        let internal = DeriveOptions {
            internal: true,
            ip: Some("127.0.0.1".into()),
            ..opts()
        };
        let with_ip = DeriveOptions {
            ip: Some("127.0.0.1".into()),
            ..opts()
        };
        let t =
            |id: &str, name: &str, addr: &str| (id.to_string(), name.to_string(), addr.to_string());
        type Case = (
            &'static str,
            ContainerInfo,
            DeriveOptions,
            Vec<(String, String, String)>,
        );
        let cases: Vec<Case> = vec![
            (
                "published, host address",
                web(),
                opts(),
                vec![t("host:web1:80", "web", "192.0.2.2:32768")],
            ),
            (
                "-ip wins",
                web(),
                with_ip.clone(),
                vec![t("host:web1:80", "web", "127.0.0.1:32768")],
            ),
            (
                "binding ip",
                bound,
                opts(),
                vec![t("host:web1:80", "web", "10.1.1.1:8000")],
            ),
            (
                "-internal",
                web(),
                internal.clone(),
                vec![t("host:web1:80", "web", "172.17.0.5:80")],
            ),
            (
                "host network",
                host_net,
                opts(),
                vec![t("host:web1:8080", "web", "192.0.2.2:8080")],
            ),
            (
                "several ports: suffixes, unpublished skipped",
                multi.clone(),
                opts(),
                vec![
                    t("host:web1:80", "web-80", "192.0.2.2:8000"),
                    t("host:web1:443", "web-443", "192.0.2.2:8443"),
                ],
            ),
            (
                "several ports -internal",
                multi.clone(),
                internal,
                vec![
                    t("host:web1:80", "web-80", "172.17.0.5:80"),
                    t("host:web1:443", "web-443", "172.17.0.5:443"),
                    t("host:web1:9000", "web-9000", "172.17.0.5:9000"),
                ],
            ),
            (
                "port-specific name has no suffix, general name does",
                with_env(
                    multi.clone(),
                    &["SERVICE_NAME=app", "SERVICE_443_NAME=secure"],
                ),
                opts(),
                vec![
                    t("host:web1:80", "app-80", "192.0.2.2:8000"),
                    t("host:web1:443", "secure", "192.0.2.2:8443"),
                ],
            ),
            (
                "udp",
                udp,
                opts(),
                vec![t("host:web1:53:udp", "web", "192.0.2.2:5353")],
            ),
            (
                "SERVICE_ID and NAME, label wins over env",
                with_labels(
                    with_env(web(), &["SERVICE_NAME=envname", "SERVICE_ID=x1"]),
                    &[("SERVICE_NAME", "lbl")],
                ),
                opts(),
                vec![t("x1", "lbl", "192.0.2.2:32768")],
            ),
            (
                "ignore",
                with_env(web(), &["SERVICE_IGNORE=1"]),
                opts(),
                vec![],
            ),
            (
                "ignore=yes",
                with_labels(web(), &[("SERVICE_IGNORE", "yes")]),
                opts(),
                vec![],
            ),
            (
                "ignore=false registers",
                with_env(web(), &["SERVICE_IGNORE=false"]),
                opts(),
                vec![t("host:web1:80", "web", "192.0.2.2:32768")],
            ),
            (
                "ignore=0 registers",
                with_env(web(), &["SERVICE_IGNORE=0"]),
                opts(),
                vec![t("host:web1:80", "web", "192.0.2.2:32768")],
            ),
            (
                "port-specific ignore",
                with_env(multi.clone(), &["SERVICE_80_IGNORE=true"]),
                opts(),
                vec![t("host:web1:443", "web-443", "192.0.2.2:8443")],
            ),
            (
                "explicit without name",
                web(),
                DeriveOptions {
                    explicit: true,
                    ..opts()
                },
                vec![],
            ),
            (
                "explicit with name",
                with_env(web(), &["SERVICE_NAME=n"]),
                DeriveOptions {
                    explicit: true,
                    ..opts()
                },
                vec![t("host:web1:80", "n", "192.0.2.2:32768")],
            ),
            (
                "explicit with port name only registers that port",
                with_env(multi, &["SERVICE_443_NAME=s"]),
                DeriveOptions {
                    explicit: true,
                    ..opts()
                },
                vec![t("host:web1:443", "s", "192.0.2.2:8443")],
            ),
            (
                "useIpFromLabel strips the prefix length",
                with_labels(web(), &[("ip", "10.9.9.9/24")]),
                DeriveOptions {
                    use_ip_from_label: Some("ip".into()),
                    ..opts()
                },
                vec![t("host:web1:80", "web", "10.9.9.9:32768")],
            ),
            (
                "useIpFromLabel missing label",
                web(),
                DeriveOptions {
                    use_ip_from_label: Some("ip".into()),
                    ..with_ip
                },
                vec![t("host:web1:80", "web", "127.0.0.1:32768")],
            ),
        ];
        for (what, info, o, want) in cases {
            assert_eq!(summary(&derive(&info, &o)), want, "{what}");
        }
    }

    #[test]
    fn malformed_values_warn_and_still_register() {
        let cases: Vec<(&[&str], &str, &str)> = vec![
            (
                &["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_INTERVAL=abc"],
                "SERVICE_CHECK_INTERVAL",
                "duration",
            ),
            (
                &["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_TIMEOUT=-1"],
                "SERVICE_CHECK_TIMEOUT",
                "duration",
            ),
            (
                &["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_INITIAL_STATUS=ok"],
                "SERVICE_CHECK_INITIAL_STATUS",
                "passing",
            ),
            (&["SERVICE_CHECK_TTL=soon"], "SERVICE_CHECK_TTL", "duration"),
            (&["SERVICE_99999_NAME=x"], "SERVICE_99999_NAME", "port"),
            (&["SERVICE_0_NAME=x"], "SERVICE_0_NAME", "port"),
            (&["SERVICE_CHECK_HTTP=/a b"], "SERVICE_CHECK_HTTP", "path"),
            (
                &["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_HTTPS=/s"],
                "SERVICE_CHECK_HTTPS",
                "SERVICE_CHECK_HTTP is used",
            ),
            (&["SERVICE_FOO.BAR=1"], "SERVICE_FOO.BAR", "key"),
            (&["SERVICE_TAGS=ok,bad\u{7}"], "SERVICE_TAGS", "tags"),
        ];
        for (env, key, expected) in cases {
            let d = derive(&with_env(web(), env), &opts());
            assert_eq!(d.services.len(), 1, "{env:?}");
            assert_eq!(d.services[0].id, "host:web1:80", "{env:?}");
            assert_eq!(d.services[0].name, "web", "{env:?}");
            assert_eq!(d.warnings.len(), 1, "{env:?}: {:?}", d.warnings);
            assert_eq!(d.warnings[0].key, key, "{env:?}");
            assert!(
                d.warnings[0].expected.contains(expected),
                "{env:?}: {:?}",
                d.warnings
            );
        }
        // The check survives without the bad interval.
        let d = derive(
            &with_env(
                web(),
                &["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_INTERVAL=abc"],
            ),
            &opts(),
        );
        let c = d.services[0].check.clone().unwrap();
        assert_eq!(c.interval, None);
        // A general bad key warns once even with several ports.
        let mut multi = with_env(
            web(),
            &["SERVICE_CHECK_TCP=1", "SERVICE_CHECK_INTERVAL=abc"],
        );
        multi.ports.push(port(81, "tcp", &[("0.0.0.0", 1)]));
        assert_eq!(derive(&multi, &opts()).warnings.len(), 1);
        // Both HTTP and HTTPS: HTTP wins, as in gliderlabs, and the warning says so.
        let d = derive(
            &with_env(web(), &["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_HTTPS=/s"]),
            &opts(),
        );
        let c = d.services[0].check.clone().unwrap();
        assert_eq!(c.kind, CheckKind::Http("http://192.0.2.2:32768/h".into()));
    }
}
