//! Model checking of the core: a driver that feeds it a sequence of [`Op`]s the
//! way the shell would, a shadow of what the shell knows (built only from the
//! actions the core emits and the inputs fed to it), and a checker of the
//! invariants of DESIGN.md after every step.
//!
//! Settings naming two instances or more (`Settings::upstreams`) run the
//! pool model of `pool.rs` instead: K = 2..=4 instances behind one queue,
//! a process table per instance, reloads that change the list, history
//! checks per instance (permits, one hook at a time, readiness, cool-down)
//! and across the pool (FIFO, rolling restarts, `upstream_failed`). The
//! exact shadow below predicts a single upstream only; pool runs rely on
//! those checks and the core's invariants. See `pool.rs`.
//!
//! Two callers share it: the seeded model test at the bottom of this file (runs
//! in every `cargo test`, no nightly needed) and the fuzz target
//! `fuzz/fuzz_targets/state_machine.rs` (enables the `model` feature and turns
//! its `Arbitrary` input into [`Op`]s). Both call [`run`].
//!
//! # What "activation" means here
//!
//! A connection is *activated* when it takes a permit: the first
//! [`Action::SpawnHook`] (kind activate) or [`Action::Connect`] naming it while it
//! waits in line. A failed on-activate hook gives the permit back and puts the
//! connection back in line; its next `SpawnHook`/`Connect` is a new activation.
//! The `Connect` that follows a successful hook is not one (the permit is already
//! held).
//!
//! # Checks
//!
//! After every step: [`Core::check_invariants`], the core's observers against the
//! shadow, and
//! 1. at each activation the holders (Activating + Proxying) are fewer than the
//!    permits in force, and at all times they are at most the permits in force
//!    when the latest of them was activated;
//! 2. each activation names the earliest-accepted connection still waiting;
//! 3. no `SpawnHook` while the previous hook is unreaped, `KillHook` only for the
//!    live hook (or the one reaped in this very step);
//! 4. with an on-activate hook configured, a `Connect` from the line needs a kept
//!    preparation, a `Connect` during a hook needs its success, and `StartRelay`
//!    needs a `Connect` and an upstream that connected;
//! 5. every accepted connection gets exactly one `Close`, whose outcome matches
//!    its state and what was fed (and whose deadline had passed, for timeouts),
//!    and whose `ended_by` is the relay's own word for a relay's end, the
//!    client for `Abandoned` and tcplock for every other outcome;
//!    no action names it afterwards; stale and misdirected inputs produce no
//!    action at all;
//! 6. the line (queued + preparing) stays within max-queue, except for those
//!    already waiting at a reload that lowered it (the allowance shrinks as they
//!    leave) and for one client let straight into a free permit (max-queue 0)
//!    while its hook runs or backs off; a `Rejected` only when the line is full;
//!    after a shutdown that closes the queue (or once a serving one was forced
//!    or its grace ended) no `Connect`, `SpawnHook` or `StartRelay`; one
//!    serving the queue keeps activating in order; the core finishes once the
//!    hook is reaped and the grace ends, and logs `ShutdownDone` with the
//!    clients served and closed then, once;
//! 7. `poll_timeout()` is after the latest `now`, and nothing is overdue: every
//!    deadline the shadow knows of (queue, connect, TTL, hook, grace, retry)
//!    that passed has been acted on, and the core is never stuck with a free
//!    permit, a waiting client and nothing to wait for;
//! 8. a paused accept is resumed (`ResumeAccepting`) in the step a connection
//!    closes or a hook exits, or once its backoff (50 ms doubling to 1 s,
//!    reset by an accept) runs out; never when not paused, never after
//!    shutdown.
//!
//! A `QueueStalled` warning only when the head waited `stall_warn_ms`, every
//! permit is held by a proxying connection and the shell's answer to the
//! `ReportIdle` said idle that long; once per stall (until an activation or an
//! answer below the limit clears it).
//!
//! Also: a due on-timeout hook runs before the next on-activate one, hooks run
//! the command in force, the facts a hook is told (`HookContext`) and the
//! [`Stats`](super::Stats) agree with the actions, and a state dump lists
//! exactly the live connections.
//!
//! Supervised runs (`Settings::service`): a fake shell answers the service
//! actions from a process table, and the service's invariants are checked
//! against the core's news; see `service.rs` for what is checked and what the
//! connection shadow leaves to the core there. Nothing is masked: every path
//! the ops reach is driven.
//!
//! # Ordering within one input
//!
//! An input first fires the deadlines that passed (and may let clients through)
//! and only then applies itself. The shadow follows the action stream and uses
//! the core's log lines as markers where the order matters: `Accepted` (the
//! newcomer exists from there on), `HookFailed` (the client goes back in line),
//! `StopAccepting` and `ShutdownForced` (the shutdown starts). A reload has no
//! marker, so the driver ticks to the reload's time first.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;

// For the fuzz target, which names its reloads' lists from it.
#[cfg(feature = "model")]
pub use pool::NAMES as POOL_NAMES;
use service::{FakeShell, ServiceFed, View};
pub use service::{Mood, StrayService};

use super::{
    ACCEPT_RETRY_BASE_MS, ACCEPT_RETRY_MAX_MS, Action, ConnId, ConnRef, Core, EndedBy, Event,
    HookExit, HookId, HookKind, HookRequest, InstanceId, Outcome, OutcomeCounts, ProxyHeader,
    RETRY_BASE_MS, RETRY_MAX_MS, RejectReason, RelayCause, RelayEnd, ServiceExit, Settings,
};

/// Appends a line to the model's trace, formatting nothing unless tracing is on.
macro_rules! trace {
    ($model:expr, $($arg:tt)*) => {
        if $model.tracing {
            let _ = writeln!($model.trace, $($arg)*);
        }
    };
}

mod checks;
mod driver;
mod pool;
mod service;
mod shadow;
#[cfg(test)]
mod tests;

/// One step of a scenario. Ops that name a connection pick it by index among
/// those it applies to (modulo their number); an op with nothing to apply to
/// is skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
// Test input, built once per step: a box for `Reload` buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum Op {
    /// A client connects.
    Accept,
    /// `--accept-proxy`: the shell read the PROXY header of a connection
    /// waiting for it (a `Client` address is replaced by the model's own).
    ProxyHeader(u8, ProxyHeader),
    /// A waiting client (Queued or Activating) goes away.
    ClientLeft(u8),
    /// A waiting client's end of stream arrives (after bytes it sent).
    ClientEof(u8),
    /// The upstream accepted a connecting connection.
    UpstreamConnected(u8),
    /// The upstream refused a connecting connection.
    UpstreamFailed(u8),
    /// The shell tries an address of a connecting connection, with this
    /// many addresses left counting it (ticks to its time first).
    ConnectAttempt(u8, u8),
    /// A proxying connection ended.
    RelayEnded(u8, RelayEnd),
    /// The running hook ended (skipped if none runs).
    HookExited(HookExit),
    /// The clock moves on by this many ms; nothing is fed (the next input
    /// carries the new time).
    Advance(u64),
    /// `handle_tick` now, whether or not a deadline passed.
    Tick,
    /// Jump to the core's next deadline (if any) and tick, as the loop does.
    Wake,
    /// New settings (sanitized to what the config can produce).
    Reload(Box<Settings>),
    /// The shell paused accepting (out of descriptors). Ticks to its time
    /// first, like a reload, so the shadow knows which pause it arms.
    AcceptPaused,
    /// SIGUSR1.
    DumpState,
    /// SIGTERM (a second one forces).
    Shutdown,
    /// The shell answers a pending `ReportIdle`: its holders moved no byte
    /// for this many ms (skipped if none is pending).
    HoldersIdle(u64),
    /// An operator paused activations (`pause`, `drain`). Ticks to its time
    /// first, so the shadow knows which activations came before it.
    Pause,
    /// An operator resumed activations.
    Resume,
    /// An operator killed a live connection, in any state.
    Kill(u8),
    /// An input that must be ignored: for an ended connection (possibly with a
    /// reused slot), for a live one in the wrong state, or an old hook id. Fed
    /// at the latest time already passed, so no deadline can fire either.
    Stray(u8, StrayInput),
    // ----- the supervised upstream (see `service.rs`) -----
    /// The fake shell answers the oldest unanswered `ProbeUpstream` (late,
    /// with [`Mood::late_probes`]; otherwise the shell answers at once).
    AnswerProbe,
    /// The fake shell answers the `SpawnService` (it does so at once on its own).
    AnswerSpawn,
    /// The fake shell answers the oldest `SampleService` (at once on its own).
    AnswerSample,
    /// The fake shell reports the death of the generation's leader (at once
    /// on its own).
    ReportExit,
    /// The live generation's leader dies unasked; its other processes live on.
    ServiceCrash(ServiceExit),
    /// The fake shell and the generations it spawns behave so from now on.
    Mood(Mood),
    /// Another program holds the upstream port for this many ms.
    PortTaken(u64),
    /// `handle_service_restart`: an operator asks for a restart.
    ServiceRestart,
    /// A service answer for a generation never asked about: ignored.
    StrayService(u8, StrayService),
    // ----- a pool of instances (see `pool.rs`; with one instance these are
    // the ops above for it) -----
    /// The leader of the live generation of the instance at this index
    /// (modulo the live ones) dies unasked.
    InstanceCrash(u8, ServiceExit),
    /// `handle_service_restart` for the instance at this index minus one
    /// (modulo the live ones); 0: every instance (a rolling restart).
    InstanceRestart(u8),
    /// The generations of the instance at this index (modulo the live ones)
    /// behave so from now on.
    InstanceMood(u8, Mood),
}

/// The kind of input an [`Op::Stray`] feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StrayInput {
    /// `handle_client_left` (ignored for a proxying connection too).
    ClientLeft,
    /// `handle_client_eof` (ignored for a proxying connection too).
    ClientEof,
    /// `handle_upstream_connected` for one that is not connecting.
    UpstreamConnected,
    /// `handle_upstream_failed` for one that is not connecting.
    UpstreamFailed,
    /// `handle_relay_ended` for one that is not proxying.
    RelayEnded(RelayEnd),
    /// `handle_hook_exited` with a hook id that is not the running hook's.
    HookExited,
    /// `handle_proxy_header` for one that is not waiting for its header.
    ProxyHeader,
}

/// Clamps settings to what `config` can produce: at least one permit, and
/// `Some(0)` durations mean "no limit".
pub fn sanitize(mut s: Settings) -> Settings {
    s.permits = s.permits.clamp(1, 1_000_000);
    s.max_queue = s.max_queue.min(1_000_000);
    let limit = |d: Option<u64>| d.filter(|ms| *ms > 0).map(|ms| ms.min(MAX_MS));
    s.ttl_ms = limit(s.ttl_ms);
    s.queue_timeout_ms = limit(s.queue_timeout_ms);
    s.connect_timeout_ms = limit(s.connect_timeout_ms);
    s.hook_timeout_ms = limit(s.hook_timeout_ms);
    s.proxy_header_timeout_ms = limit(s.proxy_header_timeout_ms);
    s.shutdown_grace_ms = s.shutdown_grace_ms.min(MAX_MS);
    s.stall_warn_ms = limit(s.stall_warn_ms);
    if let Some(service) = &mut s.service {
        service.ready_timeout_ms = service.ready_timeout_ms.clamp(1, MAX_MS);
        service.stop_timeout_ms = service.stop_timeout_ms.clamp(1, MAX_MS);
        service.restart_after = service.restart_after.filter(|n| *n > 0);
        service.restart_rss_kib = service.restart_rss_kib.filter(|n| *n > 0);
        service.max_lifetime_ms = limit(service.max_lifetime_ms);
        service.idle_stop_ms = limit(service.idle_stop_ms);
    }
    s
}

/// The longest duration the config accepts (100 years), in ms.
const MAX_MS: u64 = 100 * 365 * 24 * 3_600_000;

/// One longest advance: ten days. Keeps the clock far from `u64::MAX`.
const MAX_ADVANCE_MS: u64 = 10 * 24 * 3_600_000;

/// A broken invariant, with the steps that led to it.
#[derive(Debug)]
pub struct Failure {
    /// The step (1-based; the wind-down counts on) that broke it.
    pub step: usize,
    /// Which invariant broke, and how.
    pub message: String,
    /// The initial settings and one line per step (ops as fed, with the
    /// connection or hook they resolved to), then the actions of the failing
    /// step.
    pub trace: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "step {}: {}\n--- trace ---\n{}",
            self.step, self.message, self.trace
        )
    }
}

/// Runs `ops` against a fresh core, then shuts down and drains it; checks every
/// step. Runs without a trace (fast, for the fuzzer); on a failure, replays the
/// same steps (everything is deterministic) with the trace on, so the
/// [`Failure`] shows how it got there.
///
/// Settings naming two instances or more run the pool model instead
/// ([`pool`]): its history checks per instance and across the pool, no exact
/// shadow. With one instance, a reload keeps that one (the shadow predicts a
/// single upstream).
pub fn run(initial: Settings, ops: &[Op]) -> Result<(), Failure> {
    if pool::is_pool(&initial) {
        return pool::run(initial, ops, false);
    }
    match run_with(initial.clone(), ops, false) {
        Ok(()) => Ok(()),
        Err(_) => run_traced(initial, ops),
    }
}

/// [`run`] with the trace on from the start. Use it to replay a panic inside
/// the core (a debug assertion, say): the trace up to the panic goes to stderr.
pub fn run_traced(initial: Settings, ops: &[Op]) -> Result<(), Failure> {
    if pool::is_pool(&initial) {
        return pool::run(initial, ops, true);
    }
    run_with(initial, ops, true)
}

fn run_with(initial: Settings, ops: &[Op], tracing: bool) -> Result<(), Failure> {
    let mut model = Model::new(sanitize(initial), tracing);
    model.begin()?;
    for op in ops {
        model.step(op)?;
    }
    model.wind_down()
}

// ----- the shadow -----

#[derive(Clone, Copy, Debug)]
enum State {
    /// `--accept-proxy`: accepted, its PROXY header not read yet; not in
    /// line. `deadline`: when it is rejected without one.
    Header {
        deadline: u64,
    },
    /// In line: never activated, or back after a failed hook.
    Waiting,
    /// Its on-activate hook runs; `ok` once its success was fed (this step).
    Hooking {
        hook: HookId,
        ok: bool,
    },
    /// `attempt`: when the address being tried has used up its share.
    Connecting {
        deadline: Option<u64>,
        attempt: Option<u64>,
    },
    Proxying {
        deadline: Option<u64>,
    },
}

struct Shadow {
    conn: ConnRef,
    accepted_at: u64,
    /// When it joined the line, as a sequence number: the line is in this
    /// order (accept order, unless PROXY headers completed in another).
    joined: u64,
    queue_deadline: Option<u64>,
    state: State,
    /// While holding a permit: (activation sequence number, permits then).
    permit: Option<(u64, u32)>,
    /// Cleared for the upstream by a successful hook or a kept preparation,
    /// or activated with no hook configured.
    cleared: bool,
    /// Activated at least once (it may be back in line after a failed hook).
    admitted: bool,
    /// On-activate hook runs started for it.
    hook_runs: u32,
    /// Its end of stream arrived while it waited, and it was kept.
    eof: bool,
}

struct HookRun {
    id: HookId,
    kind: HookKind,
    conn: Option<ConnId>,
    deadline: Option<u64>,
    kill_sent: bool,
}

struct ShutdownState {
    grace_deadline: u64,
    forced: bool,
    /// `--shutdown-queue serve`: waiting clients are still activated until
    /// the grace ends or a second stop.
    serving: bool,
    /// The grace has certainly run out: a waiting or proxying client was
    /// closed for it, a hook killed for it, or a step ended past it. (Within
    /// the step that passes it, deadlines before it may still activate.)
    grace_over: bool,
    /// Activations (`StartRelay`) since it began, and waiting clients closed.
    served: u64,
    closed: u64,
    done_logged: bool,
}

/// What the current step fed, to judge the actions it produced.
#[derive(Default)]
struct Fed {
    accepted: Option<ConnId>,
    /// The PROXY header read for this connection, with the client address
    /// the model gave a `Client` header.
    header: Option<(ConnId, ProxyHeader)>,
    /// The newcomer, until the core logs its arrival: deadlines that fire and
    /// hooks that start before that (as the core catches up to the time of the
    /// accept) do not see it.
    arriving: Option<Shadow>,
    left: Option<ConnId>,
    /// Waiting clients whose end of stream drops them (`drop_queued_eof`):
    /// the one whose end arrived, or all those kept so far when a reload
    /// turns dropping on.
    dropped_at_eof: Vec<ConnId>,
    connected: Option<ConnId>,
    failed: Option<ConnId>,
    relay_end: Option<(ConnId, RelayEnd)>,
    hook_success_for: Option<ConnId>,
    /// An operator's `kill` named it.
    killed: Option<ConnId>,
    /// The step must produce no action at all.
    quiet: bool,
    shutdown: bool,
    dump: bool,
    /// Filled while draining.
    rejected: bool,
    stop_accepting: bool,
    dumped: Vec<ConnId>,
    /// `Close` actions seen in this step.
    closes: usize,
    /// The idle time the shell reported in this step.
    idle: Option<u64>,
    /// The supervised upstream's part.
    svc: ServiceFed,
}

struct Model {
    core: Core,
    settings: Settings,
    /// The model's clock.
    now: u64,
    /// The latest `now` passed to the core.
    fed: u64,
    conns: BTreeMap<ConnId, Shadow>,
    /// Ended connections, most recent last (bounded), for stray inputs.
    ended: Vec<ConnRef>,
    accepted: u64,
    closed: u64,
    last_id: u64,
    /// Connections that joined the line so far (see [`Shadow::joined`]).
    joins: u64,
    hook: Option<HookRun>,
    just_reaped: Option<HookId>,
    old_hooks: Vec<HookId>,
    prepared: bool,
    hook_failures: u32,
    retry_until: Option<u64>,
    timeout_due: bool,
    /// The connection of the latest TTL expiry.
    last_expired: Option<ConnId>,
    /// How the latest connection that held a permit ended, and who ended it.
    last_outcome: Option<Outcome>,
    last_ended_by: Option<EndedBy>,
    shutdown: Option<ShutdownState>,
    /// Waiting clients allowed above max-queue since the last reload.
    allowance: usize,
    /// A `ReportIdle` is waiting for its answer.
    idle_pending: bool,
    /// The current stall was warned about.
    stall_warned: bool,
    /// While accepting is paused: when the core must resume it at the latest.
    accept_paused_until: Option<u64>,
    /// The backoff the next pause arms.
    accept_backoff: u64,
    /// An operator paused activations.
    paused: bool,
    activations: u64,
    tracing: bool,
    /// StartRelay actions seen, and Close actions by outcome (as `Stats`).
    relays: u64,
    outcomes: OutcomeCounts,
    trace: String,
    steps: usize,
    /// The fake shell's process table (supervised runs).
    shell: FakeShell,
    /// The service as the core's news tells it.
    view: View,
}

impl Model {
    fn new(settings: Settings, tracing: bool) -> Self {
        let trace = if tracing {
            format!("initial {settings:?}\n")
        } else {
            String::new()
        };
        let ever = settings.service.is_some();
        Model {
            core: Core::new(settings.clone(), 0),
            settings,
            now: 0,
            fed: 0,
            conns: BTreeMap::new(),
            ended: Vec::new(),
            accepted: 0,
            closed: 0,
            last_id: 0,
            joins: 0,
            hook: None,
            just_reaped: None,
            old_hooks: Vec::new(),
            prepared: false,
            hook_failures: 0,
            retry_until: None,
            timeout_due: false,
            last_expired: None,
            last_outcome: None,
            last_ended_by: None,
            shutdown: None,
            allowance: 0,
            idle_pending: false,
            stall_warned: false,
            accept_paused_until: None,
            accept_backoff: ACCEPT_RETRY_BASE_MS,
            activations: 0,
            paused: false,
            tracing,
            relays: 0,
            outcomes: OutcomeCounts::default(),
            view: View {
                ever,
                ..View::default()
            },
            shell: FakeShell::default(),
            trace,
            steps: 0,
        }
    }
}

impl Drop for Model {
    /// A panic inside the core (its own debug check, an overflow) unwinds
    /// through here: print the steps that led to it.
    fn drop(&mut self) {
        if self.tracing && std::thread::panicking() {
            eprintln!("--- model trace up to the panic ---\n{}", self.trace);
        }
    }
}

/// Feeds a pause (or a resume) and checks the core's answer: it changed
/// something exactly when the driver's own `paused` flips.
fn pause_or_resume(
    core: &mut Core,
    paused: &mut bool,
    now: u64,
    pause: bool,
) -> Result<(), String> {
    let changed = *paused != pause;
    *paused = pause;
    let answer = if pause {
        core.handle_pause(now)
    } else {
        core.handle_resume(now)
    };
    if answer != changed {
        return Err(format!(
            "pause/resume answered {answer}, expected {changed}"
        ));
    }
    Ok(())
}

fn client_addr(n: u64) -> SocketAddr {
    let [.., a, b, c] = n.to_be_bytes();
    SocketAddr::from(([10, a, b, c], 40_000))
}

fn brief(action: &Action) -> String {
    match action {
        Action::Connect { conn: c, .. } => format!("Connect({})", c.id),
        Action::StartRelay(c) => format!("StartRelay({})", c.id),
        Action::Close { conn, outcome, .. } => format!("Close({}, {outcome})", conn.id),
        Action::SpawnHook(r) => format!(
            "SpawnHook({}, {:?} for conn {}, {:?})",
            r.hook, r.context.kind, r.context.conn, r.run
        ),
        Action::KillHook(h) => format!("KillHook({h})"),
        other => format!("{other:?}"),
    }
}
