//! Signals by name: what `exec.reload_signal` and `--exec-reload-signal` accept, what a
//! template's reload sends to the supervised proxy, and what confd forwards to it.
//!
//! A leaf: the configuration ([`crate::config`]), the check and reload commands
//! ([`crate::command`]) and the supervisor ([`crate::exec`]) all name signals, and none of
//! them needs another to do so.

use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::fmt;

/// A signal, by name (`SIGHUP`, `HUP`, `hup`) or number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Signal(pub i32);

const SIGNALS: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("USR1", libc::SIGUSR1),
    ("USR2", libc::SIGUSR2),
    ("TERM", libc::SIGTERM),
    ("WINCH", libc::SIGWINCH),
    ("ALRM", libc::SIGALRM),
    ("CONT", libc::SIGCONT),
];

impl Signal {
    /// SIGHUP: the default reload signal (nginx and HAProxy's master reload on it).
    pub const HUP: Signal = Signal(libc::SIGHUP);
    /// SIGTERM.
    pub const TERM: Signal = Signal(libc::SIGTERM);
    /// SIGINT.
    pub const INT: Signal = Signal(libc::SIGINT);
    /// SIGQUIT.
    pub const QUIT: Signal = Signal(libc::SIGQUIT);
    /// SIGUSR1.
    pub const USR1: Signal = Signal(libc::SIGUSR1);
    /// SIGUSR2.
    pub const USR2: Signal = Signal(libc::SIGUSR2);

    /// Parses `SIGHUP`, `HUP` (any case) or a number.
    pub fn parse(s: &str) -> Result<Signal, String> {
        let t = s.trim().to_ascii_uppercase();
        let name = t.strip_prefix("SIG").unwrap_or(&t);
        if let Some((_, n)) = SIGNALS.iter().find(|(k, _)| *k == name) {
            return Ok(Signal(*n));
        }
        match name.parse::<i32>() {
            Ok(n) if (1..=64).contains(&n) && n != libc::SIGKILL && n != libc::SIGSTOP => {
                Ok(Signal(n))
            }
            _ => Err(format!(
                "invalid signal {s:?}: expected a name like SIGHUP, SIGUSR2 or SIGTERM"
            )),
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match SIGNALS.iter().find(|(_, n)| *n == self.0) {
            Some((name, _)) => write!(f, "SIG{name}"),
            None => write!(f, "signal {}", self.0),
        }
    }
}

impl<'de> Deserialize<'de> for Signal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Signal, D::Error> {
        let s = String::deserialize(d)?;
        Signal::parse(&s).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_or_number() {
        assert_eq!(Signal::parse("SIGHUP").unwrap(), Signal::HUP);
        assert_eq!(Signal::parse("usr2").unwrap(), Signal::USR2);
        assert_eq!(Signal::parse("15").unwrap(), Signal::TERM);
        assert_eq!(Signal::USR2.to_string(), "SIGUSR2");
        for bad in ["SIGFOO", "9", "0", ""] {
            let e = Signal::parse(bad).unwrap_err();
            assert!(e.contains("expected a name like SIGHUP"), "{bad}: {e}");
        }
    }
}
