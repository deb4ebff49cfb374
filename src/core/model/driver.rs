//! Feeding the core: each [`Op`] becomes the input the shell would give, and
//! the actions that follow are drained into the shadow.

use super::*;

impl Model {
    /// One op, then whatever the fake shell does on its own right after it
    /// (answer a spawn or a sample, report a death, answer a probe), each
    /// its own step.
    pub(super) fn step(&mut self, op: &Op) -> Result<(), Failure> {
        self.step_one(op)?;
        self.shell_steps()
    }

    fn shell_steps(&mut self) -> Result<(), Failure> {
        for _ in 0..64 {
            match self.shell_turn() {
                Some(op) => self.step_one(&op)?,
                None => return Ok(()),
            }
        }
        Err(self.fail("the fake shell is kept busy without end"))
    }

    /// The actions `Core::new` queued (a supervised upstream starts at once).
    pub(super) fn begin(&mut self) -> Result<(), Failure> {
        let mut fed = Fed::default();
        self.drain(&mut fed)
            .and_then(|()| self.check_after(&fed))
            .map_err(|message| self.fail(&message))?;
        self.shell_steps()
    }

    fn step_one(&mut self, op: &Op) -> Result<(), Failure> {
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
    /// While a shutdown serves the queue, hooks succeed: a failing one would
    /// be retried every 30 s until a grace of up to 100 years ran out.
    pub(super) fn wind_down(&mut self) -> Result<(), Failure> {
        // A benign shell: a service whose memory is over the limit from its
        // first sample would be restarted without end while a hook runs for
        // every generation.
        self.shell.mood = Mood::default();
        self.shell.mood.rss_kib = 0;
        if self.shutdown.is_none() {
            self.step(&Op::Shutdown)?;
        }
        for round in 0..20_000 {
            let grace = self.shutdown.as_ref().map(|sd| sd.grace_deadline);
            if let Some(op) = self.shell_pending() {
                self.step(&op)?;
            } else if self.hook.is_some() {
                let exit = if self.activations_stopped() {
                    HookExit::Signaled(9)
                } else {
                    HookExit::Success
                };
                self.step(&Op::HookExited(exit))?;
            } else if !self.conns.is_empty() {
                if self.core.poll_timeout().is_none() {
                    return Err(self.fail("stuck after shutdown: connections open, no deadline"));
                }
                if self.view.ever
                    && round >= 1_000
                    && let Some(grace) = grace.filter(|g| *g > self.now)
                {
                    // A ready service is sampled every 5 s: a grace of days
                    // would take a step per sample.
                    self.step(&Op::Advance(grace - self.now))?;
                }
                self.step(&Op::Wake)?;
            } else if !self.core.is_finished() {
                if self.core.poll_timeout().is_none() {
                    return Err(
                        self.fail("stuck after shutdown: the service is not at rest, no deadline")
                    );
                }
                if round >= 1_000 {
                    // A stopping service is looked at every 100 ms: a stop
                    // timeout (or a SIGTERM obeyed) hours away would take a
                    // step per look.
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
        if !self.service_quiet() {
            return Err(self.fail("finished with a process of the service alive"));
        }
        if self.accepted != self.closed {
            return Err(self.fail(&format!(
                "{} accepted but {} closed",
                self.accepted, self.closed
            )));
        }
        Ok(())
    }

    pub(super) fn fail(&self, message: &str) -> Failure {
        Failure {
            step: self.steps,
            message: message.to_string(),
            trace: self.trace.clone(),
        }
    }

    // ----- feeding -----

    pub(super) fn feed(&mut self, op: &Op, fed: &mut Fed) -> Result<(), String> {
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
                if let Some(t) = self
                    .settings
                    .proxy_header_timeout_ms
                    .filter(|_| self.shutdown.is_none())
                {
                    // Not in line, not logged, until its header is read.
                    let shadow = Shadow {
                        conn,
                        accepted_at: self.now,
                        joined: 0,
                        queue_deadline: None,
                        state: State::Header {
                            deadline: self.now + t,
                        },
                        permit: None,
                        cleared: false,
                        admitted: false,
                        hook_runs: 0,
                        eof: false,
                    };
                    self.conns.insert(conn.id, shadow);
                    return Ok(());
                }
                fed.accepted = Some(conn.id);
                fed.arriving = Some(Shadow {
                    conn,
                    accepted_at: self.now,
                    joined: 0,
                    queue_deadline: self.settings.queue_timeout_ms.map(|t| self.now + t),
                    state: State::Waiting,
                    permit: None,
                    cleared: false,
                    admitted: false,
                    hook_runs: 0,
                    eof: false,
                });
            }
            Op::ProxyHeader(i, header) => {
                let Some(conn) = self.pick(*i, |s| matches!(s, State::Header { .. })) else {
                    return self.skip(op);
                };
                self.fed = self.now;
                let header = match header {
                    ProxyHeader::Client(_) => ProxyHeader::Client(client_addr(1 << 20 | conn.id.0)),
                    other => *other,
                };
                trace!(
                    self,
                    "t={} proxy_header conn {} {header:?}", self.now, conn.id
                );
                fed.header = Some((conn.id, header));
                self.core.handle_proxy_header(self.now, conn, header);
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
                // The news supersedes its address's share, even one that ran
                // out at this very moment: no ConnectNext may follow.
                if let State::Connecting { attempt, .. } = &mut self.shadow_mut(conn.id).state {
                    *attempt = None;
                }
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
                // Not ticked first: the share of the address before may run
                // out at this very moment, and the new attempt supersedes it.
                let Some(conn) = self.pick(*i, |s| matches!(s, State::Connecting { .. })) else {
                    return self.skip(op);
                };
                self.fed = self.now;
                let now = self.now;
                trace!(self, "t={now} connect_attempt conn {} left {left}", conn.id);
                let left = usize::from(*left);
                let s = self.shadow_mut(conn.id);
                if let State::Connecting { deadline, attempt } = &mut s.state {
                    *attempt = deadline.filter(|_| left > 1).and_then(|ends| {
                        let share = (ends.saturating_sub(now) / left as u64).max(1);
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
                if self.hook.is_none() {
                    return self.skip(op);
                }
                if self.view.ever {
                    // The shadow marks the success before the core sees it,
                    // but the core fires the deadlines that passed first: a
                    // service stop among them would put back a client whose
                    // success the core has not processed yet (it keeps the
                    // preparation instead). Deadlines first, in a step of
                    // their own.
                    self.tick_first(fed)?;
                }
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
                let mut settings = sanitize(Settings::clone(settings));
                trace!(self, "t={} reload {settings:?}", self.now);
                // Fixed at start-up: a reload keeps it (`keep_fixed`).
                settings.proxy_header_timeout_ms = self.settings.proxy_header_timeout_ms;
                // One upstream all along: a list that grows is the pool model's.
                settings.upstreams = self.settings.upstreams.clone();
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
                self.view.ever |= settings.service.is_some();
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
            Op::HoldersIdle(idle_ms) => {
                if !self.idle_pending {
                    return self.skip(op);
                }
                self.fed = self.now;
                trace!(self, "t={} holders_idle {idle_ms}ms", self.now);
                self.idle_pending = false;
                fed.idle = Some(*idle_ms);
                if self
                    .settings
                    .stall_warn_ms
                    .is_some_and(|warn| *idle_ms < warn)
                {
                    self.stall_warned = false;
                }
                self.core.handle_holders_idle(self.now, *idle_ms);
            }
            Op::Pause | Op::Resume => {
                self.tick_first(fed)?;
                let pause = *op == Op::Pause;
                trace!(
                    self,
                    "t={} {}",
                    self.now,
                    if pause { "pause" } else { "resume" }
                );
                pause_or_resume(&mut self.core, &mut self.paused, self.now, pause)?;
            }
            Op::Kill(i) => {
                let Some(conn) = self.pick(*i, |_| true) else {
                    return self.skip(op);
                };
                self.fed = self.now;
                trace!(self, "t={} kill conn {}", self.now, conn.id);
                fed.killed = Some(conn.id);
                // A deadline firing first may end it: then the kill finds nothing.
                self.core.handle_kill(self.now, conn.id);
            }
            Op::Stray(i, input) => return self.feed_stray(*i, *input, fed),
            Op::AnswerProbe
            | Op::AnswerSpawn
            | Op::AnswerSample
            | Op::ReportExit
            | Op::ServiceCrash(_)
            | Op::Mood(_)
            | Op::PortTaken(_)
            | Op::ServiceRestart
            | Op::StrayService(..) => return self.feed_service(op, fed),
            // One instance: the pool's ops name it.
            Op::InstanceCrash(_, exit) => return self.feed_service(&Op::ServiceCrash(*exit), fed),
            Op::InstanceRestart(_) => return self.feed_service(&Op::ServiceRestart, fed),
            Op::InstanceMood(_, mood) => return self.feed_service(&Op::Mood(*mood), fed),
        }
        Ok(())
    }

    /// Brings the core to the model's time with a tick of its own (a step of
    /// its own), for inputs whose shadow update must not race with deadlines.
    pub(super) fn tick_first(&mut self, fed: &mut Fed) -> Result<(), String> {
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

    pub(super) fn skip(&mut self, op: &Op) -> Result<(), String> {
        trace!(self, "skip {op:?}");
        Ok(())
    }

    /// The `i`-th (modulo) live connection, in accept order, whose state fits.
    pub(super) fn pick(&self, i: u8, fits: impl Fn(&State) -> bool) -> Option<ConnRef> {
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

    pub(super) fn feed_stray(
        &mut self,
        i: u8,
        input: StrayInput,
        fed: &mut Fed,
    ) -> Result<(), String> {
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
            StrayInput::ProxyHeader => !matches!(s, State::Header { .. }),
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
            StrayInput::ProxyHeader => {
                self.core
                    .handle_proxy_header(now, conn, ProxyHeader::Client(client_addr(7)));
            }
            StrayInput::HookExited => {}
        }
        Ok(())
    }

    // ----- draining -----

    pub(super) fn drain(&mut self, fed: &mut Fed) -> Result<(), String> {
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
        let now = self.fed;
        if let Some(sd) = &mut self.shutdown {
            sd.grace_over |= sd.grace_deadline <= now;
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
}
