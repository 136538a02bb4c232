//! Drain before stop: a container's services leave the store the moment Docker sends it its
//! stop signal, not when its process exits.
//!
//! `docker stop` (and compose's stop, scale down and down) signals the container, then waits up
//! to its stop timeout for the process to exit. A well-behaved app finishes its in-flight
//! requests in that time; if the proxy keeps sending it new ones until `die`, those fail. So
//! the registrator withdraws the services at the signal, and the app drains in peace.
//!
//! Inspection cannot see this (the container is running until its process exits), so this is
//! the registrator's one piece of event-triggered state: the `kill` events Docker logs when it
//! signals a container, judged against what the container's inspection says (its stop signal,
//! its stop timeout, the `SERVICE_DRAIN` opt-out, when its current run started). Only the
//! container's own stop signal drains: `docker kill -s HUP` as a reload withdraws nothing. A
//! drain ends when the run it was meant for ends (not running, or started after the signal),
//! or at its deadline, the stop timeout plus [`MARGIN`]: a container still running then
//! ignored the signal or used it for something else, and is served again.
//!
//! Everything here is pure (time is passed in), so the rules are unit tested; the watcher in
//! `docker` feeds it events and inspections and applies the answers.

use crate::derive::ContainerInfo;
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// How long past its stop timeout a signalled container stays withdrawn before it is judged to
/// have ignored the signal. Docker kills it at the timeout, and its `die` normally arrives
/// within milliseconds of that; the margin keeps a slow engine from causing a re-registration
/// just before the container dies.
pub const MARGIN: Duration = Duration::from_secs(5);

/// Docker's stop timeout when the container sets none (`docker stop` without `-t`).
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on kills remembered for a container not inspected yet (a burst of `docker kill -s`).
const MAX_UNJUDGED: usize = 8;

/// How a container is stopped, from its inspection. It cannot change while the container
/// exists (`docker update` does not touch these), so any inspection's answer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopSpec {
    /// Signal number of `Config.StopSignal` (SIGTERM when unset); `None` when Docker's value is
    /// not a signal we know, and then nothing drains.
    pub signal: Option<i32>,
    /// `Config.StopTimeout` (10 s when unset); `None` when negative, Docker's "wait forever".
    pub timeout: Option<Duration>,
    /// Draining is on unless `SERVICE_DRAIN` (label, else env) says `false`, `0`, `no` or `off`.
    pub drain: bool,
}

impl StopSpec {
    /// The spec of a container from `Config.StopSignal`, `Config.StopTimeout` and its
    /// `SERVICE_DRAIN` label or env.
    pub fn new(stop_signal: Option<&str>, stop_timeout: Option<i64>, info: &ContainerInfo) -> Self {
        let signal = match stop_signal.map(str::trim) {
            None | Some("") => Some(libc::SIGTERM),
            Some(s) => parse_signal(s),
        };
        let timeout = match stop_timeout {
            None => Some(DEFAULT_STOP_TIMEOUT),
            Some(t) if t < 0 => None,
            Some(t) => Some(Duration::from_secs(t.unsigned_abs())),
        };
        StopSpec {
            signal,
            timeout,
            drain: drain_enabled(info),
        }
    }
}

/// `SERVICE_DRAIN`: a label wins over the env, as for every `SERVICE_*` key. Per container,
/// not per port: the signal goes to the whole container.
fn drain_enabled(info: &ContainerInfo) -> bool {
    let env = info
        .env
        .iter()
        .filter_map(|e| e.split_once('='))
        .filter(|(k, _)| *k == "SERVICE_DRAIN")
        .map(|(_, v)| v)
        .next_back();
    let value = info.labels.get("SERVICE_DRAIN").map(String::as_str).or(env);
    !value.is_some_and(|v| {
        let v = v.trim();
        ["false", "0", "no", "off"]
            .iter()
            .any(|off| v.eq_ignore_ascii_case(off))
    })
}

/// A signal as Docker accepts it in `STOPSIGNAL`/`--stop-signal`: a number, or a name with or
/// without `SIG`, in any case (`SIGTERM`, `term`, `15`, `SIGRTMIN+3`). Linux numbering, the
/// engine's.
pub fn parse_signal(s: &str) -> Option<i32> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    // Docker's Linux table: RTMIN is 34, RTMAX 64.
    if let Some(rest) = name.strip_prefix("RTMIN") {
        let n = if rest.is_empty() {
            0
        } else {
            rest.strip_prefix('+')?.parse::<i32>().ok()?
        };
        return (0..=30).contains(&n).then_some(34 + n);
    }
    if let Some(rest) = name.strip_prefix("RTMAX") {
        let n = if rest.is_empty() {
            0
        } else {
            rest.strip_prefix('-')?.parse::<i32>().ok()?
        };
        return (0..=30).contains(&n).then_some(64 - n);
    }
    let n = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "ILL" => libc::SIGILL,
        "TRAP" => libc::SIGTRAP,
        "ABRT" | "IOT" => libc::SIGABRT,
        "BUS" => libc::SIGBUS,
        "FPE" => libc::SIGFPE,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "SEGV" => libc::SIGSEGV,
        "USR2" => libc::SIGUSR2,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "STKFLT" => 16,
        "CHLD" => libc::SIGCHLD,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "TSTP" => libc::SIGTSTP,
        "TTIN" => libc::SIGTTIN,
        "TTOU" => libc::SIGTTOU,
        "URG" => libc::SIGURG,
        "XCPU" => libc::SIGXCPU,
        "XFSZ" => libc::SIGXFSZ,
        "VTALRM" => libc::SIGVTALRM,
        "PROF" => libc::SIGPROF,
        "WINCH" => libc::SIGWINCH,
        "IO" | "POLL" => libc::SIGIO,
        "PWR" => 30,
        "SYS" => libc::SIGSYS,
        _ => return None,
    };
    Some(n)
}

/// A Docker timestamp (`State.StartedAt`, RFC 3339 with up to nine fractional digits) as
/// nanoseconds since the Unix epoch, the unit of an event's `timeNano`. `None` for anything
/// else, including Docker's zero time (year 1), which is out of range.
pub fn parse_docker_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if part.is_empty() || !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, min, sec) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 {
        return None;
    }
    if sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos: i64 = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        let end = start + b[start..].iter().take_while(|c| c.is_ascii_digit()).count();
        if end == start || end - start > 9 {
            return None;
        }
        nanos = digits(start..end)? * 10i64.pow(9 - (end - start) as u32);
        i = end;
    }
    let offset_secs = match &s[i..] {
        "Z" | "z" => 0,
        tz if tz.len() == 6 && (tz.starts_with('+') || tz.starts_with('-')) => {
            if tz.as_bytes()[3] != b':' {
                return None;
            }
            let (h, m) = (digits(i + 1..i + 3)?, digits(i + 4..i + 6)?);
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec - offset_secs;
    let total = i128::from(secs) * 1_000_000_000 + i128::from(nanos);
    i64::try_from(total).ok()
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// One `kill` event: which signal, and when Docker sent it (on the engine's clock, to compare
/// with `StartedAt`, and on ours, for the deadline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kill {
    /// Signal number (the event's `signal` attribute).
    pub signal: i32,
    /// The event's `timeNano`.
    pub sent_ns: i64,
    /// The same moment on our monotonic clock (an event replayed after a reconnect is older
    /// than the moment we read it).
    pub sent: Instant,
}

/// A drain in progress: the run it is for and when to give up on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Drain {
    /// When the stop signal was sent (engine clock): the run it targets started before.
    sent_ns: i64,
    /// Stop timeout + [`MARGIN`] after the signal; `None`: until the run ends.
    until: Option<Instant>,
}

/// Containers draining, and kills not judged yet, by container ID.
#[derive(Debug, Default)]
pub struct Drains {
    draining: HashMap<String, Drain>,
    /// Kills of containers whose stop signal is not known yet (no inspection applied, e.g. the
    /// registrator just started while a `docker stop` was under way). Judged at the first
    /// inspection.
    unjudged: HashMap<String, Vec<Kill>>,
}

impl Drains {
    /// Docker signalled `id`. `spec` is what its last inspection said, if any. Returns whether
    /// this starts or extends a drain: the caller withdraws the container's services at once.
    pub fn kill(&mut self, id: &str, kill: Kill, spec: Option<&StopSpec>) -> bool {
        match spec {
            Some(spec) => self.judge(id, kill, spec),
            None => {
                let pending = self.unjudged.entry(id.to_string()).or_default();
                if pending.len() < MAX_UNJUDGED {
                    pending.push(kill);
                }
                false
            }
        }
    }

    fn judge(&mut self, id: &str, kill: Kill, spec: &StopSpec) -> bool {
        if !spec.drain || spec.signal != Some(kill.signal) {
            return false;
        }
        let drain = Drain {
            sent_ns: kill.sent_ns,
            until: spec.timeout.map(|t| kill.sent + t + MARGIN),
        };
        match self.draining.get(id) {
            // A replayed older signal never shortens a newer drain.
            Some(d) if d.sent_ns > drain.sent_ns => {}
            _ => {
                self.draining.insert(id.to_string(), drain);
            }
        }
        true
    }

    /// An inspection of `id` is being applied: judges kills that waited for it, ends a drain
    /// whose run is over (not running, or a run started after the signal) or whose deadline
    /// passed, and returns whether the container is draining at `now`.
    pub fn inspected(
        &mut self,
        id: &str,
        spec: &StopSpec,
        running: bool,
        started_ns: Option<i64>,
        now: Instant,
    ) -> bool {
        for kill in self.unjudged.remove(id).unwrap_or_default() {
            self.judge(id, kill, spec);
        }
        let Some(d) = self.draining.get(id) else {
            return false;
        };
        let over = !running
            || started_ns.is_some_and(|s| s > d.sent_ns)
            || d.until.is_some_and(|u| now >= u);
        if over {
            self.draining.remove(id);
        }
        !over
    }

    /// The container is gone: nothing to drain.
    pub fn forget(&mut self, id: &str) {
        self.draining.remove(id);
        self.unjudged.remove(id);
    }

    /// The earliest deadline of a drain in progress: when to look at a container again.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.draining.values().filter_map(|d| d.until).min()
    }

    /// Ends the drains whose deadline has passed and returns their containers, to be
    /// inspected again (and served if still running).
    pub fn take_expired(&mut self, now: Instant) -> Vec<String> {
        let ids: Vec<String> = self
            .draining
            .iter()
            .filter(|(_, d)| d.until.is_some_and(|u| now >= u))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            self.draining.remove(id);
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(env: &[&str], labels: &[(&str, &str)]) -> ContainerInfo {
        ContainerInfo {
            env: env.iter().map(|s| s.to_string()).collect(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn parses_signals_as_docker_does() {
        let cases = [
            ("SIGTERM", Some(15)),
            ("TERM", Some(15)),
            ("term", Some(15)),
            ("15", Some(15)),
            (" SIGQUIT ", Some(3)),
            ("SIGHUP", Some(1)),
            ("SIGKILL", Some(9)),
            ("SIGUSR1", Some(10)),
            ("SIGWINCH", Some(28)),
            ("SIGRTMIN", Some(34)),
            ("SIGRTMIN+3", Some(37)),
            ("RTMAX", Some(64)),
            ("SIGRTMAX-2", Some(62)),
            ("0", None),
            ("65", None),
            ("SIGNOPE", None),
            ("SIGRTMIN3", None),
            ("", None),
        ];
        for (s, want) in cases {
            assert_eq!(parse_signal(s), want, "{s:?}");
        }
    }

    #[test]
    fn stop_specs() {
        let plain = info(&[], &[]);
        let s = StopSpec::new(None, None, &plain);
        assert_eq!(
            s,
            StopSpec {
                signal: Some(15),
                timeout: Some(Duration::from_secs(10)),
                drain: true
            }
        );
        let s = StopSpec::new(Some(""), Some(3), &plain);
        assert_eq!(
            (s.signal, s.timeout),
            (Some(15), Some(Duration::from_secs(3)))
        );
        let s = StopSpec::new(Some("SIGQUIT"), Some(-1), &plain);
        assert_eq!((s.signal, s.timeout), (Some(3), None));
        assert_eq!(StopSpec::new(Some("bogus"), None, &plain).signal, None);
        let cases = [
            (info(&["SERVICE_DRAIN=false"], &[]), false),
            (info(&["SERVICE_DRAIN=0"], &[]), false),
            (info(&[], &[("SERVICE_DRAIN", "Off")]), false),
            (info(&["SERVICE_DRAIN=true"], &[]), true),
            (info(&["SERVICE_DRAIN="], &[]), true),
            (
                info(&["SERVICE_DRAIN=false"], &[("SERVICE_DRAIN", "true")]),
                true,
            ),
            (
                info(&["SERVICE_DRAIN=true"], &[("SERVICE_DRAIN", "no")]),
                false,
            ),
            (info(&["SERVICE_80_DRAIN=false"], &[]), true),
        ];
        for (i, want) in cases {
            assert_eq!(StopSpec::new(None, None, &i).drain, want, "{i:?}");
        }
    }

    #[test]
    fn parses_docker_times() {
        let cases = [
            ("1970-01-01T00:00:00Z", Some(0)),
            ("1970-01-01T00:00:01.5Z", Some(1_500_000_000)),
            (
                "2026-11-26T14:27:06.919209392Z",
                Some(1_795_703_226_919_209_392),
            ),
            (
                "2026-11-26T15:27:06.919209392+01:00",
                Some(1_795_703_226_919_209_392),
            ),
            ("2000-02-29T12:00:00Z", Some(951_825_600_000_000_000)),
            ("0001-01-01T00:00:00Z", None),
            ("2026-11-26 14:27:06Z", None),
            ("2026-13-26T14:27:06Z", None),
            ("2026-11-26T14:27:06.1234567890Z", None),
            ("2026-11-26T14:27:06", None),
            ("", None),
        ];
        for (s, want) in cases {
            assert_eq!(parse_docker_time(s), want, "{s:?}");
        }
    }

    /// A table of event sequences: what `kill` answers, then what `inspected` says later.
    #[test]
    fn drains_follow_the_stop_signal_and_the_run() {
        let t0 = Instant::now();
        let spec = StopSpec {
            signal: Some(15),
            timeout: Some(Duration::from_secs(10)),
            drain: true,
        };
        let forever = StopSpec {
            timeout: None,
            ..spec.clone()
        };
        let opted_out = StopSpec {
            drain: false,
            ..spec.clone()
        };
        let quit = StopSpec {
            signal: Some(3),
            ..spec.clone()
        };
        let started = 1_000;
        let kill = |signal, at_ns: i64, after: u64| Kill {
            signal,
            sent_ns: at_ns,
            sent: t0 + Duration::from_secs(after),
        };
        let secs = |s: u64| t0 + Duration::from_secs(s);
        /// One container's stop: its spec and kill, whether its services are withdrawn at once, then an inspection (running, started, when) and whether it is still draining.
        struct DrainCase<'a> {
            what: &'a str,
            spec: &'a StopSpec,
            kill: Kill,
            withdraw_at_once: bool,
            running: bool,
            started_ns: Option<i64>,
            at: Instant,
            draining: bool,
        }
        let cases = vec![
            DrainCase {
                what: "stop signal drains",
                spec: &spec,
                kill: kill(15, 2_000, 0),
                withdraw_at_once: true,
                running: true,
                started_ns: Some(started),
                at: secs(1),
                draining: true,
            },
            DrainCase {
                what: "until the deadline",
                spec: &spec,
                kill: kill(15, 2_000, 0),
                withdraw_at_once: true,
                running: true,
                started_ns: Some(started),
                at: secs(14),
                draining: true,
            },
            DrainCase {
                what: "then serves again",
                spec: &spec,
                kill: kill(15, 2_000, 0),
                withdraw_at_once: true,
                running: true,
                started_ns: Some(started),
                at: secs(15),
                draining: false,
            },
            DrainCase {
                what: "a reload signal drains nothing",
                spec: &spec,
                kill: kill(1, 2_000, 0),
                withdraw_at_once: false,
                running: true,
                started_ns: Some(started),
                at: secs(1),
                draining: false,
            },
            DrainCase {
                what: "SIGKILL drains nothing",
                spec: &spec,
                kill: kill(9, 2_000, 0),
                withdraw_at_once: false,
                running: true,
                started_ns: Some(started),
                at: secs(1),
                draining: false,
            },
            DrainCase {
                what: "the drain ends when the run does",
                spec: &spec,
                kill: kill(15, 2_000, 0),
                withdraw_at_once: true,
                running: false,
                started_ns: Some(started),
                at: secs(1),
                draining: false,
            },
            DrainCase {
                what: "a later run is served",
                spec: &spec,
                kill: kill(15, 2_000, 0),
                withdraw_at_once: true,
                running: true,
                started_ns: Some(3_000),
                at: secs(1),
                draining: false,
            },
            DrainCase {
                what: "an unknown start time is the same run",
                spec: &spec,
                kill: kill(15, 2_000, 0),
                withdraw_at_once: true,
                running: true,
                started_ns: None,
                at: secs(1),
                draining: true,
            },
            DrainCase {
                what: "opted out",
                spec: &opted_out,
                kill: kill(15, 2_000, 0),
                withdraw_at_once: false,
                running: true,
                started_ns: Some(started),
                at: secs(1),
                draining: false,
            },
            DrainCase {
                what: "own stop signal",
                spec: &quit,
                kill: kill(3, 2_000, 0),
                withdraw_at_once: true,
                running: true,
                started_ns: Some(started),
                at: secs(1),
                draining: true,
            },
            DrainCase {
                what: "TERM is not QUIT",
                spec: &quit,
                kill: kill(15, 2_000, 0),
                withdraw_at_once: false,
                running: true,
                started_ns: Some(started),
                at: secs(1),
                draining: false,
            },
            DrainCase {
                what: "no timeout: until it exits",
                spec: &forever,
                kill: kill(15, 2_000, 0),
                withdraw_at_once: true,
                running: true,
                started_ns: Some(started),
                at: secs(3600),
                draining: true,
            },
        ];
        for DrainCase {
            what,
            spec,
            kill: k,
            withdraw_at_once: now,
            running,
            started_ns,
            at,
            draining: want,
        } in cases
        {
            let mut d = Drains::default();
            assert_eq!(d.kill("c", k, Some(spec)), now, "{what}: kill");
            assert_eq!(
                d.inspected("c", spec, running, started_ns, at),
                want,
                "{what}"
            );
            // Whatever ended stays ended.
            if !want {
                assert!(
                    !d.inspected("c", spec, true, Some(started), t0),
                    "{what}: again"
                );
            }
        }
    }

    #[test]
    fn kills_before_the_first_inspection_are_judged_by_it() {
        let t0 = Instant::now();
        let spec = StopSpec {
            signal: Some(15),
            timeout: Some(Duration::from_secs(10)),
            drain: true,
        };
        let term = Kill {
            signal: 15,
            sent_ns: 2_000,
            sent: t0,
        };
        let hup = Kill { signal: 1, ..term };
        let mut d = Drains::default();
        assert!(!d.kill("c", hup, None));
        assert!(!d.kill("c", term, None));
        assert_eq!(d.next_deadline(), None);
        assert!(d.inspected("c", &spec, true, Some(1_000), t0));
        assert_eq!(
            d.next_deadline(),
            Some(t0 + Duration::from_secs(10) + MARGIN)
        );
        // A kill judged for another container's spec stays with its own container.
        assert!(!d.kill("other", hup, None));
        assert!(!d.inspected("other", &spec, true, Some(1_000), t0));
    }

    #[test]
    fn deadlines_expire_and_replays_do_not_shorten_a_drain() {
        let t0 = Instant::now();
        let spec = StopSpec {
            signal: Some(15),
            timeout: Some(Duration::from_secs(1)),
            drain: true,
        };
        let first = Kill {
            signal: 15,
            sent_ns: 2_000,
            sent: t0,
        };
        let second = Kill {
            sent_ns: 5_000,
            sent: t0 + Duration::from_secs(3),
            ..first
        };
        let mut d = Drains::default();
        assert!(d.kill("a", second, Some(&spec)));
        // The older signal, replayed after a reconnect, still withdraws but keeps the deadline.
        assert!(d.kill("a", first, Some(&spec)));
        let deadline = t0 + Duration::from_secs(4) + MARGIN;
        assert_eq!(d.next_deadline(), Some(deadline));
        assert!(d
            .take_expired(deadline - Duration::from_millis(1))
            .is_empty());
        assert_eq!(d.take_expired(deadline), vec!["a".to_string()]);
        assert_eq!(d.next_deadline(), None);
        assert!(!d.inspected("a", &spec, true, Some(1_000), deadline));

        assert!(d.kill("b", first, Some(&spec)));
        d.forget("b");
        assert_eq!(d.next_deadline(), None);
    }
}
