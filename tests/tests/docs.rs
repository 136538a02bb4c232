//! Docs that run: every recipe in `docs/` and the README's quick start and scale
//! walk-through are run as written, and the outputs they show are asserted.
//!
//! The convention the docs follow (the README's "Docs that run" says it for writers):
//!
//! - A fenced block tagged `sh` is run; its output goes to the log, and it must succeed.
//! - A fenced block tagged `console` holds `$ command` lines (a line ending in `\` continues
//!   on the next one), each followed by the output the reader will see (stdout and stderr as
//!   a terminal shows them). Expected lines are compared with what the command printed:
//!   `<word>` in a line stands for any text that must differ between runs (an ID, an address,
//!   a time), and a line `...` for any number of lines, including none.
//! - Blocks under a heading starting with "Clean up" are the recipe's cleanup: they run at the
//!   end, also after a failure, and a recipe must end with one.
//! - Other blocks (`yaml`, `text`, untagged) are not run.
//! - `NAME=${NAME:-DEFAULT}` in a block is a setting the doc invites the reader to change; a
//!   numeric DEFAULT is a port, and the runner gives it a free one (and maps it back to DEFAULT
//!   in the output before comparing, wherever it stands alone as a number).
//!
//! One bash (`-euo pipefail`) runs a doc's blocks in order, from the checkout (the recipes
//! move into a scratch directory of their own), with `target/debug` first on `PATH`, stdin
//! from /dev/null, in a process group of its own that is killed at the end.
//!

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use switchboard_tests::{free_port, image, require_images, target_dir, workspace_root, IMAGE_TAG};

/// One runnable block.
#[derive(Debug, Clone, PartialEq)]
enum Block {
    /// A `sh` block: a script.
    Sh { line: usize, text: String },
    /// A `console` block: commands with their expected output.
    Console { line: usize, steps: Vec<Step> },
}

/// One `$ command` of a console block.
#[derive(Debug, Clone, PartialEq)]
struct Step {
    line: usize,
    command: String,
    expected: Vec<String>,
}

/// A doc's runnable blocks, the recipe's steps and its cleanup.
#[derive(Debug, Default)]
struct Recipe {
    steps: Vec<Block>,
    cleanup: Vec<Block>,
    /// `NAME=${NAME:-DEFAULT}` settings found in the blocks.
    settings: BTreeMap<String, String>,
}

/// Splits a console block into steps.
fn console_steps(first_line: usize, lines: &[&str]) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut continuing = false;
    for (i, l) in lines.iter().enumerate() {
        if continuing {
            let s = steps.last_mut().unwrap();
            s.command.push('\n');
            s.command.push_str(l);
            continuing = l.ends_with('\\');
        } else if let Some(cmd) = l.strip_prefix("$ ") {
            steps.push(Step {
                line: first_line + i,
                command: cmd.to_string(),
                expected: Vec::new(),
            });
            continuing = cmd.ends_with('\\');
        } else if let Some(s) = steps.last_mut() {
            s.expected.push(l.to_string());
        } else {
            panic!(
                "line {}: console output before any `$ command`",
                first_line + i
            );
        }
    }
    steps
}

/// Reads the runnable blocks of a markdown text. `sections`: only blocks under these headings
/// (and their sub-headings) count; `None`: all.
fn parse(text: &str, sections: Option<&[&str]>) -> Recipe {
    let mut r = Recipe::default();
    let mut heading = String::new();
    let mut in_section = sections.is_none();
    let mut section_level = 0;
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if let Some(info) = l.trim_start().strip_prefix("```") {
            let indent = l.len() - l.trim_start().len();
            let start = i + 1;
            let mut end = start;
            while end < lines.len() && !lines[end].trim_start().starts_with("```") {
                end += 1;
            }
            let body: Vec<&str> = lines[start..end]
                .iter()
                .map(|b| b.get(indent..).unwrap_or(b.trim_start()))
                .collect();
            i = end + 1;
            if !in_section {
                continue;
            }
            let block = match info.trim() {
                "sh" => Block::Sh {
                    line: start + 1,
                    text: body.join("\n"),
                },
                "console" => Block::Console {
                    line: start + 1,
                    steps: console_steps(start + 1, &body),
                },
                _ => continue,
            };
            for b in &body {
                collect_settings(b, &mut r.settings);
            }
            if heading.starts_with("Clean up") {
                r.cleanup.push(block);
            } else {
                assert!(
                    r.cleanup.is_empty(),
                    "line {}: a runnable block after the cleanup; the cleanup must come last",
                    start
                );
                r.steps.push(block);
            }
            continue;
        }
        if l.starts_with('#') {
            let level = l.chars().take_while(|c| *c == '#').count();
            heading = l[level..].trim().to_string();
            if let Some(wanted) = sections {
                if wanted.contains(&heading.as_str()) {
                    in_section = true;
                    section_level = level;
                } else if in_section && level <= section_level {
                    in_section = false;
                }
            }
        }
        i += 1;
    }
    r
}

/// `NAME=${NAME:-DEFAULT}` anywhere in a line.
fn collect_settings(line: &str, out: &mut BTreeMap<String, String>) {
    let mut rest = line;
    while let Some(p) = rest.find("=${") {
        let name_start = rest[..p]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |i| i + 1);
        let name = &rest[name_start..p];
        let after = &rest[p + 3..];
        if let Some(def) = after
            .strip_prefix(name)
            .and_then(|a| a.strip_prefix(":-"))
            .and_then(|a| a.split_once('}'))
            .map(|(d, _)| d)
        {
            if !name.is_empty() {
                out.insert(name.to_string(), def.to_string());
            }
        }
        rest = after;
    }
}

/// Whether `actual` matches the expected line: `<word>` placeholders stand for any non-empty
/// text; a `<` that does not open one (`<HTML>` is one, `a < b` is not) is literal.
fn line_matches(expected: &str, actual: &str) -> bool {
    let mut parts = vec![String::new()];
    let mut rest = expected;
    while let Some(open) = rest.find('<') {
        parts.last_mut().unwrap().push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let word = after.find('>').filter(|&c| c > 0).filter(|&c| {
            after[..c]
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "_-".contains(ch))
        });
        match word {
            Some(c) => {
                parts.push(String::new());
                rest = &after[c + 1..];
            }
            None => {
                parts.last_mut().unwrap().push('<');
                rest = after;
            }
        }
    }
    parts.last_mut().unwrap().push_str(rest);
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    glob(&refs, actual)
}

/// `text` with every `from` that stands alone as a number (no digit either side: `:41234`,
/// `listen=41234`, `tcp_41234`, not `141234`) replaced by `to`.
fn map_number(text: &str, from: u16, to: u16) -> String {
    let (from, to) = (from.to_string(), to.to_string());
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(&from) {
        let before = rest[..at].chars().last().or_else(|| out.chars().last());
        let after = rest[at + from.len()..].chars().next();
        out.push_str(&rest[..at]);
        if before.is_some_and(|c| c.is_ascii_digit()) || after.is_some_and(|c| c.is_ascii_digit()) {
            out.push_str(&from);
        } else {
            out.push_str(&to);
        }
        rest = &rest[at + from.len()..];
    }
    out.push_str(rest);
    out
}

/// A bare `wait` also waits for the daemons the recipe started with `&`: it never returns. Recipes wait for a job by its PID (`wait $!`).
fn bare_wait(text: &str) -> Option<&str> {
    text.lines().find(|l| {
        let l = l.split('#').next().unwrap_or("");
        l.split([';', '&', '|'])
            .any(|cmd| cmd.trim() == "wait" || cmd.trim() == "do wait")
    })
}

/// `parts` are literals separated by placeholders (each at least one character).
fn glob(parts: &[&str], s: &str) -> bool {
    match parts {
        [] => s.is_empty(),
        [only] => s == *only,
        [first, rest @ ..] => {
            let Some(tail) = s.strip_prefix(first) else {
                return false;
            };
            // The placeholder takes 1.. characters, then the rest must match.
            tail.char_indices()
                .skip(1)
                .map(|(i, _)| i)
                .chain(std::iter::once(tail.len()))
                .filter(|&i| i > 0)
                .any(|i| glob(rest, &tail[i..]))
        }
    }
}

/// Whether the actual lines match the expected ones (`...` = any lines).
fn lines_match(expected: &[String], actual: &[&str]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((e, rest)) if e.trim() == "..." => {
            (0..=actual.len()).any(|k| lines_match(rest, &actual[k..]))
        }
        Some((e, rest)) => match actual.split_first() {
            Some((a, arest)) => {
                line_matches(e.trim_end(), a.trim_end()) && lines_match(rest, arest)
            }
            None => false,
        },
    }
}

/// Quotes a file name for bash.
fn q(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// The bash script for a recipe: each step records its number, console commands write their
/// output to a file each; an EXIT trap runs the cleanup (in the same shell, so its variables
/// and jobs are there) with errors ignored.
fn script(r: &Recipe, out: &Path, diagnose: Option<&str>) -> String {
    let mut s = String::new();
    s.push_str("set -euo pipefail\n");
    // On a failure, the logs the recipe keeps in its (scratch) directory are saved first:
    // the cleanup removes them.
    s.push_str(&format!(
        "__docs_cleanup() {{\n  __docs_status=$?\n  trap - EXIT\n  set +euo pipefail\n  \
         if [ $__docs_status != 0 ]; then for f in *.log; do echo \"== $PWD/$f\"; tail -n 15 \"$f\"; \
         done > {} 2>&1; fi\n",
        q(&out.join("logs"))
    ));
    // The run's own diagnostics (the daemons' logs), before the cleanup removes them; printed
    // only when the recipe failed, which a console step's output decides after the run.
    if let Some(d) = diagnose {
        s.push_str(&format!(
            "  {{\n{d}\n  }} > {} 2>&1\n",
            q(&out.join("diagnostics"))
        ));
    }
    s.push_str(&format!(
        "  echo cleanup > {}\n  {{\n",
        q(&out.join("phase"))
    ));
    for b in &r.cleanup {
        match b {
            Block::Sh { text, .. } => {
                s.push_str(text);
                s.push('\n');
            }
            Block::Console { steps, .. } => {
                for st in steps {
                    s.push_str(&st.command);
                    s.push('\n');
                }
            }
        }
    }
    s.push_str(&format!(
        "  }} >> {} 2>&1\n  exit $__docs_status\n}}\ntrap __docs_cleanup EXIT\n",
        q(&out.join("cleanup.log"))
    ));
    for (n, b) in r.steps.iter().enumerate() {
        match b {
            Block::Sh { text, .. } => {
                s.push_str(&format!("echo {n} > {}\n{{\n", q(&out.join("step"))));
                s.push_str(text);
                s.push_str(&format!("\n}} >> {} 2>&1\n", q(&out.join("log"))));
            }
            Block::Console { steps, .. } => {
                for (k, st) in steps.iter().enumerate() {
                    let file = out.join(format!("out-{n}-{k}"));
                    s.push_str(&format!("echo {n}.{k} > {}\n{{\n", q(&out.join("step"))));
                    s.push_str(&st.command);
                    s.push_str(&format!("\n}} > {} 2>&1\n", q(&file)));
                }
            }
        }
    }
    s
}

/// How a doc is run: which file, which sections, extra environment, and the reverse
/// substitutions (actual text → what the doc shows) applied to outputs before comparing.
struct Run {
    doc: &'static str,
    sections: Option<&'static [&'static str]>,
    env: Vec<(String, String)>,
    reverse: Vec<(String, String)>,
    timeout: Duration,
    /// Commands whose output explains a failure (a stack's logs), run before the cleanup.
    diagnose: Option<&'static str>,
}

/// One recipe at a time, as a reader pastes them: recipes register every container on the
/// engine (their registrators are not filtered), so two at once would route to each other's
/// backends and change what they print.
static ONE_RECIPE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run_doc(mut run: Run) {
    // A recipe that failed (poisoned the lock) does not stop the others.
    let _one = ONE_RECIPE.lock().unwrap_or_else(|p| p.into_inner());
    let root = workspace_root();
    let text = std::fs::read_to_string(root.join(run.doc)).unwrap();
    let recipe = parse(&text, run.sections);
    assert!(
        !recipe.steps.is_empty(),
        "{}: no runnable blocks found",
        run.doc
    );
    assert!(
        !recipe.cleanup.is_empty(),
        "{}: the recipe has no cleanup block (a section \"Clean up\" at its end)",
        run.doc
    );
    for b in &recipe.steps {
        let text = match b {
            Block::Sh { text, .. } => text.clone(),
            Block::Console { steps, .. } => steps
                .iter()
                .map(|s| s.command.clone())
                .collect::<Vec<_>>()
                .join("\n"),
        };
        if let Some(l) = bare_wait(&text) {
            panic!(
                "{}: a bare `wait` waits for the daemons too: {l:?}",
                run.doc
            );
        }
    }
    // Settings the doc invites the reader to change: ports get free ones, mapped back to the
    // doc's defaults in the outputs (free port, default).
    let mut ports: Vec<(u16, u16)> = Vec::new();
    for (name, default) in &recipe.settings {
        if run.env.iter().any(|(k, _)| k == name) {
            continue;
        }
        if let Ok(p) = default.parse::<u16>() {
            let port = free_port();
            run.env.push((name.clone(), port.to_string()));
            if p == 80 {
                run.reverse.push((format!(":{port}/"), "/".into()));
            }
            ports.push((port, p));
        }
    }
    let out = tempfile::tempdir().unwrap();
    let script_path = out.path().join("recipe.sh");
    std::fs::write(&script_path, script(&recipe, out.path(), run.diagnose)).unwrap();
    let path = format!(
        "{}:{}",
        target_dir().join("debug").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("bash");
    cmd.arg(&script_path)
        .current_dir(&root)
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for (k, v) in &run.env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("bash");
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if started.elapsed() > run.timeout {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let pgid = child.id() as i32;
    let timed_out = status.is_none();
    if timed_out {
        // SAFETY: kill(2) of the group the script leads; ESRCH when it is gone.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = child.wait();
        // The trap could not run: run the cleanup in a fresh shell (processes are gone with
        // the group; this removes containers and the like).
        let mut c = String::from("set +euo pipefail\n");
        for b in &recipe.cleanup {
            if let Block::Sh { text, .. } = b {
                c.push_str(text);
                c.push('\n');
            }
        }
        let _ = Command::new("bash")
            .arg("-c")
            .arg(c)
            .envs(run.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    // Whatever the recipe left in its process group (a daemon its cleanup missed) goes too.
    // SAFETY: as above.
    let leftover = unsafe { libc::kill(-pgid, 0) } == 0;
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let read = |f: &str| std::fs::read_to_string(out.path().join(f)).unwrap_or_default();
    let step = read("step").trim().to_string();
    let log = read("log");
    let cleanup_log = read("cleanup.log");
    let recipe_logs = read("logs");
    let diagnostics = read("diagnostics");
    let mut failures = Vec::new();
    if timed_out {
        failures.push(format!("timed out after {:?} in step {step}", run.timeout));
    } else if !status.unwrap().success() {
        failures.push(format!(
            "failed ({}) in step {step}: {}",
            status.unwrap(),
            stderr.trim()
        ));
    }
    // Compare every console step that ran.
    for (n, b) in recipe.steps.iter().enumerate() {
        let Block::Console { steps, .. } = b else {
            continue;
        };
        for (k, st) in steps.iter().enumerate() {
            let file = out.path().join(format!("out-{n}-{k}"));
            let Ok(mut actual) = std::fs::read_to_string(&file) else {
                continue;
            };
            for (from, to) in &run.reverse {
                actual = actual.replace(from, to);
            }
            for &(port, default) in &ports {
                actual = map_number(&actual, port, default);
            }
            // Trailing blank lines are invisible in a doc: ignored on both sides.
            let mut lines: Vec<&str> = actual.lines().collect();
            while lines.last().is_some_and(|l| l.trim().is_empty()) {
                lines.pop();
            }
            let mut expected = st.expected.clone();
            while expected.last().is_some_and(|l| l.trim().is_empty()) {
                expected.pop();
            }
            if !lines_match(&expected, &lines) {
                failures.push(format!(
                    "{}:{}: `$ {}`\n--- the doc shows:\n{}\n--- it printed:\n{}",
                    run.doc,
                    st.line,
                    st.command,
                    st.expected.join("\n"),
                    actual.trim_end()
                ));
            }
        }
    }
    if leftover && !timed_out {
        eprintln!("{}: processes outlived the cleanup; killed", run.doc);
    }
    eprintln!(
        "{}: ran in {:.1} s",
        run.doc,
        started.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        panic!(
            "{}:\n{}\n--- sh blocks' output:\n{}\n--- the recipe's logs:\n{}\n--- diagnostics:\n{}\n--- cleanup output:\n{}",
            run.doc,
            failures.join("\n\n"),
            tail(&log, 60),
            recipe_logs,
            tail(&diagnostics, 400),
            tail(&cleanup_log, 20)
        );
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn doc(doc: &'static str) -> Run {
    Run {
        doc,
        sections: None,
        env: Vec::new(),
        reverse: Vec::new(),
        timeout: Duration::from_secs(300),
        diagnose: None,
    }
}

/// The reference stack's logs: what confd and registrator did, and nginx's errors (its
/// access log without the answers that succeeded).
const STACK_LOGS: &str = "docker-compose -f compose/docker-compose.yml ps; \
    docker-compose -f compose/docker-compose.yml logs --no-color --timestamps lb registrator \
    | grep -v '\" 200 '";

#[test]
fn readme_quick_start_and_scaling() {
    // The variables the README documents: a project name of our own (`sbtest<pid>...`, the
    // names `scripts/test` removes when their test process is gone), the load balancer on
    // loopback, and images already built (`scripts/test` built them; building them here
    // would replace images other runs use).
    let project = format!("sbtest{}docs", std::process::id());
    let mut run = doc("README.md");
    run.sections = Some(&["Quick start", "Scale up, scale down"]);
    run.env = vec![
        ("COMPOSE_PROJECT_NAME".into(), project.clone()),
        ("BIND_ADDRESS".into(), "127.0.0.1".into()),
        ("NO_BUILD".into(), "1".into()),
        ("SWITCHBOARD_TAG".into(), IMAGE_TAG.into()),
    ];
    run.reverse = vec![(format!("{project}_"), "compose_".into())];
    require_images(&[image("lb-nginx")]);
    run.diagnose = Some(STACK_LOGS);
    run_doc(run);
}

#[test]
fn scenario_2_virtual_hosts() {
    run_doc(doc("docs/scenario-2-virtual-hosts.md"));
}

#[test]
fn scenario_3_health_checks() {
    run_doc(doc("docs/scenario-3-health-checks.md"));
}

#[test]
fn scenario_4_failover() {
    run_doc(doc("docs/scenario-4-failover.md"));
}

/// docs/protocols.md's "Try it": every routing label through both shipped templates, with
/// `protocol-demo` containers as the backends.
#[test]
fn protocols() {
    let mut run = doc("docs/protocols.md");
    run.timeout = Duration::from_secs(120);
    run_doc(run);
}

#[test]
fn custom_template() {
    run_doc(doc("docs/custom-template.md"));
}

#[test]
fn zero_failed_requests() {
    let project = format!("sbtest{}docsz", std::process::id());
    let mut run = doc("docs/zero-failed-requests.md");
    run.env = vec![
        ("COMPOSE_PROJECT_NAME".into(), project.clone()),
        ("BIND_ADDRESS".into(), "127.0.0.1".into()),
        ("NO_BUILD".into(), "1".into()),
        ("SWITCHBOARD_TAG".into(), IMAGE_TAG.into()),
    ];
    run.reverse = vec![(format!("{project}_"), "compose_".into())];
    run.diagnose = Some(STACK_LOGS);
    run_doc(run);
}

/// The runner's own rules, on a small document.
#[test]
fn runner_reads_blocks_placeholders_and_cleanup() {
    let md = "# T\n\n```sh\nPORT=${PORT:-8080}\n```\n\n```yaml\nnot: run\n```\n\n\
              ```console\n$ echo a \\\n  b\na b\n$ true\n```\n\n## Clean up\n\n```sh\nrm x\n```\n";
    let r = parse(md, None);
    assert_eq!(r.steps.len(), 2);
    assert_eq!(r.cleanup.len(), 1);
    assert_eq!(r.settings.get("PORT").map(String::as_str), Some("8080"));
    let Block::Console { steps, .. } = &r.steps[1] else {
        panic!("{:?}", r.steps[1]);
    };
    assert_eq!(steps[0].command, "echo a \\\n  b");
    assert_eq!(steps[0].expected, vec!["a b".to_string()]);
    assert!(steps[1].expected.is_empty());

    assert!(line_matches(
        "Hello from <id> (<addr>)",
        "Hello from ab12 (10.0.0.2)"
    ));
    assert!(!line_matches(
        "Hello from <id> (<addr>)",
        "Hello from  (10.0.0.2)"
    ));
    assert!(!line_matches("Hello from <id>", "Bye from x"));
    assert!(line_matches("<HTML><b>", "<HTML>x"));
    assert!(line_matches("a < b", "a < b"));
    assert!(!line_matches("a < b", "a << b"));
    assert!(line_matches("a <x> b", "a 1 2 b"));
    assert!(line_matches(
        "    server <host>_rest-1_80-<hash> <addr>:80 check cookie <host>_rest-1_80-<hash>",
        "    server vm_rest-1_80-f8b97110 172.17.0.2:80 check cookie vm_rest-1_80-f8b97110"
    ));
    let exp = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(lines_match(&exp(&["...", "end"]), &["a", "b", "end"]));
    assert!(lines_match(&exp(&["...", "end"]), &["end"]));
    assert!(!lines_match(&exp(&["a", "end"]), &["a", "b", "end"]));
    assert!(!lines_match(&exp(&["a"]), &[]));
    assert_eq!(
        bare_wait("sleep 1; docker stop x; wait"),
        Some("sleep 1; docker stop x; wait")
    );
    assert_eq!(bare_wait("client & C=$!; wait $C"), None);
    assert_eq!(
        map_number(
            "a:41234/ listen=41234 tcp_41234 141234 412345 4123441234",
            41234,
            7000
        ),
        "a:7000/ listen=7000 tcp_7000 141234 412345 4123441234"
    );

    // Only the named sections of the README count.
    let r = parse(
        "# A\n```sh\nx\n```\n## Quick start\n```sh\ny\n```\n### Sub\n```sh\nz\n```\n## B\n```sh\nw\n```\n## Clean up\n```sh\nc\n```\n",
        Some(&["Quick start", "Clean up"]),
    );
    let texts: Vec<String> = r
        .steps
        .iter()
        .map(|b| match b {
            Block::Sh { text, .. } => text.clone(),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(texts, vec!["y", "z"]);
    assert_eq!(r.cleanup.len(), 1);
}

/// Scenario 5 as written: as root, a second `dockerd` on a bridge of its own (`br-sbdocs`,
/// 10.213.58.1/24, the settings the doc offers, so it never meets the bridge of
/// `scenarios_failover_hosts.rs`), removed by the recipe's cleanup.
#[test]
fn scenario_5_several_hosts() {
    let mut run = doc("docs/scenario-5-several-hosts.md");
    run.env = vec![
        ("BRIDGE".into(), "br-sbdocs".into()),
        ("BRIDGE_ADDR".into(), "10.213.58.1/24".into()),
    ];
    run_doc(run);
}

/// GitHub's anchor for a heading: lower case, punctuation dropped (letters, digits, `-` and
/// `_` stay), spaces as `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a markdown page (a repeated heading gets `-1`, `-2`, as on GitHub) and its
/// links `(line, target)`, outside fenced code and inline code.
fn anchors_and_links(text: &str) -> (Vec<String>, Vec<(usize, String)>) {
    let (mut anchors, mut links) = (Vec::new(), Vec::new());
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut fenced = false;
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        if let Some(h) = line.strip_prefix('#') {
            let base = slug(h.trim_start_matches('#'));
            let k = seen.entry(base.clone()).or_insert(0);
            anchors.push(if *k == 0 { base } else { format!("{base}-{k}") });
            *k += 1;
        }
        // Inline code spans are not links.
        let prose: String = line
            .split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(_, s)| s)
            .collect::<Vec<_>>()
            .join(" ");
        let mut rest = prose.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            links.push((n + 1, after[..end].trim().to_string()));
            rest = &after[end..];
        }
    }
    (anchors, links)
}

/// Every relative link of the user docs names a file that exists, and every `#anchor` a
/// heading of the page it points at.
#[test]
fn relative_links_and_anchors_resolve() {
    let root = workspace_root();
    let mut pages: Vec<std::path::PathBuf> = ["README.md", "CHANGELOG.md", "CONTRIBUTING.md"]
        .iter()
        .map(|p| root.join(p))
        .filter(|p| p.exists())
        .collect();
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "md") {
            pages.push(p);
        }
    }
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        let (_, links) = anchors_and_links(&text);
        for (line, target) in links {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let dest = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            let name = format!(
                "{}:{line}: {target}",
                page.strip_prefix(&root).unwrap().display()
            );
            if !dest.exists() {
                broken.push(format!("{name} (no such file)"));
                continue;
            }
            if let Some(a) = anchor {
                let (anchors, _) = anchors_and_links(&std::fs::read_to_string(&dest).unwrap());
                if !anchors.iter().any(|x| x == a) {
                    broken.push(format!("{name} (no such heading)"));
                }
            }
        }
    }
    assert!(checked > 0, "no relative link found: the parser is broken");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn link_checker_rules() {
    assert_eq!(
        slug(" Registrator beside its floor, and its memory (1.2 MiB)"),
        "registrator-beside-its-floor-and-its-memory-12-mib"
    );
    assert_eq!(
        slug(" Config file (YAML; `file:line`)"),
        "config-file-yaml-fileline"
    );
    let (anchors, links) = anchors_and_links(
        "# A\n## A\n[x](b.md#c) `[no](link)`\n```\n[no](link)\n# not a heading\n```\n[y](#a-1)\n",
    );
    assert_eq!(anchors, vec!["a", "a-1"]);
    assert_eq!(
        links,
        vec![(3, "b.md#c".to_string()), (8, "#a-1".to_string())]
    );
}
