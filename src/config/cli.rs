//! The command line, read into [`RawArgs`] without judging the values.
//!
//! Values stay strings here because `config` has to merge them with a
//! config file before it can validate them (a flag overrides the file's key, and
//! whether an upstream is missing depends on both). This module does no I/O, so
//! tests drive it with [`parse_from`].

use std::ffi::OsString;
use std::fmt;

use crate::config::settings::{Group, SWITCH, Spec, all_specs, spec_by_key, spec_by_short};
use crate::config::units::Quoted;

/// What the command line asks for.
// Built once per process, so the size gap costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run the proxy with these flags; their values are not yet validated.
    Run(RawArgs),
    /// `--check`: validate these flags (and their file), resolve the
    /// upstream, print the effective settings and exit; bind nothing.
    Check(RawArgs),
    /// `--help`: print [`usage`] and exit 0.
    Help,
    /// `-V`/`--version`: print [`VERSION`] and exit 0.
    Version,
    /// `tcplock ctl ...`: send one command to a running tcplock's control
    /// socket.
    Ctl(CtlArgs),
    /// `tcplock ctl --help`: print [`CTL_USAGE`] and exit 0.
    CtlHelp,
}

/// `tcplock ctl [--control PATH | -c FILE] COMMAND [ARGS]`, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtlArgs {
    /// Where the control socket is.
    pub socket: CtlSocket,
    /// The command and its arguments, as one line.
    pub command: String,
}

/// How `ctl` finds the control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtlSocket {
    /// `--control PATH`.
    Path(String),
    /// `-c FILE`: the file's `control` key.
    ConfigFile(String),
}

/// What `tcplock ctl --help` prints.
pub const CTL_USAGE: &str = "\
Usage: tcplock ctl (--control PATH | -c FILE) COMMAND [ARGS]

Sends one command to a running tcplock's control socket and prints the reply.
Commands: status, conns, position ADDR:PORT|CONN, pause, resume, drain [DUR],
          kill CONN, reload, stop, restart [INSTANCE|all]
Exit status: 0 ok, 1 error reply, 2 usage, 3 cannot connect.
";

/// Reads the arguments after `ctl`.
fn parse_ctl(args: Vec<OsString>) -> Result<Command, UsageError> {
    let mut parser = lexopt::Parser::from_args(args);
    let mut socket = None;
    let mut words: Vec<String> = Vec::new();
    loop {
        let arg = match parser.next() {
            Ok(Some(arg)) => arg,
            Ok(None) => break,
            Err(e) => return Err(UsageError::from_lexopt(e)),
        };
        let (flag, make): (&str, fn(String) -> CtlSocket) = match arg {
            lexopt::Arg::Long("help") => return no_value(&mut parser, "--help", Command::CtlHelp),
            lexopt::Arg::Long("control") => ("--control", CtlSocket::Path),
            lexopt::Arg::Short('c') | lexopt::Arg::Long("config") => {
                ("-c/--config", CtlSocket::ConfigFile)
            }
            lexopt::Arg::Value(v) => {
                // The rest is the command's, flags or not.
                let rest = parser
                    .raw_args()
                    .map_err(|e| UsageError::Other(e.to_string()))?;
                for v in std::iter::once(v).chain(rest) {
                    words.push(
                        v.into_string()
                            .map_err(|_| UsageError::NotUnicode("ctl command".to_string()))?,
                    );
                }
                break;
            }
            lexopt::Arg::Short(c) => return Err(UsageError::UnknownFlag(format!("-{c}"))),
            lexopt::Arg::Long(name) => return Err(UsageError::UnknownFlag(format!("--{name}"))),
        };
        let value = parser
            .value()
            .map_err(|_| UsageError::MissingValue(flag.to_string()))?
            .into_string()
            .map_err(|_| UsageError::NotUnicode(flag.to_string()))?;
        if socket.is_some() {
            return Err(UsageError::Ctl(
                "give --control or -c once, not both".to_string(),
            ));
        }
        socket = Some(make(value));
    }
    let socket = socket
        .ok_or_else(|| UsageError::Ctl("--control PATH or -c FILE is required".to_string()))?;
    if words.is_empty() {
        return Err(UsageError::Ctl("no command given".to_string()));
    }
    let command = words.join(" ");
    if command.contains('\n') {
        return Err(UsageError::Ctl("the command holds a newline".to_string()));
    }
    Ok(Command::Ctl(CtlArgs { socket, command }))
}

/// Parses arguments, not including the program name.
///
/// Only the shape is checked: an unknown flag, a missing value, a flag given
/// twice, a positional argument or a non-UTF-8 value is a [`UsageError`];
/// the values themselves are judged later by [`crate::config::load`].
/// Reading stops at `--help` or `--version`, which win over the flags before them.
pub fn parse_from<I>(args: I) -> Result<Command, UsageError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    if args.first().is_some_and(|first| first == "ctl") {
        return parse_ctl(args.into_iter().skip(1).collect());
    }
    let mut parser = lexopt::Parser::from_args(args);
    let mut raw = RawArgs::default();
    let mut check = false;
    loop {
        let arg = match parser.next() {
            Ok(Some(arg)) => arg,
            Ok(None) => break,
            Err(e) => return Err(UsageError::from_lexopt(e)),
        };
        let flag = match arg {
            lexopt::Arg::Long("help") => return no_value(&mut parser, "--help", Command::Help),
            lexopt::Arg::Short('V') => return no_value(&mut parser, "-V", Command::Version),
            lexopt::Arg::Long("version") => {
                return no_value(&mut parser, "--version", Command::Version);
            }
            lexopt::Arg::Long("check") => {
                if std::mem::replace(&mut check, true) {
                    return Err(UsageError::Duplicate("--check".into()));
                }
                if parser.optional_value().is_some() {
                    return Err(UsageError::UnexpectedValue("--check".into()));
                }
                continue;
            }
            lexopt::Arg::Short('c') | lexopt::Arg::Long("config") => Flag::Config,
            lexopt::Arg::Short(c) => spec_by_short(c)
                .map(Flag::Setting)
                .ok_or_else(|| UsageError::UnknownFlag(format!("-{c}")))?,
            lexopt::Arg::Long(name) => spec_by_key(name)
                .map(Flag::Setting)
                .ok_or_else(|| UsageError::UnknownFlag(format!("--{name}")))?,
            lexopt::Arg::Value(v) => {
                return Err(UsageError::UnexpectedArgument(
                    v.to_string_lossy().into_owned(),
                ));
            }
        };
        let value = match flag {
            // A switch alone means "on"; `--switch=off` still turns it off.
            Flag::Setting(spec) if spec.value_name == SWITCH => parser
                .optional_value()
                .map_or(Ok("on".to_string()), |v| v.into_string())
                .map_err(|_| UsageError::NotUnicode(flag.to_string()))?,
            _ => parser
                .value()
                .map_err(|_| UsageError::MissingValue(flag.to_string()))?
                .into_string()
                .map_err(|_| UsageError::NotUnicode(flag.to_string()))?,
        };
        let given_before = match flag {
            Flag::Config => raw.config.is_some(),
            Flag::Setting(spec) => raw.values.iter().any(|(s, _)| *s == spec),
        };
        if given_before {
            return Err(UsageError::Duplicate(flag.to_string()));
        }
        match flag {
            Flag::Config => raw.config = Some(value),
            Flag::Setting(spec) => raw.values.push((spec, value)),
        }
    }
    if check {
        // Under systemd's `ExecReload=` no socket is passed, and a config
        // made for socket activation has no listen address.
        raw.listen_optional = true;
        return Ok(Command::Check(raw));
    }
    Ok(Command::Run(raw))
}

/// A value-taking flag: a setting, or `-c` which names where the others are.
#[derive(Clone, Copy)]
enum Flag {
    Setting(&'static Spec),
    Config,
}

impl fmt::Display for Flag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Flag::Setting(spec) => spec.fmt(f),
            Flag::Config => f.write_str("-c/--config"),
        }
    }
}

/// Returns `command` unless the flag that asked for it was glued to a value
/// (`--help=x`), which would otherwise be silently dropped.
fn no_value(
    parser: &mut lexopt::Parser,
    flag: &str,
    command: Command,
) -> Result<Command, UsageError> {
    match parser.optional_value() {
        Some(_) => Err(UsageError::UnexpectedValue(flag.to_owned())),
        None => Ok(command),
    }
}

/// Parses the process's own arguments.
pub fn parse_env() -> Result<Command, UsageError> {
    parse_from(std::env::args_os().skip(1))
}

/// Every value-taking flag as given, unvalidated, in command-line order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawArgs {
    pub(crate) values: Vec<(&'static Spec, String)>,
    /// `-c`/`--config`: path of a `key = value` file.
    pub config: Option<String>,
    /// No listen address is no error: the listening socket comes from
    /// socket activation (or nothing is bound, with `--check`).
    pub(crate) listen_optional: bool,
}

impl RawArgs {
    /// The value given for the setting whose long flag is `key`, if any.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(spec, _)| spec.key == key)
            .map(|(_, value)| value.as_str())
    }

    /// Lets the listen address be left out, as socket activation passes the
    /// listening socket.
    pub fn allow_missing_listen(&mut self) {
        self.listen_optional = true;
    }
}

/// A command line that cannot be read. `Display` is one line naming the flag.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UsageError {
    /// A flag tcplock does not know, as typed (`--foo`, `-x`).
    UnknownFlag(String),
    /// A value-taking flag came last, with no value after it.
    MissingValue(String),
    /// `--help=x` and the like: a flag that takes no value was given one.
    UnexpectedValue(String),
    /// A positional argument; tcplock takes none.
    UnexpectedArgument(String),
    /// A flag given more than once.
    Duplicate(String),
    /// The flag's value is not valid UTF-8.
    NotUnicode(String),
    /// Any other failure of the argument lexer, as its message.
    Other(String),
    /// `tcplock ctl` was called wrongly; the message says how.
    Ctl(String),
}

impl UsageError {
    fn from_lexopt(e: lexopt::Error) -> Self {
        match e {
            lexopt::Error::UnexpectedOption(flag) => Self::UnknownFlag(flag),
            lexopt::Error::UnexpectedArgument(v) => {
                Self::UnexpectedArgument(v.to_string_lossy().into_owned())
            }
            lexopt::Error::UnexpectedValue { option, .. } => Self::UnexpectedValue(option),
            other => Self::Other(other.to_string()),
        }
    }
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownFlag(flag) => write!(f, "unknown flag {} (see --help)", Quoted(flag)),
            Self::MissingValue(flag) => write!(f, "{flag} needs a value"),
            Self::UnexpectedValue(flag) => write!(f, "{flag} does not take a value"),
            Self::UnexpectedArgument(v) => write!(f, "unexpected argument {}", Quoted(v)),
            Self::Duplicate(flag) => write!(f, "{flag} given twice"),
            Self::NotUnicode(flag) => write!(f, "{flag}: value is not valid UTF-8"),
            Self::Other(msg) => write!(f, "{}", Quoted(msg)),
            Self::Ctl(msg) => write!(f, "ctl: {msg}"),
        }
    }
}

impl std::error::Error for UsageError {}

/// What `--version` prints.
pub const VERSION: &str = concat!("tcplock ", env!("CARGO_PKG_VERSION"));

/// Where the help text of each flag starts.
const HELP_COLUMN: usize = 29;

/// What `--help` prints, built from the settings table.
pub fn usage() -> String {
    let mut out = String::from(
        "tcplock: lets at most N connections at a time through to one TCP service;\n\
         the others wait their turn in a first-come, first-served queue.\n\n\
         Usage: tcplock -l LISTEN (-p PORT [-h HOST] | -u HOST:PORT) [OPTIONS]\n       \
         tcplock -c FILE [OPTIONS]\n       \
         tcplock --check [-c FILE] [OPTIONS]\n       \
         tcplock ctl (--control PATH | -c FILE) COMMAND [ARGS]\n",
    );
    for group in Group::ALL {
        out.push_str(&format!("\n{}:\n", group.title()));
        for spec in all_specs().filter(|spec| spec.group == group) {
            let gap = if spec.value_name == SWITCH { "" } else { " " };
            let flag = format!("--{}{gap}{}", spec.key, spec.value_name);
            help_entry(&mut out, spec.short, &flag, spec.help);
        }
        if group == Group::Other {
            help_entry(
                &mut out,
                Some('c'),
                "--config FILE",
                "read `key = value` lines from FILE (keys are the\n\
                 long flag names); flags win over the file;\n\
                 SIGHUP re-reads it (default: none)",
            );
            help_entry(
                &mut out,
                None,
                "--check",
                "check the settings, resolve the upstream, print\n\
                 the effective settings and exit; binds nothing",
            );
            help_entry(
                &mut out,
                Some('V'),
                "--version",
                "print the version and exit",
            );
            help_entry(&mut out, None, "--help", "print this help and exit");
        }
    }
    out.push_str(
        "\nDUR is 500ms, 20s, 5m, 1h, or a bare number of milliseconds (20000).\n\
         BYTES is a number of bytes with an optional k or m suffix (16k).\n",
    );
    out
}

fn help_entry(out: &mut String, short: Option<char>, flag: &str, help: &str) {
    let head = match short {
        Some(c) => format!("  -{c}, {flag}"),
        None => format!("      {flag}"),
    };
    let mut lines = help.lines();
    let first = lines.next().unwrap_or("");
    if head.len() + 1 < HELP_COLUMN {
        out.push_str(&format!("{head:<HELP_COLUMN$}{first}\n"));
    } else {
        out.push_str(&format!("{head}\n{:HELP_COLUMN$}{first}\n", ""));
    }
    for line in lines {
        out.push_str(&format!("{:HELP_COLUMN$}{line}\n", ""));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> RawArgs {
        match parse_from(args.iter().copied()) {
            Ok(Command::Run(raw)) => raw,
            other => panic!("{args:?} gave {other:?}"),
        }
    }

    fn err(args: &[&str]) -> String {
        match parse_from(args.iter().copied()) {
            Err(e) => e.to_string(),
            ok => panic!("{args:?} gave {ok:?}"),
        }
    }

    #[test]
    fn every_flag_short_and_long() {
        for spec in all_specs() {
            let key = spec.key;
            let long = format!("--{key}");
            if spec.value_name == SWITCH {
                // Alone it means on, and the next word is not its value.
                assert_eq!(run(&[&long]).get(key), Some("on"), "{long}");
                assert_eq!(run(&[&long, "-n", "2"]).get("permits"), Some("2"));
            } else {
                assert_eq!(run(&[&long, "v1"]).get(key), Some("v1"), "{long}");
            }
            let with_eq = format!("--{key}=v2");
            assert_eq!(run(&[&with_eq]).get(key), Some("v2"), "{with_eq}");
            if let Some(c) = spec.short {
                let short = format!("-{c}");
                assert_eq!(run(&[&short, "v3"]).get(key), Some("v3"), "{short}");
                let glued = format!("-{c}v4");
                assert_eq!(run(&[&glued]).get(key), Some("v4"), "{glued}");
            }
        }
        assert_eq!(run(&["-c", "f"]).config.as_deref(), Some("f"));
        assert_eq!(run(&["--config=g"]).config.as_deref(), Some("g"));
    }

    #[test]
    fn the_2011_command_line() {
        let raw = run(&["-l", "9000", "-p", "8100", "-h", "db", "-t", "20000"]);
        assert_eq!(raw.get("listen"), Some("9000"));
        assert_eq!(raw.get("proxy-port"), Some("8100"));
        assert_eq!(raw.get("proxy-host"), Some("db"));
        assert_eq!(raw.get("timeout"), Some("20000"));
        assert_eq!(raw.get("upstream"), None);
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse_from(["--help"]), Ok(Command::Help));
        assert_eq!(parse_from(["-l", "1", "--help"]), Ok(Command::Help));
        assert_eq!(parse_from(["-V"]), Ok(Command::Version));
        assert_eq!(parse_from(["--version"]), Ok(Command::Version));
        assert_eq!(err(&["--help=yes"]), "--help does not take a value");
    }

    #[test]
    fn check_takes_the_same_flags_and_no_listen_is_needed() {
        let Ok(Command::Check(raw)) = parse_from(["-n", "2", "--check", "-p", "5"]) else {
            panic!("not a check");
        };
        assert_eq!(
            (raw.get("permits"), raw.get("proxy-port")),
            (Some("2"), Some("5"))
        );
        assert!(raw.listen_optional);
        assert!(!run(&["-p", "5"]).listen_optional);
        assert_eq!(err(&["--check", "--check"]), "--check given twice");
        assert_eq!(err(&["--check=yes"]), "--check does not take a value");
        assert_eq!(parse_from(["--check", "--help"]), Ok(Command::Help));
    }

    #[test]
    fn usage_names_every_flag() {
        let usage = usage();
        for spec in all_specs() {
            let gap = if spec.value_name == SWITCH { "[" } else { " " };
            assert!(usage.contains(&format!("--{}{gap}", spec.key)), "{spec}");
            if let Some(c) = spec.short {
                assert!(usage.contains(&format!("-{c}, --{} ", spec.key)), "{spec}");
            }
        }
        assert!(usage.contains("-c, --config FILE"));
        assert!(usage.contains("--help") && usage.contains("-V, --version"));
        for line in usage.lines() {
            assert!(line.len() <= 80, "too wide: {line:?}");
        }
    }

    #[test]
    fn usage_errors_are_one_line_naming_the_flag() {
        assert_eq!(err(&["--foo"]), "unknown flag '--foo' (see --help)");
        assert_eq!(err(&["-x"]), "unknown flag '-x' (see --help)");
        assert_eq!(err(&["-l", "1", "-n"]), "-n/--permits needs a value");
        assert_eq!(err(&["--max-queue"]), "--max-queue needs a value");
        assert_eq!(err(&["-l", "1", "x"]), "unexpected argument 'x'");
        assert_eq!(err(&["-n", "1", "--permits=2"]), "-n/--permits given twice");
        for args in [&["--foo"][..], &["-n"], &["x\ny"], &["--a\nb"]] {
            let e = err(args);
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn a_value_may_start_with_a_dash() {
        // A negative number then fails validation with its own clear message,
        // instead of reading as an unknown flag.
        assert_eq!(run(&["-t", "-5"]).get("timeout"), Some("-5"));
    }

    #[test]
    fn upstream_with_proxy_port_is_left_to_config() {
        // config.rs owns that check, since it also decides file-versus-flag.
        let raw = run(&["-u", "a:1", "-p", "2"]);
        assert!(raw.get("upstream").is_some() && raw.get("proxy-port").is_some());
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_value_is_a_usage_error() {
        use std::os::unix::ffi::OsStringExt;
        let bad = OsString::from_vec(vec![0xff]);
        let e = parse_from([OsString::from("-c"), bad]).unwrap_err();
        assert_eq!(e.to_string(), "-c/--config: value is not valid UTF-8");
    }

    #[test]
    fn ctl_takes_the_socket_then_the_command_words() {
        let ctl = |args: &[&str]| parse_from(args.iter().copied());
        assert_eq!(
            ctl(&["ctl", "--control", "/run/t.sock", "drain", "5s"]),
            Ok(Command::Ctl(CtlArgs {
                socket: CtlSocket::Path("/run/t.sock".to_string()),
                command: "drain 5s".to_string(),
            }))
        );
        assert_eq!(
            ctl(&["ctl", "-c", "t.conf", "kill", "-1"]),
            Ok(Command::Ctl(CtlArgs {
                socket: CtlSocket::ConfigFile("t.conf".to_string()),
                command: "kill -1".to_string(),
            })),
            "words after the command are its own, dashes or not"
        );
        assert_eq!(ctl(&["ctl", "--help"]), Ok(Command::CtlHelp));
        assert_eq!(
            err(&["ctl", "status"]),
            "ctl: --control PATH or -c FILE is required"
        );
        assert_eq!(err(&["ctl", "--control", "x"]), "ctl: no command given");
        assert_eq!(
            err(&["ctl", "--control", "x", "-c", "y", "status"]),
            "ctl: give --control or -c once, not both"
        );
        // `ctl` is a subcommand only in first place; the 2011 flags are untouched.
        assert_eq!(err(&["-l", "1", "ctl"]), "unexpected argument 'ctl'");
    }
}
