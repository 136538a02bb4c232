//! The `SERVICE_CHECK_*` keys -> at most one [`Check`] per service: which kind wins
//! (gliderlabs' precedence), its target URL or argv, and its options (interval, timeout,
//! method, TLS). Nothing from a value reaches a shell or a request line unchecked: paths,
//! methods and gRPC service names are validated, and commands are argv lists.

use super::labels::{flag, truthy, Ctx, PortValues};
use switchboard::{Check, CheckKind};

const PATH_EXPECTED: &str = "a URL path such as /health (no whitespace or control characters)";

/// `addr` as the host part of a URL: IPv6 addresses in brackets.
fn url_host(addr: &str) -> String {
    if addr.contains(':') {
        format!("[{addr}]")
    } else {
        addr.to_string()
    }
}

/// An HTTP method as RFC 9110 spells one: a token (letters, digits and ``!#$%&'*+-.^_`|~``),
/// at most 32 bytes. Consul sends it verbatim in the request line, so nothing else may pass.
fn http_method(v: &str) -> bool {
    (1..=32).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A gRPC service name for `host:port/service`: letters, digits, `.`, `_` and `-`
/// (`grpc.health.v1.Health`, `pkg.Service`), at most 255 bytes.
fn grpc_service(v: &str) -> bool {
    (1..=255).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `SERVICE_CHECK_*`: at most one check, the first kind set in the order HTTP, HTTPS, CMD,
/// script, TTL, TCP, gRPC (gliderlabs' precedence).
pub(super) fn derive_check(
    values: &PortValues,
    container_id: &str,
    address: &str,
    port: u16,
    ctx: &mut Ctx,
) -> Option<Check> {
    let get = |k: &str| values.get(k);
    let path_ok = |p: &str| !p.chars().any(|c| c.is_whitespace() || c.is_control());
    let url = |scheme: &str, path: &str| {
        let sep = if path.starts_with('/') { "" } else { "/" };
        format!("{scheme}://{}:{port}{sep}{path}", url_host(address))
    };
    let mut kind = None;
    if let Some(v) = get("check_http").filter(|v| !v.value.is_empty()) {
        if ctx.check(v, path_ok(&v.value), PATH_EXPECTED).is_some() {
            kind = Some(CheckKind::Http(url("http", &v.value)));
        }
    }
    if let Some(v) = get("check_https").filter(|v| !v.value.is_empty()) {
        if kind.is_some() {
            // Both set: gliderlabs silently used HTTP; say so.
            ctx.warn(
                v,
                "only one of SERVICE_CHECK_HTTP and SERVICE_CHECK_HTTPS \
                 (both are set: SERVICE_CHECK_HTTP is used)",
            );
        } else if ctx.check(v, path_ok(&v.value), PATH_EXPECTED).is_some() {
            kind = Some(CheckKind::Https(url("https", &v.value)));
        }
    }
    if kind.is_none() {
        // Run in the container by the agent (a Consul Docker check), as an argv: the value
        // is split on whitespace, never given to a shell.
        if let Some(v) = get("check_cmd") {
            let args: Vec<String> = v.value.split_whitespace().map(String::from).collect();
            if !args.is_empty() && !container_id.is_empty() {
                kind = Some(CheckKind::Docker {
                    container: container_id.to_string(),
                    args,
                });
            }
        }
    }
    if kind.is_none() {
        if let Some(v) = get("check_script") {
            let port = port.to_string();
            let argv: Vec<String> = v
                .value
                .split_whitespace()
                .map(|a| {
                    a.replace("$SERVICE_IP", address)
                        .replace("$SERVICE_PORT", &port)
                })
                .collect();
            if !argv.is_empty() {
                kind = Some(CheckKind::Script(argv));
            }
        }
    }
    if kind.is_none() {
        if let Some(d) = ctx.duration(get("check_ttl"), true) {
            kind = Some(CheckKind::Ttl(d));
        }
    }
    if kind.is_none() && get("check_tcp").is_some_and(|v| truthy(&v.value)) {
        kind = Some(CheckKind::Tcp(format!("{}:{port}", url_host(address))));
    }
    if kind.is_none() {
        // `true` (gliderlabs' spelling) probes the server as a whole; a gRPC service name
        // asks about that service.
        if let Some(v) = get("check_grpc").filter(|v| truthy(&v.value)) {
            let target = format!("{}:{port}", url_host(address));
            let value = v.value.trim();
            let target = match value.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Some(target),
                _ if grpc_service(value) => Some(format!("{target}/{value}")),
                _ => {
                    ctx.warn(
                        v,
                        "true, or a gRPC service name (letters, digits, '.', '_', '-') to check",
                    );
                    None
                }
            };
            if let Some(target) = target {
                let tls = flag(get("check_grpc_use_tls"), ctx);
                kind = Some(CheckKind::Grpc { target, tls });
            }
        }
    }
    let kind = kind?;
    let method_key = match &kind {
        CheckKind::Http(_) => Some("check_http_method"),
        CheckKind::Https(_) => Some("check_https_method"),
        _ => None,
    };
    let method = method_key.and_then(get).and_then(|v| {
        ctx.check(
            v,
            http_method(&v.value),
            "an HTTP method such as GET, HEAD or POST (a token of at most 32 letters, digits \
             or !#$%&'*+-.^_`|~)",
        )
        .map(|v| v.value.clone())
    });
    let tls = matches!(
        kind,
        CheckKind::Https(_) | CheckKind::Grpc { tls: true, .. }
    );
    let skip = get("check_tls_skip_verify");
    let tls_skip_verify = match skip {
        Some(v) if !tls && flag(Some(v), ctx) => {
            ctx.warn(
                v,
                "SERVICE_CHECK_TLS_SKIP_VERIFY only with SERVICE_CHECK_HTTPS or \
                 SERVICE_CHECK_GRPC_USE_TLS (this check speaks no TLS; ignored)",
            );
            false
        }
        _ => tls && flag(skip, ctx),
    };
    let initial_status = get("check_initial_status").and_then(|v| {
        let ok = matches!(v.value.as_str(), "passing" | "warning" | "critical");
        ctx.check(v, ok, "passing, warning or critical")
            .map(|v| v.value.clone())
    });
    Some(Check {
        kind,
        interval: ctx.duration(get("check_interval"), true),
        timeout: ctx.duration(get("check_timeout"), true),
        initial_status,
        deregister_after: ctx.duration(get("check_deregister_after"), true),
        method,
        tls_skip_verify,
    })
}

#[cfg(test)]
mod tests {
    use crate::derive::derive;
    use crate::derive::fixtures::*;
    use std::time::Duration;
    use switchboard::CheckKind;

    #[test]
    fn checks() {
        let http = |path: &str| CheckKind::Http(format!("http://192.0.2.2:32768{path}"));
        let cases: Vec<(&[&str], Option<CheckKind>)> = vec![
            (&[], None),
            (&["SERVICE_CHECK_HTTP=/health"], Some(http("/health"))),
            (&["SERVICE_CHECK_HTTP=health"], Some(http("/health"))),
            (&["SERVICE_80_CHECK_HTTP=/p"], Some(http("/p"))),
            (
                &["SERVICE_CHECK_HTTPS=/s"],
                Some(CheckKind::Https("https://192.0.2.2:32768/s".into())),
            ),
            (
                &["SERVICE_CHECK_TCP=true"],
                Some(CheckKind::Tcp("192.0.2.2:32768".into())),
            ),
            (&["SERVICE_CHECK_TCP=false"], None),
            (
                &["SERVICE_CHECK_TTL=30s"],
                Some(CheckKind::Ttl(Duration::from_secs(30))),
            ),
            (
                &["SERVICE_CHECK_SCRIPT=check.sh  $SERVICE_IP:$SERVICE_PORT ;rm -rf"],
                Some(CheckKind::Script(vec![
                    "check.sh".into(),
                    "192.0.2.2:32768".into(),
                    ";rm".into(),
                    "-rf".into(),
                ])),
            ),
            (
                &["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_TCP=1"],
                Some(http("/h")),
            ),
            (&["SERVICE_CHECK_INTERVAL=5s"], None),
        ];
        for (env, want) in cases {
            let d = derive(&with_env(web(), env), &opts());
            assert_eq!(
                d.services[0].check.as_ref().map(|c| c.kind.clone()),
                want,
                "{env:?}"
            );
        }
        let d = derive(
            &with_env(
                web(),
                &[
                    "SERVICE_CHECK_HTTP=/h",
                    "SERVICE_CHECK_INTERVAL=1m30s",
                    "SERVICE_CHECK_TIMEOUT=2",
                    "SERVICE_CHECK_INITIAL_STATUS=passing",
                    "SERVICE_CHECK_DEREGISTER_AFTER=10m",
                ],
            ),
            &opts(),
        );
        let c = d.services[0].check.clone().unwrap();
        assert_eq!(c.interval, Some(Duration::from_secs(90)));
        assert_eq!(c.timeout, Some(Duration::from_secs(2)));
        assert_eq!(c.initial_status.as_deref(), Some("passing"));
        assert_eq!(c.deregister_after, Some(Duration::from_secs(600)));
    }

    #[test]
    fn grpc_cmd_method_and_tls_options() {
        let grpc = |target: &str, tls: bool| CheckKind::Grpc {
            target: target.into(),
            tls,
        };
        /// Check labels and the check they make: kind, HTTP method, TLS verification skipped, and the key warned about.
        struct CheckCase<'a> {
            env: &'a [&'a str],
            kind: Option<CheckKind>,
            method: Option<&'a str>,
            tls_skip_verify: bool,
            warned: Option<&'a str>,
        }
        let cases = vec![
            CheckCase {
                env: &["SERVICE_CHECK_GRPC=true"],
                kind: Some(grpc("192.0.2.2:32768", false)),
                method: None,
                tls_skip_verify: false,
                warned: None,
            },
            CheckCase {
                env: &[
                    "SERVICE_CHECK_GRPC=grpc.health.v1.Health",
                    "SERVICE_CHECK_GRPC_USE_TLS=1",
                ],
                kind: Some(grpc("192.0.2.2:32768/grpc.health.v1.Health", true)),
                method: None,
                tls_skip_verify: false,
                warned: None,
            },
            CheckCase {
                env: &[
                    "SERVICE_CHECK_GRPC=true",
                    "SERVICE_CHECK_GRPC_USE_TLS=true",
                    "SERVICE_CHECK_TLS_SKIP_VERIFY=true",
                ],
                kind: Some(grpc("192.0.2.2:32768", true)),
                method: None,
                tls_skip_verify: true,
                warned: None,
            },
            CheckCase {
                env: &["SERVICE_CHECK_GRPC=false"],
                kind: None,
                method: None,
                tls_skip_verify: false,
                warned: None,
            },
            CheckCase {
                env: &["SERVICE_CHECK_GRPC=a/b"],
                kind: None,
                method: None,
                tls_skip_verify: false,
                warned: Some("SERVICE_CHECK_GRPC"),
            },
            CheckCase {
                env: &[
                    "SERVICE_CHECK_GRPC=true",
                    "SERVICE_CHECK_GRPC_USE_TLS=maybe",
                ],
                kind: Some(grpc("192.0.2.2:32768", false)),
                method: None,
                tls_skip_verify: false,
                warned: Some("SERVICE_CHECK_GRPC_USE_TLS"),
            },
            CheckCase {
                env: &["SERVICE_CHECK_HTTP=/h", "SERVICE_CHECK_HTTP_METHOD=HEAD"],
                kind: Some(CheckKind::Http("http://192.0.2.2:32768/h".into())),
                method: Some("HEAD"),
                tls_skip_verify: false,
                warned: None,
            },
            CheckCase {
                env: &[
                    "SERVICE_CHECK_HTTP=/h",
                    "SERVICE_CHECK_HTTP_METHOD=GET /x HTTP/1.1\r\n",
                ],
                kind: Some(CheckKind::Http("http://192.0.2.2:32768/h".into())),
                method: None,
                tls_skip_verify: false,
                warned: Some("SERVICE_CHECK_HTTP_METHOD"),
            },
            // The HTTPS check reads its own method key, not HTTP's.
            CheckCase {
                env: &[
                    "SERVICE_CHECK_HTTPS=/s",
                    "SERVICE_CHECK_HTTP_METHOD=PUT",
                    "SERVICE_CHECK_HTTPS_METHOD=POST",
                    "SERVICE_CHECK_TLS_SKIP_VERIFY=yes",
                ],
                kind: Some(CheckKind::Https("https://192.0.2.2:32768/s".into())),
                method: Some("POST"),
                tls_skip_verify: true,
                warned: None,
            },
            CheckCase {
                env: &[
                    "SERVICE_CHECK_HTTP=/h",
                    "SERVICE_CHECK_TLS_SKIP_VERIFY=true",
                ],
                kind: Some(CheckKind::Http("http://192.0.2.2:32768/h".into())),
                method: None,
                tls_skip_verify: false,
                warned: Some("SERVICE_CHECK_TLS_SKIP_VERIFY"),
            },
            CheckCase {
                env: &["SERVICE_CHECK_CMD=test -f /tmp/ok;reboot $(id)"],
                kind: Some(CheckKind::Docker {
                    container: "abc".into(),
                    args: vec![
                        "test".into(),
                        "-f".into(),
                        "/tmp/ok;reboot".into(),
                        "$(id)".into(),
                    ],
                }),
                method: None,
                tls_skip_verify: false,
                warned: None,
            },
            // gliderlabs' order: CMD before script.
            CheckCase {
                env: &["SERVICE_CHECK_SCRIPT=/bin/x", "SERVICE_CHECK_CMD=true"],
                kind: Some(CheckKind::Docker {
                    container: "abc".into(),
                    args: vec!["true".into()],
                }),
                method: None,
                tls_skip_verify: false,
                warned: None,
            },
        ];
        for CheckCase {
            env,
            kind,
            method,
            tls_skip_verify: skip,
            warned,
        } in cases
        {
            let d = derive(&with_env(web(), env), &opts());
            let check = d.services[0].check.clone();
            assert_eq!(check.as_ref().map(|c| c.kind.clone()), kind, "{env:?}");
            assert_eq!(
                check.as_ref().and_then(|c| c.method.as_deref()),
                method,
                "{env:?}"
            );
            assert_eq!(check.is_some_and(|c| c.tls_skip_verify), skip, "{env:?}");
            let keys: Vec<&str> = d.warnings.iter().map(|w| w.key.as_str()).collect();
            assert_eq!(keys, warned.into_iter().collect::<Vec<_>>(), "{env:?}");
            // None of these keys is ever metadata.
            assert!(d.services[0].meta.is_empty(), "{env:?}");
        }
    }
}
