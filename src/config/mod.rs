//! Turns the command line and an optional `key = value` file into one validated
//! [`Config`].
//!
//! Every setting is declared once in [`settings`]; the command line ([`cli`])
//! and the file ([`file`]) are read as text against that table, each value
//! checked where it is written (so a file's bad value names its line), then
//! merged with the command line winning. SIGHUP re-runs [`load`] with the same
//! [`RawArgs`], so the command line keeps winning after a reload.

pub mod cli;
pub mod file;
pub(crate) mod pool;
pub mod settings;
pub(crate) mod show;
pub mod units;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

pub use cli::RawArgs;
pub use file::{FileArgs, parse_file, read_config_file};
pub use settings::{
    Config, LogLevel, PROXY_HEADER_TIMEOUT, QueuedEof, SendProxy, ShutdownQueue, Splice,
    changed_keys, keep_fixed,
};

#[cfg(test)]
use settings::{MAX_HOOK_COMMAND, MAX_QUEUE};

use file::check_value;
use settings::{Draft, Spec};
use units::HostPort;

/// Reads the config file named by `-c` (if any), lets the command line override
/// it, and validates the result.
pub fn load(raw: &RawArgs) -> Result<Config, ConfigError> {
    let config_file = raw.config.as_ref().map(PathBuf::from);
    let file = match &config_file {
        Some(path) => parse_file(&read_config_file(path)?, path)?,
        None => FileArgs::default(),
    };
    let file_path = config_file.as_deref().unwrap_or(Path::new(""));
    let mut config = merge(raw, &file, file_path)?;
    config.config_file = config_file;
    Ok(config)
}

/// A draft holding only defaults, to read values into.
pub(crate) fn scratch_draft() -> Draft {
    Draft {
        config: Config::new(String::new(), HostPort::default()),
        proxy_host: None,
        proxy_port: None,
    }
}

/// Where a value came from, to blame the right place for it.
#[derive(Clone, Copy)]
enum Origin {
    Flag(&'static Spec),
    Line(usize),
}

/// Command line over file, key by key, except that the upstream is decided as
/// one unit: whichever source names it on the command line owns all of it.
fn merge(raw: &RawArgs, file: &FileArgs, file_path: &Path) -> Result<Config, ConfigError> {
    let usage = |spec: &Spec, reason: String| ConfigError::Usage(format!("{spec}: {reason}"));
    let mut draft = scratch_draft();
    let cli_has = |key: &str| raw.get(key).is_some();
    if cli_has("upstream") && (cli_has("proxy-port") || cli_has("proxy-host")) {
        return Err(ConfigError::Usage(
            "-u/--upstream cannot be combined with -p/--proxy-port or -h/--proxy-host".into(),
        ));
    }
    // A command-line -u replaces all of the file's upstream; a -p or -h
    // replaces the file's `upstream` but may pair up with its other half.
    let file_keeps = |key: &str| match key {
        "upstream" => !cli_has("upstream") && !cli_has("proxy-port") && !cli_has("proxy-host"),
        "proxy-port" | "proxy-host" => !cli_has("upstream"),
        _ => true,
    };
    let mut origins: Vec<(&'static str, Origin)> = Vec::new();
    let file_values = file
        .entries
        .iter()
        .filter(|entry| file_keeps(entry.spec.key))
        .map(|entry| (entry.spec, entry.value.as_str(), Origin::Line(entry.line)));
    let cli_values = raw
        .values
        .iter()
        .map(|(spec, value)| (*spec, value.as_str(), Origin::Flag(spec)));
    for (spec, value, origin) in file_values.chain(cli_values) {
        check_value(&mut draft, spec, value).map_err(|reason| match origin {
            Origin::Flag(spec) => usage(spec, reason),
            Origin::Line(line) => ConfigError::File {
                path: file_path.to_owned(),
                line,
                message: format!("{}: {reason}", spec.key),
            },
        })?;
        origins.push((spec.key, origin));
    }
    // Where the value in force for `key` was written: the last one read.
    let origin_of = |key: &str| {
        origins
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, origin)| *origin)
    };
    if origin_of("upstream").is_none() {
        match (draft.proxy_port, origin_of("proxy-host")) {
            (Some(ports), _) => {
                let host = draft
                    .proxy_host
                    .take()
                    .unwrap_or_else(|| "localhost".into());
                let upstream = |port| HostPort {
                    host: host.clone(),
                    port,
                };
                draft.config.upstreams = ports.into_iter().map(upstream).collect();
            }
            (None, Some(Origin::Line(line))) => {
                return Err(ConfigError::File {
                    path: file_path.to_owned(),
                    line,
                    message: "proxy-host needs proxy-port".into(),
                });
            }
            (None, Some(Origin::Flag(_))) => {
                return Err(ConfigError::Usage(
                    "-h/--proxy-host needs -p/--proxy-port".into(),
                ));
            }
            (None, None) => {
                return Err(ConfigError::Usage(
                    "no upstream: give -p PORT [-h HOST] or -u HOST:PORT".into(),
                ));
            }
        }
    }
    if draft.config.listen.is_empty() && !raw.listen_optional {
        return Err(ConfigError::Usage("no listen address: give -l PORT".into()));
    }
    // The rules between settings blame where the culprit was written.
    if let Err((spec, reason)) = draft.config.check_supervision() {
        return Err(match origin_of(spec.key) {
            Some(Origin::Line(line)) => ConfigError::File {
                path: file_path.to_owned(),
                line,
                message: format!("{}: {reason}", spec.key),
            },
            _ => usage(spec, reason),
        });
    }
    // Each value was checked where it was read; this pins that nothing the
    // merge did can get past the checks every other way in gets.
    draft.config.validate().map_err(ConfigError::Usage)?;
    Ok(draft.config)
}

/// Why no [`Config`] could be made.
#[derive(Debug)]
#[non_exhaustive]
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
    /// The config file is not one tcplock reads: not a regular file, too
    /// large, or not text.
    Refused {
        /// The file as named by `-c`.
        path: PathBuf,
        /// Why, e.g. `not a regular file`.
        message: String,
    },
}

impl ConfigError {
    /// The process exit code for this error: 2 for a usage error, else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Usage(_) => 2,
            Self::File { .. } | Self::Io { .. } | Self::Refused { .. } => 1,
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
            Self::Refused { path, message } => write!(f, "{}: {message}", path.display()),
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::api::hook::Hook;
    use crate::config::cli::{Command, parse_from};
    use crate::config::show::Show;

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
        assert_eq!(c.listen, "127.0.0.1:9000");
        assert_eq!(c.upstreams.show(), "localhost:8100");
        assert_eq!(c.permits, 1);
        assert_eq!(c.ttl, None);
        assert_eq!(c.queue_timeout, None);
        assert_eq!(c.max_queue, 1024);
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(10)));
        assert_eq!(c.buffer_size, 16384);
        assert_eq!(c.log_level, LogLevel::Info);
        assert_eq!(c.on_activate, None);
        assert_eq!(c.on_timeout, None);
        assert_eq!(c.hook_timeout, Some(Duration::from_secs(60)));
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
        assert_eq!(c.splice, Splice::Auto);
        assert_eq!(c.queued_eof, QueuedEof::Keep);
        assert_eq!(c.config_file, None);
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
        assert_eq!(c.upstreams.show(), "db:5432");
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
        assert_eq!(c.upstreams.show(), "db:5");
        let c = config(&["-l", "1", "-h", "::1", "-p", "5"]);
        assert_eq!(c.upstreams.show(), "[::1]:5");
    }

    #[test]
    fn a_pool_comes_from_u_p_or_the_file() {
        let c = config(&["-l", "1", "-u", "a:1,b:2,[::1]:3"]);
        assert_eq!(c.upstreams.show(), "a:1,b:2,[::1]:3");
        assert_eq!(c.first_upstream().to_string(), "a:1");
        let c = config(&["-l", "1", "-u", "[::1]:5-8"]);
        assert_eq!(c.upstreams.len(), 4);
        let c = config(&["-l", "1", "-h", "db", "-p", "8100-8103"]);
        assert_eq!(c.upstreams.show(), "db:8100-8103");
        let c = config(&["-l", "1", "-p", "7,5"]);
        assert_eq!(c.upstreams.show(), "localhost:7,localhost:5");
        let path = temp_file(
            "pool.conf",
            "listen = 1\nproxy-host = fh\nproxy-port = 2-3\n",
        );
        let p = path.to_str().unwrap();
        assert_eq!(config(&["-c", p]).upstreams.show(), "fh:2-3");
        assert_eq!(config(&["-c", p, "-h", "ch"]).upstreams.show(), "ch:2-3");
        let path = temp_file("pool2.conf", "listen = 1\nupstream = a:1, b:1\n");
        let c = config(&["-c", path.to_str().unwrap()]);
        assert_eq!(c.upstreams.show(), "a:1,b:1");
    }

    #[test]
    fn a_bad_pool_names_the_flag_or_the_line() {
        assert_eq!(
            usage(&["-l", "1", "-u", "a:8103-8100"]),
            "-u/--upstream: invalid port range 'a:8103-8100': 8103 is above 8100"
        );
        assert_eq!(
            usage(&["-l", "1", "-p", "8103-8100"]),
            "-p/--proxy-port: invalid port range '8103-8100': 8103 is above 8100"
        );
        assert_eq!(
            usage(&["-l", "1", "-u", "a:1,b:2-5"]),
            "-u/--upstream: the list 'a:1,b:2-5' mixes in the range 'b:2-5' (give a list or one range)"
        );
        let path = temp_file("badpool.conf", "listen = 1\n\nupstream = a:1,,b:2\n");
        let e = load(&raw(&["-c", path.to_str().unwrap()])).unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert!(
            e.to_string()
                .ends_with(":3: upstream: the list 'a:1,,b:2' has an empty element"),
            "{e}"
        );
    }

    #[test]
    fn a_spawned_pool_is_all_on_this_host() {
        let spawn = ["-l", "1", "--spawn", "serve"];
        let c = config(&[&spawn[..], &["-u", "127.0.0.1:5,localhost:6,[::1]:7"]].concat());
        assert_eq!(c.upstreams.len(), 3);
        assert_eq!(
            usage(&[&spawn[..], &["-u", "127.0.0.1:5,203.0.113.7:6"]].concat()),
            format!("--spawn: {}", settings::not_on_this_host("203.0.113.7:6"))
        );
        // Without --spawn an instance may be anywhere.
        let c = config(&["-l", "1", "-u", "127.0.0.1:5,203.0.113.7:6"]);
        assert_eq!(c.upstreams.len(), 2);
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
        assert_eq!(f.get("listen"), Some("9000"));
        assert_eq!(f.get("upstream"), Some("db:5432"));
        assert_eq!(
            f.get("on-activate"),
            Some("./restart.sh --mode=fast # not a comment")
        );
        assert_eq!(f.get("on-timeout"), Some(""));
        assert_eq!(f.get("permits"), Some("2"));
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
        assert_eq!(c.upstreams.show(), "filehost:1");
        assert_eq!(c.permits, 4);
        assert_eq!(c.on_activate, Some(Hook::command("a.sh")));
        assert_eq!(c.config_file.as_deref(), Some(path.as_path()));

        let c = config(&["-c", p, "-n", "2", "-l", "9001", "--on-activate", ""]);
        assert_eq!((c.permits, c.listen.as_str()), (2, "127.0.0.1:9001"));
        assert_eq!(c.on_activate, None);

        // -p replaces the file's upstream as a whole; not a conflict.
        let c = config(&["-c", p, "-p", "7"]);
        assert_eq!(c.upstreams.show(), "localhost:7");
    }

    #[test]
    fn command_line_upstream_replaces_file_proxy_port() {
        let path = temp_file(
            "split.conf",
            "listen = 1\nproxy-host = fh\nproxy-port = 2\n",
        );
        let p = path.to_str().unwrap();
        assert_eq!(config(&["-c", p]).upstreams.show(), "fh:2");
        assert_eq!(config(&["-c", p, "-u", "u:3"]).upstreams.show(), "u:3");
        // Flags pair up with the file's other half.
        assert_eq!(config(&["-c", p, "-p", "4"]).upstreams.show(), "fh:4");
        assert_eq!(config(&["-c", p, "-h", "ch"]).upstreams.show(), "ch:2");
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
            ["upstream", "permits", "on-activate", "log-level"]
        );
    }

    #[test]
    fn log_levels_order_by_verbosity() {
        assert!(LogLevel::Debug > LogLevel::Info);
        assert!(LogLevel::Warn > LogLevel::Error);
        for level in ["error", "warn", "info", "debug"] {
            let c = config(&["-l", "1", "-p", "2", "--log-level", level]);
            assert_eq!(c.log_level.as_str(), level);
        }
    }

    #[test]
    fn only_a_regular_file_of_at_most_1_mib_is_read() {
        let dir = std::env::temp_dir().join(format!("tcplock-cfgkind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let refused = |path: &Path| match read_config_file(path) {
            Err(e @ ConfigError::Refused { .. }) => {
                assert_eq!(e.exit_code(), 1);
                e.to_string()
            }
            other => panic!("{} gave {other:?}", path.display()),
        };

        // A FIFO with no writer would block a plain open forever.
        let fifo = dir.join("fifo.conf");
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        assert_eq!(
            refused(&fifo),
            format!("{}: not a regular file", fifo.display())
        );

        // A link to a device is judged by what it points to.
        let zero = dir.join("zero.conf");
        let _ = std::fs::remove_file(&zero);
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert_eq!(
            refused(&zero),
            format!("{}: not a regular file", zero.display())
        );
        assert!(refused(&dir).ends_with(": not a regular file"));

        let big = dir.join("big.conf");
        let line = "# padding padding padding padding padding padding padding\n";
        let text = line.repeat(file::MAX_FILE_SIZE as usize / line.len() + 1);
        std::fs::write(&big, &text).unwrap();
        assert_eq!(
            refused(&big),
            format!("{}: larger than 1 MiB", big.display())
        );
        let just_fits = &text[..file::MAX_FILE_SIZE as usize];
        std::fs::write(&big, just_fits).unwrap();
        assert_eq!(read_config_file(&big).unwrap().len(), just_fits.len());

        std::fs::write(&big, b"listen = \xff\n").unwrap();
        assert!(refused(&big).ends_with(": not valid UTF-8 text"));
    }

    #[test]
    fn a_hook_command_that_can_never_run_is_refused_where_it_is_set() {
        assert_eq!(
            file("listen = 1\non-activate = a\0b\n").unwrap_err(),
            "t.conf:2: on-activate: a command cannot contain a NUL byte"
        );
        let long = "x".repeat(MAX_HOOK_COMMAND + 1);
        assert_eq!(
            file(&format!("on-timeout = {long}\n")).unwrap_err(),
            format!(
                "t.conf:1: on-timeout: a command of {} bytes is too long (at most {MAX_HOOK_COMMAND})",
                MAX_HOOK_COMMAND + 1
            )
        );
        assert!(file(&format!("on-timeout = {}\n", &long[1..])).is_ok());
        assert!(
            usage(&["-l", "1", "-p", "2", "--on-activate", "a\0b"])
                .starts_with("--on-activate: a command cannot contain a NUL byte")
        );
    }

    #[test]
    fn every_way_in_gets_the_same_checks() {
        // What a flag refuses, `Config::validate` (the builder's and a
        // reload's check) refuses too, naming the same setting.
        let base = config(&["-l", "1", "-p", "2"]);
        let mut c = base.clone();
        c.permits = 0;
        assert_eq!(
            c.validate().unwrap_err(),
            "permits: '0' is too small (at least 1)"
        );
        let mut c = base.clone();
        c.queue_timeout = Some(Duration::MAX);
        assert!(c.validate().unwrap_err().starts_with("queue-timeout: "));
        let mut c = base.clone();
        c.shutdown_grace = Duration::MAX;
        assert!(c.validate().unwrap_err().starts_with("shutdown-grace: "));
        let mut c = base.clone();
        c.buffer_size = 10;
        assert!(c.validate().unwrap_err().starts_with("buffer-size: "));
        let mut c = base.clone();
        c.max_queue = MAX_QUEUE + 1;
        assert!(c.validate().unwrap_err().starts_with("max-queue: "));
        let mut c = base;
        c.on_timeout = Some(Hook::command("a\0b"));
        assert!(c.validate().unwrap_err().starts_with("on-timeout: "));
    }

    #[test]
    fn service_settings_are_read() {
        let c = config(&["-l", "1", "-p", "2"]);
        assert_eq!(c.spawn, None);
        assert_eq!(c.ready_timeout, Duration::from_secs(30));
        assert_eq!((c.restart_after, c.restart_rss), (0, 0));
        assert_eq!((c.max_lifetime, c.idle_stop), (None, None));
        assert_eq!(c.stop_timeout, Duration::from_secs(10));
        assert_eq!(c.start_retries, 5);
        let c = config(&[
            "-l",
            "1",
            "-u",
            "127.0.0.1:2002",
            "--spawn",
            "soffice --accept='socket,port=2002;urp;'",
            "--ready-timeout",
            "5s",
            "--restart-after",
            "100",
            "--restart-rss",
            "1g",
            "--max-lifetime",
            "1h",
            "--restart-on",
            "none",
            "--idle-stop",
            "10m",
            "--stop-timeout",
            "0",
            "--start-retries",
            "2",
        ]);
        assert_eq!(
            c.spawn.as_deref(),
            Some("soffice --accept='socket,port=2002;urp;'")
        );
        assert_eq!(c.ready_timeout, Duration::from_secs(5));
        assert_eq!((c.restart_after, c.restart_rss), (100, 1 << 30));
        assert_eq!(c.max_lifetime, Some(Duration::from_secs(3600)));
        assert_eq!(c.restart_on, crate::core::RestartOn::default());
        assert_eq!(c.idle_stop, Some(Duration::from_secs(600)));
        assert_eq!(c.stop_timeout, Duration::ZERO);
        assert_eq!(c.start_retries, 2);
        // Zero means never, as for every other limit.
        let c = config(&["-l", "1", "-p", "2", "--spawn", "x", "--max-lifetime", "0"]);
        assert_eq!(c.max_lifetime, None);
    }

    #[test]
    fn service_settings_refuse_bad_values() {
        let spawn = ["-l", "1", "-p", "2", "--spawn", "x"];
        let with = |extra: &[&str]| usage(&[&spawn[..], extra].concat());
        assert_eq!(
            usage(&["-l", "1", "-p", "2", "--spawn", " \t "]),
            "--spawn: the command is empty"
        );
        // Nothing at all is no spawn, as for hooks: it overrides a file's.
        assert_eq!(config(&["-l", "1", "-p", "2", "--spawn", ""]).spawn, None);
        assert_eq!(
            usage(&["-l", "1", "-p", "2", "--spawn", "a\0b"]),
            "--spawn: a command cannot contain a NUL byte"
        );
        assert!(with(&["--ready-timeout", "0"]).starts_with("--ready-timeout: must be longer"));
        assert!(with(&["--restart-rss", "1t"]).contains("k, m or g"));
        assert!(with(&["--restart-rss", "1000"]).contains("at least 1m"));
        assert!(with(&["--restart-rss", "99999999999g"]).contains("too large"));
        assert!(with(&["--start-retries", "0"]).starts_with("--start-retries: '0' is too small"));
        assert!(with(&["--restart-after", "-1"]).starts_with("--restart-after: invalid number"));
        assert!(with(&["--restart-on", ""]).starts_with("--restart-on: invalid list"));
        assert!(with(&["--idle-stop", "soon"]).starts_with("--idle-stop: invalid duration"));
    }

    #[test]
    fn a_service_setting_without_spawn_names_itself() {
        for (flag, value) in [
            ("--ready-timeout", "5s"),
            ("--restart-after", "3"),
            ("--restart-rss", "1g"),
            ("--max-lifetime", "1h"),
            ("--restart-on", "timeout"),
            ("--idle-stop", "1m"),
            ("--stop-timeout", "1s"),
            ("--start-retries", "9"),
        ] {
            assert_eq!(
                usage(&["-l", "1", "-p", "2", flag, value]),
                format!("{flag}: {}", settings::NEEDS_SPAWN)
            );
        }
        // A default value written out changes nothing, so it passes.
        config(&["-l", "1", "-p", "2", "--restart-after", "0"]);
        let path = temp_file(
            "nospawn.conf",
            "listen = 1\nupstream = 127.0.0.1:2\n# the office\nrestart-rss = 1g\n",
        );
        let e = load(&raw(&["-c", path.to_str().unwrap()])).unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert_eq!(
            e.to_string(),
            format!(
                "{}:4: restart-rss: {}",
                path.display(),
                settings::NEEDS_SPAWN
            )
        );
        // The same check, the builder's and a reload's way in.
        let mut c = config(&["-l", "1", "-p", "2"]);
        c.idle_stop = Some(Duration::from_secs(1));
        assert_eq!(
            c.validate().unwrap_err(),
            format!("idle-stop: {}", settings::NEEDS_SPAWN)
        );
    }

    #[test]
    fn a_spawned_upstream_must_be_on_this_host() {
        for upstream in [
            "127.0.0.1:2",
            "[::1]:2",
            "0.0.0.0:2",
            "localhost:2",
            "office:2",
        ] {
            config(&["-l", "1", "-u", upstream, "--spawn", "x"]);
        }
        let e = usage(&["-l", "1", "-u", "203.0.113.9:2002", "--spawn", "x"]);
        assert_eq!(
            e,
            "--spawn: the upstream '203.0.113.9:2002' is not an address of this host; \
             a service tcplock runs must listen here"
        );
        let path = temp_file(
            "remote.conf",
            "listen = 1\nspawn = soffice\nupstream = 203.0.113.9:2002\n",
        );
        let e = load(&raw(&["-c", path.to_str().unwrap()])).unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert!(
            e.to_string().contains("remote.conf:2: spawn: the upstream"),
            "{e}"
        );
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
