//! The supervised upstream (`--spawn`): a second state machine beside the
//! connections', in the same core, driven by the same inputs and clock.
//!
//! ```text
//!            port refuses      spawned        answers a connect
//! Stopped ──▶ Checking ──▶ Spawning ──▶ Starting ──────────────▶ Ready ──▶ (due) ──drained──▶ Stopping ──gone──▶ Stopped / next start
//!    ▲           │ port busy    │ failed      │ exited, ready timeout        │ crash: holders cut, leftovers killed
//!    └───────────┴──────────────┴─────────────┴──────▶ (Stopping ▶) Stopped with a retry (backoff; failed after --start-retries)
//! ```
//!
//! The shell spawns, probes, measures and signals; every decision (when a
//! generation is due, when it may stop, when the next one starts, when to give
//! up) is made here. Only one generation is ever alive: a new one is spawned
//! only from `Stopped`, which is reached only once the shell reports that no
//! process of the previous one is left.

use super::Activation;
use super::{
    Action, ConnRef, ConnState, Core, Deadline, EndedBy, Event, Generation, InstanceId, Outcome,
    RejectReason, RestartReason, ServiceExit, ServiceSample, ServiceStateName, ServiceStats,
    StopSignal, TimerKey,
};

/// How often a starting service is probed, and a stopping one looked at.
pub const PROBE_INTERVAL_MS: u64 = 100;
/// How often a running service's memory is sampled (and its age checked).
pub const SAMPLE_INTERVAL_MS: u64 = 5_000;
/// The first retry after a failed start waits this long; each further
/// consecutive failure doubles it, up to [`START_RETRY_MAX_MS`].
pub const START_RETRY_BASE_MS: u64 = 1_000;
/// The longest wait between two starts, and the pace of starts once failed.
pub const START_RETRY_MAX_MS: u64 = 60_000;

/// One supervised service and its history.
pub(super) struct Service {
    state: ServiceState,
    /// The generation the next spawn gets.
    next_generation: u64,
    /// Starts that failed in a row.
    failed_starts: u32,
    /// `--start-retries` starts failed in a row; cleared by the first ready one.
    failed: bool,
    /// Out for a planned restart, from its drain to its next ready: while
    /// it is, no other instance of the pool starts one.
    maintenance: bool,
    /// The last memory sample of the running generation's processes.
    rss_kib: u64,
    restarts: [u64; RestartReason::ALL.len()],
}

enum ServiceState {
    /// Nothing of it runs. With `retry`, a start is scheduled (the backoff
    /// after a failed start); without, it starts when a client comes (after
    /// an idle stop), or never (stopping tcplock). `reason` is the next
    /// start's.
    Stopped {
        retry: Option<TimerKey>,
        reason: RestartReason,
    },
    /// Making sure nothing answers on the upstream port before spawning.
    Checking {
        generation: Generation,
        reason: RestartReason,
    },
    /// The spawn was asked for; its answer is due.
    Spawning {
        generation: Generation,
        reason: RestartReason,
    },
    /// Spawned, probed until it answers a connect.
    Starting {
        generation: Generation,
        pid: u32,
        spawned_at: u64,
        ready_deadline: TimerKey,
        /// The next probe; `None` while one is out.
        probe: Option<TimerKey>,
    },
    /// Answering and taking clients unless `due`.
    Ready {
        generation: Generation,
        pid: u32,
        ready_at: u64,
        /// Connections proxied by this generation.
        conns: u64,
        /// Why it is to restart once drained.
        due: Option<RestartReason>,
        /// When it became due: of several instances waiting for their
        /// turn, the one due longest goes first.
        due_since: u64,
        /// Due and its turn came: it takes no client and stops once no
        /// permit of it is held. A planned restart in a pool waits for its
        /// turn (no other instance out for one, another one ready) and
        /// keeps serving until then.
        draining: bool,
        sample: Option<TimerKey>,
        lifetime: Option<TimerKey>,
        idle: Option<TimerKey>,
    },
    /// Asked to stop; over once its process exited and its session is empty.
    Stopping {
        generation: Generation,
        pid: u32,
        exited: bool,
        /// Ends the polite wait with SIGKILL.
        kill: Option<TimerKey>,
        /// The next look at what is left; `None` while a sample is out.
        check: Option<TimerKey>,
        /// A stop with no client's permit held (not a crash, not a failed start).
        /// Read by the invariant check only.
        #[cfg_attr(not(any(debug_assertions, test, feature = "model")), allow(dead_code))]
        planned: bool,
        then: AfterStop,
    },
}

/// What follows a stop.
#[derive(Clone, Copy)]
enum AfterStop {
    /// Start the next generation at once, for this reason.
    Restart(RestartReason),
    /// A failed start: try again after this long.
    Retry(u64),
    /// Stay stopped until a client comes (idle) or for good (tcplock stops,
    /// or no longer supervises).
    Rest(RestartReason),
}

/// What a failed start left behind.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Leftover {
    /// Nothing was spawned.
    Nothing,
    /// Its process runs (it did not answer in time).
    Running,
    /// Its process exited; others of its session may be left.
    Exited,
}

/// The service's timers, each named by the state that arms it.
#[derive(Clone, Copy, Debug)]
pub(super) enum ServiceTimer {
    Retry,
    ReadyTimeout,
    Probe,
    Sample,
    Lifetime,
    IdleStop,
    StopKill,
    StopCheck,
}

impl Service {
    /// A service whose first spawn is `first_generation` (generations keep
    /// counting when a reload turns supervision off and on again).
    pub(super) fn new(first_generation: u64) -> Self {
        Service {
            state: ServiceState::Stopped {
                retry: None,
                reason: RestartReason::First,
            },
            next_generation: first_generation,
            failed_starts: 0,
            failed: false,
            maintenance: false,
            rss_kib: 0,
            restarts: [0; RestartReason::ALL.len()],
        }
    }

    /// Whether a client may be activated on it now.
    pub(super) fn takes_clients(&self) -> bool {
        matches!(
            self.state,
            ServiceState::Ready {
                draining: false,
                ..
            }
        )
    }

    /// Whether it may serve proxied connections: ready, due or not.
    #[cfg(any(debug_assertions, test, feature = "model"))]
    pub(super) fn is_ready(&self) -> bool {
        matches!(self.state, ServiceState::Ready { .. })
    }

    /// Nothing of it runs and nothing is scheduled.
    pub(super) fn is_at_rest(&self) -> bool {
        matches!(self.state, ServiceState::Stopped { retry: None, .. })
    }

    /// A stop that must find no permit held.
    #[cfg(any(debug_assertions, test, feature = "model"))]
    pub(super) fn is_planned_stop(&self) -> bool {
        matches!(self.state, ServiceState::Stopping { planned: true, .. })
    }

    /// The running generation and its pid, for hooks.
    pub(super) fn running(&self) -> Option<(Generation, u32)> {
        match self.state {
            ServiceState::Ready {
                generation, pid, ..
            } => Some((generation, pid)),
            _ => None,
        }
    }

    pub(super) fn state_name(&self) -> ServiceStateName {
        match self.state {
            ServiceState::Ready {
                draining: false, ..
            } => ServiceStateName::Ready,
            ServiceState::Ready { draining: true, .. } => ServiceStateName::Due,
            _ if self.failed => ServiceStateName::Failed,
            ServiceState::Stopped { .. } => ServiceStateName::Stopped,
            ServiceState::Checking { .. }
            | ServiceState::Spawning { .. }
            | ServiceState::Starting { .. } => ServiceStateName::Starting,
            ServiceState::Stopping { .. } => ServiceStateName::Stopping,
        }
    }

    pub(super) fn stats(&self) -> ServiceStats {
        let (pid, conns, ready_at) = match self.state {
            ServiceState::Starting { pid, .. } | ServiceState::Stopping { pid, .. } => {
                (Some(pid), 0, None)
            }
            ServiceState::Ready {
                pid,
                conns,
                ready_at,
                ..
            } => (Some(pid), conns, Some(ready_at)),
            _ => (None, 0, None),
        };
        ServiceStats {
            state: Some(self.state_name()),
            generation: self.next_generation - 1,
            pid,
            rss_kib: self.rss_kib,
            conns,
            ready_at,
            restarts: self.restarts,
        }
    }

    /// Where the current state keeps a re-armed `timer`, if it has a place.
    fn timer_slot(&mut self, timer: ServiceTimer) -> Option<&mut Option<TimerKey>> {
        match (timer, &mut self.state) {
            (ServiceTimer::Probe, ServiceState::Starting { probe, .. }) => Some(probe),
            (ServiceTimer::Sample, ServiceState::Ready { sample, .. }) => Some(sample),
            (ServiceTimer::IdleStop, ServiceState::Ready { idle, .. }) => Some(idle),
            (ServiceTimer::StopCheck, ServiceState::Stopping { check, .. }) => Some(check),
            _ => None,
        }
    }

    /// Every timer the current state holds, to cancel when it is left (and
    /// for the invariant check).
    pub(super) fn timers(&self) -> [Option<TimerKey>; 4] {
        match self.state {
            ServiceState::Stopped { retry, .. } => [retry, None, None, None],
            ServiceState::Checking { .. } | ServiceState::Spawning { .. } => [None; 4],
            ServiceState::Starting {
                ready_deadline,
                probe,
                ..
            } => [Some(ready_deadline), probe, None, None],
            ServiceState::Ready {
                sample,
                lifetime,
                idle,
                ..
            } => [sample, lifetime, idle, None],
            ServiceState::Stopping { kill, check, .. } => [kill, check, None, None],
        }
    }

    /// Out for a planned restart (see [`Service::maintenance`]).
    pub(super) fn in_maintenance(&self) -> bool {
        self.maintenance
    }

    /// A reload removed its instance: its drain or stop is a removal's now,
    /// no pool maintenance, and holds no turn.
    pub(super) fn left_pool(&mut self) {
        self.maintenance = false;
    }

    /// A reload listed its instance again while it drained or stopped: a
    /// drain for a planned restart waits for its turn again, serving
    /// meanwhile; a planned restart already stopping takes the turn back
    /// unless `turn_taken` (another instance went out meanwhile).
    pub(super) fn rejoined(&mut self, turn_taken: bool) {
        match &mut self.state {
            ServiceState::Ready { draining, due, .. }
                if due.is_some_and(RestartReason::is_planned) =>
            {
                *draining = false;
            }
            ServiceState::Stopping {
                then: AfterStop::Restart(reason),
                ..
            } if reason.is_planned() => self.maintenance = !turn_taken,
            _ => {}
        }
    }

    /// Due and not yet draining: why, and since when.
    fn waiting_turn(&self) -> Option<(RestartReason, u64)> {
        match self.state {
            ServiceState::Ready {
                due: Some(reason),
                due_since,
                draining: false,
                ..
            } => Some((reason, due_since)),
            _ => None,
        }
    }

    fn count_restart(&mut self, reason: RestartReason) {
        self.restarts[reason.index()] += 1;
    }
}

impl Core {
    // ----- inputs -----

    /// The answer to [`Action::ProbeUpstream`]: whether a connect to the
    /// upstream address was accepted. Ignored for a generation not probed.
    pub fn handle_service_probed(
        &mut self,
        now: u64,
        instance: InstanceId,
        generation: Generation,
        answered: bool,
    ) {
        self.advance(now);
        let Some(i) = self.instance_index(instance) else {
            return;
        };
        let Some(service) = &self.instances[i].service else {
            return;
        };
        match service.state {
            ServiceState::Checking {
                generation: checked,
                reason,
            } if checked == generation => {
                if answered {
                    let addr = self.instances[i].upstream.clone();
                    self.log(Event::UpstreamPortBusy {
                        instance: InstanceId::at(i),
                        generation,
                        addr,
                    });
                    self.start_failed(
                        now,
                        i,
                        generation,
                        "upstream port busy".to_string(),
                        Leftover::Nothing,
                    );
                } else if self.stop_for_good(i) {
                    self.rest(i, RestartReason::First);
                } else if let Some(run) = self.settings.service.as_ref().map(|s| s.run)
                    && let Some(service) = &mut self.instances[i].service
                {
                    service.state = ServiceState::Spawning { generation, reason };
                    service.next_generation = generation.0 + 1;
                    self.instances[i].generations_spawned = generation.0;
                    self.actions.push_back(Action::SpawnService {
                        instance: InstanceId::at(i),
                        generation,
                        reason,
                        run,
                    });
                }
            }
            ServiceState::Starting {
                generation: probed,
                pid,
                spawned_at,
                ready_deadline,
                probe: None,
            } if probed == generation => {
                if answered {
                    self.timers.cancel(ready_deadline);
                    self.became_ready(now, i, generation, pid, spawned_at);
                } else {
                    self.rearm(now + PROBE_INTERVAL_MS, i, ServiceTimer::Probe);
                }
            }
            _ => {}
        }
        self.pump(now);
        self.check();
    }

    /// The answer to [`Action::SpawnService`]: the new process's pid, or why
    /// it could not be started.
    pub fn handle_service_spawned(
        &mut self,
        now: u64,
        instance: InstanceId,
        generation: Generation,
        spawned: Result<u32, String>,
    ) {
        self.advance(now);
        let Some(i) = self.instance_index(instance) else {
            return;
        };
        let Some(service) = &mut self.instances[i].service else {
            return;
        };
        let ServiceState::Spawning {
            generation: asked,
            reason,
        } = service.state
        else {
            return;
        };
        if asked != generation {
            return;
        }
        match spawned {
            Ok(pid) => {
                if reason != RestartReason::First {
                    service.count_restart(reason);
                }
                self.log(Event::UpstreamStarting {
                    instance: InstanceId::at(i),
                    generation,
                    pid,
                    reason,
                });
                let ready_timeout = self
                    .settings
                    .service
                    .as_ref()
                    .map_or(0, |s| s.ready_timeout_ms);
                let ready_deadline = self.service_timer(
                    now.saturating_add(ready_timeout),
                    i,
                    ServiceTimer::ReadyTimeout,
                );
                let probe = self.service_timer(now + PROBE_INTERVAL_MS, i, ServiceTimer::Probe);
                if let Some(service) = &mut self.instances[i].service {
                    service.state = ServiceState::Starting {
                        generation,
                        pid,
                        spawned_at: now,
                        ready_deadline,
                        probe: Some(probe),
                    };
                }
            }
            Err(why) => self.start_failed(now, i, generation, why, Leftover::Nothing),
        }
        self.pump(now);
        self.check();
    }

    /// The service's spawned process exited. Unasked, it crashed: its
    /// connections are cut, what is left of it is killed, and the next
    /// generation starts at once.
    pub fn handle_service_exited(
        &mut self,
        now: u64,
        instance: InstanceId,
        generation: Generation,
        exit: ServiceExit,
    ) {
        self.advance(now);
        let Some(i) = self.instance_index(instance) else {
            return;
        };
        let Some(service) = &mut self.instances[i].service else {
            return;
        };
        let was_ready = matches!(service.state, ServiceState::Ready { .. });
        match &mut service.state {
            ServiceState::Starting {
                generation: running,
                pid,
                ..
            }
            | ServiceState::Ready {
                generation: running,
                pid,
                ..
            } if *running == generation => {
                let pid = *pid;
                self.log(Event::UpstreamExited {
                    instance: InstanceId::at(i),
                    generation,
                    pid,
                    exit,
                    expected: false,
                });
                if was_ready {
                    self.begin_stop(
                        now,
                        i,
                        RestartReason::Crash,
                        AfterStop::Restart(RestartReason::Crash),
                        true,
                    );
                    self.cut_holders(now, i);
                } else {
                    let why = format!("exited before it was ready ({})", exit_text(exit));
                    self.start_failed(now, i, generation, why, Leftover::Exited);
                }
            }
            ServiceState::Stopping {
                generation: stopping,
                pid,
                exited,
                check,
                ..
            } if *stopping == generation && !*exited => {
                *exited = true;
                let pid = *pid;
                // Look at what is left now rather than at the next tick.
                let check = check.take();
                self.cancel(check);
                self.log(Event::UpstreamExited {
                    instance: InstanceId::at(i),
                    generation,
                    pid,
                    exit,
                    expected: true,
                });
                self.actions.push_back(Action::SampleService {
                    instance: InstanceId::at(i),
                    generation,
                });
            }
            _ => {}
        }
        self.pump(now);
        self.check();
    }

    /// The answer to [`Action::SampleService`]: what is left of the
    /// generation's processes, and their memory.
    pub fn handle_service_sampled(
        &mut self,
        now: u64,
        instance: InstanceId,
        generation: Generation,
        sample: ServiceSample,
    ) {
        self.advance(now);
        let Some(i) = self.instance_index(instance) else {
            return;
        };
        let limit = self
            .settings
            .service
            .as_ref()
            .and_then(|s| s.restart_rss_kib);
        let Some(service) = &mut self.instances[i].service else {
            return;
        };
        match &mut service.state {
            ServiceState::Ready {
                generation: running,
                ..
            } if *running == generation => {
                service.rss_kib = sample.rss_kib;
                if let Some(limit) = limit
                    && sample.rss_kib > limit
                {
                    self.make_due(i, RestartReason::Rss, Some((sample.rss_kib, limit)));
                }
            }
            ServiceState::Stopping {
                generation: stopping,
                exited,
                check: None,
                then,
                ..
            } if *stopping == generation => {
                if *exited && sample.processes == 0 {
                    let then = *then;
                    self.service_gone(now, i, then);
                } else {
                    self.rearm(now + PROBE_INTERVAL_MS, i, ServiceTimer::StopCheck);
                }
            }
            _ => {}
        }
        self.pump(now);
        self.check();
    }

    /// An operator asked for a restart of one instance, or of all (`None`):
    /// a running generation becomes due (and restarts once drained, one
    /// instance at a time); a service waiting to retry a start starts now.
    pub fn handle_service_restart(&mut self, now: u64, target: Option<InstanceId>) {
        self.advance(now);
        let targets = match target {
            Some(instance) => self.instance_index(instance).into_iter().collect(),
            None => (0..self.instances.len()).collect::<Vec<_>>(),
        };
        for i in targets {
            if !self.instances[i].removed {
                self.restart_requested(now, i, RestartReason::Control);
            }
        }
        self.pump(now);
        self.check();
    }

    /// The table index of a live instance's number.
    pub(super) fn instance_index(&self, instance: InstanceId) -> Option<usize> {
        let i = instance.index();
        (instance.0 > 0 && i < self.instances.len()).then_some(i)
    }

    // ----- decisions -----

    /// Whether a client may be activated on instance `i` now: always when
    /// tcplock does not supervise the upstream, never once a reload
    /// removed the instance.
    pub(super) fn service_takes_clients(&self, i: usize) -> bool {
        if self.instances[i].removed {
            return false;
        }
        match (&self.instances[i].service, self.settings.service.is_some()) {
            // Supervision turned on by a reload waits for the holders before
            // it makes its service; during a shutdown it makes none (until
            // the next start of tcplock), so a served queue goes on to the
            // upstream as configured.
            (None, supervised) => !supervised || self.shutdown.is_some(),
            (Some(service), true) => service.takes_clients(),
            // No longer supervised: clients wait until the last generation
            // is gone, then go straight to the upstream.
            (Some(_), false) => false,
        }
    }

    /// What every instance's service needs after any change (see
    /// [`Core::settle_instance`]); then, with every instance failed, nobody
    /// is left waiting for nothing.
    pub(super) fn settle_service(&mut self, now: u64) {
        self.give_planned_turn();
        let waiting = self.waiting();
        for i in 0..self.instances.len() {
            self.settle_instance(now, i, waiting);
        }
        // A client put back in line by a hook that ended after the service
        // failed would wait for nothing.
        if self.service_failed() && self.queue.len() > 0 {
            self.fail_waiting(now);
        }
    }

    /// What instance `i`'s service needs after any change: a due generation
    /// whose turn came drains and stops, an idle one arms its stop, a
    /// stopped one starts when a client comes, and a stopping tcplock stops
    /// it once nobody is left.
    fn settle_instance(&mut self, now: u64, i: usize, waiting: usize) {
        let inst = &self.instances[i];
        let Some(service) = &inst.service else {
            // Supervision turned on by a reload waits for the connections to
            // the upstream managed elsewhere to finish: its port is theirs.
            if self.settings.service.is_some()
                && self.shutdown.is_none()
                && inst.active == 0
                && !inst.removed
            {
                let first = inst.generations_spawned + 1;
                self.instances[i].service = Some(Service::new(first));
                self.start(i, RestartReason::First);
            }
            return;
        };
        let retiring = self.settings.service.is_none() || inst.removed;
        let stopping_tcplock = self.shutdown.is_some() && self.conns.is_empty() && !self.any_hook();
        // Nobody waits and nobody holds a permit of this instance.
        let unused = self.conns.len() == self.active - inst.active;
        let active = inst.active;
        match &service.state {
            ServiceState::Ready {
                due,
                draining,
                idle,
                ..
            } => {
                let (due, draining, idle) = (*due, *draining, *idle);
                if stopping_tcplock {
                    self.begin_stop(
                        now,
                        i,
                        RestartReason::Shutdown,
                        AfterStop::Rest(RestartReason::First),
                        false,
                    );
                } else if active == 0 && (draining || retiring) {
                    let reason = due.unwrap_or(RestartReason::Reload);
                    let then = if retiring {
                        AfterStop::Rest(RestartReason::First)
                    } else {
                        AfterStop::Restart(reason)
                    };
                    self.begin_stop(now, i, reason, then, false);
                } else {
                    let idle_stop = self.settings.service.as_ref().and_then(|s| s.idle_stop_ms);
                    match (idle_stop, idle) {
                        (Some(after), None) if unused && self.shutdown.is_none() => {
                            self.rearm(now.saturating_add(after), i, ServiceTimer::IdleStop);
                        }
                        (_, Some(key)) if !unused || idle_stop.is_none() => {
                            self.timers.cancel(key);
                            if let Some(slot) = self.instances[i]
                                .service
                                .as_mut()
                                .and_then(|service| service.timer_slot(ServiceTimer::IdleStop))
                            {
                                *slot = None;
                            }
                        }
                        _ => {}
                    }
                }
            }
            ServiceState::Starting { .. } if stopping_tcplock || retiring => {
                let reason = if retiring {
                    RestartReason::Reload
                } else {
                    RestartReason::Shutdown
                };
                self.begin_stop(now, i, reason, AfterStop::Rest(RestartReason::First), false);
            }
            ServiceState::Stopped { retry, reason } => {
                let (retry, reason) = (*retry, *reason);
                if retiring {
                    self.cancel(retry);
                    self.instances[i].service = None;
                } else if self.stop_for_good(i) {
                    if let Some(key) = retry {
                        self.timers.cancel(key);
                        self.rest(i, reason);
                    }
                } else if retry.is_none() && waiting > 0 {
                    // Clients still reading their PROXY header do not start it.
                    self.start(i, reason);
                }
            }
            _ => {}
        }
    }

    /// Starts the drain of the instance whose planned restart may go now,
    /// if one may: the one due longest (the lower number on a tie), while
    /// no other instance is out for a planned restart and another one is
    /// ready to serve, so planned maintenance never empties the pool and a
    /// busy pool cannot keep giving the turn to the same instances. One
    /// pass over the instances.
    fn give_planned_turn(&mut self) {
        let mut first: Option<(u64, usize, RestartReason)> = None;
        let mut ready = 0;
        let mut live = 0;
        for (j, inst) in self.instances.iter().enumerate() {
            if inst.removed {
                continue;
            }
            live += 1;
            let Some(service) = &inst.service else {
                continue;
            };
            if service.maintenance {
                return;
            }
            ready += usize::from(service.takes_clients());
            if let Some((reason, since)) = service.waiting_turn()
                && first.is_none_or(|(at, k, _)| (since, j) < (at, k))
            {
                first = Some((since, j, reason));
            }
        }
        // The one waiting is ready itself: another must be too.
        if let Some((_, i, reason)) = first
            && (live < 2 || ready >= 2)
        {
            self.start_draining(i, reason);
        }
    }

    /// Instance `i`'s turn came: it takes no new client and stops once its
    /// holders are done.
    fn start_draining(&mut self, i: usize, reason: RestartReason) {
        if let Some(service) = &mut self.instances[i].service
            && let ServiceState::Ready { draining, .. } = &mut service.state
        {
            *draining = true;
            service.maintenance = reason.is_planned();
        }
    }

    /// A connection of this generation was let through to it.
    pub(super) fn service_took(&mut self, i: usize) {
        let restart_after = self.settings.service.as_ref().and_then(|s| s.restart_after);
        if let Some(service) = &mut self.instances[i].service
            && let ServiceState::Ready { conns, .. } = &mut service.state
        {
            *conns += 1;
            if let Some(after) = restart_after
                && *conns >= after
            {
                self.make_due(i, RestartReason::AfterN, None);
            }
        }
    }

    /// A connection that held a permit ended with `outcome`: with
    /// `--restart-on` it may make the generation suspect; with
    /// `--restart-rss` its memory is looked at now, between connections.
    pub(super) fn service_released(&mut self, i: usize, outcome: Outcome) {
        let Some(settings) = &self.settings.service else {
            return;
        };
        let on = settings.restart_on;
        let reason = match outcome {
            Outcome::Timeout if on.timeout => Some(RestartReason::Timeout),
            Outcome::ConnectFailed if on.connect_failed => Some(RestartReason::ConnectFailed),
            Outcome::UpstreamError if on.upstream_error => Some(RestartReason::UpstreamError),
            _ => None,
        };
        let sample = settings.restart_rss_kib.is_some();
        let Some(service) = &self.instances[i].service else {
            return;
        };
        let ServiceState::Ready {
            generation, due, ..
        } = service.state
        else {
            return;
        };
        if let Some(reason) = reason
            && due.is_none()
        {
            self.make_due(i, reason, None);
        } else if sample && due.is_none() {
            self.actions.push_back(Action::SampleService {
                instance: InstanceId::at(i),
                generation,
            });
        }
    }

    /// A reload: a changed command makes every running generation due (one
    /// instance restarts at a time); a service waiting to retry a start
    /// tries again now.
    pub(super) fn service_reloaded(&mut self, now: u64, run_changed: bool) {
        for i in 0..self.instances.len() {
            self.instance_reloaded(now, i, run_changed);
        }
    }

    fn instance_reloaded(&mut self, now: u64, i: usize, run_changed: bool) {
        let Some(service) = &self.instances[i].service else {
            return;
        };
        // A failed start waiting for its retry (or for its leftovers to go
        // first) is tried again at once.
        let retry_pending = matches!(
            service.state,
            ServiceState::Stopped { retry: Some(_), .. }
                | ServiceState::Stopping {
                    then: AfterStop::Retry(_),
                    ..
                }
        );
        if run_changed || retry_pending {
            self.restart_requested(now, i, RestartReason::Reload);
        }
    }

    /// Every instance's service is failed: a new client is turned away at
    /// once rather than left waiting for nothing.
    pub(super) fn service_failed(&self) -> bool {
        let mut live = self.instances.iter().filter(|inst| !inst.removed);
        live.all(|inst| inst.service.as_ref().is_some_and(|s| s.failed))
    }

    pub(super) fn service_fired(&mut self, now: u64, i: usize, timer: ServiceTimer) {
        let Some(service) = &mut self.instances[i].service else {
            return;
        };
        match (timer, &mut service.state) {
            (ServiceTimer::Retry, ServiceState::Stopped { retry, reason }) => {
                *retry = None;
                let reason = *reason;
                if self.stop_for_good(i) {
                    self.rest(i, reason);
                } else {
                    self.start(i, reason);
                }
            }
            (
                ServiceTimer::ReadyTimeout,
                ServiceState::Starting {
                    generation, probe, ..
                },
            ) => {
                let (generation, probe) = (*generation, probe.take());
                self.cancel(probe);
                let timeout = self
                    .settings
                    .service
                    .as_ref()
                    .map_or(0, |s| s.ready_timeout_ms);
                let why = format!("not answering on the upstream address after {timeout}ms");
                self.start_failed(now, i, generation, why, Leftover::Running);
            }
            (
                ServiceTimer::Probe,
                ServiceState::Starting {
                    generation, probe, ..
                },
            ) => {
                *probe = None;
                let generation = *generation;
                self.actions.push_back(Action::ProbeUpstream {
                    instance: InstanceId::at(i),
                    generation,
                });
            }
            (
                ServiceTimer::Sample,
                ServiceState::Ready {
                    generation, sample, ..
                },
            ) => {
                let generation = *generation;
                *sample = None;
                self.rearm(now + SAMPLE_INTERVAL_MS, i, ServiceTimer::Sample);
                self.actions.push_back(Action::SampleService {
                    instance: InstanceId::at(i),
                    generation,
                });
            }
            (ServiceTimer::Lifetime, ServiceState::Ready { lifetime, .. }) => {
                *lifetime = None;
                self.make_due(i, RestartReason::Lifetime, None);
            }
            (ServiceTimer::IdleStop, ServiceState::Ready { idle, .. }) => {
                *idle = None;
                if self.conns.is_empty() && self.shutdown.is_none() {
                    self.begin_stop(
                        now,
                        i,
                        RestartReason::Idle,
                        AfterStop::Rest(RestartReason::Idle),
                        false,
                    );
                }
            }
            (
                ServiceTimer::StopKill,
                ServiceState::Stopping {
                    generation, kill, ..
                },
            ) => {
                *kill = None;
                let generation = *generation;
                self.actions.push_back(Action::SignalService {
                    instance: InstanceId::at(i),
                    generation,
                    signal: StopSignal::Kill,
                });
            }
            (
                ServiceTimer::StopCheck,
                ServiceState::Stopping {
                    generation, check, ..
                },
            ) => {
                *check = None;
                let generation = *generation;
                self.actions.push_back(Action::SampleService {
                    instance: InstanceId::at(i),
                    generation,
                });
            }
            // A timer of a state since left was cancelled with it; one that
            // fired in the same tick as the change is stale.
            _ => {}
        }
    }

    /// A second stop request: what is left of every service is killed now.
    pub(super) fn service_forced(&mut self) {
        for i in 0..self.instances.len() {
            self.instance_forced(i);
        }
    }

    fn instance_forced(&mut self, i: usize) {
        if let Some(service) = &mut self.instances[i].service
            && let ServiceState::Stopping {
                generation, kill, ..
            } = &mut service.state
        {
            let (generation, kill) = (*generation, kill.take());
            self.cancel(kill);
            self.actions.push_back(Action::SignalService {
                instance: InstanceId::at(i),
                generation,
                signal: StopSignal::Kill,
            });
        }
    }

    pub(super) fn service_state_event(&self, i: usize) -> Option<Event> {
        let service = self.instances[i].service.as_ref()?;
        let stats = service.stats();
        Some(Event::ServiceState {
            instance: InstanceId::at(i),
            state: service.state_name(),
            generation: Generation(stats.generation),
            pid: stats.pid,
            rss_kib: stats.rss_kib,
            conns: stats.conns,
            age_ms: stats.ready_at.map(|at| self.now.saturating_sub(at)),
        })
    }

    // ----- transitions -----

    fn restart_requested(&mut self, now: u64, i: usize, reason: RestartReason) {
        let Some(service) = &mut self.instances[i].service else {
            return;
        };
        match &mut service.state {
            ServiceState::Ready { due: None, .. } => self.make_due(i, reason, None),
            ServiceState::Starting { .. } => {
                // The old command or address is starting: no client uses it yet.
                self.begin_stop(now, i, reason, AfterStop::Restart(reason), false);
            }
            ServiceState::Stopped { retry, .. } => {
                // Waiting to retry a failed start, or stopped while idle:
                // asked for, it starts now.
                let retry = retry.take();
                self.cancel(retry);
                if self.stop_for_good(i) {
                    self.rest(i, reason);
                } else {
                    self.start(i, reason);
                }
            }
            ServiceState::Stopping { then, .. } => {
                if matches!(then, AfterStop::Retry(_)) {
                    *then = AfterStop::Restart(reason);
                }
            }
            _ => {}
        }
    }

    /// A ready generation not due yet becomes due for `reason`, and says so
    /// (`rss_kib`: the sample and the limit, for a memory restart).
    fn make_due(&mut self, i: usize, reason: RestartReason, rss_kib: Option<(u64, u64)>) {
        let now = self.now;
        if let Some(service) = &mut self.instances[i].service
            && let ServiceState::Ready {
                generation,
                due,
                due_since,
                ..
            } = &mut service.state
            && due.is_none()
        {
            *due = Some(reason);
            *due_since = now;
            let generation = *generation;
            self.log(Event::RestartDue {
                instance: InstanceId::at(i),
                generation,
                reason,
                rss_kib,
            });
            // A repair goes at once; maintenance waits for its turn.
            if !reason.is_planned() {
                self.start_draining(i, reason);
            } else {
                self.give_planned_turn();
            }
        }
    }

    /// Starts a new generation: first make sure the port refuses connections.
    fn start(&mut self, i: usize, reason: RestartReason) {
        let Some(service) = &mut self.instances[i].service else {
            return;
        };
        let generation = Generation(service.next_generation);
        service.state = ServiceState::Checking { generation, reason };
        self.actions.push_back(Action::ProbeUpstream {
            instance: InstanceId::at(i),
            generation,
        });
    }

    fn became_ready(
        &mut self,
        now: u64,
        i: usize,
        generation: Generation,
        pid: u32,
        spawned_at: u64,
    ) {
        let lifetime_ms = self
            .settings
            .service
            .as_ref()
            .and_then(|s| s.max_lifetime_ms);
        let sample = self.service_timer(now + SAMPLE_INTERVAL_MS, i, ServiceTimer::Sample);
        let lifetime = lifetime_ms
            .map(|ms| self.service_timer(now.saturating_add(ms.max(1)), i, ServiceTimer::Lifetime));
        if let Some(service) = &mut self.instances[i].service {
            service.failed_starts = 0;
            service.failed = false;
            service.maintenance = false;
            service.rss_kib = 0;
            service.state = ServiceState::Ready {
                generation,
                pid,
                ready_at: now,
                conns: 0,
                due: None,
                due_since: 0,
                draining: false,
                sample: Some(sample),
                lifetime,
                idle: None,
            };
        }
        self.log(Event::UpstreamReady {
            instance: InstanceId::at(i),
            generation,
            start_ms: now.saturating_sub(spawned_at),
        });
        self.actions.push_back(Action::SampleService {
            instance: InstanceId::at(i),
            generation,
        });
    }

    /// A start failed: count it, give up after `--start-retries` in a row,
    /// and retry after the backoff, once whatever it left is gone.
    fn start_failed(
        &mut self,
        now: u64,
        i: usize,
        generation: Generation,
        why: String,
        left: Leftover,
    ) {
        let retries = self
            .settings
            .service
            .as_ref()
            .map_or(1, |s| s.start_retries);
        let Some(service) = &mut self.instances[i].service else {
            return;
        };
        service.failed_starts = service.failed_starts.saturating_add(1);
        let failures = service.failed_starts;
        let mut backoff = super::doubling(START_RETRY_BASE_MS, START_RETRY_MAX_MS, failures);
        let gives_up = failures >= retries.max(1) && !service.failed;
        if failures >= retries.max(1) {
            service.failed = true;
            // Given up on: it no longer holds the pool's maintenance turn.
            service.maintenance = false;
            backoff = START_RETRY_MAX_MS;
        }
        self.log(Event::UpstreamStartFailed {
            instance: InstanceId::at(i),
            generation,
            why,
        });
        if gives_up {
            self.log(Event::UpstreamFailed {
                instance: InstanceId::at(i),
                starts: failures,
                retry_in_ms: backoff,
            });
            // Skipped while others serve; only a pool with every instance
            // failed turns its waiting clients away.
            if self.service_failed() {
                self.fail_waiting(now);
            }
        }
        match left {
            Leftover::Nothing => self.retry_after(now, i, backoff),
            Leftover::Running | Leftover::Exited => self.begin_stop(
                now,
                i,
                RestartReason::FailedStart,
                AfterStop::Retry(backoff),
                left == Leftover::Exited,
            ),
        }
    }

    fn retry_after(&mut self, now: u64, i: usize, backoff: u64) {
        if self.stop_for_good(i) {
            self.rest(i, RestartReason::FailedStart);
            return;
        }
        let key = self.service_timer(now.saturating_add(backoff), i, ServiceTimer::Retry);
        if let Some(service) = &mut self.instances[i].service {
            service.state = ServiceState::Stopped {
                retry: Some(key),
                reason: RestartReason::FailedStart,
            };
        }
    }

    /// Every waiting client is closed: the service will not come soon.
    fn fail_waiting(&mut self, now: u64) {
        self.end_where(
            now,
            |c| matches!(c.state, ConnState::Queued { .. } | ConnState::Header { .. }),
            Outcome::UpstreamFailed,
            EndedBy::Tcplock,
        );
    }

    /// Turns a newcomer away while the service is failed.
    pub(super) fn reject_failed(&mut self, now: u64, conn: ConnRef) {
        let client = self.conns[conn.slot].client;
        self.log(Event::Rejected {
            conn: conn.id,
            client,
            reason: RejectReason::UpstreamFailed,
        });
        self.end(now, conn, Outcome::Rejected, EndedBy::Tcplock);
    }

    /// Asks the running generation to stop. Once its process `exited` on its
    /// own, whatever it left goes straight to SIGKILL; otherwise SIGTERM, and
    /// SIGKILL after `--stop-timeout`. A stop is planned when it ends a
    /// ready generation that did not exit.
    fn begin_stop(
        &mut self,
        now: u64,
        i: usize,
        reason: RestartReason,
        then: AfterStop,
        exited: bool,
    ) {
        let stop_timeout = self.settings.service.as_ref().map_or(
            super::types::ServiceSettings::default().stop_timeout_ms,
            |s| s.stop_timeout_ms,
        );
        let Some(service) = &mut self.instances[i].service else {
            return;
        };
        let (generation, pid) = match service.state {
            ServiceState::Starting {
                generation, pid, ..
            }
            | ServiceState::Ready {
                generation, pid, ..
            } => (generation, pid),
            _ => return,
        };
        let planned = !exited && matches!(service.state, ServiceState::Ready { .. });
        // A fired timer's key is stale, and cancelling it changes nothing.
        for key in service.timers().into_iter().flatten() {
            self.timers.cancel(key);
        }
        // A hook's preparation was for this generation.
        self.instances[i].prepared = false;
        self.log(Event::UpstreamStopping {
            instance: InstanceId::at(i),
            generation,
            reason,
        });
        let (signal, kill) = if exited {
            (StopSignal::Kill, None)
        } else {
            let key =
                self.service_timer(now.saturating_add(stop_timeout), i, ServiceTimer::StopKill);
            (StopSignal::Term, Some(key))
        };
        self.actions.push_back(Action::SignalService {
            instance: InstanceId::at(i),
            generation,
            signal,
        });
        let check = self.service_timer(now + PROBE_INTERVAL_MS, i, ServiceTimer::StopCheck);
        if let Some(service) = &mut self.instances[i].service {
            service.state = ServiceState::Stopping {
                generation,
                pid,
                exited,
                kill,
                check: Some(check),
                planned,
                then,
            };
        }
    }

    /// Every process of the stopped generation is gone.
    fn service_gone(&mut self, now: u64, i: usize, then: AfterStop) {
        if let Some(service) = &mut self.instances[i].service
            && let ServiceState::Stopping { kill, .. } = service.state
        {
            service.rss_kib = 0;
            if let Some(key) = kill {
                self.timers.cancel(key);
            }
        }
        match then {
            _ if self.stop_for_good(i) => self.rest(i, RestartReason::First),
            AfterStop::Restart(reason) => self.start(i, reason),
            AfterStop::Retry(backoff) => self.retry_after(now, i, backoff),
            AfterStop::Rest(reason) => self.rest(i, reason),
        }
    }

    fn rest(&mut self, i: usize, reason: RestartReason) {
        if let Some(service) = &mut self.instances[i].service {
            service.state = ServiceState::Stopped {
                retry: None,
                reason,
            };
            service.maintenance = false;
        }
        self.note_done();
    }

    /// No new generation of instance `i` is to start: tcplock stops and
    /// nobody is left, it no longer supervises the upstream, or a reload
    /// removed the instance.
    fn stop_for_good(&self, i: usize) -> bool {
        self.settings.service.is_none()
            || self.instances[i].removed
            || self.shutdown.is_some() && self.conns.is_empty() && !self.any_hook()
    }

    /// The generation crashed: every connection on it is cut as the
    /// upstream's doing, so no client keeps a permit on a dead service.
    fn cut_holders(&mut self, now: u64, i: usize) {
        self.end_where(
            now,
            |c| match c.state {
                ConnState::Proxying { .. }
                | ConnState::Activating(Activation::Connecting { .. }) => c.instance.index() == i,
                _ => false,
            },
            Outcome::UpstreamError,
            EndedBy::Upstream,
        );
    }

    /// Arms `timer` at `at` in the slot the current state keeps for it
    /// (which the caller has emptied).
    fn rearm(&mut self, at: u64, i: usize, timer: ServiceTimer) {
        let key = self.service_timer(at, i, timer);
        match self.instances[i]
            .service
            .as_mut()
            .and_then(|service| service.timer_slot(timer))
        {
            Some(slot) => *slot = Some(key),
            None => {
                self.timers.cancel(key);
            }
        }
    }

    fn service_timer(&mut self, at: u64, i: usize, timer: ServiceTimer) -> TimerKey {
        self.timers
            .insert(at, Deadline::Service(InstanceId::at(i), timer))
    }
}

fn exit_text(exit: ServiceExit) -> String {
    match exit {
        ServiceExit::Code(code) => format!("exit {code}"),
        ServiceExit::Signal(signal) => format!("signal {signal}"),
    }
}

#[cfg(test)]
mod tests;
