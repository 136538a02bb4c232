//! Service names and IDs: the default name from the image (`-<port>` suffixed when a
//! container has several ports), `SERVICE_NAME` and `SERVICE_ID`, the default ID
//! `<hostname>:<container>:<port>[:udp]`, the checks every store needs a name and an ID to
//! pass, and one registration per ID across containers ([`claim_ids`]).
//!
//! A name or ID that cannot be used refuses that service (that port) alone, with a warning:
//! registering it under another name would put it behind the wrong proxy entry.

use super::input::{ContainerInfo, ContainerPort, DeriveOptions};
use super::labels::{Ctx, PortValues, Warning};
use std::collections::BTreeMap;
use switchboard::{excerpt, validate, Service};

/// The default service name: the image's last path segment without tag or digest
/// (`reg:5000/team/web:1.2@sha256:...` -> `web`). `None` when the container was created
/// from an image ID (`sha256:<hex>`, or the bare 64-hex-digit ID), which names no service:
/// gliderlabs registered all of those under the name `sha256`, one service for unrelated
/// containers.
pub fn image_basename(image: &str) -> Option<String> {
    if is_image_id(image) {
        return None;
    }
    let no_digest = image.split('@').next().unwrap_or(image);
    let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
    let name = last.split(':').next().unwrap_or(last);
    (!name.is_empty()).then(|| name.to_string())
}

/// `sha256:<hex>` or 64 hex digits: an image ID, as `docker run` accepts one.
fn is_image_id(image: &str) -> bool {
    let hex = image.strip_prefix("sha256:").unwrap_or(image);
    let all_hex = !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit());
    all_hex && (hex.len() == 64 || image.starts_with("sha256:"))
}

/// Checks a service name or ID: [`switchboard::validate`]'s rules (what every store accepts
/// and can address again), plus one of the registrator's own: no whitespace. Stores accept
/// spaces, but a label value with one is never a name anybody meant (and it breaks Consul
/// DNS), so it is refused here as gliderlabs users would expect. On failure: what would have
/// been accepted, and what is wrong with this value.
fn check_name(field: validate::Field, value: &str) -> Result<(), String> {
    let checked = match field {
        validate::Field::Name => validate::service_name(value),
        validate::Field::Id => validate::service_id(value),
    };
    let problem = match checked {
        Err(e) => e.problem.to_string(),
        Ok(()) if value.chars().any(char::is_whitespace) => "it contains whitespace".into(),
        Ok(()) => return Ok(()),
    };
    Err(format!(
        "a {field} of 1 to {} bytes, not only dots, without '/', whitespace or control \
         characters ({problem}); not registered",
        field.max()
    ))
}

/// What a service is called and the ID it is registered under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Identity {
    /// The service name.
    pub(super) name: String,
    /// The service ID.
    pub(super) id: String,
}

/// Names the services of one container, port by port.
pub(super) struct Naming<'a> {
    info: &'a ContainerInfo,
    opts: &'a DeriveOptions,
    /// The image's basename, else (an image ID) the container's name.
    default_name: String,
    /// Several ports: a name not given for the port alone gets a `-<port>` suffix.
    group: bool,
    /// The image-ID warning is given once per container, not once per port.
    image_id_warned: bool,
}

impl<'a> Naming<'a> {
    /// Names the services of `info`, which has `ports` service ports.
    pub(super) fn new(info: &'a ContainerInfo, opts: &'a DeriveOptions, ports: usize) -> Self {
        // An image referenced by ID names nothing; the container's name stands in (a warning
        // says so, once, unless every port has a name of its own).
        let default_name = image_basename(&info.image).unwrap_or_else(|| info.name.clone());
        Naming {
            info,
            opts,
            default_name,
            group: ports > 1,
            image_id_warned: false,
        }
    }

    /// The name and ID of the service at container port `exposed`. `None`: no service for
    /// this port, either under `-explicit` without a name, or (warned) because its name or ID
    /// cannot be used.
    pub(super) fn identify(
        &mut self,
        exposed: &ContainerPort,
        values: &PortValues,
        ctx: &mut Ctx,
    ) -> Option<Identity> {
        let (info, opts) = (self.info, self.opts);
        let named = match values.get("name") {
            None => None,
            Some(v) => match check_name(validate::Field::Name, &v.value) {
                Ok(()) => Some(v),
                Err(expected) => {
                    ctx.warn(v, &expected);
                    return None;
                }
            },
        };
        if opts.explicit && named.is_none() {
            return None;
        }
        if named.is_none() && !self.image_id_warned && image_basename(&info.image).is_none() {
            self.image_id_warned = true;
            ctx.warnings.push(Warning {
                key: "image".into(),
                value: excerpt(&info.image).to_string(),
                expected: format!(
                    "an image name to name the service after (the container was created from \
                     an image ID): registered under the container name {:?}; set SERVICE_NAME",
                    excerpt(&info.name).to_string()
                ),
            });
        }
        let mut name = named.map_or_else(|| self.default_name.clone(), |v| v.value.clone());
        if self.group && !values.own().contains_key("name") {
            name = format!("{name}-{}", exposed.port);
        }
        let id = match values.get("id") {
            Some(v) => match check_name(validate::Field::Id, &v.value) {
                Ok(()) => v.value.clone(),
                Err(expected) => {
                    ctx.warn(v, &expected);
                    return None;
                }
            },
            None => {
                let mut id = format!("{}:{}:{}", opts.hostname, info.name, exposed.port);
                if exposed.proto == "udp" {
                    id.push_str(":udp");
                }
                id
            }
        };
        // What was composed (an image name with a port suffix, a default ID) must pass too.
        if let Err(e) = validate::service_name(&name).and_then(|()| validate::service_id(&id)) {
            ctx.warnings.push(Warning {
                key: format!("derived {}", e.field),
                value: excerpt(if e.field == validate::Field::Name {
                    &name
                } else {
                    &id
                })
                .to_string(),
                expected: format!("{} ({}); not registered", e.field.expected(), e.problem),
            });
            return None;
        }
        Some(Identity { name, id })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateId {
    /// The ID.
    pub id: String,
    /// The container (ID) whose service is registered under it.
    pub kept: String,
    /// The other containers asking for it: their service with this ID is not registered.
    pub refused: Vec<String>,
}

/// The outcome of [`claim_ids`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    /// The services to register, by ID: one per ID.
    pub services: BTreeMap<String, Service>,
    /// Which container holds each ID: pass it to the next call.
    pub owners: BTreeMap<String, String>,
    /// IDs asked for by several containers, sorted by ID.
    pub duplicates: Vec<DuplicateId>,
}

/// One registration per service ID, from every container's derived services.
///
/// Every store holds one registration per ID, so two containers with the same `SERVICE_ID`
/// would overwrite each other, the last one inspected silently winning. Here the winner is
/// stable: the container that held the ID last time (`owners`, from the previous call) keeps
/// it, so a newcomer never takes over a live registration; with no holder, the container
/// whose ID sorts first. When the holder goes, another claimant takes over on the next call.
/// The caller warns once per duplicate, naming the containers. Linear in the number of
/// services (plus a sort of the duplicates).
pub fn claim_ids<'a>(
    containers: impl IntoIterator<Item = (&'a str, &'a [Service])>,
    owners: &BTreeMap<String, String>,
) -> Claims {
    let mut claimants: BTreeMap<&str, Vec<(&str, &Service)>> = BTreeMap::new();
    for (container, services) in containers {
        for svc in services {
            claimants
                .entry(svc.id.as_str())
                .or_default()
                .push((container, svc));
        }
    }
    let mut out = Claims::default();
    for (id, mut by) in claimants {
        by.sort_by(|a, b| a.0.cmp(b.0));
        by.dedup_by(|a, b| a.0 == b.0);
        let held = owners.get(id).map(String::as_str);
        let winner = by.iter().position(|(c, _)| Some(*c) == held).unwrap_or(0);
        let (container, svc) = by[winner];
        out.services.insert(id.to_string(), svc.clone());
        out.owners.insert(id.to_string(), container.to_string());
        if by.len() > 1 {
            out.duplicates.push(DuplicateId {
                id: id.to_string(),
                kept: container.to_string(),
                refused: by
                    .iter()
                    .filter(|(c, _)| *c != container)
                    .map(|(c, _)| c.to_string())
                    .collect(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::derive::derive;
    use crate::derive::fixtures::*;
    use crate::derive::DeriveOptions;

    #[test]
    fn image_basenames() {
        let cases = [
            ("web", "web"),
            ("web:1.2", "web"),
            ("team/web", "web"),
            ("a.b:5000/x/web:1.2@sha256:0123", "web"),
            ("a.b:5000/web", "web"),
            ("web@sha256:0123", "web"),
        ];
        for (image, want) in cases {
            assert_eq!(image_basename(image).as_deref(), Some(want), "{image}");
        }
        let id = "0123456789abcdef".repeat(4);
        for image in [format!("sha256:{id}"), id.clone(), "sha256:0123".into()] {
            assert_eq!(image_basename(&image), None, "{image}");
        }
        // A short hex name may be a real image name: it stays one.
        assert_eq!(image_basename("cafe").as_deref(), Some("cafe"));
    }

    #[test]
    fn image_id_names_the_service_after_the_container() {
        let mut c = web();
        c.image = format!("sha256:{}", "ab".repeat(32));
        let d = derive(&c, &opts());
        assert_eq!(
            summary(&d),
            vec![(
                "host:web1:80".into(),
                "web1".into(),
                "192.0.2.2:32768".into()
            )]
        );
        assert_eq!(d.warnings.len(), 1, "{:?}", d.warnings);
        assert_eq!(d.warnings[0].key, "image");
        assert!(
            d.warnings[0].expected.contains("SERVICE_NAME"),
            "{:?}",
            d.warnings
        );
        // With SERVICE_NAME there is nothing to warn about.
        let d = derive(&with_env(c, &["SERVICE_NAME=api"]), &opts());
        assert_eq!(d.services[0].name, "api");
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
    }

    #[test]
    fn unusable_names_and_ids_refuse_that_service_only() {
        let long = format!("SERVICE_NAME={}", "n".repeat(256));
        let huge_id = format!("SERVICE_ID={}", "i".repeat(513));
        // (env, key warned about, words of the warning, IDs still registered)
        type Case<'a> = (Vec<&'a str>, &'a str, &'a str, Vec<&'a str>);
        let cases: Vec<Case> = vec![
            (
                vec!["SERVICE_NAME=."],
                "SERVICE_NAME",
                "(it is only dots)",
                vec![],
            ),
            (
                vec!["SERVICE_NAME=.."],
                "SERVICE_NAME",
                "(it is only dots)",
                vec![],
            ),
            (
                vec!["SERVICE_NAME=a/b"],
                "SERVICE_NAME",
                "(it contains '/')",
                vec![],
            ),
            (
                vec!["SERVICE_NAME=a b"],
                "SERVICE_NAME",
                "(it contains whitespace)",
                vec![],
            ),
            (
                vec!["SERVICE_NAME=a\tb"],
                "SERVICE_NAME",
                "(it contains a control",
                vec![],
            ),
            (vec![&long], "SERVICE_NAME", "(it has 256 bytes", vec![]),
            (
                vec!["SERVICE_ID=.."],
                "SERVICE_ID",
                "(it is only dots)",
                vec![],
            ),
            (
                vec!["SERVICE_ID=has space"],
                "SERVICE_ID",
                "(it contains whitespace)",
                vec![],
            ),
            (vec![&huge_id], "SERVICE_ID", "(it has 513 bytes", vec![]),
            (
                vec!["SERVICE_80_NAME=.."],
                "SERVICE_80_NAME",
                "(it is only dots)",
                vec!["host:web1:443"],
            ),
            (
                vec!["SERVICE_443_ID=.", "SERVICE_NAME=app"],
                "SERVICE_443_ID",
                "(it is only dots)",
                vec!["host:web1:80"],
            ),
        ];
        for (env, key, words, ids) in cases {
            let d = derive(&with_env(two_ports(), &env), &opts());
            let got: Vec<&str> = d.services.iter().map(|s| s.id.as_str()).collect();
            assert_eq!(got, ids, "{key}: {:?}", d.warnings);
            assert_eq!(d.warnings.len(), 1, "{key}: {:?}", d.warnings);
            let w = &d.warnings[0];
            assert_eq!(w.key, key);
            assert!(w.expected.contains(words), "{key}: {w:?}");
            assert!(w.expected.contains("not registered"), "{key}: {w:?}");
            assert!(w.value.len() < 100, "{key}: value not shortened: {w:?}");
        }
        // A derived name that grows too long with its port suffix is refused too.
        let mut c = two_ports();
        c.image = "i".repeat(253);
        let d = derive(&c, &opts());
        assert!(d.services.is_empty(), "{:?}", d.services);
        assert_eq!(d.warnings[0].key, "derived service name");
        // -explicit with an unusable name: nothing, and a warning.
        let d = derive(
            &with_env(web(), &["SERVICE_NAME=.."]),
            &DeriveOptions {
                explicit: true,
                ..opts()
            },
        );
        assert!(d.services.is_empty());
        assert_eq!(d.warnings.len(), 1);
    }

    fn svc(id: &str, port: u16) -> Service {
        Service {
            id: id.into(),
            name: "web".into(),
            address: "10.0.0.1".into(),
            port,
            tags: vec![],
            meta: Default::default(),
            check: None,
            ttl: None,
            docker_health: None,
        }
    }

    #[test]
    fn duplicate_ids_keep_their_holder() {
        let a = vec![svc("shared", 1), svc("a:80", 2)];
        let b = vec![svc("shared", 3)];
        let c = vec![svc("shared", 4), svc("c:80", 5)];
        let all = || {
            vec![
                ("ccc", c.as_slice()),
                ("aaa", a.as_slice()),
                ("bbb", b.as_slice()),
            ]
        };
        let owners = |held: &str| -> BTreeMap<String, String> {
            [("shared".to_string(), held.to_string())].into()
        };
        // (holder from the previous call, expected winner and its port)
        let cases = [
            ("", "aaa", 1),
            ("bbb", "bbb", 3),
            ("ccc", "ccc", 4),
            ("gone", "aaa", 1),
        ];
        for (held, winner, port) in cases {
            let got = claim_ids(all(), &owners(held));
            assert_eq!(got.services.len(), 3, "{held}");
            assert_eq!(got.services["shared"].port, port, "{held}");
            assert_eq!(got.owners["shared"], winner, "{held}");
            assert_eq!(got.owners["c:80"], "ccc");
            assert_eq!(got.duplicates.len(), 1, "{held}");
            let dup = &got.duplicates[0];
            assert_eq!((dup.id.as_str(), dup.kept.as_str()), ("shared", winner));
            assert_eq!(dup.refused.len(), 2, "{held}");
            assert!(!dup.refused.contains(&winner.to_string()));
        }
        // No duplicates: nothing to report.
        let got = claim_ids(vec![("aaa", a.as_slice())], &BTreeMap::new());
        assert!(got.duplicates.is_empty());
        assert_eq!(got.services.len(), 2);
    }
}
