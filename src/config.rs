//! Turns the command line and an optional `key = value` file into one validated
//! [`Config`].
//!
//! Both sources are read into a [`Settings`] of typed, optional values (so a
//! file's bad value is reported with its line), then merged with the command
//! line winning, then defaulted and checked as a whole. SIGHUP re-runs [`load`]
//! with the same [`RawArgs`], so the command line keeps winning after a reload.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::{Flag, RawArgs};
use crate::hook::Hook;
use crate::units::{self, HostPort, Quoted};

/// Everything the proxy needs to run, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `HOST:PORT`, normalized by [`units::parse_listen`]; resolved by the caller.
    pub listen: String,
    /// The service behind the lock; resolved at start-up and again when a
    /// reload changes it.
    pub upstream: HostPort,
    /// At least 1.
    pub permits: u32,
    /// `--timeout`: how long a connection may proxy. `None` means no limit.
    pub ttl: Option<Duration>,
    /// Longest wait from accept until proxying. `None` means no limit.
    pub queue_timeout: Option<Duration>,
    /// 0 means a connection that cannot be activated at once is rejected.
    pub max_queue: usize,
    /// Upstream connect timeout, 10 s by default. `None` means no limit.
    pub connect_timeout: Option<Duration>,
    /// Bytes per relay direction, within [`MIN_BUFFER_SIZE`]..=[`MAX_BUFFER_SIZE`].
    pub buffer_size: usize,
    /// What the logfmt lines on stderr include; [`LogLevel::Info`] by default.
    pub log_level: LogLevel,
    /// Runs before each activation; only its success lets the connection
    /// through, a failure retries after a backoff. `None` lets connections
    /// straight through.
    pub on_activate: Option<Hook>,
    /// Runs after each TTL expiry. `None` means nothing runs.
    pub on_timeout: Option<Hook>,
    /// How long a hook may run before it is given up on (a command hook's
    /// process group is killed), 60 s by default. `None` means never.
    pub hook_timeout: Option<Duration>,
    /// Zero means close proxying connections at once on SIGTERM.
    pub shutdown_grace: Duration,
    /// When to relay with `splice(2)` instead of copying;
    /// [`Splice::Auto`] by default.
    pub splice: Splice,
    /// What a waiting client's end of stream does; [`QueuedEof::Keep`] by
    /// default.
    pub queued_eof: QueuedEof,
    /// The `-c` file, re-read on SIGHUP; `None` when none was given.
    pub config_file: Option<PathBuf>,
}

impl Config {
    /// A config with every default: 1 permit, no TTL or queue timeout, a queue of
    /// 1024, a 10 s connect timeout, 16 KiB buffers, info logs, no hooks, a 60 s
    /// hook timeout and a 30 s shutdown grace.
    pub fn new(listen: String, upstream: HostPort) -> Config {
        Config {
            listen,
            upstream,
            permits: 1,
            ttl: None,
            queue_timeout: None,
            max_queue: 1024,
            connect_timeout: Some(Duration::from_secs(10)),
            buffer_size: 16 * 1024,
            log_level: LogLevel::Info,
            on_activate: None,
            on_timeout: None,
            hook_timeout: Some(Duration::from_secs(60)),
            shutdown_grace: Duration::from_secs(30),
            splice: Splice::Auto,
            queued_eof: QueuedEof::Keep,
            config_file: None,
        }
    }
}

/// Reads the config file named by `-c` (if any), lets the command line override
/// it, and validates the result.
pub fn load(raw: &RawArgs) -> Result<Config, ConfigError> {
    let cli = Settings::from_args(raw)?;
    let config_file = raw.config.as_ref().map(PathBuf::from);
    let file = match &config_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Io {
                path: path.clone(),
                error,
            })?;
            Some(parse_file(&text, path)?)
        }
        None => None,
    };
    let file_path = config_file.as_deref().unwrap_or(Path::new(""));
    let merged = merge(cli, file.unwrap_or_default(), file_path)?;
    merged.finish(config_file)
}

/// Parses the text of a config file. Pure, so it can be fuzzed; `path` only
/// names the file in errors.
///
/// Blank lines and lines starting with `#` are skipped; every other line is
/// `key = value`, split at the first `=`, with the long flag names (except
/// `config`) as keys. Keys may be missing here. The first unknown or repeated
/// key, bad value, or `upstream` next to `proxy-host`/`proxy-port` is a
/// [`ConfigError::File`] naming its line.
///
/// ```
/// use std::path::Path;
/// use tcplock::config::parse_file;
///
/// let path = Path::new("tcplock.conf");
/// let file = parse_file("# db lock\nlisten = 9000\npermits = 2\n", path).unwrap();
/// assert_eq!(file.settings.listen.as_deref(), Some("127.0.0.1:9000"));
/// assert_eq!(file.settings.permits, Some(2));
///
/// let err = parse_file("permits = 0\n", path).unwrap_err();
/// assert_eq!(err.to_string(), "tcplock.conf:1: permits: '0' is too small (at least 1)");
/// ```
pub fn parse_file(text: &str, path: &Path) -> Result<FileArgs, ConfigError> {
    let mut settings = Settings::default();
    let mut seen: Vec<(Flag, usize)> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let fail = |message: String| ConfigError::File {
            path: path.to_owned(),
            line: line_no,
            message,
        };
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        // Split at the first `=` only: a hook command may hold more of them.
        let Some((key, value)) = trimmed.split_once('=') else {
            return Err(fail(format!(
                "expected 'key = value', got {}",
                Quoted(trimmed)
            )));
        };
        let (key, value) = (key.trim(), value.trim());
        let flag = match Flag::from_long(key) {
            Some(Flag::Config) => {
                return Err(fail("'config' cannot be set inside a config file".into()));
            }
            Some(flag) => flag,
            None => return Err(fail(format!("unknown key {}", Quoted(key)))),
        };
        if let Some(&(_, first)) = seen.iter().find(|(f, _)| *f == flag) {
            return Err(fail(format!(
                "duplicate key '{key}' (first set at line {first})"
            )));
        }
        let rival = match flag {
            Flag::Upstream => seen
                .iter()
                .find(|(f, _)| matches!(f, Flag::ProxyHost | Flag::ProxyPort)),
            Flag::ProxyHost | Flag::ProxyPort => seen.iter().find(|(f, _)| *f == Flag::Upstream),
            _ => None,
        };
        if let Some(&(other, other_line)) = rival {
            return Err(fail(format!(
                "'{key}' cannot be combined with '{}' (line {other_line})",
                other.long()
            )));
        }
        seen.push((flag, line_no));
        settings
            .set(flag, value)
            .map_err(|reason| fail(format!("{key}: {reason}")))?;
    }
    let proxy_host_line = seen
        .iter()
        .find(|(f, _)| *f == Flag::ProxyHost)
        .map(|&(_, line)| line);
    Ok(FileArgs {
        settings,
        proxy_host_line,
    })
}

/// The settings a config file holds, validated value by value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileArgs {
    /// Every key the file sets, each value checked on its own.
    pub settings: Settings,
    /// Where `proxy-host` was set, to blame that line if no port turns up.
    pub proxy_host_line: Option<usize>,
}

/// Settings from one source, each value valid on its own; `None` means the
/// source does not set it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// `listen`, normalized to `HOST:PORT` by [`units::parse_listen`].
    pub listen: Option<String>,
    /// `upstream`, port 1-65535.
    pub upstream: Option<HostPort>,
    /// `proxy-host`, without brackets.
    pub proxy_host: Option<String>,
    /// `proxy-port`, 1-65535.
    pub proxy_port: Option<u16>,
    /// `permits`, 1..=[`MAX_PERMITS`].
    pub permits: Option<u32>,
    /// `timeout`; zero is kept and means no limit.
    pub timeout: Option<Duration>,
    /// `queue-timeout`; zero is kept and means no limit.
    pub queue_timeout: Option<Duration>,
    /// `max-queue`, 0..=[`MAX_QUEUE`].
    pub max_queue: Option<usize>,
    /// `connect-timeout`; zero is kept and means no limit.
    pub connect_timeout: Option<Duration>,
    /// `buffer-size` in bytes, [`MIN_BUFFER_SIZE`]..=[`MAX_BUFFER_SIZE`].
    pub buffer_size: Option<usize>,
    /// `log-level`.
    pub log_level: Option<LogLevel>,
    /// Kept as given: an empty command here means "no hook", and must still
    /// override a hook set by the other source.
    pub on_activate: Option<String>,
    /// `on-timeout`, kept as given like `on_activate`.
    pub on_timeout: Option<String>,
    /// `hook-timeout`; zero is kept and means never.
    pub hook_timeout: Option<Duration>,
    /// `shutdown-grace`; zero means don't wait.
    pub shutdown_grace: Option<Duration>,
    /// `splice`: `auto`, `on` or `off`.
    pub splice: Option<Splice>,
    /// `queued-eof`: `keep` or `drop`.
    pub queued_eof: Option<QueuedEof>,
}

impl Settings {
    fn from_args(raw: &RawArgs) -> Result<Self, ConfigError> {
        let mut settings = Self::default();
        for flag in Flag::ALL {
            if flag == Flag::Config {
                continue;
            }
            if let Some(value) = raw.get(flag) {
                settings
                    .set(flag, value)
                    .map_err(|reason| ConfigError::Usage(format!("{flag}: {reason}")))?;
            }
        }
        Ok(settings)
    }

    /// Validates `value` for `flag` and stores it; the error is the reason only,
    /// so the caller can prefix the flag or the file line.
    fn set(&mut self, flag: Flag, value: &str) -> Result<(), String> {
        let unit = |e: units::UnitError| e.to_string();
        match flag {
            Flag::Listen => self.listen = Some(units::parse_listen(value).map_err(unit)?),
            Flag::Upstream => self.upstream = Some(units::parse_host_port(value).map_err(unit)?),
            Flag::ProxyHost => self.proxy_host = Some(units::parse_host(value).map_err(unit)?),
            Flag::ProxyPort => self.proxy_port = Some(units::parse_port(value).map_err(unit)?),
            Flag::Permits => self.permits = Some(parse_count(value, 1, MAX_PERMITS)?),
            Flag::MaxQueue => self.max_queue = Some(parse_count(value, 0, MAX_QUEUE)?),
            Flag::Timeout => self.timeout = Some(units::parse_duration(value).map_err(unit)?),
            Flag::QueueTimeout => {
                self.queue_timeout = Some(units::parse_duration(value).map_err(unit)?)
            }
            Flag::ConnectTimeout => {
                self.connect_timeout = Some(units::parse_duration(value).map_err(unit)?)
            }
            Flag::HookTimeout => {
                self.hook_timeout = Some(units::parse_duration(value).map_err(unit)?)
            }
            Flag::ShutdownGrace => {
                self.shutdown_grace = Some(units::parse_duration(value).map_err(unit)?)
            }
            Flag::BufferSize => {
                let size = units::parse_size(value).map_err(unit)?;
                if !(MIN_BUFFER_SIZE..=MAX_BUFFER_SIZE).contains(&size) {
                    return Err(format!(
                        "buffer size {} out of range (1k to 64m)",
                        Quoted(value)
                    ));
                }
                self.buffer_size = Some(size);
            }
            Flag::LogLevel => {
                self.log_level = Some(LogLevel::parse(value).ok_or_else(|| {
                    format!(
                        "invalid log level {} (use error, warn, info or debug)",
                        Quoted(value)
                    )
                })?)
            }
            Flag::OnActivate => self.on_activate = Some(value.to_owned()),
            Flag::OnTimeout => self.on_timeout = Some(value.to_owned()),
            Flag::Splice => {
                self.splice = Some(Splice::parse(value).ok_or_else(|| {
                    format!("invalid value {} (use auto, on or off)", Quoted(value))
                })?)
            }
            Flag::QueuedEof => {
                self.queued_eof =
                    Some(QueuedEof::parse(value).ok_or_else(|| {
                        format!("invalid value {} (use keep or drop)", Quoted(value))
                    })?)
            }
            // The file parser refuses this key and `from_args` skips it.
            Flag::Config => {}
        }
        Ok(())
    }

    fn finish(self, config_file: Option<PathBuf>) -> Result<Config, ConfigError> {
        let listen = self
            .listen
            .ok_or_else(|| ConfigError::Usage("no listen address: give -l PORT".into()))?;
        let upstream = self.upstream.ok_or_else(|| {
            ConfigError::Usage("no upstream: give -p PORT [-h HOST] or -u HOST:PORT".into())
        })?;
        let non_zero = |d: Duration| (!d.is_zero()).then_some(d);
        let hook = |cmd: String| (!cmd.is_empty()).then(|| Hook::command(cmd));
        let defaults = Config::new(listen, upstream);
        Ok(Config {
            permits: self.permits.unwrap_or(defaults.permits),
            ttl: self.timeout.and_then(non_zero),
            queue_timeout: self.queue_timeout.and_then(non_zero),
            max_queue: self.max_queue.unwrap_or(defaults.max_queue),
            connect_timeout: self
                .connect_timeout
                .map_or(defaults.connect_timeout, non_zero),
            buffer_size: self.buffer_size.unwrap_or(defaults.buffer_size),
            log_level: self.log_level.unwrap_or(defaults.log_level),
            on_activate: self.on_activate.and_then(hook),
            on_timeout: self.on_timeout.and_then(hook),
            hook_timeout: self.hook_timeout.map_or(defaults.hook_timeout, non_zero),
            shutdown_grace: self.shutdown_grace.unwrap_or(defaults.shutdown_grace),
            splice: self.splice.unwrap_or(defaults.splice),
            queued_eof: self.queued_eof.unwrap_or(defaults.queued_eof),
            config_file,
            ..defaults
        })
    }
}

/// Smallest `--buffer-size`, 1 KiB: below it relaying costs a syscall per few
/// bytes.
pub const MIN_BUFFER_SIZE: usize = 1024;
/// Largest `--buffer-size`, 64 MiB: above it one connection could eat a small
/// host's memory.
pub const MAX_BUFFER_SIZE: usize = 64 * 1024 * 1024;

/// Cap on `--permits`: each permit holds at least one file descriptor, so more
/// could never be served, and a cap keeps capacity arithmetic and pre-sizing
/// elsewhere safe.
pub const MAX_PERMITS: u32 = 1_000_000;
/// Cap on `--max-queue`, for the same reasons as [`MAX_PERMITS`].
pub const MAX_QUEUE: usize = 1_000_000;

/// Command line over file, key by key, except that the upstream is decided as
/// one unit: whichever source names it on the command line owns all of it.
fn merge(cli: Settings, file: FileArgs, file_path: &Path) -> Result<Settings, ConfigError> {
    let file_line = file.proxy_host_line;
    let file = file.settings;
    let upstream = if cli.upstream.is_some() {
        if cli.proxy_port.is_some() || cli.proxy_host.is_some() {
            return Err(ConfigError::Usage(format!(
                "{} cannot be combined with {} or {}",
                Flag::Upstream,
                Flag::ProxyPort,
                Flag::ProxyHost
            )));
        }
        cli.upstream
    } else if cli.proxy_port.is_some() || cli.proxy_host.is_some() {
        // A command-line -p/-h replaces the file's `upstream`, but may pair up
        // with the file's `proxy-host`/`proxy-port`.
        let port = cli.proxy_port.or(file.proxy_port).ok_or_else(|| {
            ConfigError::Usage(format!("{} needs {}", Flag::ProxyHost, Flag::ProxyPort))
        })?;
        let host = cli.proxy_host.or(file.proxy_host);
        Some(HostPort {
            host: host.unwrap_or_else(|| "localhost".into()),
            port,
        })
    } else if file.upstream.is_some() {
        file.upstream
    } else if let Some(port) = file.proxy_port {
        Some(HostPort {
            host: file.proxy_host.unwrap_or_else(|| "localhost".into()),
            port,
        })
    } else if let Some(line) = file_line {
        return Err(ConfigError::File {
            path: file_path.to_owned(),
            line,
            message: "proxy-host needs proxy-port".into(),
        });
    } else {
        None
    };
    Ok(Settings {
        listen: cli.listen.or(file.listen),
        upstream,
        proxy_host: None,
        proxy_port: None,
        permits: cli.permits.or(file.permits),
        timeout: cli.timeout.or(file.timeout),
        queue_timeout: cli.queue_timeout.or(file.queue_timeout),
        max_queue: cli.max_queue.or(file.max_queue),
        connect_timeout: cli.connect_timeout.or(file.connect_timeout),
        buffer_size: cli.buffer_size.or(file.buffer_size),
        log_level: cli.log_level.or(file.log_level),
        on_activate: cli.on_activate.or(file.on_activate),
        on_timeout: cli.on_timeout.or(file.on_timeout),
        hook_timeout: cli.hook_timeout.or(file.hook_timeout),
        shutdown_grace: cli.shutdown_grace.or(file.shutdown_grace),
        splice: cli.splice.or(file.splice),
        queued_eof: cli.queued_eof.or(file.queued_eof),
    })
}

/// The keys whose values differ between two configs, in a fixed order, for the
/// `event=reloaded changed=...` log line.
pub fn changed_keys(old: &Config, new: &Config) -> Vec<&'static str> {
    let checks = [
        ("listen", old.listen != new.listen),
        ("upstream", old.upstream != new.upstream),
        ("permits", old.permits != new.permits),
        ("timeout", old.ttl != new.ttl),
        ("queue-timeout", old.queue_timeout != new.queue_timeout),
        ("max-queue", old.max_queue != new.max_queue),
        (
            "connect-timeout",
            old.connect_timeout != new.connect_timeout,
        ),
        ("buffer-size", old.buffer_size != new.buffer_size),
        ("log-level", old.log_level != new.log_level),
        ("on-activate", old.on_activate != new.on_activate),
        ("on-timeout", old.on_timeout != new.on_timeout),
        ("hook-timeout", old.hook_timeout != new.hook_timeout),
        ("shutdown-grace", old.shutdown_grace != new.shutdown_grace),
        ("splice", old.splice != new.splice),
        ("queued-eof", old.queued_eof != new.queued_eof),
    ];
    checks
        .into_iter()
        .filter(|&(_, changed)| changed)
        .map(|(key, _)| key)
        .collect()
}

/// When the relay moves bytes with `splice(2)` through a pipe instead of
/// copying them through user space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Splice {
    /// Always copy.
    Off,
    /// Copy until a direction fills a whole buffer in one read, then splice
    /// that direction: small exchanges stay on the cheaper copying path and
    /// bulk streams skip two copies per buffer. The default.
    Auto,
    /// Splice every direction from its first byte.
    On,
}

impl Splice {
    /// Reads `auto`, `on` or `off`, in any case.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Off, Self::Auto, Self::On]
            .into_iter()
            .find(|mode| mode.as_str().eq_ignore_ascii_case(s))
    }

    /// The name, as logs show it and [`Splice::parse`] reads it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Auto => "auto",
            Self::On => "on",
        }
    }
}

impl fmt::Display for Splice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a waiting client's end of stream (a FIN, with or without bytes before
/// it) does to its place in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueuedEof {
    /// It keeps its place; what it sent is delivered on activation (for
    /// protocols where a client half-closes after its request). The default.
    Keep,
    /// It leaves the queue as abandoned (for request/response protocols whose
    /// clients never half-close, so an end of stream means the client is gone).
    Drop,
}

impl QueuedEof {
    /// Reads `keep` or `drop`, in any case.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Keep, Self::Drop]
            .into_iter()
            .find(|mode| mode.as_str().eq_ignore_ascii_case(s))
    }

    /// The name, as [`QueuedEof::parse`] reads it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Keep => "keep",
            Self::Drop => "drop",
        }
    }
}

impl fmt::Display for QueuedEof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How much the log says; each level includes those before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    /// Errors only, such as a failed reload.
    Error,
    /// Also warnings, such as a failed or timed-out hook.
    Warn,
    /// Also each connection's activation, end and rejection; the default.
    Info,
    /// Also every accept.
    Debug,
}

impl LogLevel {
    /// Reads `error`, `warn`, `info` or `debug`, in any case.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Error, Self::Warn, Self::Info, Self::Debug]
            .into_iter()
            .find(|level| level.as_str().eq_ignore_ascii_case(s))
    }

    /// The lower-case name, as logs show it and [`LogLevel::parse`] reads it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why no [`Config`] could be made.
#[derive(Debug)]
pub enum ConfigError {
    /// The command line is wrong (exit 2); the message names the flag.
    Usage(String),
    /// The config file is wrong at `line` (1-based).
    File {
        /// The file as named by `-c`.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong there, naming the key.
        message: String,
    },
    /// The config file cannot be read.
    Io {
        /// The file as named by `-c`.
        path: PathBuf,
        /// Why reading it failed.
        error: io::Error,
    },
}

impl ConfigError {
    /// The process exit code for this error: 2 for a usage error, else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Usage(_) => 2,
            Self::File { .. } | Self::Io { .. } => 1,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Usage(message) => f.write_str(message),
            Self::File {
                path,
                line,
                message,
            } => write!(f, "{}:{line}: {message}", path.display()),
            Self::Io { path, error } => {
                // "(os error 2)" helps nobody reading a one-line start-up failure.
                let text = error.to_string();
                let text = match text.rfind(" (os error ") {
                    Some(at) => &text[..at],
                    None => &text,
                };
                write!(f, "cannot read config file '{}': {text}", path.display())
            }
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Parses a plain decimal count within `min..=max`.
fn parse_count<T>(value: &str, min: T, max: T) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + fmt::Display,
{
    let invalid = || format!("invalid number {}", Quoted(value));
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let too_large = || format!("{} is too large (at most {max})", Quoted(value));
    let n: T = value.parse().map_err(|_| too_large())?;
    if n < min {
        return Err(format!("{} is too small (at least {min})", Quoted(value)));
    }
    if n > max {
        return Err(too_large());
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Command, parse_from};

    fn raw(args: &[&str]) -> RawArgs {
        match parse_from(args.iter().copied()) {
            Ok(Command::Run(raw)) => raw,
            other => panic!("{args:?} gave {other:?}"),
        }
    }

    fn config(args: &[&str]) -> Config {
        load(&raw(args)).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    fn usage(args: &[&str]) -> String {
        match load(&raw(args)) {
            Err(e @ ConfigError::Usage(_)) => {
                assert_eq!(e.exit_code(), 2);
                e.to_string()
            }
            other => panic!("{args:?} gave {other:?}"),
        }
    }

    fn file(text: &str) -> Result<FileArgs, String> {
        parse_file(text, Path::new("t.conf")).map_err(|e| e.to_string())
    }

    /// Writes `text` to a fresh file and returns its path; tests run in
    /// parallel, so each needs its own name.
    fn temp_file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tcplock-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn defaults() {
        let c = config(&["-l", "9000", "-p", "8100"]);
        assert_eq!(
            c,
            Config {
                listen: "127.0.0.1:9000".into(),
                upstream: HostPort {
                    host: "localhost".into(),
                    port: 8100
                },
                permits: 1,
                ttl: None,
                queue_timeout: None,
                max_queue: 1024,
                connect_timeout: Some(Duration::from_secs(10)),
                buffer_size: 16384,
                log_level: LogLevel::Info,
                on_activate: None,
                on_timeout: None,
                hook_timeout: Some(Duration::from_secs(60)),
                shutdown_grace: Duration::from_secs(30),
                splice: Splice::Auto,
                queued_eof: QueuedEof::Keep,
                config_file: None,
            }
        );
    }

    #[test]
    fn every_flag_is_applied() {
        let c = config(&[
            "--listen=[::1]:0",
            "-u",
            "db:5432",
            "-n",
            "3",
            "-t",
            "20000",
            "--queue-timeout",
            "5s",
            "--max-queue",
            "0",
            "--connect-timeout",
            "0",
            "--buffer-size",
            "64k",
            "--log-level",
            "DEBUG",
            "--on-activate",
            "restart.sh",
            "--on-timeout",
            "",
            "--hook-timeout",
            "0",
            "--shutdown-grace",
            "0",
            "--splice",
            "On",
            "--queued-eof",
            "DROP",
        ]);
        assert_eq!(c.listen, "[::1]:0");
        assert_eq!(c.upstream.to_string(), "db:5432");
        assert_eq!(c.permits, 3);
        assert_eq!(c.ttl, Some(Duration::from_secs(20)));
        assert_eq!(c.queue_timeout, Some(Duration::from_secs(5)));
        assert_eq!(c.max_queue, 0);
        assert_eq!(c.connect_timeout, None);
        assert_eq!(c.buffer_size, 65536);
        assert_eq!(c.log_level, LogLevel::Debug);
        assert_eq!(c.on_activate, Some(Hook::command("restart.sh")));
        assert_eq!(c.on_timeout, None);
        assert_eq!(c.hook_timeout, None);
        assert_eq!(c.shutdown_grace, Duration::ZERO);
        assert_eq!(c.splice, Splice::On);
        assert_eq!(c.queued_eof, QueuedEof::Drop);
    }

    #[test]
    fn proxy_host_is_dash_h() {
        let c = config(&["-l", "1", "-h", "db", "-p", "5"]);
        assert_eq!(c.upstream.to_string(), "db:5");
        let c = config(&["-l", "1", "-h", "::1", "-p", "5"]);
        assert_eq!(c.upstream.to_string(), "[::1]:5");
    }

    #[test]
    fn command_line_usage_errors() {
        assert_eq!(
            usage(&["-l", "1", "-p", "2", "-n", "abc"]),
            "-n/--permits: invalid number 'abc'"
        );
        assert_eq!(
            usage(&["-l", "1", "-p", "2", "-n", "0"]),
            "-n/--permits: '0' is too small (at least 1)"
        );
        assert_eq!(
            usage(&["-l", "1", "-p", "2", "-t", "5x"]),
            "-t/--timeout: invalid duration '5x' (use 500ms, 20s, 5m, 1h or plain milliseconds)"
        );
        assert_eq!(
            usage(&["-l", "1", "-u", "a:1", "-p", "2"]),
            "-u/--upstream cannot be combined with -p/--proxy-port or -h/--proxy-host"
        );
        assert!(usage(&["-l", "1", "-u", "a:1", "-h", "b"]).starts_with("-u/--upstream"));
        assert_eq!(
            usage(&["-l", "1", "-h", "db"]),
            "-h/--proxy-host needs -p/--proxy-port"
        );
        assert_eq!(
            usage(&["-l", "1"]),
            "no upstream: give -p PORT [-h HOST] or -u HOST:PORT"
        );
        assert_eq!(usage(&["-p", "1"]), "no listen address: give -l PORT");
        assert!(usage(&["-l", "1", "-p", "0"]).starts_with("-p/--proxy-port: invalid port '0'"));
        assert!(usage(&["-l", "1", "-p", "2", "--buffer-size", "512"]).contains("1k to 64m"));
        assert!(usage(&["-l", "1", "-p", "2", "--buffer-size", "65m"]).contains("1k to 64m"));
        assert!(usage(&["-l", "1", "-p", "2", "--log-level", "loud"]).contains("'loud'"));
        assert!(usage(&["-l", "1", "-p", "2", "--splice", "yes"]).starts_with("--splice:"));
        assert!(
            usage(&["-l", "1", "-p", "2", "--queued-eof", "close"]).starts_with("--queued-eof:")
        );
        assert!(usage(&["-l", "1", "-p", "2", "--max-queue", "-1"]).starts_with("--max-queue:"));
    }

    #[test]
    fn file_syntax() {
        let f = file(
            "# tcplock settings\n\
             \n\
             \t  # indented comment\n\
             listen = 9000\n\
             upstream=db:5432\n\
             on-activate = ./restart.sh --mode=fast # not a comment\n\
             on-timeout =\n\
             permits = 2  \r\n",
        )
        .unwrap();
        let s = &f.settings;
        assert_eq!(s.listen.as_deref(), Some("127.0.0.1:9000"));
        assert_eq!(
            s.upstream.as_ref().map(|u| u.to_string()).as_deref(),
            Some("db:5432")
        );
        assert_eq!(
            s.on_activate.as_deref(),
            Some("./restart.sh --mode=fast # not a comment")
        );
        assert_eq!(s.on_timeout.as_deref(), Some(""));
        assert_eq!(s.permits, Some(2));
    }

    #[test]
    fn file_errors_name_the_line() {
        assert_eq!(
            file("listen = 1\n\n# x\nfoo = 3\n").unwrap_err(),
            "t.conf:4: unknown key 'foo'"
        );
        assert_eq!(
            file("permits = 1\nlisten = 1\npermits = 2\n").unwrap_err(),
            "t.conf:3: duplicate key 'permits' (first set at line 1)"
        );
        assert_eq!(
            file("listen = 1\njust words\n").unwrap_err(),
            "t.conf:2: expected 'key = value', got 'just words'"
        );
        assert_eq!(
            file("\npermits = many\n").unwrap_err(),
            "t.conf:2: permits: invalid number 'many'"
        );
        assert_eq!(
            file("proxy-port = 1\nupstream = a:2\n").unwrap_err(),
            "t.conf:2: 'upstream' cannot be combined with 'proxy-port' (line 1)"
        );
        assert_eq!(
            file("upstream = a:2\nproxy-host = b\n").unwrap_err(),
            "t.conf:2: 'proxy-host' cannot be combined with 'upstream' (line 1)"
        );
        assert!(
            file("config = other.conf\n")
                .unwrap_err()
                .starts_with("t.conf:1:")
        );
        assert!(
            file("= 3\n")
                .unwrap_err()
                .starts_with("t.conf:1: unknown key ''")
        );
        assert!(file("--permits = 3\n").unwrap_err().contains("unknown key"));
    }

    #[test]
    fn command_line_wins_over_file() {
        let path = temp_file(
            "wins.conf",
            "listen = 9000\nupstream = filehost:1\npermits = 4\non-activate = a.sh\n",
        );
        let p = path.to_str().unwrap();

        let c = config(&["-c", p]);
        assert_eq!(c.listen, "127.0.0.1:9000");
        assert_eq!(c.upstream.to_string(), "filehost:1");
        assert_eq!(c.permits, 4);
        assert_eq!(c.on_activate, Some(Hook::command("a.sh")));
        assert_eq!(c.config_file.as_deref(), Some(path.as_path()));

        let c = config(&["-c", p, "-n", "2", "-l", "9001", "--on-activate", ""]);
        assert_eq!((c.permits, c.listen.as_str()), (2, "127.0.0.1:9001"));
        assert_eq!(c.on_activate, None);

        // -p replaces the file's upstream as a whole; not a conflict.
        let c = config(&["-c", p, "-p", "7"]);
        assert_eq!(c.upstream.to_string(), "localhost:7");
    }

    #[test]
    fn command_line_upstream_replaces_file_proxy_port() {
        let path = temp_file(
            "split.conf",
            "listen = 1\nproxy-host = fh\nproxy-port = 2\n",
        );
        let p = path.to_str().unwrap();
        assert_eq!(config(&["-c", p]).upstream.to_string(), "fh:2");
        assert_eq!(config(&["-c", p, "-u", "u:3"]).upstream.to_string(), "u:3");
        // Flags pair up with the file's other half.
        assert_eq!(config(&["-c", p, "-p", "4"]).upstream.to_string(), "fh:4");
        assert_eq!(config(&["-c", p, "-h", "ch"]).upstream.to_string(), "ch:2");
    }

    #[test]
    fn file_proxy_host_without_port_blames_its_line() {
        let path = temp_file("hostonly.conf", "listen = 1\n\nproxy-host = fh\n");
        let e = load(&raw(&["-c", path.to_str().unwrap()])).unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert!(
            e.to_string().ends_with(":3: proxy-host needs proxy-port"),
            "{e}"
        );
    }

    #[test]
    fn file_problems_exit_1() {
        let missing = std::env::temp_dir().join("tcplock-no-such-dir/none.conf");
        let e = load(&raw(&["-c", missing.to_str().unwrap()])).unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert_eq!(
            e.to_string(),
            format!(
                "cannot read config file '{}': No such file or directory",
                missing.display()
            )
        );

        let bad = temp_file("bad.conf", "listen = 1\npermits = 0\n");
        let e = load(&raw(&["-c", bad.to_str().unwrap(), "-p", "2"])).unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert!(
            e.to_string()
                .ends_with(":2: permits: '0' is too small (at least 1)"),
            "{e}"
        );
    }

    #[test]
    fn changed_keys_lists_what_differs() {
        let old = config(&["-l", "1", "-p", "2"]);
        assert!(changed_keys(&old, &old).is_empty());
        let new = config(&[
            "-l",
            "1",
            "-p",
            "3",
            "-n",
            "2",
            "--on-activate",
            "x",
            "--log-level",
            "debug",
        ]);
        assert_eq!(
            changed_keys(&old, &new),
            ["upstream", "permits", "log-level", "on-activate"]
        );
    }

    #[test]
    fn log_levels_order_by_verbosity() {
        assert!(LogLevel::Debug > LogLevel::Info);
        assert!(LogLevel::Warn > LogLevel::Error);
        for level in [
            LogLevel::Error,
            LogLevel::Warn,
            LogLevel::Info,
            LogLevel::Debug,
        ] {
            assert_eq!(LogLevel::parse(level.as_str()), Some(level));
        }
        assert_eq!(LogLevel::parse("verbose"), None);
    }

    #[test]
    fn parse_file_never_panics() {
        let samples = [
            "",
            "=",
            "==",
            "#",
            "\u{0}=\u{0}",
            "listen=\u{10FFFF}",
            "permits=99999999999999999999",
            "timeout=\u{0663}s",
            "é=1",
            "buffer-size=\u{0}k",
            "upstream=[",
            "\r\n\r\n=\r",
            "listen",
            " \t # \n = ",
            "splice = on\nsplice = on",
        ];
        for s in samples {
            let _ = parse_file(s, Path::new("f"));
        }
    }
}
