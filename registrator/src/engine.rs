//! Which Docker engine to talk to, and how: the docker CLI's conventions.
//!
//! `DOCKER_HOST` names the engine (default: the local socket, `/var/run/docker.sock`, else
//! `/tmp/docker.sock` where gliderlabs' documented run line mounts it). A `tcp://` engine is plain HTTP
//! unless `DOCKER_TLS_VERIFY` is set (non-empty and not `0`): then it is HTTPS, the engine's
//! certificate must be signed by `ca.pem` and registrator presents `cert.pem`/`key.pem`, all
//! three from `DOCKER_CERT_PATH` (default `~/.docker`). The files are read at start, so a
//! missing or unreadable one is refused naming it, before any connection is tried. Errors
//! name `DOCKER_HOST` and the file or the failure, never a file's content.

use std::path::{Path, PathBuf};

/// How to reach the engine (decided from the environment by [`Engine::from_env_values`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Engine {
    /// The local socket, or whatever non-TCP `DOCKER_HOST` names (`unix://...`).
    Default(Option<String>),
    /// `tcp://` without TLS.
    Http(String),
    /// `tcp://` (or `https://`) with `DOCKER_TLS_VERIFY`.
    Tls {
        /// `DOCKER_HOST`.
        host: String,
        /// The directory holding `ca.pem`, `cert.pem` and `key.pem`.
        cert_dir: PathBuf,
    },
}

impl Engine {
    /// The decision, from the values of `DOCKER_HOST`, `DOCKER_TLS_VERIFY`,
    /// `DOCKER_CERT_PATH` and `HOME`.
    pub fn from_env_values(
        host: Option<&str>,
        tls_verify: Option<&str>,
        cert_path: Option<&str>,
        home: Option<&str>,
    ) -> Result<Engine, String> {
        let host = host.map(str::trim).filter(|h| !h.is_empty());
        let verify = tls_verify.is_some_and(|v| !v.is_empty() && v != "0");
        let Some(h) = host else {
            return Ok(Engine::Default(None));
        };
        let tcp = h.starts_with("tcp://") || h.starts_with("http://");
        if !(tcp || h.starts_with("https://")) {
            return Ok(Engine::Default(Some(h.to_string())));
        }
        if tcp && !verify {
            return Ok(Engine::Http(h.to_string()));
        }
        let cert_dir = match cert_path.filter(|p| !p.is_empty()) {
            Some(p) => PathBuf::from(p),
            None => match home.filter(|p| !p.is_empty()) {
                Some(home) => Path::new(home).join(".docker"),
                None => {
                    return Err(format!(
                        "DOCKER_HOST={h}: DOCKER_TLS_VERIFY is set but neither DOCKER_CERT_PATH nor HOME is: expected DOCKER_CERT_PATH naming the directory of ca.pem, cert.pem and key.pem"
                    ))
                }
            },
        };
        Ok(Engine::Tls {
            host: h.to_string(),
            cert_dir,
        })
    }

    /// [`Engine::from_env_values`] with this process's environment.
    pub fn from_env() -> Result<Engine, String> {
        let var = |k| std::env::var(k).ok();
        Engine::from_env_values(
            var("DOCKER_HOST").as_deref(),
            var("DOCKER_TLS_VERIFY").as_deref(),
            var("DOCKER_CERT_PATH").as_deref(),
            var("HOME").as_deref(),
        )
    }

    /// What `DOCKER_HOST` amounts to, for messages.
    pub fn describe(&self) -> String {
        match self {
            Engine::Default(None) => {
                format!(
                    "the local socket {} (DOCKER_HOST unset)",
                    local_socket_here()
                )
            }
            Engine::Default(Some(h)) | Engine::Http(h) => format!("DOCKER_HOST={h}"),
            Engine::Tls { host, .. } => format!("DOCKER_HOST={host} (TLS)"),
        }
    }

    /// The client. For TLS, the three files are checked first: each must be readable and
    /// hold PEM (`-----BEGIN`); the error names the one that is not.
    pub fn connect(&self) -> Result<bollard::Docker, String> {
        let fail = |e: bollard::errors::Error| {
            format!("{}: cannot set up the Docker client: {e}", self.describe())
        };
        match self {
            Engine::Default(None) => bollard::Docker::connect_with_unix(
                local_socket_here(),
                DEFAULT_TIMEOUT_SECS,
                bollard::API_DEFAULT_VERSION,
            )
            .map_err(fail),
            Engine::Default(Some(_)) => bollard::Docker::connect_with_defaults().map_err(fail),
            Engine::Http(h) => bollard::Docker::connect_with_http(
                h,
                DEFAULT_TIMEOUT_SECS,
                bollard::API_DEFAULT_VERSION,
            )
            .map_err(fail),
            Engine::Tls { host, cert_dir } => {
                let [ca, cert, key] = ["ca.pem", "cert.pem", "key.pem"].map(|f| cert_dir.join(f));
                for f in [&ca, &cert, &key] {
                    check_pem(f).map_err(|why| {
                        format!(
                            "DOCKER_HOST={host}: DOCKER_TLS_VERIFY is set but {}: {why}: expected ca.pem, cert.pem and key.pem in DOCKER_CERT_PATH ({})",
                            f.display(),
                            cert_dir.display()
                        )
                    })?;
                }
                bollard::Docker::connect_with_ssl(
                    host,
                    &key,
                    &cert,
                    &ca,
                    DEFAULT_TIMEOUT_SECS,
                    bollard::API_DEFAULT_VERSION,
                )
                .map_err(fail)
            }
        }
    }
}

/// The engine's usual socket, and where gliderlabs' image reads it (its documented run line
/// mounts the host's socket at `/tmp/docker.sock`).
const LOCAL_SOCKETS: [&str; 2] = ["/var/run/docker.sock", "/tmp/docker.sock"];

/// With `DOCKER_HOST` unset: the first of [`LOCAL_SOCKETS`] that `exists`, else the first
/// (connecting then fails naming it). So gliderlabs' run line works unchanged.
pub fn local_socket(exists: impl Fn(&str) -> bool) -> &'static str {
    LOCAL_SOCKETS
        .into_iter()
        .find(|p| exists(p))
        .unwrap_or(LOCAL_SOCKETS[0])
}

fn local_socket_here() -> &'static str {
    local_socket(|p| Path::new(p).exists())
}

/// bollard's own default request timeout (2 minutes): the event stream is one long request.
const DEFAULT_TIMEOUT_SECS: u64 = 120;

fn check_pem(path: &Path) -> Result<(), String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot be read ({e})"))?;
    if !text.windows(10).any(|w| w == b"-----BEGIN") {
        return Err("holds no PEM block".into());
    }
    Ok(())
}

/// A failure to reach the engine as one line: what kind of failure (certificate verification,
/// the engine refusing the client certificate, no TLS on that port) when it is a TLS one, then
/// the whole cause chain.
pub fn describe_failure(engine: &Engine, e: &bollard::errors::Error) -> String {
    let chain = switchboard::store::one_line(e);
    let kind = switchboard::store::tls_failure(&chain, matches!(engine, Engine::Tls { .. }));
    match kind {
        Some(kind) => format!("{}: TLS failed: {kind} ({chain})", engine.describe()),
        None => format!(
            "{}: cannot reach the Docker engine: {chain}",
            engine.describe()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_socket_order() {
        let var = "/var/run/docker.sock";
        let tmp = "/tmp/docker.sock";
        let cases: &[(&[&str], &str)] =
            &[(&[var, tmp], var), (&[var], var), (&[tmp], tmp), (&[], var)];
        for (present, want) in cases {
            assert_eq!(local_socket(|p| present.contains(&p)), *want, "{present:?}");
        }
        // An empty DOCKER_HOST counts as unset.
        assert_eq!(
            Engine::from_env_values(Some("  "), None, None, None),
            Ok(Engine::Default(None))
        );
    }

    #[test]
    fn the_docker_cli_conventions() {
        let e = |h, v, c, home| Engine::from_env_values(h, v, c, home);
        assert_eq!(e(None, Some("1"), None, None), Ok(Engine::Default(None)));
        assert_eq!(
            e(Some("unix:///run/d.sock"), Some("1"), None, None),
            Ok(Engine::Default(Some("unix:///run/d.sock".into())))
        );
        assert_eq!(
            e(Some("tcp://127.0.0.1:2375"), None, None, None),
            Ok(Engine::Http("tcp://127.0.0.1:2375".into()))
        );
        for off in ["", "0"] {
            assert_eq!(
                e(Some("tcp://h:2375"), Some(off), Some("/c"), None),
                Ok(Engine::Http("tcp://h:2375".into())),
                "DOCKER_TLS_VERIFY={off:?}"
            );
        }
        assert_eq!(
            e(
                Some("tcp://h:2376"),
                Some("1"),
                Some("/certs"),
                Some("/root")
            ),
            Ok(Engine::Tls {
                host: "tcp://h:2376".into(),
                cert_dir: "/certs".into()
            })
        );
        assert_eq!(
            e(Some("tcp://h:2376"), Some("true"), None, Some("/home/u")),
            Ok(Engine::Tls {
                host: "tcp://h:2376".into(),
                cert_dir: "/home/u/.docker".into()
            })
        );
        let err = e(Some("tcp://h:2376"), Some("1"), None, None).unwrap_err();
        assert!(
            err.contains("DOCKER_HOST=tcp://h:2376") && err.contains("DOCKER_CERT_PATH"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_or_bad_file_is_named() {
        let d = tempfile::tempdir().unwrap();
        let engine = Engine::Tls {
            host: "tcp://127.0.0.1:1".into(),
            cert_dir: d.path().into(),
        };
        let pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        std::fs::write(d.path().join("ca.pem"), pem).unwrap();
        std::fs::write(d.path().join("key.pem"), "secret-key-material").unwrap();
        let err = engine.connect().err().unwrap();
        assert!(
            err.contains("DOCKER_HOST=tcp://127.0.0.1:1")
                && err.contains("cert.pem")
                && err.contains("cannot be read"),
            "{err}"
        );
        std::fs::write(d.path().join("cert.pem"), pem).unwrap();
        let err = engine.connect().err().unwrap();
        assert!(
            err.contains("key.pem") && err.contains("no PEM block"),
            "{err}"
        );
        assert!(!err.contains("secret-key-material"), "{err}");
    }
}
