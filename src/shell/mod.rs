//! The mio loop around the core: it turns readiness, signals and child exits
//! into core inputs and performs the core's actions. It holds no policy: who goes
//! next, when, and what ends is decided by [`crate::core::Core`].

mod buffer;
mod hooks;
mod log;
mod relay;

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::signal::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook_mio::v1_0::Signals;

use crate::api::error::Error;
use crate::api::hook::{Hook, HookBody, Reply, Ticket, TimeoutInfo};
use crate::api::lock::Handle;
use crate::config::{self, Config, LogLevel, QueuedEof, RawArgs};
use crate::core::{
    Action, ConnRef, Core, EndedBy, HookContext, HookExit, HookId, HookRequest, Outcome, Settings,
    Stats,
};
use crate::sys;
use log::{CommaList, Logger};

use hooks::{HookProcess, HookTable};
use relay::{ChannelPool, Pumped, Readiness, Relay, SocketEvent};

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
/// Messages from handles and tickets on other threads.
const CONTROL: Token = Token(2);
/// The running hook's pidfd: readable once it has exited.
const HOOK_EXIT: Token = Token(3);
/// stderr has room again for log lines that waited.
const LOG_SINK: Token = Token(4);
/// How often lines waiting for a stderr the poll cannot watch are retried.
const LOG_RETRY: Duration = Duration::from_millis(100);
/// Connection tokens start here: two per slab slot, client then upstream.
const FIRST_CONN_TOKEN: usize = 16;
/// Accept at most this many connections per loop turn, so a flood cannot starve
/// the connections already in flight.
const ACCEPT_BATCH: usize = 256;
/// The kernel's accept backlog: deep, because a burst of clients is exactly
/// what a queueing proxy exists for.
const LISTEN_BACKLOG: i32 = 4096;
/// Descriptors one permit needs beyond its client: the upstream socket and a
/// splice pipe (two descriptors) per direction.
const FDS_PER_PERMIT: usize = 5;
/// Descriptors spawning one hook process needs: the stdout duplicate,
/// /dev/null, the exec-status pipe std uses while spawning, and a pidfd.
const FDS_PER_HOOK: usize = 5;
/// Kept free for the listening and control sockets later features add.
const FDS_SPARE: usize = 4;
/// Assumed open at start where /proc cannot tell: the standard streams, the
/// listener, the poll, the signal pipe and the waker, generously rounded.
const FDS_AT_START_UNKNOWN: usize = 16;

/// What other threads ask of the loop, through a channel and a waker.
pub(crate) enum Control {
    Stop,
    /// New settings with their upstream already resolved.
    Reload(Box<Config>, Vec<SocketAddr>),
    /// What a SIGHUP reload's helper thread read from the config file and
    /// resolved, or why it could not.
    FileReloaded(Result<(Box<Config>, Vec<SocketAddr>), Error>),
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
}

/// The core's policy knobs, from a validated config; its hooks are named in
/// `hooks`.
fn core_settings(config: &Config, hooks: &mut HookTable) -> Settings {
    let (on_activate, on_timeout) = hooks.update(config);
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
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
        upstream: config.upstream.to_string(),
        drop_queued_eof: config.queued_eof == QueuedEof::Drop,
    }
}

/// Resolves the upstream once (never inside the loop's hot path).
pub(crate) fn resolve_upstream(config: &Config) -> Result<Vec<SocketAddr>, Error> {
    let upstream = &config.upstream;
    resolve(
        "upstream",
        &upstream.to_string(),
        (upstream.host.as_str(), upstream.port).to_socket_addrs(),
    )
}

/// Every address a lookup gave, or an error naming `what` and `name`; an empty
/// answer is an error too.
fn resolve(
    what: &'static str,
    name: &str,
    lookup: io::Result<std::vec::IntoIter<SocketAddr>>,
) -> Result<Vec<SocketAddr>, Error> {
    let resolve_error = |source| Error::Resolve {
        what,
        name: name.to_string(),
        source,
    };
    let addrs: Vec<SocketAddr> = lookup.map_err(resolve_error)?.collect();
    if addrs.is_empty() {
        return Err(resolve_error(io::Error::new(
            io::ErrorKind::NotFound,
            "no addresses",
        )));
    }
    Ok(addrs)
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
    upstream_addrs: Vec<SocketAddr>,
    hook: Option<RunningHook>,
    hooks: HookTable,
    config: Config,
    started: Instant,
    /// Out of file descriptors (or at the reserve): wait for the core's
    /// `ResumeAccepting` (after a close or a retry backoff) before accepting
    /// again.
    accept_paused: bool,
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
    /// (see [`Relay::scheduled`]).
    busy_relays: Vec<ConnRef>,
    /// The list being worked through this turn; swapped with `busy_relays` so
    /// neither is ever reallocated in steady state.
    busy_now: Vec<ConnRef>,
}

/// The descriptors tcplock may use, and how many of them activating needs
/// kept free. Open descriptors are counted without a system call: those
/// open at start, plus one per client, plus idle pipes. What an activation
/// opens (upstream sockets, pipes in use, a hook) is in the reserve.
struct FdBudget {
    /// The soft limit at start; `None` if it could not be read (then only
    /// EMFILE pauses accepting).
    limit: Option<usize>,
    /// Descriptors open once the loop was set up.
    baseline: usize,
}

impl FdBudget {
    /// Descriptors activating needs kept free under `config`: the permits
    /// that fit next to their clients, one hook if a command hook is
    /// configured, and a few spare.
    fn reserve(&self, config: &Config) -> usize {
        let is_command = |hook: &Option<Hook>| hook.as_ref().and_then(Hook::as_command).is_some();
        let hook = if is_command(&config.on_activate) || is_command(&config.on_timeout) {
            FDS_PER_HOOK
        } else {
            0
        };
        let fixed = hook + FDS_SPARE;
        let room = self
            .limit
            .unwrap_or(usize::MAX)
            .saturating_sub(self.baseline + fixed);
        // More permits than the limit can hold would keep every client out.
        let permits = (config.permits as usize).min(room / (FDS_PER_PERMIT + 1));
        permits * FDS_PER_PERMIT + fixed
    }

    /// The most clients the limit holds beside the reserve, if it is known.
    fn client_capacity(&self, config: &Config) -> Option<usize> {
        let limit = self.limit?;
        Some(limit.saturating_sub(self.baseline + self.reserve(config)))
    }

    /// `--max-queue`, lowered (and said so) to the clients the limit can hold
    /// beside the reserve. Accepting pauses at that many clients, so a full
    /// queue makes clients wait in the kernel's backlog rather than be
    /// rejected for descriptors tcplock lacks.
    fn adjusted_max_queue(&self, config: &Config, logger: &mut Logger) -> usize {
        let fits = self.client_capacity(config);
        match (fits, self.limit) {
            (Some(fits), Some(limit)) if fits < config.max_queue => {
                if let Some(line) = logger.line(LogLevel::Warn, "limit_adjusted") {
                    line.field("max_queue", fits).field("nofile", limit);
                }
                fits
            }
            _ => config.max_queue,
        }
    }
}

struct ConnIo {
    conn: ConnRef,
    client: TcpStream,
    client_ready: Readiness,
    stage: Stage,
}

/// The hook the core waits for.
struct RunningHook {
    id: HookId,
    started: Instant,
    /// `None` for a closure hook (its ticket is still out).
    process: Option<HookProcess>,
}

enum Stage {
    /// Queued or running its hook: the client is only watched for leaving.
    Waiting,
    Connecting {
        upstream: TcpStream,
        upstream_ready: Readiness,
        /// The next upstream address to try if this one fails.
        next_addr: usize,
    },
    Relaying(Box<Relay>),
}

impl Shell {
    /// Binds the listener, resolves the upstream and sets up the poll.
    pub(crate) fn start(config: Config, options: ShellOptions) -> Result<Shell, Error> {
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
        // `resolve` never returns an empty list, so the first address exists.
        let listen_addr = resolve(
            "listen address",
            &config.listen,
            config.listen.to_socket_addrs(),
        )?[0];
        let upstream_addrs = resolve_upstream(&config)?;
        let io_error = |context| move |source| Error::Io { context, source };
        let mut listener = TcpListener::bind(listen_addr).map_err(|source| Error::Bind {
            addr: listen_addr,
            source,
        })?;
        let local_addr = listener.local_addr().unwrap_or(listen_addr);
        if let Err(e) = sys::set_listen_backlog(listener.as_fd(), LISTEN_BACKLOG)
            && let Some(line) = logger.line(LogLevel::Warn, "backlog_failed")
        {
            line.field("error", e);
        }
        // Accepted sockets inherit it: one syscall instead of one per client.
        if let Err(e) = sys::set_tcp_nodelay(listener.as_fd())
            && let Some(line) = logger.line(LogLevel::Warn, "nodelay_failed")
        {
            line.field("error", e);
        }
        let poll = Poll::new().map_err(io_error("cannot create the poll"))?;
        // Edge-triggered: one wake-up each time a stalled stderr gains room.
        let log_watched = logger.watch_fd().is_some_and(|fd| {
            poll.registry()
                .register(&mut SourceFd(&fd), LOG_SINK, Interest::WRITABLE)
                .is_ok()
        });
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(io_error("cannot register the listener"))?;
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
        let fds = FdBudget {
            limit: fd_limit.and_then(|limit| usize::try_from(limit).ok()),
            baseline: sys::count_open_fds().unwrap_or(FDS_AT_START_UNKNOWN),
        };
        let mut hooks = HookTable::default();
        let mut settings = core_settings(&config, &mut hooks);
        settings.max_queue = fds.adjusted_max_queue(&config, &mut logger);
        if let Some(line) = logger.line(LogLevel::Info, "listening") {
            line.field("addr", local_addr)
                .field("upstream", &config.upstream)
                .field("permits", config.permits);
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
            core: Core::new(settings, 0),
            io: Vec::new(),
            pool: ChannelPool::new(config.buffer_size, config.splice),
            logger,
            log_watched,
            upstream_addrs,
            hook: None,
            hooks,
            config,
            started: Instant::now(),
            accept_paused: false,
            fds,
            reserve_pause_logged: false,
            reload_running: false,
            reload_again: false,
            accept_more: false,
            busy_relays: Vec::new(),
            busy_now: Vec::new(),
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
        loop {
            let mut timeout = if self.accept_more || !self.busy_relays.is_empty() {
                Some(Duration::ZERO)
            } else {
                self.core
                    .poll_timeout()
                    // Round up so a deadline never wakes us a millisecond early.
                    .map(|deadline| {
                        Duration::from_millis(deadline.saturating_sub(self.now()).saturating_add(1))
                    })
            };
            if self.logger.has_pending() && !self.log_watched {
                timeout = Some(timeout.map_or(LOG_RETRY, |t| t.min(LOG_RETRY)));
            }
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
            let mut signalled = false;
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_more = true,
                    SIGNALS => signalled = true,
                    HOOK_EXIT => self.reap(now),
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
            std::mem::swap(&mut self.busy_now, &mut self.busy_relays);
            for index in 0..self.busy_now.len() {
                let conn = self.busy_now[index];
                if let Some(Stage::Relaying(relay)) = self.io_of(conn).map(|io| &mut io.stage) {
                    relay.scheduled = false;
                }
                self.pump(now, conn);
            }
            self.busy_now.clear();
            if self.accept_more {
                self.accept(now);
            }
            self.core.handle_tick(now);
            self.drain(now);
            self.logger.flush();
            self.publish_stats();
            if self.core.is_finished() {
                return Ok(());
            }
        }
    }

    // ----- readiness -----

    fn accept(&mut self, now: u64) {
        self.accept_more = false;
        if self.accept_paused {
            return;
        }
        for _ in 0..ACCEPT_BATCH {
            if self.listener.is_none() {
                return;
            }
            if self.at_fd_reserve() {
                if self.pool.drop_idle_pipes() {
                    continue;
                }
                self.pause_accepting(now, "fd_reserve", None);
                return;
            }
            let Some(listener) = &self.listener else {
                return;
            };
            let (client, addr) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.reserve_pause_logged = false;
                    return;
                }
                Err(e) if sys::is_fd_exhaustion(&e) => {
                    if self.pool.drop_idle_pipes() {
                        continue;
                    }
                    self.pause_accepting(now, "fd_exhausted", Some(e));
                    return;
                }
                // These concern one client, not the listener.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                // Anything else would only repeat at once: say so and wait for
                // the next connection's readiness edge instead of spinning.
                Err(e) => {
                    if let Some(line) = self.logger.line(LogLevel::Error, "accept_failed") {
                        line.field("error", e);
                    }
                    return;
                }
            };
            let conn = self.core.handle_accepted(now, addr);
            self.add_conn(now, conn, client);
            self.drain(now);
        }
        self.accept_more = true;
    }

    /// Whether one more client would eat into the descriptors activation needs.
    fn at_fd_reserve(&self) -> bool {
        let Some(limit) = self.fds.limit else {
            return false;
        };
        let open = self.fds.baseline + self.core.conn_count() + self.pool.idle_pipe_fds();
        open + 1 + self.fds.reserve(&self.config) > limit
    }

    fn pause_accepting(&mut self, now: u64, reason: &str, error: Option<io::Error>) {
        self.accept_paused = true;
        let level = if error.is_none() && self.reserve_pause_logged {
            LogLevel::Debug
        } else {
            LogLevel::Warn
        };
        self.reserve_pause_logged |= error.is_none();
        if let Some(line) = self.logger.line(level, "accept_paused") {
            line.field("reason", reason)
                .field_opt("error", error)
                .field("open_connections", self.core.conn_count());
        }
        self.core.handle_accept_paused(now);
        self.drain(now);
    }

    fn add_conn(&mut self, now: u64, conn: ConnRef, mut client: TcpStream) {
        let token = client_token(conn);
        // Both interests from the start, so relaying needs no re-registration:
        // one epoll_ctl per socket for its whole life.
        if let Err(e) = self.poll.registry().register(
            &mut client,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            if let Some(line) = self.logger.line(LogLevel::Error, "register_failed") {
                line.field("conn", conn.id()).field("error", e);
            }
            self.core.handle_client_left(now, conn);
            return;
        }
        if self.io.len() <= conn.slot() {
            self.io.resize_with(conn.slot() + 1, || None);
        }
        self.io[conn.slot()] = Some(ConnIo {
            conn,
            client,
            client_ready: Readiness::default(),
            stage: Stage::Waiting,
        });
    }

    fn conn_ready(&mut self, now: u64, slot: usize, upstream_side: bool, ready: SocketEvent) {
        let Some(io) = self.io.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let conn = io.conn;
        if !upstream_side {
            io.client_ready.note(ready);
        }
        match &mut io.stage {
            Stage::Relaying(relay) => {
                if upstream_side {
                    relay.note_upstream_ready(ready);
                }
                self.pump(now, conn);
            }
            Stage::Connecting {
                upstream,
                upstream_ready,
                ..
            } if upstream_side => {
                upstream_ready.note(ready);
                match connect_result(upstream, ready) {
                    ConnectResult::Pending => {}
                    ConnectResult::Connected => {
                        self.core.handle_upstream_connected(now, conn);
                        self.drain(now);
                    }
                    ConnectResult::Failed(e) => {
                        self.connect_next(now, conn, e);
                        self.drain(now);
                    }
                }
            }
            Stage::Waiting | Stage::Connecting { .. } => {
                // Plain bytes from a waiting client only wait for activation;
                // only a close or a failure needs a look at whether it left.
                if !upstream_side && ready.closing {
                    match waiting_client(&io.client) {
                        WaitingClient::Present => {}
                        WaitingClient::Gone => self.core.handle_client_left(now, conn),
                        WaitingClient::EndOfStream => self.core.handle_client_eof(now, conn),
                    }
                    self.drain(now);
                }
            }
        }
    }

    fn pump(&mut self, now: u64, conn: ConnRef) {
        let Some(io) = self
            .io
            .get_mut(conn.slot())
            .and_then(Option::as_mut)
            .filter(|io| io.conn == conn)
        else {
            return;
        };
        let Stage::Relaying(relay) = &mut io.stage else {
            return;
        };
        let pumped = relay.pump(&io.client, &mut io.client_ready, &mut self.pool);
        if let Some(error) = self.pool.take_splice_refusal()
            && let Some(line) = self.logger.line(LogLevel::Warn, "splice_refused")
        {
            line.field("error", error).field("relay", "copying");
        }
        match pumped {
            Pumped::Idle => {}
            Pumped::Busy => {
                if !relay.scheduled {
                    relay.scheduled = true;
                    debug_assert!(
                        !self.busy_relays.contains(&conn),
                        "conn {} is on the busy list twice",
                        conn.id()
                    );
                    self.busy_relays.push(conn);
                }
            }
            Pumped::Ended(end) => {
                self.core.handle_relay_ended(now, conn, end);
                self.drain(now);
            }
        }
    }

    fn handle_signals(&mut self, now: u64) {
        // Drain the self-pipe first, then act: signals coalesce, and one
        // SIGCHLD may stand for several exits.
        let Some(signals) = &mut self.signals else {
            return;
        };
        let pending: Vec<i32> = signals.pending().collect();
        for signal in pending {
            match signal {
                SIGCHLD => {
                    self.reap(now);
                    self.reap_orphans(now);
                }
                SIGHUP => self.reload(),
                SIGTERM | SIGINT => self.core.handle_shutdown(now),
                SIGUSR1 => self.core.handle_dump_state(now),
                _ => {}
            }
            self.drain(now);
        }
    }

    fn reap(&mut self, now: u64) {
        let Some(RunningHook {
            id,
            process: Some(process),
            ..
        }) = &mut self.hook
        else {
            return;
        };
        let exit = match process.try_reap() {
            Ok(Some(exit)) => exit,
            Ok(None) => return,
            Err(e) => HookExit::SpawnFailed(format!("wait failed: {e}")),
        };
        let hook = *id;
        self.hook_ended(now, hook, exit);
    }

    /// As PID 1: reaps every exited child that is not a pidfd-watched hook
    /// (those exit without SIGCHLD and are not taken here). A hook started
    /// without a pidfd may be among them: its status goes to the hook.
    fn reap_orphans(&mut self, now: u64) {
        if !self.reaps_orphans {
            return;
        }
        while let Some((pid, status)) = sys::reap_any_child() {
            let hook = match &self.hook {
                Some(RunningHook {
                    id,
                    process: Some(process),
                    ..
                }) if process.pid == pid => *id,
                _ => continue,
            };
            self.hook_ended(now, hook, hooks::exit_of_raw(status));
        }
    }

    /// The one way a running hook ends, whatever kind it is: it is forgotten,
    /// logged, and reported to the core. An end for a hook that is not the
    /// running one (a ticket answered after it was abandoned) is ignored.
    fn hook_ended(&mut self, now: u64, hook: HookId, exit: HookExit) {
        let Some(run) = self.hook.take_if(|run| run.id == hook) else {
            return;
        };
        if let Some(line) = self.logger.line(LogLevel::Info, "hook_exited") {
            line.field("hook", hook)
                .field_opt("pid", run.process.as_ref().map(|p| p.pid))
                .field("status", &exit)
                .field("duration_ms", run.started.elapsed().as_millis());
        }
        self.core.handle_hook_exited(now, hook, exit);
    }

    fn handle_control(&mut self, now: u64) {
        while let Ok(control) = self.control_rx.try_recv() {
            match control {
                Control::Stop => self.core.handle_shutdown(now),
                Control::Reload(config, upstream_addrs) => {
                    self.apply_config(now, *config, upstream_addrs, ("source", "handle"));
                }
                Control::FileReloaded(loaded) => self.file_reloaded(now, loaded),
                Control::HookDone(hook, exit) => self.hook_ended(now, hook, exit),
            }
            self.drain(now);
        }
    }

    fn publish_stats(&self) {
        let stats = self.core.stats();
        match self.stats.lock() {
            Ok(mut published) => *published = stats,
            Err(poisoned) => *poisoned.into_inner() = stats,
        }
    }

    /// SIGHUP: re-reads the config file and looks the upstream up again
    /// (a host may have moved even if its name did not) on a helper thread,
    /// so a slow resolver never stalls the loop. The answer comes back as
    /// `Control::FileReloaded`.
    fn reload(&mut self) {
        let (Some(path), Some(args)) = (
            self.config.config_file.as_ref(),
            self.options.reload_args.as_ref(),
        ) else {
            if let Some(line) = self.logger.line(LogLevel::Warn, "reload_skipped") {
                line.field("reason", "no config file given with -c");
            }
            return;
        };
        if self.reload_running {
            self.reload_again = true;
            return;
        }
        let args = args.clone();
        let control = self.control_tx.clone();
        let waker = Arc::clone(&self.waker);
        let spawned = std::thread::Builder::new()
            .name("tcplock-reload".to_string())
            .spawn(move || {
                let loaded = config::load(&args).map_err(Error::from).and_then(|new| {
                    let addrs = resolve_upstream(&new)?;
                    Ok((Box::new(new), addrs))
                });
                // A loop that stopped meanwhile no longer wants the answer.
                if control.send(Control::FileReloaded(loaded)).is_ok() {
                    let _ = waker.wake();
                }
            });
        match spawned {
            Ok(_) => self.reload_running = true,
            Err(e) => {
                let source = path.display().to_string();
                if let Some(line) = self.logger.line(LogLevel::Error, "reload_failed") {
                    line.field("file", source)
                        .field("error", format_args!("cannot start the reload thread: {e}"));
                }
            }
        }
    }

    fn file_reloaded(&mut self, now: u64, loaded: Result<(Box<Config>, Vec<SocketAddr>), Error>) {
        self.reload_running = false;
        let source = self
            .config
            .config_file
            .as_ref()
            .map(|path| path.display().to_string())
            .unwrap_or_default();
        match loaded {
            Ok((new, addrs)) => self.apply_config(now, *new, addrs, ("file", &source)),
            Err(e) => {
                if let Some(line) = self.logger.line(LogLevel::Error, "reload_failed") {
                    line.field("file", &source).field("error", e);
                }
            }
        }
        if std::mem::take(&mut self.reload_again) {
            self.reload();
        }
    }

    /// Puts new settings in force for activations from now on; the listening
    /// socket stays as it is.
    fn apply_config(
        &mut self,
        now: u64,
        mut new: Config,
        upstream_addrs: Vec<SocketAddr>,
        (origin_key, origin): (&str, &str),
    ) {
        self.upstream_addrs = upstream_addrs;
        for key in config::keep_fixed(&self.config, &mut new) {
            if let Some(line) = self.logger.line(LogLevel::Warn, "reload_ignored") {
                line.field("key", key)
                    .field("reason", "fixed at start-up; restart to change it");
            }
        }
        let changed = config::changed_keys(&self.config, &new);
        self.logger.set_level(new.log_level);
        self.pool.reconfigure(new.buffer_size, new.splice);
        let mut settings = core_settings(&new, &mut self.hooks);
        settings.max_queue = self.fds.adjusted_max_queue(&new, &mut self.logger);
        self.core.handle_reload(now, settings);
        if let Some(line) = self.logger.line(LogLevel::Info, "reloaded") {
            line.field(origin_key, origin)
                .field("changed", CommaList(&changed))
                .field("addresses", self.upstream_addrs.len());
        }
        self.config = new;
    }

    // ----- actions -----

    /// Performs the core's actions until it has none left.
    fn drain(&mut self, now: u64) {
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Connect(conn) => self.connect_next(now, conn, None),
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
                } => self.close(conn, outcome, ended_by, age_ms),
                Action::SpawnHook(request) => self.spawn_hook(now, &request),
                Action::KillHook(hook) => self.kill_hook(now, hook),
                Action::StopAccepting => self.stop_accepting(),
                Action::ResumeAccepting => {
                    self.accept_paused = false;
                    self.accept_more = true;
                }
                Action::Log(event) => self.logger.event(&event),
            }
        }
    }

    fn io_of(&mut self, conn: ConnRef) -> Option<&mut ConnIo> {
        self.io
            .get_mut(conn.slot())
            .and_then(Option::as_mut)
            .filter(|io| io.conn == conn)
    }

    /// Tries upstream addresses in turn, starting after the one that just
    /// failed (or timed out); tells the core how many are left with each
    /// attempt, and reports failure when none is left.
    fn connect_next(&mut self, now: u64, conn: ConnRef, failed: Option<io::Error>) {
        let start = match self.io_of(conn).map(|io| &io.stage) {
            Some(Stage::Waiting) => 0,
            Some(Stage::Connecting { next_addr, .. }) => *next_addr,
            _ => return,
        };
        let mut last_error = failed;
        for index in start..self.upstream_addrs.len() {
            let addr = self.upstream_addrs[index];
            let mut attempt = self.connect_upstream(addr, conn);
            if matches!(&attempt, Err(e) if sys::is_fd_exhaustion(e)) && self.pool.drop_idle_pipes()
            {
                attempt = self.connect_upstream(addr, conn);
            }
            match attempt {
                Ok(upstream) => {
                    if let Some(io) = self.io_of(conn) {
                        // Replacing the stage closes the socket of an
                        // attempt given up on.
                        io.stage = Stage::Connecting {
                            upstream,
                            upstream_ready: Readiness::default(),
                            next_addr: index + 1,
                        };
                    }
                    let addresses_left = self.upstream_addrs.len() - index;
                    self.core.handle_connect_attempt(now, conn, addresses_left);
                    return;
                }
                Err(e) => last_error = Some(e),
            }
        }
        if let Some(io) = self.io_of(conn) {
            io.stage = Stage::Waiting;
        }
        let error = last_error.map_or_else(|| "no address".to_string(), |e| e.to_string());
        self.core.handle_upstream_failed(now, conn, &error);
    }

    fn connect_upstream(&self, addr: SocketAddr, conn: ConnRef) -> io::Result<TcpStream> {
        let mut upstream = TcpStream::connect(addr)?;
        self.poll.registry().register(
            &mut upstream,
            upstream_token(conn),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        Ok(upstream)
    }

    fn start_relay(&mut self, now: u64, conn: ConnRef) {
        let Some(io) = self.io_of(conn) else {
            return;
        };
        let Stage::Connecting {
            upstream,
            upstream_ready,
            ..
        } = std::mem::replace(&mut io.stage, Stage::Waiting)
        else {
            return;
        };
        // Best effort: small request/response traffic should not wait for
        // Nagle. (Clients inherit the option from the listener.)
        let _ = upstream.set_nodelay(true);
        let relay = Relay::new(upstream, upstream_ready);
        if let Some(io) = self.io_of(conn) {
            io.stage = Stage::Relaying(Box::new(relay));
        }
        // Each relay is on the busy list at most once: room for every
        // connection holding a permit, made now, means relaying never grows it.
        let relays = self.core.active();
        for list in [&mut self.busy_relays, &mut self.busy_now] {
            list.reserve(relays.saturating_sub(list.len()));
        }
        // Bytes the client sent while queued wait in the kernel, announced by
        // an edge already spent; its readiness remembers them, so pump now.
        self.pump(now, conn);
    }

    fn close(&mut self, conn: ConnRef, outcome: Outcome, ended_by: EndedBy, age_ms: u64) {
        let Some(io) = self
            .io
            .get_mut(conn.slot())
            .and_then(|slot| slot.take_if(|io| io.conn == conn))
        else {
            return;
        };
        let (up, down) = match io.stage {
            Stage::Relaying(relay) => {
                let bytes = relay.bytes();
                relay.release(&mut self.pool);
                bytes
            }
            Stage::Waiting | Stage::Connecting { .. } => (0, 0),
        };
        if let Some(line) = self.logger.line(LogLevel::Info, "closed") {
            line.field("conn", conn.id())
                .field("outcome", outcome)
                .field("ended_by", ended_by)
                .field("bytes_up", up)
                .field("bytes_down", down)
                .field("duration_ms", age_ms);
        }
        // Dropping the streams closes them, which also removes them from epoll.
    }

    fn spawn_hook(&mut self, now: u64, request: &HookRequest) {
        let context = &request.context;
        // The core asks only for hooks the table named for it.
        let Some(run) = self.hooks.get(request.run).cloned() else {
            let exit = HookExit::SpawnFailed("unknown hook".into());
            self.core.handle_hook_exited(now, request.hook, exit);
            return;
        };
        let process = match run.body() {
            HookBody::Command(command) => match self.spawn_process(command, context) {
                Ok(process) => Some(process),
                Err(e) => {
                    // Nothing ran: the core logs the failure and retries.
                    let exit = HookExit::SpawnFailed(e.to_string());
                    self.core.handle_hook_exited(now, request.hook, exit);
                    return;
                }
            },
            HookBody::Activate(_) | HookBody::Timeout(_) => None,
        };
        if let Some(line) = self.logger.line(LogLevel::Info, "hook_started") {
            line.field("hook", request.hook)
                .field("kind", context.kind.as_str())
                .field_opt("pid", process.as_ref().map(|p| p.pid))
                .field("conn", context.conn);
        }
        self.hook = Some(RunningHook {
            id: request.hook,
            started: Instant::now(),
            process,
        });
        match run.body() {
            HookBody::Command(_) => {}
            HookBody::Activate(f) => {
                let reply = Reply {
                    control: self.control_tx.clone(),
                    waker: Arc::clone(&self.waker),
                };
                let ticket = Ticket::new(request.hook, context.clone(), reply);
                // A panicking hook drops its ticket on the way out, which
                // answers "failed"; the loop itself carries on.
                if catch_unwind(AssertUnwindSafe(|| f(ticket))).is_err()
                    && let Some(line) = self.logger.line(LogLevel::Error, "hook_panicked")
                {
                    line.field("hook", request.hook);
                }
            }
            HookBody::Timeout(f) => {
                let info = TimeoutInfo::from_context(context);
                let exit = match catch_unwind(AssertUnwindSafe(|| f(&info))) {
                    Ok(()) => HookExit::Success,
                    Err(_) => HookExit::Dropped,
                };
                self.hook_ended(now, request.hook, exit);
            }
        }
    }

    /// Starts a hook process watched by its pidfd, or, on a kernel without
    /// pidfds, by SIGCHLD (said once in the log).
    fn spawn_process(&mut self, command: &str, context: &HookContext) -> io::Result<HookProcess> {
        if self.pidfds_available {
            match HookProcess::spawn(command, context) {
                Ok(process) => {
                    let Some(pidfd) = process.pidfd() else {
                        return Ok(process);
                    };
                    let raw = pidfd.as_raw_fd();
                    match self.poll.registry().register(
                        &mut SourceFd(&raw),
                        HOOK_EXIT,
                        Interest::READABLE,
                    ) {
                        Ok(()) => return Ok(process),
                        Err(e) => {
                            // Unwatched, it would hold the hook slot forever.
                            let _ = process.kill();
                            let mut process = process;
                            let _ = process.wait();
                            return Err(e);
                        }
                    }
                }
                Err(e) if sys::is_pidfd_unsupported(&e) => {
                    self.pidfds_available = false;
                    if let Some(line) = self.logger.line(LogLevel::Warn, "pidfd_unavailable") {
                        line.field("error", e).field("fallback", "SIGCHLD");
                    }
                }
                Err(e) => return Err(e),
            }
        }
        self.watch_sigchld()?;
        HookProcess::spawn_without_pidfd(command, context)
    }

    /// Adds SIGCHLD to the watched signals, installing the handler if none is.
    fn watch_sigchld(&mut self) -> io::Result<()> {
        match &self.signals {
            Some(signals) => signals.add_signal(SIGCHLD),
            None => {
                self.signals = Some(watch_signals(&self.poll, &[SIGCHLD])?);
                Ok(())
            }
        }
    }

    fn kill_hook(&mut self, now: u64, hook: HookId) {
        let Some(run) = self.hook.as_ref().filter(|run| run.id == hook) else {
            return;
        };
        match &run.process {
            Some(process) => {
                if let Err(e) = process.kill()
                    && let Some(line) = self.logger.line(LogLevel::Error, "hook_kill_failed")
                {
                    line.field("hook", hook)
                        .field("pid", process.pid)
                        .field("error", e);
                }
            }
            // A thread cannot be killed: stop waiting for its answer.
            None => self.hook_ended(now, hook, HookExit::Abandoned),
        }
    }

    fn stop_accepting(&mut self) {
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        self.accept_more = false;
    }
}

/// Installs handlers for `signals` and registers their self-pipe.
fn watch_signals(poll: &Poll, signals: &[i32]) -> io::Result<Signals> {
    let mut watched = Signals::new(signals.iter().copied())?;
    poll.registry()
        .register(&mut watched, SIGNALS, Interest::READABLE)?;
    Ok(watched)
}

fn client_token(conn: ConnRef) -> Token {
    Token(FIRST_CONN_TOKEN + conn.slot() * 2)
}

fn upstream_token(conn: ConnRef) -> Token {
    Token(FIRST_CONN_TOKEN + conn.slot() * 2 + 1)
}

enum ConnectResult {
    Pending,
    Connected,
    Failed(Option<io::Error>),
}

/// Whether a non-blocking connect finished (mio's documented recipe: a pending
/// error means failure; a peer address means connected; `NotConnected` means
/// not yet). On Linux a connecting socket turns writable only once the
/// handshake is over, and a failed connect reports an error or hang-up, so
/// plain writability already says "connected" and saves both calls.
fn connect_result(upstream: &TcpStream, ready: SocketEvent) -> ConnectResult {
    if ready.writable && !ready.closing {
        return ConnectResult::Connected;
    }
    match upstream.take_error() {
        Ok(Some(e)) | Err(e) => return ConnectResult::Failed(Some(e)),
        Ok(None) if ready.writable => return ConnectResult::Connected,
        Ok(None) => {}
    }
    match upstream.peer_addr() {
        Ok(_) => ConnectResult::Connected,
        Err(e) if e.kind() == io::ErrorKind::NotConnected => ConnectResult::Pending,
        Err(e) => ConnectResult::Failed(Some(e)),
    }
}

/// What a close or error event on a waiting client's socket means.
enum WaitingClient {
    /// Nothing ended after all.
    Present,
    /// Reset or failed, or closed with nothing pending.
    Gone,
    /// Its end of stream arrived after bytes that wait in the kernel: whether
    /// it keeps its place is the core's call (`--queued-eof`).
    EndOfStream,
}

fn waiting_client(client: &TcpStream) -> WaitingClient {
    // The kernel keeps bytes that arrived before a reset, so a peek alone
    // would find them and keep a dead client queued; a reset or error leaves
    // its mark in SO_ERROR, which a half-close does not.
    if !matches!(client.take_error(), Ok(None)) {
        return WaitingClient::Gone;
    }
    let mut byte = [0u8; 1];
    loop {
        match client.peek(&mut byte) {
            Ok(0) => return WaitingClient::Gone,
            // Called on a close event with no error pending: the peer's FIN
            // arrived behind these bytes.
            Ok(_) => return WaitingClient::EndOfStream,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return WaitingClient::Present,
            Err(_) => return WaitingClient::Gone,
        }
    }
}
