//! Which virtual hosts are served over HTTPS, and with what: certificates from a directory
//! (`https: { certs_dir }`), from the store (put there by an operator, [`store`]) and from
//! ACME ([`crate::acme`]), checked alike and served alike.
//!
//! One pair per name in `certs_dir`: `<name>.crt` (PEM, the leaf first, then its chain) and
//! `<name>.key` (PEM). `<name>` is a host name, or `_wildcard.<domain>` for a certificate of
//! `*.<domain>` (file names never hold a `*`). The store's pairs are named the same way (the
//! key after `store_prefix`), and ACME's after their host. A pair is used only if it parses,
//! its key matches its certificate, it is not expired and its certificate names `<name>`. A
//! bad pair is skipped with a one-line warning naming where it came from; the others are
//! served.
//!
//! Precedence, per name: files, then the store, then ACME ([`Origin`]). A pair whose name a
//! higher source already covers (the same name, a certificate naming it, or a wildcard over
//! it) is not served: what an operator put in place by hand is a decision, which an automatic
//! source must not override, and HAProxy, picking among the crt-list by SNI, would otherwise
//! prefer an exact name over the operator's wildcard.
//!
//! Why confd copies each good pair into `serve_dir` as one `<name>.pem` (chain then key):
//! HAProxy reads a certificate and its key from one file (or `<file>.key`, not `<name>.key`),
//! and the proxy then reads exactly the bytes confd checked, never a pair half rewritten
//! since. `serve_dir` also holds `crt-list`, the list of those files HAProxy's bind reads.

pub mod store;

use rustls::crypto::ring::sign::any_supported_type;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a file name says a wildcard pair is for: `_wildcard.example.com` = `*.example.com`.
pub const WILDCARD_PREFIX: &str = "_wildcard.";

/// Where operators put certificates in the store, by default.
pub const STORE_PREFIX: &str = "switchboard/certs/";

/// Where a pair comes from, highest precedence first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    /// `https.certs_dir`.
    File,
    /// `https.store_prefix`, put by an operator.
    Store,
    /// The ACME loop.
    Acme,
}

/// A pair from the store or ACME, not checked yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Supplied {
    /// Its source.
    pub origin: Origin,
    /// Its name: a host, or `_wildcard.<domain>`.
    pub name: String,
    /// PEM chain, leaf first.
    pub crt: Vec<u8>,
    /// PEM private key.
    pub key: Vec<u8>,
    /// Where it came from, for warnings (`store key switchboard/certs/a.test`).
    pub what: String,
}

/// One good pair, as served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// The pair's name (its file stem): a host, or `_wildcard.<domain>`.
    pub name: String,
    /// The DNS names of its certificate (lower case), `*.domain` for wildcards.
    pub names: Vec<String>,
    /// The file the proxies read: `<serve_dir>/<name>.pem`.
    pub pem: PathBuf,
    /// The leaf's serial number, hex.
    pub serial: String,
    /// The leaf's notAfter, seconds since the epoch.
    pub not_after: i64,
    /// Where it came from.
    pub origin: Origin,
}

/// The good pairs, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertSet {
    /// By pair name.
    pub pairs: BTreeMap<String, Arc<Pair>>,
    /// `<serve_dir>/crt-list` (written when there is at least one pair).
    pub crt_list: Option<PathBuf>,
}

impl CertSet {
    /// The pair that serves `host`: the one named after it, else one whose certificate names
    /// it, else `_wildcard.<parent>`, else one whose certificate names `*.<parent>`.
    pub fn cover(&self, host: &str) -> Option<&Arc<Pair>> {
        let host = host.to_ascii_lowercase();
        let exact = |n: &str| {
            self.pairs
                .get(n)
                .or_else(|| self.pairs.values().find(|p| p.names.iter().any(|x| x == n)))
        };
        if let Some(p) = self.pairs.get(&host) {
            return Some(p);
        }
        if let Some(p) = self.pairs.values().find(|p| p.names.contains(&host)) {
            return Some(p);
        }
        let (_, parent) = host.split_once('.')?;
        if !parent.contains('.') {
            // `*.com` covers nothing.
            return None;
        }
        self.pairs
            .get(&format!("{WILDCARD_PREFIX}{parent}"))
            .or_else(|| exact(&format!("*.{parent}")))
    }

    /// Whether a pair already covers everything a pair named `name` would serve.
    fn covers_name(&self, name: &str) -> bool {
        match name.strip_prefix(WILDCARD_PREFIX) {
            Some(domain) => {
                self.pairs.contains_key(name)
                    || self
                        .pairs
                        .values()
                        .any(|p| p.names.iter().any(|n| *n == format!("*.{domain}")))
            }
            None => self.cover(name).is_some(),
        }
    }
}

/// The pairs of `new` that `old` served under the same name and file with another
/// certificate: renewals. The rendered configs do not change for them (nothing in a template
/// depends on a certificate's bytes), so the live channels put them into the running proxies
/// ([`crate::live::LiveChannel::certs_renewed`]). Pure.
pub fn renewed(old: &CertSet, new: &CertSet) -> Vec<Arc<Pair>> {
    new.pairs
        .values()
        .filter(|n| {
            old.pairs.get(&n.name).is_some_and(|o| {
                o.pem == n.pem && (o.serial != n.serial || o.not_after != n.not_after)
            })
        })
        .cloned()
        .collect()
}

/// The pair in `crt` and `key` checked for `name` at `now` (seconds since the epoch): the
/// certificate chain, or why it cannot be served (one line, without the file name).
pub fn check_pair(
    name: &str,
    crt: &[u8],
    key: &[u8],
    now: i64,
) -> Result<(Vec<String>, String, i64), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(crt)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("expected PEM certificates: {e}"))?;
    let leaf = chain
        .first()
        .ok_or("expected a PEM certificate, found none")?;
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| format!("expected a PEM private key: {e}"))?;
    let signing = any_supported_type(&key).map_err(|e| format!("unusable private key: {e}"))?;
    CertifiedKey::new(chain.clone(), signing)
        .keys_match()
        .map_err(|_| "the private key does not match the certificate".to_string())?;
    let (_, x) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("expected an X.509 certificate: {e}"))?;
    let not_after = x.validity().not_after.timestamp();
    if not_after <= now {
        return Err(format!("expired at {}", x.validity().not_after));
    }
    if x.validity().not_before.timestamp() > now {
        return Err(format!("not valid before {}", x.validity().not_before));
    }
    let mut names = Vec::new();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for g in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = g {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    let want = match name.strip_prefix(WILDCARD_PREFIX) {
        Some(domain) => format!("*.{domain}"),
        None => name.to_string(),
    };
    if !names.contains(&want) {
        return Err(format!(
            "the certificate does not name {want} (its names: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        ));
    }
    Ok((names, x.raw_serial_as_string(), not_after))
}

/// Whether `name` (a file stem) can name a pair: a DNS name in lower case, or
/// `_wildcard.` and one. Nothing else reaches a rendered config.
fn valid_name(name: &str) -> bool {
    let host = name.strip_prefix(WILDCARD_PREFIX).unwrap_or(name);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// Reads every pair of `certs_dir` (if any), then `supplied` (the store's, then ACME's),
/// writes the good ones to `serve_dir` (only files whose bytes change) in order of
/// precedence, and returns them with a warning per bad pair.
pub fn load(
    certs_dir: Option<&Path>,
    supplied: &[Supplied],
    serve_dir: &Path,
) -> (CertSet, Vec<String>) {
    let mut warnings = Vec::new();
    let mut set = CertSet::default();
    // (source, name, where from, the crt and key bytes or why they could not be read)
    type Candidate = (Origin, String, String, Result<(Vec<u8>, Vec<u8>), String>);
    let mut candidates: Vec<Candidate> = Vec::new();
    if let Some(dir) = certs_dir {
        match std::fs::read_dir(dir) {
            Ok(entries) => {
                let mut stems: Vec<String> = entries
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter_map(|f| f.strip_suffix(".crt").map(str::to_string))
                    .collect();
                stems.sort();
                for stem in stems {
                    let crt_path = dir.join(format!("{stem}.crt"));
                    let key_path = dir.join(format!("{stem}.key"));
                    let read = |p: &Path| {
                        std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
                    };
                    let bytes = read(&crt_path).and_then(|c| read(&key_path).map(|k| (c, k)));
                    candidates.push((Origin::File, stem, crt_path.display().to_string(), bytes));
                }
            }
            Err(e) => warnings.push(format!(
                "https certs_dir {}: cannot read it ({e}); no certificates from files",
                dir.display()
            )),
        }
    }
    let mut supplied: Vec<&Supplied> = supplied.iter().collect();
    supplied.sort_by(|a, b| (a.origin, &a.name).cmp(&(b.origin, &b.name)));
    for s in supplied {
        candidates.push((
            s.origin,
            s.name.clone(),
            s.what.clone(),
            Ok((s.crt.clone(), s.key.clone())),
        ));
    }
    if candidates.is_empty() {
        return (set, warnings);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if let Err(e) = std::fs::create_dir_all(serve_dir) {
        warnings.push(format!(
            "https serve_dir {}: cannot create it ({e}); no HTTPS",
            serve_dir.display()
        ));
        return (set, warnings);
    }
    for (origin, name, what, bytes) in candidates {
        if !valid_name(&name) {
            warnings.push(match origin {
                Origin::File => format!(
                    "{what}: skipped: expected <host>.crt or _wildcard.<domain>.crt with a lower-case DNS name"
                ),
                _ => format!(
                    "{what}: skipped: expected a lower-case DNS name or _wildcard.<domain> as its name"
                ),
            });
            continue;
        }
        // A higher source serves it already (see the module docs).
        if set.covers_name(&name) {
            continue;
        }
        let checked = bytes.and_then(|(c, k)| check_pair(&name, &c, &k, now).map(|r| (c, k, r)));
        let (crt, key, (names, serial, not_after)) = match checked {
            Ok(x) => x,
            Err(e) => {
                warnings.push(format!("{what}: skipped: {e}"));
                continue;
            }
        };
        let pem = serve_dir.join(format!("{name}.pem"));
        let mut bytes = crt;
        if !bytes.ends_with(b"\n") {
            bytes.push(b'\n');
        }
        bytes.extend_from_slice(&key);
        if let Err(e) = write_if_changed(&pem, &bytes) {
            warnings.push(format!(
                "{what}: skipped: cannot write {}: {e}",
                pem.display()
            ));
            continue;
        }
        set.pairs.insert(
            name.clone(),
            Arc::new(Pair {
                name,
                names,
                pem,
                serial,
                not_after,
                origin,
            }),
        );
    }
    if !set.pairs.is_empty() {
        let list = serve_dir.join("crt-list");
        let text: String = set
            .pairs
            .values()
            .map(|p| format!("{}\n", p.pem.display()))
            .collect();
        match write_if_changed(&list, text.as_bytes()) {
            Ok(()) => set.crt_list = Some(list),
            Err(e) => {
                warnings.push(format!(
                    "{}: cannot write it ({e}); no HTTPS",
                    list.display()
                ));
                set.pairs.clear();
            }
        }
    }
    (set, warnings)
}

/// Replaces `path` atomically (temp file in the same directory, fsync, rename), mode 0600:
/// it holds a private key.
fn write_if_changed(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_names_or_wildcard_prefixed() {
        for ok in ["a.test", "_wildcard.w.test", "x-1.example.com", "localhost"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "*.w.test",
            "A.test",
            "a..test",
            "a test",
            "-a.test",
            "a/b",
            "_wildcard.",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    fn pair(name: &str, names: &[&str]) -> (String, Arc<Pair>) {
        (
            name.to_string(),
            Arc::new(Pair {
                name: name.into(),
                names: names.iter().map(|s| s.to_string()).collect(),
                pem: PathBuf::from(format!("/s/{name}.pem")),
                serial: "01".into(),
                not_after: 0,
                origin: Origin::File,
            }),
        )
    }

    #[test]
    fn renewed_pairs_are_those_served_before_with_another_certificate() {
        let set = |pairs: &[(&str, &str)]| CertSet {
            pairs: pairs
                .iter()
                .map(|(n, serial)| {
                    let (k, p) = pair(n, &[n]);
                    let mut p = (*p).clone();
                    p.serial = serial.to_string();
                    (k, Arc::new(p))
                })
                .collect(),
            crt_list: None,
        };
        let old = set(&[("a.test", "01"), ("b.test", "02")]);
        let new = set(&[("a.test", "11"), ("b.test", "02"), ("c.test", "03")]);
        let names = |v: Vec<Arc<Pair>>| v.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        // A new pair (c) is no renewal, nor an unchanged one (b).
        assert_eq!(names(renewed(&old, &new)), ["a.test"]);
        assert!(renewed(&new, &new).is_empty());
        assert!(renewed(&CertSet::default(), &new).is_empty());
    }

    #[test]
    fn cover_prefers_the_named_pair_then_names_then_wildcards() {
        let set = CertSet {
            pairs: [
                pair("a.test", &["a.test"]),
                pair("multi.test", &["multi.test", "b.test", "*.m.test"]),
                pair("_wildcard.w.test", &["*.w.test"]),
            ]
            .into(),
            crt_list: None,
        };
        let by = |h: &str| set.cover(h).map(|p| p.name.clone());
        assert_eq!(by("a.test").as_deref(), Some("a.test"));
        assert_eq!(by("B.test").as_deref(), Some("multi.test"));
        assert_eq!(by("x.w.test").as_deref(), Some("_wildcard.w.test"));
        assert_eq!(by("x.m.test").as_deref(), Some("multi.test"));
        // One level only, and no certificate: HTTP only.
        assert_eq!(by("y.x.w.test"), None);
        assert_eq!(by("w.test"), None);
        assert_eq!(by("c.test"), None);
    }

    /// A self-signed `(cert PEM, key PEM)` for `names`.
    fn self_signed(names: &[&str]) -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
    }

    fn supplied(origin: Origin, name: &str, (crt, key): (Vec<u8>, Vec<u8>)) -> Supplied {
        Supplied {
            origin,
            name: name.into(),
            crt,
            key,
            what: format!("{origin:?} {name}"),
        }
    }

    #[test]
    fn files_then_store_then_acme_per_name() {
        let dir = tempfile::tempdir().unwrap();
        let (certs, serve) = (dir.path().join("certs"), dir.path().join("serve"));
        std::fs::create_dir_all(&certs).unwrap();
        for (stem, names) in [
            ("a.test", &["a.test"][..]),
            ("_wildcard.w.test", &["*.w.test"]),
        ] {
            let (crt, key) = self_signed(names);
            std::fs::write(certs.join(format!("{stem}.crt")), crt).unwrap();
            std::fs::write(certs.join(format!("{stem}.key")), key).unwrap();
        }
        let (bad_crt, _) = self_signed(&["d.test"]);
        let (_, other_key) = self_signed(&["d.test"]);
        let given = vec![
            // Listed out of order: precedence does not depend on it.
            supplied(Origin::Acme, "a.test", self_signed(&["a.test"])),
            supplied(Origin::Store, "a.test", self_signed(&["a.test"])),
            supplied(Origin::Store, "b.test", self_signed(&["b.test"])),
            supplied(Origin::Acme, "b.test", self_signed(&["b.test"])),
            supplied(Origin::Acme, "x.w.test", self_signed(&["x.w.test"])),
            supplied(Origin::Acme, "c.test", self_signed(&["c.test"])),
            supplied(Origin::Store, "d.test", (bad_crt, other_key)),
            supplied(Origin::Acme, "d.test", self_signed(&["d.test"])),
            supplied(Origin::Store, "e.test", self_signed(&["other.test"])),
            supplied(Origin::Store, "F.test", self_signed(&["f.test"])),
        ];
        let (set, warnings) = load(Some(&certs), &given, &serve);
        let origins: Vec<(&str, Origin)> = set
            .pairs
            .values()
            .map(|p| (p.name.as_str(), p.origin))
            .collect();
        assert_eq!(
            origins,
            [
                ("_wildcard.w.test", Origin::File),
                ("a.test", Origin::File),
                ("b.test", Origin::Store),
                ("c.test", Origin::Acme),
                // The store's pair is bad: the next source serves the name.
                ("d.test", Origin::Acme),
            ]
        );
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(warnings
            .iter()
            .any(|w| w == "Store d.test: skipped: the private key does not match the certificate"));
        assert!(warnings
            .iter()
            .any(|w| w.starts_with("Store e.test: skipped: the certificate does not name e.test")));
        assert!(warnings
            .iter()
            .any(|w| w.starts_with("Store F.test: skipped: expected a lower-case DNS name")));
        // Served as file pairs are: one PEM per pair, and the crt-list.
        let pem = std::fs::read_to_string(serve.join("c.test.pem")).unwrap();
        assert!(pem.contains("BEGIN CERTIFICATE") && pem.contains("PRIVATE KEY"));
        let list = std::fs::read_to_string(serve.join("crt-list")).unwrap();
        assert_eq!(list.lines().count(), 5, "{list}");
        // Without a certificates directory, the others are still served.
        let (set, _) = load(None, &given, &serve);
        assert_eq!(set.cover("a.test").unwrap().origin, Origin::Store);
        assert_eq!(set.cover("x.w.test").unwrap().origin, Origin::Acme);
    }
}
