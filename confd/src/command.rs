//! Check and reload commands: argv lists or `sh -c` strings, run with a time limit.
//!
//! A command that hangs (a reload waiting on a dead socket) must not stall every later render,
//! so each run has a timeout after which its whole process group is killed. Output is captured
//! so the single error line about a failed check can carry what the checker said.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// Placeholder replaced by the staged file's path in check commands.
pub const STAGED: &str = "{{staged}}";

/// A command as configured.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CommandSpec {
    /// Run through `sh -c`; `{{staged}}` is replaced by the shell-quoted path.
    Shell(String),
    /// Run directly; `{{staged}}` is replaced by the path inside each argument (no shell, so
    /// no quoting is needed).
    Argv(Vec<String>),
    /// Not a command: this signal to the process confd supervises (`exec`), for templates
    /// without a reload command of their own. Never read from a config file as such.
    Signal(crate::signal::Signal),
}

impl fmt::Display for CommandSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandSpec::Shell(s) => f.write_str(s),
            CommandSpec::Argv(a) => write!(f, "{a:?}"),
            CommandSpec::Signal(s) => write!(f, "{s} to the supervised process"),
        }
    }
}

impl<'de> Deserialize<'de> for CommandSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CommandSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a shell command string or a non-empty list of arguments")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<CommandSpec, E> {
                if s.trim().is_empty() {
                    return Err(E::custom("empty command: expected a shell command string"));
                }
                Ok(CommandSpec::Shell(s.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<CommandSpec, A::Error> {
                let mut argv = Vec::new();
                while let Some(a) = seq.next_element::<String>()? {
                    argv.push(a);
                }
                if argv.is_empty() || argv[0].is_empty() {
                    return Err(de::Error::custom(
                        "empty argument list: expected [program, args...]",
                    ));
                }
                Ok(CommandSpec::Argv(argv))
            }
        }
        d.deserialize_any(V)
    }
}

/// Quotes `s` for a POSIX shell: one single-quoted word.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The argv to execute: `spec` with `staged` substituted (or appended when the command does
/// not mention `{{staged}}`).
pub fn argv(spec: &CommandSpec, staged: Option<&Path>) -> Vec<String> {
    let path = staged.map(|p| p.to_string_lossy().into_owned());
    match spec {
        CommandSpec::Shell(s) => {
            let script = match &path {
                Some(p) if s.contains(STAGED) => s.replace(STAGED, &shell_quote(p)),
                Some(p) => format!("{s} {}", shell_quote(p)),
                None => s.clone(),
            };
            vec!["sh".into(), "-c".into(), script]
        }
        CommandSpec::Argv(a) => {
            let mut out: Vec<String> = match &path {
                Some(p) => a.iter().map(|x| x.replace(STAGED, p)).collect(),
                None => a.clone(),
            };
            if let Some(p) = path {
                if !a.iter().any(|x| x.contains(STAGED)) {
                    out.push(p);
                }
            }
            out
        }
        CommandSpec::Signal(_) => Vec::new(),
    }
}

/// Why a command did not succeed; displays as one line with the command's output.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// It could not be started.
    #[error("cannot run {cmd}: {reason}")]
    Spawn {
        /// The command.
        cmd: String,
        /// The OS error.
        reason: String,
    },
    /// It exited non-zero (or was killed by a signal).
    #[error("{cmd} failed ({status}): {output}")]
    Failed {
        /// The command.
        cmd: String,
        /// Exit status as text.
        status: String,
        /// stdout and stderr, flattened to one line.
        output: String,
    },
    /// It ran past its time limit and was killed.
    #[error("{cmd} timed out after {timeout:?} and was killed: {output}")]
    Timeout {
        /// The command.
        cmd: String,
        /// The limit.
        timeout: Duration,
        /// What it printed before.
        output: String,
    },
}

/// Runs `spec` (with `staged` substituted) and returns its output on success.
///
/// The child gets its own process group so a timeout kills everything a shell started.
/// Cancel-safe: dropping the future kills the child (`kill_on_drop`).
///
/// A [`CommandSpec::Signal`] is no process to run: whoever reloads sends it through the
/// supervisor's handle (`exec::SupervisorHandle::reload`), so this module needs no
/// supervisor. Handed one, this refuses it.
pub async fn run(
    spec: &CommandSpec,
    staged: Option<&Path>,
    timeout: Duration,
) -> Result<String, CommandError> {
    if let CommandSpec::Signal(_) = spec {
        return Err(CommandError::Spawn {
            cmd: spec.to_string(),
            reason: "a signal is sent through the supervisor, not run".into(),
        });
    }
    let args = argv(spec, staged);
    let cmd = spec.to_string();
    let mut c = tokio::process::Command::new(&args[0]);
    c.args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let child = c.spawn().map_err(|e| CommandError::Spawn {
        cmd: cmd.clone(),
        reason: e.to_string(),
    })?;
    let pid = child.id();
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => {
            let output = flatten(&out.stdout, &out.stderr);
            if out.status.success() {
                Ok(output)
            } else {
                // A failure printing nothing (`haproxy -c -q`) still says so, beside its status.
                let output = if output.is_empty() {
                    "(no output)".to_string()
                } else {
                    output
                };
                Err(CommandError::Failed {
                    cmd,
                    status: out.status.to_string(),
                    output,
                })
            }
        }
        Ok(Err(e)) => Err(CommandError::Spawn {
            cmd,
            reason: e.to_string(),
        }),
        Err(_) => {
            if let Some(pid) = pid {
                // SAFETY: plain kill(2) of the group we created; a stale id only yields ESRCH.
                unsafe {
                    libc::kill(-(pid as i32), libc::SIGKILL);
                }
            }
            Err(CommandError::Timeout {
                cmd,
                timeout,
                output: String::new(),
            })
        }
    }
}

/// stdout then stderr, trimmed, newlines turned into ` | ` so a log line stays one line.
fn flatten(stdout: &[u8], stderr: &[u8]) -> String {
    let mut all = String::from_utf8_lossy(stdout).into_owned();
    let err = String::from_utf8_lossy(stderr);
    if !all.trim().is_empty() && !err.trim().is_empty() {
        all.push('\n');
    }
    all.push_str(&err);
    all.lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutes_or_appends_the_staged_path() {
        let p = Path::new("/tmp/it's here");
        let cases: Vec<(CommandSpec, Vec<&str>)> = vec![
            (
                CommandSpec::Shell("nginx -t -c {{staged}}".into()),
                vec!["sh", "-c", r"nginx -t -c '/tmp/it'\''s here'"],
            ),
            (
                CommandSpec::Shell("haproxy -c -f".into()),
                vec!["sh", "-c", r"haproxy -c -f '/tmp/it'\''s here'"],
            ),
            (
                CommandSpec::Argv(vec!["nginx".into(), "-tc{{staged}}".into()]),
                vec!["nginx", "-tc/tmp/it's here"],
            ),
            (
                CommandSpec::Argv(vec!["haproxy".into(), "-c".into(), "-f".into()]),
                vec!["haproxy", "-c", "-f", "/tmp/it's here"],
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(argv(&spec, Some(p)), want, "{spec}");
        }
        assert_eq!(
            argv(&CommandSpec::Shell("nginx -s reload".into()), None),
            vec!["sh", "-c", "nginx -s reload"]
        );
    }

    #[test]
    fn deserialises_strings_and_lists() {
        let s: CommandSpec = serde_yaml::from_str("\"a b\"").unwrap();
        assert_eq!(s, CommandSpec::Shell("a b".into()));
        let a: CommandSpec = serde_yaml::from_str("[a, b]").unwrap();
        assert_eq!(a, CommandSpec::Argv(vec!["a".into(), "b".into()]));
        for bad in ["[]", "\"\"", "{a: 1}"] {
            assert!(serde_yaml::from_str::<CommandSpec>(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn runs_captures_fails_and_times_out() {
        let t = Duration::from_secs(5);
        let ok = run(
            &CommandSpec::Shell("echo hi; echo there >&2".into()),
            None,
            t,
        )
        .await
        .unwrap();
        assert_eq!(ok, "hi | there");
        let e = run(&CommandSpec::Shell("echo bad; exit 3".into()), None, t)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad") && e.contains("3"), "{e}");
        let e = run(&CommandSpec::Shell("exit 2".into()), None, t)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("failed (exit status: 2): (no output)"), "{e}");
        let e = run(
            &CommandSpec::Argv(vec!["/nonexistent/prog".into()]),
            None,
            t,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, CommandError::Spawn { .. }), "{e}");
        let started = std::time::Instant::now();
        let e = run(
            &CommandSpec::Shell("sleep 30 & sleep 30".into()),
            None,
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, CommandError::Timeout { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
