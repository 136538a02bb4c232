//! The command line: gliderlabs/registrator's flags, Go style included.
//!
//! gliderlabs parses its flags with Go's `flag` package, so deployments write `-ip 1.2.3.4`,
//! `-ip=1.2.3.4`, `-internal` or `-internal=true`. clap wants `--ip`; [`GoFlags`], built from
//! [`Cli`]'s own arguments, rewrites the Go forms first, so existing command lines keep
//! working unchanged. A bool flag never takes the next argument as its value (only `=value`):
//! the registry URI follows the flags.

use crate::config::{Config, Deregister};
use crate::derive::LabelMatch;
use clap::{CommandFactory, Parser};
use std::time::Duration;
use switchboard::telemetry::{parse_listen_addr, LogFormat};
use switchboard::{GoFlags, RegistryUri};

const URI_EXPECTED: &str = "expected consul://host:port, consulkv://host:port/prefix or \
     etcd://host:port[,host:port...]/prefix (consul-tls://, consulkv-tls://, etcds:// for HTTPS)";

/// The positional argument and the environment, written out: clap would show the URI as
/// `[URI]...` (it is collected as a list only to name an extra argument in the error).
const HELP_TEMPLATE: &str = "\
{about}

Usage: {usage}

Arguments:
  URI  The registry, one of:
         consul://host:port                    services with checks, via that Consul agent
         consulkv://host:port/prefix           KV <prefix>/<name>/<id> = ip:port
         etcd://host:port[,host:port...]/prefix  keys /<prefix>/<name>/<id> (JSON), etcd v3
       consul-tls://, consulkv-tls:// and etcds:// are the same over HTTPS;
         consul-unix:///path/consul.sock, consulkv-unix:///path/consul.sock:/prefix
         through the agent's unix socket.

{all-args}

Environment:
  DOCKER_HOST      the Docker engine (default: /var/run/docker.sock, else /tmp/docker.sock);
                   tcp:// with DOCKER_TLS_VERIFY and DOCKER_CERT_PATH for TLS
  RUST_LOG         log level (default info; logs go to stderr)
  REGISTRATOR_LABEL_FILTER  one --label-filter, when no flag gives one
  REGISTRATOR_SCOPE_LABEL   --scope-label, when the flag is not given (empty: none)
  CONSUL_CACERT, CONSUL_CAPATH, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY, CONSUL_TLS_SERVER_NAME,
  CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE, ETCDCTL_CACERT, ETCDCTL_CERT, ETCDCTL_KEY,
  ETCDCTL_USER, ETCDCTL_PASSWORD, ETCDCTL_PASSWORD_FILE
                   TLS and credentials for the store (see the README)
";

/// Registers published Docker container ports as services in Consul or etcd.
///
/// A drop-in for gliderlabs/registrator: the same flags (Go-style `-flag` works), the same
/// `SERVICE_*` environment variables and labels.
#[derive(Debug, Parser)]
#[command(
    name = "registrator",
    disable_version_flag = true,
    args_override_self = true,
    override_usage = "registrator [options] URI",
    help_template = HELP_TEMPLATE
)]
struct Cli {
    /// IP address to register published ports with (default: the port's host binding, else
    /// this host's primary address).
    #[arg(long, value_name = "ADDR")]
    ip: Option<String>,
    /// Register exposed ports with the container's own IP and port instead of published ports.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          default_value = "false", value_parser = parse_go_bool, value_name = "BOOL")]
    internal: bool,
    /// Only register containers that set SERVICE_NAME (or SERVICE_<port>_NAME).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          default_value = "false", value_parser = parse_go_bool, value_name = "BOOL")]
    explicit: bool,
    /// Comma-separated tags appended to every service.
    #[arg(long, value_name = "TAGS", default_value = "")]
    tags: String,
    /// TTL of registrations in seconds; 0 disables TTLs.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    ttl: u64,
    /// How often to refresh TTL registrations, in seconds (0 with -ttl: half the TTL).
    #[arg(long = "ttl-refresh", value_name = "SECS", default_value_t = 0)]
    ttl_refresh: u64,
    /// Re-list every container this often, in seconds; 0 disables it.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    resync: u64,
    /// When to deregister a stopped container's services: always or on-success.
    #[arg(long, value_name = "MODE", default_value = "always")]
    deregister: String,
    /// Extra attempts to reach the store at start (0: exit at once if it does not answer, so
    /// start the store first or give a count); -1 retries forever.
    #[arg(
        long = "retry-attempts",
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    retry_attempts: i64,
    /// Wait between those attempts, in milliseconds.
    #[arg(long = "retry-interval", value_name = "MS", default_value_t = 2000)]
    retry_interval: u64,
    /// Remove this host's registrations that no running container backs.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          default_value = "false", value_parser = parse_go_bool, value_name = "BOOL")]
    cleanup: bool,
    /// Take each service's address from this container label (a CIDR suffix is dropped).
    #[arg(long = "useIpFromLabel", value_name = "LABEL")]
    use_ip_from_label: Option<String>,
    /// With -internal: register each container's address on this Docker network, for
    /// containers on several (not in gliderlabs; a container's SERVICE_NETWORK wins).
    #[arg(long, value_name = "NAME")]
    network: Option<String>,
    /// Host identity: the first part of every service ID and the scope of `-cleanup` (not in
    /// gliderlabs; default: this host's name). Lets several registrators share one machine,
    /// e.g. one per Docker engine, without removing each other's services.
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
    /// Only register containers with this label (`KEY`) or label value (`KEY=VALUE`), e.g.
    /// one compose project: `com.docker.compose.project=shop`. Repeat it: a container must
    /// match every one (not in gliderlabs). REGISTRATOR_LABEL_FILTER gives one when no flag
    /// does (empty: none), so a compose file can pass it through.
    #[arg(
        long = "label-filter",
        value_name = "KEY[=VALUE]",
        env = "REGISTRATOR_LABEL_FILTER"
    )]
    label_filter: Vec<String>,
    /// Only register containers whose label KEY has the value it has on registrator's own
    /// container, e.g. `com.docker.compose.project`: a registrator started by a compose
    /// project registers that project only (not in gliderlabs). Registrator must run in a
    /// container carrying the label; otherwise it stops at start, saying so.
    /// REGISTRATOR_SCOPE_LABEL gives it when the flag does not (empty: none).
    #[arg(
        long = "scope-label",
        value_name = "KEY",
        env = "REGISTRATOR_SCOPE_LABEL"
    )]
    scope_label: Option<String>,
    /// Print the version and exit.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          default_value = "false", value_parser = parse_go_bool, value_name = "BOOL")]
    version: bool,
    /// Deregister every service on SIGTERM/SIGINT (not in gliderlabs). By default
    /// registrations stay and the next registrator adopts them, so a registrator restart never
    /// takes a running container out of the load balancer.
    #[arg(long = "deregister-on-exit", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = parse_go_bool,
          value_name = "BOOL")]
    deregister_on_exit: bool,
    /// Accepted for old command lines; leaving registrations in place is now the default.
    #[arg(long = "keep-on-exit", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", value_parser = parse_go_bool,
          value_name = "BOOL")]
    keep_on_exit: bool,
    /// How often to list the store and restore registrations it lost, in seconds.
    #[arg(
        long = "verify-interval",
        value_name = "SECS",
        default_value_t = 5.0,
        hide = true
    )]
    verify_interval: f64,
    /// Serve GET /metrics (Prometheus) and GET /healthz on this address (not in gliderlabs;
    /// default: off).
    #[arg(long = "metrics-addr", value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
    /// Log format on stderr: text or json (one JSON object per line).
    #[arg(long = "log-format", value_name = "FORMAT", default_value = "text")]
    log_format: String,
    /// Ask a running registrator's /healthz at URL and exit 0 if healthy, 1 if not (for
    /// container healthchecks); nothing else runs.
    #[arg(long, value_name = "URL")]
    healthcheck: Option<String>,
    /// Registry URI (described in the help template's Arguments section).
    #[arg(value_name = "URI", hide = true)]
    uri: Vec<String>,
}

/// Why the command line does not lead to a run: help or version (exit 0, stdout) or a bad
/// argument (exit 2, one line on stderr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliExit {
    /// Process exit status.
    pub code: i32,
    /// What to print: stdout for status 0, stderr otherwise.
    pub message: String,
}

impl CliExit {
    fn usage(message: String) -> CliExit {
        CliExit { code: 2, message }
    }
}

/// Go's `strconv.ParseBool`, which `flag` uses for `-x=value`.
fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err("expected true or false".to_string()),
    }
}

/// The Go-style flags of [`Cli`].
fn go_flags() -> GoFlags {
    GoFlags::of(&Cli::command())
}

/// The URL of `--healthcheck URL`, when the command line asks for a health probe instead of
/// a run.
pub fn healthcheck_url<I: IntoIterator<Item = String>>(argv: I) -> Option<String> {
    go_flags()
        .normalise(argv)
        .into_iter()
        .rev()
        .find_map(|a| a.strip_prefix("--healthcheck=").map(String::from))
}

/// Parses `argv` (program name first) into a [`Config`].
pub fn parse<I: IntoIterator<Item = String>>(argv: I, hostname: &str) -> Result<Config, CliExit> {
    let argv: Vec<String> = argv.into_iter().collect();
    let cli = match Cli::try_parse_from(go_flags().normalise(argv.clone())) {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                return Err(CliExit {
                    code: 0,
                    message: e.to_string(),
                });
            }
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            let first = first.strip_prefix("error: ").unwrap_or(first);
            let first = GoFlags::as_typed(first, &argv);
            return Err(CliExit::usage(format!("{first} (see --help)")));
        }
    };
    if cli.version {
        return Err(CliExit {
            code: 0,
            message: format!("registrator {}", switchboard::VERSION),
        });
    }
    let uri = match cli.uri.as_slice() {
        [] => {
            return Err(CliExit::usage(format!(
                "missing registry URI: {URI_EXPECTED}"
            )))
        }
        [one] => RegistryUri::parse(one).map_err(|e| CliExit::usage(e.to_string()))?,
        [_, extra @ ..] => {
            return Err(CliExit::usage(format!(
                "unexpected argument {:?} after the registry URI: flags go before it",
                extra[0]
            )))
        }
    };
    let deregister = match cli.deregister.as_str() {
        "always" => Deregister::Always,
        "on-success" => Deregister::OnSuccess,
        other => {
            return Err(CliExit::usage(format!(
                "invalid value {other:?} for -deregister: expected always or on-success"
            )))
        }
    };
    if let Some(ip) = &cli.ip {
        if ip.parse::<std::net::IpAddr>().is_err() {
            return Err(CliExit::usage(format!(
                "invalid value {ip:?} for -ip: expected an IP address"
            )));
        }
    }
    let ttl = (cli.ttl > 0).then(|| Duration::from_secs(cli.ttl));
    let ttl_refresh = match (cli.ttl, cli.ttl_refresh) {
        (0, 0) => Duration::ZERO,
        (0, _) => return Err(CliExit::usage("-ttl-refresh needs -ttl".into())),
        (t, 0) => Duration::from_millis(t * 500).max(Duration::from_secs(1)),
        (t, r) if r >= t => {
            return Err(CliExit::usage(format!(
                "invalid value {r} for -ttl-refresh: expected less than -ttl ({t})"
            )))
        }
        (_, r) => Duration::from_secs(r),
    };
    let retry_attempts = match cli.retry_attempts {
        -1 => None,
        n if n >= 0 => Some(u32::try_from(n).unwrap_or(u32::MAX)),
        n => {
            return Err(CliExit::usage(format!(
                "invalid value {n} for -retry-attempts: expected -1 (forever) or a count >= 0"
            )))
        }
    };
    if !(cli.verify_interval.is_finite() && cli.verify_interval > 0.0) {
        return Err(CliExit::usage(format!(
            "invalid value {} for --verify-interval: expected seconds > 0",
            cli.verify_interval
        )));
    }
    if cli.keep_on_exit && cli.deregister_on_exit {
        return Err(CliExit::usage(
            "--keep-on-exit contradicts --deregister-on-exit: choose one".into(),
        ));
    }
    let hostname = match cli.hostname {
        None => hostname.to_string(),
        Some(h) if valid_host_identity(&h) => h,
        Some(h) => {
            return Err(CliExit::usage(format!(
                "invalid value {h:?} for -hostname: expected a name without ':', '/' or spaces"
            )))
        }
    };
    let metrics_addr = match &cli.metrics_addr {
        Some(a) => Some(parse_listen_addr("--metrics-addr", a).map_err(CliExit::usage)?),
        None => None,
    };
    let log_format = LogFormat::parse(&cli.log_format).map_err(CliExit::usage)?;
    let label_filter = cli
        .label_filter
        .iter()
        .filter(|f| !f.is_empty())
        .map(|f| LabelMatch::parse(f))
        .collect::<Result<Vec<_>, _>>()
        .map_err(CliExit::usage)?;
    let scope_label = match cli.scope_label.filter(|k| !k.is_empty()) {
        Some(k) if k.contains('=') || k.chars().any(char::is_whitespace) => {
            return Err(CliExit::usage(format!(
                "invalid value {k:?} for -scope-label: expected a label key (no '=' or spaces; the value is read from registrator's own container)"
            )))
        }
        k => k,
    };
    Ok(Config {
        uri,
        metrics_addr,
        log_format,
        ip: cli.ip,
        internal: cli.internal,
        explicit: cli.explicit,
        tags: crate::derive::split_tags(&cli.tags),
        ttl,
        ttl_refresh,
        resync: (cli.resync > 0).then(|| Duration::from_secs(cli.resync)),
        deregister,
        retry_attempts,
        retry_interval: Duration::from_millis(cli.retry_interval),
        cleanup: cli.cleanup,
        use_ip_from_label: cli.use_ip_from_label.filter(|l| !l.is_empty()),
        network: cli.network.filter(|n| !n.is_empty()),
        deregister_on_exit: cli.deregister_on_exit,
        verify_interval: Duration::from_secs_f64(cli.verify_interval),
        hostname,
        label_filter,
        scope_label,
    })
}

/// A host identity must stay the first field of `<hostname>:<container>:<port>` IDs and a
/// clean key segment in etcd, so `-cleanup`'s prefix match cannot reach another host's IDs.
fn valid_host_identity(h: &str) -> bool {
    !h.is_empty() && !h.contains([':', '/']) && !h.chars().any(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        std::iter::once("registrator")
            .chain(s.split_whitespace())
            .map(String::from)
            .collect()
    }

    #[test]
    fn telemetry_flags() {
        let c = parse(
            argv("-metrics-addr 127.0.0.1:9101 -log-format=json consul://h:8500"),
            "host",
        )
        .unwrap();
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9101".parse().unwrap()));
        assert_eq!(c.log_format, LogFormat::Json);
        let c = parse(argv("consul://h:8500"), "host").unwrap();
        assert_eq!((c.metrics_addr, c.log_format), (None, LogFormat::Text));
        for (bad, flag) in [
            ("--metrics-addr 9101 consul://h", "--metrics-addr"),
            ("--log-format yaml consul://h", "--log-format"),
        ] {
            let e = parse(argv(bad), "host").unwrap_err();
            assert!(e.code == 2 && e.message.contains(flag), "{bad}: {e:?}");
        }
        assert_eq!(
            healthcheck_url(argv("-healthcheck http://127.0.0.1:9101/healthz")),
            Some("http://127.0.0.1:9101/healthz".into())
        );
        assert_eq!(healthcheck_url(argv("-ip 1.2.3.4 consul://h")), None);
    }

    #[test]
    fn normalises_go_style_flags() {
        let cases = [
            ("-ip 1.2.3.4 consul://h", "--ip=1.2.3.4 consul://h"),
            ("-ip=1.2.3.4 consul://h", "--ip=1.2.3.4 consul://h"),
            ("--ip 1.2.3.4 consul://h", "--ip=1.2.3.4 consul://h"),
            ("-internal consul://h", "--internal consul://h"),
            ("-internal=true consul://h", "--internal=true consul://h"),
            ("-internal=false consul://h", "--internal=false consul://h"),
            ("-ttl-refresh 10 -ttl 20 x", "--ttl-refresh=10 --ttl=20 x"),
            ("-useIpFromLabel lbl x", "--useIpFromLabel=lbl x"),
            ("-retry-attempts -1 x", "--retry-attempts=-1 x"),
            ("-cleanup -explicit x", "--cleanup --explicit x"),
            ("-version", "--version"),
            ("-h", "-h"),
            ("-bogus x", "--bogus x"),
            ("-1 x", "-1 x"),
            ("x -- -ip", "x -- -ip"),
            ("-ip", "--ip"),
            ("- x", "- x"),
        ];
        for (input, want) in cases {
            assert_eq!(
                go_flags().normalise(argv(input))[1..].join(" "),
                want,
                "{input}"
            );
        }
    }

    #[test]
    fn every_long_flag_is_normalised_from_its_single_dash_form() {
        let names = GoFlags::verify(&Cli::command()).unwrap_or_else(|p| panic!("{p:#?}"));
        for flag in [
            "ip",
            "internal",
            "useIpFromLabel",
            "retry-attempts",
            "version",
            "help",
        ] {
            assert!(names.iter().any(|n| n == flag), "-{flag}: {names:?}");
        }
    }

    #[test]
    fn parses_gliderlabs_command_lines() {
        let c = parse(
            argv("-ip=127.0.0.1 -internal -tags a,b -ttl 30 -resync 60 consul://h:8500"),
            "host",
        )
        .unwrap();
        assert_eq!(c.ip.as_deref(), Some("127.0.0.1"));
        assert!(c.internal && !c.explicit && !c.cleanup && !c.deregister_on_exit);
        assert_eq!(c.tags, vec!["a", "b"]);
        assert_eq!(c.ttl, Some(Duration::from_secs(30)));
        assert_eq!(c.ttl_refresh, Duration::from_secs(15));
        assert_eq!(c.resync, Some(Duration::from_secs(60)));
        assert_eq!(c.retry_attempts, Some(0));
        assert_eq!(c.retry_interval, Duration::from_millis(2000));
        assert_eq!(c.deregister, Deregister::Always);
        assert_eq!(c.hostname, "host");
        assert_eq!(c.network, None);

        let c = parse(argv("-internal -network backend consul://h"), "host").unwrap();
        assert_eq!(c.network.as_deref(), Some("backend"));

        let c = parse(
            argv("-internal=false -deregister on-success -retry-attempts -1 -cleanup=1 etcd://h/p"),
            "host",
        )
        .unwrap();
        assert!(!c.internal && c.cleanup);
        assert_eq!(c.deregister, Deregister::OnSuccess);
        assert_eq!(c.retry_attempts, None);
        assert_eq!(c.ttl, None);
    }

    #[test]
    fn rejects_bad_arguments_in_one_line() {
        let cases = [
            ("foo://x", "foo://x"),
            ("consul://", "consul://"),
            ("consul://h:99999", "consul://h:99999"),
            ("", "missing registry URI"),
            ("-ttl abc consul://h", "abc"),
            ("-deregister never consul://h", "never"),
            ("-internal=maybe consul://h", "maybe"),
            ("-ip nope consul://h", "nope"),
            ("-ttl 10 -ttl-refresh 10 consul://h", "-ttl-refresh"),
            ("-ttl-refresh 10 consul://h", "-ttl-refresh"),
            ("-bogus consul://h", "'-bogus'"),
            ("--bogus consul://h", "'--bogus'"),
            ("consul://h extra", "extra"),
            ("-retry-attempts -2 consul://h", "-2"),
        ];
        for (input, want) in cases {
            let e = parse(argv(input), "h").unwrap_err();
            assert_eq!(e.code, 2, "{input}");
            assert!(e.message.contains(want), "{input}: {}", e.message);
            assert!(!e.message.contains('\n'), "{input}: {}", e.message);
        }
    }

    #[test]
    fn label_filters_repeat_and_need_a_key() {
        let c = parse(
            argv("-label-filter com.docker.compose.project=shop --label-filter=tier consul://h"),
            "host",
        )
        .unwrap();
        assert_eq!(
            c.label_filter,
            vec![
                LabelMatch {
                    key: "com.docker.compose.project".into(),
                    value: Some("shop".into())
                },
                LabelMatch {
                    key: "tier".into(),
                    value: None
                },
            ]
        );
        assert!(parse(argv("consul://h"), "host")
            .unwrap()
            .label_filter
            .is_empty());
        for bad in [
            "-label-filter =x consul://h",
            "--label-filter==y consul://h",
        ] {
            let e = parse(argv(bad), "host").unwrap_err();
            assert_eq!(e.code, 2, "{bad}");
            assert!(e.message.contains("-label-filter"), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn hostname_flag_overrides_the_host_identity() {
        let cases = [
            ("consul://h", Ok("host")),
            ("-hostname engine-b consul://h", Ok("engine-b")),
            ("--hostname=engine-b consul://h", Ok("engine-b")),
            ("-hostname a:b consul://h", Err("a:b")),
            ("-hostname a/b consul://h", Err("a/b")),
            ("-hostname= consul://h", Err("-hostname")),
        ];
        for (input, want) in cases {
            match (parse(argv(input), "host"), want) {
                (Ok(c), Ok(h)) => assert_eq!(c.hostname, h, "{input}"),
                (Err(e), Err(needle)) => {
                    assert_eq!(e.code, 2, "{input}");
                    assert!(e.message.contains(needle), "{input}: {}", e.message);
                }
                (got, _) => panic!("{input}: unexpected {got:?}"),
            }
        }
    }

    #[test]
    fn exit_behaviour_flags() {
        let cases = [
            ("consul://h", Ok(false)),
            ("-deregister-on-exit consul://h", Ok(true)),
            ("--deregister-on-exit=false consul://h", Ok(false)),
            // The old opt-out is the default now: accepted, and changes nothing.
            ("-keep-on-exit consul://h", Ok(false)),
            ("--keep-on-exit=true consul://h", Ok(false)),
            (
                "-keep-on-exit=false -deregister-on-exit consul://h",
                Ok(true),
            ),
            (
                "-keep-on-exit -deregister-on-exit consul://h",
                Err("contradicts"),
            ),
        ];
        for (input, want) in cases {
            match (parse(argv(input), "host"), want) {
                (Ok(c), Ok(d)) => assert_eq!(c.deregister_on_exit, d, "{input}"),
                (Err(e), Err(needle)) => {
                    assert_eq!(e.code, 2, "{input}");
                    assert!(e.message.contains(needle), "{input}: {}", e.message);
                }
                (got, _) => panic!("{input}: unexpected {got:?}"),
            }
        }
    }

    #[test]
    fn help_and_version_exit_zero() {
        for input in ["-help", "--help", "-h", "-version"] {
            let e = parse(argv(input), "h").unwrap_err();
            assert_eq!(e.code, 0, "{input}");
        }
    }

    #[test]
    fn help_names_every_scheme_and_variable_and_one_uri() {
        let help = parse(argv("--help"), "h").unwrap_err().message;
        for want in [
            "Usage: registrator [options] URI",
            "consul://",
            "consul-tls://",
            "consulkv-tls://",
            "etcds://",
            "DOCKER_HOST",
            "RUST_LOG",
            "-retry-attempts",
        ] {
            assert!(help.contains(want), "help lacks {want:?}:\n{help}");
        }
        assert!(!help.contains("[URI]"), "{help}");
    }
}
