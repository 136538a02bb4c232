//! What a pass did to each template ([`Outcome`]), and why a template was not applied
//! ([`Failure`]).
//!
//! A leaf of its own, beside the runner that produces these and the metrics that record them:
//! `/healthz` and the age of the last success are read from an outcome, and neither the
//! metrics nor anything else that reads one needs the runner to do so.

use crate::render::RenderError;

/// Outcome of one template in a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Destination already had this content.
    Unchanged,
    /// Written (and reloaded, if configured).
    Updated,
    /// Written and applied to the running proxy through its live channel, without a reload.
    Live,
    /// Dry run: a diff was printed.
    WouldChange,
    /// Not applied; the reason was logged. Tried again on the next change.
    Failed(Failure),
    /// Its reload failed; the reason was logged. Tried again after a backoff, since the cause
    /// (the proxy not running yet, restarting, or its PID file not written yet) often passes.
    ReloadFailed(Failure),
}

/// Why a template was not applied, at the step that stopped it. Displayed as the one-line
/// reason confd logs and `/healthz` reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The outage guard: the snapshot holds fewer instances than `min_instances`.
    #[error("snapshot has {have} instances, fewer than min_instances {min}: not rendering (outage guard)")]
    TooFewInstances {
        /// Instances in the snapshot.
        have: usize,
        /// The template's `min_instances`.
        min: usize,
    },
    /// The template file cannot be read.
    #[error("cannot read template {path}: {reason}")]
    ReadTemplate {
        /// The template's `src`.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// Handlebars refused it.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// A file step failed: reading the destination, staging beside it, or the swap.
    #[error("cannot {step} {path}: {reason}")]
    File {
        /// `read`, `stage beside` or `replace`.
        step: &'static str,
        /// The destination.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// The check command refused the staged file.
    #[error("check failed: {0}")]
    Check(String),
    /// The reload command failed.
    #[error("reload failed: {0}")]
    Reload(String),
}

impl Failure {
    /// A file step that failed on `path`.
    pub(crate) fn file(
        step: &'static str,
        path: &std::path::Path,
        e: impl std::fmt::Display,
    ) -> Failure {
        Failure::File {
            step,
            path: path.display().to_string(),
            reason: e.to_string(),
        }
    }
}
