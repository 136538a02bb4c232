//! Validation and mapping of the untrusted values that end up in proxy configs: addresses,
//! DNS names, virtual hosts and config-safe tokens.
//!
//! A leaf module: [`crate::source`] (which refuses instances with a bad address),
//! [`crate::model`] (which computes each instance's virtual host) and [`crate::render`]'s helpers (the
//! `addr`, `vhost` and `*_name` helpers) all need these rules. One copy here keeps them in
//! agreement: the data a template sees and what its helpers accept cannot drift.

use std::net::IpAddr;

/// An IP address or a DNS name: what may stand in a `server` line.
pub fn is_address(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok() || is_dns_name(s)
}

/// RFC 1123 host name: dot-separated labels of letters, digits and `-`, not starting or ending
/// with `-`, at most 253 characters.
pub fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The virtual host of an instance whose metadata `meta` looks up: meta `vhost`, or meta
/// `hostname` + `.` + meta `domain` (a leading `.` of the domain dropped), lowercased; `None`
/// when absent, empty or not a valid DNS name.
///
/// Takes a lookup rather than a map so that the model (a `BTreeMap<String, String>`) and the
/// `vhost` helper (a JSON object) share it without converting one into the other.
pub fn vhost<'a>(meta: impl Fn(&str) -> Option<&'a str>) -> Option<String> {
    let nonempty = |k| meta(k).filter(|v| !v.is_empty());
    let v = match (nonempty("vhost"), nonempty("hostname")) {
        (Some(v), _) => v.to_ascii_lowercase(),
        (None, Some(h)) => match nonempty("domain") {
            Some(d) => {
                let d = d.trim_start_matches('.');
                let mut v = String::with_capacity(h.len() + 1 + d.len());
                v.push_str(h);
                v.push('.');
                v.push_str(d);
                v.make_ascii_lowercase();
                v
            }
            None => h.to_ascii_lowercase(),
        },
        (None, None) => return None,
    };
    is_dns_name(&v).then_some(v)
}

/// Whether `s` is already a config-safe token (see [`safe_token`]): non-empty and only
/// `[A-Za-z0-9_.-]`.
pub fn is_safe_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Maps any text onto `[A-Za-z0-9_.-]+`: other characters become `_`, and when anything had to
/// change a short hash of the original is appended so distinct inputs stay distinct.
pub fn safe_token(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 9);
    push_safe_token(s, &mut out);
    out
}

/// [`safe_token`] appended to `out`, without allocating (the `*_name` helpers write it
/// straight into the rendered output, once per server line).
pub fn push_safe_token(s: &str, out: &mut String) {
    if is_safe_token(s) {
        out.push_str(s);
        return;
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    out.extend(s.chars().map(|c| if ok(c) { c } else { '_' }));
    out.push('-');
    let h = fnv1a(s.as_bytes()) as u32;
    for shift in (0..8).rev() {
        let d = (h >> (shift * 4)) & 15;
        out.push(char::from_digit(d, 16).expect("a hex digit"));
    }
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100000001b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn addresses_and_dns_names() {
        let cases = [
            ("10.0.0.1", true),
            ("fd00::1", true),
            ("web.local", true),
            ("a-b.c", true),
            ("1.2.3.4; }", false),
            ("", false),
            ("-a.b", false),
            ("a..b", false),
            ("a b", false),
            ("a\nb", false),
        ];
        for (s, ok) in cases {
            assert_eq!(is_address(s), ok, "{s:?}");
        }
    }

    #[test]
    fn vhosts_from_meta() {
        type Meta<'a> = &'a [(&'a str, &'a str)];
        let cases: [(Meta, Option<&str>); 8] = [
            (&[], None),
            (&[("hostname", "2048")], Some("2048")),
            (
                &[("hostname", "2048"), ("domain", "local.com")],
                Some("2048.local.com"),
            ),
            (
                &[("hostname", "App"), ("domain", ".Local.com")],
                Some("app.local.com"),
            ),
            (
                &[("vhost", "RestServer.local"), ("hostname", "x")],
                Some("restserver.local"),
            ),
            (&[("vhost", ""), ("hostname", "x")], Some("x")),
            (&[("vhost", "a; } server { listen 81; }")], None),
            (&[("domain", "local.com")], None),
        ];
        for (meta, want) in cases {
            let m: BTreeMap<&str, &str> = meta.iter().copied().collect();
            assert_eq!(vhost(|k| m.get(k).copied()).as_deref(), want, "{meta:?}");
        }
    }

    #[test]
    fn safe_tokens_cannot_inject_and_do_not_collide() {
        let hostile = "a; } server { listen 81; }";
        let t = safe_token(hostile);
        assert!(is_safe_token(&t), "{t}");
        assert_ne!(safe_token("a b"), safe_token("a_b"));
        assert_eq!(safe_token("a_b"), "a_b");
        assert_eq!(safe_token("web-1.local"), "web-1.local");
        assert!(safe_token("").starts_with('-'));
        assert!(safe_token("é").ends_with(&format!("{:08x}", fnv1a("é".as_bytes()) as u32)));
        assert_eq!(
            safe_token("a:b"),
            format!("a_b-{:08x}", fnv1a(b"a:b") as u32)
        );
        let mut out = "x ".to_string();
        push_safe_token("a:b", &mut out);
        assert_eq!(out, format!("x {}", safe_token("a:b")));
    }
}
