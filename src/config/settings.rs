//! Every setting, declared once: its field in [`Config`], its default, its
//! flag and config-file key, how its text is read, the range every way in must
//! respect, whether a reload may change it, and its `--help` line.
//!
//! The command line, the config file, the merge of the two, `--help`, the
//! reload diff and the builder's validation all derive from [`SETTINGS`], so
//! adding a setting means one entry here, a builder method in `api::lock`, and
//! the place that uses it.

use std::fmt;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use crate::api::hook::Hook;
use crate::config::pool;
use crate::config::units::{self, HostPort, MAX_DURATION, Quoted};
use crate::core::RestartOn;

/// The value name of a switch: on the command line the flag alone turns it
/// on (`--flag=off` turns it off); in a file it takes `on` or `off`.
pub(crate) const SWITCH: &str = "[=on|off]";

/// Where a setting is listed in `--help`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Group {
    Addresses,
    Limits,
    Hooks,
    Service,
    Other,
}

impl Group {
    pub(crate) const ALL: [Group; 5] = [
        Group::Addresses,
        Group::Limits,
        Group::Hooks,
        Group::Service,
        Group::Other,
    ];

    pub(crate) fn title(self) -> &'static str {
        match self {
            Group::Addresses => "Addresses",
            Group::Limits => "Limits",
            Group::Hooks => "Hooks (run with /bin/sh -c, one at a time)",
            Group::Service => "Supervised upstream (--spawn; the others need it)",
            Group::Other => "Other",
        }
    }
}

/// A setting as the command line, the file and `--help` see it.
pub(crate) struct Spec {
    /// The long flag without `--`, which is also the config-file key.
    pub(crate) key: &'static str,
    pub(crate) short: Option<char>,
    /// What `--help` calls its value: `N`, `DUR`, ...
    pub(crate) value_name: &'static str,
    pub(crate) group: Group,
    /// The `--help` text; `\n` starts a continuation line.
    pub(crate) help: &'static str,
    /// Whether a reload may change it; a changed value that may not is kept
    /// (and logged).
    pub(crate) reloadable: bool,
    /// Reads the text into the draft; the error is the reason only, so the
    /// caller can prefix the flag or the file line.
    pub(crate) set: fn(&mut Draft, &str) -> Result<(), String>,
    /// The range every way in must respect (flags, file, builder, reload).
    pub(crate) check: fn(&Config) -> Result<(), String>,
    pub(crate) differs: fn(&Config, &Config) -> bool,
    /// Copies the value from the config in force (for a reload that may not
    /// change it).
    pub(crate) keep: fn(&mut Config, &Config),
    /// The value in force as the config file writes it (`--check`).
    pub(crate) show: fn(&Config) -> String,
}

/// Shows the flag as the user may have typed it: `-n/--permits` or `--max-queue`.
impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.short {
            Some(c) => write!(f, "-{c}/--{}", self.key),
            None => write!(f, "--{}", self.key),
        }
    }
}

impl fmt::Debug for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl PartialEq for Spec {
    fn eq(&self, other: &Spec) -> bool {
        self.key == other.key
    }
}

impl Eq for Spec {}

/// A config being assembled from its sources. The upstream may come as one
/// `upstream` or as the 2011 tool's `proxy-host` and `proxy-port` pair, which
/// only the merge can put together.
pub(crate) struct Draft {
    pub(crate) config: Config,
    pub(crate) proxy_host: Option<String>,
    /// One port per instance, in order.
    pub(crate) proxy_port: Option<Vec<u16>>,
}

/// Declares [`Config`] and [`SETTINGS`] from one table.
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])*
        $field:ident: $ty:ty = $default:expr,
            key $key:literal $(short $short:literal)? value $value_name:literal,
            $group:ident, reload $reload:literal,
            parse $parse:expr, check $check:expr,
            help $help:literal;
    )*) => {
        /// Everything the proxy needs to run, validated.
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Config {
            $( $(#[doc = $doc])* pub $field: $ty, )*
            /// The `-c` file, re-read on SIGHUP; `None` when none was given.
            pub config_file: Option<PathBuf>,
        }

        impl Config {
            /// A config with every default and the two addresses given.
            pub fn new(listen: String, upstream: HostPort) -> Config {
                Config {
                    $( $field: $default, )*
                    config_file: None,
                }
                .with_addresses(listen, upstream)
            }
        }

        /// Every setting of [`Config`], in `--help` order within each group.
        pub(crate) const SETTINGS: &[Spec] = &[
            $(
                Spec {
                    key: $key,
                    short: settings!(@short $($short)?),
                    value_name: $value_name,
                    group: Group::$group,
                    help: $help,
                    reloadable: $reload,
                    set: |draft, text| {
                        let parse: fn(&str) -> Result<$ty, String> = $parse;
                        draft.config.$field = parse(text)?;
                        Ok(())
                    },
                    check: |config| {
                        let check: fn(&$ty) -> Result<(), String> = $check;
                        check(&config.$field)
                    },
                    differs: |old, new| old.$field != new.$field,
                    keep: |new, old| new.$field = old.$field.clone(),
                    show: |config| crate::config::show::Show::show(&config.$field),
                },
            )*
        ];
    };
    (@short $c:literal) => { Some($c) };
    (@short) => { None };
}

settings! {
    /// `HOST:PORT`, normalized by [`units::parse_listen`]; resolved by the caller.
    listen: String = String::new(),
        key "listen" short 'l' value "ADDR", Addresses, reload false,
        parse |s| units::parse_listen(s).map_err(|e| e.to_string()),
        check |_| Ok(()),
        help "where clients connect: PORT, HOST:PORT or\n\
              [V6]:PORT; required. PORT alone binds 127.0.0.1";
    /// `--metrics`: where Prometheus scrapes `GET /metrics`; `None` serves
    /// no metrics.
    metrics: Option<String> = None,
        key "metrics" value "ADDR", Addresses, reload false,
        // Empty is none, as for the other optional settings.
        parse |s| match s {
            "" => Ok(None),
            s => units::parse_listen(s).map(Some).map_err(|e| e.to_string()),
        },
        check |addr| match addr {
            Some(addr) => units::parse_listen(addr).map(drop).map_err(|e| e.to_string()),
            None => Ok(()),
        },
        help "serve Prometheus metrics over HTTP at\n\
              http://ADDR/metrics: PORT or HOST:PORT as for\n\
              -l (default: none)";
    /// The instances of the service behind the lock, numbered 1..K in this
    /// order; never empty. Resolved at start-up and on every reload.
    upstreams: Vec<HostPort> = Vec::new(),
        key "upstream" short 'u' value "HOST:PORT", Addresses, reload true,
        parse |s| pool::parse_upstreams(s),
        check |upstreams| pool::check_upstreams(upstreams),
        help "upstream in one word; not together with -p or -h.\n\
              A pool: HOST:PORT,HOST:PORT,... or HOST:FIRST-LAST\n\
              (one instance per port, at most 1024)";
    /// Connections let through at once; at least 1.
    permits: u32 = 1,
        key "permits" short 'n' value "N", Limits, reload true,
        parse |s| parse_count(s),
        check |n| in_range(*n, 1, MAX_PERMITS),
        help "connections let through at once (default: 1)";
    /// `--timeout`: how long a connection may proxy. `None` means no limit.
    ttl: Option<Duration> = None,
        key "timeout" short 't' value "DUR", Limits, reload true,
        parse |s| parse_limit(s),
        check |d| check_limit(*d),
        help "longest a connection may proxy; 0 = no limit\n(default: 0)";
    /// Longest wait from accept until proxying. `None` means no limit.
    queue_timeout: Option<Duration> = None,
        key "queue-timeout" value "DUR", Limits, reload true,
        parse |s| parse_limit(s),
        check |d| check_limit(*d),
        help "longest wait from accept until proxying;\n0 = no limit (default: 0)";
    /// Clients that may wait; 0 means a connection that cannot be activated at
    /// once is rejected.
    max_queue: usize = 1024,
        key "max-queue" value "N", Limits, reload true,
        parse |s| parse_count(s),
        check |n| in_range(*n, 0, MAX_QUEUE),
        help "most connections waiting; one more is closed at\nonce (default: 1024)";
    /// Upstream connect timeout, 10 s by default. `None` means no limit.
    connect_timeout: Option<Duration> = Some(Duration::from_secs(10)),
        key "connect-timeout" value "DUR", Limits, reload true,
        parse |s| parse_limit(s),
        check |d| check_limit(*d),
        help "upstream connect timeout, shared out among its\n\
              addresses; 0 = no limit (default: 10s)";
    /// Bytes per relay direction, 1 KiB to 64 MiB.
    buffer_size: usize = 16 * 1024,
        key "buffer-size" value "BYTES", Limits, reload true,
        parse |s| units::parse_size(s).map_err(|e| e.to_string()),
        check |n| check_buffer_size(*n),
        help "relay buffer per direction, 1k to 64m\n(default: 16k)";
    /// Runs before each activation; only its success lets the connection
    /// through, a failure retries after a backoff. `None` lets connections
    /// straight through.
    on_activate: Option<Hook> = None,
        key "on-activate" value "CMD", Hooks, reload true,
        parse |s| Ok(parse_hook(s)),
        check |hook| check_hook(hook.as_ref()),
        help "runs before each activation; exit 0 lets the\n\
              connection through (default: none)";
    /// Runs after each TTL expiry. `None` means nothing runs.
    on_timeout: Option<Hook> = None,
        key "on-timeout" value "CMD", Hooks, reload true,
        parse |s| Ok(parse_hook(s)),
        check |hook| check_hook(hook.as_ref()),
        help "runs after a connection's timeout (default: none)";
    /// How long a hook may run before it is given up on (a command hook's
    /// process group is killed), 60 s by default. `None` means never.
    hook_timeout: Option<Duration> = Some(Duration::from_secs(60)),
        key "hook-timeout" value "DUR", Hooks, reload true,
        parse |s| parse_limit(s),
        check |d| check_limit(*d),
        help "kill a hook and its process group after this\n\
              long; 0 = never (default: 60s)";
    /// How long a stop waits for proxying connections; zero closes them at once.
    shutdown_grace: Duration = Duration::from_secs(30),
        key "shutdown-grace" value "DUR", Other, reload true,
        parse |s| units::parse_duration(s).map_err(|e| e.to_string()),
        check |d| check_limit(Some(*d)),
        help "on SIGTERM, how long proxying connections may\n\
              finish; 0 = don't wait (default: 30s)";
    /// What a stop does to waiting clients; [`ShutdownQueue::Close`] by
    /// default.
    shutdown_queue: ShutdownQueue = ShutdownQueue::Close,
        key "shutdown-queue" value "close|serve", Other, reload true,
        parse |s| parse_choice(s, ShutdownQueue::ALL, ShutdownQueue::as_str, "value"),
        check |_| Ok(()),
        help "on SIGTERM, close waiting clients at once, or\n\
              serve them in order until the queue is empty\n\
              or the grace runs out (default: close)";
    /// Warn when the head of the queue waited this long while every permit
    /// holder moved no byte for as long; 30 s by default. `None` is off.
    stall_warn: Option<Duration> = Some(Duration::from_secs(30)),
        key "stall-warn" value "DUR", Other, reload true,
        parse |s| parse_limit(s),
        check |d| check_limit(*d),
        help "warn when the queue is stuck behind idle permit\n\
              holders this long; 0 = off (default: 30s)";
    /// What the logfmt lines on stderr include; [`LogLevel::Info`] by default.
    log_level: LogLevel = LogLevel::Info,
        key "log-level" value "LEVEL", Other, reload true,
        parse |s| parse_choice(s, LogLevel::ALL, LogLevel::as_str, "log level"),
        check |_| Ok(()),
        help "error, warn, info or debug (default: info)";
    /// What a waiting client's end of stream does; [`QueuedEof::Keep`] by
    /// default.
    queued_eof: QueuedEof = QueuedEof::Keep,
        key "queued-eof" value "keep|drop", Limits, reload true,
        parse |s| parse_choice(s, QueuedEof::ALL, QueuedEof::as_str, "value"),
        check |_| Ok(()),
        help "a waiting client's end of stream: keep its place\n\
              and deliver its bytes on activation, or drop it\n\
              from the queue (default: keep)";
    /// When to relay with `splice(2)` instead of copying; [`Splice::Auto`] by
    /// default.
    splice: Splice = Splice::Auto,
        key "splice" value "auto|on|off", Other, reload true,
        parse |s| parse_choice(s, Splice::ALL, Splice::as_str, "value"),
        check |_| Ok(()),
        help "move bytes with splice(2) instead of copying;\n\
              auto switches a direction over once it streams\n\
              a full buffer (default: auto)";
    /// Which PROXY protocol header goes to the upstream before a client's
    /// bytes; [`SendProxy::Off`] by default.
    send_proxy: SendProxy = SendProxy::Off,
        key "send-proxy" value "off|v1|v2", Addresses, reload true,
        parse |s| parse_choice(s, SendProxy::ALL, SendProxy::as_str, "value"),
        check |_| Ok(()),
        help "send the upstream a PROXY protocol header (v1\n\
              text or v2 binary) with the client's address\n\
              before its first byte (default: off)";
    /// Every client must start with a PROXY protocol header (v1 or v2), read
    /// within 5 s of accept; its address becomes the
    /// client's.
    accept_proxy: bool = false,
        key "accept-proxy" value "[=on|off]", Addresses, reload false,
        parse |s| parse_switch(s),
        check |_| Ok(()),
        help "every client starts with a PROXY protocol header\n\
              (v1 or v2, within 5s) naming the real client, as a\n\
              balancer in front sends it (default: off)";
    /// `--spawn`: the command tcplock runs as the upstream (`/bin/sh -c`,
    /// in a session of its own) and restarts by the settings below. `None`:
    /// the upstream is managed elsewhere.
    spawn: Option<String> = None,
        key "spawn" value "CMD", Service, reload true,
        parse |s| parse_spawn(s),
        check |cmd| check_spawn(cmd.as_deref()),
        help "run the upstream: /bin/sh -c CMD in its own\n\
              session, stopped with tcplock; it must stay in\n\
              the foreground and listen on the upstream\n\
              address, on this host (default: none)";
    /// A start must answer a connect on the upstream address within this.
    ready_timeout: Duration = Duration::from_secs(30),
        key "ready-timeout" value "DUR", Service, reload true,
        parse |s| units::parse_duration(s).map_err(|e| e.to_string()),
        check |d| check_positive(*d),
        help "a start must answer a connect within this\n(default: 30s)";
    /// Restart after this many connections proxied by one generation; 0 is
    /// never.
    restart_after: u64 = 0,
        key "restart-after" value "N", Service, reload true,
        parse |s| parse_count(s),
        check |_| Ok(()),
        help "restart after N connections; 0 = never\n(default: 0)";
    /// Restart when the summed RSS of the service's process session
    /// exceeds this many bytes; 0 is never.
    restart_rss: u64 = 0,
        key "restart-rss" value "SIZE", Service, reload true,
        parse |s| parse_rss(s),
        check |n| check_restart_rss(*n),
        help "restart, once no client uses it, when its\n\
              processes together hold more (k, m, g); 0 = never\n\
              (default: 0)";
    /// Restart a generation older than this. `None` is never.
    max_lifetime: Option<Duration> = None,
        key "max-lifetime" value "DUR", Service, reload true,
        parse |s| parse_limit(s),
        check |d| check_limit(*d),
        help "restart a generation older than this; 0 = never\n\
              (default: 0)";
    /// Which connection outcomes make the service due for a restart.
    restart_on: RestartOn = RestartOn {
        timeout: true,
        connect_failed: true,
        upstream_error: false,
    },
        key "restart-on" value "LIST", Service, reload true,
        parse |s| parse_restart_on(s),
        check |_| Ok(()),
        help "outcomes that make it due for a restart: any of\n\
              timeout, connect_failed, upstream_error, or none\n\
              (default: timeout,connect_failed)";
    /// Stop the service after this long with no client; the next client
    /// starts it again. `None` is never.
    idle_stop: Option<Duration> = None,
        key "idle-stop" value "DUR", Service, reload true,
        parse |s| parse_limit(s),
        check |d| check_limit(*d),
        help "stop it after this long with no client; the next\n\
              one starts it; 0 = never (default: 0)";
    /// After SIGTERM to the service's processes, wait this long, then
    /// SIGKILL.
    stop_timeout: Duration = Duration::from_secs(10),
        key "stop-timeout" value "DUR", Service, reload true,
        parse |s| units::parse_duration(s).map_err(|e| e.to_string()),
        check |d| check_limit(Some(*d)),
        help "after SIGTERM, wait this long, then SIGKILL\n\
              (default: 10s)";
    /// Consecutive failed starts before the service is declared failed.
    start_retries: u32 = 5,
        key "start-retries" value "N", Service, reload true,
        parse |s| parse_count(s),
        check |n| in_range(*n, 1, MAX_START_RETRIES),
        help "failed starts in a row before clients are turned\n\
              away (default: 5)";
    /// A Unix socket for `tcplock ctl`, created mode 0600 and removed on
    /// exit. `None`: no control socket.
    control: Option<PathBuf> = None,
        key "control" value "PATH", Other, reload false,
        parse |s| parse_control_path(s),
        check |_| Ok(()),
        help "serve `tcplock ctl` commands on this Unix socket\n\
              (mode 0600); fixed at start-up (default: none)";
}

/// `--restart-on` as the file reads it, for `--check`.
impl crate::config::show::Show for RestartOn {
    fn show(&self) -> String {
        let flags = [self.timeout, self.connect_failed, self.upstream_error];
        let on: Vec<&str> = RESTART_ON_NAMES
            .iter()
            .zip(flags)
            .filter(|(_, on)| *on)
            .map(|(name, _)| *name)
            .collect();
        if on.is_empty() {
            "none".to_string()
        } else {
            on.join(",")
        }
    }
}

/// A control socket path, short enough for a `sockaddr_un`; empty is none,
/// as for the other optional settings (and as `--check` writes it).
fn parse_control_path(s: &str) -> Result<Option<PathBuf>, String> {
    if s.is_empty() {
        return Ok(None);
    }
    if s.len() > MAX_CONTROL_PATH {
        return Err(format!(
            "longer than {MAX_CONTROL_PATH} bytes, the most a Unix socket path holds"
        ));
    }
    if s.contains('\0') {
        return Err("contains a NUL byte".to_string());
    }
    Ok(Some(PathBuf::from(s)))
}

/// The longest path a `sockaddr_un` holds, its NUL aside.
pub const MAX_CONTROL_PATH: usize = 107;

/// How long an `--accept-proxy` client has to send its whole header.
pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The 2011 tool's way to name the upstream; the merge folds them into
/// [`Config::upstreams`].
pub(crate) const UPSTREAM_PARTS: &[Spec] = &[
    Spec {
        key: "proxy-port",
        short: Some('p'),
        value_name: "PORT",
        group: Group::Addresses,
        help: "upstream port; FIRST-LAST or PORT,PORT,... for\na pool (one instance per port)",
        reloadable: true,
        set: |draft, text| {
            draft.proxy_port = Some(pool::parse_ports(text)?);
            Ok(())
        },
        check: |_| Ok(()),
        differs: |_, _| false,
        keep: |_, _| {},
        show: |_| String::new(),
    },
    Spec {
        key: "proxy-host",
        short: Some('h'),
        value_name: "HOST",
        group: Group::Addresses,
        help: "upstream host (default: localhost)",
        reloadable: true,
        set: |draft, text| {
            draft.proxy_host = Some(units::parse_host(text).map_err(|e| e.to_string())?);
            Ok(())
        },
        check: |_| Ok(()),
        differs: |_, _| false,
        keep: |_, _| {},
        show: |_| String::new(),
    },
];

/// Every setting the command line and the file accept, `-c` aside.
pub(crate) fn all_specs() -> impl Iterator<Item = &'static Spec> {
    SETTINGS.iter().chain(UPSTREAM_PARTS)
}

/// The setting whose key (long flag name) is exactly `key`.
pub(crate) fn spec_by_key(key: &str) -> Option<&'static Spec> {
    all_specs().find(|spec| spec.key == key)
}

/// The setting whose one-letter flag is `c`.
pub(crate) fn spec_by_short(c: char) -> Option<&'static Spec> {
    all_specs().find(|spec| spec.short == Some(c))
}

impl Config {
    fn with_addresses(mut self, listen: String, upstream: HostPort) -> Config {
        self.listen = listen;
        self.upstreams = vec![upstream];
        self
    }

    /// Instance 1, the first of [`Config::upstreams`] (an empty list, which
    /// [`Config::validate`] refuses, gives an empty address).
    pub fn first_upstream(&self) -> &HostPort {
        static NONE: HostPort = HostPort {
            host: String::new(),
            port: 0,
        };
        self.upstreams.first().unwrap_or(&NONE)
    }

    /// Checks every setting against the range the command line enforces, so a
    /// builder or a `Handle::reload` cannot get past what a flag could not.
    /// The error names the setting's key.
    pub fn validate(&self) -> Result<(), String> {
        for spec in SETTINGS {
            (spec.check)(self).map_err(|reason| format!("{}: {reason}", spec.key))?;
        }
        self.check_supervision()
            .map_err(|(spec, reason)| format!("{}: {reason}", spec.key))
    }

    /// The rules between settings of the service group: every one of them
    /// but `spawn` needs `spawn` (a value other than its default without it
    /// is refused, naming it), and a spawned service must listen on this
    /// host. Returns the setting to blame and why.
    ///
    /// Which addresses are this host's is decided without a lookup, so this
    /// never waits for DNS: a literal address must be a loopback or
    /// unspecified one or one of this host's interfaces (a bind test);
    /// `localhost` and names under `.localhost` pass; any other name is
    /// checked once it is resolved ([`upstream_is_local`] on every address,
    /// where the upstream is resolved).
    pub(crate) fn check_supervision(&self) -> Result<(), (&'static Spec, String)> {
        let service_specs = || SETTINGS.iter().filter(|spec| spec.group == Group::Service);
        if self.spawn.is_none() {
            let defaults = Config::new(String::new(), HostPort::default());
            return match service_specs().find(|spec| (spec.differs)(&defaults, self)) {
                Some(spec) => Err((spec, NEEDS_SPAWN.to_string())),
                None => Ok(()),
            };
        }
        // A name is judged once resolved: looking it up here could block.
        // Every instance of a pool is a child of tcplock's, so each is here.
        let remote = self.upstreams.iter().find(|upstream| {
            upstream
                .host
                .parse::<IpAddr>()
                .is_ok_and(|ip| !upstream_is_local(ip))
        });
        match (spec_by_key("spawn"), remote) {
            (Some(spec), Some(remote)) => Err((spec, not_on_this_host(&remote.to_string()))),
            _ => Ok(()),
        }
    }
}

/// Why a service setting is refused without `spawn`.
pub(crate) const NEEDS_SPAWN: &str =
    "only with spawn (tcplock restarts and stops only a service it runs)";

/// Why `spawn` is refused with an upstream elsewhere.
pub(crate) fn not_on_this_host(upstream: &str) -> String {
    format!(
        "the upstream {} is not an address of this host; a service tcplock \
         runs must listen here",
        Quoted(upstream)
    )
}

/// Whether a service listening on `ip` would be on this host: a loopback or
/// unspecified address (a connect to `0.0.0.0` reaches this host), or one
/// that a socket can be bound to here. The bind is a UDP socket on port 0,
/// closed at once: no packet is sent and nothing waits.
pub(crate) fn upstream_is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// The keys whose values differ between two configs, in table order, for the
/// `event=reloaded changed=...` log line.
pub fn changed_keys(old: &Config, new: &Config) -> Vec<&'static str> {
    SETTINGS
        .iter()
        .filter(|spec| (spec.differs)(old, new))
        .map(|spec| spec.key)
        .collect()
}

/// Puts back, in `new`, every value a reload may not change, and returns
/// the keys of those that differed (for a `reload_ignored` line each).
pub fn keep_fixed(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut kept = Vec::new();
    for spec in SETTINGS.iter().filter(|spec| !spec.reloadable) {
        if (spec.differs)(old, new) {
            (spec.keep)(new, old);
            kept.push(spec.key);
        }
    }
    kept
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
/// The kernel refuses a single `execve` argument this long or longer
/// (`MAX_ARG_STRLEN`, 32 pages), and `/bin/sh -c` passes the command as one.
pub const MAX_HOOK_COMMAND: usize = 128 * 1024 - 1;
/// Cap on `--start-retries`: more would only postpone telling waiting
/// clients that the service does not start.
pub const MAX_START_RETRIES: u32 = 1000;
/// Smallest non-zero `--restart-rss`: below it every service is over the
/// limit from its first sample.
pub const MIN_RESTART_RSS: u64 = 1024 * 1024;

/// Declares a setting's value that is one of a few names: the enum, the
/// names in order (`ALL`), `as_str` and `Display`.
macro_rules! choices {
    ($(
        $(#[doc = $doc:literal])*
        #[derive($($derive:ident),*)]
        pub enum $name:ident {
            $( $(#[doc = $vdoc:literal])* $variant:ident = $text:literal, )*
        }
    )*) => {$(
        $(#[doc = $doc])*
        #[derive($($derive),*)]
        #[non_exhaustive]
        pub enum $name {
            $( $(#[doc = $vdoc])* $variant, )*
        }

        impl $name {
            const ALL: &'static [$name] = &[$(Self::$variant),*];

            /// The name, as logs show it and the flag reads it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)*
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl crate::config::show::Show for $name {
            fn show(&self) -> String {
                self.as_str().to_string()
            }
        }
    )*};
}

choices! {
    /// How much the log says; each level includes those before it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub enum LogLevel {
        /// Errors only, such as a failed reload.
        Error = "error",
        /// Also warnings, such as a failed or timed-out hook.
        Warn = "warn",
        /// Also each connection's activation, end and rejection; the default.
        Info = "info",
        /// Also every accept.
        Debug = "debug",
    }

    /// When the relay moves bytes with `splice(2)` through a pipe instead of
    /// copying them through user space.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Splice {
        /// Always copy.
        Off = "off",
        /// Copy until a direction fills a whole buffer in one read, then splice
        /// that direction: small exchanges stay on the cheaper copying path and
        /// bulk streams skip two copies per buffer. The default.
        Auto = "auto",
        /// Splice every direction from its first byte.
        On = "on",
    }

    /// What a waiting client's end of stream (a FIN, with or without bytes before
    /// it) does to its place in the queue.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum QueuedEof {
        /// It keeps its place; what it sent is delivered on activation (for
        /// protocols where a client half-closes after its request). The default.
        Keep = "keep",
        /// It leaves the queue as abandoned (for request/response protocols whose
        /// clients never half-close, so an end of stream means the client is gone).
        Drop = "drop",
    }

    /// What a stop (SIGTERM, `Handle::stop`) does to clients still waiting.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ShutdownQueue {
        /// They are closed at once. The default.
        Close = "close",
        /// They are still activated in order, hooks included, until the queue is
        /// empty or the shutdown grace runs out; the listener closes at once.
        Serve = "serve",
    }

    /// Whether, and in which version, a PROXY protocol header (HAProxy's
    /// `proxy-protocol.txt`) tells the upstream who the client is.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum SendProxy {
        /// No header: the upstream sees tcplock's address only. The default.
        Off = "off",
        /// The text header, `PROXY TCP4 client local cport lport\r\n`.
        V1 = "v1",
        /// The binary header.
        V2 = "v2",
    }

}

/// One of `choices` by name, in any case; the error lists them.
fn parse_choice<T: Copy>(
    text: &str,
    choices: &[T],
    name: fn(T) -> &'static str,
    what: &str,
) -> Result<T, String> {
    choices
        .iter()
        .copied()
        .find(|&choice| name(choice).eq_ignore_ascii_case(text))
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|&c| name(c)).collect();
            let (last, rest) = names.split_last().unwrap_or((&"", &[]));
            format!(
                "invalid {what} {} (use {} or {last})",
                Quoted(text),
                rest.join(", ")
            )
        })
}

/// `on` or `off` (also `true`/`false`, `yes`/`no`, `1`/`0`).
fn parse_switch(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("invalid value {} (use on or off)", Quoted(text))),
    }
}

/// A plain decimal count; its range is the setting's check.
fn parse_count<T: std::str::FromStr>(text: &str) -> Result<T, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("invalid number {}", Quoted(text)));
    }
    text.parse()
        .map_err(|_| format!("{} is too large", Quoted(text)))
}

fn in_range<T: PartialOrd + fmt::Display>(n: T, min: T, max: T) -> Result<(), String> {
    if n < min {
        return Err(format!("'{n}' is too small (at least {min})"));
    }
    if n > max {
        return Err(format!("'{n}' is too large (at most {max})"));
    }
    Ok(())
}

/// A duration where zero means "no limit".
fn parse_limit(text: &str) -> Result<Option<Duration>, String> {
    let duration = units::parse_duration(text).map_err(|e| e.to_string())?;
    Ok((!duration.is_zero()).then_some(duration))
}

/// Deadlines are `now + duration` on a millisecond clock: the cap keeps that
/// sum far from overflowing, however the duration came in.
fn check_limit(duration: Option<Duration>) -> Result<(), String> {
    match duration {
        Some(d) if d > MAX_DURATION => Err(format!(
            "{} ms is too long (at most 100 years)",
            d.as_millis()
        )),
        _ => Ok(()),
    }
}

fn check_buffer_size(size: usize) -> Result<(), String> {
    if !(MIN_BUFFER_SIZE..=MAX_BUFFER_SIZE).contains(&size) {
        return Err(format!("buffer size {size} out of range (1k to 64m)"));
    }
    Ok(())
}

/// An empty command means "no hook", and still overrides a hook the other
/// source sets.
fn parse_hook(text: &str) -> Option<Hook> {
    (!text.is_empty()).then(|| Hook::command(text))
}

/// A command that `/bin/sh -c` could never be given would fail every
/// activation forever: refuse it where it is set instead.
fn check_hook(hook: Option<&Hook>) -> Result<(), String> {
    let Some(command) = hook.and_then(Hook::as_command) else {
        return Ok(());
    };
    if command.contains('\0') {
        return Err("a command cannot contain a NUL byte".into());
    }
    if command.len() > MAX_HOOK_COMMAND {
        return Err(format!(
            "a command of {} bytes is too long (at most {MAX_HOOK_COMMAND})",
            command.len()
        ));
    }
    Ok(())
}

/// `--spawn`: a command. Nothing at all means no supervised upstream, as an
/// empty hook means no hook: `spawn =` is how `--check` writes "none", and
/// `--spawn ''` on the command line overrides a file's. A command of blanks
/// only is refused (by the check).
fn parse_spawn(text: &str) -> Result<Option<String>, String> {
    Ok((!text.is_empty()).then(|| text.to_string()))
}

/// The command `/bin/sh -c` is given must be one it can be given, and not
/// blank.
fn check_spawn(command: Option<&str>) -> Result<(), String> {
    let Some(command) = command else {
        return Ok(());
    };
    if command.trim().is_empty() {
        return Err("the command is empty".into());
    }
    check_hook(Some(&Hook::command(command)))
}

fn check_positive(duration: Duration) -> Result<(), String> {
    if duration.is_zero() {
        return Err("must be longer than 0".into());
    }
    check_limit(Some(duration))
}

fn parse_rss(text: &str) -> Result<u64, String> {
    units::parse_memory(text).map_err(|e| match e {
        units::UnitError::InvalidSize(v) => format!(
            "invalid size {} (use bytes, or a k, m or g suffix as in 1g)",
            Quoted(&v)
        ),
        e => e.to_string(),
    })
}

fn check_restart_rss(bytes: u64) -> Result<(), String> {
    if bytes != 0 && bytes < MIN_RESTART_RSS {
        return Err(format!(
            "{bytes} bytes is too small (0 = never, or at least 1m)"
        ));
    }
    Ok(())
}

/// The names `--restart-on` takes, in the order `RestartOn` lists them.
const RESTART_ON_NAMES: [&str; 3] = ["timeout", "connect_failed", "upstream_error"];

/// `--restart-on`: a comma-separated list of `timeout`, `connect_failed`
/// and `upstream_error` (any case, spaces around commas allowed, repeats
/// harmless), or `none` alone.
pub(crate) fn parse_restart_on(text: &str) -> Result<RestartOn, String> {
    let mut on = RestartOn::default();
    let invalid = |why: &str| {
        format!(
            "invalid list {} ({why}; use {} or none)",
            Quoted(text),
            RESTART_ON_NAMES.join(", ")
        )
    };
    if text.trim().eq_ignore_ascii_case("none") {
        return Ok(on);
    }
    for word in text.split(',').map(str::trim) {
        match word.to_ascii_lowercase().as_str() {
            "timeout" => on.timeout = true,
            "connect_failed" => on.connect_failed = true,
            "upstream_error" => on.upstream_error = true,
            "" => return Err(invalid("an empty item")),
            "none" => return Err(invalid("none stands alone")),
            _ => return Err(invalid(&format!("unknown outcome {}", Quoted(word)))),
        }
    }
    Ok(on)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(timeout: bool, connect_failed: bool, upstream_error: bool) -> RestartOn {
        RestartOn {
            timeout,
            connect_failed,
            upstream_error,
        }
    }

    #[test]
    fn restart_on_reads_a_list_or_none() {
        assert_eq!(parse_restart_on("timeout"), Ok(on(true, false, false)));
        assert_eq!(
            parse_restart_on("timeout,connect_failed"),
            Ok(on(true, true, false))
        );
        assert_eq!(
            parse_restart_on(" Upstream_Error , TIMEOUT,timeout"),
            Ok(on(true, false, true))
        );
        assert_eq!(
            parse_restart_on("connect_failed,upstream_error,timeout"),
            Ok(on(true, true, true))
        );
        assert_eq!(parse_restart_on("none"), Ok(on(false, false, false)));
        assert_eq!(parse_restart_on(" NONE "), Ok(on(false, false, false)));
    }

    #[test]
    fn restart_on_refuses_what_it_does_not_know() {
        assert_eq!(
            parse_restart_on("timeout,crash").unwrap_err(),
            "invalid list 'timeout,crash' (unknown outcome 'crash'; use timeout, \
             connect_failed, upstream_error or none)"
        );
        for bad in ["", ",", "timeout,", ",timeout", "timeout,,connect_failed"] {
            let e = parse_restart_on(bad).unwrap_err();
            assert!(e.contains("an empty item"), "{bad:?}: {e}");
        }
        let e = parse_restart_on("none,timeout").unwrap_err();
        assert!(e.contains("none stands alone"), "{e}");
        assert!(parse_restart_on("time out").is_err());
        assert!(parse_restart_on("connect-failed").is_err());
    }

    #[test]
    fn the_default_restart_on_is_what_help_says() {
        let config = Config::new(String::new(), HostPort::default());
        assert_eq!(
            Ok(config.restart_on),
            parse_restart_on("timeout,connect_failed")
        );
        let spec = spec_by_key("restart-on").unwrap();
        assert!(spec.help.contains("(default: timeout,connect_failed)"));
    }

    #[test]
    fn which_upstreams_are_on_this_host() {
        for ip in ["127.0.0.1", "127.1.2.3", "::1", "0.0.0.0", "::"] {
            assert!(upstream_is_local(ip.parse().unwrap()), "{ip}");
        }
        // TEST-NET-3 and documentation v6 addresses are no host's.
        for ip in ["203.0.113.7", "2001:db8::1"] {
            assert!(!upstream_is_local(ip.parse().unwrap()), "{ip}");
        }
    }
}
