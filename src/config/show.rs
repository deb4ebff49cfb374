//! The settings in force, written back as config-file lines: what
//! `tcplock --check` prints. Every setting of the table is written, each
//! value as the file reads it, so the output fed back through `-c` gives the
//! same config.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::api::hook::Hook;
use crate::config::scratch_draft;
use crate::config::settings::{Config, SETTINGS, Spec};
use crate::config::units::HostPort;
#[cfg(test)]
use crate::config::units::parse_host_port;

/// A setting's value as the config file writes it.
pub(crate) trait Show {
    fn show(&self) -> String;
}

macro_rules! show_display {
    ($($ty:ty),*) => {$(
        impl Show for $ty {
            fn show(&self) -> String {
                self.to_string()
            }
        }
    )*};
}

show_display!(String, HostPort, u16, u32, u64, usize, SocketAddr);

impl Show for bool {
    fn show(&self) -> String {
        if *self { "on" } else { "off" }.to_string()
    }
}

/// The largest unit that writes it exactly: `1h`, `5m`, `20s`, `500ms`, `0`.
impl Show for Duration {
    fn show(&self) -> String {
        let ms = self.as_millis();
        if ms == 0 {
            "0".to_string()
        } else if ms.is_multiple_of(3_600_000) {
            format!("{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) {
            format!("{}m", ms / 60_000)
        } else if ms.is_multiple_of(1_000) {
            format!("{}s", ms / 1_000)
        } else {
            format!("{ms}ms")
        }
    }
}

/// No limit is written `0`, as it is read.
impl Show for Option<Duration> {
    fn show(&self) -> String {
        self.unwrap_or(Duration::ZERO).show()
    }
}

/// No hook is an empty value. A closure has no text: [`render`] says so.
impl Show for Option<Hook> {
    fn show(&self) -> String {
        match self {
            None => String::new(),
            Some(hook) => hook.as_command().unwrap_or("(a closure)").to_string(),
        }
    }
}

impl Show for PathBuf {
    fn show(&self) -> String {
        self.display().to_string()
    }
}

macro_rules! show_optional {
    ($($ty:ty),*) => {$(
        /// Unset is an empty value.
        impl Show for Option<$ty> {
            fn show(&self) -> String {
                self.as_ref().map(Show::show).unwrap_or_default()
            }
        }
    )*};
}

show_optional!(String, PathBuf, SocketAddr, HostPort);

/// The effective settings, one `key = value` line each in table order,
/// after comment lines naming what the upstream resolved to. A value a file
/// cannot hold (a hook command with a line break or surrounding blanks, a
/// closure) is a comment line saying so instead.
///
/// `resolved` holds each instance's addresses, in the order of
/// [`Config::upstreams`]; the `upstream` line writes the list back as one
/// range when its instances are consecutive ports of one host, else as a
/// comma-separated list.
pub(crate) fn render(config: &Config, resolved: &[Vec<SocketAddr>]) -> String {
    let mut out = String::from("# tcplock --check: the settings in force, as a config file\n");
    for (upstream, addrs) in config.upstreams.iter().zip(resolved) {
        let addrs: Vec<String> = addrs.iter().map(SocketAddr::to_string).collect();
        let _ = writeln!(out, "# upstream {upstream} resolves to {}", addrs.join(" "));
    }
    for spec in SETTINGS {
        let value = (spec.show)(config);
        if spec.key == "listen" && value.is_empty() {
            out.push_str("# listen = (none: socket activation passes the listening socket)\n");
        } else if !reads_back(spec, &value, config) {
            let _ = writeln!(
                out,
                "# {key}: {value:?} cannot be written in a config file; give it as --{key}",
                key = spec.key
            );
        } else if value.is_empty() {
            let _ = writeln!(out, "{} =", spec.key);
        } else {
            let _ = writeln!(out, "{} = {value}", spec.key);
        }
    }
    out
}

/// Whether the file reads `key = value` back as the value `config` holds:
/// the file trims a value and ends it at the line's end.
fn reads_back(spec: &Spec, value: &str, config: &Config) -> bool {
    if value.trim() != value || value.contains(['\n', '\r']) {
        return false;
    }
    let mut draft = scratch_draft();
    (spec.set)(&mut draft, value).is_ok() && !(spec.differs)(&draft.config, config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::cli::{Command, parse_from};
    use crate::config::{LogLevel, QueuedEof, SendProxy, ShutdownQueue, Splice, load};

    /// A config with no setting at its default.
    fn unusual() -> Config {
        let mut config = Config::new(
            "[::1]:9000".into(),
            HostPort {
                host: "db.example".into(),
                port: 5432,
            },
        );
        config.permits = 3;
        config.ttl = Some(Duration::from_secs(7_200));
        config.queue_timeout = Some(Duration::from_millis(1_500));
        config.max_queue = 0;
        config.connect_timeout = None;
        config.buffer_size = 65_536;
        config.on_activate = Some(Hook::command("./restart.sh --mode=fast # not a comment"));
        config.on_timeout = Some(Hook::command("echo $TCPLOCK_CONN_ID"));
        config.hook_timeout = None;
        config.shutdown_grace = Duration::ZERO;
        config.shutdown_queue = ShutdownQueue::Serve;
        config.stall_warn = Some(Duration::from_secs(300));
        config.log_level = LogLevel::Debug;
        config.queued_eof = QueuedEof::Drop;
        config.splice = Splice::Off;
        config.send_proxy = SendProxy::V2;
        config.accept_proxy = true;
        config.control = Some("/run/tcplock/control".into());
        config.spawn = Some("exec office --port=2002".into());
        config.ready_timeout = Duration::from_secs(60);
        config.restart_after = 20;
        config.restart_rss = 1 << 30;
        config.max_lifetime = Some(Duration::from_secs(3600));
        config.restart_on = crate::core::RestartOn {
            timeout: false,
            connect_failed: false,
            upstream_error: true,
        };
        config.idle_stop = Some(Duration::from_secs(600));
        config.stop_timeout = Duration::from_secs(5);
        config.start_retries = 3;
        config.metrics = Some("127.0.0.1:9464".into());
        config
    }

    fn read_back(text: &str) -> Config {
        let dir = std::env::temp_dir().join(format!("tcplock-show-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Tests run in parallel: each read gets its own file.
        static READS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("rendered-{n}.conf"));
        std::fs::write(&path, text).unwrap();
        let Ok(Command::Run(raw)) = parse_from(["-c", path.to_str().unwrap()]) else {
            panic!("-c");
        };
        let mut config = load(&raw).unwrap_or_else(|e| panic!("{e}\n{text}"));
        config.config_file = None;
        config
    }

    #[test]
    fn every_setting_is_written_and_reads_back_the_same() {
        let defaults = Config::new(
            "127.0.0.1:1".into(),
            parse_host_port("localhost:2").unwrap(),
        );
        let unusual = unusual();
        for spec in SETTINGS {
            assert!(
                (spec.differs)(&defaults, &unusual),
                "{spec} left at its default"
            );
        }
        for config in [defaults, unusual] {
            let text = render(&config, &[]);
            for spec in SETTINGS {
                let written = text
                    .lines()
                    .filter(|line| line.split('=').next().map(str::trim) == Some(spec.key))
                    .count();
                assert_eq!(written, 1, "{spec} in\n{text}");
            }
            assert_eq!(read_back(&text), config, "\n{text}");
        }
    }

    #[test]
    fn a_pool_is_written_as_a_range_or_a_list_and_reads_back() {
        let cases = [
            ("w:8100-8103", "w:8100-8103"),
            ("w:8101,w:8100", "w:8101,w:8100"),
            ("a:1,[::1]:2,b:3", "a:1,[::1]:2,b:3"),
        ];
        for (given, written) in cases {
            let mut config = unusual();
            config.upstreams = crate::config::pool::parse_upstreams(given).unwrap();
            let resolved = vec![Vec::new(); config.upstreams.len()];
            let text = render(&config, &resolved);
            assert!(
                text.contains(&format!("\nupstream = {written}\n")),
                "{text}"
            );
            let comments = text
                .lines()
                .filter(|l| l.starts_with("# upstream "))
                .count();
            assert_eq!(comments, config.upstreams.len(), "{text}");
            assert_eq!(read_back(&text), config, "\n{text}");
        }
    }

    #[test]
    fn durations_take_the_largest_exact_unit() {
        let cases = [(0, "0"), (1, "1ms"), (1_500, "1500ms"), (20_000, "20s")];
        for (ms, text) in cases {
            assert_eq!(Duration::from_millis(ms).show(), text);
        }
        assert_eq!(Duration::from_secs(300).show(), "5m");
        assert_eq!(Duration::from_secs(7_200).show(), "2h");
        assert_eq!(Some(Duration::from_secs(90)).show(), "90s");
        assert_eq!(None::<Duration>.show(), "0");
    }

    #[test]
    fn a_value_a_file_cannot_hold_is_a_comment() {
        let mut config = unusual();
        config.on_activate = Some(Hook::command(" padded"));
        config.on_timeout = Some(Hook::command("two\nlines"));
        let text = render(&config, &[]);
        assert!(
            text.contains("# on-activate: \" padded\" cannot be written in a config file; give it as --on-activate\n"),
            "{text}"
        );
        assert!(
            text.contains("# on-timeout: \"two\\nlines\" cannot"),
            "{text}"
        );
        let mut config = unusual();
        config.listen = String::new();
        let text = render(&config, &[vec!["127.0.0.1:5".parse().unwrap()]]);
        assert!(text.contains("# listen = (none: "), "{text}");
        assert!(text.contains("# upstream db.example:5432 resolves to 127.0.0.1:5\n"));
    }
}
