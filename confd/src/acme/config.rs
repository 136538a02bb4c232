//! The `acme:` section of confd's config file, validated into [`AcmeConfig`].

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `acme:` as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeFile {
    directory: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    renew_before: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    key_file: Option<PathBuf>,
    #[serde(default)]
    challenge_addr: Option<String>,
    #[serde(default)]
    lock_ttl: Option<String>,
}

/// Where confd obtains certificates and where it keeps them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// The ACME directory URL.
    pub directory: String,
    /// The account's contact, if any.
    pub email: Option<String>,
    /// A PEM root to trust for the ACME server (a private one); public roots otherwise.
    pub ca_file: Option<PathBuf>,
    /// Renew when this much of a certificate's life remains; `None`: a third of its lifetime.
    pub renew_before: Option<Duration>,
    /// The store prefix of the ACME state (`switchboard/acme/`).
    pub prefix: String,
    /// A 32-byte key (64 hex digits) sealing the private keys kept in the store.
    pub key_file: Option<PathBuf>,
    /// Where `/.well-known/acme-challenge/` is answered.
    pub challenge_addr: SocketAddr,
    /// How long a dead orderer keeps the lock (Consul: at least 10 s, and up to twice this).
    pub lock_ttl: Duration,
}

/// The default store prefix.
pub const DEFAULT_PREFIX: &str = "switchboard/acme/";
/// The default lock TTL.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(10);
/// The shortest lock TTL: the holder renews every third of it, so below this one slow store
/// answer would take the lock from a live holder.
pub const MIN_LOCK_TTL: Duration = Duration::from_secs(2);

impl AcmeFile {
    /// Validates the section: one line naming the key and what was expected.
    pub fn validate(self) -> Result<AcmeConfig, String> {
        let directory = self
            .directory
            .ok_or("acme.directory: missing: expected the ACME directory URL")?;
        if !(directory.starts_with("https://") || directory.starts_with("http://"))
            || directory
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "acme.directory: invalid value {directory:?}: expected an https:// URL"
            ));
        }
        if let Some(e) = &self.email {
            let ok = e
                .split_once('@')
                .is_some_and(|(u, d)| !u.is_empty() && crate::names::is_dns_name(d))
                && !e
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == ',');
            if !ok {
                return Err(format!(
                    "acme.email: invalid value {e:?}: expected an address like ops@example.com"
                ));
            }
        }
        let renew_before = match &self.renew_before {
            None => None,
            Some(s) => Some(
                crate::duration::parse(s)
                    .map_err(|e| format!("acme.renew_before: {e}"))
                    .and_then(|d| {
                        if d.is_zero() {
                            Err(
                                "acme.renew_before: 0: expected a positive duration, e.g. 720h"
                                    .to_string(),
                            )
                        } else {
                            Ok(d)
                        }
                    })?,
            ),
        };
        let prefix = self.prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_string());
        let prefix_ok = !prefix.is_empty()
            && prefix.ends_with('/')
            && !prefix.starts_with('/')
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'))
            && !prefix.split('/').any(|s| s == "." || s == "..")
            && !prefix.contains("//");
        if !prefix_ok {
            return Err(format!(
                "acme.prefix: invalid value {prefix:?}: expected key segments of [A-Za-z0-9._-] ending in '/', e.g. switchboard/acme/"
            ));
        }
        let challenge_addr = match &self.challenge_addr {
            None => {
                return Err(
                    "acme.challenge_addr: missing: expected HOST:PORT where the proxy sends /.well-known/acme-challenge/"
                        .into(),
                )
            }
            Some(a) => switchboard::telemetry::parse_listen_addr("acme.challenge_addr", a)?,
        };
        if let Some(p) = &self.key_file {
            super::storage::Sealer::from_file(p)?;
        }
        let lock_ttl = match &self.lock_ttl {
            None => DEFAULT_LOCK_TTL,
            Some(s) => {
                let d = crate::duration::parse(s).map_err(|e| format!("acme.lock_ttl: {e}"))?;
                if d < MIN_LOCK_TTL || d.subsec_nanos() != 0 {
                    return Err(format!(
                        "acme.lock_ttl: {s}: expected whole seconds, at least 2s (e.g. 10s)"
                    ));
                }
                d
            }
        };
        Ok(AcmeConfig {
            directory,
            email: self.email,
            ca_file: self.ca_file,
            renew_before,
            prefix,
            key_file: self.key_file,
            challenge_addr,
            lock_ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<AcmeConfig, String> {
        serde_yaml::from_str::<AcmeFile>(yaml).unwrap().validate()
    }

    #[test]
    fn defaults_and_errors() {
        let ok =
            parse("directory: https://acme.test/dir\nchallenge_addr: 127.0.0.1:8402\n").unwrap();
        assert_eq!(ok.prefix, DEFAULT_PREFIX);
        assert_eq!(ok.renew_before, None);
        assert_eq!(ok.lock_ttl, DEFAULT_LOCK_TTL);
        let short =
            parse("directory: https://a.test/d\nchallenge_addr: 127.0.0.1:1\nlock_ttl: 2s\n");
        assert_eq!(short.unwrap().lock_ttl, Duration::from_secs(2));
        let table = [
            ("challenge_addr: 127.0.0.1:1\n", "acme.directory: missing"),
            (
                "directory: ftp://x\nchallenge_addr: 127.0.0.1:1\n",
                "acme.directory: invalid value \"ftp://x\"",
            ),
            ("directory: https://x\n", "acme.challenge_addr: missing"),
            (
                "directory: https://x\nchallenge_addr: 1\n",
                "for acme.challenge_addr",
            ),
            (
                "directory: https://x\nchallenge_addr: 127.0.0.1:1\nemail: nobody\n",
                "acme.email: invalid value \"nobody\"",
            ),
            (
                "directory: https://x\nchallenge_addr: 127.0.0.1:1\nrenew_before: soon\n",
                "acme.renew_before: invalid duration",
            ),
            (
                "directory: https://x\nchallenge_addr: 127.0.0.1:1\nprefix: /a/\n",
                "acme.prefix: invalid value \"/a/\"",
            ),
            (
                "directory: https://x\nchallenge_addr: 127.0.0.1:1\nprefix: a/../\n",
                "acme.prefix: invalid value",
            ),
            (
                "directory: https://x\nchallenge_addr: 127.0.0.1:1\nlock_ttl: 1s\n",
                "acme.lock_ttl: 1s: expected whole seconds, at least 2s",
            ),
            (
                "directory: https://x\nchallenge_addr: 127.0.0.1:1\nlock_ttl: 2500ms\n",
                "acme.lock_ttl: 2500ms: expected whole seconds",
            ),
            (
                "directory: https://x\nchallenge_addr: 127.0.0.1:1\nkey_file: /nonexistent/k\n",
                "acme.key_file: /nonexistent/k: cannot read",
            ),
        ];
        for (yaml, want) in table {
            let e = parse(yaml).unwrap_err();
            assert!(e.contains(want), "{yaml:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
