//! Human durations (`500ms`, `5s`, `1m30s`) as the config file and `--wait` write them.
//!
//! Parsed here rather than with a crate because the grammar is tiny and the error message must
//! say what was expected, since it ends up in a config error with file, line and column.

use std::time::Duration;

/// Parses `<number><unit>` pieces (`ms`, `s`, `m`, `h`), e.g. `250ms`, `5s`, `1m30s`. A bare
/// `0` is zero.
pub fn parse(s: &str) -> Result<Duration, String> {
    let expected = || format!("invalid duration {s:?}: expected e.g. 500ms, 5s, 1m30s");
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    if t.is_empty() {
        return Err(expected());
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(expected)?;
        if digits == 0 {
            return Err(expected());
        }
        let n: f64 = rest[..digits].parse().map_err(|_| expected())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(expected()),
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(n * unit).map_err(|_| expected())?;
    }
    Ok(total)
}

/// serde adapter: a duration written as text (`"5s"`) in YAML.
pub mod serde_text {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    /// Deserialises `"5s"`-style text.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_combinations() {
        let ok = [
            ("0", 0),
            ("500ms", 500),
            ("5s", 5000),
            ("1.5s", 1500),
            ("2m", 120_000),
            ("1m30s", 90_000),
            ("1h", 3_600_000),
        ];
        for (s, ms) in ok {
            assert_eq!(parse(s).unwrap(), Duration::from_millis(ms), "{s}");
        }
    }

    #[test]
    fn rejects_garbage_saying_what_is_expected() {
        for s in ["", "5", "s", "5x", "-1s", "1s2", "ms"] {
            let e = parse(s).unwrap_err();
            assert!(e.contains("expected"), "{s}: {e}");
        }
    }
}
