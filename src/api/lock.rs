//! The embeddable lock: build it, take a [`Handle`], run it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::api::error::Error;
use crate::api::hook::{Hook, Ticket, TimeoutInfo};
use crate::config::pool;
use crate::config::units::{self, HostPort};
use crate::config::{Config, LogLevel, QueuedEof, RawArgs, SendProxy, ShutdownQueue, Splice};
use crate::core::{RestartOn, Stats};
use crate::shell::{Control, Shell, ShellOptions, resolve_upstreams, socket_activated};

/// A bound, ready-to-run tcplock: the listening socket is open and the upstream
/// resolved, so clients may connect (and wait in the kernel's backlog) before
/// [`Lock::run`] is called.
///
/// ```no_run
/// use std::time::Duration;
///
/// let lock = tcplock::Lock::builder()
///     .listen("127.0.0.1:9000")
///     .upstream("127.0.0.1:8100")
///     .permits(1)
///     .ttl(Duration::from_secs(20))
///     .on_activate(|ticket: tcplock::Ticket| {
///         // Runs on the loop thread: hand slow work to another thread.
///         std::thread::spawn(move || {
///             // ... restart the service ...
///             ticket.proceed();
///         });
///     })
///     .on_timeout(|info| eprintln!("conn {} timed out", info.id))
///     .build()?;
/// let handle = lock.handle();
/// std::thread::spawn(move || {
///     std::thread::sleep(Duration::from_secs(60));
///     handle.stop();
/// });
/// lock.run()?;
/// # Ok::<(), tcplock::Error>(())
/// ```
pub struct Lock {
    shell: Shell,
}

impl Lock {
    /// Starts describing a lock.
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// The address clients connect to (useful after listening on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shell.local_addr()
    }

    /// A handle to stop, reconfigure and observe the lock from any thread.
    pub fn handle(&self) -> Handle {
        self.shell.handle()
    }

    /// The settings in force.
    pub fn config(&self) -> &Config {
        self.shell.config()
    }

    /// Runs the event loop on this thread until [`Handle::stop`] (or, with
    /// signals handled, SIGTERM/SIGINT) and the shutdown that follows complete.
    pub fn run(mut self) -> Result<(), Error> {
        self.shell.run()
    }
}

/// Describes a [`Lock`]. Every setting but [`Builder::listen`] and
/// [`Builder::upstream`] has the default the `tcplock` binary has.
///
/// ```
/// let lock = tcplock::Lock::builder()
///     .listen("127.0.0.1:0")
///     .upstream("127.0.0.1:8100")
///     .permits(2)
///     .build()?;
/// assert_eq!(lock.config().permits, 2);
/// assert_ne!(lock.local_addr().port(), 0);
/// # Ok::<(), tcplock::Error>(())
/// ```
#[must_use = "a builder does nothing until built"]
pub struct Builder {
    listen: Option<String>,
    upstream: Option<String>,
    /// Every other setting; its listen and upstream are placeholders until
    /// `build` fills them in.
    config: Config,
    options: ShellOptions,
}

impl Builder {
    fn new() -> Builder {
        let placeholder = HostPort {
            host: String::new(),
            port: 0,
        };
        Builder {
            listen: None,
            upstream: None,
            config: Config::new(String::new(), placeholder),
            options: ShellOptions::default(),
        }
    }

    /// Starts from a complete config (what the binary loads from its command
    /// line and config file).
    pub fn from_config(config: Config) -> Builder {
        Builder {
            listen: Some(config.listen.clone()),
            // As `upstream()` reads it back: the instances, comma-separated.
            upstream: Some(pool::list_text(&config.upstreams)),
            config,
            options: ShellOptions::default(),
        }
    }

    /// Where clients connect: `PORT` (on 127.0.0.1), `HOST:PORT` or `[V6]:PORT`.
    pub fn listen(mut self, addr: impl Into<String>) -> Builder {
        self.listen = Some(addr.into());
        self
    }

    /// The service behind the lock: `HOST:PORT` or `[V6]:PORT`, resolved once
    /// when the lock is built. It reads what `-u` reads, so a pool may be
    /// given here too: `HOST:PORT,HOST:PORT,...` or `HOST:FIRST-LAST`.
    pub fn upstream(mut self, addr: impl Into<String>) -> Builder {
        self.upstream = Some(addr.into());
        self
    }

    /// A pool of instances of the service, each `HOST:PORT` or `[V6]:PORT`,
    /// numbered 1..K in this order (at most 1,024, none twice); replaces
    /// what [`Builder::upstream`] gave. An empty list gives no upstream,
    /// which `build` refuses.
    ///
    /// ```no_run
    /// let lock = tcplock::Lock::builder()
    ///     .listen("127.0.0.1:9000")
    ///     .upstreams(["127.0.0.1:2002", "127.0.0.1:2003"])
    ///     .build()?;
    /// assert_eq!(lock.config().upstreams.len(), 2);
    /// # Ok::<(), tcplock::Error>(())
    /// ```
    pub fn upstreams<I>(mut self, addrs: I) -> Builder
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        let addrs: Vec<String> = addrs.into_iter().map(Into::into).collect();
        self.upstream = (!addrs.is_empty()).then(|| addrs.join(","));
        self
    }

    /// Connections let through at once (at least 1; default 1).
    pub fn permits(mut self, permits: u32) -> Builder {
        self.config.permits = permits;
        self
    }

    /// How long a connection may proxy before it is cut (default: no limit).
    pub fn ttl(mut self, ttl: Duration) -> Builder {
        self.config.ttl = non_zero(ttl);
        self
    }

    /// How long a client may wait from accept until proxying (default: no limit).
    pub fn queue_timeout(mut self, timeout: Duration) -> Builder {
        self.config.queue_timeout = non_zero(timeout);
        self
    }

    /// Most clients waiting; one more is turned away (default 1024).
    pub fn max_queue(mut self, max_queue: usize) -> Builder {
        self.config.max_queue = max_queue;
        self
    }

    /// Upstream connect timeout (default 10 s; zero means none).
    pub fn connect_timeout(mut self, timeout: Duration) -> Builder {
        self.config.connect_timeout = non_zero(timeout);
        self
    }

    /// Relay buffer size per direction (default 16 KiB).
    pub fn buffer_size(mut self, bytes: usize) -> Builder {
        self.config.buffer_size = bytes;
        self
    }

    /// Serve Prometheus metrics at `http://ADDR/metrics` (`HOST:PORT`, or
    /// a port alone for 127.0.0.1); none by default. Fixed for the life of
    /// the lock (a reload keeps it).
    pub fn metrics(mut self, addr: &str) -> Builder {
        self.config.metrics = Some(addr.to_owned());
        self
    }

    /// Log level of the logfmt lines on stderr (default info).
    pub fn log_level(mut self, level: LogLevel) -> Builder {
        self.config.log_level = level;
        self
    }

    /// A closure run before each activation; see [`Ticket`].
    pub fn on_activate(mut self, f: impl Fn(Ticket) + Send + Sync + 'static) -> Builder {
        self.config.on_activate = Some(Hook::activate_fn(f));
        self
    }

    /// A closure run after each TTL expiry.
    pub fn on_timeout(mut self, f: impl Fn(&TimeoutInfo) + Send + Sync + 'static) -> Builder {
        self.config.on_timeout = Some(Hook::timeout_fn(f));
        self
    }

    /// Any hook (for example [`Hook::command`]) before each activation.
    pub fn on_activate_hook(mut self, hook: Hook) -> Builder {
        self.config.on_activate = Some(hook);
        self
    }

    /// Any hook after each TTL expiry.
    pub fn on_timeout_hook(mut self, hook: Hook) -> Builder {
        self.config.on_timeout = Some(hook);
        self
    }

    /// How long a hook may run before it is given up on (command hooks are
    /// killed with their process group). Default 60 s; zero means never.
    pub fn hook_timeout(mut self, timeout: Duration) -> Builder {
        self.config.hook_timeout = non_zero(timeout);
        self
    }

    /// How long a stop waits for proxying connections (default 30 s).
    pub fn shutdown_grace(mut self, grace: Duration) -> Builder {
        self.config.shutdown_grace = grace;
        self
    }

    /// What a stop does to clients still waiting: close them at once
    /// ([`ShutdownQueue::Close`], the default) or keep activating them in
    /// order until the queue is empty or the shutdown grace runs out.
    pub fn shutdown_queue(mut self, policy: ShutdownQueue) -> Builder {
        self.config.shutdown_queue = policy;
        self
    }

    /// Warn (`event=queue_stalled`, once per stall) when the head of the
    /// queue waited this long while every permit holder moved no byte for as
    /// long. Default 30 s; zero turns it off.
    pub fn stall_warn(mut self, after: Duration) -> Builder {
        self.config.stall_warn = non_zero(after);
        self
    }

    /// When to relay with `splice(2)` through pipes instead of copying
    /// through user space; [`Splice::Auto`] by default.
    pub fn splice(mut self, mode: Splice) -> Builder {
        self.config.splice = mode;
        self
    }

    /// What a waiting client's end of stream does: keep its place (the
    /// default) or drop it from the queue as abandoned.
    pub fn queued_eof(mut self, policy: QueuedEof) -> Builder {
        self.config.queued_eof = policy;
        self
    }

    /// Send the upstream a PROXY protocol header with the client's address
    /// before the client's first byte; [`SendProxy::Off`] by default.
    pub fn send_proxy(mut self, version: SendProxy) -> Builder {
        self.config.send_proxy = version;
        self
    }

    /// Expect every client to start with a PROXY protocol header (v1 or v2)
    /// naming the real client, as a balancer in front sends it; off by
    /// default. Fixed for the life of the lock (a reload keeps it).
    pub fn accept_proxy(mut self, on: bool) -> Builder {
        self.config.accept_proxy = on;
        self
    }

    /// Run the upstream: `/bin/sh -c command` in a process session of its
    /// own, started before clients are let through, restarted by the
    /// settings below (each needs this one) and stopped with the lock. It
    /// must stay in the foreground and listen on the upstream address, which
    /// must be on this host. Default: none (the upstream is managed
    /// elsewhere).
    pub fn spawn(mut self, command: impl Into<String>) -> Builder {
        self.config.spawn = Some(command.into());
        self
    }

    /// How long a start of the spawned service may take to answer a connect
    /// on the upstream address (default 30 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Builder {
        self.config.ready_timeout = timeout;
        self
    }

    /// Restart the spawned service after this many connections proxied by
    /// one run of it (default 0: never).
    pub fn restart_after(mut self, connections: u64) -> Builder {
        self.config.restart_after = connections;
        self
    }

    /// Restart the spawned service, once no client uses it, when its
    /// processes together hold more than this many bytes of memory
    /// (default 0: never).
    pub fn restart_rss(mut self, bytes: u64) -> Builder {
        self.config.restart_rss = bytes;
        self
    }

    /// Restart a run of the spawned service older than this (default: zero,
    /// never).
    pub fn max_lifetime(mut self, lifetime: Duration) -> Builder {
        self.config.max_lifetime = non_zero(lifetime);
        self
    }

    /// Which connection outcomes make the spawned service due for a restart
    /// (default: a timeout or a failed connect).
    pub fn restart_on(mut self, outcomes: RestartOn) -> Builder {
        self.config.restart_on = outcomes;
        self
    }

    /// Stop the spawned service after this long with no client; the next
    /// client starts it again (default: zero, never).
    pub fn idle_stop(mut self, after: Duration) -> Builder {
        self.config.idle_stop = non_zero(after);
        self
    }

    /// How long the spawned service has to stop after SIGTERM before it is
    /// killed (default 10 s).
    pub fn stop_timeout(mut self, timeout: Duration) -> Builder {
        self.config.stop_timeout = timeout;
        self
    }

    /// Failed starts in a row before the spawned service is declared failed
    /// and waiting clients are turned away (default 5).
    pub fn start_retries(mut self, retries: u32) -> Builder {
        self.config.start_retries = retries;
        self
    }

    /// Serve control commands (`tcplock ctl`) on a Unix socket at `path`,
    /// created mode 0600; a stale socket there is replaced, any other file is
    /// an error. Removed when the lock stops. Fixed for the life of the lock.
    pub fn control(mut self, path: impl Into<std::path::PathBuf>) -> Builder {
        self.config.control = Some(path.into());
        self
    }

    /// Handle SIGTERM/SIGINT (stop), SIGHUP (reload) and SIGUSR1 (state dump)
    /// as the binary does. Off by default: a library should not take over its
    /// host's signals, and without this none is touched (command hooks are
    /// watched through pidfds; SIGCHLD only on kernels without them).
    pub fn handle_signals(mut self, on: bool) -> Builder {
        self.options.handle_signals = on;
        self
    }

    /// Talk to a service manager as the binary does: with `NOTIFY_SOCKET`
    /// set, send systemd `READY=1`, `STATUS=`, `RELOADING=1`, `STOPPING=1`
    /// and (with `WATCHDOG_USEC`) watchdog pings; with `LISTEN_PID` naming
    /// this process and `LISTEN_FDS=1`, take descriptor 3 as the listener
    /// instead of binding (the listen address may then be left out). Off by
    /// default: these variables belong to the host process.
    pub fn service_manager(mut self, on: bool) -> Builder {
        self.options.service_manager = on;
        self
    }

    /// The command line the config came from, so SIGHUP can re-read the config
    /// file with the command line still winning.
    pub fn reload_from(mut self, args: RawArgs) -> Builder {
        self.options.reload_args = Some(args);
        self
    }

    /// Validates, binds the listening socket and resolves the upstream.
    pub fn build(mut self) -> Result<Lock, Error> {
        // A socket-activated service may have none: the shell takes the
        // passed socket, or says that there is no listen address.
        let activated = self.options.service_manager && socket_activated();
        self.config.listen = match self.listen {
            Some(listen) if !(activated && listen.is_empty()) => {
                units::parse_listen(&listen).map_err(|e| Error::Invalid(format!("listen: {e}")))?
            }
            Some(_) => String::new(),
            None if activated => String::new(),
            None => return Err(Error::Invalid("no listen address: call listen()".into())),
        };
        let upstream = self
            .upstream
            .ok_or_else(|| Error::Invalid("no upstream: call upstream()".into()))?;
        self.config.upstreams = pool::parse_upstreams(&upstream)
            .map_err(|e| Error::Invalid(format!("upstream: {e}")))?;
        validate(&self.config)?;
        let shell = Shell::start(self.config, self.options)?;
        Ok(Lock { shell })
    }
}

fn non_zero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// The checks every setting gets, whichever way it came in (flag, file,
/// builder or reload): one validation, so the ways in cannot drift apart.
fn validate(config: &Config) -> Result<(), Error> {
    config.validate().map_err(Error::Invalid)
}

/// Stops, reconfigures and observes a running [`Lock`] from any thread. Cheap
/// to clone. Calls after the lock has stopped do nothing.
#[derive(Clone)]
pub struct Handle {
    pub(crate) control: std::sync::mpsc::Sender<Control>,
    pub(crate) waker: Arc<mio::Waker>,
    pub(crate) stats: Arc<Mutex<Stats>>,
}

impl Handle {
    /// Graceful stop: the listener closes, waiting clients are closed and a
    /// running hook is given up on (with [`ShutdownQueue::Serve`]: waiting
    /// clients are still let through in order, hooks included, within the
    /// grace), proxying connections get the shutdown grace. A second call
    /// ends them at once.
    pub fn stop(&self) {
        self.send(Control::Stop);
    }

    /// New settings for activations from now on, as SIGHUP applies a config
    /// file: a changed listen address is ignored (and logged). Each upstream
    /// instance is resolved here, on the caller's thread, so the loop never waits for DNS.
    /// Returns an error, and changes nothing, if a setting is out of range or
    /// the upstream does not resolve.
    pub fn reload(&self, config: Config) -> Result<(), Error> {
        validate(&config)?;
        let resolved = resolve_upstreams(&config)?;
        self.send(Control::Reload(Box::new(config), resolved));
        Ok(())
    }

    /// Counters as of the end of the loop's latest turn.
    pub fn stats(&self) -> Stats {
        match self.stats.lock() {
            Ok(stats) => stats.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn send(&self, control: Control) {
        if self.control.send(control).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("stats", &self.stats())
            .finish()
    }
}
