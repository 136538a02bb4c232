//! Embeds the commit the binaries are built from, so `--version` names it.
//!
//! `SWITCHBOARD_COMMIT` wins when set (a build from a source archive, where there is no git);
//! otherwise `git rev-parse` of the checkout, and `unknown` when neither answers. Only HEAD
//! and the branch it points at are watched, so an ordinary edit does not rebuild this crate.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=SWITCHBOARD_COMMIT");
    let commit = match std::env::var("SWITCHBOARD_COMMIT") {
        Ok(c) if !c.is_empty() => c,
        _ => {
            // `--git-path` resolves a worktree's HEAD and the shared refs alike.
            for path in ["HEAD", "packed-refs"] {
                if let Some(p) = git(&["rev-parse", "--git-path", path]) {
                    println!("cargo:rerun-if-changed={p}");
                }
            }
            if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
                if let Some(p) = git(&["rev-parse", "--git-path", &branch]) {
                    println!("cargo:rerun-if-changed={p}");
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=SWITCHBOARD_COMMIT={commit}");
}
