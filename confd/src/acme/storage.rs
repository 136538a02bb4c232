//! What the ACME state looks like in the store, and the sealing of private keys.
//!
//! Under the configured prefix (default `switchboard/acme/`):
//! - `account`: the ACME account's credentials (JSON, with its private key), sealed when a
//!   key file is given.
//! - `certs/<host>`: one JSON [`CertRecord`] per host: the PEM chain, the PEM private key
//!   (sealed when a key file is given) and the validity read from the leaf.
//! - `challenges/<token>`: an HTTP-01 key authorization while its order is pending, so any
//!   confd answers any challenge.
//! - `lock`: the lock one orderer holds at a time (see [`switchboard::store::KvStore::lock`]).

use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The account's key.
pub const ACCOUNT: &str = "account";
/// The lock's key.
pub const LOCK: &str = "lock";

/// The key of `host`'s certificate.
pub fn cert_key(host: &str) -> String {
    format!("certs/{host}")
}

/// The key of a pending challenge's key authorization; `None` for a token that is not one
/// (ACME tokens are base64url, RFC 8555 section 8.3).
pub fn challenge_key(token: &str) -> Option<String> {
    let ok = !token.is_empty()
        && token.len() <= 256
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then(|| format!("challenges/{token}"))
}

/// Seals values with ChaCha20-Poly1305 (RustCrypto's `chacha20poly1305`): a fresh random
/// nonce per value, stored in front of the ciphertext, `sealed:` + base64. Without a key
/// file, values are stored as they are.
#[derive(Clone)]
pub struct Sealer(Option<ChaCha20Poly1305>);

const SEALED: &str = "sealed:";

impl std::fmt::Debug for Sealer {
    /// Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Sealer(key)"
        } else {
            "Sealer(none)"
        })
    }
}

impl Sealer {
    /// No sealing.
    pub fn none() -> Sealer {
        Sealer(None)
    }

    /// The key in `path`: 64 hex digits (`openssl rand -hex 32`), surrounding whitespace
    /// ignored.
    pub fn from_file(path: &Path) -> Result<Sealer, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("acme.key_file: {}: cannot read: {e}", path.display()))?;
        let hex = text.trim();
        let bytes: Option<Vec<u8>> = (hex.len() == 64)
            .then(|| {
                (0..32)
                    .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
                    .collect()
            })
            .flatten();
        let bytes = bytes.ok_or_else(|| {
            format!(
                "acme.key_file: {}: expected 64 hex digits (a 32-byte key, e.g. from `openssl rand -hex 32`)",
                path.display()
            )
        })?;
        Ok(Sealer(Some(ChaCha20Poly1305::new(Key::from_slice(&bytes)))))
    }

    /// `plain`, sealed if there is a key.
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let Some(c) = &self.0 else {
            return plain.to_vec();
        };
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let mut out = nonce.to_vec();
        out.extend(c.encrypt(&nonce, plain).expect("in-memory encryption"));
        let mut text = SEALED.as_bytes().to_vec();
        text.extend(
            base64::engine::general_purpose::STANDARD
                .encode(out)
                .bytes(),
        );
        text
    }

    /// The plain bytes of a stored value. A sealed value needs the key; a plain one is
    /// refused when a key is set (it would mean keys were stored in the clear, or tampered with).
    pub fn open(&self, stored: &[u8]) -> Result<Vec<u8>, String> {
        let sealed = stored.strip_prefix(SEALED.as_bytes());
        match (&self.0, sealed) {
            (None, None) => Ok(stored.to_vec()),
            (None, Some(_)) => Err("sealed with a key: expected acme.key_file".into()),
            (Some(_), None) => {
                Err("not sealed, but acme.key_file is set: expected a sealed value".into())
            }
            (Some(c), Some(b64)) => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| format!("sealed value is not base64: {e}"))?;
                if raw.len() < 12 {
                    return Err("sealed value too short".into());
                }
                let (nonce, ct) = raw.split_at(12);
                c.decrypt(Nonce::from_slice(nonce), ct).map_err(|_| {
                    "cannot open the sealed value: wrong acme.key_file, or tampered with".into()
                })
            }
        }
    }
}

/// A host's certificate as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    /// The PEM chain, leaf first.
    pub chain: String,
    /// The PEM private key, or its sealed form.
    pub key: String,
    /// Validity of the leaf, Unix seconds.
    pub not_before: u64,
    /// Validity of the leaf, Unix seconds.
    pub not_after: u64,
}

/// A usable certificate: what other code reads (see [`super::Certificates`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// The host it was ordered for.
    pub host: String,
    /// The PEM chain, leaf first.
    pub chain_pem: String,
    /// The PEM private key (opened).
    pub key_pem: String,
    /// Start of its validity.
    pub not_before: SystemTime,
    /// End of its validity.
    pub not_after: SystemTime,
}

impl Certificate {
    /// When to renew: `renew_before` ahead of expiry, or with a third of its life left.
    pub fn renew_at(&self, renew_before: Option<Duration>) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        let before = renew_before.unwrap_or(life / 3);
        self.not_after.checked_sub(before).unwrap_or(UNIX_EPOCH)
    }

    /// The record to store, the key sealed by `sealer`.
    pub fn to_record(&self, sealer: &Sealer) -> Vec<u8> {
        let key = String::from_utf8(sealer.seal(self.key_pem.as_bytes())).expect("PEM or base64");
        let rec = CertRecord {
            chain: self.chain_pem.clone(),
            key,
            not_before: secs(self.not_before),
            not_after: secs(self.not_after),
        };
        serde_json::to_vec(&rec).expect("record JSON")
    }

    /// A stored record for `host`, checked: it decodes, its key opens, its leaf parses and
    /// names `host`. A record failing any of these is as good as none (it is ordered again).
    pub fn from_record(host: &str, bytes: &[u8], sealer: &Sealer) -> Result<Certificate, String> {
        let rec: CertRecord =
            serde_json::from_slice(bytes).map_err(|e| format!("stored record: {e}"))?;
        let key = sealer.open(rec.key.as_bytes())?;
        let key_pem = String::from_utf8(key).map_err(|_| "stored key is not PEM".to_string())?;
        Certificate::from_pem(host, rec.chain, key_pem)
    }

    /// A certificate from a PEM chain and key, its validity read from the leaf, checked to
    /// name `host`.
    pub fn from_pem(host: &str, chain_pem: String, key_pem: String) -> Result<Certificate, String> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem.as_bytes())
            .map_err(|e| format!("chain is not PEM: {e}"))?;
        let leaf = pem
            .parse_x509()
            .map_err(|e| format!("leaf certificate does not parse: {e}"))?;
        let names: Vec<String> = leaf
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::DNSName(d) => {
                            Some(d.to_ascii_lowercase())
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if !names.iter().any(|n| n == host) {
            return Err(format!("certificate names {names:?}, not {host}"));
        }
        if !key_pem.contains("PRIVATE KEY") {
            return Err("stored key is not a PEM private key".into());
        }
        let v = leaf.validity();
        let at = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
        Ok(Certificate {
            host: host.to_string(),
            chain_pem,
            key_pem,
            not_before: at(v.not_before.timestamp()),
            not_after: at(v.not_after.timestamp()),
        })
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealing_round_trips_and_refuses_the_wrong_key() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = dir.path().join("k1");
        let k2 = dir.path().join("k2");
        std::fs::write(&k1, format!("{}\n", "ab".repeat(32))).unwrap();
        std::fs::write(&k2, "cd".repeat(32)).unwrap();
        let s1 = Sealer::from_file(&k1).unwrap();
        let s2 = Sealer::from_file(&k2).unwrap();
        let sealed = s1.seal(b"-----BEGIN PRIVATE KEY-----");
        assert!(sealed.starts_with(b"sealed:"));
        assert!(!sealed.windows(7).any(|w| w == b"PRIVATE"));
        assert_eq!(s1.open(&sealed).unwrap(), b"-----BEGIN PRIVATE KEY-----");
        assert!(s2
            .open(&sealed)
            .unwrap_err()
            .contains("wrong acme.key_file"));
        assert!(Sealer::none().open(&sealed).is_err());
        assert!(s1.open(b"plain").is_err());
        std::fs::write(&k2, "short").unwrap();
        assert!(Sealer::from_file(&k2)
            .unwrap_err()
            .contains("expected 64 hex digits"));
    }

    #[test]
    fn challenge_tokens_are_base64url_only() {
        assert_eq!(challenge_key("abc-_D9").unwrap(), "challenges/abc-_D9");
        for bad in ["", "../lock", "a/b", "a.b", "a b"] {
            assert_eq!(challenge_key(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn renewal_defaults_to_a_third_of_the_lifetime() {
        let c = Certificate {
            host: "a.test".into(),
            chain_pem: String::new(),
            key_pem: String::new(),
            not_before: UNIX_EPOCH + Duration::from_secs(0),
            not_after: UNIX_EPOCH + Duration::from_secs(90),
        };
        assert_eq!(c.renew_at(None), UNIX_EPOCH + Duration::from_secs(60));
        assert_eq!(
            c.renew_at(Some(Duration::from_secs(10))),
            UNIX_EPOCH + Duration::from_secs(80)
        );
    }
}
