//! The command line, read into [`RawArgs`] without judging the values.
//!
//! Values stay strings here because [`crate::config`] has to merge them with a
//! config file before it can validate them (a flag overrides the file's key, and
//! whether an upstream is missing depends on both). This module does no I/O, so
//! tests drive it with [`parse_from`].

use std::ffi::OsString;
use std::fmt;

use crate::units::Quoted;

/// What the command line asks for.
// Built once per process, so the size gap costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run the proxy with these flags; their values are not yet validated.
    Run(RawArgs),
    /// `--help`: print [`USAGE`] and exit 0.
    Help,
    /// `-V`/`--version`: print [`VERSION`] and exit 0.
    Version,
}

/// Parses arguments, not including the program name.
///
/// Only the shape is checked: an unknown flag, a missing value, a flag given
/// twice, a positional argument or a non-UTF-8 value is a [`UsageError`];
/// the values themselves are judged later by [`crate::config::load`].
/// Reading stops at `--help` or `--version`, which win over the flags before them.
///
/// ```
/// use tcplock::cli::{Command, Flag, parse_from};
///
/// let Ok(Command::Run(raw)) = parse_from(["-l", "9000", "--permits=2"]) else {
///     panic!("not a run");
/// };
/// assert_eq!(raw.get(Flag::Permits), Some("2"));
/// assert_eq!(parse_from(["-n", "1", "-n", "2"]).unwrap_err().to_string(),
///            "-n/--permits given twice");
/// ```
pub fn parse_from<I>(args: I) -> Result<Command, UsageError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let mut parser = lexopt::Parser::from_args(args);
    let mut raw = RawArgs::default();
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
            lexopt::Arg::Short(c) => {
                Flag::from_short(c).ok_or_else(|| UsageError::UnknownFlag(format!("-{c}")))?
            }
            lexopt::Arg::Long(name) => {
                Flag::from_long(name).ok_or_else(|| UsageError::UnknownFlag(format!("--{name}")))?
            }
            lexopt::Arg::Value(v) => {
                return Err(UsageError::UnexpectedArgument(
                    v.to_string_lossy().into_owned(),
                ));
            }
        };
        let value = parser
            .value()
            .map_err(|_| UsageError::MissingValue(flag))?
            .into_string()
            .map_err(|_| UsageError::NotUnicode(flag))?;
        let slot = raw.slot_mut(flag);
        if slot.is_some() {
            return Err(UsageError::Duplicate(flag));
        }
        *slot = Some(value);
    }
    Ok(Command::Run(raw))
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

/// Every value-taking flag as given, unvalidated. `None` means not given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawArgs {
    /// `-l`/`--listen`: where clients connect.
    pub listen: Option<String>,
    /// `-p`/`--proxy-port`: the upstream port.
    pub proxy_port: Option<String>,
    /// `-h`/`--proxy-host`: the upstream host.
    pub proxy_host: Option<String>,
    /// `-u`/`--upstream`: the upstream as one `HOST:PORT`.
    pub upstream: Option<String>,
    /// `-n`/`--permits`: connections let through at once.
    pub permits: Option<String>,
    /// `-t`/`--timeout`: longest a connection may proxy.
    pub timeout: Option<String>,
    /// `--queue-timeout`: longest wait from accept until proxying.
    pub queue_timeout: Option<String>,
    /// `--max-queue`: most connections waiting.
    pub max_queue: Option<String>,
    /// `--connect-timeout`: the upstream connect timeout.
    pub connect_timeout: Option<String>,
    /// `--buffer-size`: relay buffer per direction.
    pub buffer_size: Option<String>,
    /// `--log-level`: `error`, `warn`, `info` or `debug`.
    pub log_level: Option<String>,
    /// `--on-activate`: shell command run before each activation; empty means none.
    pub on_activate: Option<String>,
    /// `--on-timeout`: shell command run after a TTL expiry; empty means none.
    pub on_timeout: Option<String>,
    /// `--hook-timeout`: how long a hook may run.
    pub hook_timeout: Option<String>,
    /// `--shutdown-grace`: how long proxying connections may finish on SIGTERM.
    pub shutdown_grace: Option<String>,
    /// `--splice`: `auto`, `on` or `off`.
    pub splice: Option<String>,
    /// `--queued-eof`: `keep` or `drop`.
    pub queued_eof: Option<String>,
    /// `-c`/`--config`: path of a `key = value` file.
    pub config: Option<String>,
}

impl RawArgs {
    /// The value given for `flag`, if any.
    pub fn get(&self, flag: Flag) -> Option<&str> {
        let slot = match flag {
            Flag::Listen => &self.listen,
            Flag::ProxyPort => &self.proxy_port,
            Flag::ProxyHost => &self.proxy_host,
            Flag::Upstream => &self.upstream,
            Flag::Permits => &self.permits,
            Flag::Timeout => &self.timeout,
            Flag::QueueTimeout => &self.queue_timeout,
            Flag::MaxQueue => &self.max_queue,
            Flag::ConnectTimeout => &self.connect_timeout,
            Flag::BufferSize => &self.buffer_size,
            Flag::LogLevel => &self.log_level,
            Flag::OnActivate => &self.on_activate,
            Flag::OnTimeout => &self.on_timeout,
            Flag::HookTimeout => &self.hook_timeout,
            Flag::ShutdownGrace => &self.shutdown_grace,
            Flag::Splice => &self.splice,
            Flag::QueuedEof => &self.queued_eof,
            Flag::Config => &self.config,
        };
        slot.as_deref()
    }

    fn slot_mut(&mut self, flag: Flag) -> &mut Option<String> {
        match flag {
            Flag::Listen => &mut self.listen,
            Flag::ProxyPort => &mut self.proxy_port,
            Flag::ProxyHost => &mut self.proxy_host,
            Flag::Upstream => &mut self.upstream,
            Flag::Permits => &mut self.permits,
            Flag::Timeout => &mut self.timeout,
            Flag::QueueTimeout => &mut self.queue_timeout,
            Flag::MaxQueue => &mut self.max_queue,
            Flag::ConnectTimeout => &mut self.connect_timeout,
            Flag::BufferSize => &mut self.buffer_size,
            Flag::LogLevel => &mut self.log_level,
            Flag::OnActivate => &mut self.on_activate,
            Flag::OnTimeout => &mut self.on_timeout,
            Flag::HookTimeout => &mut self.hook_timeout,
            Flag::ShutdownGrace => &mut self.shutdown_grace,
            Flag::Splice => &mut self.splice,
            Flag::QueuedEof => &mut self.queued_eof,
            Flag::Config => &mut self.config,
        }
    }
}

/// A value-taking flag. Its long name doubles as its config-file key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flag {
    /// `-l`/`--listen`.
    Listen,
    /// `-p`/`--proxy-port`.
    ProxyPort,
    /// `-h`/`--proxy-host`.
    ProxyHost,
    /// `-u`/`--upstream`.
    Upstream,
    /// `-n`/`--permits`.
    Permits,
    /// `-t`/`--timeout`.
    Timeout,
    /// `--queue-timeout`.
    QueueTimeout,
    /// `--max-queue`.
    MaxQueue,
    /// `--connect-timeout`.
    ConnectTimeout,
    /// `--buffer-size`.
    BufferSize,
    /// `--log-level`.
    LogLevel,
    /// `--on-activate`.
    OnActivate,
    /// `--on-timeout`.
    OnTimeout,
    /// `--hook-timeout`.
    HookTimeout,
    /// `--shutdown-grace`.
    ShutdownGrace,
    /// `--splice`.
    Splice,
    /// `--queued-eof`.
    QueuedEof,
    /// `-c`/`--config`; the one flag that is not also a config-file key.
    Config,
}

impl Flag {
    /// Every value-taking flag, each once (`--help` and `--version` take no
    /// value and are not among them).
    pub const ALL: [Self; 18] = [
        Self::Listen,
        Self::ProxyPort,
        Self::ProxyHost,
        Self::Upstream,
        Self::Permits,
        Self::Timeout,
        Self::QueueTimeout,
        Self::MaxQueue,
        Self::ConnectTimeout,
        Self::BufferSize,
        Self::LogLevel,
        Self::OnActivate,
        Self::OnTimeout,
        Self::HookTimeout,
        Self::ShutdownGrace,
        Self::Splice,
        Self::QueuedEof,
        Self::Config,
    ];

    /// The long name without `--`, which is also the config-file key.
    pub fn long(self) -> &'static str {
        match self {
            Self::Listen => "listen",
            Self::ProxyPort => "proxy-port",
            Self::ProxyHost => "proxy-host",
            Self::Upstream => "upstream",
            Self::Permits => "permits",
            Self::Timeout => "timeout",
            Self::QueueTimeout => "queue-timeout",
            Self::MaxQueue => "max-queue",
            Self::ConnectTimeout => "connect-timeout",
            Self::BufferSize => "buffer-size",
            Self::LogLevel => "log-level",
            Self::OnActivate => "on-activate",
            Self::OnTimeout => "on-timeout",
            Self::HookTimeout => "hook-timeout",
            Self::ShutdownGrace => "shutdown-grace",
            Self::Splice => "splice",
            Self::QueuedEof => "queued-eof",
            Self::Config => "config",
        }
    }

    /// The one-letter alias without `-`, for the seven flags that have one.
    pub fn short(self) -> Option<char> {
        match self {
            Self::Listen => Some('l'),
            Self::ProxyPort => Some('p'),
            // `-h` is the proxy host, as in the 2011 tool; help is `--help` only.
            Self::ProxyHost => Some('h'),
            Self::Upstream => Some('u'),
            Self::Permits => Some('n'),
            Self::Timeout => Some('t'),
            Self::Config => Some('c'),
            _ => None,
        }
    }

    /// The flag whose long name (without `--`) is exactly `name`, case-sensitive.
    pub fn from_long(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.long() == name)
    }

    /// The flag whose one-letter alias is `c`.
    pub fn from_short(c: char) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.short() == Some(c))
    }
}

/// Shows the flag as the user may have typed it: `-n/--permits` or `--max-queue`.
impl fmt::Display for Flag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.short() {
            Some(c) => write!(f, "-{c}/--{}", self.long()),
            None => write!(f, "--{}", self.long()),
        }
    }
}

/// A command line that cannot be read. `Display` is one line naming the flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageError {
    /// A flag tcplock does not know, as typed (`--foo`, `-x`).
    UnknownFlag(String),
    /// A value-taking flag came last, with no value after it.
    MissingValue(Flag),
    /// `--help=x` and the like: a flag that takes no value was given one.
    UnexpectedValue(String),
    /// A positional argument; tcplock takes none.
    UnexpectedArgument(String),
    /// A flag given more than once.
    Duplicate(Flag),
    /// The flag's value is not valid UTF-8.
    NotUnicode(Flag),
    /// Any other failure of the argument lexer, as its message.
    Other(String),
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
        }
    }
}

impl std::error::Error for UsageError {}

/// What `--version` prints.
pub const VERSION: &str = concat!("tcplock ", env!("CARGO_PKG_VERSION"));

/// What `--help` prints.
pub const USAGE: &str = "\
tcplock: lets at most N connections at a time through to one TCP service;
the others wait their turn in a first-come, first-served queue.

Usage: tcplock -l LISTEN (-p PORT [-h HOST] | -u HOST:PORT) [OPTIONS]
       tcplock -c FILE [OPTIONS]

Addresses:
  -l, --listen ADDR          where clients connect: PORT, HOST:PORT or [V6]:PORT.
                             Required. PORT alone binds 127.0.0.1 only.
  -p, --proxy-port PORT      upstream port
  -h, --proxy-host HOST      upstream host (default: localhost)
  -u, --upstream HOST:PORT   upstream in one word; not together with -p or -h

Limits:
  -n, --permits N            connections let through at once (default: 1)
  -t, --timeout DUR          longest a connection may proxy; 0 = no limit
                             (default: 0)
      --queue-timeout DUR    longest wait from accept until proxying;
                             0 = no limit (default: 0)
      --max-queue N          most connections waiting; one more is closed at
                             once (default: 1024)
      --connect-timeout DUR  upstream connect timeout; 0 = no limit
                             (default: 10s)
      --buffer-size BYTES    relay buffer per direction, 1k to 64m
                             (default: 16k)

Hooks (run with /bin/sh -c, one at a time):
      --on-activate CMD      runs before each activation; exit 0 lets the
                             connection through (default: none)
      --on-timeout CMD       runs after a connection's timeout (default: none)
      --hook-timeout DUR     kill a hook and its process group after this
                             long; 0 = never (default: 60s)

Other:
  -c, --config FILE          read `key = value` lines from FILE (keys are the
                             long flag names); flags win over the file;
                             SIGHUP re-reads it (default: none)
      --shutdown-grace DUR   on SIGTERM, how long proxying connections may
                             finish; 0 = don't wait (default: 30s)
      --log-level LEVEL      error, warn, info or debug (default: info)
      --splice auto|on|off   move bytes with splice(2) instead of copying;
                             auto switches a direction over once it streams
                             a full buffer (default: auto)
      --queued-eof keep|drop what a waiting client's end of stream means:
                             keep its place and deliver what it sent, or
                             drop it from the queue (default: keep)
  -V, --version              print the version and exit
      --help                 print this help and exit

DUR is 500ms, 20s, 5m, 1h, or a bare number of milliseconds (20000).
BYTES is a number of bytes with an optional k or m suffix (16k).
";

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
        for flag in Flag::ALL {
            let long = format!("--{}", flag.long());
            assert_eq!(run(&[&long, "v1"]).get(flag), Some("v1"), "{long}");
            let with_eq = format!("--{}=v2", flag.long());
            assert_eq!(run(&[&with_eq]).get(flag), Some("v2"), "{with_eq}");
            if let Some(c) = flag.short() {
                let short = format!("-{c}");
                assert_eq!(run(&[&short, "v3"]).get(flag), Some("v3"), "{short}");
                let glued = format!("-{c}v4");
                assert_eq!(run(&[&glued]).get(flag), Some("v4"), "{glued}");
            }
        }
    }

    #[test]
    fn the_2011_command_line() {
        let raw = run(&["-l", "9000", "-p", "8100", "-h", "db", "-t", "20000"]);
        assert_eq!(raw.listen.as_deref(), Some("9000"));
        assert_eq!(raw.proxy_port.as_deref(), Some("8100"));
        assert_eq!(raw.proxy_host.as_deref(), Some("db"));
        assert_eq!(raw.timeout.as_deref(), Some("20000"));
        assert_eq!(raw.upstream, None);
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
    fn usage_names_every_flag() {
        for flag in Flag::ALL {
            assert!(USAGE.contains(&format!("--{} ", flag.long())), "{flag}");
        }
        assert!(USAGE.contains("--help") && USAGE.contains("-V, --version"));
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
        assert_eq!(run(&["-t", "-5"]).timeout.as_deref(), Some("-5"));
    }

    #[test]
    fn upstream_with_proxy_port_is_left_to_config() {
        // config.rs owns that check, since it also decides file-versus-flag.
        let raw = run(&["-u", "a:1", "-p", "2"]);
        assert!(raw.upstream.is_some() && raw.proxy_port.is_some());
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_value_is_a_usage_error() {
        use std::os::unix::ffi::OsStringExt;
        let bad = OsString::from_vec(vec![0xff]);
        let e = parse_from([OsString::from("-c"), bad]).unwrap_err();
        assert_eq!(e.to_string(), "-c/--config: value is not valid UTF-8");
    }
}
