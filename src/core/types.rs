//! The vocabulary the core speaks with the shell: handles, settings, actions,
//! outcomes and log events.

use std::fmt;
use std::net::SocketAddr;

/// The id a connection gets at accept: 1, 2, 3, ... in accept order. It is what
/// logs and hooks show, and it doubles as the generation of the connection's slab
/// slot, so a stale handle for a reused slot never matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub(crate) u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A handle to one connection: its slab slot and its id. The shell indexes its own
/// per-connection I/O state by [`ConnRef::slot`] and must compare the id before
/// acting, exactly as the core does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnRef {
    pub(crate) slot: usize,
    pub(crate) id: ConnId,
}

impl ConnRef {
    /// The slab slot: dense, small, reused after the connection ends.
    pub fn slot(self) -> usize {
        self.slot
    }

    /// The connection's id, unique for the life of the process.
    pub fn id(self) -> ConnId {
        self.id
    }
}

/// A hook as the core schedules it: a name the shell gave it and looks up
/// when asked to run it. The core never looks inside; two refs are equal
/// exactly when they name the same hook, so a reload that swaps the hook is
/// told apart from one that keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HookRef(pub u32);

/// One hook run, unique for the life of the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HookId(pub u64);

impl fmt::Display for HookId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One upstream instance of the pool: 1, 2, ... K in the order the list
/// gives them. An instance keeps its number across reloads; one added by a
/// reload takes the lowest number no instance holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceId(pub u32);

impl InstanceId {
    /// Its place in the core's table: the number less one.
    pub(crate) fn index(self) -> usize {
        self.0.saturating_sub(1) as usize
    }

    pub(crate) fn at(index: usize) -> Self {
        InstanceId(u32::try_from(index + 1).unwrap_or(u32::MAX))
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The policy knobs of the core. Durations are milliseconds; `None` means no limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Connections that may hold a permit (Activating or Proxying) at once,
    /// on each instance.
    pub permits: u32,
    /// Clients that may wait; one more is rejected.
    pub max_queue: usize,
    /// How long a connection may proxy.
    pub ttl_ms: Option<u64>,
    /// How long a client may wait from accept until proxying.
    pub queue_timeout_ms: Option<u64>,
    /// How long connecting to the upstream may take.
    pub connect_timeout_ms: Option<u64>,
    /// Runs before each activation; success lets the connection through.
    pub on_activate: Option<HookRef>,
    /// Runs after a TTL expiry, before the next on-activate hook.
    pub on_timeout: Option<HookRef>,
    /// How long a hook may run before it is killed (and counts as failed).
    pub hook_timeout_ms: Option<u64>,
    /// How long a shutdown waits for proxying connections.
    pub shutdown_grace_ms: u64,
    /// The instances of the pool, one address each, as the shell names them
    /// (shown to hooks as `TCPLOCK_UPSTREAM`). An empty list is one instance
    /// with no name. A reload keeps the instances whose name it keeps.
    pub upstreams: Vec<String>,
    /// A waiting client whose end of stream arrived leaves the queue as
    /// abandoned (`--queued-eof drop`) instead of keeping its place.
    pub drop_queued_eof: bool,
    /// A shutdown keeps activating waiting clients in order until the queue
    /// is empty or the grace runs out (`--shutdown-queue serve`), instead of
    /// closing them at once.
    pub serve_queue_on_shutdown: bool,
    /// Warn when the head of the queue waited this long while every permit
    /// holder moved no byte for this long (`--stall-warn`); `None` is off.
    pub stall_warn_ms: Option<u64>,
    /// `--accept-proxy`: every client must first send a PROXY protocol
    /// header, within this long of accept, before it joins the queue.
    /// `None`: no header is expected.
    pub proxy_header_timeout_ms: Option<u64>,
    /// `--spawn`: tcplock runs the upstream itself and restarts it by these
    /// rules; `None`: the upstream is managed elsewhere.
    pub service: Option<ServiceSettings>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            permits: 1,
            max_queue: 1024,
            ttl_ms: None,
            queue_timeout_ms: None,
            connect_timeout_ms: Some(10_000),
            on_activate: None,
            on_timeout: None,
            hook_timeout_ms: Some(60_000),
            shutdown_grace_ms: 30_000,
            upstreams: Vec::new(),
            drop_queued_eof: false,
            serve_queue_on_shutdown: false,
            stall_warn_ms: Some(30_000),
            proxy_header_timeout_ms: None,
            service: None,
        }
    }
}

/// How a supervised upstream is run. Durations are milliseconds; `None`
/// means never.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSettings {
    /// What to run, and where it listens; the core does not look inside. A
    /// reload that changes either hands the core a new one, which makes the
    /// running generation due.
    pub run: ServiceRef,
    /// A start must answer a connect on the upstream address within this.
    pub ready_timeout_ms: u64,
    /// Restart after this many connections proxied by one generation.
    pub restart_after: Option<u64>,
    /// Restart when the service's processes together hold more than this.
    pub restart_rss_kib: Option<u64>,
    /// Restart a generation older than this (counted from ready).
    pub max_lifetime_ms: Option<u64>,
    /// Which connection outcomes make the generation due.
    pub restart_on: RestartOn,
    /// Stop the service after this long with no client at all.
    pub idle_stop_ms: Option<u64>,
    /// After asking the service to stop, wait this long, then kill it.
    pub stop_timeout_ms: u64,
    /// Consecutive failed starts before the service is declared failed.
    pub start_retries: u32,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        ServiceSettings {
            run: ServiceRef(0),
            ready_timeout_ms: 30_000,
            restart_after: None,
            restart_rss_kib: None,
            max_lifetime_ms: None,
            restart_on: RestartOn {
                timeout: true,
                connect_failed: true,
                upstream_error: false,
            },
            idle_stop_ms: None,
            stop_timeout_ms: 10_000,
            start_retries: 5,
        }
    }
}

/// `--restart-on`: which connection outcomes make the service suspect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestartOn {
    /// A TTL expiry.
    pub timeout: bool,
    /// The upstream refused or did not answer a connect.
    pub connect_failed: bool,
    /// The upstream reset a proxied connection.
    pub upstream_error: bool,
}

/// Names the service's command and address in the shell's table; the core
/// compares it and hands it back in [`Action::SpawnService`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceRef(pub u32);

/// One run of the supervised service: 1, 2, ... Every spawn is a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Why a generation is started (`TCPLOCK_RESTART_REASON`), or why the one
/// before it became due or was stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RestartReason {
    /// The first start.
    First,
    /// `--restart-after` connections were proxied.
    AfterN,
    /// `--restart-rss` was exceeded.
    Rss,
    /// `--max-lifetime` passed.
    Lifetime,
    /// A connection's TTL expired (`--restart-on timeout`).
    Timeout,
    /// A connect to it failed (`--restart-on connect_failed`).
    ConnectFailed,
    /// It reset a proxied connection (`--restart-on upstream_error`).
    UpstreamError,
    /// It exited without being asked.
    Crash,
    /// The start before this one failed.
    FailedStart,
    /// A reload changed its command or address.
    Reload,
    /// It was stopped for `--idle-stop` and a client came.
    Idle,
    /// An operator asked for it.
    Control,
    /// tcplock is stopping (a stop reason only).
    Shutdown,
}

impl RestartReason {
    /// Every reason, in the order counters list them.
    pub const ALL: [RestartReason; 13] = [
        RestartReason::First,
        RestartReason::AfterN,
        RestartReason::Rss,
        RestartReason::Lifetime,
        RestartReason::Timeout,
        RestartReason::ConnectFailed,
        RestartReason::UpstreamError,
        RestartReason::Crash,
        RestartReason::FailedStart,
        RestartReason::Reload,
        RestartReason::Idle,
        RestartReason::Control,
        RestartReason::Shutdown,
    ];

    /// The reasons a restart is counted under: [`RestartReason::ALL`] without
    /// `First` (no generation before it) and `Shutdown` (a stop reason only),
    /// in the same order.
    pub const RESTARTS: [RestartReason; 11] = {
        let mut out = [RestartReason::First; 11];
        let mut i = 0;
        while i < out.len() {
            out[i] = RestartReason::ALL[i + 1];
            i += 1;
        }
        out
    };

    /// Its place in [`RestartReason::ALL`], which lists the reasons in
    /// declaration order.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether the restart is maintenance rather than a repair: in a pool,
    /// planned restarts take one instance out at a time.
    pub fn is_planned(self) -> bool {
        matches!(
            self,
            RestartReason::AfterN
                | RestartReason::Rss
                | RestartReason::Lifetime
                | RestartReason::Reload
                | RestartReason::Control
        )
    }

    /// The name in logs and in `TCPLOCK_RESTART_REASON`.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartReason::First => "first",
            RestartReason::AfterN => "after_n",
            RestartReason::Rss => "rss",
            RestartReason::Lifetime => "lifetime",
            RestartReason::Timeout => "timeout",
            RestartReason::ConnectFailed => "connect_failed",
            RestartReason::UpstreamError => "upstream_error",
            RestartReason::Crash => "crash",
            RestartReason::FailedStart => "failed_start",
            RestartReason::Reload => "reload",
            RestartReason::Idle => "idle",
            RestartReason::Control => "control",
            RestartReason::Shutdown => "shutdown",
        }
    }
}

impl fmt::Display for RestartReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The supervised service's state, as logs, dumps and metrics name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServiceStateName {
    /// Not running: not started yet, stopped while idle, or between a failed
    /// start and the next.
    Stopped,
    /// Spawned (or about to be), not yet answering connects.
    Starting,
    /// Answering connects and taking clients.
    Ready,
    /// Running, due for a restart: takes no new client, restarts once
    /// drained. (In a pool, a planned restart waits for its turn and keeps
    /// serving meanwhile, as `ready`.)
    Due,
    /// Asked to stop; waiting until every process of it is gone.
    Stopping,
    /// `--start-retries` starts in a row failed; starts go on at the longest
    /// backoff and clients are turned away.
    Failed,
}

impl ServiceStateName {
    /// Every state, in the order metrics list them.
    pub const ALL: [ServiceStateName; 6] = [
        ServiceStateName::Stopped,
        ServiceStateName::Starting,
        ServiceStateName::Ready,
        ServiceStateName::Due,
        ServiceStateName::Stopping,
        ServiceStateName::Failed,
    ];

    /// `stopped`, `starting`, `ready`, `due`, `stopping` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceStateName::Stopped => "stopped",
            ServiceStateName::Starting => "starting",
            ServiceStateName::Ready => "ready",
            ServiceStateName::Due => "due",
            ServiceStateName::Stopping => "stopping",
            ServiceStateName::Failed => "failed",
        }
    }
}

impl fmt::Display for ServiceStateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the service's spawned process ended: its exit code or its signal,
/// as `waitid` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceExit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

/// What the shell measured of the service's process session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceSample {
    /// Live processes in the session (zombies not counted).
    pub processes: usize,
    /// Their resident memory, summed.
    pub rss_kib: u64,
}

/// How hard [`Action::SignalService`] asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGTERM: please stop.
    Term,
    /// SIGKILL: the stop timeout ran out, or the service crashed and its
    /// leftovers are of no use.
    Kill,
}

/// The supervised service, for [`Stats`] and the state dump.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServiceStats {
    /// Its state now; `None` when tcplock does not supervise the upstream.
    pub state: Option<ServiceStateName>,
    /// The current (or last) generation; 0 before the first spawn.
    pub generation: u64,
    /// Its spawned process, while it runs.
    pub pid: Option<u32>,
    /// The last memory sample of its processes, in KiB.
    pub rss_kib: u64,
    /// Connections proxied by the current generation.
    pub conns: u64,
    /// When the current generation became ready (core ms), if it is.
    pub ready_at: Option<u64>,
    /// Restarts so far, per reason, in [`RestartReason::ALL`] order.
    pub restarts: [u64; RestartReason::ALL.len()],
}

impl ServiceStats {
    /// Restarts so far for `reason`.
    pub fn restarts(&self, reason: RestartReason) -> u64 {
        self.restarts[reason.index()]
    }
}

/// How a connection ended. Every accepted connection ends exactly once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// Both directions finished cleanly.
    Ok,
    /// The client reset or failed while proxying.
    ClientError,
    /// The upstream reset or failed while proxying.
    UpstreamError,
    /// tcplock could not go on relaying though neither peer failed: splicing
    /// was refused while a pipe held bytes it could neither deliver nor copy.
    RelayError,
    /// The TTL of a proxying connection expired.
    Timeout,
    /// It waited longer than the queue timeout.
    QueueTimeout,
    /// No upstream address accepted the connection within the connect timeout.
    ConnectFailed,
    /// The client left while it was waiting.
    Abandoned,
    /// The queue was full when it arrived.
    Rejected,
    /// tcplock was stopping.
    Shutdown,
    /// The supervised upstream failed to start `--start-retries` times in a
    /// row while it waited.
    UpstreamFailed,
    /// An operator ended it (`kill CONN` on the control socket).
    Killed,
}

impl Outcome {
    /// Its place in [`Outcome::ALL`].
    fn index(self) -> usize {
        self as usize
    }

    /// The name used in logs and in `TCPLOCK_LAST_OUTCOME`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientError => "client_error",
            Outcome::UpstreamError => "upstream_error",
            Outcome::RelayError => "relay_error",
            Outcome::Timeout => "timeout",
            Outcome::QueueTimeout => "queue_timeout",
            Outcome::ConnectFailed => "connect_failed",
            Outcome::Abandoned => "abandoned",
            Outcome::Rejected => "rejected",
            Outcome::Shutdown => "shutdown",
            Outcome::UpstreamFailed => "upstream_failed",
            Outcome::Killed => "killed",
        }
    }

    /// Every outcome.
    pub const ALL: [Outcome; 12] = [
        Outcome::Ok,
        Outcome::ClientError,
        Outcome::UpstreamError,
        Outcome::RelayError,
        Outcome::Timeout,
        Outcome::QueueTimeout,
        Outcome::ConnectFailed,
        Outcome::Abandoned,
        Outcome::Rejected,
        Outcome::Shutdown,
        Outcome::UpstreamFailed,
        Outcome::Killed,
    ];
}

/// What a lock reports about itself (see [`crate::Handle::stats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Clients waiting.
    pub queue_length: usize,
    /// Connections holding a permit.
    pub active: usize,
    /// Connections that may hold a permit at once (`--permits`).
    pub permits: u32,
    /// How long the client at the head of the queue has waited since
    /// accept, in milliseconds, as of the core's latest input; 0 with none
    /// waiting. (With `--accept-proxy` the line is in order of complete
    /// headers, so a client behind the head may have waited up to the
    /// header timeout longer.)
    pub oldest_wait_ms: u64,
    /// Connections let through so far.
    pub activations: u64,
    /// TTL expiries so far.
    pub timeouts: u64,
    /// Connections ended, per outcome.
    pub outcomes: OutcomeCounts,
    /// The supervised upstream (`--spawn`): the first live instance's.
    pub service: ServiceStats,
    /// Every instance of the pool, in number order.
    pub instances: Vec<InstanceStats>,
}

/// One instance of the pool, for [`Stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InstanceStats {
    /// Its number.
    pub id: u32,
    /// Its address, as configured.
    pub upstream: String,
    /// Connections holding one of its permits.
    pub active: usize,
    /// Connections let through to it so far.
    pub activations: u64,
    /// A failed connect put it in cool-down: it takes no client until then.
    pub cooling_down: bool,
    /// A reload removed it: it takes no client and goes once drained.
    pub removed: bool,
    /// Its supervised service (`--spawn`).
    pub service: ServiceStats,
}

impl Stats {
    /// How many connections ended with `outcome`.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.outcomes.count(outcome)
    }
}

/// How many connections ended with each [`Outcome`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutcomeCounts([u64; Outcome::ALL.len()]);

impl OutcomeCounts {
    /// How many connections ended with `outcome`.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.0[outcome.index()]
    }

    /// Counts one more connection that ended with `outcome`.
    pub fn add(&mut self, outcome: Outcome) {
        self.0[outcome.index()] += 1;
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who ended a connection: the side that closed or reset first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EndedBy {
    /// The client: it left while waiting, or closed or reset first while
    /// proxying.
    Client,
    /// The upstream closed or reset first while proxying.
    Upstream,
    /// tcplock: a TTL, a queue timeout, a shutdown, a failed connect, a full
    /// queue, an operator's `kill`, or a relay that failed before either
    /// peer closed.
    Tcplock,
}

impl EndedBy {
    /// The name used in logs and in `TCPLOCK_LAST_ENDED_BY`.
    pub fn as_str(self) -> &'static str {
        match self {
            EndedBy::Client => "client",
            EndedBy::Upstream => "upstream",
            EndedBy::Tcplock => "tcplock",
        }
    }
}

impl fmt::Display for EndedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the shell read at the start of an `--accept-proxy` connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyHeader {
    /// A PROXY header naming the client: it becomes the connection's
    /// client address, the accepted one is kept as `via`.
    Client(SocketAddr),
    /// A `LOCAL` (or `UNKNOWN`) header: the balancer's own connection, such
    /// as a health check, served under the accepted address.
    Local,
    /// Missing, malformed, truncated or oversized: the connection is
    /// rejected.
    Bad,
}

/// Why a connection was turned away at the door.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// The queue was full.
    QueueFull,
    /// `--accept-proxy`: no valid PROXY header within the time allowed.
    BadProxyHeader,
    /// The supervised upstream failed to start `--start-retries` times in a row.
    UpstreamFailed,
}

impl RejectReason {
    /// The name used in logs, `reason=...`.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::QueueFull => "queue_full",
            RejectReason::BadProxyHeader => "bad_proxy_header",
            RejectReason::UpstreamFailed => "upstream_failed",
        }
    }
}

/// How a relay ended, as the shell saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayEnd {
    /// What ended it.
    pub cause: RelayCause,
    /// The side that sent end of stream or failed first; [`EndedBy::Tcplock`]
    /// if the relay itself failed before either did.
    pub ended_by: EndedBy,
}

/// What ended a relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayCause {
    /// Both directions reached end of stream and were flushed.
    Finished,
    /// Reading from or writing to the client failed.
    ClientError,
    /// Reading from or writing to the upstream failed.
    UpstreamError,
    /// The relay itself could not go on (splicing refused with bytes in a
    /// pipe); neither peer is to blame.
    RelayError,
}

/// Why a hook runs; shown to it as `TCPLOCK_EVENT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HookKind {
    /// Before a connection is let through.
    Activate,
    /// After a connection's TTL expired.
    Timeout,
}

impl HookKind {
    /// `activate` or `timeout`.
    pub fn as_str(self) -> &'static str {
        match self {
            HookKind::Activate => "activate",
            HookKind::Timeout => "timeout",
        }
    }
}

/// How a hook ended, as the shell saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HookExit {
    /// Exit status 0, or a closure hook's ticket proceeded.
    Success,
    /// A non-zero exit status.
    Failed(i32),
    /// Killed by a signal (by us after a hook timeout, or by someone else).
    Signaled(i32),
    /// The process could not be started.
    SpawnFailed(String),
    /// A closure hook's ticket was failed.
    Declined,
    /// A closure hook's ticket was dropped without an answer.
    Dropped,
    /// A closure hook was given up on (hook timeout or shutdown); a late answer
    /// is ignored.
    Abandoned,
}

impl HookExit {
    /// Whether the hook let the connection through.
    pub fn is_success(&self) -> bool {
        matches!(self, HookExit::Success)
    }
}

impl fmt::Display for HookExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookExit::Success => f.write_str("exit 0"),
            HookExit::Failed(code) => write!(f, "exit {code}"),
            HookExit::Signaled(signal) => write!(f, "signal {signal}"),
            HookExit::SpawnFailed(error) => write!(f, "spawn failed: {error}"),
            HookExit::Declined => f.write_str("ticket failed"),
            HookExit::Dropped => f.write_str("ticket dropped"),
            HookExit::Abandoned => f.write_str("abandoned"),
        }
    }
}

/// The facts of the moment a hook runs: a command hook gets them as `TCPLOCK_*`
/// environment variables, a closure hook on its [`crate::Ticket`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HookContext {
    /// Why the hook runs.
    pub kind: HookKind,
    /// The connection it runs for: the one to be let through, or the one whose
    /// TTL expired.
    pub conn: ConnId,
    /// That connection's client address.
    pub client: SocketAddr,
    /// The instance it runs for.
    pub instance: InstanceId,
    /// That instance's address, as configured.
    pub upstream: String,
    /// Connections let through to that instance before this one.
    pub activations: u64,
    /// TTL expiries on that instance so far.
    pub timeouts: u64,
    /// How the last connection that held a permit of that instance ended;
    /// `None` before any did.
    pub last_outcome: Option<Outcome>,
    /// Who ended that connection; `None` before any ended.
    pub last_ended_by: Option<EndedBy>,
    /// Clients waiting.
    pub queue_length: usize,
    /// Connections holding a permit of that instance.
    pub active: usize,
    /// 1, then 2, 3, ... while an on-activate hook is retried for one client.
    pub attempt: u32,
    /// `--spawn`: the generation of that instance's service, and its pid.
    pub service: Option<(Generation, u32)>,
}

/// Everything the shell needs to run one hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookRequest {
    /// Names this run in `handle_hook_exited` and `KillHook`.
    pub hook: HookId,
    /// What to run; the core does not look inside.
    pub run: HookRef,
    /// The facts the hook gets.
    pub context: HookContext,
}

/// What the core asks the shell to do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start connecting this connection to the instance's addresses; report
    /// each address tried with `handle_connect_attempt`, answer with
    /// `handle_upstream_connected` or `handle_upstream_failed`.
    Connect {
        /// The connection.
        conn: ConnRef,
        /// The instance it goes to.
        instance: InstanceId,
    },
    /// The address being tried used up its share of the connect timeout:
    /// give it up and try the next one (`handle_connect_attempt` again), or
    /// report `handle_upstream_failed` if none is left.
    ConnectNext(ConnRef),
    /// Give up the connect under way for this connection and close its
    /// upstream socket; the client stays (it is back in line, for another
    /// instance). No answer: a late event of that socket is the shell's to
    /// drop.
    AbandonConnect(ConnRef),
    /// The upstream is connected: start relaying bytes; answer with
    /// `handle_relay_ended` when both directions are done or one failed.
    StartRelay(ConnRef),
    /// Close both sockets of this connection. The core has already forgotten it.
    /// `age_ms` counts from accept.
    Close {
        /// The connection.
        conn: ConnRef,
        /// How it ended.
        outcome: Outcome,
        /// Who closed or reset first.
        ended_by: EndedBy,
        /// Milliseconds since accept.
        age_ms: u64,
    },
    /// Run a hook; answer with `handle_hook_exited`.
    SpawnHook(HookRequest),
    /// Kill the hook's whole process group; its exit still arrives through
    /// `handle_hook_exited`.
    KillHook(HookId),
    /// Close the listening socket: tcplock is stopping.
    StopAccepting,
    /// Accept again after `handle_accept_paused`: descriptors were freed or
    /// the retry backoff ran out.
    ResumeAccepting,
    /// Write a log line.
    Log(Event),
    /// Answer with `handle_holders_idle`: how long since the most recently
    /// active relay moved a byte (the stalled-queue check).
    ReportIdle,
    /// `--spawn`: try a TCP connect to the instance's address (and close it);
    /// answer with `handle_service_probed`: whether something accepted it.
    ProbeUpstream {
        /// Whose address.
        instance: InstanceId,
        /// The generation it is for.
        generation: Generation,
    },
    /// `--spawn`: start this generation of the service (nothing of an earlier
    /// one is alive and the port was refusing); answer at once with
    /// `handle_service_spawned`, later with `handle_service_exited`.
    SpawnService {
        /// The instance it serves (`TCPLOCK_INSTANCE`, its address's port).
        instance: InstanceId,
        /// The generation to start.
        generation: Generation,
        /// `TCPLOCK_RESTART_REASON`.
        reason: RestartReason,
        /// What to run.
        run: ServiceRef,
    },
    /// `--spawn`: measure the generation's process session; answer with
    /// `handle_service_sampled`.
    SampleService {
        /// Whose service.
        instance: InstanceId,
        /// Its generation.
        generation: Generation,
    },
    /// `--spawn`: signal every process of the generation's process session.
    SignalService {
        /// Whose service.
        instance: InstanceId,
        /// Whose session.
        generation: Generation,
        /// Which signal.
        signal: StopSignal,
    },
}

/// A state a connection can be in, for `event=state` lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateName {
    /// `--accept-proxy`: waiting for its PROXY header, not yet in the queue.
    Header,
    /// Waiting in the queue.
    Queued,
    /// Holding a permit: its hook runs or the upstream connect is under way.
    Activating,
    /// Relaying bytes.
    Proxying,
}

impl StateName {
    /// `header`, `queued`, `activating` or `proxying`.
    pub fn as_str(self) -> &'static str {
        match self {
            StateName::Header => "header",
            StateName::Queued => "queued",
            StateName::Activating => "activating",
            StateName::Proxying => "proxying",
        }
    }
}

/// A log record the core produces. The shell decides the format; the variant
/// names match the `event=` names in snake case. Throughout, `conn` is the
/// connection, `client` its client's address and `hook` the hook run.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)] // The fields are named for what they hold; see above.
pub enum Event {
    /// A client connected (debug level); with `--accept-proxy`, once its
    /// header named it, `via` being the balancer it came through.
    Accepted {
        conn: ConnId,
        client: SocketAddr,
        via: Option<SocketAddr>,
    },
    /// Turned away: the queue was full, or its PROXY header was bad.
    Rejected {
        conn: ConnId,
        client: SocketAddr,
        reason: RejectReason,
    },
    /// A waiting client left.
    Abandoned { conn: ConnId },
    /// An operator ended it (`kill CONN`), in state `state`.
    Killed { conn: ConnId, state: StateName },
    /// Activations were paused (`pause` or `drain`) with `queued` waiting.
    Paused { queued: usize },
    /// Activations resumed with `queued` waiting.
    Resumed { queued: usize },
    /// A connection started proxying after `waited_ms` since accept.
    Activated {
        conn: ConnId,
        client: SocketAddr,
        via: Option<SocketAddr>,
        waited_ms: u64,
        instance: InstanceId,
    },
    /// A proxying connection's TTL expired.
    Timeout { conn: ConnId },
    /// A client waited longer than the queue timeout.
    QueueTimeout { conn: ConnId },
    /// No address of `instance` took the connection; `error` says why.
    ConnectFailed {
        conn: ConnId,
        error: String,
        instance: InstanceId,
    },
    /// The on-activate hook of a client succeeded, but its instance was
    /// removed or stopped taking clients meanwhile: the client is back at
    /// the head of the line, for the next free instance (debug level).
    Requeued { conn: ConnId, instance: InstanceId },
    /// A connect to `instance` failed: it takes no client for `ms`.
    InstanceCooldown { instance: InstanceId, ms: u64 },
    /// A hook failed: `exit` is how, `timed_out` whether we killed it for its
    /// hook timeout, and `retry_in_ms` when an on-activate hook runs again for
    /// a client that still waits.
    HookFailed {
        hook: HookId,
        kind: HookKind,
        conn: ConnId,
        exit: HookExit,
        timed_out: bool,
        retry_in_ms: Option<u64>,
        instance: InstanceId,
    },
    /// A hook ran `after_ms` and was killed.
    HookTimedOut { hook: HookId, after_ms: u64 },
    /// A successful on-activate hook whose client left: the next client uses it.
    PreparationKept { hook: HookId },
    /// A shutdown began with `queued` waiting and `active` holding a permit.
    ShutdownStarted {
        queued: usize,
        active: usize,
        grace_ms: u64,
    },
    /// A second stop request: `active` connections are cut now.
    ShutdownForced { active: usize },
    /// The shutdown is complete: `served` waiting clients were activated
    /// after it began, `closed` were closed unserved.
    ShutdownDone { served: u64, closed: u64 },
    /// The head of the queue waited `waited_ms` while all `holders` of a
    /// permit moved no byte for `idle_ms` (warn level, once per stall).
    QueueStalled {
        waited_ms: u64,
        holders: usize,
        idle_ms: u64,
    },
    /// One connection, for a state dump.
    State {
        conn: ConnId,
        state: StateName,
        client: SocketAddr,
        age_ms: u64,
    },
    /// `--spawn`: a generation was spawned.
    UpstreamStarting {
        generation: Generation,
        pid: u32,
        reason: RestartReason,
        instance: InstanceId,
    },
    /// It answered a connect `start_ms` after it was spawned.
    UpstreamReady {
        generation: Generation,
        start_ms: u64,
        instance: InstanceId,
    },
    /// The generation takes no new client and restarts once drained; for
    /// `Rss`, `rss_kib` is the sample over the limit `limit_kib`.
    RestartDue {
        generation: Generation,
        reason: RestartReason,
        rss_kib: Option<(u64, u64)>,
        instance: InstanceId,
    },
    /// It is being stopped.
    UpstreamStopping {
        generation: Generation,
        reason: RestartReason,
        instance: InstanceId,
    },
    /// Its spawned process exited; `expected` if tcplock asked it to stop.
    UpstreamExited {
        generation: Generation,
        pid: u32,
        exit: ServiceExit,
        expected: bool,
        instance: InstanceId,
    },
    /// A start failed; `why` says how.
    UpstreamStartFailed {
        generation: Generation,
        why: String,
        instance: InstanceId,
    },
    /// `starts` starts failed in a row: the service is failed (error level).
    UpstreamFailed {
        starts: u32,
        retry_in_ms: u64,
        instance: InstanceId,
    },
    /// Something already answers on the upstream port: no second copy is
    /// started beside it (error level).
    UpstreamPortBusy {
        generation: Generation,
        addr: String,
        instance: InstanceId,
    },
    /// The service, for a state dump.
    ServiceState {
        state: ServiceStateName,
        generation: Generation,
        pid: Option<u32>,
        rss_kib: u64,
        conns: u64,
        age_ms: Option<u64>,
        instance: InstanceId,
    },
    /// The totals closing a state dump; `permits` is each instance's, and
    /// `instances` counts those not removed.
    StateSummary {
        queued: usize,
        active: usize,
        permits: u32,
        instances: usize,
        hook_running: bool,
        activations: u64,
        timeouts: u64,
    },
}
