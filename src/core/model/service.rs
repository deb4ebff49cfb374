//! The supervised upstream (`--spawn`) in the model: a fake shell that keeps a
//! process table and answers the core's service actions consistently with it,
//! and a view of the service built only from the core's log news, against
//! which every action is judged.
//!
//! # What the fake shell does
//!
//! `ProbeUpstream` is answered true only while a stray program holds the port
//! ([`Op::PortTaken`]) or the live generation's leader listens (from
//! [`Mood::listens_after`] ms after its spawn); with [`Mood::late_probes`] the
//! answer waits for an [`Op::AnswerProbe`] (other inputs come first).
//! `SpawnService` is answered at once (fails with [`Mood::spawn_fails`]) and
//! adds the generation to the table: a leader and [`Mood::children`] more
//! processes. `SampleService` is answered at once from the table.
//! `SignalService{Term}` makes the generation exit [`Mood::term_exit_after`] ms
//! later (or never: SIGTERM ignored); `Kill` ends every process of it at once.
//! [`Op::ServiceCrash`] kills the leader unasked (its children live on). A
//! leader's death is reported (`handle_service_exited`) right after the step
//! that notices it. The table forgets a generation once its leader's exit was
//! reported and no process of it is left.
//!
//! # Checks (on top of the core's own `check_service`)
//!
//! - a `Connect` (or an on-activate `SpawnHook`) only while the latest news
//!   says a generation is ready and not due (`UpstreamReady`, not followed by
//!   `RestartDue`, `UpstreamStopping` or an unexpected `UpstreamExited`), and
//!   the service is still configured (or already gone, once no longer);
//! - `SpawnService` only while no process of an earlier generation lives (never
//!   two alive), for a generation never spawned before, running the command in
//!   force;
//! - an `UpstreamStopping` of a ready generation, for any reason but a crash,
//!   only while no permit is held;
//! - every `UpstreamStarting` is followed by `UpstreamReady`,
//!   `UpstreamStartFailed` or (a start abandoned for a reload or a shutdown)
//!   `UpstreamStopping` for that generation before the next one;
//!   `UpstreamReady` only in the step a probe of it was answered true,
//!   `UpstreamPortBusy` only when the port check was answered true;
//! - after `UpstreamFailed` no client waits in line until the next
//!   `UpstreamReady`, and a newcomer is `Rejected` only with that news;
//! - connections use the service only while it is ready; a crash closes them
//!   as `UpstreamError` ended by the upstream, a give-up closes the waiting
//!   as `UpstreamFailed` (and a client whose hook ran through it, once that
//!   hook ends);
//! - a stray answer (a generation never asked about) produces no action;
//! - the core is finished only with no process of the service alive, and the
//!   wind-down (every question answered) finishes it.
//!
//! # What the connection shadow does not predict in supervised runs
//!
//! The shadow stays exact for connections, with the service gating folded in:
//! its liveness check ("a free permit, a waiting client and nothing to wait
//! for") holds only while the news says ready and not due (or the service is
//! gone after a reload turned it off, read from `stats()`; supervision turned
//! on by a reload takes no client until its holders are gone and its first
//! generation is ready, except during a shutdown, which makes no service), and
//! a client whose hook succeeded while the generation stopped taking clients
//! is put back at the head of the line keeping its attempt count (the core
//! logs nothing for it). `is_finished()` is
//! checked one way only (finished implies no connection, hook or service
//! process left) since the service's rest is not in the action stream; the
//! wind-down requires it.

use super::*;
use crate::core::{Generation, RestartReason, ServiceSample, ServiceStateName, StopSignal};

/// How the fake shell and the generations it spawns behave, from now on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mood {
    /// The next spawns fail (`/bin/sh` not found, say).
    pub spawn_fails: bool,
    /// A generation listens this long after its spawn; `None`: never (its
    /// start times out).
    pub listens_after: Option<u64>,
    /// A generation exits this long after SIGTERM; `None`: it ignores SIGTERM.
    pub term_exit_after: Option<u64>,
    /// Processes a generation runs besides its leader.
    pub children: u8,
    /// The memory a sample reports.
    pub rss_kib: u64,
    /// Probes wait for an [`Op::AnswerProbe`].
    pub late_probes: bool,
}

impl Default for Mood {
    fn default() -> Self {
        Mood {
            spawn_fails: false,
            listens_after: Some(0),
            term_exit_after: Some(0),
            children: 0,
            rss_kib: 1_000,
            late_probes: false,
        }
    }
}

/// An answer for a generation the core did not ask about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StrayService {
    /// `handle_service_probed`, answered so.
    Probed(bool),
    /// `handle_service_spawned`, with a pid.
    Spawned,
    /// `handle_service_exited`.
    Exited,
    /// `handle_service_sampled`, nothing left.
    Sampled,
}

#[derive(Clone, Copy, Debug)]
enum Leader {
    Alive { dies_at: Option<u64> },
    Dead { reported: bool, exit: ServiceExit },
}

#[derive(Debug)]
pub(super) struct FakeGen {
    generation: Generation,
    pid: u32,
    listens_at: Option<u64>,
    leader: Leader,
    children: u8,
    term_exit_after: Option<u64>,
    rss_kib: u64,
}

impl FakeGen {
    fn alive(&self) -> bool {
        matches!(self.leader, Leader::Alive { .. }) || self.children > 0
    }
}

/// The fake shell's process table and its unanswered questions.
#[derive(Default)]
pub(super) struct FakeShell {
    pub(super) mood: Mood,
    /// The only generation the table knows (two would be a broken invariant).
    pub(super) live: Option<FakeGen>,
    probes: Vec<Generation>,
    spawn: Option<Generation>,
    samples: Vec<Generation>,
    port_taken_until: u64,
    /// The latest generation spawned.
    last_spawned: u64,
    next_pid: u32,
}

/// The service as the core's log news tells it.
#[derive(Default)]
pub(super) struct View {
    /// A service was configured at some point: the service actions are
    /// expected.
    pub(super) ever: bool,
    /// The generation ready (due or not), until it stops or crashes.
    pub(super) ready: Option<(Generation, u32)>,
    pub(super) due: bool,
    /// Announced by `UpstreamStarting`, not yet ready or failed.
    pub(super) starting: Option<Generation>,
    pub(super) failed: bool,
}

/// What the service side of the current step fed and saw.
#[derive(Default)]
pub(super) struct ServiceFed {
    probed: Option<(Generation, bool)>,
    spawned: Option<(Generation, Option<u32>)>,
    exit_reported: Option<Generation>,
    /// A ready generation crashed in this step.
    pub(super) crashed: bool,
    /// `UpstreamFailed` in this step.
    pub(super) gave_up: bool,
    /// Newcomers turned away for the failed service in this step.
    pub(super) rejected_failed: Vec<ConnId>,
    /// `UpstreamStopping` of a ready generation for a planned reason.
    planned_stop: Option<Generation>,
}

impl Model {
    /// Whether a client may be activated now, as the core decides it.
    pub(super) fn service_takes_clients(&self) -> bool {
        if !self.view.ever {
            return true;
        }
        let gone = self.core.stats().service.state.is_none();
        match &self.settings.service {
            // Turned on by a reload during a shutdown, supervision waits
            // for the next start of tcplock (the core makes no service then).
            Some(_) if gone && self.shutdown.is_some() => true,
            Some(_) => self.view.ready.is_some() && !self.view.due,
            // No longer supervised: once the old service is gone.
            None => gone,
        }
    }

    /// The gate on an activation (`Connect` or on-activate `SpawnHook`).
    pub(super) fn service_gate(&self, what: &str) -> Result<(), String> {
        if !self.view.ever {
            return Ok(());
        }
        let gone = self.core.stats().service.state.is_none();
        let ok = match &self.settings.service {
            Some(_) if gone && self.shutdown.is_some() => true,
            Some(_) => self.view.ready.is_some() && !self.view.due,
            None => self.view.ready.is_none() && self.view.starting.is_none(),
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "{what} while the service is not ready to take clients (ready {:?}, due {}, \
                 starting {:?}, configured {})",
                self.view.ready,
                self.view.due,
                self.view.starting,
                self.settings.service.is_some()
            ))
        }
    }

    /// The running generation a hook must be told of.
    pub(super) fn service_running(&self) -> Option<(Generation, u32)> {
        self.view.ready
    }

    // ----- feeding -----

    pub(super) fn feed_service(&mut self, op: &Op, fed: &mut Fed) -> Result<(), String> {
        let now = self.now;
        match op {
            Op::AnswerProbe => {
                if self.shell.probes.is_empty() {
                    return self.skip(op);
                }
                let generation = self.shell.probes.remove(0);
                let answered = self.port_answers(now);
                self.fed = now;
                trace!(self, "t={now} probed gen {generation} {answered}");
                fed.svc.probed = Some((generation, answered));
                self.core
                    .handle_service_probed(now, InstanceId(1), generation, answered);
            }
            Op::AnswerSpawn => {
                let Some(generation) = self.shell.spawn.take() else {
                    return self.skip(op);
                };
                self.fed = now;
                if self.shell.mood.spawn_fails {
                    trace!(self, "t={now} spawn gen {generation} failed");
                    fed.svc.spawned = Some((generation, None));
                    self.core.handle_service_spawned(
                        now,
                        InstanceId(1),
                        generation,
                        Err("not found".to_string()),
                    );
                } else {
                    self.shell.next_pid += 1;
                    let pid = 1_000 + self.shell.next_pid;
                    let mood = self.shell.mood;
                    self.shell.live = Some(FakeGen {
                        generation,
                        pid,
                        listens_at: mood.listens_after.map(|d| now + d),
                        leader: Leader::Alive { dies_at: None },
                        children: mood.children,
                        term_exit_after: mood.term_exit_after,
                        rss_kib: mood.rss_kib,
                    });
                    trace!(self, "t={now} spawned gen {generation} pid {pid}");
                    fed.svc.spawned = Some((generation, Some(pid)));
                    self.core
                        .handle_service_spawned(now, InstanceId(1), generation, Ok(pid));
                }
            }
            Op::AnswerSample => {
                if self.shell.samples.is_empty() {
                    return self.skip(op);
                }
                let generation = self.shell.samples.remove(0);
                let sample = match &self.shell.live {
                    Some(g) if g.generation == generation && g.alive() => {
                        let leader = usize::from(matches!(g.leader, Leader::Alive { .. }));
                        let processes = leader + usize::from(g.children);
                        ServiceSample {
                            processes,
                            rss_kib: g.rss_kib * processes as u64,
                        }
                    }
                    _ => ServiceSample::default(),
                };
                self.fed = now;
                trace!(self, "t={now} sampled gen {generation} {sample:?}");
                self.core
                    .handle_service_sampled(now, InstanceId(1), generation, sample);
            }
            Op::ReportExit => {
                let Some(g) = self.shell.live.as_mut() else {
                    return self.skip(op);
                };
                let Leader::Dead {
                    reported: reported @ false,
                    exit,
                } = &mut g.leader
                else {
                    return self.skip(op);
                };
                *reported = true;
                let (generation, exit) = (g.generation, *exit);
                self.forget_gone();
                self.fed = now;
                trace!(self, "t={now} gen {generation} exited {exit:?}");
                fed.svc.exit_reported = Some(generation);
                self.core
                    .handle_service_exited(now, InstanceId(1), generation, exit);
            }
            Op::ServiceCrash(exit) => {
                let Some(g) = self.shell.live.as_mut() else {
                    return self.skip(op);
                };
                if !matches!(g.leader, Leader::Alive { .. }) {
                    return self.skip(op);
                }
                g.leader = Leader::Dead {
                    reported: false,
                    exit: *exit,
                };
                trace!(self, "t={now} gen {} crashes", g.generation);
                // Reported by the next step of the shell.
            }
            Op::Mood(mood) => {
                trace!(self, "mood {mood:?}");
                self.shell.mood = *mood;
            }
            Op::PortTaken(ms) => {
                let ms = (*ms).min(MAX_ADVANCE_MS);
                trace!(self, "t={now} port taken for {ms}ms");
                self.shell.port_taken_until = now + ms;
            }
            Op::ServiceRestart => {
                if !self.view.ever {
                    // Nothing to restart: ignored (fed at the latest time
                    // already passed, so no deadline fires either).
                    fed.quiet = true;
                    let now = self.fed;
                    trace!(self, "t={now} service restart (none)");
                    self.core.handle_service_restart(now, None);
                    return Ok(());
                }
                self.fed = now;
                trace!(self, "t={now} service restart");
                self.core.handle_service_restart(now, None);
            }
            Op::StrayService(i, stray) => {
                fed.quiet = true;
                let now = self.fed;
                let generation = Generation(if i % 2 == 0 { 0 } else { 1 << 40 });
                trace!(self, "t={now} stray {stray:?} for gen {generation}");
                match stray {
                    StrayService::Probed(answered) => {
                        self.core
                            .handle_service_probed(now, InstanceId(1), generation, *answered);
                    }
                    StrayService::Spawned => {
                        self.core
                            .handle_service_spawned(now, InstanceId(1), generation, Ok(7));
                    }
                    StrayService::Exited => {
                        self.core.handle_service_exited(
                            now,
                            InstanceId(1),
                            generation,
                            ServiceExit::Code(0),
                        );
                    }
                    StrayService::Sampled => {
                        self.core.handle_service_sampled(
                            now,
                            InstanceId(1),
                            generation,
                            ServiceSample::default(),
                        );
                    }
                }
            }
            _ => unreachable!("not a service op: {op:?}"),
        }
        Ok(())
    }

    fn port_answers(&self, now: u64) -> bool {
        now < self.shell.port_taken_until
            || self.shell.live.as_ref().is_some_and(|g| {
                matches!(g.leader, Leader::Alive { .. }) && g.listens_at.is_some_and(|t| t <= now)
            })
    }

    fn forget_gone(&mut self) {
        if self
            .shell
            .live
            .as_ref()
            .is_some_and(|g| !g.alive() && matches!(g.leader, Leader::Dead { reported: true, .. }))
        {
            self.shell.live = None;
        }
    }

    /// What the shell does next on its own, if anything: answer a spawn or a
    /// sample (at once), notice a leader that died (SIGTERM's delay ran out),
    /// report a death, answer a probe (unless probes come late).
    pub(super) fn shell_turn(&mut self) -> Option<Op> {
        let now = self.now;
        if self.shell.spawn.is_some() {
            return Some(Op::AnswerSpawn);
        }
        if !self.shell.samples.is_empty() {
            return Some(Op::AnswerSample);
        }
        if let Some(g) = &mut self.shell.live
            && let Leader::Alive {
                dies_at: Some(at), ..
            } = g.leader
            && at <= now
        {
            g.leader = Leader::Dead {
                reported: false,
                exit: ServiceExit::Signal(15),
            };
            g.children = 0;
        }
        if let Some(g) = &self.shell.live
            && matches!(
                g.leader,
                Leader::Dead {
                    reported: false,
                    ..
                }
            )
        {
            return Some(Op::ReportExit);
        }
        if !self.shell.probes.is_empty() && !self.shell.mood.late_probes {
            return Some(Op::AnswerProbe);
        }
        None
    }

    /// For the wind-down: every question is answered, late probes too.
    pub(super) fn shell_pending(&mut self) -> Option<Op> {
        self.shell_turn()
            .or_else(|| (!self.shell.probes.is_empty()).then_some(Op::AnswerProbe))
    }

    /// No process of the service lives and nothing is asked of the shell.
    pub(super) fn service_quiet(&self) -> bool {
        !self.shell.live.as_ref().is_some_and(FakeGen::alive) && self.shell.spawn.is_none()
    }

    // ----- actions -----

    pub(super) fn apply_service(&mut self, action: &Action, fed: &mut Fed) -> Result<(), String> {
        let now = self.fed;
        if !self.view.ever {
            return Err(format!("{action:?} without a supervised upstream"));
        }
        match action {
            Action::ProbeUpstream { generation, .. } => {
                if self.shell.probes.contains(generation) {
                    return Err(format!(
                        "ProbeUpstream for gen {generation} while one is unanswered"
                    ));
                }
                self.shell.probes.push(*generation);
            }
            Action::SpawnService {
                generation, run, ..
            } => {
                if let Some(g) = self.shell.live.as_ref().filter(|g| g.alive()) {
                    return Err(format!(
                        "SpawnService for gen {generation} while gen {} (pid {}) is alive: \
                         two generations",
                        g.generation, g.pid
                    ));
                }
                if generation.0 <= self.shell.last_spawned {
                    return Err(format!(
                        "SpawnService for gen {generation}, not after gen {} spawned before",
                        self.shell.last_spawned
                    ));
                }
                match &self.settings.service {
                    Some(s) if s.run == *run => {}
                    other => {
                        return Err(format!(
                            "SpawnService runs {run:?}, configured {:?}",
                            other.as_ref().map(|s| s.run)
                        ));
                    }
                }
                if self.shell.spawn.is_some() {
                    return Err("SpawnService while a spawn is unanswered".into());
                }
                self.shell.last_spawned = generation.0;
                self.shell.spawn = Some(*generation);
            }
            Action::SampleService { generation, .. } => self.shell.samples.push(*generation),
            Action::SignalService {
                generation, signal, ..
            } => {
                if *signal == StopSignal::Term
                    && fed.svc.planned_stop == Some(*generation)
                    && self.holders() > 0
                {
                    return Err(format!(
                        "SIGTERM for a planned stop of gen {generation} while {} hold a permit",
                        self.holders()
                    ));
                }
                if let Some(g) = self
                    .shell
                    .live
                    .as_mut()
                    .filter(|g| g.generation == *generation)
                {
                    match signal {
                        StopSignal::Kill => {
                            if let Leader::Alive { .. } = g.leader {
                                g.leader = Leader::Dead {
                                    reported: false,
                                    exit: ServiceExit::Signal(9),
                                };
                            }
                            g.children = 0;
                        }
                        StopSignal::Term => {
                            if let (Leader::Alive { dies_at }, Some(after)) =
                                (&mut g.leader, g.term_exit_after)
                            {
                                let at = now + after;
                                *dies_at = Some(dies_at.map_or(at, |d| d.min(at)));
                            } else if matches!(g.leader, Leader::Dead { .. })
                                && g.term_exit_after.is_some()
                            {
                                // A crash's leftovers obey.
                                g.children = 0;
                            }
                        }
                    }
                    self.forget_gone();
                }
            }
            _ => unreachable!("not a service action"),
        }
        Ok(())
    }

    /// The service's log news: the view, and the checks on it.
    pub(super) fn service_news(&mut self, event: &Event, fed: &mut Fed) -> Result<(), String> {
        trace!(self, "    news {event:?}");
        let view_ever = self.view.ever;
        match event {
            Event::UpstreamStarting {
                generation, pid, ..
            } => {
                if fed.svc.spawned != Some((*generation, Some(*pid))) {
                    return Err(format!(
                        "UpstreamStarting gen {generation} pid {pid}, the shell spawned {:?}",
                        fed.svc.spawned
                    ));
                }
                if let Some(before) = self.view.starting {
                    return Err(format!(
                        "UpstreamStarting gen {generation} before gen {before} was ready or failed"
                    ));
                }
                self.view.starting = Some(*generation);
            }
            Event::UpstreamReady { generation, .. } => {
                if self.view.starting != Some(*generation) {
                    return Err(format!(
                        "UpstreamReady gen {generation}, starting is {:?}",
                        self.view.starting
                    ));
                }
                if fed.svc.probed != Some((*generation, true)) {
                    return Err(format!(
                        "UpstreamReady gen {generation}, the shell's probe said {:?}",
                        fed.svc.probed
                    ));
                }
                let pid = self
                    .shell
                    .live
                    .as_ref()
                    .filter(|g| g.generation == *generation)
                    .map_or(0, |g| g.pid);
                self.view.starting = None;
                self.view.ready = Some((*generation, pid));
                self.view.due = false;
                self.view.failed = false;
            }
            Event::UpstreamStartFailed { generation, .. }
                if self.view.starting == Some(*generation) =>
            {
                self.view.starting = None;
            }
            Event::UpstreamFailed { .. } => {
                self.view.failed = true;
                fed.svc.gave_up = true;
            }
            Event::UpstreamPortBusy { generation, .. }
                if fed.svc.probed != Some((*generation, true)) =>
            {
                return Err(format!(
                    "UpstreamPortBusy gen {generation}, the shell's probe said {:?}",
                    fed.svc.probed
                ));
            }
            Event::RestartDue { generation, .. } => {
                if self.view.ready.map(|r| r.0) != Some(*generation) || self.view.due {
                    return Err(format!(
                        "RestartDue gen {generation}: ready {:?}, due {}",
                        self.view.ready, self.view.due
                    ));
                }
                self.view.due = true;
            }
            Event::UpstreamStopping {
                generation, reason, ..
            } => {
                let was_ready = self.view.ready.map(|r| r.0) == Some(*generation);
                self.requeue_hooked();
                // A preparation was for the generation now stopping.
                self.prepared = false;
                if was_ready && *reason != RestartReason::Crash {
                    if self.holders() > 0 {
                        return Err(format!(
                            "UpstreamStopping gen {generation} ({reason}) while {} hold a permit",
                            self.holders()
                        ));
                    }
                    if *reason != RestartReason::Shutdown {
                        fed.svc.planned_stop = Some(*generation);
                    }
                }
                if was_ready {
                    self.view.ready = None;
                    self.view.due = false;
                }
                // A start abandoned for a reload or a shutdown ends here: it
                // did not fail, and logs no UpstreamStartFailed
                // (`service/tests.rs`
                // `a_start_abandoned_for_a_reload_is_stopped_not_failed`).
                if self.view.starting == Some(*generation) {
                    self.view.starting = None;
                }
            }
            Event::UpstreamExited {
                generation,
                expected,
                ..
            } => {
                if fed.svc.exit_reported != Some(*generation) {
                    return Err(format!(
                        "UpstreamExited gen {generation}, the shell reported {:?}",
                        fed.svc.exit_reported
                    ));
                }
                if !expected && self.view.ready.map(|r| r.0) == Some(*generation) {
                    fed.svc.crashed = true;
                }
            }
            Event::Rejected {
                conn,
                reason: RejectReason::UpstreamFailed,
                ..
            } => {
                if !self.view.failed {
                    return Err(format!(
                        "conn {conn} rejected for a failed upstream, the news says not failed"
                    ));
                }
                fed.svc.rejected_failed.push(*conn);
            }
            _ => {}
        }
        if !view_ever {
            return Err(format!("{event:?} without a supervised upstream"));
        }
        Ok(())
    }

    /// A hook succeeded while the generation was not taking clients: its
    /// client went back to the head of the line, its permit given back (no
    /// log marks it; only the service news can tell).
    fn requeue_hooked(&mut self) {
        if self.service_takes_clients() {
            return;
        }
        for s in self.conns.values_mut() {
            if let State::Hooking { ok: true, .. } = s.state {
                s.state = State::Waiting;
                s.permit = None;
                // Prepared afresh for the next generation; its attempt count
                // goes on (it was admitted once, whatever max-queue says).
            }
        }
    }

    // ----- after each step -----

    pub(super) fn check_service_after(&mut self) -> Result<(), String> {
        if !self.view.ever {
            return Ok(());
        }
        if self.core.stats().service.state.is_none() {
            // No longer supervised, and the old service is gone (the core
            // logs nothing for it): nothing of it is news any more.
            if let Some(g) = self.view.ready.or(self.view.starting.map(|g| (g, 0))) {
                return Err(format!(
                    "the service is gone, but gen {} was not stopped",
                    g.0
                ));
            }
            self.view.failed = false;
            self.view.due = false;
        }
        self.requeue_hooked();
        if self.view.failed
            && let Some(s) = self
                .conns
                .values()
                .find(|s| matches!(s.state, State::Waiting))
        {
            return Err(format!(
                "conn {} waits in line after UpstreamFailed",
                s.conn.id
            ));
        }
        let gone = self.core.stats().service.state.is_none();
        if self.view.ready.is_none()
            && !gone
            && let Some(s) = self
                .conns
                .values()
                .find(|s| matches!(s.state, State::Connecting { .. } | State::Proxying { .. }))
        {
            return Err(format!(
                "conn {} is {:?} while no generation is ready",
                s.conn.id, s.state
            ));
        }
        // The core's stats agree with the news.
        let stats = self.core.stats().service;
        if let Some((generation, pid)) = self.view.ready {
            let state = if self.view.due {
                ServiceStateName::Due
            } else {
                ServiceStateName::Ready
            };
            if (stats.state, stats.generation, stats.pid) != (Some(state), generation.0, Some(pid))
            {
                return Err(format!(
                    "stats say the service is {:?}, gen {}, pid {:?}; the news: {state} gen \
                     {generation} pid {pid}",
                    stats.state, stats.generation, stats.pid
                ));
            }
        } else if matches!(
            stats.state,
            Some(ServiceStateName::Ready | ServiceStateName::Due)
        ) {
            return Err(format!(
                "stats say {:?}, no news of a ready generation",
                stats.state
            ));
        }
        if self.core.is_finished() && !self.service_quiet() {
            return Err("finished while a process of the service lives".into());
        }
        Ok(())
    }
}
