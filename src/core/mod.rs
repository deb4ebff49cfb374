//! The pure state machine at the heart of tcplock: a FIFO counting semaphore with
//! a hook scheduler, driven by events and a clock passed in as a parameter.
//!
//! It never touches a socket, a process or the clock, so it can be unit-tested,
//! model-tested and fuzzed. The shell (the mio loop) drives it:
//!
//! 1. Feed what happened through the `handle_*` methods, each with the current
//!    monotonic time in milliseconds (`now` never goes backwards).
//! 2. After every input, drain [`Core::poll_action`] until it returns `None` and
//!    perform each action in order. Performing one may produce a new input (a
//!    connect that fails at once, say); feed it and keep draining.
//! 3. Before blocking, ask [`Core::poll_timeout`] for the next deadline and call
//!    [`Core::handle_tick`] once it has passed (calling it early is harmless).
//! 4. Stop when [`Core::is_finished`] says so (only after a shutdown).
//!
//! Each connection goes `Queued → Activating → Proxying` and then ends with one
//! [`Outcome`], announced by [`Action::Close`]; from then on the core has
//! forgotten it, and a handle or timer naming it is ignored.

// Checked after every input in debug builds, and by the model checker.
#[cfg(any(debug_assertions, test, feature = "model"))]
mod invariants;
#[cfg(any(test, feature = "model"))]
pub mod model;
mod operator;
mod pool;
mod queue;
mod service;
pub(crate) mod timer;
mod types;

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

pub use operator::{CoreStatus, PositionError, Target};
pub use types::{
    Action, ConnId, ConnRef, EndedBy, Event, Generation, HookContext, HookExit, HookId, HookKind,
    HookRef, HookRequest, InstanceId, InstanceStats, Outcome, OutcomeCounts, ProxyHeader,
    RejectReason, RelayCause, RelayEnd, RestartOn, RestartReason, ServiceExit, ServiceRef,
    ServiceSample, ServiceSettings, ServiceStateName, ServiceStats, Settings, StateName, Stats,
    StopSignal,
};

use std::collections::VecDeque;
use std::net::SocketAddr;

use slab::Slab;

use pool::Instance;
use queue::WaitQueue;
use service::{Service, ServiceTimer};
use timer::{TimerKey, TimerWheel};

/// The first retry of a failed on-activate hook waits this long; each further
/// consecutive failure doubles it, up to [`RETRY_MAX_MS`].
pub const RETRY_BASE_MS: u64 = 500;
/// The longest wait between two on-activate hook attempts.
pub const RETRY_MAX_MS: u64 = 30_000;
/// A paused accept is first retried after this long; each further pause
/// without an accept in between doubles it, up to [`ACCEPT_RETRY_MAX_MS`].
pub const ACCEPT_RETRY_BASE_MS: u64 = 50;
/// The longest wait before a paused accept is retried.
pub const ACCEPT_RETRY_MAX_MS: u64 = 1_000;

/// The state machine. See the module documentation for the calling contract.
pub struct Core {
    settings: Settings,
    conns: Slab<Conn>,
    /// Waiting connections in accept order.
    queue: WaitQueue,
    /// Connections holding a permit of any instance: Activating plus Proxying.
    active: usize,
    /// The pool, by number less one. A removed instance keeps its place
    /// until an added one reuses it.
    instances: Vec<Instance>,
    next_conn_id: u64,
    timers: TimerWheel<Deadline>,
    next_hook_id: u64,
    shutdown: Option<Shutdown>,
    counters: Counters,
    actions: VecDeque<Action>,
    /// The latest `now` seen, to check that the next deadline lies after it.
    now: u64,
    /// Clients waiting at the last reload: a lowered max-queue turns no one
    /// away, so until they drain the line may stand above the new limit.
    reload_backlog: usize,
    /// While the shell does not accept (out of descriptors): the timer that
    /// makes it try again even if nothing of ours closes meanwhile.
    accept_retry: Option<TimerKey>,
    /// The wait before the next paused accept is retried.
    accept_backoff_ms: u64,
    /// The next look at whether the queue is stalled (`--stall-warn`).
    stall_check: Option<TimerKey>,
    /// An [`Action::ReportIdle`] is out and its answer not yet in.
    idle_asked: bool,
    /// The current stall was logged; cleared when the queue moves or a
    /// holder is found moving bytes again.
    stall_warned: bool,
    /// An operator paused activations (`pause`, `drain`): clients are still
    /// accepted, queued and timed out, but none is let through.
    paused: bool,
    /// Moving average of recent proxying durations, in ms, for `position`'s
    /// ETA; `None` until one connection finished proxying.
    proxy_ms_avg: Option<u64>,
}

/// What only history can tell; everything else in [`Stats`] is read off the
/// current state.
#[derive(Default)]
struct Counters {
    activations: u64,
    timeouts: u64,
    outcomes: OutcomeCounts,
}

struct Conn {
    id: ConnId,
    client: SocketAddr,
    /// `--accept-proxy`: the balancer's address, when its header named
    /// another client. Boxed: most connections have none, and every byte
    /// here is paid by every queued client.
    via: Option<Box<SocketAddr>>,
    accepted_at: u64,
    /// Spans Queued and Activating: the queue timeout counts until proxying.
    queue_deadline: Option<TimerKey>,
    /// The client's end of stream arrived while it waited (and it was kept).
    client_eof: bool,
    /// Instances whose connect failed for it (passive health).
    failed_connects: u8,
    /// While Activating or Proxying: the instance whose permit it holds.
    /// Kept here rather than in those states, where it would grow every
    /// connection's entry; here it fills padding.
    instance: InstanceId,
    state: ConnState,
}

enum ConnState {
    /// `--accept-proxy`: waiting for its PROXY header, not yet in the queue;
    /// `deadline` ends the wait.
    Header {
        deadline: Option<TimerKey>,
    },
    /// `attempts` counts the on-activate hook runs that failed for it.
    Queued {
        attempts: u32,
    },
    Activating(Activation),
    Proxying {
        ttl: Option<TimerKey>,
        /// When it started proxying, for `conns` and the duration average.
        /// No larger than `Activating`, so a queued client pays nothing.
        since: u64,
    },
}

enum Activation {
    /// Its on-activate hook is running.
    Hook { attempt: u32 },
    /// The shell is connecting to the upstream. `deadline` ends the whole
    /// connect; `attempt` ends the try of one address early, so the addresses
    /// after it get their share of the time.
    Connecting {
        deadline: Option<TimerKey>,
        attempt: Option<TimerKey>,
    },
}

struct RunningHook {
    id: HookId,
    purpose: HookPurpose,
    started_at: u64,
    deadline: Option<TimerKey>,
    timed_out: bool,
}

/// What a hook runs for.
#[derive(Clone, Copy)]
enum HookPurpose {
    /// Preparing this connection's activation (the client may leave meanwhile).
    Activate(ConnRef),
    /// After this connection's TTL expired.
    Timeout(ConnId),
}

impl HookPurpose {
    fn kind(self) -> HookKind {
        match self {
            HookPurpose::Activate(_) => HookKind::Activate,
            HookPurpose::Timeout(_) => HookKind::Timeout,
        }
    }

    fn conn_id(self) -> ConnId {
        match self {
            HookPurpose::Activate(conn) => conn.id,
            HookPurpose::Timeout(id) => id,
        }
    }
}

struct Shutdown {
    grace: Option<TimerKey>,
    /// `--shutdown-queue serve`, until the grace runs out or a second stop:
    /// waiting clients are still activated in order.
    serving: bool,
    /// Waiting clients activated after the shutdown began.
    served: u64,
    /// Waiting clients closed unserved by the shutdown.
    closed: u64,
    /// `ShutdownDone` was logged.
    done: bool,
}

/// Everything that can be armed in the timer wheel. Each names what it belongs
/// to, so a timer that outlived its owner is recognised and ignored.
#[derive(Clone, Copy, Debug)]
enum Deadline {
    Header(ConnRef),
    Queue(ConnRef),
    Connect(ConnRef),
    ConnectAttempt(ConnRef),
    Ttl(ConnRef),
    Hook(HookId),
    /// Ends an instance's on-activate backoff.
    HookRetry(InstanceId),
    /// Ends an instance's cool-down.
    Cooldown(InstanceId),
    AcceptRetry,
    ShutdownGrace,
    StallCheck,
    Service(InstanceId, ServiceTimer),
}

impl Core {
    /// A core with no connections, at time `now`.
    pub fn new(settings: Settings, now: u64) -> Self {
        Core {
            instances: Core::instances_for(&settings, now),
            settings,
            conns: Slab::new(),
            queue: WaitQueue::default(),
            active: 0,
            next_conn_id: 1,
            timers: TimerWheel::new(now),
            next_hook_id: 1,
            shutdown: None,
            counters: Counters::default(),
            actions: VecDeque::new(),
            now,
            reload_backlog: 0,
            accept_retry: None,
            accept_backoff_ms: ACCEPT_RETRY_BASE_MS,
            stall_check: None,
            idle_asked: false,
            stall_warned: false,
            paused: false,
            proxy_ms_avg: None,
        }
        .started(now)
    }

    /// A supervised upstream starts with the core.
    fn started(mut self, now: u64) -> Self {
        self.settle_service(now);
        self.check();
        self
    }

    // ----- inputs -----

    /// A client connected. It always gets a handle; if the queue is full, the
    /// handle is closed at once (an [`Action::Close`] with `Rejected`).
    pub fn handle_accepted(&mut self, now: u64, client: SocketAddr) -> ConnRef {
        self.advance(now);
        // Accepting works again: the next pause starts from the shortest wait.
        self.accept_backoff_ms = ACCEPT_RETRY_BASE_MS;
        let id = ConnId(self.next_conn_id);
        self.next_conn_id += 1;
        let slot = self.conns.insert(Conn {
            id,
            client,
            via: None,
            accepted_at: now,
            queue_deadline: None,
            client_eof: false,
            failed_connects: 0,
            instance: InstanceId(1),
            state: ConnState::Queued { attempts: 0 },
        });
        let conn = ConnRef { slot, id };
        if let Some(timeout) = self.settings.proxy_header_timeout_ms
            && self.shutdown.is_none()
        {
            let key = self
                .timers
                .insert(now.saturating_add(timeout), Deadline::Header(conn));
            self.conns[slot].state = ConnState::Header {
                deadline: Some(key),
            };
        } else {
            self.join_queue(now, conn);
        }
        self.check();
        conn
    }

    /// `--accept-proxy`: the shell read (or failed to read) the PROXY header
    /// of a connection waiting for it. A good one joins the queue (its
    /// queue timeout still counts from accept); a bad one is rejected.
    /// Ignored for a stale handle or a connection past its header.
    pub fn handle_proxy_header(&mut self, now: u64, conn: ConnRef, header: ProxyHeader) {
        self.advance(now);
        if let Some(c) = self.conns.get_mut(conn.slot).filter(|c| c.id == conn.id)
            && let ConnState::Header { .. } = c.state
        {
            match header {
                ProxyHeader::Bad => {
                    let client = c.client;
                    self.reject_header(now, conn, client);
                }
                good => {
                    if let ProxyHeader::Client(client) = good {
                        c.via = Some(Box::new(c.client));
                        c.client = client;
                    }
                    if let ConnState::Header { deadline } =
                        std::mem::replace(&mut c.state, ConnState::Queued { attempts: 0 })
                    {
                        self.cancel(deadline);
                    }
                    self.join_queue(now, conn);
                }
            }
        }
        self.check();
    }

    /// A new connection (past its PROXY header, if one was expected) takes
    /// its place at the back of the line, or is rejected when it is full.
    fn join_queue(&mut self, now: u64, conn: ConnRef) {
        let c = &self.conns[conn.slot];
        let (id, client, via, accepted_at) =
            (c.id, c.client, c.via.as_deref().copied(), c.accepted_at);
        self.log(Event::Accepted {
            conn: id,
            client,
            via,
        });
        self.queue.push_back(conn);
        if self.shutdown.is_some() {
            self.end(now, conn, Outcome::Shutdown, EndedBy::Tcplock);
            return;
        }
        if self.service_failed() {
            self.reject_failed(now, conn);
            return;
        }
        if let Some(timeout) = self.settings.queue_timeout_ms {
            let deadline = accepted_at.saturating_add(timeout);
            if deadline <= now {
                // Its PROXY header took longer than the whole queue timeout.
                self.log(Event::QueueTimeout { conn: id });
                self.end(now, conn, Outcome::QueueTimeout, EndedBy::Tcplock);
                return;
            }
            let key = self.timers.insert(deadline, Deadline::Queue(conn));
            self.conns[conn.slot].queue_deadline = Some(key);
        }
        self.pump(now);
        // Only the newcomer can push the line past its limit, and only if the
        // pump left it there, at the back.
        if self.waiting() > self.settings.max_queue && self.queue.back() == Some(conn) {
            self.log(Event::Rejected {
                conn: id,
                client,
                reason: RejectReason::QueueFull,
            });
            self.end(now, conn, Outcome::Rejected, EndedBy::Tcplock);
        }
    }

    /// No good PROXY header came: turned away at the door, like a client
    /// that finds the queue full.
    fn reject_header(&mut self, now: u64, conn: ConnRef, client: SocketAddr) {
        self.log(Event::Rejected {
            conn: conn.id,
            client,
            reason: RejectReason::BadProxyHeader,
        });
        self.end(now, conn, Outcome::Rejected, EndedBy::Tcplock);
    }

    /// The shell stopped accepting (out of descriptors, or keeping its reserve).
    /// The core answers with [`Action::ResumeAccepting`] when one of its
    /// connections ends or a hook exits (both free descriptors), or when the
    /// retry backoff runs out, whichever comes first: descriptors can also be
    /// freed by something tcplock does not see. Ignored while already paused
    /// and after a shutdown.
    pub fn handle_accept_paused(&mut self, now: u64) {
        self.advance(now);
        if self.shutdown.is_none() && self.accept_retry.is_none() {
            let key = self.timers.insert(
                now.saturating_add(self.accept_backoff_ms),
                Deadline::AcceptRetry,
            );
            self.accept_retry = Some(key);
            self.accept_backoff_ms = (self.accept_backoff_ms * 2).min(ACCEPT_RETRY_MAX_MS);
        }
        self.check();
    }

    /// A waiting (Queued or Activating) client closed or reset before proxying.
    /// Ignored for a stale handle or a proxying connection.
    pub fn handle_client_left(&mut self, now: u64, conn: ConnRef) {
        self.advance(now);
        if let Some(c) = self.get(conn)
            && !matches!(c.state, ConnState::Proxying { .. })
        {
            self.log(Event::Abandoned { conn: conn.id });
            self.end(now, conn, Outcome::Abandoned, EndedBy::Client);
            self.pump(now);
        }
        self.check();
    }

    /// A waiting (Queued or Activating) client's end of stream arrived, maybe
    /// after bytes that still wait in the kernel. With
    /// [`Settings::drop_queued_eof`] it leaves as abandoned; otherwise it
    /// keeps its place, and a reload that turns dropping on drops it then.
    /// Ignored for a stale handle or a proxying connection.
    pub fn handle_client_eof(&mut self, now: u64, conn: ConnRef) {
        self.advance(now);
        let drop_eof = self.settings.drop_queued_eof;
        if let Some(c) = self.conns.get_mut(conn.slot).filter(|c| c.id == conn.id)
            && !matches!(c.state, ConnState::Proxying { .. })
        {
            if drop_eof {
                self.log(Event::Abandoned { conn: conn.id });
                self.end(now, conn, Outcome::Abandoned, EndedBy::Client);
                self.pump(now);
            } else {
                c.client_eof = true;
            }
        }
        self.check();
    }

    /// The upstream accepted the connection: it starts proxying.
    pub fn handle_upstream_connected(&mut self, now: u64, conn: ConnRef) {
        self.supersede_connect_attempt(conn);
        self.advance(now);
        let ttl_ms = self.settings.ttl_ms;
        let Some(c) = self.conns.get_mut(conn.slot).filter(|c| c.id == conn.id) else {
            return;
        };
        let ConnState::Activating(Activation::Connecting { deadline, attempt }) = c.state else {
            return;
        };
        let on = c.instance;
        let queue_deadline = c.queue_deadline.take();
        let ttl = ttl_ms.map(|ttl| {
            self.timers
                .insert(now.saturating_add(ttl), Deadline::Ttl(conn))
        });
        c.state = ConnState::Proxying { ttl, since: now };
        let (client, via, accepted_at) = (c.client, c.via.as_deref().copied(), c.accepted_at);
        self.cancel(deadline);
        self.cancel(attempt);
        self.cancel(queue_deadline);
        self.counters.activations += 1;
        let i = on.index();
        self.instances[i].activations += 1;
        self.connected_to(i);
        self.service_took(i);
        if let Some(shutdown) = &mut self.shutdown {
            shutdown.served += 1;
        }
        self.log(Event::Activated {
            conn: conn.id,
            client,
            via,
            waited_ms: now.saturating_sub(accepted_at),
            instance: on,
        });
        self.actions.push_back(Action::StartRelay(conn));
        // A cool-down it ended frees its instance for the head of the line.
        self.pump(now);
        self.check();
    }

    /// The shell started connecting to one upstream address, with
    /// `addresses_left` addresses to go counting this one. With a connect
    /// timeout, this attempt gets its share of what is left of it (the rest
    /// divided by `addresses_left`), so a black-holed address cannot use up
    /// the time of the ones after it; when the share runs out the core asks
    /// for the next address with [`Action::ConnectNext`]. The last address
    /// gets all that is left. Ignored unless the connection is connecting.
    pub fn handle_connect_attempt(&mut self, now: u64, conn: ConnRef, addresses_left: usize) {
        self.supersede_connect_attempt(conn);
        self.advance(now);
        let Some(c) = self.conns.get_mut(conn.slot).filter(|c| c.id == conn.id) else {
            return;
        };
        let ConnState::Activating(Activation::Connecting {
            deadline, attempt, ..
        }) = &mut c.state
        else {
            return;
        };
        let previous = attempt.take();
        let ends_at = deadline.and_then(|key| self.timers.deadline(key));
        let share_ends = ends_at.filter(|_| addresses_left > 1).and_then(|ends_at| {
            let left = u64::try_from(addresses_left).unwrap_or(u64::MAX);
            let share = (ends_at.saturating_sub(now) / left).max(1);
            let share_ends = now.saturating_add(share);
            (share_ends < ends_at).then_some(share_ends)
        });
        if let Some(at) = share_ends {
            *attempt = Some(self.timers.insert(at, Deadline::ConnectAttempt(conn)));
        }
        self.cancel(previous);
        self.check();
    }

    /// No upstream address took the connection. `error` is for the log.
    pub fn handle_upstream_failed(&mut self, now: u64, conn: ConnRef, error: &str) {
        self.supersede_connect_attempt(conn);
        self.advance(now);
        if let Some(c) = self.get(conn)
            && let ConnState::Activating(Activation::Connecting { .. }) = c.state
        {
            self.connect_failed(now, conn, c.instance.index(), error.to_string());
        }
        self.check();
    }

    /// A proxying connection finished or failed; `end` also says which side
    /// closed or reset first.
    pub fn handle_relay_ended(&mut self, now: u64, conn: ConnRef, end: RelayEnd) {
        self.advance(now);
        if let Some(c) = self.get(conn)
            && matches!(c.state, ConnState::Proxying { .. })
        {
            let outcome = match end.cause {
                RelayCause::Finished => Outcome::Ok,
                RelayCause::ClientError => Outcome::ClientError,
                RelayCause::UpstreamError => Outcome::UpstreamError,
                RelayCause::RelayError => Outcome::RelayError,
            };
            self.end(now, conn, outcome, end.ended_by);
            self.pump(now);
        }
        self.check();
    }

    /// A hook process ended (or could not start). Ignored for a stale hook id.
    pub fn handle_hook_exited(&mut self, now: u64, hook: HookId, exit: HookExit) {
        self.advance(now);
        let Some(i) = self.hook_owner(hook) else {
            return;
        };
        let Some(run) = self.instances[i].hook.take() else {
            return;
        };
        self.cancel(run.deadline);
        self.resume_accepting();
        self.note_done();
        match run.purpose {
            HookPurpose::Timeout(conn) => {
                if !exit.is_success() {
                    self.log(Event::HookFailed {
                        hook,
                        kind: HookKind::Timeout,
                        conn,
                        exit,
                        timed_out: run.timed_out,
                        retry_in_ms: None,
                        instance: InstanceId::at(i),
                    });
                }
            }
            HookPurpose::Activate(_) => self.activate_hook_exited(now, i, run, exit),
        }
        self.pump(now);
        self.check();
    }

    /// Time passed: fire every deadline due at `now`.
    pub fn handle_tick(&mut self, now: u64) {
        self.advance(now);
        self.check();
    }

    /// New settings, for activations from now on: a connection already proxying
    /// keeps its TTL, a waiting one its queue deadline. More permits let waiting
    /// clients through at once; fewer let active ones finish.
    pub fn handle_reload(&mut self, now: u64, settings: Settings) {
        self.advance(now);
        let hook_changed = settings.on_activate != self.settings.on_activate;
        let no_timeout_hook = settings.on_timeout.is_none();
        for inst in &mut self.instances {
            if hook_changed {
                // A preparation made by another hook proves nothing now.
                inst.prepared = false;
            }
            if no_timeout_hook {
                // A TTL expiry still waiting for the hook slot has no hook
                // to run now; without this it would run whatever a later
                // reload configures.
                inst.timeout_hook_due = None;
            }
        }
        let now_dropping = settings.drop_queued_eof && !self.settings.drop_queued_eof;
        let run = |s: &Settings| s.service.as_ref().map(|service| service.run);
        let run_changed = run(&settings).is_some() && run(&settings) != run(&self.settings);
        let list_changed = settings.upstreams != self.settings.upstreams;
        self.settings = settings;
        if list_changed {
            self.reconcile_instances(now);
        }
        self.service_reloaded(now, run_changed);
        if now_dropping {
            self.drop_waiting_at_eof(now);
        }
        self.reload_backlog = self.waiting();
        self.pump(now);
        self.check();
    }

    /// Stop: close the listener, give proxying connections the shutdown
    /// grace. With [`Settings::serve_queue_on_shutdown`] waiting clients keep
    /// being activated in order (hooks included) until none is left or the
    /// grace runs out; otherwise they are closed at once and a running hook is
    /// killed. A second call ends everything at once.
    pub fn handle_shutdown(&mut self, now: u64) {
        self.advance(now);
        if self.shutdown.is_some() {
            self.log(Event::ShutdownForced {
                active: self.active,
            });
            self.end_all(now);
            self.settle_service(now);
            self.service_forced();
            self.check();
            return;
        }
        self.actions.push_back(Action::StopAccepting);
        // Before the waiting clients end: a closed listener is not resumed.
        let accept_retry = self.accept_retry.take();
        self.cancel(accept_retry);
        let stall_check = self.stall_check.take();
        self.cancel(stall_check);
        self.idle_asked = false;
        self.log(Event::ShutdownStarted {
            queued: self.queue.len(),
            active: self.active,
            grace_ms: self.settings.shutdown_grace_ms,
        });
        let grace = self.settings.shutdown_grace_ms;
        let key = self
            .timers
            .insert(now.saturating_add(grace), Deadline::ShutdownGrace);
        let serving = self.settings.serve_queue_on_shutdown;
        self.shutdown = Some(Shutdown {
            grace: Some(key),
            serving,
            served: 0,
            closed: 0,
            done: false,
        });
        // Closing stops every waiting client; serving the queue serves only
        // those already in it, not those still reading a header.
        self.end_where(
            now,
            |c| match c.state {
                ConnState::Proxying { .. } => false,
                ConnState::Header { .. } => true,
                _ => !serving,
            },
            Outcome::Shutdown,
            EndedBy::Tcplock,
        );
        if !serving {
            self.end_hooks();
        }
        if grace == 0 {
            self.advance(now);
        }
        // With nobody left, the service stops now.
        self.settle_service(now);
        // Supervision turned on and still waiting for its holders makes no
        // service now: a served queue goes on to the upstream.
        self.let_through(now);
        self.note_done();
        self.check();
    }

    /// The shell's answer to [`Action::ReportIdle`]: `idle_ms` is how long
    /// since the most recently active relay moved a byte. Ignored unless asked.
    pub fn handle_holders_idle(&mut self, now: u64, idle_ms: u64) {
        self.advance(now);
        if !std::mem::take(&mut self.idle_asked) {
            return;
        }
        let Some(warn) = self.settings.stall_warn_ms else {
            return;
        };
        if idle_ms < warn {
            // A holder moved bytes: a stall, if any, is over.
            self.stall_warned = false;
        }
        if self.shutdown.is_some() {
            return;
        }
        let Some(waited_ms) = self.stall_candidate(now, warn) else {
            // Things changed meanwhile: look again when it could matter.
            self.arm_stall_check(now);
            self.check();
            return;
        };
        let next = if idle_ms >= warn {
            if !self.stall_warned {
                self.stall_warned = true;
                self.log(Event::QueueStalled {
                    waited_ms,
                    holders: self.active,
                    idle_ms,
                });
            }
            // Look again later, to notice the stall clearing.
            warn
        } else {
            // The earliest a holder could have been idle for `warn`.
            warn - idle_ms
        };
        let key = self
            .timers
            .insert(now.saturating_add(next.max(1)), Deadline::StallCheck);
        self.stall_check = Some(key);
        self.check();
    }

    /// Log one `state` line per connection and a summary (SIGUSR1).
    pub fn handle_dump_state(&mut self, now: u64) {
        self.advance(now);
        let lines: Vec<Event> = self
            .conns
            .iter()
            .map(|(_, c)| Event::State {
                conn: c.id,
                state: c.state.name(),
                client: c.client,
                age_ms: now.saturating_sub(c.accepted_at),
            })
            .collect();
        for line in lines {
            self.log(line);
        }
        for i in 0..self.instances.len() {
            if let Some(service) = self.service_state_event(i) {
                self.log(service);
            }
        }
        self.log(Event::StateSummary {
            queued: self.queue.len(),
            active: self.active,
            permits: self.settings.permits,
            instances: self.live_instances(),
            hook_running: self.any_hook(),
            activations: self.counters.activations,
            timeouts: self.counters.timeouts,
        });
    }

    // ----- outputs -----

    /// The next thing for the shell to do, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Core::handle_tick`] must be called next, if ever. Always later than
    /// the latest `now` passed in, so the loop never spins.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.timers.next_deadline()
    }

    /// After a shutdown: no connection and no hook left.
    pub fn is_finished(&self) -> bool {
        self.shutdown.is_some() && self.conns.is_empty() && self.all_at_rest()
    }

    /// No hook runs and no service runs or is scheduled to.
    fn all_at_rest(&self) -> bool {
        self.instances.iter().all(|inst| {
            inst.hook.is_none() && inst.service.as_ref().is_none_or(Service::is_at_rest)
        })
    }

    // ----- observers -----

    /// Clients in the queue (not counting one whose on-activate hook runs).
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// Queue entries pushed, popped, skipped or swept so far: the work the
    /// queue did, which stays proportional to the clients it saw.
    #[cfg(test)]
    pub fn queue_entries_visited(&self) -> u64 {
        self.queue.visited()
    }

    /// Connections holding a permit (Activating + Proxying).
    pub fn active(&self) -> usize {
        self.active
    }

    /// Connections the core knows, in any state.
    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether the shell's accepting is paused, waiting for a resume.
    pub fn accept_paused(&self) -> bool {
        self.accept_retry.is_some()
    }

    #[cfg(any(test, feature = "model"))]
    /// The hook run the core waits for, if any (the lowest instance's).
    pub fn hook_running(&self) -> Option<HookId> {
        self.instances
            .iter()
            .find_map(|inst| inst.hook.as_ref().map(|run| run.id))
    }

    /// The numbers a [`crate::Handle`] reports.
    pub fn stats(&self) -> Stats {
        let mut stats = Stats::default();
        self.write_stats(&mut stats);
        stats
    }

    /// [`Core::stats`] into `out`, reusing its memory: the shell publishes
    /// them every turn, and steady-state relaying allocates nothing.
    pub fn write_stats(&self, out: &mut Stats) {
        out.queue_length = self.queue.len();
        out.active = self.active;
        out.permits = self.settings.permits;
        out.oldest_wait_ms = self.oldest_wait_ms();
        out.activations = self.counters.activations;
        out.timeouts = self.counters.timeouts;
        out.outcomes = self.counters.outcomes;
        // The first instance a reload did not remove: the one upstream of
        // a lock without a pool.
        let first = self.instances.iter().position(|inst| !inst.removed);
        out.service = first
            .map(|i| self.instances[i].service_stats())
            .unwrap_or_default();
        self.write_instance_stats(&mut out.instances);
    }

    /// How long the head of the queue has waited as of the latest input;
    /// 0 with none waiting. The head is the longest waiting (a failed hook
    /// puts its client back at the front), but for `--accept-proxy`, whose
    /// line is in order of complete headers.
    fn oldest_wait_ms(&self) -> u64 {
        self.queue
            .front()
            .and_then(|head| self.get(head))
            .map_or(0, |head| self.now.saturating_sub(head.accepted_at))
    }

    #[cfg(any(test, feature = "model"))]
    /// The state of a live connection; `None` once it ended (or for a stale handle).
    pub fn state_of(&self, conn: ConnRef) -> Option<StateName> {
        self.get(conn).map(|c| c.state.name())
    }

    // ----- internals -----

    fn get(&self, conn: ConnRef) -> Option<&Conn> {
        self.conns.get(conn.slot).filter(|c| c.id == conn.id)
    }

    /// Every input first brings the core up to `now`: deadlines that passed
    /// fire before the input is looked at, so the next deadline is always in
    /// the future.
    fn advance(&mut self, now: u64) {
        debug_assert!(now >= self.now, "time went backwards: {now} < {}", self.now);
        self.now = self.now.max(now);
        let now = self.now;
        while let Some((_, deadline)) = self.timers.poll_expired(now) {
            self.fire(now, deadline);
        }
        self.pump(now);
    }

    /// Clients waiting for the upstream: the queue, plus the one whose
    /// on-activate hook runs (it goes back to the queue if the hook fails).
    fn waiting(&self) -> usize {
        let preparing = self
            .instances
            .iter()
            .filter_map(|inst| inst.hook.as_ref())
            .filter(|run| self.still_waiting_for(run).is_some())
            .count();
        self.queue.len() + preparing
    }

    /// The connection an on-activate hook prepares, if it is still there
    /// waiting for the hook.
    fn still_waiting_for(&self, run: &RunningHook) -> Option<ConnRef> {
        let HookPurpose::Activate(conn) = run.purpose else {
            return None;
        };
        self.get(conn)
            .filter(|c| matches!(c.state, ConnState::Activating(Activation::Hook { .. })))
            .map(|_| conn)
    }

    fn log(&mut self, event: Event) {
        self.actions.push_back(Action::Log(event));
    }

    fn cancel(&mut self, key: Option<TimerKey>) {
        if let Some(key) = key {
            self.timers.cancel(key);
        }
    }

    /// Let waiting connections through while permits, hooks and backoff
    /// allow, then see that the stalled-queue check is armed.
    fn pump(&mut self, now: u64) {
        self.settle_service(now);
        self.let_through(now);
        self.arm_stall_check(now);
    }

    fn let_through(&mut self, now: u64) {
        // A serving shutdown runs hooks only for clients still in line.
        if self.stopped() || self.shutdown.is_some() && self.waiting() == 0 {
            return;
        }
        // An instance runs its on-timeout hook before it takes anyone.
        for i in 0..self.instances.len() {
            self.run_timeout_hook(now, i);
        }
        while !self.paused {
            let Some(head) = self.queue.front() else {
                return;
            };
            // Every instance that cannot take the head cannot take anyone
            // behind it either: the head waits, nobody overtakes it.
            let Some(i) = self.pick_instance() else {
                return;
            };
            let attempts = match self.conns[head.slot].state {
                ConnState::Queued { attempts } => attempts,
                _ => 0,
            };
            let hook_needed = self.hook_needed(i);
            let conns = &self.conns;
            self.queue.pop_front(|entry| is_queued(conns, entry));
            self.take_permit(now, head, i);
            // The line moved: a stall, if any, is over.
            self.stall_warned = false;
            match self.settings.on_activate.filter(|_| hook_needed) {
                Some(run) => {
                    let client = self.conns[head.slot].client;
                    let attempt = attempts + 1;
                    self.conns[head.slot].state =
                        ConnState::Activating(Activation::Hook { attempt });
                    self.spawn_hook(now, i, HookPurpose::Activate(head), run, client, attempt);
                }
                None => {
                    self.instances[i].prepared = false;
                    self.start_connect(now, head, i);
                }
            }
        }
    }

    /// Runs instance `i`'s on-timeout hook if a TTL on it expired, its hook
    /// slot is free and its service takes clients.
    fn run_timeout_hook(&mut self, now: u64, i: usize) {
        if self.instances[i].hook.is_some() || !self.service_takes_clients(i) {
            return;
        }
        if let Some((conn_id, client)) = self.instances[i].timeout_hook_due.take()
            && let Some(run) = self.settings.on_timeout
        {
            self.spawn_hook(now, i, HookPurpose::Timeout(conn_id), run, client, 1);
        }
    }

    fn start_connect(&mut self, now: u64, conn: ConnRef, i: usize) {
        debug_assert!(
            self.service_takes_clients(i),
            "activated on a service not ready"
        );
        let deadline = self.settings.connect_timeout_ms.map(|timeout| {
            self.timers
                .insert(now.saturating_add(timeout), Deadline::Connect(conn))
        });
        let instance = InstanceId::at(i);
        self.conns[conn.slot].state = ConnState::Activating(Activation::Connecting {
            deadline,
            attempt: None,
        });
        self.actions.push_back(Action::Connect { conn, instance });
    }

    fn spawn_hook(
        &mut self,
        now: u64,
        i: usize,
        purpose: HookPurpose,
        run: HookRef,
        client: SocketAddr,
        attempt: u32,
    ) {
        let id = HookId(self.next_hook_id);
        self.next_hook_id += 1;
        let deadline = self.settings.hook_timeout_ms.map(|timeout| {
            self.timers
                .insert(now.saturating_add(timeout), Deadline::Hook(id))
        });
        let inst = &self.instances[i];
        let context = HookContext {
            kind: purpose.kind(),
            conn: purpose.conn_id(),
            client,
            instance: InstanceId::at(i),
            upstream: inst.upstream.clone(),
            activations: inst.activations,
            timeouts: inst.timeouts,
            last_outcome: inst.last_outcome,
            last_ended_by: inst.last_ended_by,
            queue_length: self.queue.len(),
            active: inst.active,
            attempt,
            service: inst.service.as_ref().and_then(Service::running),
        };
        self.instances[i].hook = Some(RunningHook {
            id,
            purpose,
            started_at: now,
            deadline,
            timed_out: false,
        });
        self.actions.push_back(Action::SpawnHook(HookRequest {
            hook: id,
            run,
            context,
        }));
    }

    fn activate_hook_exited(&mut self, now: u64, i: usize, run: RunningHook, exit: HookExit) {
        let waiting = self.still_waiting_for(&run);
        if exit.is_success() {
            self.instances[i].hook_failures = 0;
            // A removed instance takes no client either.
            let gone = !self.service_takes_clients(i);
            match waiting {
                // The service went away meanwhile (or a reload removed the
                // instance): the client keeps its place, and the next
                // generation is prepared afresh. It keeps its attempt count
                // too: it was admitted once, whatever max-queue says now.
                Some(conn) if gone => {
                    self.log(Event::Requeued {
                        conn: conn.id,
                        instance: InstanceId::at(i),
                    });
                    self.back_to_head(now, conn, i);
                }
                Some(conn) => self.start_connect(now, conn, i),
                // It prepared a generation (or an instance) that is gone or
                // going: nothing to keep.
                None if gone => {}
                None => {
                    self.instances[i].prepared = true;
                    self.log(Event::PreparationKept { hook: run.id });
                }
            }
            return;
        }
        let inst = &mut self.instances[i];
        inst.hook_failures = inst.hook_failures.saturating_add(1);
        let backoff = doubling(RETRY_BASE_MS, RETRY_MAX_MS, inst.hook_failures);
        let retry_in_ms =
            (!self.stopped() && self.queue.len() > 0 || waiting.is_some()).then_some(backoff);
        if let Some(conn) = waiting {
            // Back to the head of the line, for the next free instance.
            self.back_to_head(now, conn, i);
        }
        self.log(Event::HookFailed {
            hook: run.id,
            kind: HookKind::Activate,
            conn: run.purpose.conn_id(),
            exit,
            timed_out: run.timed_out,
            retry_in_ms,
            instance: InstanceId::at(i),
        });
        if !self.stopped() && !self.instances[i].removed {
            let key = self.timers.insert(
                now.saturating_add(backoff),
                Deadline::HookRetry(InstanceId::at(i)),
            );
            self.instances[i].retry = Some(key);
        }
    }

    fn fire(&mut self, now: u64, deadline: Deadline) {
        match deadline {
            Deadline::Header(conn) => {
                if let Some(c) = self.conns.get_mut(conn.slot).filter(|c| c.id == conn.id)
                    && let ConnState::Header { deadline } = &mut c.state
                {
                    // The key just fired; forget it so `end` does not cancel it.
                    *deadline = None;
                    let client = c.client;
                    self.reject_header(now, conn, client);
                }
            }
            Deadline::Queue(conn) => {
                if let Some(c) = self.conns.get_mut(conn.slot).filter(|c| c.id == conn.id) {
                    // The key just fired; forget it so `end` does not cancel it.
                    c.queue_deadline = None;
                    self.log(Event::QueueTimeout { conn: conn.id });
                    self.end(now, conn, Outcome::QueueTimeout, EndedBy::Tcplock);
                }
            }
            Deadline::Connect(conn) => {
                if let Some(c) = self.conns.get_mut(conn.slot).filter(|c| c.id == conn.id)
                    && let ConnState::Activating(Activation::Connecting { deadline, .. }) =
                        &mut c.state
                {
                    *deadline = None;
                    let i = c.instance.index();
                    self.connect_failed(now, conn, i, "connect timeout".to_string());
                }
            }
            Deadline::ConnectAttempt(conn) => {
                if let Some(c) = self.conns.get_mut(conn.slot).filter(|c| c.id == conn.id)
                    && let ConnState::Activating(Activation::Connecting { attempt, .. }) =
                        &mut c.state
                    && attempt.take().is_some()
                {
                    self.actions.push_back(Action::ConnectNext(conn));
                }
            }
            Deadline::Ttl(conn) => {
                if let Some(c) = self.conns.get_mut(conn.slot).filter(|c| c.id == conn.id)
                    && let ConnState::Proxying { ttl, .. } = &mut c.state
                {
                    *ttl = None;
                    let (client, i) = (c.client, c.instance.index());
                    self.counters.timeouts += 1;
                    self.instances[i].timeouts += 1;
                    self.log(Event::Timeout { conn: conn.id });
                    self.end(now, conn, Outcome::Timeout, EndedBy::Tcplock);
                    if self.settings.on_timeout.is_some()
                        && !self.stopped()
                        && !self.instances[i].removed
                    {
                        self.instances[i].timeout_hook_due = Some((conn.id, client));
                    }
                }
            }
            Deadline::Hook(hook) => {
                if let Some(i) = self.hook_owner(hook)
                    && let Some(run) = self.instances[i].hook.as_mut()
                {
                    run.deadline = None;
                    run.timed_out = true;
                    let after_ms = now.saturating_sub(run.started_at);
                    self.actions.push_back(Action::KillHook(hook));
                    self.log(Event::HookTimedOut { hook, after_ms });
                }
            }
            Deadline::HookRetry(instance) => {
                self.instances[instance.index()].retry = None;
            }
            Deadline::Cooldown(instance) => {
                self.instances[instance.index()].cooldown = None;
            }
            Deadline::AcceptRetry => {
                if self.accept_retry.take().is_some() {
                    self.actions.push_back(Action::ResumeAccepting);
                }
            }
            Deadline::ShutdownGrace => {
                if let Some(shutdown) = &mut self.shutdown {
                    shutdown.grace = None;
                    self.end_all(now);
                }
            }
            Deadline::StallCheck => {
                self.stall_check = None;
                self.stall_fired(now);
            }
            Deadline::Service(instance, timer) => self.service_fired(now, instance.index(), timer),
        }
    }

    /// Whether activations have stopped for good: a shutdown that does not
    /// serve the queue, or whose serving ended.
    fn stopped(&self) -> bool {
        self.shutdown.as_ref().is_some_and(|s| !s.serving)
    }

    /// After a shutdown, once no connection, no hook and nothing of the
    /// service is left: log the totals, once.
    fn note_done(&mut self) {
        if !self.conns.is_empty() || !self.all_at_rest() {
            return;
        }
        if let Some(shutdown) = self.shutdown.as_mut().filter(|s| !s.done) {
            shutdown.done = true;
            let (served, closed) = (shutdown.served, shutdown.closed);
            self.log(Event::ShutdownDone { served, closed });
        }
    }

    /// How long the head of the queue has waited, if the queue could be
    /// stalled: the head waited at least `warn`, every permit is held and
    /// every holder is proxying (a hook or a connect under way is progress,
    /// bounded by its own timeouts).
    fn stall_candidate(&self, now: u64, warn: u64) -> Option<u64> {
        let head = self.queue.front()?;
        let waited = now.saturating_sub(self.conns[head.slot].accepted_at);
        let all_held = self.active > 0 && self.active >= self.capacity();
        let proxying = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.state, ConnState::Proxying { .. }))
            .count();
        (waited >= warn && all_held && proxying == self.active).then_some(waited)
    }

    /// The stalled-queue timer fired: ask the shell how idle the holders are
    /// if the queue could be stalled, otherwise look again later.
    fn stall_fired(&mut self, now: u64) {
        let Some(warn) = self
            .settings
            .stall_warn_ms
            .filter(|_| self.shutdown.is_none())
        else {
            return;
        };
        if self.stall_candidate(now, warn).is_some() {
            self.idle_asked = true;
            self.actions.push_back(Action::ReportIdle);
            return;
        }
        let Some(head) = self.queue.front() else {
            return;
        };
        let accepted_at = self.conns[head.slot].accepted_at;
        let at = if now.saturating_sub(accepted_at) < warn {
            accepted_at.saturating_add(warn)
        } else {
            now.saturating_add(warn)
        };
        self.stall_check = Some(self.timers.insert(at, Deadline::StallCheck));
    }

    /// With `--stall-warn` on and someone waiting, a look is always due: at
    /// the earliest when the head has waited long enough.
    fn arm_stall_check(&mut self, now: u64) {
        if self.stall_check.is_some() || self.idle_asked || self.shutdown.is_some() {
            return;
        }
        let Some(warn) = self.settings.stall_warn_ms else {
            return;
        };
        let Some(head) = self.queue.front() else {
            return;
        };
        let at = self.conns[head.slot]
            .accepted_at
            .saturating_add(warn)
            .max(now.saturating_add(1));
        self.stall_check = Some(self.timers.insert(at, Deadline::StallCheck));
    }

    /// Descriptors were freed: a paused accept tries again now.
    fn resume_accepting(&mut self) {
        if let Some(key) = self.accept_retry.take() {
            self.timers.cancel(key);
            self.actions.push_back(Action::ResumeAccepting);
        }
    }

    /// The connections `keep` picks, in slab order, to end one by one.
    fn conns_where(&self, keep: impl Fn(&Conn) -> bool) -> Vec<ConnRef> {
        self.conns
            .iter()
            .filter(|(_, c)| keep(c))
            .map(|(slot, c)| ConnRef { slot, id: c.id })
            .collect()
    }

    /// Ends every connection `keep` picks with `outcome`.
    fn end_where(&mut self, now: u64, keep: impl Fn(&Conn) -> bool, outcome: Outcome, by: EndedBy) {
        for conn in self.conns_where(keep) {
            self.end(now, conn, outcome, by);
        }
    }

    /// Ends every waiting client whose end of stream was kept (a reload
    /// turned `--queued-eof drop` on).
    fn drop_waiting_at_eof(&mut self, now: u64) {
        let ended =
            self.conns_where(|c| c.client_eof && !matches!(c.state, ConnState::Proxying { .. }));
        for conn in ended {
            self.log(Event::Abandoned { conn: conn.id });
            self.end(now, conn, Outcome::Abandoned, EndedBy::Client);
        }
    }

    fn connect_failed(&mut self, now: u64, conn: ConnRef, i: usize, error: String) {
        self.log(Event::ConnectFailed {
            conn: conn.id,
            error,
            instance: InstanceId::at(i),
        });
        if !self.try_another_instance(now, conn, i) {
            self.end(now, conn, Outcome::ConnectFailed, EndedBy::Tcplock);
        }
        self.pump(now);
    }

    /// End every connection now and kill the hook (a forced or timed-out stop).
    fn end_all(&mut self, now: u64) {
        if let Some(shutdown) = &mut self.shutdown {
            shutdown.serving = false;
        }
        self.end_where(now, |_| true, Outcome::Shutdown, EndedBy::Tcplock);
        self.end_hooks();
    }

    /// No hook is to run again: running ones are killed, due and retrying
    /// ones forgotten.
    fn end_hooks(&mut self) {
        for i in 0..self.instances.len() {
            let inst = &mut self.instances[i];
            inst.timeout_hook_due = None;
            let retry = inst.retry.take();
            if let Some(run) = &inst.hook {
                self.actions.push_back(Action::KillHook(run.id));
            }
            self.cancel(retry);
        }
    }

    /// The one place a connection ends: it leaves the slab, the queue and the
    /// timer wheel, gives back its permit and is announced to the shell.
    fn end(&mut self, now: u64, conn: ConnRef, outcome: Outcome, ended_by: EndedBy) {
        if self.get(conn).is_none() {
            return;
        }
        let c = self.conns.remove(conn.slot);
        self.cancel(c.queue_deadline);
        let was_waiting = !matches!(c.state, ConnState::Proxying { .. });
        match c.state {
            ConnState::Header { deadline } => self.cancel(deadline),
            ConnState::Queued { .. } => {
                let conns = &self.conns;
                self.queue.left(conn, |entry| is_queued(conns, entry));
            }
            ConnState::Activating(step) => {
                self.holder_ended(now, c.instance.index(), outcome, ended_by);
                if let Activation::Connecting {
                    deadline, attempt, ..
                } = step
                {
                    self.cancel(deadline);
                    self.cancel(attempt);
                }
            }
            ConnState::Proxying { ttl, since } => {
                self.holder_ended(now, c.instance.index(), outcome, ended_by);
                self.cancel(ttl);
                self.note_proxy_duration(now.saturating_sub(since));
            }
        }
        if let Some(shutdown) = &mut self.shutdown
            && outcome == Outcome::Shutdown
            && was_waiting
        {
            shutdown.closed += 1;
        }
        self.counters.outcomes.add(outcome);
        self.actions.push_back(Action::Close {
            conn,
            outcome,
            ended_by,
            age_ms: now.saturating_sub(c.accepted_at),
        });
        self.resume_accepting();
        self.note_done();
    }

    /// A connection holding a permit of `i` ended with `outcome`.
    fn holder_ended(&mut self, now: u64, i: usize, outcome: Outcome, ended_by: EndedBy) {
        self.release_permit(now, i);
        let inst = &mut self.instances[i];
        inst.last_outcome = Some(outcome);
        inst.last_ended_by = Some(ended_by);
        self.service_released(i, outcome);
    }

    /// News of a connect (it succeeded, failed, or moved to the next address)
    /// is newer than its address's share running out at the same moment: the
    /// share's timer goes before deadlines fire, or it would send the shell to
    /// the next address for a connect that already ended.
    fn supersede_connect_attempt(&mut self, conn: ConnRef) {
        if let Some(c) = self.conns.get_mut(conn.slot).filter(|c| c.id == conn.id)
            && let ConnState::Activating(Activation::Connecting { attempt, .. }) = &mut c.state
            && let Some(key) = attempt.take()
        {
            self.timers.cancel(key);
        }
    }

    fn check(&self) {
        #[cfg(debug_assertions)]
        if let Err(broken) = self.check_invariants() {
            panic!("core invariant broken: {broken}");
        }
    }
}

/// A backoff after `failures` (at least 1) in a row: `base`, doubling with
/// each further failure, up to `max`.
fn doubling(base: u64, max: u64, failures: u32) -> u64 {
    let shift = failures.saturating_sub(1).min(16);
    base.saturating_mul(1 << shift).min(max)
}

/// Whether a queue entry still names a waiting connection. A connection
/// leaves the Queued state only by ending (its slot is freed or reused under
/// another id) or by being taken at the head, so this is exact.
fn is_queued(conns: &Slab<Conn>, entry: ConnRef) -> bool {
    conns
        .get(entry.slot)
        .is_some_and(|c| c.id == entry.id && matches!(c.state, ConnState::Queued { .. }))
}

impl ConnState {
    fn name(&self) -> StateName {
        match self {
            ConnState::Header { .. } => StateName::Header,
            ConnState::Queued { .. } => StateName::Queued,
            ConnState::Activating(_) => StateName::Activating,
            ConnState::Proxying { .. } => StateName::Proxying,
        }
    }
}
