//! Model checking of the core: a driver that feeds it a sequence of [`Op`]s the
//! way the shell would, a shadow of what the shell knows (built only from the
//! actions the core emits and the inputs fed to it), and a checker of the
//! invariants of DESIGN.md after every step.
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
//!    after shutdown no `Connect`, `SpawnHook` or `StartRelay`, and the core
//!    finishes once the hook is reaped and the grace ends;
//! 7. `poll_timeout()` is after the latest `now`, and nothing is overdue: every
//!    deadline the shadow knows of (queue, connect, TTL, hook, grace, retry)
//!    that passed has been acted on, and the core is never stuck with a free
//!    permit, a waiting client and nothing to wait for;
//! 8. a paused accept is resumed (`ResumeAccepting`) in the step a connection
//!    closes or a hook exits, or once its backoff (50 ms doubling to 1 s,
//!    reset by an accept) runs out; never when not paused, never after
//!    shutdown.
//!
//! Also: a due on-timeout hook runs before the next on-activate one, hooks run
//! the command in force, the facts a hook is told (`HookContext`) and the
//! [`Stats`](super::Stats) agree with the actions, and a state dump lists
//! exactly the live connections.
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

use super::{
    ACCEPT_RETRY_BASE_MS, ACCEPT_RETRY_MAX_MS, Action, ConnId, ConnRef, Core, EndedBy, Event,
    HookExit, HookId, HookKind, HookRequest, Outcome, OutcomeCounts, RETRY_BASE_MS, RETRY_MAX_MS,
    RelayCause, RelayEnd, Settings,
};

/// Appends a line to the model's trace, formatting nothing unless tracing is on.
macro_rules! trace {
    ($model:expr, $($arg:tt)*) => {
        if $model.tracing {
            let _ = writeln!($model.trace, $($arg)*);
        }
    };
}

/// One step of a scenario. Ops that name a connection pick it by index among
/// those it applies to (modulo their number); an op with nothing to apply to
/// is skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A client connects.
    Accept,
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
    Reload(Settings),
    /// The shell paused accepting (out of descriptors). Ticks to its time
    /// first, like a reload, so the shadow knows which pause it arms.
    AcceptPaused,
    /// SIGUSR1.
    DumpState,
    /// SIGTERM (a second one forces).
    Shutdown,
    /// An input that must be ignored: for an ended connection (possibly with a
    /// reused slot), for a live one in the wrong state, or an old hook id. Fed
    /// at the latest time already passed, so no deadline can fire either.
    Stray(u8, StrayInput),
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
    s.shutdown_grace_ms = s.shutdown_grace_ms.min(MAX_MS);
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
pub fn run(initial: Settings, ops: &[Op]) -> Result<(), Failure> {
    match run_with(initial.clone(), ops, false) {
        Ok(()) => Ok(()),
        Err(_) => run_traced(initial, ops),
    }
}

/// [`run`] with the trace on from the start. Use it to replay a panic inside
/// the core (a debug assertion, say): the trace up to the panic goes to stderr.
pub fn run_traced(initial: Settings, ops: &[Op]) -> Result<(), Failure> {
    run_with(initial, ops, true)
}

fn run_with(initial: Settings, ops: &[Op], tracing: bool) -> Result<(), Failure> {
    let mut model = Model::new(sanitize(initial), tracing);
    for op in ops {
        model.step(op)?;
    }
    model.wind_down()
}

// ----- the shadow -----

#[derive(Clone, Copy, Debug)]
enum State {
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
}

/// What the current step fed, to judge the actions it produced.
#[derive(Default)]
struct Fed {
    accepted: Option<ConnId>,
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
    /// While accepting is paused: when the core must resume it at the latest.
    accept_paused_until: Option<u64>,
    /// The backoff the next pause arms.
    accept_backoff: u64,
    activations: u64,
    tracing: bool,
    /// StartRelay actions seen, and Close actions by outcome (as `Stats`).
    relays: u64,
    outcomes: OutcomeCounts,
    trace: String,
    steps: usize,
}

impl Model {
    fn new(settings: Settings, tracing: bool) -> Self {
        let trace = if tracing {
            format!("initial {settings:?}\n")
        } else {
            String::new()
        };
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
            accept_paused_until: None,
            accept_backoff: ACCEPT_RETRY_BASE_MS,
            activations: 0,
            tracing,
            relays: 0,
            outcomes: OutcomeCounts::default(),
            trace,
            steps: 0,
        }
    }

    fn step(&mut self, op: &Op) -> Result<(), Failure> {
        self.steps += 1;
        let mut fed = Fed::default();
        if self.tracing {
            let _ = write!(self.trace, "#{} ", self.steps);
        }
        let result = self
            .feed(op, &mut fed)
            .and_then(|()| self.drain(&mut fed))
            .and_then(|()| self.check_after(&fed));
        result.map_err(|message| Failure {
            step: self.steps,
            message,
            trace: self.trace.clone(),
        })
    }

    /// Shuts down (if not yet), reaps the hook, lets the grace run out, and
    /// checks that the core finished with every connection closed once.
    fn wind_down(&mut self) -> Result<(), Failure> {
        if self.shutdown.is_none() {
            self.step(&Op::Shutdown)?;
        }
        for _ in 0..4_096 {
            if self.hook.is_some() {
                self.step(&Op::HookExited(HookExit::Signaled(9)))?;
            } else if !self.conns.is_empty() {
                if self.core.poll_timeout().is_none() {
                    return Err(self.fail("stuck after shutdown: connections open, no deadline"));
                }
                self.step(&Op::Wake)?;
            } else {
                break;
            }
        }
        if !self.core.is_finished() {
            return Err(self.fail("not finished after shutdown, reaping and grace"));
        }
        if self.accepted != self.closed {
            return Err(self.fail(&format!(
                "{} accepted but {} closed",
                self.accepted, self.closed
            )));
        }
        Ok(())
    }

    fn fail(&self, message: &str) -> Failure {
        Failure {
            step: self.steps,
            message: message.to_string(),
            trace: self.trace.clone(),
        }
    }

    // ----- feeding -----

    fn feed(&mut self, op: &Op, fed: &mut Fed) -> Result<(), String> {
        self.just_reaped = None;
        match op {
            Op::Accept => {
                self.fed = self.now;
                let client = client_addr(self.accepted);
                trace!(self, "t={} accept", self.now);
                let conn = self.core.handle_accepted(self.now, client);
                trace!(self, "    = conn {}", conn.id);
                if conn.id.0 <= self.last_id {
                    return Err(format!("accept reused id {}", conn.id));
                }
                self.last_id = conn.id.0;
                self.accepted += 1;
                self.accept_backoff = ACCEPT_RETRY_BASE_MS;
                fed.accepted = Some(conn.id);
                fed.arriving = Some(Shadow {
                    conn,
                    accepted_at: self.now,
                    queue_deadline: self.settings.queue_timeout_ms.map(|t| self.now + t),
                    state: State::Waiting,
                    permit: None,
                    cleared: false,
                    admitted: false,
                    hook_runs: 0,
                    eof: false,
                });
            }
            Op::ClientLeft(i) => {
                let Some(conn) = self.pick(*i, |s| !matches!(s, State::Proxying { .. })) else {
                    return self.skip(op);
                };
                self.fed = self.now;
                trace!(self, "t={} client_left conn {}", self.now, conn.id);
                fed.left = Some(conn.id);
                self.core.handle_client_left(self.now, conn);
            }
            Op::ClientEof(i) => {
                let Some(conn) = self.pick(*i, |s| !matches!(s, State::Proxying { .. })) else {
                    return self.skip(op);
                };
                self.fed = self.now;
                trace!(self, "t={} client_eof conn {}", self.now, conn.id);
                if self.settings.drop_queued_eof {
                    fed.dropped_at_eof.push(conn.id);
                } else if let Some(s) = self.conns.get_mut(&conn.id) {
                    s.eof = true;
                }
                self.core.handle_client_eof(self.now, conn);
            }
            Op::UpstreamConnected(i) | Op::UpstreamFailed(i) => {
                let Some(conn) = self.pick(*i, |s| matches!(s, State::Connecting { .. })) else {
                    return self.skip(op);
                };
                self.fed = self.now;
                if matches!(op, Op::UpstreamConnected(_)) {
                    trace!(self, "t={} connected conn {}", self.now, conn.id);
                    fed.connected = Some(conn.id);
                    self.core.handle_upstream_connected(self.now, conn);
                } else {
                    trace!(self, "t={} connect_failed conn {}", self.now, conn.id);
                    fed.failed = Some(conn.id);
                    self.core.handle_upstream_failed(self.now, conn, "refused");
                }
            }
            Op::ConnectAttempt(i, left) => {
                self.tick_first(fed)?;
                let Some(conn) = self.pick(*i, |s| matches!(s, State::Connecting { .. })) else {
                    return self.skip(op);
                };
                let now = self.now;
                trace!(self, "t={now} connect_attempt conn {} left {left}", conn.id);
                fed.quiet = true;
                let left = usize::from(*left);
                let s = self.shadow_mut(conn.id);
                if let State::Connecting { deadline, attempt } = &mut s.state {
                    *attempt = deadline.filter(|_| left > 1).and_then(|ends| {
                        let share = ((ends - now) / left as u64).max(1);
                        (now + share < ends).then_some(now + share)
                    });
                }
                self.core.handle_connect_attempt(now, conn, left);
            }
            Op::RelayEnded(i, end) => {
                let Some(conn) = self.pick(*i, |s| matches!(s, State::Proxying { .. })) else {
                    return self.skip(op);
                };
                self.fed = self.now;
                trace!(self, "t={} relay_ended conn {} {end:?}", self.now, conn.id);
                fed.relay_end = Some((conn.id, *end));
                self.core.handle_relay_ended(self.now, conn, *end);
            }
            Op::HookExited(exit) => {
                let Some(run) = self.hook.take() else {
                    return self.skip(op);
                };
                self.fed = self.now;
                trace!(
                    self,
                    "t={} hook {} ({:?}) exited {exit}", self.now, run.id, run.kind
                );
                self.reaped(&run, exit, fed);
                self.core.handle_hook_exited(self.now, run.id, exit.clone());
            }
            Op::Advance(ms) => {
                let ms = (*ms).min(MAX_ADVANCE_MS);
                self.now += ms;
                trace!(self, "advance {ms}ms to t={}", self.now);
            }
            Op::Tick => {
                self.fed = self.now;
                trace!(self, "t={} tick", self.now);
                self.core.handle_tick(self.now);
            }
            Op::Wake => {
                if let Some(deadline) = self.core.poll_timeout() {
                    self.now = self.now.max(deadline);
                }
                self.fed = self.now;
                trace!(self, "t={} wake", self.now);
                self.core.handle_tick(self.now);
            }
            Op::AcceptPaused => {
                self.tick_first(fed)?;
                trace!(self, "t={} accept_paused", self.now);
                if self.shutdown.is_none() && self.accept_paused_until.is_none() {
                    self.accept_paused_until = Some(self.now + self.accept_backoff);
                    self.accept_backoff = (self.accept_backoff * 2).min(ACCEPT_RETRY_MAX_MS);
                } else {
                    fed.quiet = true;
                }
                self.core.handle_accept_paused(self.now);
            }
            Op::Reload(settings) => {
                // The shell reads the clock, then reloads. A reload at a later
                // time would first fire the deadlines under the old settings,
                // which nothing in the action stream would mark; ticking first
                // keeps the shadow's settings in step with the core's.
                self.tick_first(fed)?;
                let settings = sanitize(settings.clone());
                trace!(self, "t={} reload {settings:?}", self.now);
                if settings.drop_queued_eof && !self.settings.drop_queued_eof {
                    fed.dropped_at_eof = self
                        .conns
                        .values()
                        .filter(|s| s.eof && !matches!(s.state, State::Proxying { .. }))
                        .map(|s| s.conn.id)
                        .collect();
                }
                // The core counts its line after dropping them.
                self.allowance = self
                    .conns
                    .values()
                    .filter(|s| matches!(s.state, State::Waiting | State::Hooking { .. }))
                    .filter(|s| !fed.dropped_at_eof.contains(&s.conn.id))
                    .count();
                if settings.on_activate != self.settings.on_activate {
                    self.prepared = false;
                }
                self.settings = settings.clone();
                if self.settings.on_timeout.is_none() {
                    self.timeout_due = false;
                }
                self.core.handle_reload(self.now, settings);
            }
            Op::DumpState => {
                self.fed = self.now;
                trace!(self, "t={} dump_state", self.now);
                fed.dump = true;
                self.core.handle_dump_state(self.now);
            }
            Op::Shutdown => {
                self.fed = self.now;
                trace!(self, "t={} shutdown", self.now);
                fed.shutdown = true;
                self.core.handle_shutdown(self.now);
            }
            Op::Stray(i, input) => return self.feed_stray(*i, *input, fed),
        }
        Ok(())
    }

    /// Brings the core to the model's time with a tick of its own (a step of
    /// its own), for inputs whose shadow update must not race with deadlines.
    fn tick_first(&mut self, fed: &mut Fed) -> Result<(), String> {
        if self.now > self.fed {
            self.fed = self.now;
            trace!(self, "t={} tick (first)", self.now);
            self.core.handle_tick(self.now);
            self.drain(fed)?;
            self.check_after(fed)?;
            *fed = Fed::default();
            if self.tracing {
                let _ = write!(self.trace, "#{}' ", self.steps);
            }
        }
        Ok(())
    }

    fn skip(&mut self, op: &Op) -> Result<(), String> {
        trace!(self, "skip {op:?}");
        Ok(())
    }

    /// The `i`-th (modulo) live connection, in accept order, whose state fits.
    fn pick(&self, i: u8, fits: impl Fn(&State) -> bool) -> Option<ConnRef> {
        let n = self.conns.values().filter(|s| fits(&s.state)).count();
        if n == 0 {
            return None;
        }
        self.conns
            .values()
            .filter(|s| fits(&s.state))
            .nth(usize::from(i) % n)
            .map(|s| s.conn)
    }

    fn feed_stray(&mut self, i: u8, input: StrayInput, fed: &mut Fed) -> Result<(), String> {
        fed.quiet = true;
        let now = self.fed;
        if let StrayInput::HookExited = input {
            let live = self.hook.as_ref().map(|run| run.id);
            let candidates: Vec<HookId> = self
                .old_hooks
                .iter()
                .copied()
                .chain([HookId(u64::MAX), HookId(0)])
                .filter(|h| Some(*h) != live)
                .collect();
            let hook = candidates[usize::from(i) % candidates.len()];
            trace!(self, "t={now} stray hook {hook} exited");
            self.core.handle_hook_exited(now, hook, HookExit::Success);
            return Ok(());
        }
        let misfit = |s: &State| match input {
            StrayInput::ClientLeft | StrayInput::ClientEof => matches!(s, State::Proxying { .. }),
            StrayInput::UpstreamConnected | StrayInput::UpstreamFailed => {
                !matches!(s, State::Connecting { .. })
            }
            StrayInput::RelayEnded(_) => !matches!(s, State::Proxying { .. }),
            StrayInput::HookExited => false,
        };
        let mut candidates: Vec<ConnRef> = self.ended.clone();
        candidates.extend(
            self.conns
                .values()
                .filter(|s| misfit(&s.state))
                .map(|s| s.conn),
        );
        let Some(&conn) = candidates.get(usize::from(i) % candidates.len().max(1)) else {
            trace!(self, "skip stray {input:?}");
            return Ok(());
        };
        trace!(
            self,
            "t={now} stray {input:?} for conn {} (slot {})", conn.id, conn.slot
        );
        match input {
            StrayInput::ClientLeft => self.core.handle_client_left(now, conn),
            StrayInput::ClientEof => self.core.handle_client_eof(now, conn),
            StrayInput::UpstreamConnected => self.core.handle_upstream_connected(now, conn),
            StrayInput::UpstreamFailed => self.core.handle_upstream_failed(now, conn, "stray"),
            StrayInput::RelayEnded(end) => self.core.handle_relay_ended(now, conn, end),
            StrayInput::HookExited => {}
        }
        Ok(())
    }

    /// The shadow's side of a hook exit, applied as the core applies it: after
    /// the deadlines that passed have fired (which, with a hook running, can
    /// close connections but activate none).
    fn reaped(&mut self, run: &HookRun, exit: &HookExit, fed: &mut Fed) {
        self.just_reaped = Some(run.id);
        self.old_hooks.push(run.id);
        if self.old_hooks.len() > 8 {
            self.old_hooks.remove(0);
        }
        if run.kind != HookKind::Activate {
            return;
        }
        let waiting = run.conn.filter(|id| {
            self.conns
                .get(id)
                .is_some_and(|s| matches!(s.state, State::Hooking { hook, .. } if hook == run.id))
        });
        if exit.is_success() {
            self.hook_failures = 0;
            match waiting {
                Some(id) => {
                    fed.hook_success_for = Some(id);
                    if let Some(s) = self.conns.get_mut(&id) {
                        s.state = State::Hooking {
                            hook: run.id,
                            ok: true,
                        };
                    }
                }
                None => self.prepared = true,
            }
            return;
        }
        self.hook_failures = self.hook_failures.saturating_add(1);
        if self.shutdown.is_none() {
            let shift = (self.hook_failures - 1).min(16);
            let backoff = (RETRY_BASE_MS << shift).min(RETRY_MAX_MS);
            self.retry_until = Some(self.now + backoff);
        }
        // Its client goes back in line when the core logs the failure (the
        // deadlines that fire first see it still preparing).
    }

    // ----- draining -----

    fn drain(&mut self, fed: &mut Fed) -> Result<(), String> {
        let mut actions = Vec::new();
        while let Some(action) = self.core.poll_action() {
            let result = self.apply(&action, fed);
            actions.push(action);
            if let Err(message) = result {
                trace!(self, "  actions of this step:");
                for a in &actions {
                    trace!(self, "    {a:?}");
                }
                return Err(message);
            }
        }
        for a in &actions {
            if !matches!(a, Action::Log(_)) {
                trace!(self, "    -> {}", brief(a));
            }
        }
        if let Some(s) = &fed.arriving {
            return Err(format!("conn {} accepted but never logged", s.conn.id));
        }
        if fed.quiet && !actions.is_empty() {
            return Err(format!(
                "an input that must be ignored produced {} action(s): {:?}",
                actions.len(),
                actions[0]
            ));
        }
        Ok(())
    }

    fn apply(&mut self, action: &Action, fed: &mut Fed) -> Result<(), String> {
        let now = self.fed;
        match action {
            Action::Connect(conn) => {
                if self.shutdown.is_some() {
                    return Err(format!("Connect for conn {} after shutdown", conn.id));
                }
                let state = self.live(*conn, "Connect")?.state;
                match state {
                    State::Waiting => {
                        self.activate(conn.id)?;
                        let hooked = self.settings.on_activate.is_some();
                        if hooked && !self.prepared {
                            return Err(format!(
                                "Connect for conn {} with an on-activate hook configured, \
                                 no hook run and no preparation kept",
                                conn.id
                            ));
                        }
                        self.prepared = false;
                    }
                    State::Hooking { ok: true, .. } => {}
                    State::Hooking { ok: false, hook } => {
                        return Err(format!(
                            "Connect for conn {} while its hook {hook} has not succeeded",
                            conn.id
                        ));
                    }
                    _ => return Err(format!("Connect for conn {} in state {state:?}", conn.id)),
                }
                let deadline = self.settings.connect_timeout_ms.map(|t| now + t);
                let s = self.shadow_mut(conn.id);
                s.state = State::Connecting {
                    deadline,
                    attempt: None,
                };
                s.cleared = true;
            }
            Action::ConnectNext(conn) => {
                let state = self.live(*conn, "ConnectNext")?.state;
                let State::Connecting {
                    deadline,
                    attempt: Some(at),
                } = state
                else {
                    return Err(format!(
                        "ConnectNext for conn {} in state {state:?}",
                        conn.id
                    ));
                };
                if at > now {
                    return Err(format!(
                        "ConnectNext for conn {} before its attempt ends at {at} (now {now})",
                        conn.id
                    ));
                }
                self.shadow_mut(conn.id).state = State::Connecting {
                    deadline,
                    attempt: None,
                };
            }
            Action::StartRelay(conn) => {
                if self.shutdown.is_some() {
                    return Err(format!("StartRelay for conn {} after shutdown", conn.id));
                }
                let s = self.live(*conn, "StartRelay")?;
                if !matches!(s.state, State::Connecting { .. }) || !s.cleared {
                    return Err(format!(
                        "StartRelay for conn {} in state {:?} (cleared: {})",
                        conn.id, s.state, s.cleared
                    ));
                }
                if fed.connected != Some(conn.id) {
                    return Err(format!(
                        "StartRelay for conn {} whose upstream did not connect",
                        conn.id
                    ));
                }
                let deadline = self.settings.ttl_ms.map(|t| now + t);
                self.shadow_mut(conn.id).state = State::Proxying { deadline };
                self.relays += 1;
            }
            Action::Close {
                conn,
                outcome,
                ended_by,
                age_ms,
            } => {
                fed.closes += 1;
                self.close(*conn, *outcome, *ended_by, *age_ms, fed)?;
            }
            Action::ResumeAccepting => {
                let Some(until) = self.accept_paused_until else {
                    return Err("ResumeAccepting while accepting is not paused".to_string());
                };
                let freed = fed.closes > 0 || self.just_reaped.is_some();
                if !freed && until > now {
                    return Err(format!(
                        "ResumeAccepting before its backoff ends at {until} (now {now}) \
                         with nothing closed"
                    ));
                }
                self.accept_paused_until = None;
            }
            Action::SpawnHook(request) => self.spawned(request)?,
            Action::KillHook(hook) => {
                if self.just_reaped == Some(*hook) {
                    // Its deadline fired while the core caught up to the time
                    // of the exit, just before the exit itself: harmless, the
                    // shell no longer knows the hook.
                    return Ok(());
                }
                let shutting = self.shutdown.is_some();
                let Some(run) = self.hook.as_mut().filter(|run| run.id == *hook) else {
                    return Err(format!("KillHook for hook {hook}, which is not running"));
                };
                if !shutting && run.deadline.is_none_or(|d| d > now) {
                    return Err(format!(
                        "KillHook for hook {hook} before its deadline {:?} (now {now})",
                        run.deadline
                    ));
                }
                run.kill_sent = true;
            }
            Action::StopAccepting => {
                if !fed.shutdown || self.shutdown.is_some() {
                    return Err("StopAccepting twice or without a shutdown".to_string());
                }
                fed.stop_accepting = true;
                self.accept_paused_until = None;
                let grace = self.settings.shutdown_grace_ms;
                self.shutdown = Some(ShutdownState {
                    grace_deadline: now + grace,
                    forced: false,
                });
                self.timeout_due = false;
            }
            Action::Log(Event::ShutdownForced { .. }) => {
                if !fed.shutdown {
                    return Err("ShutdownForced without a shutdown".to_string());
                }
                if let Some(shutdown) = &mut self.shutdown {
                    shutdown.forced = true;
                }
            }
            Action::Log(Event::Accepted { conn, .. }) => match fed.arriving.take() {
                Some(s) if s.conn.id == *conn => {
                    self.conns.insert(*conn, s);
                }
                _ => return Err(format!("Accepted logged for conn {conn}, not the newcomer")),
            },
            Action::Log(Event::State { conn, .. }) => fed.dumped.push(*conn),
            Action::Log(Event::HookFailed {
                hook,
                kind: HookKind::Activate,
                conn: id,
                ..
            }) => {
                if self.just_reaped != Some(*hook) {
                    return Err(format!(
                        "HookFailed for hook {hook}, not the one just reaped"
                    ));
                }
                if let Some(s) = self.conns.get_mut(id)
                    && matches!(s.state, State::Hooking { hook: h, .. } if h == *hook)
                {
                    s.state = State::Waiting;
                    s.permit = None;
                }
            }
            Action::Log(_) => {}
        }
        Ok(())
    }

    fn live(&self, conn: ConnRef, what: &str) -> Result<&Shadow, String> {
        match self.conns.get(&conn.id) {
            Some(s) if s.conn == conn => Ok(s),
            Some(s) => Err(format!(
                "{what} names conn {} with slot {}, but it lives in slot {}",
                conn.id, conn.slot, s.conn.slot
            )),
            None if conn.id.0 <= self.last_id => {
                Err(format!("{what} names conn {}, which has ended", conn.id))
            }
            None => Err(format!("{what} names conn {}, never accepted", conn.id)),
        }
    }

    fn shadow_mut(&mut self, id: ConnId) -> &mut Shadow {
        self.conns.get_mut(&id).expect("checked live")
    }

    /// Checks and records an activation of a waiting connection.
    fn activate(&mut self, id: ConnId) -> Result<(), String> {
        let holders = self.holders();
        if holders >= self.settings.permits as usize {
            return Err(format!(
                "conn {id} activated while {holders} hold a permit (permits {})",
                self.settings.permits
            ));
        }
        let head = self
            .conns
            .values()
            .find(|s| matches!(s.state, State::Waiting))
            .map(|s| s.conn.id);
        if head != Some(id) {
            return Err(format!(
                "conn {id} activated out of order: the head of the line is {head:?}"
            ));
        }
        self.activations += 1;
        let permits = self.settings.permits;
        let seq = self.activations;
        let s = self.shadow_mut(id);
        s.permit = Some((seq, permits));
        s.admitted = true;
        Ok(())
    }

    fn spawned(&mut self, request: &HookRequest) -> Result<(), String> {
        let now = self.fed;
        if let Some(run) = &self.hook {
            return Err(format!(
                "SpawnHook {} while hook {} is still alive",
                request.hook, run.id
            ));
        }
        if self.shutdown.is_some() {
            return Err(format!("SpawnHook {} after shutdown", request.hook));
        }
        if self.old_hooks.contains(&request.hook) {
            return Err(format!("SpawnHook reuses hook id {}", request.hook));
        }
        let conn_id = request.context.conn;
        let kind = request.context.kind;
        let conn = match kind {
            HookKind::Activate => {
                if self.settings.on_activate.as_ref() != Some(&request.run) {
                    return Err(format!(
                        "on-activate hook runs {:?}, configured {:?}",
                        request.run, self.settings.on_activate
                    ));
                }
                if self.prepared {
                    return Err("an on-activate hook runs while a preparation is kept".into());
                }
                if self.timeout_due {
                    return Err("an on-activate hook runs before a due on-timeout hook".into());
                }
                if let Some(until) = self.retry_until.filter(|until| now < *until) {
                    return Err(format!(
                        "an on-activate hook runs at {now}, during the backoff until {until}"
                    ));
                }
                match self.conns.get(&conn_id).map(|s| s.state) {
                    Some(State::Waiting) => {}
                    other => {
                        return Err(format!(
                            "on-activate hook for conn {conn_id} in state {other:?}"
                        ));
                    }
                }
                self.activate(conn_id)?;
                let s = self.shadow_mut(conn_id);
                s.state = State::Hooking {
                    hook: request.hook,
                    ok: false,
                };
                s.hook_runs += 1;
                let attempt = s.hook_runs;
                self.check_context(request, attempt)?;
                Some(conn_id)
            }
            HookKind::Timeout => {
                if !self.timeout_due {
                    return Err("an on-timeout hook runs with no TTL expiry pending".into());
                }
                if self.settings.on_timeout.as_ref() != Some(&request.run) {
                    return Err(format!(
                        "on-timeout hook runs {:?}, configured {:?}",
                        request.run, self.settings.on_timeout
                    ));
                }
                if Some(conn_id) != self.last_expired {
                    return Err(format!(
                        "on-timeout hook for conn {conn_id}, the latest expiry was {:?}",
                        self.last_expired
                    ));
                }
                self.check_context(request, 1)?;
                self.timeout_due = false;
                None
            }
        };
        self.hook = Some(HookRun {
            id: request.hook,
            kind,
            conn,
            deadline: self.settings.hook_timeout_ms.map(|t| now + t),
            kill_sent: false,
        });
        Ok(())
    }

    /// The facts a hook is told (its `TCPLOCK_*` variables) match the shadow.
    fn check_context(&self, request: &HookRequest, attempt: u32) -> Result<(), String> {
        let c = &request.context;
        let queued = self
            .conns
            .values()
            .filter(|s| matches!(s.state, State::Waiting))
            .count();
        let timeouts = self.outcomes.count(Outcome::Timeout);
        let expected = (
            c.activations,
            c.timeouts,
            c.last_outcome,
            c.last_ended_by,
            c.queue_length,
            c.active,
            c.attempt,
        );
        let shadow = (
            self.relays,
            timeouts,
            self.last_outcome,
            self.last_ended_by,
            queued,
            self.holders(),
            attempt,
        );
        if expected != shadow {
            return Err(format!(
                "hook {} is told (activations, timeouts, last outcome, last ended by, queued, \
                 active, attempt) = {expected:?}, the shadow says {shadow:?}",
                request.hook
            ));
        }
        Ok(())
    }

    fn close(
        &mut self,
        conn: ConnRef,
        outcome: Outcome,
        ended_by: EndedBy,
        age_ms: u64,
        fed: &mut Fed,
    ) -> Result<(), String> {
        let now = self.fed;
        let s = self.live(conn, "Close")?;
        let (state, accepted_at, queue_deadline) = (s.state, s.accepted_at, s.queue_deadline);
        let id = conn.id;
        if age_ms != now - accepted_at {
            return Err(format!(
                "conn {id} closed with age {age_ms}, accepted at {accepted_at}, now {now}"
            ));
        }
        let proxying = matches!(state, State::Proxying { .. });
        let fits = match outcome {
            Outcome::Ok | Outcome::ClientError | Outcome::UpstreamError | Outcome::RelayError => {
                let cause = match outcome {
                    Outcome::Ok => RelayCause::Finished,
                    Outcome::ClientError => RelayCause::ClientError,
                    Outcome::UpstreamError => RelayCause::UpstreamError,
                    _ => RelayCause::RelayError,
                };
                // Who ended a relay is the shell's word, passed on as is.
                proxying && fed.relay_end == Some((id, RelayEnd { cause, ended_by }))
            }
            Outcome::Timeout => {
                matches!(state, State::Proxying { deadline: Some(d) } if d <= now)
            }
            Outcome::QueueTimeout => !proxying && queue_deadline.is_some_and(|d| d <= now),
            Outcome::ConnectFailed => match state {
                State::Connecting { deadline, .. } => {
                    fed.failed == Some(id) || deadline.is_some_and(|d| d <= now)
                }
                _ => false,
            },
            Outcome::Abandoned => {
                !proxying && (fed.left == Some(id) || fed.dropped_at_eof.contains(&id))
            }
            Outcome::Rejected => {
                fed.rejected = true;
                matches!(state, State::Waiting) && fed.accepted == Some(id)
            }
            Outcome::Shutdown => match &self.shutdown {
                None => false,
                Some(sd) => !proxying || sd.forced || sd.grace_deadline <= now,
            },
        };
        let decided_by_core = match outcome {
            Outcome::Ok | Outcome::ClientError | Outcome::UpstreamError | Outcome::RelayError => {
                None
            }
            Outcome::Abandoned => Some(EndedBy::Client),
            Outcome::Timeout
            | Outcome::QueueTimeout
            | Outcome::ConnectFailed
            | Outcome::Rejected
            | Outcome::Shutdown => Some(EndedBy::Tcplock),
        };
        if decided_by_core.is_some_and(|expected| expected != ended_by) {
            return Err(format!(
                "conn {id} closed as {outcome} but ended by {ended_by}"
            ));
        }
        if !fits {
            return Err(format!(
                "conn {id} closed as {outcome} in state {state:?} at {now} \
                 (accepted {accepted_at}, queue deadline {queue_deadline:?})"
            ));
        }
        if outcome == Outcome::Timeout && self.settings.on_timeout.is_some() {
            self.timeout_due = self.shutdown.is_none();
            self.last_expired = Some(id);
        }
        if self.conns.get(&id).is_some_and(|s| s.permit.is_some()) {
            self.last_outcome = Some(outcome);
            self.last_ended_by = Some(ended_by);
        }
        if let State::Hooking { ok: true, .. } = state {
            // It left (or timed out) just before its hook's success was seen.
            self.prepared = true;
        }
        self.conns.remove(&id);
        self.closed += 1;
        self.outcomes.add(outcome);
        self.ended.push(conn);
        if self.ended.len() > 16 {
            self.ended.remove(0);
        }
        Ok(())
    }

    // ----- after each step -----

    fn holders(&self) -> usize {
        self.conns.values().filter(|s| s.permit.is_some()).count()
    }

    /// The line as max-queue counts it: queued plus the one whose hook runs.
    fn waiting(&self) -> usize {
        self.conns
            .values()
            .filter(|s| matches!(s.state, State::Waiting | State::Hooking { .. }))
            .count()
    }

    fn check_after(&mut self, fed: &Fed) -> Result<(), String> {
        let now = self.fed;
        let core = &self.core;
        core.check_invariants()
            .map_err(|e| format!("check_invariants: {e}"))?;

        // The core's observers agree with the shadow.
        let queued = self
            .conns
            .values()
            .filter(|s| matches!(s.state, State::Waiting))
            .count();
        let holders = self.holders();
        let stats = core.stats();
        let timeouts = self.outcomes.count(Outcome::Timeout);
        if (stats.activations, stats.timeouts, stats.outcomes)
            != (self.relays, timeouts, self.outcomes)
        {
            return Err(format!(
                "stats {stats:?}, but the actions show {} relays, {timeouts} timeouts, \
                 outcomes {:?}",
                self.relays, self.outcomes
            ));
        }
        let observed = (
            core.conn_count(),
            core.active(),
            core.queue_len(),
            core.hook_running(),
            core.accept_paused(),
        );
        let shadow = (
            self.conns.len(),
            holders,
            queued,
            self.hook.as_ref().map(|r| r.id),
            self.accept_paused_until.is_some(),
        );
        if observed != shadow {
            return Err(format!(
                "core (conns, active, queued, hook, accept paused) = {observed:?}, \
                 shadow {shadow:?}"
            ));
        }
        let mut slots: Vec<usize> = self.conns.values().map(|s| s.conn.slot).collect();
        slots.sort_unstable();
        if slots.windows(2).any(|w| w[0] == w[1]) {
            return Err(format!("two live connections share a slot: {slots:?}"));
        }
        for s in self.conns.values() {
            let name = core.state_of(s.conn).map(|n| n.as_str());
            let expected = match s.state {
                State::Waiting => "queued",
                State::Hooking { .. } | State::Connecting { .. } => "activating",
                State::Proxying { .. } => "proxying",
            };
            if name != Some(expected) {
                return Err(format!(
                    "conn {} is {name:?} in the core, {expected} in the shadow",
                    s.conn.id
                ));
            }
            if let State::Hooking { ok: true, .. } = s.state {
                return Err(format!(
                    "conn {}: its hook succeeded but it did not connect",
                    s.conn.id
                ));
            }
        }

        // 1. Holders within the permits of the latest activation among them.
        if let Some((_, permits)) = self.conns.values().filter_map(|s| s.permit).max()
            && holders > permits as usize
        {
            return Err(format!(
                "{holders} hold a permit, the latest was activated with {permits}"
            ));
        }

        // 6. The line within max-queue, plus the reload's allowance, plus a
        // client that took a free permit (admitted even with max-queue 0) and
        // waits for its hook or for the retry of a failed one.
        let waiting = self.waiting();
        let straight = self
            .conns
            .values()
            .any(|s| s.admitted && matches!(s.state, State::Waiting | State::Hooking { .. }));
        let limit = self
            .settings
            .max_queue
            .max(self.allowance)
            .max(usize::from(straight));
        if waiting > limit {
            return Err(format!("{waiting} wait, above max-queue {limit}"));
        }
        self.allowance = self.allowance.min(waiting);
        if fed.rejected && waiting < self.settings.max_queue {
            return Err(format!(
                "rejected while only {waiting} wait (max-queue {})",
                self.settings.max_queue
            ));
        }

        // 7. No busy loop.
        if let Some(deadline) = core.poll_timeout()
            && deadline <= now
        {
            return Err(format!("poll_timeout {deadline} is not after now {now}"));
        }

        // 7. Nothing overdue.
        for s in self.conns.values() {
            let id = s.conn.id;
            if !matches!(s.state, State::Proxying { .. })
                && let Some(d) = s.queue_deadline.filter(|d| *d <= now)
            {
                return Err(format!(
                    "conn {id} still waits after its queue deadline {d}"
                ));
            }
            match s.state {
                State::Connecting {
                    deadline: Some(d), ..
                }
                | State::Connecting {
                    attempt: Some(d), ..
                }
                | State::Proxying { deadline: Some(d) }
                    if d <= now =>
                {
                    return Err(format!("conn {id} is {:?} past its deadline {d}", s.state));
                }
                _ => {}
            }
        }
        if let Some(until) = self.accept_paused_until {
            if until <= now {
                return Err(format!("accepting still paused after its retry at {until}"));
            }
            if fed.closes > 0 || self.just_reaped.is_some() {
                return Err("descriptors were freed but accepting stays paused".into());
            }
        }
        if let Some(run) = &self.hook
            && run.deadline.is_some_and(|d| d <= now)
            && !run.kill_sent
        {
            return Err(format!(
                "hook {} overran its timeout and was not killed",
                run.id
            ));
        }

        // Inputs that must have had an effect did.
        let gone = |id: Option<ConnId>| id.is_some_and(|id| self.conns.contains_key(&id));
        if gone(fed.left)
            || gone(fed.failed)
            || gone(fed.relay_end.map(|(id, _)| id))
            || fed.dropped_at_eof.iter().any(|id| gone(Some(*id)))
        {
            return Err(
                "a client left, a connect failed or a relay ended, but the connection lives on"
                    .into(),
            );
        }
        if let Some(id) = fed.connected
            && let Some(s) = self.conns.get(&id)
            && !matches!(s.state, State::Proxying { .. })
        {
            return Err(format!("conn {id} connected but is {:?}", s.state));
        }
        if let Some(id) = fed.hook_success_for
            && let Some(s) = self.conns.get(&id)
            && !matches!(s.state, State::Connecting { .. })
        {
            return Err(format!(
                "conn {id}'s hook succeeded but it is {:?}",
                s.state
            ));
        }
        if fed.dump {
            let mut listed = fed.dumped.clone();
            listed.sort();
            let live: Vec<ConnId> = self.conns.keys().copied().collect();
            if listed != live {
                return Err(format!("state dump lists {listed:?}, live are {live:?}"));
            }
        }

        // 6. Shutdown.
        if let Some(sd) = &self.shutdown {
            if let Some(s) = self
                .conns
                .values()
                .find(|s| !matches!(s.state, State::Proxying { .. }))
            {
                return Err(format!(
                    "conn {} still {:?} after shutdown",
                    s.conn.id, s.state
                ));
            }
            if (sd.forced || sd.grace_deadline <= now) && !self.conns.is_empty() {
                return Err(format!(
                    "{} connections outlive the shutdown grace or a forced stop",
                    self.conns.len()
                ));
            }
            if let Some(run) = &self.hook
                && !run.kill_sent
            {
                return Err(format!(
                    "hook {} still alive and unkilled after shutdown",
                    run.id
                ));
            }
        } else if fed.shutdown {
            return Err("a shutdown did not stop accepting".to_string());
        }
        let finished = self.shutdown.is_some() && self.conns.is_empty() && self.hook.is_none();
        if core.is_finished() != finished {
            return Err(format!(
                "is_finished() is {}, the shadow says {finished}",
                core.is_finished()
            ));
        }

        // Liveness: with no hook running and no shutdown, a due on-timeout
        // hook runs, and a free permit goes to the head of the line unless an
        // on-activate hook backs off.
        if self.shutdown.is_none() && self.hook.is_none() {
            if self.timeout_due {
                return Err("a TTL expired but the on-timeout hook did not run".into());
            }
            if queued > 0 && holders < self.settings.permits as usize {
                let backing_off = self.settings.on_activate.is_some()
                    && !self.prepared
                    && self.retry_until.is_some_and(|until| now < until);
                if !backing_off {
                    return Err(format!(
                        "stuck: {queued} queued, {holders} of {} permits held, no hook, no backoff",
                        self.settings.permits
                    ));
                }
            }
        }
        Ok(())
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

fn client_addr(n: u64) -> SocketAddr {
    let [.., a, b, c] = n.to_be_bytes();
    SocketAddr::from(([10, a, b, c], 40_000))
}

fn brief(action: &Action) -> String {
    match action {
        Action::Connect(c) => format!("Connect({})", c.id),
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

#[cfg(test)]
mod tests {
    //! The seeded model test: thousands of random scenarios, each reproducible
    //! from its seed (`TCPLOCK_MODEL_SEED=...` reruns one).

    use std::panic::AssertUnwindSafe;

    use super::*;
    use crate::core::HookRef;

    /// xorshift64*: tiny, deterministic, good enough to pick events.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }

        fn byte(&mut self) -> u8 {
            self.next() as u8
        }

        fn duration(&mut self) -> u64 {
            match self.below(10) {
                0..=3 => self.below(20),
                4..=6 => self.below(2_000),
                7..=8 => self.below(120_000),
                _ => self.below(6 * 3_600_000),
            }
        }

        fn limit(&mut self) -> Option<u64> {
            self.chance(60).then(|| self.duration().max(1))
        }
    }

    fn settings(rng: &mut Rng) -> Settings {
        Settings {
            permits: 1 + rng.below(4) as u32,
            max_queue: if rng.chance(20) {
                1024
            } else {
                rng.below(6) as usize
            },
            ttl_ms: rng.limit(),
            queue_timeout_ms: rng.limit(),
            connect_timeout_ms: rng.limit(),
            on_activate: match rng.below(3) {
                0 => None,
                1 => Some(HookRef(1)),
                _ => Some(HookRef(2)),
            },
            on_timeout: rng.chance(50).then_some(HookRef(3)),
            hook_timeout_ms: rng.limit(),
            shutdown_grace_ms: if rng.chance(20) { 0 } else { rng.duration() },
            upstream: "127.0.0.1:9".to_string(),
            drop_queued_eof: rng.chance(50),
        }
    }

    fn hook_exit(rng: &mut Rng) -> HookExit {
        match rng.below(20) {
            0..=11 => HookExit::Success,
            12 | 13 => HookExit::Failed(1 + rng.below(3) as i32),
            14 | 15 => HookExit::Signaled(9),
            16 => HookExit::SpawnFailed("no such file".to_string()),
            17 => HookExit::Declined,
            18 => HookExit::Dropped,
            _ => HookExit::Abandoned,
        }
    }

    fn relay_end(rng: &mut Rng) -> RelayEnd {
        let cause = match rng.below(4) {
            0 => RelayCause::Finished,
            1 => RelayCause::ClientError,
            2 => RelayCause::UpstreamError,
            _ => RelayCause::RelayError,
        };
        let ended_by = match rng.below(3) {
            0 => EndedBy::Client,
            1 => EndedBy::Upstream,
            _ => EndedBy::Tcplock,
        };
        RelayEnd { cause, ended_by }
    }

    fn op(rng: &mut Rng) -> Op {
        match rng.below(100) {
            0..=19 => Op::Accept,
            20..=23 => Op::ClientLeft(rng.byte()),
            24..=25 => Op::ClientEof(rng.byte()),
            26..=33 => Op::UpstreamConnected(rng.byte()),
            34..=36 => Op::ConnectAttempt(rng.byte(), rng.byte() % 4),
            37..=40 => Op::UpstreamFailed(rng.byte()),
            41..=50 => Op::RelayEnded(rng.byte(), relay_end(rng)),
            51..=60 => Op::HookExited(hook_exit(rng)),
            61..=70 => Op::Advance(rng.duration()),
            71..=72 => Op::AcceptPaused,
            73..=75 => Op::Tick,
            76..=84 => Op::Wake,
            85..=87 => Op::Reload(settings(rng)),
            88 => Op::DumpState,
            89 => {
                if rng.chance(50) {
                    Op::Shutdown
                } else {
                    Op::Wake
                }
            }
            _ => {
                let input = match rng.below(6) {
                    0 => StrayInput::ClientLeft,
                    1 => StrayInput::UpstreamConnected,
                    2 => StrayInput::UpstreamFailed,
                    3 => StrayInput::RelayEnded(relay_end(rng)),
                    4 => StrayInput::ClientEof,
                    _ => StrayInput::HookExited,
                };
                Op::Stray(rng.byte(), input)
            }
        }
    }

    fn scenario(seed: u64) -> (Settings, Vec<Op>) {
        let mut rng = Rng::new(seed);
        let initial = settings(&mut rng);
        let len = 10 + rng.below(250) as usize;
        let ops = (0..len).map(|_| op(&mut rng)).collect();
        (initial, ops)
    }

    fn check_seed(seed: u64) {
        let (initial, ops) = scenario(seed);
        let fast = std::panic::catch_unwind(AssertUnwindSafe(|| run(initial.clone(), &ops)));
        let result = match fast {
            Ok(result) => result,
            // A panic inside the core: the replay prints the trace up to it
            // and panics again.
            Err(_) => {
                eprintln!(
                    "model test panicked for seed {seed} \
                     (rerun: TCPLOCK_MODEL_SEED={seed} cargo test core::model)"
                );
                run_traced(initial, &ops)
            }
        };
        if let Err(failure) = result {
            panic!(
                "model test failed for seed {seed} \
                 (rerun: TCPLOCK_MODEL_SEED={seed} cargo test core::model)\n{failure}"
            );
        }
    }

    #[test]
    fn random_event_sequences_keep_every_invariant() {
        if let Some(seed) = std::env::var("TCPLOCK_MODEL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            return check_seed(seed);
        }
        let count: u64 = std::env::var("TCPLOCK_MODEL_RUNS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3_000);
        for seed in 0..count {
            check_seed(seed);
        }
    }

    #[test]
    fn the_checker_rejects_actions_the_core_must_never_emit() {
        let mut model = Model::new(Settings::default(), true);
        model.step(&Op::Accept).expect("accept");
        let conn = model.conns.values().next().expect("live").conn;
        let mut fed = Fed::default();
        let again = model.apply(&Action::Connect(conn), &mut fed);
        assert!(
            again
                .expect_err("connecting twice")
                .contains("Connect for conn 1 in state")
        );
        let relay = model.apply(&Action::StartRelay(conn), &mut fed);
        assert!(
            relay
                .expect_err("not connected")
                .contains("did not connect")
        );
        let close = Action::Close {
            conn,
            outcome: Outcome::Ok,
            ended_by: EndedBy::Client,
            age_ms: 0,
        };
        assert!(
            model.apply(&close, &mut fed).is_err(),
            "an Ok close before proxying"
        );
        let kill = model.apply(&Action::KillHook(HookId(7)), &mut fed);
        assert!(kill.expect_err("no hook").contains("not running"));
        let failure = model.fail("synthetic");
        assert!(failure.to_string().contains("= conn 1"));
    }
}
