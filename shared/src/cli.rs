//! Go-style command lines for clap, one normaliser for both binaries.
//!
//! registrator and confd are drop-ins for Go programs (gliderlabs/registrator,
//! kelseyhightower/confd) whose users write flags the way Go's `flag` package reads them:
//! `-ip 1.2.3.4`, `-ip=1.2.3.4`, `-internal`, `-internal=false`, `-onetime`. clap reads
//! `--ip`. [`GoFlags`] rewrites the Go forms into clap's before clap parses.
//!
//! It learns which flags exist (long names and aliases) and which take the next argument as
//! their value from the clap [`Command`] itself, so there is no list to keep beside clap's
//! arguments. [`GoFlags::verify`], which each binary's tests run over its own `Command`, fails
//! as soon as the normaliser and clap disagree about any flag.

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{Arg, Command};
use std::collections::HashMap;

/// A binary's flags as Go's `flag` package would read them; built from its clap [`Command`]
/// by [`GoFlags::of`].
#[derive(Debug, Clone)]
pub struct GoFlags {
    /// Every long name clap knows, aliases included.
    long: HashMap<String, Value>,
}

/// How a known flag gets its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Value {
    /// Only attached (`-flag=value`), if at all: a switch (`-onetime`), or a Go bool
    /// (`-internal`, `-internal=false`), after which the next argument is never its value.
    Attached,
    /// The next argument too (`-ip 1.2.3.4`), whatever it looks like (`-retry-attempts -1`).
    NextArgument,
}

impl GoFlags {
    /// The flags of `command`, with clap's own `--help` and `--version`.
    pub fn of(command: &Command) -> GoFlags {
        let mut long = HashMap::new();
        for arg in built(command).get_arguments() {
            let value = if takes_next_argument(arg) {
                Value::NextArgument
            } else {
                Value::Attached
            };
            for name in long_names(arg) {
                long.insert(name, value);
            }
        }
        GoFlags { long }
    }

    /// Rewrites Go-style flags into clap's; `argv[0]` is kept.
    ///
    /// - A flag clap knows, with one dash or two: `-internal` -> `--internal`,
    ///   `-ttl-refresh=10` -> `--ttl-refresh=10`. A flag that takes a value and has none
    ///   attached takes the next argument, joined (`-ip x` -> `--ip=x`), so clap never
    ///   mistakes a value that starts with a dash for a flag; with no next argument it stays
    ///   `--ip`, for clap to report the missing value.
    /// - An unknown flag of two or more characters that is not a number (`-bogus`) is spelled
    ///   `--bogus`, so clap names it whole rather than as the short flag `-b`;
    ///   [`GoFlags::as_typed`] turns the name in clap's message back into what was typed.
    /// - `--` and everything after it, positional arguments, `-` and anything else (`-h`,
    ///   `-1`) are left for clap.
    pub fn normalise<I: IntoIterator<Item = String>>(&self, argv: I) -> Vec<String> {
        let mut it = argv.into_iter();
        let mut out: Vec<String> = it.next().into_iter().collect();
        while let Some(arg) = it.next() {
            if arg == "--" {
                out.push(arg);
                out.extend(it.by_ref());
                break;
            }
            let body = match arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) {
                Some(b) if !b.is_empty() => b,
                _ => {
                    out.push(arg);
                    continue;
                }
            };
            let (name, attached) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            match self.long.get(name) {
                Some(Value::NextArgument) if attached.is_none() => match it.next() {
                    Some(v) => out.push(format!("--{name}={v}")),
                    None => out.push(format!("--{name}")),
                },
                Some(_) => out.push(format!("--{body}")),
                None if name.len() > 1 && !name.starts_with(|c: char| c.is_ascii_digit()) => {
                    out.push(format!("--{body}"))
                }
                None => out.push(arg),
            }
        }
        out
    }

    /// clap names an unknown flag as [`GoFlags::normalise`] rewrote it (`'--foo'`); this names
    /// it as the user typed it in `argv` (`'-foo'`).
    pub fn as_typed(message: &str, argv: &[String]) -> String {
        let mut out = message.to_string();
        for a in argv.iter().skip(1) {
            if let Some(body) = a.strip_prefix('-').filter(|b| !b.starts_with('-')) {
                let name = body.split('=').next().unwrap_or(body);
                out = out.replace(&format!("'--{name}'"), &format!("'-{name}'"));
            }
        }
        out
    }

    /// Holds the normaliser against clap for every long name `command` knows (aliases,
    /// `--help` and `--version` included): `-name 1`, normalised, must be read by clap as
    /// that flag, with `1` as its value exactly when clap does not accept `--name` alone.
    /// Returns the names checked, or what disagrees. Each binary's tests run it, so a flag
    /// added to a binary is checked without anyone listing it.
    pub fn verify(command: &Command) -> Result<Vec<String>, Vec<String>> {
        GoFlags::of(command).check(command)
    }

    /// [`GoFlags::verify`] of this normaliser, whichever command it was built from.
    fn check(&self, command: &Command) -> Result<Vec<String>, Vec<String>> {
        let command = built(command);
        let bin = command.get_name().to_string();
        let read_as = |arg: &Arg, argv: &[&str]| -> Result<(), clap::Error> {
            let argv = std::iter::once(bin.as_str()).chain(argv.iter().copied());
            let m = command.clone().try_get_matches_from(argv)?;
            match m.value_source(arg.get_id().as_str()) {
                Some(ValueSource::CommandLine) => Ok(()),
                _ => Err(clap::Error::new(ErrorKind::UnknownArgument)),
            }
        };
        let (mut checked, mut problems) = (Vec::new(), Vec::new());
        for arg in command.get_arguments() {
            for name in long_names(arg) {
                let flag = format!("--{name}");
                // Whether clap takes the flag without a value: then the next argument is not
                // its value (Go's bools). Help and version end parsing, which is a yes too.
                let alone = match read_as(arg, &[&flag]) {
                    Ok(()) => true,
                    Err(e) => matches!(
                        e.kind(),
                        ErrorKind::DisplayHelp
                            | ErrorKind::DisplayVersion
                            | ErrorKind::MissingRequiredArgument
                    ),
                };
                let got = self.normalise([bin.clone(), format!("-{name}"), "1".into()]);
                let got = got[1..].join(" ");
                let problem = if alone {
                    (got != format!("{flag} 1"))
                        .then(|| format!("-{name} 1 became {got:?}; clap takes {flag} alone"))
                } else if got != format!("{flag}=1") {
                    Some(format!(
                        "-{name} 1 became {got:?}; clap needs a value for {flag}"
                    ))
                } else {
                    match read_as(arg, &[&got]) {
                        Ok(()) => None,
                        // `1` may not be a valid value; the flag was read, which is the point.
                        Err(e) if e.kind() == ErrorKind::InvalidValue => None,
                        Err(e) if e.kind() == ErrorKind::ValueValidation => None,
                        Err(e) => Some(format!("clap does not read {got} as {flag}: {e}")),
                    }
                };
                match problem {
                    Some(p) => problems.push(p),
                    None => checked.push(name),
                }
            }
        }
        if problems.is_empty() {
            Ok(checked)
        } else {
            Err(problems)
        }
    }
}

/// `command` as clap parses it: with `--help` and `--version` added and defaults applied.
fn built(command: &Command) -> Command {
    let mut command = command.clone();
    command.build();
    command
}

/// An argument's long name and aliases; none for a positional or a short-only flag.
fn long_names(arg: &Arg) -> Vec<String> {
    let aliases = arg.get_all_aliases().unwrap_or_default();
    arg.get_long()
        .into_iter()
        .chain(aliases)
        .map(String::from)
        .collect()
}

/// Whether clap needs a value for `arg` and lets it be the next argument: a flag that may
/// stand alone (a switch, `num_args = 0..=1`) or needs `=` never takes the next argument.
fn takes_next_argument(arg: &Arg) -> bool {
    arg.get_action().takes_values()
        && arg.get_num_args().is_some_and(|n| n.min_values() > 0)
        && !arg.is_require_equals_set()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ArgAction;

    /// One flag of each kind both binaries have: a value flag, a Go bool, a switch with an
    /// alias, a value flag with a hidden alias, and a positional argument.
    fn command() -> Command {
        Command::new("prog")
            .version("1")
            .arg(Arg::new("ip").long("ip"))
            .arg(
                Arg::new("internal")
                    .long("internal")
                    .num_args(0..=1)
                    .require_equals(true)
                    .default_missing_value("true"),
            )
            .arg(
                Arg::new("once")
                    .long("once")
                    .visible_alias("onetime")
                    .action(ArgAction::SetTrue),
            )
            .arg(
                Arg::new("retry")
                    .long("retry-attempts")
                    .alias("retries")
                    .allow_negative_numbers(true),
            )
            .arg(Arg::new("uri").num_args(0..))
    }

    fn argv(s: &str) -> Vec<String> {
        std::iter::once("prog")
            .chain(s.split_whitespace())
            .map(String::from)
            .collect()
    }

    #[test]
    fn normalises_go_style_flags() {
        let flags = GoFlags::of(&command());
        let cases = [
            ("-ip 1.2.3.4 u", "--ip=1.2.3.4 u"),
            ("-ip=1.2.3.4 u", "--ip=1.2.3.4 u"),
            ("--ip 1.2.3.4 u", "--ip=1.2.3.4 u"),
            ("-internal u", "--internal u"),
            ("-internal=false u", "--internal=false u"),
            ("-onetime -once u", "--onetime --once u"),
            ("-retries -1 u", "--retries=-1 u"),
            ("-retry-attempts=-1 u", "--retry-attempts=-1 u"),
            ("-ip -x u", "--ip=-x u"),
            ("-version", "--version"),
            ("-help", "--help"),
            ("-h", "-h"),
            ("-bogus=1 u", "--bogus=1 u"),
            ("-1 u", "-1 u"),
            ("u -- -ip", "u -- -ip"),
            ("-ip", "--ip"),
            ("- u", "- u"),
        ];
        for (input, want) in cases {
            assert_eq!(flags.normalise(argv(input))[1..].join(" "), want, "{input}");
        }
        assert_eq!(flags.normalise(Vec::new()), Vec::<String>::new());
    }

    #[test]
    fn unknown_flags_are_named_as_typed() {
        let typed = argv("-bogus=1 --other u");
        let message = "unexpected argument '--bogus' found; also '--other'";
        assert_eq!(
            GoFlags::as_typed(message, &typed),
            "unexpected argument '-bogus' found; also '--other'"
        );
    }

    #[test]
    fn verify_checks_every_long_name_and_finds_disagreements() {
        let names = GoFlags::verify(&command()).unwrap();
        let mut names: Vec<&str> = names.iter().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "help",
                "internal",
                "ip",
                "once",
                "onetime",
                "retries",
                "retry-attempts",
                "version"
            ]
        );
        // A normaliser that lets a Go bool take the next argument, and one that leaves a
        // value flag without its value, are both caught.
        let mut wrong = GoFlags::of(&command());
        wrong.long.insert("internal".into(), Value::NextArgument);
        wrong.long.insert("ip".into(), Value::Attached);
        let got = wrong.normalise(argv("-internal u"));
        assert_eq!(got[1..].join(" "), "--internal=u");
        let problems = wrong.check(&command()).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(problems[0].contains("-ip 1") || problems[1].contains("-ip 1"));
    }
}
