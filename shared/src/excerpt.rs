//! Quoting untrusted values in log lines without letting them take the line over.
//!
//! Names, tags and label values come from containers and can be megabytes long (a hostile
//! label would otherwise make a 1.2 MB warning line). Every log line or error message that quotes such a value goes
//! through [`excerpt`], which keeps the start of the value and says how long the whole was.

use std::fmt;

/// Characters of a value kept when it is cut (enough to recognise it).
pub const EXCERPT_CHARS: usize = 64;

/// A value shortened for a log line: the whole value when it has at most [`EXCERPT_CHARS`]
/// characters, else its first [`EXCERPT_CHARS`] characters, `…` and the full length in bytes:
/// `aaaa… (2097152 bytes)`.
///
/// Control characters are kept as they are: callers quote with `{:?}` (or use the `Debug`
/// form of this type, which quotes), so a newline in a value never splits a log line.
#[derive(Clone, Copy)]
pub struct Excerpt<'a>(&'a str);

/// `value` shortened for a log line (see [`Excerpt`]).
pub fn excerpt(value: &str) -> Excerpt<'_> {
    Excerpt(value)
}

impl Excerpt<'_> {
    /// The kept part, and the full length in bytes when the value was cut.
    fn parts(&self) -> (&str, Option<usize>) {
        match self.0.char_indices().nth(EXCERPT_CHARS) {
            Some((cut, _)) => (&self.0[..cut], Some(self.0.len())),
            None => (self.0, None),
        }
    }
}

impl fmt::Display for Excerpt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.parts() {
            (all, None) => f.write_str(all),
            (head, Some(len)) => write!(f, "{head}… ({len} bytes)"),
        }
    }
}

/// Quoted and escaped, like `str`'s `Debug`, with the length outside the quotes.
impl fmt::Debug for Excerpt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.parts() {
            (all, None) => write!(f, "{all:?}"),
            (head, Some(len)) => write!(f, "{head:?}… ({len} bytes)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_whole_long_ones_cut_with_their_length() {
        let long = "a".repeat(2 << 20);
        let exact = "b".repeat(EXCERPT_CHARS);
        let wide = "é".repeat(100);
        let table: [(&str, String, String); 5] = [
            ("", String::new(), r#""""#.into()),
            ("web", "web".into(), r#""web""#.into()),
            (&exact, exact.clone(), format!("{exact:?}")),
            (
                &long,
                format!("{}… (2097152 bytes)", "a".repeat(64)),
                format!("\"{}\"… (2097152 bytes)", "a".repeat(64)),
            ),
            (
                &wide,
                format!("{}… (200 bytes)", "é".repeat(64)),
                format!("\"{}\"… (200 bytes)", "é".repeat(64)),
            ),
        ];
        for (value, display, debug) in table {
            assert_eq!(excerpt(value).to_string(), display, "{}", excerpt(value));
            assert_eq!(format!("{:?}", excerpt(value)), debug);
        }
        assert_eq!(format!("{:?}", excerpt("a\nb")), r#""a\nb""#);
    }
}
