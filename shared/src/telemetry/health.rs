//! Named health conditions with reasons: what `/healthz` answers.
//!
//! Each part of a binary that can stop it doing its job (the store, Docker's event stream, a
//! template's last render) owns one condition and sets it where it learns the truth, so the
//! endpoint never has to probe anything itself and answers at once.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest reason kept per condition, so a megabyte error (a check command's output) never
/// becomes a megabyte `/healthz` answer.
const MAX_REASON: usize = 400;

/// A set of named conditions, each healthy or failing with a one-line reason, and notes:
/// what an operator should see (a certificate due for renewal) that does not make the process
/// unhealthy. Cheap to clone: clones share the conditions.
#[derive(Debug, Clone, Default)]
pub struct Health {
    conditions: Arc<Mutex<BTreeMap<String, Failing>>>,
    notes: Arc<Mutex<BTreeMap<String, String>>>,
}

#[derive(Debug, Clone)]
struct Failing {
    reason: String,
    /// From when the failure counts (its start plus the grace it was given).
    counts_from: Instant,
}

impl Health {
    /// No condition failing.
    pub fn new() -> Health {
        Health::default()
    }

    /// `name` is healthy (again).
    pub fn ok(&self, name: &str) {
        self.lock().remove(name);
    }

    /// `name` fails now, for `reason` (the latest reason replaces an earlier one).
    pub fn fail(&self, name: &str, reason: impl Display) {
        self.fail_after(name, reason, Duration::ZERO);
    }

    /// `name` fails, but only counts once it has failed for `grace` without an [`ok`]
    /// meanwhile: for conditions that flip briefly in normal operation (a watch reconnecting).
    /// A condition already failing keeps the time it started.
    ///
    /// [`ok`]: Health::ok
    pub fn fail_after(&self, name: &str, reason: impl Display, grace: Duration) {
        self.fail_at(name, reason, grace, Instant::now());
    }

    fn fail_at(&self, name: &str, reason: impl Display, grace: Duration, now: Instant) {
        let reason = one_line(&reason.to_string());
        let mut c = self.lock();
        match c.get_mut(name) {
            Some(f) => f.reason = reason,
            None => {
                c.insert(
                    name.to_string(),
                    Failing {
                        reason,
                        counts_from: now + grace,
                    },
                );
            }
        }
    }

    /// Forgets every condition whose name starts with `prefix` (e.g. the templates of a
    /// configuration that was replaced).
    pub fn clear_prefix(&self, prefix: &str) {
        self.lock().retain(|name, _| !name.starts_with(prefix));
    }

    /// Replaces every note whose name starts with `prefix` by `notes` (names with their
    /// one-line text), at once.
    pub fn set_notes(&self, prefix: &str, notes: impl IntoIterator<Item = (String, String)>) {
        let mut n = self.notes.lock().unwrap_or_else(|e| e.into_inner());
        n.retain(|name, _| !name.starts_with(prefix));
        for (name, text) in notes {
            n.insert(name, one_line(&text));
        }
    }

    /// The notes, each as `name: text`, in name order.
    pub fn notes(&self) -> Vec<String> {
        let n = self.notes.lock().unwrap_or_else(|e| e.into_inner());
        n.iter().map(|(name, t)| format!("{name}: {t}")).collect()
    }

    /// `Ok` when nothing fails, else one line: each failing condition as `name: reason`,
    /// joined by `; `, in name order.
    pub fn status(&self) -> Result<(), String> {
        self.status_at(Instant::now())
    }

    fn status_at(&self, now: Instant) -> Result<(), String> {
        let c = self.lock();
        let failing: Vec<String> = c
            .iter()
            .filter(|(_, f)| f.counts_from <= now)
            .map(|(name, f)| format!("{name}: {}", f.reason))
            .collect();
        if failing.is_empty() {
            Ok(())
        } else {
            Err(failing.join("; "))
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Failing>> {
        // A panic while holding this lock cannot leave the map half-changed: keep serving.
        self.conditions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The reason as one line: control characters (newlines of a command's output) become spaces,
/// and it is cut at [`MAX_REASON`] characters.
fn one_line(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON)
        .collect();
    if s.chars().count() > MAX_REASON {
        out.push('…');
    }
    out.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_fail_and_recover() {
        let h = Health::new();
        assert_eq!(h.status(), Ok(()));
        h.fail("store", "connection refused\nsecond line");
        h.fail("docker", "event stream ended");
        assert_eq!(
            h.status(),
            Err("docker: event stream ended; store: connection refused second line".into())
        );
        h.ok("docker");
        h.fail("store", "timed out");
        assert_eq!(h.status(), Err("store: timed out".into()));
        h.ok("store");
        assert_eq!(h.status(), Ok(()));
    }

    #[test]
    fn grace_hides_brief_failures_only() {
        let h = Health::new();
        let t0 = Instant::now();
        let secs = |n| t0 + Duration::from_secs(n);
        let grace = Duration::from_secs(2);
        h.fail_at("source", "reconnecting", grace, t0);
        assert_eq!(h.status_at(t0), Ok(()));
        // Failing again keeps the start: the grace is not extended.
        h.fail_at("source", "still reconnecting", grace, secs(1));
        assert_eq!(h.status_at(secs(1)), Ok(()));
        assert_eq!(
            h.status_at(secs(2)),
            Err("source: still reconnecting".into())
        );
        h.ok("source");
        h.fail_at("source", "again", grace, secs(3));
        assert_eq!(h.status_at(secs(4)), Ok(()));
        assert_eq!(h.status_at(secs(5)), Err("source: again".into()));
    }

    #[test]
    fn notes_never_fail() {
        let h = Health::new();
        h.set_notes(
            "acme ",
            [("acme a.test".to_string(), "due\nsoon".to_string())],
        );
        h.set_notes("other ", [("other x".to_string(), "y".to_string())]);
        assert_eq!(h.status(), Ok(()));
        assert_eq!(h.notes(), ["acme a.test: due soon", "other x: y"]);
        h.set_notes("acme ", []);
        assert_eq!(h.notes(), ["other x: y"]);
    }

    #[test]
    fn prefixes_are_cleared_and_reasons_bounded() {
        let h = Health::new();
        h.fail("template a", "x");
        h.fail("template b", "y".repeat(10_000));
        h.fail("store", "z");
        h.clear_prefix("template ");
        assert_eq!(h.status(), Err("store: z".into()));
        h.fail("template b", "y".repeat(10_000));
        let s = h.status().unwrap_err();
        assert!(s.len() < 1_000, "{}", s.len());
    }
}
