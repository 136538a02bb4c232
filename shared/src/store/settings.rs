//! How to reach a secured store: TLS material (a private CA, a client certificate, the server
//! name to verify) and credentials (a Consul ACL token, an etcd user).
//!
//! The one owner of the environment variables both binaries honour, with the ecosystem's own
//! names so existing deployments work unchanged: Consul's (`CONSUL_CACERT`, `CONSUL_CAPATH`,
//! `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY`, `CONSUL_TLS_SERVER_NAME`, `CONSUL_HTTP_TOKEN`,
//! `CONSUL_HTTP_TOKEN_FILE`), gliderlabs/registrator's (`CONSUL_TLSCERT`, `CONSUL_TLSKEY`) and
//! etcdctl's (`ETCDCTL_CACERT`, `ETCDCTL_CERT`, `ETCDCTL_KEY`, `ETCDCTL_USER`,
//! `ETCDCTL_PASSWORD`). They are read once, at start; files are read when a client is built.
//! And the one place a `reqwest` client is built for a store ([`StoreSettings::http_client`]).

use crate::Endpoint;
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

/// A secret (token, password): never shown by `Debug` or `Display`, so never in a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// TLS material for HTTPS stores (`consul-tls://`, `consulkv-tls://`, `etcds://`).
///
/// With a CA set (file or directory), only that CA is trusted, as Consul's and etcd's own
/// clients do; without one, the public web roots are.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM file of the CA certificate(s) to trust.
    pub ca_file: Option<PathBuf>,
    /// Directory of PEM files of CA certificates to trust.
    pub ca_path: Option<PathBuf>,
    /// PEM file of the client certificate (and chain) to present.
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    pub key_file: Option<PathBuf>,
    /// Name the server certificate must carry, when it differs from the URI's host.
    pub server_name: Option<String>,
}

/// An etcd user (`ETCDCTL_USER`, `ETCDCTL_PASSWORD`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUser {
    /// User name.
    pub name: String,
    /// Password.
    pub password: Secret,
}

/// Credentials given by other means than the environment (confd's YAML); each one set takes
/// the place of its variable.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// Consul ACL token (over `CONSUL_HTTP_TOKEN` and `CONSUL_HTTP_TOKEN_FILE`).
    pub token: Option<String>,
    /// File holding the Consul ACL token (likewise).
    pub token_file: Option<PathBuf>,
    /// etcd user, `name` or `name:password` (over `ETCDCTL_USER`).
    pub user: Option<String>,
    /// etcd password (over `ETCDCTL_PASSWORD`).
    pub password: Option<String>,
}

/// Everything beyond the URI needed to reach a store. `Debug` never shows secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreSettings {
    /// TLS material.
    pub tls: TlsSettings,
    /// Consul ACL token, sent as `X-Consul-Token`.
    pub token: Option<Secret>,
    /// etcd user, authenticated through `/v3/auth/authenticate`.
    pub etcd_user: Option<EtcdUser>,
}

/// Settings that cannot be used: one line naming the setting, the file and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SettingsError(pub String);

impl SettingsError {
    fn new(s: impl Into<String>) -> Self {
        SettingsError(s.into())
    }
}

/// Reads an environment variable; empty counts as unset.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl StoreSettings {
    /// The Consul settings from the environment: `CONSUL_CACERT`, `CONSUL_CAPATH`,
    /// `CONSUL_CLIENT_CERT`/`CONSUL_CLIENT_KEY` (or gliderlabs' `CONSUL_TLSCERT`/`CONSUL_TLSKEY`),
    /// `CONSUL_TLS_SERVER_NAME`, and the token from `CONSUL_HTTP_TOKEN` or the file
    /// `CONSUL_HTTP_TOKEN_FILE`.
    pub fn consul_from_env() -> Result<Self, SettingsError> {
        Self::consul_from(Credentials::default())
    }

    /// As [`StoreSettings::consul_from_env`], with a token or token file given elsewhere
    /// (confd's YAML) taking the place of the variables.
    pub fn consul_from(given: Credentials) -> Result<Self, SettingsError> {
        let tls = TlsSettings {
            ca_file: env("CONSUL_CACERT").map(PathBuf::from),
            ca_path: env("CONSUL_CAPATH").map(PathBuf::from),
            cert_file: env("CONSUL_CLIENT_CERT")
                .or_else(|| env("CONSUL_TLSCERT"))
                .map(PathBuf::from),
            key_file: env("CONSUL_CLIENT_KEY")
                .or_else(|| env("CONSUL_TLSKEY"))
                .map(PathBuf::from),
            server_name: env("CONSUL_TLS_SERVER_NAME"),
        };
        let token = if given.token.is_some() || given.token_file.is_some() {
            consul_token(given.token, given.token_file.as_deref(), "token_file")?
        } else {
            consul_token(
                env("CONSUL_HTTP_TOKEN"),
                env("CONSUL_HTTP_TOKEN_FILE").map(PathBuf::from).as_deref(),
                "CONSUL_HTTP_TOKEN_FILE",
            )?
        };
        Ok(StoreSettings {
            tls,
            token,
            etcd_user: None,
        })
    }

    /// The etcd settings from the environment: `ETCDCTL_CACERT`, `ETCDCTL_CERT`, `ETCDCTL_KEY`,
    /// and `ETCDCTL_USER` (`name:password`, or `name` with `ETCDCTL_PASSWORD` or the file
    /// `ETCDCTL_PASSWORD_FILE`, ours: a password mounted as a file stays out of the
    /// environment).
    pub fn etcd_from_env() -> Result<Self, SettingsError> {
        Self::etcd_from(Credentials::default())
    }

    /// As [`StoreSettings::etcd_from_env`], with a user or password given elsewhere (confd's
    /// YAML) taking the place of each variable.
    pub fn etcd_from(given: Credentials) -> Result<Self, SettingsError> {
        let tls = TlsSettings {
            ca_file: env("ETCDCTL_CACERT").map(PathBuf::from),
            ca_path: None,
            cert_file: env("ETCDCTL_CERT").map(PathBuf::from),
            key_file: env("ETCDCTL_KEY").map(PathBuf::from),
            server_name: None,
        };
        let password = match given.password.or_else(|| env("ETCDCTL_PASSWORD")) {
            Some(p) => Some(p),
            None => match env("ETCDCTL_PASSWORD_FILE") {
                Some(f) => {
                    Some(secret_file(Path::new(&f), "ETCDCTL_PASSWORD_FILE", "an etcd password")?.0)
                }
                None => None,
            },
        };
        let etcd_user = etcd_user(given.user.or_else(|| env("ETCDCTL_USER")), password)?;
        Ok(StoreSettings {
            tls,
            token: None,
            etcd_user,
        })
    }

    /// The TLS keys of `given` that are set take the place of their variables.
    pub fn override_tls(&mut self, given: &TlsSettings) {
        let t = &mut self.tls;
        let pick = |g: &Option<PathBuf>, e: &mut Option<PathBuf>| {
            if g.is_some() {
                e.clone_from(g);
            }
        };
        pick(&given.ca_file, &mut t.ca_file);
        pick(&given.ca_path, &mut t.ca_path);
        pick(&given.cert_file, &mut t.cert_file);
        pick(&given.key_file, &mut t.key_file);
        if given.server_name.is_some() {
            t.server_name.clone_from(&given.server_name);
        }
    }

    /// The settings from the environment for the store `uri` names.
    pub fn from_env(uri: &crate::RegistryUri) -> Result<Self, SettingsError> {
        Self::from(uri, Credentials::default())
    }

    /// The settings for the store `uri` names: `given` credentials, the environment for the
    /// rest.
    pub fn from(uri: &crate::RegistryUri, given: Credentials) -> Result<Self, SettingsError> {
        match uri {
            crate::RegistryUri::Etcd { .. } => Self::etcd_from(given),
            _ => Self::consul_from(given),
        }
    }

    /// Builds the HTTP client for `endpoints` (all of one store): the CA, the client identity
    /// and the server name applied. `configure` adds the caller's timeouts.
    ///
    /// A server name different from the URI's host is verified by sending requests to that
    /// name ([`StoreSettings::request_base`]) and resolving it to the endpoint's address here.
    pub fn http_client(
        &self,
        endpoints: &[Endpoint],
        configure: impl FnOnce(reqwest::ClientBuilder) -> reqwest::ClientBuilder,
    ) -> Result<reqwest::Client, SettingsError> {
        let tls = &self.tls;
        let mut b = configure(reqwest::Client::builder());
        let mut cas = Vec::new();
        if let Some(f) = &tls.ca_file {
            cas.extend(read_cas(f, "CA file")?);
        }
        if let Some(dir) = &tls.ca_path {
            let entries = std::fs::read_dir(dir).map_err(|e| {
                SettingsError::new(format!("cannot read CA directory {}: {e}", dir.display()))
            })?;
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            for f in files {
                cas.extend(read_cas(&f, "CA directory file")?);
            }
            if cas.is_empty() {
                return Err(SettingsError::new(format!(
                    "CA directory {} holds no PEM certificate",
                    dir.display()
                )));
            }
        }
        if !cas.is_empty() {
            b = b.tls_built_in_root_certs(false);
            for c in cas {
                b = b.add_root_certificate(c);
            }
        }
        match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => {
                let mut pem = read(cert, "client certificate")?;
                pem.push(b'\n');
                pem.extend(read(key, "client key")?);
                let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
                    SettingsError::new(format!(
                        "cannot use client certificate {} with key {}: {}: expected PEM files",
                        cert.display(),
                        key.display(),
                        super::one_line(&e)
                    ))
                })?;
                b = b.identity(id);
            }
            (None, None) => {}
            (Some(c), None) | (None, Some(c)) => {
                return Err(SettingsError::new(format!(
                    "client certificate and key go together: only {} is set",
                    c.display()
                )))
            }
        }
        if let Some(name) = &tls.server_name {
            // The name is pinned to addresses by name, so one name cannot stand for several
            // members that the client fails over between.
            if endpoints.len() > 1 {
                return Err(SettingsError::new(format!(
                    "TLS server name {name:?} works with one endpoint, not {}: expected the \
                     members' own names in the URI instead",
                    endpoints.len()
                )));
            }
            for ep in endpoints {
                for addr in resolve(ep)? {
                    b = b.resolve(name, addr);
                }
            }
        }
        b.build().map_err(|e| {
            SettingsError::new(format!(
                "cannot build the HTTPS client: {}",
                super::one_line(&e)
            ))
        })
    }

    /// The base URL requests to `endpoint` go to: its own, or with the host replaced by the
    /// TLS server name (resolved to the endpoint's address by [`StoreSettings::http_client`]).
    pub fn request_base(&self, endpoint: &Endpoint) -> String {
        match &self.tls.server_name {
            Some(name) if endpoint.tls => Endpoint {
                host: name.clone(),
                ..endpoint.clone()
            }
            .base_url(),
            _ => endpoint.base_url(),
        }
    }
}

/// The Consul token: the variable, else the first line of the file.
fn consul_token(
    value: Option<String>,
    file: Option<&Path>,
    file_setting: &str,
) -> Result<Option<Secret>, SettingsError> {
    if let Some(t) = value {
        return Ok(Some(Secret(t.trim().to_string())));
    }
    let Some(f) = file else { return Ok(None) };
    secret_file(f, file_setting, "a Consul ACL token").map(Some)
}

/// A secret kept in a file (a token, a password; compose and Kubernetes mount them so): its
/// content without surrounding whitespace, refused when unreadable or empty.
fn secret_file(f: &Path, setting: &str, expected: &str) -> Result<Secret, SettingsError> {
    let text = std::fs::read_to_string(f).map_err(|e| {
        SettingsError::new(format!(
            "cannot read the file {} ({setting}): {e}",
            f.display()
        ))
    })?;
    let value = text.trim();
    if value.is_empty() {
        return Err(SettingsError::new(format!(
            "file {} ({setting}) is empty: expected {expected}",
            f.display()
        )));
    }
    Ok(Secret(value.to_string()))
}

/// `ETCDCTL_USER` as etcdctl reads it: `name:password`, or `name` with the password apart.
pub fn etcd_user(
    user: Option<String>,
    password: Option<String>,
) -> Result<Option<EtcdUser>, SettingsError> {
    let Some(user) = user else { return Ok(None) };
    let (name, pw) = match user.split_once(':') {
        Some((n, p)) => (n.to_string(), Some(p.to_string())),
        None => (user, password),
    };
    if name.is_empty() {
        return Err(SettingsError::new(
            "etcd user has an empty name: expected ETCDCTL_USER=name:password or name",
        ));
    }
    let Some(pw) = pw else {
        return Err(SettingsError::new(format!(
            "etcd user {name:?} has no password: expected ETCDCTL_USER=name:password, ETCDCTL_PASSWORD or ETCDCTL_PASSWORD_FILE"
        )));
    };
    Ok(Some(EtcdUser {
        name,
        password: Secret(pw),
    }))
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, SettingsError> {
    std::fs::read(path)
        .map_err(|e| SettingsError::new(format!("cannot read {what} {}: {e}", path.display())))
}

fn read_cas(path: &Path, what: &str) -> Result<Vec<reqwest::Certificate>, SettingsError> {
    let pem = read(path, what)?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
        SettingsError::new(format!(
            "cannot use {what} {}: {}: expected PEM certificates",
            path.display(),
            super::one_line(&e)
        ))
    })?;
    if certs.is_empty() {
        return Err(SettingsError::new(format!(
            "{what} {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// The addresses of an endpoint, for pinning a TLS server name to them (resolved once, at
/// start: blocking, but only when a server name is set).
fn resolve(ep: &Endpoint) -> Result<Vec<SocketAddr>, SettingsError> {
    if let Ok(ip) = ep.host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, ep.port)]);
    }
    (ep.host.as_str(), ep.port)
        .to_socket_addrs()
        .map(|a| a.collect())
        .map_err(|e| SettingsError::new(format!("cannot resolve {}: {e}", ep.host)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_user_forms() {
        let u = etcd_user(Some("app:pw:x".into()), None).unwrap().unwrap();
        assert_eq!((u.name.as_str(), u.password.expose()), ("app", "pw:x"));
        let u = etcd_user(Some("app".into()), Some("pw".into()))
            .unwrap()
            .unwrap();
        assert_eq!((u.name.as_str(), u.password.expose()), ("app", "pw"));
        assert!(etcd_user(None, Some("pw".into())).unwrap().is_none());
        let e = etcd_user(Some("app".into()), None).unwrap_err().to_string();
        assert!(e.contains("\"app\" has no password"), "{e}");
        assert!(etcd_user(Some(":pw".into()), None).is_err());
    }

    #[test]
    fn secrets_never_show() {
        let s = StoreSettings {
            token: Some(Secret::new("s3cr3t-token")),
            etcd_user: Some(EtcdUser {
                name: "app".into(),
                password: Secret::new("hunter2"),
            }),
            ..Default::default()
        };
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn token_file_is_read_and_checked() {
        let dir = std::env::temp_dir().join(format!("sb-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "abc-123\n").unwrap();
        let t = consul_token(None, Some(&f), "X").unwrap().unwrap();
        assert_eq!(t.expose(), "abc-123");
        std::fs::write(&f, "\n").unwrap();
        let e = consul_token(None, Some(&f), "X").unwrap_err().to_string();
        assert!(e.contains("is empty") && e.contains("token"), "{e}");
        let missing = dir.join("missing");
        let e = consul_token(None, Some(&missing), "X")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot read the file") && e.contains("(X)"),
            "{e}"
        );
        let e = secret_file(&missing, "ETCDCTL_PASSWORD_FILE", "an etcd password")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ETCDCTL_PASSWORD_FILE"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_tls_files_are_named() {
        let s = StoreSettings {
            tls: TlsSettings {
                ca_file: Some("/nonexistent/ca.pem".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let e = s.http_client(&[], |b| b).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let s = StoreSettings {
            tls: TlsSettings {
                cert_file: Some("/c.pem".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let e = s.http_client(&[], |b| b).unwrap_err().to_string();
        assert!(e.contains("go together"), "{e}");
        let s = StoreSettings {
            tls: TlsSettings {
                server_name: Some("etcd.internal".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let eps = match crate::RegistryUri::parse("etcds://10.0.0.1:2379,10.0.0.2:2379").unwrap() {
            crate::RegistryUri::Etcd { endpoints, .. } => endpoints,
            other => panic!("{other:?}"),
        };
        let e = s.http_client(&eps, |b| b).unwrap_err().to_string();
        assert!(e.contains("one endpoint"), "{e}");
        assert_eq!(s.request_base(&eps[0]), "https://etcd.internal:2379");
        assert!(s.http_client(&eps[..1], |b| b).is_ok());
    }
}
