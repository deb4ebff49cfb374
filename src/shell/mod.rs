//! The mio loop around the core: it turns readiness, signals and child exits
//! into core inputs and performs the core's actions. It holds no policy: who goes
//! next, when, and what ends is decided by [`crate::core::Core`].

mod hooks;
mod relay;

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::AsFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::signal::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook_mio::v1_0::Signals;

use crate::cli::RawArgs;
use crate::config::{self, Config, QueuedEof};
use crate::core::{Action, ConnRef, Core, HookExit, HookId, HookRequest, Outcome, Settings, Stats};
use crate::error::Error;
use crate::hook::{HookBody, Reply, Ticket, TimeoutInfo};
use crate::lock::Handle;
use crate::log::{CommaList, LogLevel, Logger};
use crate::sys;

use hooks::HookProcess;
use relay::{ChannelPool, Pumped, Readiness, Relay, SocketEvent};

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
/// Messages from handles and tickets on other threads.
const CONTROL: Token = Token(2);
/// Connection tokens start here: two per slab slot, client then upstream.
const FIRST_CONN_TOKEN: usize = 16;
/// Accept at most this many connections per loop turn, so a flood cannot starve
/// the connections already in flight.
const ACCEPT_BATCH: usize = 256;
/// The kernel's accept backlog: deep, because a burst of clients is exactly
/// what a queueing proxy exists for.
const LISTEN_BACKLOG: i32 = 4096;

/// What other threads ask of the loop, through a channel and a waker.
pub(crate) enum Control {
    Stop,
    /// New settings with their upstream already resolved.
    Reload(Box<Config>, Vec<SocketAddr>),
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

/// The core's policy knobs, from a validated config.
pub fn core_settings(config: &Config) -> Settings {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Settings {
        permits: config.permits,
        max_queue: config.max_queue,
        ttl_ms: config.ttl.map(ms),
        queue_timeout_ms: config.queue_timeout.map(ms),
        connect_timeout_ms: config.connect_timeout.map(ms),
        on_activate: config.on_activate.clone(),
        on_timeout: config.on_timeout.clone(),
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
    signals: Signals,
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
    upstream_addrs: Vec<SocketAddr>,
    hook: Option<RunningHook>,
    config: Config,
    started: Instant,
    /// Out of file descriptors: wait for a close before accepting again.
    accept_paused: bool,
    /// The listener may hold more connections than the last batch took.
    accept_more: bool,
    /// Relays that used up their turn and must be pumped again.
    busy_relays: Vec<ConnRef>,
    /// The list being worked through this turn; swapped with `busy_relays` so
    /// neither is ever reallocated in steady state.
    busy_now: Vec<ConnRef>,
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
        if let Err(e) = sys::raise_open_files_limit()
            && let Some(line) = logger.line(LogLevel::Warn, "nofile_limit")
        {
            line.field("error", e);
        }
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
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(io_error("cannot register the listener"))?;
        let mut watched = vec![SIGCHLD];
        if options.handle_signals {
            watched.extend([SIGHUP, SIGTERM, SIGINT, SIGUSR1]);
        }
        let mut signals =
            Signals::new(watched).map_err(io_error("cannot install signal handlers"))?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(io_error("cannot register signals"))?;
        let waker = Arc::new(
            Waker::new(poll.registry(), CONTROL).map_err(io_error("cannot create the waker"))?,
        );
        let (control_tx, control_rx) = mpsc::channel();
        if let Some(line) = logger.line(LogLevel::Info, "listening") {
            line.field("addr", local_addr)
                .field("upstream", &config.upstream)
                .field("permits", config.permits);
        }
        logger.flush();
        Ok(Shell {
            poll,
            listener: Some(listener),
            local_addr,
            signals,
            options,
            waker,
            control_tx,
            control_rx,
            stats: Arc::new(Mutex::new(Stats::default())),
            core: Core::new(core_settings(&config), 0),
            io: Vec::new(),
            pool: ChannelPool::new(config.buffer_size, config.splice),
            logger,
            upstream_addrs,
            hook: None,
            config,
            started: Instant::now(),
            accept_paused: false,
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
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = if self.accept_more || !self.busy_relays.is_empty() {
                Some(Duration::ZERO)
            } else {
                self.core
                    .poll_timeout()
                    // Round up so a deadline never wakes us a millisecond early.
                    .map(|deadline| Duration::from_millis(deadline.saturating_sub(self.now()) + 1))
            };
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
                self.pump(now, self.busy_now[index]);
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
            let Some(listener) = &self.listener else {
                return;
            };
            let (client, addr) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if sys::is_fd_exhaustion(&e) => {
                    if self.pool.drop_idle_pipes() {
                        continue;
                    }
                    self.accept_paused = true;
                    if let Some(line) = self.logger.line(LogLevel::Warn, "accept_paused") {
                        line.field("error", e)
                            .field("open_connections", self.core.conn_count());
                    }
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
            Pumped::Busy => self.busy_relays.push(conn),
            Pumped::Ended(end) => {
                self.core.handle_relay_ended(now, conn, end);
                self.drain(now);
            }
        }
    }

    fn handle_signals(&mut self, now: u64) {
        // Drain the self-pipe first, then act: signals coalesce, and one
        // SIGCHLD may stand for several exits.
        let pending: Vec<i32> = self.signals.pending().collect();
        for signal in pending {
            match signal {
                SIGCHLD => self.reap(now),
                SIGHUP => self.reload(now),
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

    fn reload(&mut self, now: u64) {
        let (Some(path), Some(args)) = (
            self.config.config_file.clone(),
            self.options.reload_args.as_ref(),
        ) else {
            if let Some(line) = self.logger.line(LogLevel::Warn, "reload_skipped") {
                line.field("reason", "no config file given with -c");
            }
            return;
        };
        // A name that needs DNS is looked up here, on the loop: SIGHUP is rare
        // and operator-driven, and an IP literal costs nothing.
        let loaded = config::load(args).map_err(Error::from).and_then(|new| {
            let addrs = if new.upstream == self.config.upstream {
                self.upstream_addrs.clone()
            } else {
                resolve_upstream(&new)?
            };
            Ok((new, addrs))
        });
        let source = path.display().to_string();
        match loaded {
            Ok((new, addrs)) => self.apply_config(now, new, addrs, ("file", &source)),
            Err(e) => {
                if let Some(line) = self.logger.line(LogLevel::Error, "reload_failed") {
                    line.field("file", &source).field("error", e);
                }
            }
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
        let changed = config::changed_keys(&self.config, &new);
        self.upstream_addrs = upstream_addrs;
        if new.listen != self.config.listen {
            if let Some(line) = self.logger.line(LogLevel::Warn, "reload_ignored") {
                line.field("key", "listen")
                    .field("reason", "the listening socket stays; restart to move it");
            }
            new.listen = self.config.listen.clone();
        }
        self.logger.set_level(new.log_level);
        self.pool.reconfigure(new.buffer_size, new.splice);
        self.core.handle_reload(now, core_settings(&new));
        let changed: Vec<&str> = changed.into_iter().filter(|key| *key != "listen").collect();
        if let Some(line) = self.logger.line(LogLevel::Info, "reloaded") {
            line.field(origin_key, origin)
                .field("changed", CommaList(&changed));
        }
        self.config = new;
    }

    // ----- actions -----

    /// Performs the core's actions until it has none left.
    fn drain(&mut self, now: u64) {
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Connect(conn) => self.connect_next(now, conn, None),
                Action::StartRelay(conn) => self.start_relay(now, conn),
                Action::Close {
                    conn,
                    outcome,
                    age_ms,
                } => self.close(conn, outcome, age_ms),
                Action::SpawnHook(request) => self.spawn_hook(now, &request),
                Action::KillHook(hook) => self.kill_hook(now, hook),
                Action::StopAccepting => self.stop_accepting(),
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
    /// failed; reports failure to the core when none is left.
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
                        io.stage = Stage::Connecting {
                            upstream,
                            upstream_ready: Readiness::default(),
                            next_addr: index + 1,
                        };
                    }
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
        // Bytes the client sent while queued wait in the kernel, announced by
        // an edge already spent; its readiness remembers them, so pump now.
        self.pump(now, conn);
    }

    fn close(&mut self, conn: ConnRef, outcome: Outcome, age_ms: u64) {
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
                .field("bytes_up", up)
                .field("bytes_down", down)
                .field("duration_ms", age_ms);
        }
        if self.accept_paused {
            self.accept_paused = false;
            self.accept_more = true;
        }
        // Dropping the streams closes them, which also removes them from epoll.
    }

    fn spawn_hook(&mut self, now: u64, request: &HookRequest) {
        let context = &request.context;
        let process = match request.run.body() {
            HookBody::Command(command) => match HookProcess::spawn(command, context) {
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
        match request.run.body() {
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
