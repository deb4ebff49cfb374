//! The mio loop around the core: it turns readiness, signals and child exits
//! into core inputs and performs the core's actions. It holds no policy: who goes
//! next, when, and what ends is decided by [`crate::core::Core`].

mod buffer;
mod control;
mod fds;
mod hooks;
mod http;
mod log;
mod metrics;
mod net;
mod notify;
mod output;
mod relay;
mod service;
mod signals;
mod upstreams;

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::AsFd;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::signal::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook_mio::v1_0::Signals;

use crate::api::error::Error;
use crate::api::hook::Hook;
use crate::api::lock::Handle;
use crate::config::{self, Config, LogLevel, QueuedEof, RawArgs, ShutdownQueue};
use crate::core::{
    Action, ConnRef, Core, EndedBy, HookExit, HookId, InstanceId, Outcome, ProxyHeader,
    ServiceSettings, Settings, Stats,
};
use crate::sys;
use log::{CommaList, Logger};

pub(crate) use control::{Command, check_control_path, parse_line};
use fds::FdBudget;
use hooks::{HookTable, RunningHook};
pub(crate) use metrics::resolve_metrics_addr;
pub(crate) use net::resolve;
pub(crate) use net::resolve_upstreams;
use notify::Notifier;
pub(crate) use notify::SERVICE_MANAGER_ENV;
pub use notify::socket_activated;
use output::Outputs;
use relay::{ChannelPool, Pumped, Readiness, Relay, SocketEvent};
use service::{ServiceIo, ServiceTable};
use signals::watch_signals;
use upstreams::Upstreams;

const LISTENER: Token = Token(0);

const SIGNALS: Token = Token(1);

/// Messages from handles and tickets on other threads.
const CONTROL: Token = Token(2);

/// Every running hook's pidfd: readable once that hook has exited.
const HOOK_EXIT: Token = Token(3);

/// stderr has room again for log lines that waited.
const LOG_SINK: Token = Token(4);

// 5-12: free (each instance has its own tokens for its service and its
// hooks' output: see `service`).

/// How often lines waiting for a stderr the poll cannot watch are retried.
const LOG_RETRY: Duration = Duration::from_millis(100);

/// `--metrics`: the HTTP listener, and its connections' tokens.
const METRICS_LISTENER: Token = Token(13);
const FIRST_METRICS_CONN: usize = 32;
const METRICS_CONNS: std::ops::Range<usize> =
    FIRST_METRICS_CONN..FIRST_METRICS_CONN + http::MAX_CONNS;

/// Connection tokens start here: two per slab slot, client then upstream.
/// Below it: the fixed tokens, control connections (16..=31) and metrics
/// connections (32..=47). Above them all, from
/// [`service::FIRST_SERVICE_TOKEN`]: a block per supervised instance.
const FIRST_CONN_TOKEN: usize = 64;

// The token ranges never overlap: fixed tokens, control connections,
// metrics connections, then the connections' pairs.
const _: () = {
    let fixed = [LISTENER, SIGNALS, CONTROL, HOOK_EXIT, LOG_SINK];
    let mut i = 0;
    while i < fixed.len() {
        assert!(fixed[i].0 < control::FIRST_CONTROL_TOKEN);
        i += 1;
    }
    assert!(control::CONTROL_LISTENER.0 < control::FIRST_CONTROL_TOKEN);
    assert!(METRICS_LISTENER.0 < control::FIRST_CONTROL_TOKEN);
    assert!(control::CONTROL_LISTENER.0 != METRICS_LISTENER.0);
    assert!(control::FIRST_CONTROL_TOKEN + control::MAX_CONTROL_CONNS <= FIRST_METRICS_CONN);
    assert!(METRICS_CONNS.end <= FIRST_CONN_TOKEN);
    assert!(FIRST_CONN_TOKEN < service::FIRST_SERVICE_TOKEN);
};

/// The kernel's accept backlog: deep, because a burst of clients is exactly
/// what a queueing proxy exists for.
const LISTEN_BACKLOG: i32 = 4096;

/// What other threads ask of the loop, through a channel and a waker.
pub(crate) enum Control {
    Stop,
    /// New settings with each upstream instance already resolved, in the
    /// order of [`Config::upstreams`].
    Reload(Box<Config>, Vec<Vec<SocketAddr>>),
    /// What a SIGHUP reload's helper thread read from the config file and
    /// resolved, or why it could not.
    FileReloaded(Result<(Box<Config>, Vec<Vec<SocketAddr>>), Error>),
    /// A closure hook's ticket was answered.
    HookDone(HookId, HookExit),
}

/// How the loop relates to its process.
#[derive(Clone, Debug, Default)]
pub(crate) struct ShellOptions {
    /// SIGTERM/SIGINT stop, SIGHUP reloads, SIGUSR1 dumps state.
    pub handle_signals: bool,
    /// The command line the config came from, for SIGHUP reloads.
    pub reload_args: Option<RawArgs>,
    /// Talk to systemd: notifications, the watchdog, socket activation.
    pub service_manager: bool,
}

/// The poll's wait until `deadline` (ms on the loop's clock), rounded up so a
/// deadline never wakes the loop a millisecond early.
fn until(now: u64, deadline: u64) -> Duration {
    Duration::from_millis(deadline.saturating_sub(now).saturating_add(1))
}

/// The sooner of the poll's `timeout` (`None`: none yet) and `wait`.
fn sooner(timeout: Option<Duration>, wait: Duration) -> Option<Duration> {
    Some(timeout.map_or(wait, |t| t.min(wait)))
}

/// Whether a connect to `upstream` would reach the listener bound at
/// `listening` (the same port, and the same address or a wildcard bind).
fn is_own_listener(listening: SocketAddr, upstream: SocketAddr) -> bool {
    listening.port() == upstream.port()
        && (listening.ip() == upstream.ip()
            || listening.ip().is_unspecified() && upstream.ip().is_loopback())
}

/// The core's policy knobs, from a validated config; its hooks are named in
/// `hooks`, its service command in `services`.
fn core_settings(config: &Config, hooks: &mut HookTable, services: &mut ServiceTable) -> Settings {
    let (on_activate, on_timeout) = hooks.update(config);
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let service = services.update(config).map(|run| ServiceSettings {
        run,
        ready_timeout_ms: ms(config.ready_timeout),
        restart_after: (config.restart_after > 0).then_some(config.restart_after),
        restart_rss_kib: (config.restart_rss > 0).then(|| (config.restart_rss / 1024).max(1)),
        max_lifetime_ms: config.max_lifetime.map(ms),
        restart_on: config.restart_on,
        idle_stop_ms: config.idle_stop.map(ms),
        stop_timeout_ms: ms(config.stop_timeout),
        start_retries: config.start_retries,
    });
    Settings {
        permits: config.permits,
        max_queue: config.max_queue,
        ttl_ms: config.ttl.map(ms),
        queue_timeout_ms: config.queue_timeout.map(ms),
        connect_timeout_ms: config.connect_timeout.map(ms),
        on_activate,
        on_timeout,
        hook_timeout_ms: config.hook_timeout.map(ms),
        shutdown_grace_ms: ms(config.shutdown_grace),
        upstreams: config.upstreams.iter().map(ToString::to_string).collect(),
        drop_queued_eof: config.queued_eof == QueuedEof::Drop,
        serve_queue_on_shutdown: config.shutdown_queue == ShutdownQueue::Serve,
        stall_warn_ms: config.stall_warn.map(ms),
        proxy_header_timeout_ms: config
            .accept_proxy
            .then(|| ms(config::PROXY_HEADER_TIMEOUT)),
        service,
    }
}

/// The loop and everything it owns.
pub(crate) struct Shell {
    poll: Poll,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    /// `None` until a signal is to be watched: a library that leaves signals
    /// to its host installs no handler at all.
    signals: Option<Signals>,
    /// Hooks are watched by pidfds; once the kernel refuses them, by SIGCHLD.
    pidfds_available: bool,
    /// PID 1 of a pid namespace (a container's entrypoint) inherits every
    /// orphan and must reap them all, or each one stays a zombie.
    reaps_orphans: bool,
    options: ShellOptions,
    waker: Arc<Waker>,
    control_tx: Sender<Control>,
    control_rx: Receiver<Control>,
    stats: Arc<Mutex<Stats>>,
    core: Core,
    /// Sockets per core slab slot; each entry remembers which connection it is.
    io: Vec<Option<ConnIo>>,
    pool: ChannelPool,
    logger: Logger,
    /// The poll wakes us when stderr has room; otherwise waiting log lines
    /// are retried every [`LOG_RETRY`].
    log_watched: bool,
    /// Each instance's addresses, by its number; shared with each
    /// connecting client, which keeps walking the list it started on when a
    /// reload swaps it.
    upstreams: Upstreams,
    /// Counts poll returns: a socket made in this turn had no part in the
    /// events of this turn, which belong to the one its token named before.
    turn: u64,
    /// Hooks the core waits for: at most one per instance.
    running_hooks: Vec<RunningHook>,
    hooks: HookTable,
    /// `--spawn`: the service's command, process and probe.
    service: ServiceIo,
    /// The service's and the running hook's output pipes.
    outputs: Outputs,
    config: Config,
    started: Instant,
    /// What activation needs kept free, and how much there is.
    fds: FdBudget,
    /// A pause at the reserve was logged and the backlog has not been
    /// emptied since: each close lets one more client in and pauses again,
    /// which is worth one warning, not one per client.
    reserve_pause_logged: bool,
    /// The listener may hold more connections than the last batch took.
    accept_more: bool,
    /// A SIGHUP reload's helper thread is loading and resolving.
    reload_running: bool,
    /// Another SIGHUP came meanwhile: reload again once it is done, with one
    /// thread at a time however many signals arrive.
    reload_again: bool,
    /// Relays that used up their turn and must be pumped again, each once
    /// (see [`Relay::scheduled`]); each turn takes those queued before it.
    busy_relays: VecDeque<ConnRef>,
    /// systemd's notification socket, if it gave one.
    notify: Notifier,
    /// `--control`: the control socket and its connections.
    control: Option<control::ControlServer>,
    /// Reload threads started so far: a `reload` command waits for the
    /// one that started after it.
    reloads_started: u64,
    /// `--metrics`: the HTTP server and what only the shell counts; `None`
    /// (and nothing recorded) without it.
    metrics: Option<Box<metrics::Metrics>>,
}

struct Connecting {
    upstream: TcpStream,
    upstream_ready: Readiness,
    /// The addresses as they were when connecting began.
    addrs: Arc<[SocketAddr]>,
    /// The next upstream address to try if this one fails.
    next_addr: usize,
    /// The loop turn this socket was made in.
    since_turn: u64,
}

struct ConnIo {
    conn: ConnRef,
    client: TcpStream,
    client_ready: Readiness,
    /// `--accept-proxy`: the client its PROXY header named, for a
    /// `--send-proxy` header of ours; `None` for the balancer's own.
    /// Boxed: most connections have none, and every queued client pays for
    /// each byte here.
    proxied_client: Option<Box<SocketAddr>>,
    stage: Stage,
}

enum Stage {
    /// `--accept-proxy`: reading the PROXY header, before the queue.
    Header,
    /// Queued or running its hook: the client is only watched for leaving.
    Waiting,
    /// Boxed: every connection's entry is as large as its largest stage, and
    /// most entries wait in the queue.
    Connecting(Box<Connecting>),
    Relaying(Box<Relay>),
}

impl Shell {
    /// Binds the listener, resolves the upstream and sets up the poll.
    pub(crate) fn start(config: Config, options: ShellOptions) -> Result<Shell, Error> {
        // First, before any descriptor of ours could take the number 3.
        let activated = match options.service_manager {
            true => notify::activated_listener()?,
            false => None,
        };
        let mut logger = Logger::new(config.log_level);
        let fd_limit = match sys::raise_open_files_limit() {
            Ok(limit) => Some(limit),
            Err(e) => {
                if let Some(line) = logger.line(LogLevel::Warn, "nofile_limit") {
                    line.field("error", e);
                }
                None
            }
        };
        let io_error = |context| move |source| Error::Io { context, source };
        let notify = match options.service_manager {
            true => Notifier::from_env(&mut logger)?,
            false => Notifier::disabled(),
        };
        let activated_socket = activated.is_some();
        let resolved;
        let (mut listener, local_addr) = match activated {
            // The unit's `Backlog=` stands.
            Some(listener) => {
                resolved = resolve_upstreams(&config)?;
                let local_addr = listener
                    .local_addr()
                    .map_err(io_error("socket activation: fd 3 has no address"))?;
                (listener, local_addr)
            }
            None => {
                if config.listen.is_empty() {
                    return Err(Error::Invalid(
                        "no listen address: give -l PORT (or start tcplock by socket activation)"
                            .into(),
                    ));
                }
                // `resolve` never returns an empty list, so the first address exists.
                let listen_addr = resolve(
                    "listen address",
                    &config.listen,
                    config.listen.to_socket_addrs(),
                )?[0];
                resolved = resolve_upstreams(&config)?;
                let listener = TcpListener::bind(listen_addr).map_err(|source| Error::Bind {
                    addr: listen_addr,
                    source,
                })?;
                let local_addr = listener.local_addr().unwrap_or(listen_addr);
                if let Err(e) = sys::set_listen_backlog(listener.as_fd(), LISTEN_BACKLOG)
                    && let Some(line) = logger.line(LogLevel::Warn, "backlog_failed")
                {
                    line.field("error", e);
                }
                (listener, local_addr)
            }
        };
        for (index, (upstream, addrs)) in config.upstreams.iter().zip(&resolved).enumerate() {
            if let Some(own) = addrs
                .iter()
                .find(|addr| is_own_listener(local_addr, **addr))
            {
                // Every client would be proxied back to tcplock itself, and a
                // spawned service's probe would find its port busy forever.
                return Err(Error::Invalid(format!(
                    "upstream {upstream} (instance {}) resolves to {own}, tcplock's own listening address",
                    index + 1
                )));
            }
        }
        // Accepted sockets inherit it: one syscall instead of one per client.
        if let Err(e) = sys::set_tcp_nodelay(listener.as_fd())
            && let Some(line) = logger.line(LogLevel::Warn, "nodelay_failed")
        {
            line.field("error", e);
        }
        let poll = Poll::new().map_err(io_error("cannot create the poll"))?;
        // Before the descriptor count at start, which then includes it.
        let metrics = metrics::Metrics::start(&config, &poll, &mut logger)?;
        // Edge-triggered: one wake-up each time a stalled stderr gains room.
        let log_watched = logger.watch_fd().is_some_and(|fd| {
            poll.registry()
                .register(&mut SourceFd(&fd), LOG_SINK, Interest::WRITABLE)
                .is_ok()
        });
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(io_error("cannot register the listener"))?;
        let control = match &config.control {
            Some(path) => Some(control::ControlServer::bind(path, &poll)?),
            None => None,
        };
        let reaps_orphans = sys::is_pid_one();
        let mut watched = Vec::new();
        if options.handle_signals {
            watched.extend([SIGHUP, SIGTERM, SIGINT, SIGUSR1]);
        }
        if reaps_orphans {
            watched.push(SIGCHLD);
        }
        let signals = if watched.is_empty() {
            None
        } else {
            Some(
                watch_signals(&poll, &watched)
                    .map_err(io_error("cannot install signal handlers"))?,
            )
        };
        let waker = Arc::new(
            Waker::new(poll.registry(), CONTROL).map_err(io_error("cannot create the waker"))?,
        );
        let (control_tx, control_rx) = mpsc::channel();
        let fds = FdBudget::new(fd_limit);
        let mut hooks = HookTable::default();
        let mut service = ServiceIo::default();
        let mut settings = core_settings(&config, &mut hooks, &mut service.table);
        settings.max_queue = fds.adjusted_max_queue(&config, &mut logger);
        let core = Core::new(settings, 0);
        let mut upstreams = Upstreams::default();
        upstreams.update(
            config
                .upstreams
                .iter()
                .map(ToString::to_string)
                .zip(resolved),
            &core.stats().instances,
        );
        if let Some(line) = logger.line(LogLevel::Info, "listening") {
            line.field("addr", local_addr)
                .field("upstream", config.first_upstream())
                .field("permits", config.permits)
                .field_opt("socket", activated_socket.then_some("systemd"));
        }
        {
            // Not yet in the loop, which blocks SIGPIPE: see `Logger` at exit.
            let _sigpipe = sys::block_sigpipe();
            logger.flush();
        }
        Ok(Shell {
            poll,
            listener: Some(listener),
            local_addr,
            signals,
            pidfds_available: true,
            reaps_orphans,
            options,
            waker,
            control_tx,
            control_rx,
            stats: Arc::new(Mutex::new(Stats::default())),
            core,
            io: Vec::new(),
            pool: ChannelPool::new(config.buffer_size, config.splice),
            logger,
            log_watched,
            upstreams,
            turn: 0,
            running_hooks: Vec::new(),
            hooks,
            service,
            outputs: Outputs::default(),
            config,
            started: Instant::now(),
            fds,
            reserve_pause_logged: false,
            reload_running: false,
            reload_again: false,
            accept_more: false,
            busy_relays: VecDeque::new(),
            notify,
            control,
            reloads_started: 0,
            metrics,
        })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn handle(&self) -> Handle {
        Handle {
            control: self.control_tx.clone(),
            waker: Arc::clone(&self.waker),
            stats: Arc::clone(&self.stats),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Runs until a shutdown completes.
    pub(crate) fn run(&mut self) -> Result<(), Error> {
        let _sigpipe = match sys::block_sigpipe() {
            Ok(guard) => Some(guard),
            Err(e) => {
                if let Some(line) = self.logger.line(LogLevel::Warn, "sigpipe_unblocked") {
                    line.field("error", e);
                }
                None
            }
        };
        let mut events = Events::with_capacity(1024);
        // With `--spawn` the core asked for its first start when it was made.
        self.supervise();
        let now = self.now();
        self.drain(now);
        self.logger.flush();
        let counts = self.notify_counts();
        self.notify.ready(self.now(), counts, &mut self.logger);
        loop {
            let metrics_busy = self.metrics.as_ref().is_some_and(|m| m.wants_turn());
            let mut timeout = if self.accept_more || !self.busy_relays.is_empty() || metrics_busy {
                Some(Duration::ZERO)
            } else {
                self.core
                    .poll_timeout()
                    .map(|deadline| until(self.now(), deadline))
            };
            if let Some(deadline) = self.control_deadline() {
                let wait = Duration::from_millis(deadline.saturating_sub(self.now()));
                timeout = sooner(timeout, wait);
            }
            if let Some(deadline) = self.metrics.as_ref().and_then(|m| m.next_deadline()) {
                timeout = sooner(timeout, until(self.now(), deadline));
            }
            if self.logger.has_pending() && !self.log_watched {
                timeout = sooner(timeout, LOG_RETRY);
            }
            timeout = self.service_timeout(self.now(), timeout);
            timeout = self.notify_timeout(timeout);
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Io {
                        context: "event loop failed",
                        source,
                    });
                }
            }
            let now = self.now();
            self.turn += 1;
            let mut signalled = false;
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_more = true,
                    SIGNALS => signalled = true,
                    HOOK_EXIT => self.reap(now),
                    control::CONTROL_LISTENER => self.control_accept(now),
                    Token(token)
                        if (control::FIRST_CONTROL_TOKEN
                            ..control::FIRST_CONTROL_TOKEN + control::MAX_CONTROL_CONNS)
                            .contains(&token) =>
                    {
                        let slot = token - control::FIRST_CONTROL_TOKEN;
                        self.control_ready(now, slot, event.is_write_closed());
                    }
                    METRICS_LISTENER => self.metrics_listener_ready(),
                    Token(token) if METRICS_CONNS.contains(&token) => {
                        self.metrics_conn_ready(Token(token));
                    }
                    Token(token) if token >= service::FIRST_SERVICE_TOKEN => {
                        self.service_event(now, token, SocketEvent::of(event));
                    }
                    Token(token) if token >= FIRST_CONN_TOKEN => {
                        let slot = (token - FIRST_CONN_TOKEN) / 2;
                        let upstream_side = (token - FIRST_CONN_TOKEN) % 2 == 1;
                        self.conn_ready(now, slot, upstream_side, SocketEvent::of(event));
                    }
                    _ => {}
                }
            }
            if signalled {
                self.handle_signals(now);
            }
            // Cheap when empty, and a wake-up can race with the poll.
            self.handle_control(now);
            // A relay taken off the list and still busy goes back at its end,
            // so the list never holds more than one entry per relay.
            for _ in 0..self.busy_relays.len() {
                let Some(conn) = self.busy_relays.pop_front() else {
                    break;
                };
                if let Some(Stage::Relaying(relay)) = self.io_of(conn).map(|io| &mut io.stage) {
                    relay.scheduled = false;
                }
                self.pump(now, conn);
            }
            if self.accept_more {
                self.accept(now);
            }
            if self.outputs.more {
                self.read_outputs();
            }
            self.expire_probe(now);
            self.core.handle_tick(now);
            self.drain(now);
            self.close_outputs();
            self.control_tick(now);
            self.metrics_turn(now);
            self.logger.flush();
            self.publish_stats();
            let counts = self.notify_counts();
            self.notify.turn_end(now, counts, &mut self.logger);
            if self.core.is_finished() {
                return Ok(());
            }
        }
    }

    /// Performs the core's actions until it has none left.
    fn drain(&mut self, now: u64) {
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Connect { conn, instance } => self.connect(now, conn, instance),
                Action::AbandonConnect(conn) => self.abandon_connect(conn),
                Action::ConnectNext(conn) => {
                    let timed_out = io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no answer within its share of the connect timeout",
                    );
                    self.connect_next(now, conn, Some(timed_out));
                }
                Action::StartRelay(conn) => self.start_relay(now, conn),
                Action::Close {
                    conn,
                    outcome,
                    ended_by,
                    age_ms,
                } => self.close(now, conn, outcome, ended_by, age_ms),
                Action::SpawnHook(request) => self.spawn_hook(now, &request),
                Action::KillHook(hook) => self.kill_hook(now, hook),
                Action::StopAccepting => {
                    self.notify.stopping(&mut self.logger);
                    self.control_fail_waiters(now, false, "stopping");
                    self.stop_accepting();
                }
                Action::ResumeAccepting => self.accept_more = true,
                Action::Log(event) => {
                    if let Some(metrics) = &mut self.metrics {
                        metrics.recorder.event(&event);
                    }
                    self.logger.event(&event);
                }
                Action::ReportIdle => {
                    let idle_ms = self.holders_idle_ms(now);
                    self.core.handle_holders_idle(now, idle_ms);
                }
                Action::ProbeUpstream {
                    instance,
                    generation,
                } => self.probe_upstream(now, instance, generation),
                Action::SpawnService {
                    generation,
                    instance,
                    reason,
                    run,
                } => self.spawn_service(now, instance, generation, reason, run),
                Action::SampleService {
                    instance,
                    generation,
                } => self.sample_service(now, instance, generation),
                Action::SignalService {
                    instance,
                    generation,
                    signal,
                } => self.signal_service(instance, generation, signal),
            }
        }
    }

    fn io_of(&mut self, conn: ConnRef) -> Option<&mut ConnIo> {
        self.io
            .get_mut(conn.slot())
            .and_then(Option::as_mut)
            .filter(|io| io.conn == conn)
    }

    fn publish_stats(&self) {
        match self.stats.lock() {
            Ok(mut published) => self.core.write_stats(&mut published),
            Err(poisoned) => self.core.write_stats(&mut poisoned.into_inner()),
        }
    }
}
