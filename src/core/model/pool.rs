//! The model of a pool: the core driven with K instances behind one queue
//! (K from the initial settings' list, 2 and more; a reload may change the
//! list, down to one), a fake shell with a process table per instance, and
//! history checks built only from the actions and log events the core emits.
//!
//! The exact shadow of `mod.rs` predicts a single upstream in detail (every
//! deadline, every outcome, the hook scheduling); for a pool it is not
//! extended. Here the checks are the rules of the pool, which hold whatever
//! the timing:
//!
//! - **permits per instance**: an activation (an on-activate `SpawnHook`, or
//!   a `Connect` from the line) on instance I only while fewer than the
//!   permits in force hold a permit of I; at all times I's holders are at
//!   most the permits in force when the latest of them was let in (a reload
//!   may lower them below the holders); the holders the model counts agree
//!   with `Stats::instances` after every step;
//! - **one hook per instance**: no `SpawnHook` for I while a hook of I is not
//!   reaped (hooks of different instances may overlap); `KillHook` only for a
//!   hook not reaped yet; a hook is told its own instance's address;
//! - **readiness**: no `Connect` (and no on-activate hook) for an instance a
//!   reload removed, or that cools down (`InstanceCooldown` not over and no
//!   successful connect to it since), or, supervised, whose latest news is
//!   not `UpstreamReady` (or is `RestartDue` for a repair or of the only
//!   instance, which drains at once; a planned restart of a pool waits for
//!   its turn, which no event marks, so a due instance of a pool may serve);
//!   a `Connect` after a hook goes to the hook's instance;
//! - **pool-wide FIFO**: an activation names a client only if no client
//!   accepted before it waits in line (clients put back at the head by a
//!   failed hook, a failed connect or a stopped service keep their place, so
//!   the line is always in accept order); none while paused or after a
//!   shutdown that closes the queue;
//! - **passive health**: `InstanceCooldown` only in an unsupervised pool of
//!   two or more, 1 s to 30 s; a client ends `connect_failed` there only after
//!   min(3, K) failed connects (or during a shutdown);
//! - **rolling restarts**: an instance is out for a planned restart from
//!   `UpstreamStopping` with a planned reason to its next `UpstreamReady`
//!   (or its give-up, its removal, the shutdown); a planned stop only while
//!   no other live instance is out;
//! - **`upstream_failed`**: a waiting client is closed or a newcomer rejected
//!   for it only when every live instance has given up (`UpstreamFailed`
//!   since its last `UpstreamReady`);
//! - **reload by name**: after a reload every name of the list is one live
//!   instance, a kept name keeps its number, a dropped one is removed;
//! - every accepted connection is closed exactly once, no action names a
//!   closed one, the wind-down finishes the core with every process gone,
//!   and [`Core::check_invariants`] after every step.
//!
//! What is not checked here (the single-instance shadow does): the exact
//! outcome and timing of each deadline, the hook before every proxying
//! connection, max-queue, accept pauses and stalls. `--accept-proxy` and
//! toggling supervision by a reload are left out of pool runs (a reload keeps
//! supervision on or off as it was).
//!
//! The fake shell answers every service action at once: a spawn (fails with
//! [`Mood::spawn_fails`]), a probe (true once the generation listens,
//! [`Mood::listens_after`] ms after its spawn, never with `None`), a sample
//! (one process while the leader lives), SIGTERM (the leader exits at once
//! unless [`Mood::term_exit_after`] is `None`: SIGTERM ignored), SIGKILL.
//! [`Op::InstanceCrash`] kills a leader unasked. Each instance has its own
//! mood ([`Op::InstanceMood`]; [`Op::Mood`] sets every instance's).

use std::collections::{BTreeMap, VecDeque};

use super::*;
use crate::core::pool::{CONNECT_TRIES, COOLDOWN_BASE_MS, COOLDOWN_MAX_MS};
use crate::core::{Generation, ServiceSample, ServiceStateName, StopSignal};

/// The addresses pool runs draw their lists from.
pub const NAMES: [&str; 6] = [
    "10.0.0.1:8100",
    "10.0.0.1:8101",
    "10.0.0.2:8100",
    "10.0.0.2:8101",
    "10.0.0.3:8100",
    "10.0.0.3:8101",
];

/// The most instances a pool run has at once.
pub const MAX_INSTANCES: usize = 4;

/// Whether these settings are a pool run's (two names or more).
pub(super) fn is_pool(settings: &Settings) -> bool {
    settings.upstreams.len() >= 2
}

/// A list as the config gives it: distinct names, one to [`MAX_INSTANCES`].
fn sanitize_list(list: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in list {
        if !out.contains(name) && out.len() < MAX_INSTANCES {
            out.push(name.clone());
        }
    }
    if out.is_empty() {
        out.push(NAMES[0].to_string());
    }
    out
}

pub(super) fn run(initial: Settings, ops: &[Op], tracing: bool) -> Result<(), Failure> {
    let result = run_pool(initial.clone(), ops, tracing);
    match result {
        Err(_) if !tracing => run_pool(initial, ops, true),
        other => other,
    }
}

fn run_pool(initial: Settings, ops: &[Op], tracing: bool) -> Result<(), Failure> {
    let mut model = PoolModel::new(initial, tracing);
    model.begin()?;
    for op in ops {
        model.step(op)?;
    }
    model.wind_down()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PState {
    Waiting,
    Hooking {
        instance: u32,
        hook: HookId,
        ok: bool,
        /// Its instance's [`PInst::epoch`] when the hook began.
        epoch: u64,
    },
    Connecting {
        instance: u32,
    },
    Proxying {
        instance: u32,
    },
}

impl PState {
    fn holds(self) -> Option<u32> {
        match self {
            PState::Waiting => None,
            PState::Hooking { instance, .. }
            | PState::Connecting { instance }
            | PState::Proxying { instance } => Some(instance),
        }
    }
}

struct PConn {
    conn: ConnRef,
    /// Accept order.
    seq: u64,
    state: PState,
    /// `ConnectFailed` news for it.
    failed_connects: u32,
    /// Put back in line after it held a permit.
    put_back: bool,
    /// The permits in force at its latest activation.
    permits_then: u32,
}

struct PHook {
    instance: u32,
    kind: HookKind,
    conn: ConnId,
}

/// An instance as the core's news tells it.
#[derive(Default)]
struct PInst {
    name: String,
    removed: bool,
    /// Latest service news: ready and not draining.
    ready: bool,
    /// Gave up (`UpstreamFailed`) since its last ready.
    failed: bool,
    /// Out for a planned restart.
    out: bool,
    /// Its latest generation was ready (due or not) and has not stopped.
    served: bool,
    /// The core asked about a service for it (a probe or a spawn).
    supervised: bool,
    /// Its ready generation is due for a restart (it may have begun to
    /// drain: no event marks it).
    due: bool,
    /// Generations started, stopped or lost so far: a hook that began in
    /// another epoch prepared a generation that is gone.
    epoch: u64,
    cooling_until: Option<u64>,
    mood: Mood,
}

/// A generation in the fake shell's process table.
struct Proc {
    instance: u32,
    generation: Generation,
    alive: bool,
    listens_at: Option<u64>,
    /// Its leader's death was reported to the core.
    reported: bool,
}

impl Proc {
    /// This is `instance`'s `generation` and it is still alive.
    fn is_live(&self, instance: u32, generation: Generation) -> bool {
        self.instance == instance && self.generation == generation && self.alive
    }
}

enum Answer {
    Spawned(u32, Generation, Result<u32, String>),
    Probed(u32, Generation, bool),
    Sampled(u32, Generation, ServiceSample),
    Exited(u32, Generation, ServiceExit),
}

/// Each instance's number, name and whether a reload removed it, for the
/// trace.
fn instance_list(core: &Core) -> Vec<(u32, String, bool)> {
    core.stats()
        .instances
        .into_iter()
        .map(|i| (i.id, i.upstream, i.removed))
        .collect()
}

pub(super) struct PoolModel {
    pub(super) core: Core,
    settings: Settings,
    now: u64,
    fed: u64,
    conns: BTreeMap<ConnId, PConn>,
    arriving: Option<ConnRef>,
    accepted: u64,
    closed: u64,
    hooks: BTreeMap<HookId, PHook>,
    reaped: Vec<HookId>,
    instances: BTreeMap<u32, PInst>,
    procs: Vec<Proc>,
    answers: VecDeque<Answer>,
    next_pid: u32,
    paused: bool,
    shutdowns: u32,
    serving: bool,
    idle_pending: bool,
    /// The connection fed `UpstreamConnected` in this step.
    connected: Option<ConnId>,
    tracing: bool,
    trace: String,
    steps: usize,
}

impl PoolModel {
    pub(super) fn new(initial: Settings, tracing: bool) -> Self {
        let mut settings = sanitize(initial);
        settings.upstreams = sanitize_list(&settings.upstreams);
        settings.proxy_header_timeout_ms = None;
        let trace = if tracing {
            format!("initial (pool) {settings:?}\n")
        } else {
            String::new()
        };
        let mut model = PoolModel {
            core: Core::new(settings.clone(), 0),
            settings,
            now: 0,
            fed: 0,
            conns: BTreeMap::new(),
            arriving: None,
            accepted: 0,
            closed: 0,
            hooks: BTreeMap::new(),
            reaped: Vec::new(),
            instances: BTreeMap::new(),
            procs: Vec::new(),
            answers: VecDeque::new(),
            next_pid: 1000,
            paused: false,
            shutdowns: 0,
            serving: false,
            idle_pending: false,
            connected: None,
            tracing,
            trace,
            steps: 0,
        };
        for (i, name) in model.settings.upstreams.iter().enumerate() {
            let id = u32::try_from(i + 1).unwrap_or(u32::MAX);
            model.instances.insert(
                id,
                PInst {
                    name: name.clone(),
                    mood: Mood::default(),
                    ..PInst::default()
                },
            );
        }
        model
    }

    pub(super) fn begin(&mut self) -> Result<(), Failure> {
        let result = self.settle();
        result.map_err(|m| self.fail(&m))
    }

    pub(super) fn step(&mut self, op: &Op) -> Result<(), Failure> {
        self.steps += 1;
        if self.tracing {
            let _ = write!(self.trace, "#{} ", self.steps);
        }
        let result = self.feed(op).and_then(|()| self.settle());
        result.map_err(|m| self.fail(&m))
    }

    /// Hooks running (not reaped), of every instance.
    #[cfg(test)]
    pub(super) fn live_hooks(&self) -> usize {
        self.hooks.len()
    }

    /// Judges an action as if the core had emitted it (the checker's own
    /// tests).
    #[cfg(test)]
    pub(super) fn judge(&mut self, action: Action) -> Result<(), String> {
        self.apply(action)
    }

    /// The live connection accepted `n`-th (0-based), if any.
    #[cfg(test)]
    pub(super) fn conn(&self, n: usize) -> Option<ConnRef> {
        self.conns.values().nth(n).map(|c| c.conn)
    }

    fn fail(&self, message: &str) -> Failure {
        Failure {
            step: self.steps,
            message: message.to_string(),
            trace: self.trace.clone(),
        }
    }

    /// Shuts down (if not yet), reaps every hook, lets deadlines run out.
    pub(super) fn wind_down(&mut self) -> Result<(), Failure> {
        for inst in self.instances.values_mut() {
            inst.mood = Mood::default();
        }
        if self.shutdowns == 0 {
            self.step(&Op::Shutdown)?;
        }
        for round in 0..20_000 {
            if !self.hooks.is_empty() {
                self.step(&Op::HookExited(HookExit::Signaled(9)))?;
            } else if !self.conns.is_empty() || !self.core.is_finished() {
                if self.core.poll_timeout().is_none() {
                    return Err(self.fail("stuck after shutdown: not finished, no deadline"));
                }
                if round >= 1_000 {
                    self.step(&Op::Advance(MAX_ADVANCE_MS))?;
                }
                self.step(&Op::Wake)?;
            } else {
                break;
            }
        }
        if !self.core.is_finished() {
            return Err(self.fail("not finished after shutdown, reaping and grace"));
        }
        if let Some(p) = self.procs.iter().find(|p| p.alive) {
            return Err(self.fail(&format!(
                "finished with instance {}'s generation {} alive",
                p.instance, p.generation
            )));
        }
        if self.accepted != self.closed {
            return Err(self.fail(&format!(
                "{} accepted but {} closed",
                self.accepted, self.closed
            )));
        }
        Ok(())
    }

    // ----- feeding -----

    fn supervised(&self) -> bool {
        self.settings.service.is_some()
    }

    /// Live (not removed) instance numbers, in order.
    fn live(&self) -> Vec<u32> {
        self.instances
            .iter()
            .filter(|(_, inst)| !inst.removed)
            .map(|(id, _)| *id)
            .collect()
    }

    fn pick(&self, i: u8, fits: impl Fn(PState) -> bool) -> Option<ConnRef> {
        let fitting: Vec<ConnRef> = self
            .conns
            .values()
            .filter(|c| fits(c.state))
            .map(|c| c.conn)
            .collect();
        (!fitting.is_empty()).then(|| fitting[usize::from(i) % fitting.len()])
    }

    fn pick_instance(&self, i: u8) -> Option<u32> {
        let live = self.live();
        (!live.is_empty()).then(|| live[usize::from(i) % live.len()])
    }

    /// Brings the core to the model's time first, so that deadlines fire
    /// under the settings (and the pause) in force before the input.
    fn tick_first(&mut self) -> Result<(), String> {
        if self.now > self.fed {
            self.fed = self.now;
            trace!(self, "t={} tick (first)", self.now);
            self.core.handle_tick(self.now);
            self.settle()?;
        }
        Ok(())
    }

    fn feed(&mut self, op: &Op) -> Result<(), String> {
        let now = self.now;
        match op {
            Op::Accept => {
                self.fed = now;
                trace!(self, "t={now} accept");
                let conn = self.core.handle_accepted(now, client_addr(self.accepted));
                self.arriving = Some(conn);
                self.accepted += 1;
            }
            Op::ClientLeft(i) | Op::ClientEof(i) => {
                let Some(conn) = self.pick(*i, |s| !matches!(s, PState::Proxying { .. })) else {
                    return Ok(());
                };
                self.fed = now;
                trace!(self, "t={now} {op:?} conn {}", conn.id);
                if matches!(op, Op::ClientLeft(_)) {
                    self.core.handle_client_left(now, conn);
                } else {
                    self.core.handle_client_eof(now, conn);
                }
            }
            Op::UpstreamConnected(i) | Op::UpstreamFailed(i) => {
                let Some(conn) = self.pick(*i, |s| matches!(s, PState::Connecting { .. })) else {
                    return Ok(());
                };
                self.fed = now;
                trace!(self, "t={now} {op:?} conn {}", conn.id);
                if matches!(op, Op::UpstreamConnected(_)) {
                    self.connected = Some(conn.id);
                    self.core.handle_upstream_connected(now, conn);
                } else {
                    self.core.handle_upstream_failed(now, conn, "refused");
                }
            }
            Op::ConnectAttempt(i, left) => {
                let Some(conn) = self.pick(*i, |s| matches!(s, PState::Connecting { .. })) else {
                    return Ok(());
                };
                self.fed = now;
                trace!(self, "t={now} connect_attempt conn {} left {left}", conn.id);
                self.core
                    .handle_connect_attempt(now, conn, usize::from(*left));
            }
            Op::RelayEnded(i, end) => {
                let Some(conn) = self.pick(*i, |s| matches!(s, PState::Proxying { .. })) else {
                    return Ok(());
                };
                self.fed = now;
                trace!(self, "t={now} relay_ended conn {} {end:?}", conn.id);
                self.core.handle_relay_ended(now, conn, *end);
            }
            Op::HookExited(exit) => {
                if self.hooks.is_empty() {
                    return Ok(());
                }
                // Which hook: the step number picks one, so several run at
                // once and end in any order.
                let n = self.steps % self.hooks.len();
                let Some(id) = self.hooks.keys().nth(n).copied() else {
                    return Ok(());
                };
                let Some(run) = self.hooks.remove(&id) else {
                    return Ok(());
                };
                self.fed = now;
                trace!(
                    self,
                    "t={now} hook {id} ({:?} of instance {}) exited {exit}", run.kind, run.instance
                );
                self.reaped.push(id);
                if exit.is_success()
                    && let Some(c) = self.conns.get_mut(&run.conn)
                    && let PState::Hooking { hook, ok, .. } = &mut c.state
                    && *hook == id
                {
                    *ok = true;
                }
                self.core.handle_hook_exited(now, id, exit.clone());
            }
            Op::Advance(ms) => {
                self.now += (*ms).min(MAX_ADVANCE_MS);
                trace!(self, "advance to t={}", self.now);
            }
            Op::Tick => {
                self.fed = now;
                trace!(self, "t={now} tick");
                self.core.handle_tick(now);
            }
            Op::Wake => {
                if let Some(deadline) = self.core.poll_timeout() {
                    self.now = self.now.max(deadline);
                }
                self.fed = self.now;
                trace!(self, "t={} wake", self.now);
                self.core.handle_tick(self.now);
            }
            Op::Reload(settings) => {
                self.tick_first()?;
                let mut settings = sanitize(Settings::clone(settings));
                settings.upstreams = sanitize_list(&settings.upstreams);
                settings.proxy_header_timeout_ms = None;
                if settings.service.is_some() != self.supervised() {
                    settings.service = self.settings.service.clone();
                }
                trace!(
                    self,
                    "t={} reload {settings:?} (next deadline {:?})",
                    self.now,
                    self.core.poll_timeout()
                );
                trace!(self, "    was {:?}", instance_list(&self.core));
                self.fed = self.now;
                self.settings = settings.clone();
                self.core.handle_reload(self.now, settings);
                // The list is applied at once, before any action of the reload.
                trace!(self, "    now {:?}", instance_list(&self.core));
                self.reconcile()?;
            }
            Op::DumpState => {
                self.fed = now;
                self.core.handle_dump_state(now);
            }
            Op::Shutdown => {
                // Deadlines that passed fire before the stop: ticked first.
                self.tick_first()?;
                self.fed = now;
                trace!(self, "t={now} shutdown");
                self.shutdowns += 1;
                if self.shutdowns == 1 {
                    self.serving = self.settings.serve_queue_on_shutdown;
                } else {
                    self.serving = false;
                }
                for inst in self.instances.values_mut() {
                    inst.out = false;
                }
                self.core.handle_shutdown(now);
            }
            Op::HoldersIdle(ms) => {
                if !self.idle_pending {
                    return Ok(());
                }
                self.idle_pending = false;
                self.fed = now;
                self.core.handle_holders_idle(now, *ms);
            }
            Op::Pause | Op::Resume => {
                self.tick_first()?;
                let pause = *op == Op::Pause;
                trace!(self, "t={} {op:?}", self.now);
                pause_or_resume(&mut self.core, &mut self.paused, self.now, pause)?;
            }
            Op::Kill(i) => {
                let Some(conn) = self.pick(*i, |_| true) else {
                    return Ok(());
                };
                self.fed = now;
                trace!(self, "t={now} kill conn {}", conn.id);
                self.core.handle_kill(now, conn.id);
            }
            Op::ServiceCrash(exit) => return self.feed(&Op::InstanceCrash(0, *exit)),
            Op::InstanceCrash(i, exit) => {
                let Some(id) = self.pick_instance(*i) else {
                    return Ok(());
                };
                if let Some(p) = self.procs.iter_mut().find(|p| p.instance == id && p.alive) {
                    trace!(self, "t={now} instance {id} gen {} crashes", p.generation);
                    p.alive = false;
                    p.reported = true;
                    let generation = p.generation;
                    self.answers
                        .push_back(Answer::Exited(id, generation, *exit));
                    self.fed = now;
                }
            }
            Op::ServiceRestart => return self.feed(&Op::InstanceRestart(0)),
            Op::InstanceRestart(i) => {
                let target = match i {
                    0 => None,
                    i => self.pick_instance(i - 1).map(InstanceId),
                };
                self.fed = now;
                trace!(self, "t={now} restart {target:?}");
                self.core.handle_service_restart(now, target);
            }
            Op::Mood(mood) => {
                for inst in self.instances.values_mut() {
                    inst.mood = *mood;
                }
            }
            Op::InstanceMood(i, mood) => {
                if let Some(id) = self.pick_instance(*i)
                    && let Some(inst) = self.instances.get_mut(&id)
                {
                    inst.mood = *mood;
                }
            }
            // Answered at once, or left to the single-instance model.
            Op::ProxyHeader(..)
            | Op::AcceptPaused
            | Op::Stray(..)
            | Op::AnswerProbe
            | Op::AnswerSpawn
            | Op::AnswerSample
            | Op::ReportExit
            | Op::PortTaken(_)
            | Op::StrayService(..) => {}
        }
        Ok(())
    }

    /// Drains the actions, lets the fake shell answer (and drains again)
    /// until nothing is left to answer, then checks the step.
    fn settle(&mut self) -> Result<(), String> {
        self.drain()?;
        for _ in 0..10_000 {
            let Some(answer) = self.answers.pop_front() else {
                break;
            };
            let now = self.fed;
            match answer {
                Answer::Spawned(id, generation, result) => {
                    trace!(self, "  instance {id} gen {generation} spawned {result:?}");
                    self.core
                        .handle_service_spawned(now, InstanceId(id), generation, result);
                }
                Answer::Probed(id, generation, answered) => {
                    self.core
                        .handle_service_probed(now, InstanceId(id), generation, answered);
                }
                Answer::Sampled(id, generation, sample) => {
                    self.core
                        .handle_service_sampled(now, InstanceId(id), generation, sample);
                }
                Answer::Exited(id, generation, exit) => {
                    trace!(self, "  instance {id} gen {generation} exited {exit:?}");
                    self.core
                        .handle_service_exited(now, InstanceId(id), generation, exit);
                }
            }
            self.drain()?;
        }
        if !self.answers.is_empty() {
            return Err("the fake shell is kept busy without end".to_string());
        }
        self.connected = None;
        self.reaped.clear();
        self.core.check_invariants()?;
        let stats = self.core.stats();
        for inst in &stats.instances {
            let holders = self
                .conns
                .values()
                .filter(|c| c.state.holds() == Some(inst.id))
                .count();
            // Never more holders than the permits in force when the latest
            // of them was let in (a reload may have lowered them since).
            let allowed = self
                .conns
                .values()
                .filter(|c| c.state.holds() == Some(inst.id))
                .map(|c| c.permits_then as usize)
                .max()
                .unwrap_or(0);
            if holders > allowed {
                return Err(format!(
                    "instance {} has {holders} holders, let in under at most {allowed} permits",
                    inst.id
                ));
            }
            if holders != inst.active {
                return Err(format!(
                    "instance {} counts {} holders, the model {holders}",
                    inst.id, inst.active
                ));
            }
        }
        // A removed instance the stats no longer list is gone: its number
        // may come back as a new instance, and a name listed again then is
        // that new one, not this.
        self.instances
            .retain(|id, inst| !inst.removed || stats.instances.iter().any(|s| s.id == *id));
        Ok(())
    }

    fn drain(&mut self) -> Result<(), String> {
        while let Some(action) = self.core.poll_action() {
            if self.tracing && !matches!(action, Action::Log(Event::ServiceState { .. })) {
                let line = match &action {
                    Action::Connect { conn, instance } => {
                        format!("Connect({} to instance {instance})", conn.id)
                    }
                    Action::SpawnHook(r) => format!(
                        "SpawnHook({}, {:?} for conn {} on instance {})",
                        r.hook, r.context.kind, r.context.conn, r.context.instance
                    ),
                    other => brief(other),
                };
                let _ = writeln!(self.trace, "    -> {line}");
            }
            self.apply(action)?;
        }
        if let Some(conn) = self.arriving.take() {
            // Neither logged in nor closed: the accept went nowhere.
            return Err(format!("conn {} accepted but never logged", conn.id));
        }
        Ok(())
    }

    /// After a reload: the numbers of the instances by name, from the
    /// core's stats, checked against the list.
    fn reconcile(&mut self) -> Result<(), String> {
        let stats = self.core.stats();
        let mut seen = Vec::new();
        for inst in &stats.instances {
            let listed = self.settings.upstreams.contains(&inst.upstream);
            // (A removed one still draining may share its name with the
            // new instance a reload added for that name again.)
            if !inst.removed && !listed {
                return Err(format!(
                    "instance {} ({}) is live but not listed",
                    inst.id, inst.upstream
                ));
            }
            if !inst.removed {
                seen.push(inst.upstream.clone());
            }
            match self.instances.get_mut(&inst.id) {
                // (A removed one whose number is reused for its own name
                // again is a new instance: handled below.)
                Some(known) if known.name == inst.upstream && (!known.removed || inst.removed) => {
                    if inst.removed && !known.removed {
                        known.removed = true;
                        known.out = false;
                        known.cooling_until = None;
                    }
                }
                // Listed again while it still drained: the same instance,
                // back in the pool, its service as it was, except that a
                // planned restart's drain waits for its turn again (the
                // stats tell which).
                Some(known) if known.name == inst.upstream => {
                    known.removed = false;
                    known.ready = inst.service.state == Some(ServiceStateName::Ready);
                    // Back in the pool, it is judged from its next stop on
                    // (the core may still count it out: that is stricter).
                    known.out = false;
                    // Its service may be gone (stopped once drained), and
                    // none is made while tcplock stops.
                    known.supervised = inst.service.state.is_some();
                }
                Some(known) if !known.removed && self.settings.upstreams.contains(&known.name) => {
                    return Err(format!(
                        "instance {} was {} and is now {} without being removed",
                        inst.id, known.name, inst.upstream
                    ));
                }
                _ => {
                    // Added, on a new number or a vacant one (possibly
                    // vacated by this very reload).
                    let mood = self
                        .instances
                        .values()
                        .next()
                        .map(|i| i.mood)
                        .unwrap_or_default();
                    self.instances.insert(
                        inst.id,
                        PInst {
                            name: inst.upstream.clone(),
                            mood,
                            ..PInst::default()
                        },
                    );
                }
            }
        }
        for name in &self.settings.upstreams {
            let n = seen.iter().filter(|s| *s == name).count();
            if n != 1 {
                return Err(format!("{name} is {n} live instances after the reload"));
            }
        }
        // A kept name keeps its number: its entry above matched by name.
        for (id, inst) in &mut self.instances {
            if !inst.removed && !stats.instances.iter().any(|s| s.id == *id) {
                if self.settings.upstreams.contains(&inst.name) {
                    return Err(format!("live instance {id} ({}) left the stats", inst.name));
                }
                // Removed with nothing left of it: vacant at once.
                inst.removed = true;
                inst.out = false;
                inst.cooling_until = None;
            }
        }
        Ok(())
    }

    // ----- judging the actions -----

    fn apply(&mut self, action: Action) -> Result<(), String> {
        match action {
            Action::Connect { conn, instance } => self.on_connect(conn, instance.0),
            Action::ConnectNext(conn) => match self.conns.get(&conn.id).map(|c| c.state) {
                Some(PState::Connecting { .. }) => Ok(()),
                state => Err(format!("ConnectNext for conn {} in {state:?}", conn.id)),
            },
            // Sent right after the client's connect failed and it was put
            // back (`connect_failed` came first).
            Action::AbandonConnect(conn) => match self.conns.get(&conn.id) {
                Some(c) if c.state == PState::Waiting && c.put_back => Ok(()),
                c => Err(format!(
                    "AbandonConnect for conn {} in {:?}",
                    conn.id,
                    c.map(|c| c.state)
                )),
            },
            Action::StartRelay(conn) => {
                let Some(c) = self.conns.get_mut(&conn.id) else {
                    return Err(format!("StartRelay for closed conn {}", conn.id));
                };
                let PState::Connecting { instance } = c.state else {
                    return Err(format!("StartRelay for conn {} in {:?}", conn.id, c.state));
                };
                if self.connected != Some(conn.id) {
                    return Err(format!(
                        "StartRelay for conn {} that did not connect",
                        conn.id
                    ));
                }
                c.state = PState::Proxying { instance };
                Ok(())
            }
            Action::Close { conn, outcome, .. } => self.on_close(conn, outcome),
            Action::SpawnHook(request) => self.on_spawn_hook(&request),
            Action::KillHook(hook) => {
                if self.hooks.contains_key(&hook) || self.reaped.contains(&hook) {
                    Ok(())
                } else {
                    Err(format!("KillHook({hook}) for no running hook"))
                }
            }
            Action::StopAccepting | Action::ResumeAccepting => Ok(()),
            Action::ReportIdle => {
                self.idle_pending = true;
                Ok(())
            }
            Action::Log(event) => self.on_event(event),
            Action::ProbeUpstream {
                instance,
                generation,
            } => {
                if let Some(inst) = self.instances.get_mut(&instance.0) {
                    inst.supervised = true;
                }
                let now = self.fed;
                let answered = self.procs.iter().any(|p| {
                    p.is_live(instance.0, generation) && p.listens_at.is_some_and(|at| at <= now)
                });
                self.answers
                    .push_back(Answer::Probed(instance.0, generation, answered));
                Ok(())
            }
            Action::SpawnService {
                instance,
                generation,
                ..
            } => {
                let id = instance.0;
                if let Some(p) = self.procs.iter().find(|p| p.instance == id && p.alive) {
                    return Err(format!(
                        "instance {id}'s generation {generation} spawned while {} lives",
                        p.generation
                    ));
                }
                if self
                    .procs
                    .iter()
                    .any(|p| p.instance == id && p.generation >= generation)
                {
                    return Err(format!(
                        "instance {id}'s generation {generation} spawned after a later one"
                    ));
                }
                let mood = self.mood_of(id);
                let result = if mood.spawn_fails {
                    Err("no such file".to_string())
                } else {
                    self.procs.retain(|p| p.instance != id || p.alive);
                    self.procs.push(Proc {
                        instance: id,
                        generation,
                        alive: true,
                        listens_at: mood.listens_after.map(|ms| self.fed + ms),
                        reported: false,
                    });
                    self.next_pid += 1;
                    Ok(self.next_pid)
                };
                self.answers
                    .push_back(Answer::Spawned(id, generation, result));
                Ok(())
            }
            Action::SampleService {
                instance,
                generation,
            } => {
                let mood = self.mood_of(instance.0);
                let alive = self.procs.iter().any(|p| p.is_live(instance.0, generation));
                let sample = ServiceSample {
                    processes: usize::from(alive),
                    rss_kib: if alive { mood.rss_kib } else { 0 },
                };
                self.answers
                    .push_back(Answer::Sampled(instance.0, generation, sample));
                Ok(())
            }
            Action::SignalService {
                instance,
                generation,
                signal,
            } => {
                let mood = self.mood_of(instance.0);
                if let Some(p) = self
                    .procs
                    .iter_mut()
                    .find(|p| p.is_live(instance.0, generation))
                {
                    let dies = signal == StopSignal::Kill || mood.term_exit_after.is_some();
                    if dies {
                        p.alive = false;
                        if !p.reported {
                            p.reported = true;
                            let exit = ServiceExit::Signal(match signal {
                                StopSignal::Kill => 9,
                                StopSignal::Term => 15,
                            });
                            self.answers
                                .push_back(Answer::Exited(instance.0, generation, exit));
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// The mood `instance` was given (the default for one no longer listed).
    fn mood_of(&self, instance: u32) -> Mood {
        self.instances
            .get(&instance)
            .map(|i| i.mood)
            .unwrap_or_default()
    }

    fn holders(&self, instance: u32, except: ConnId) -> usize {
        self.conns
            .iter()
            .filter(|(id, c)| **id != except && c.state.holds() == Some(instance))
            .count()
    }

    /// Whether a connection may go to `instance` now (any `Connect`, and an
    /// on-activate hook).
    fn usable(&self, instance: u32) -> Result<(), String> {
        self.usable_as(instance, false)
    }

    /// [`Self::usable`]; `prepared`: the `Connect` that follows a successful
    /// hook, whose client took its permit before a cool-down began (the core
    /// lets it try: a success ends the cool-down, a failure counts as one of
    /// its tries).
    fn usable_as(&self, instance: u32, prepared: bool) -> Result<(), String> {
        let Some(inst) = self.instances.get(&instance) else {
            return Err(format!("instance {instance} is not in the pool"));
        };
        if inst.removed {
            return Err(format!("instance {instance} ({}) was removed", inst.name));
        }
        if let Some(until) = inst
            .cooling_until
            .filter(|until| *until > self.fed && !prepared)
        {
            return Err(format!(
                "instance {instance} cools down until t={until}, now t={}",
                self.fed
            ));
        }
        // Added by a reload during a shutdown, it gets no service (none is
        // made while stopping) and takes clients as configured, as a
        // single upstream does.
        let unmade = self.shutdowns > 0 && !inst.supervised;
        if self.supervised() && !inst.ready && !unmade {
            return Err(format!("instance {instance}'s service is not ready"));
        }
        Ok(())
    }

    /// A client takes a permit of `instance`.
    fn activate(&self, conn: ConnId, instance: u32) -> Result<(), String> {
        let Some(c) = self.conns.get(&conn) else {
            return Err(format!("activation of unknown conn {conn}"));
        };
        if self.paused {
            return Err(format!("conn {conn} activated while paused"));
        }
        if self.shutdowns > 0 && !self.serving {
            return Err(format!("conn {conn} activated after a shutdown"));
        }
        if let Some(earlier) = self
            .conns
            .values()
            .find(|o| o.state == PState::Waiting && o.seq < c.seq)
        {
            return Err(format!(
                "FIFO: conn {conn} activated on instance {instance} while conn {} \
                 (accepted before it) waits",
                earlier.conn.id
            ));
        }
        let holders = self.holders(instance, conn);
        if holders >= self.settings.permits as usize {
            return Err(format!(
                "conn {conn} activated on instance {instance} with {holders} holders \
                 of {} permits",
                self.settings.permits
            ));
        }
        self.usable(instance)
    }

    fn on_connect(&mut self, conn: ConnRef, instance: u32) -> Result<(), String> {
        let Some(state) = self.conns.get(&conn.id).map(|c| c.state) else {
            return Err(format!("Connect for closed conn {}", conn.id));
        };
        match state {
            PState::Waiting => {
                self.activate(conn.id, instance)?;
                self.note_activation(conn.id);
            }
            PState::Hooking {
                instance: hooked,
                ok: true,
                epoch,
                ..
            } => {
                if hooked == instance {
                    self.usable_as(instance, true)?;
                } else if self.may_put_back(hooked, epoch) {
                    // Its instance went away while the hook ran: the core put
                    // it back at the head (without a word) and it is taken
                    // again at once.
                    if let Some(c) = self.conns.get_mut(&conn.id) {
                        c.state = PState::Waiting;
                        c.put_back = true;
                    }
                    self.activate(conn.id, instance)?;
                    self.note_activation(conn.id);
                } else {
                    return Err(format!(
                        "conn {} hooked on instance {hooked} connects to {instance}",
                        conn.id
                    ));
                }
            }
            other => return Err(format!("Connect for conn {} in {other:?}", conn.id)),
        }
        if let Some(c) = self.conns.get_mut(&conn.id) {
            c.state = PState::Connecting { instance };
        }
        Ok(())
    }

    fn on_spawn_hook(&mut self, request: &HookRequest) -> Result<(), String> {
        let context = &request.context;
        let instance = context.instance.0;
        if let Some((id, _)) = self.hooks.iter().find(|(_, h)| h.instance == instance) {
            return Err(format!(
                "hook {} spawned for instance {instance} while its hook {id} runs",
                request.hook
            ));
        }
        match self.instances.get(&instance) {
            Some(inst) if inst.name == context.upstream => {}
            other => {
                return Err(format!(
                    "hook {} for instance {instance} told upstream {:?}, the instance is {:?}",
                    request.hook,
                    context.upstream,
                    other.map(|i| &i.name)
                ));
            }
        }
        if context.kind == HookKind::Activate {
            let mut state = self.conns.get(&context.conn).map(|c| c.state);
            if let Some(PState::Hooking {
                instance: hooked,
                ok: true,
                epoch,
                ..
            }) = state
                && self.may_put_back(hooked, epoch)
            {
                // Put back at the head when its instance went away, and
                // taken again at once.
                state = Some(PState::Waiting);
                if let Some(c) = self.conns.get_mut(&context.conn) {
                    c.state = PState::Waiting;
                    c.put_back = true;
                }
            }
            if state != Some(PState::Waiting) {
                return Err(format!(
                    "on-activate hook for conn {} in {state:?}",
                    context.conn
                ));
            }
            self.activate(context.conn, instance)?;
            self.note_activation(context.conn);
            let epoch = self.instances.get(&instance).map_or(0, |i| i.epoch);
            if let Some(c) = self.conns.get_mut(&context.conn) {
                c.state = PState::Hooking {
                    instance,
                    hook: request.hook,
                    ok: false,
                    epoch,
                };
            }
        }
        self.hooks.insert(
            request.hook,
            PHook {
                instance,
                kind: context.kind,
                conn: context.conn,
            },
        );
        Ok(())
    }

    fn note_activation(&mut self, conn: ConnId) {
        let permits = self.settings.permits;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.permits_then = permits;
        }
    }

    /// Whether a client whose hook succeeded on `hooked` may have been put
    /// back at the head: its instance no longer takes clients (or may have
    /// begun to drain for a restart, unmarked), or the generation the hook
    /// prepared is gone.
    fn may_put_back(&self, hooked: u32, epoch: u64) -> bool {
        self.usable(hooked).is_err()
            || self
                .instances
                .get(&hooked)
                .is_some_and(|i| i.due || i.epoch != epoch)
    }

    /// Every live instance gave up.
    fn all_failed(&self) -> bool {
        self.instances
            .values()
            .filter(|inst| !inst.removed)
            .all(|inst| inst.failed)
    }

    fn on_close(&mut self, conn: ConnRef, outcome: Outcome) -> Result<(), String> {
        if self.arriving.is_some_and(|a| a.id == conn.id) {
            // Turned away at the door.
            self.arriving = None;
            self.closed += 1;
            return Ok(());
        }
        let Some(c) = self.conns.remove(&conn.id) else {
            return Err(format!("Close for closed or unknown conn {}", conn.id));
        };
        self.closed += 1;
        match outcome {
            Outcome::UpstreamFailed if !self.all_failed() => Err(format!(
                "conn {} closed upstream_failed while an instance has not given up",
                conn.id
            )),
            Outcome::ConnectFailed => {
                if c.failed_connects == 0 {
                    return Err(format!(
                        "conn {} closed connect_failed unannounced",
                        conn.id
                    ));
                }
                let live = self.live().len();
                let tries = usize::from(CONNECT_TRIES).min(live);
                if !self.supervised()
                    && live >= 2
                    && self.shutdowns == 0
                    && (c.failed_connects as usize) < tries
                {
                    return Err(format!(
                        "conn {} closed connect_failed after {} of {tries} tries",
                        conn.id, c.failed_connects
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn on_event(&mut self, event: Event) -> Result<(), String> {
        let live = self.live().len();
        match event {
            Event::Accepted { conn, .. } => {
                let Some(arriving) = self.arriving.take().filter(|a| a.id == conn) else {
                    return Err(format!("conn {conn} logged in but not accepted now"));
                };
                let seq = self.accepted;
                self.conns.insert(
                    conn,
                    PConn {
                        conn: arriving,
                        seq,
                        state: PState::Waiting,
                        failed_connects: 0,
                        put_back: false,
                        permits_then: 0,
                    },
                );
            }
            Event::Rejected {
                reason: RejectReason::UpstreamFailed,
                conn,
                ..
            } if !self.all_failed() => {
                return Err(format!(
                    "conn {conn} rejected upstream_failed while an instance has not given up"
                ));
            }
            Event::Activated { conn, instance, .. } => {
                let state = self.conns.get(&conn).map(|c| c.state);
                if state
                    != Some(PState::Connecting {
                        instance: instance.0,
                    })
                {
                    return Err(format!(
                        "conn {conn} activated on instance {instance} in {state:?}"
                    ));
                }
                if let Some(inst) = self.instances.get_mut(&instance.0) {
                    inst.cooling_until = None;
                }
            }
            Event::Requeued { conn, instance } => {
                let Some(c) = self.conns.get_mut(&conn) else {
                    return Err(format!("requeued for unknown conn {conn}"));
                };
                match c.state {
                    PState::Hooking {
                        instance: on,
                        ok: true,
                        ..
                    } if on == instance.0 => {
                        c.state = PState::Waiting;
                        c.put_back = true;
                    }
                    other => {
                        return Err(format!(
                            "conn {conn} requeued from instance {instance} in {other:?}"
                        ));
                    }
                }
            }
            Event::ConnectFailed { conn, instance, .. } => {
                let Some(c) = self.conns.get_mut(&conn) else {
                    return Err(format!("connect_failed for unknown conn {conn}"));
                };
                if c.state
                    != (PState::Connecting {
                        instance: instance.0,
                    })
                {
                    return Err(format!(
                        "connect_failed for conn {conn} on instance {instance} in {:?}",
                        c.state
                    ));
                }
                c.failed_connects += 1;
                c.state = PState::Waiting;
                c.put_back = true;
            }
            Event::InstanceCooldown { instance, ms } => {
                if self.supervised() || live < 2 {
                    return Err(format!(
                        "instance {instance} cools down in a pool of {live}{}",
                        if self.supervised() {
                            ", supervised"
                        } else {
                            ""
                        }
                    ));
                }
                if !(COOLDOWN_BASE_MS..=COOLDOWN_MAX_MS).contains(&ms) {
                    return Err(format!("instance {instance} cools down {ms} ms"));
                }
                let until = self.fed + ms;
                if let Some(inst) = self.instances.get_mut(&instance.0) {
                    inst.cooling_until = Some(until);
                }
            }
            Event::HookFailed {
                conn,
                kind: HookKind::Activate,
                instance,
                ..
            } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    match c.state {
                        PState::Hooking { instance: on, .. } if on == instance.0 => {
                            c.state = PState::Waiting;
                            c.put_back = true;
                        }
                        other => {
                            return Err(format!(
                                "hook failed for conn {conn} on instance {instance} in {other:?}"
                            ));
                        }
                    }
                }
            }
            Event::UpstreamReady {
                instance,
                generation,
                ..
            } => {
                let listening = self.procs.iter().any(|p| p.is_live(instance.0, generation));
                if !listening {
                    return Err(format!(
                        "instance {instance}'s generation {generation} ready but not alive"
                    ));
                }
                if let Some(inst) = self.instances.get_mut(&instance.0) {
                    inst.ready = true;
                    inst.due = false;
                    inst.served = true;
                    inst.failed = false;
                    inst.out = false;
                }
            }
            Event::RestartDue {
                instance, reason, ..
            } => {
                let other_out = self
                    .instances
                    .iter()
                    .any(|(id, other)| *id != instance.0 && other.out);
                if let Some(inst) = self.instances.get_mut(&instance.0) {
                    inst.due = true;
                    // A repair, or the only instance with no other out for
                    // a restart (removed meanwhile or not): it drains at
                    // once. A planned restart of a pool waits for its turn,
                    // which no event marks; a removed instance takes no
                    // turn (it stops once drained, or serves on if listed
                    // again).
                    if !reason.is_planned() || live < 2 && !inst.removed && !other_out {
                        inst.ready = false;
                    }
                }
            }
            Event::UpstreamStopping {
                instance, reason, ..
            } => {
                self.set_ready(instance, false);
                if let Some(inst) = self.instances.get_mut(&instance.0) {
                    inst.epoch += 1;
                }
                // Out only if it served: a planned stop of a generation
                // still starting takes nothing out of the pool.
                let serving = self
                    .instances
                    .get_mut(&instance.0)
                    .is_some_and(|inst| !inst.removed && std::mem::take(&mut inst.served));
                if reason.is_planned() && serving && self.shutdowns == 0 {
                    if let Some((other, _)) = self
                        .instances
                        .iter()
                        .find(|(id, inst)| **id != instance.0 && inst.out && !inst.removed)
                    {
                        return Err(format!(
                            "instance {instance} stops for a planned restart ({reason}) \
                             while instance {other} is out for one"
                        ));
                    }
                    if let Some(inst) = self.instances.get_mut(&instance.0) {
                        inst.out = true;
                    }
                }
            }
            Event::UpstreamStarting { instance, .. }
            | Event::UpstreamExited {
                instance,
                expected: false,
                ..
            } => {
                if let Some(inst) = self.instances.get_mut(&instance.0) {
                    inst.ready = false;
                    inst.served = false;
                    inst.epoch += 1;
                }
            }
            Event::UpstreamFailed { instance, .. } => {
                if let Some(inst) = self.instances.get_mut(&instance.0) {
                    inst.ready = false;
                    inst.served = false;
                    inst.failed = true;
                    inst.out = false;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn set_ready(&mut self, instance: InstanceId, ready: bool) {
        if let Some(inst) = self.instances.get_mut(&instance.0) {
            inst.ready = ready;
        }
    }
}

impl Drop for PoolModel {
    fn drop(&mut self) {
        if self.tracing && std::thread::panicking() {
            eprintln!("--- pool model trace up to the panic ---\n{}", self.trace);
        }
    }
}
