//! The shadow: what the shell knows, built only from the inputs fed and the
//! actions the core emits.

use super::*;

impl Model {
    /// The shadow's side of a hook exit, applied as the core applies it: after
    /// the deadlines that passed have fired (which, with a hook running, can
    /// close connections but activate none).
    pub(super) fn reaped(&mut self, run: &HookRun, exit: &HookExit, fed: &mut Fed) {
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
                // A success for a generation gone or going keeps nothing.
                None if !self.service_takes_clients() => {}
                None => self.prepared = true,
            }
            return;
        }
        self.hook_failures = self.hook_failures.saturating_add(1);
        if !self.activations_stopped() {
            let shift = (self.hook_failures - 1).min(16);
            let backoff = (RETRY_BASE_MS << shift).min(RETRY_MAX_MS);
            self.retry_until = Some(self.now + backoff);
        }
        // Its client goes back in line when the core logs the failure (the
        // deadlines that fire first see it still preparing).
    }

    pub(super) fn apply(&mut self, action: &Action, fed: &mut Fed) -> Result<(), String> {
        let now = self.fed;
        match action {
            Action::ProbeUpstream { generation: _, .. }
            | Action::SpawnService { .. }
            | Action::SampleService { generation: _, .. }
            | Action::SignalService { .. } => return self.apply_service(action, fed),
            Action::Connect { conn, .. } => {
                if self.activations_stopped() {
                    return Err(format!("Connect for conn {} after shutdown", conn.id));
                }
                self.service_gate(&format!("Connect for conn {}", conn.id))?;
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
            Action::AbandonConnect(conn) => {
                // Only a pool of several instances sends a client on.
                return Err(format!(
                    "AbandonConnect for conn {} of one upstream",
                    conn.id
                ));
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
                if self.activations_stopped() {
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
                if let Some(sd) = &mut self.shutdown {
                    sd.served += 1;
                }
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
                let early = run.deadline.is_none_or(|d| d > now);
                if !shutting && early {
                    return Err(format!(
                        "KillHook for hook {hook} before its deadline {:?} (now {now})",
                        run.deadline
                    ));
                }
                run.kill_sent = true;
                // Before its own deadline, only the grace or a second stop
                // kills it.
                if let Some(sd) = &mut self.shutdown {
                    sd.grace_over |= early;
                }
            }
            Action::StopAccepting => {
                if !fed.shutdown || self.shutdown.is_some() {
                    return Err("StopAccepting twice or without a shutdown".to_string());
                }
                fed.stop_accepting = true;
                self.accept_paused_until = None;
                let grace = self.settings.shutdown_grace_ms;
                let serving = self.settings.serve_queue_on_shutdown;
                self.shutdown = Some(ShutdownState {
                    grace_deadline: now + grace,
                    forced: false,
                    grace_over: false,
                    serving,
                    served: 0,
                    closed: 0,
                    done_logged: false,
                });
                self.idle_pending = false;
                if !serving {
                    self.timeout_due = false;
                }
            }
            Action::ReportIdle => {
                if self.idle_pending {
                    return Err("ReportIdle while the last one is unanswered".to_string());
                }
                let Some(warn) = self.settings.stall_warn_ms else {
                    return Err("ReportIdle with --stall-warn off".to_string());
                };
                if let Some(waited) = self.stall_candidate(now, warn) {
                    if waited < warn {
                        return Err(format!("ReportIdle after the head waited {waited} ms"));
                    }
                } else {
                    return Err("ReportIdle while the queue cannot be stalled".to_string());
                }
                self.idle_pending = true;
            }
            Action::Log(Event::QueueStalled {
                waited_ms,
                holders,
                idle_ms,
            }) => {
                let Some(warn) = self.settings.stall_warn_ms else {
                    return Err("QueueStalled with --stall-warn off".to_string());
                };
                if fed.idle != Some(*idle_ms) || *idle_ms < warn {
                    return Err(format!(
                        "QueueStalled with idle {idle_ms}, the shell said {:?}",
                        fed.idle
                    ));
                }
                if self.stall_candidate(now, warn) != Some(*waited_ms) || *waited_ms < warn {
                    return Err(format!("QueueStalled after the head waited {waited_ms} ms"));
                }
                if *holders != self.holders() {
                    return Err(format!("QueueStalled names {holders} holders"));
                }
                if std::mem::replace(&mut self.stall_warned, true) {
                    return Err("QueueStalled twice for one stall".to_string());
                }
            }
            Action::Log(Event::ShutdownDone { served, closed }) => {
                let Some(sd) = &mut self.shutdown else {
                    return Err("ShutdownDone without a shutdown".to_string());
                };
                if (sd.served, sd.closed) != (*served, *closed) || sd.done_logged {
                    return Err(format!(
                        "ShutdownDone served={served} closed={closed}, the shadow counts \
                         {} and {} (logged before: {})",
                        sd.served, sd.closed, sd.done_logged
                    ));
                }
                sd.done_logged = true;
            }
            Action::Log(Event::ShutdownForced { .. }) => {
                if !fed.shutdown {
                    return Err("ShutdownForced without a shutdown".to_string());
                }
                if let Some(shutdown) = &mut self.shutdown {
                    shutdown.forced = true;
                }
                self.timeout_due = false;
            }
            Action::Log(Event::Accepted { conn, client, via }) => {
                self.joins += 1;
                let joined = self.joins;
                match fed.arriving.take() {
                    Some(mut s) if s.conn.id == *conn => {
                        if via.is_some() {
                            return Err(format!("conn {conn} accepted with a via and no header"));
                        }
                        s.joined = joined;
                        self.conns.insert(*conn, s);
                    }
                    None if fed
                        .header
                        .is_some_and(|(id, h)| id == *conn && h != ProxyHeader::Bad) =>
                    {
                        let queue_timeout = self.settings.queue_timeout_ms;
                        let Some(s) = self
                            .conns
                            .get_mut(conn)
                            .filter(|s| matches!(s.state, State::Header { .. }))
                        else {
                            return Err(format!(
                                "conn {conn} joined the line, not reading a header"
                            ));
                        };
                        let named = match fed.header {
                            Some((_, ProxyHeader::Client(named))) => Some(named),
                            _ => None,
                        };
                        if named.is_some_and(|named| named != *client)
                            || via.is_some() != named.is_some()
                        {
                            return Err(format!(
                                "conn {conn} joined as {client} via {via:?}, its header said {:?}",
                                fed.header
                            ));
                        }
                        s.state = State::Waiting;
                        s.joined = joined;
                        s.queue_deadline = queue_timeout.map(|t| s.accepted_at + t);
                    }
                    _ => return Err(format!("Accepted logged for conn {conn}, not the newcomer")),
                }
            }
            Action::Log(Event::State { conn, .. }) => fed.dumped.push(*conn),
            Action::Log(
                event @ (Event::UpstreamStarting { .. }
                | Event::UpstreamReady { .. }
                | Event::UpstreamStartFailed { .. }
                | Event::UpstreamFailed { .. }
                | Event::UpstreamPortBusy { .. }
                | Event::RestartDue { .. }
                | Event::UpstreamStopping { .. }
                | Event::UpstreamExited { .. }
                | Event::Rejected {
                    reason: RejectReason::UpstreamFailed,
                    ..
                }),
            ) => return self.service_news(event, fed),
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

    pub(super) fn live(&self, conn: ConnRef, what: &str) -> Result<&Shadow, String> {
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

    pub(super) fn shadow_mut(&mut self, id: ConnId) -> &mut Shadow {
        self.conns.get_mut(&id).expect("checked live")
    }

    /// Checks and records an activation of a waiting connection.
    pub(super) fn activate(&mut self, id: ConnId) -> Result<(), String> {
        if self.paused {
            return Err(format!("conn {id} activated while paused"));
        }
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
            .filter(|s| matches!(s.state, State::Waiting))
            .min_by_key(|s| s.joined)
            .map(|s| s.conn.id);
        if head != Some(id) {
            return Err(format!(
                "conn {id} activated out of order: the head of the line is {head:?}"
            ));
        }
        self.activations += 1;
        self.stall_warned = false;
        let permits = self.settings.permits;
        let seq = self.activations;
        let s = self.shadow_mut(id);
        s.permit = Some((seq, permits));
        s.admitted = true;
        Ok(())
    }

    pub(super) fn spawned(&mut self, request: &HookRequest) -> Result<(), String> {
        let now = self.fed;
        if let Some(run) = &self.hook {
            return Err(format!(
                "SpawnHook {} while hook {} is still alive",
                request.hook, run.id
            ));
        }
        if self.activations_stopped() {
            return Err(format!("SpawnHook {} after shutdown", request.hook));
        }
        if self.old_hooks.contains(&request.hook) {
            return Err(format!("SpawnHook reuses hook id {}", request.hook));
        }
        let conn_id = request.context.conn;
        let kind = request.context.kind;
        let conn = match kind {
            HookKind::Activate => {
                self.service_gate(&format!("on-activate hook for conn {conn_id}"))?;
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

    pub(super) fn close(
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
        // Not yet in line: any stop closes it, serving or not.
        let reading_header = matches!(state, State::Header { .. });
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
                    // The supervised generation crashed: its users are cut.
                    || outcome == Outcome::UpstreamError
                        && fed.svc.crashed
                        && ended_by == EndedBy::Upstream
                        && matches!(state, State::Proxying { .. } | State::Connecting { .. })
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
            Outcome::Rejected => match state {
                // The line was full when it came to join it.
                State::Waiting if fed.svc.rejected_failed.contains(&id) => {
                    fed.accepted == Some(id)
                        || fed
                            .header
                            .is_some_and(|(h, header)| h == id && header != ProxyHeader::Bad)
                }
                State::Waiting => {
                    fed.rejected = true;
                    fed.accepted == Some(id)
                        || fed
                            .header
                            .is_some_and(|(h, header)| h == id && header != ProxyHeader::Bad)
                }
                // No good header, or none in time.
                State::Header { deadline } => {
                    deadline <= now || fed.header == Some((id, ProxyHeader::Bad))
                }
                _ => false,
            },
            // The supervised upstream failed to start too often.
            Outcome::UpstreamFailed => {
                fed.svc.gave_up && matches!(state, State::Waiting | State::Header { .. })
                    // Its hook ran through the give-up: back in line (failed
                    // or successful) for a failed service, it is closed.
                    || self.view.failed
                        && self.just_reaped.is_some()
                        && matches!(
                            state,
                            State::Waiting | State::Header { .. } | State::Hooking { ok: true, .. }
                        )
            }
            Outcome::Killed => fed.killed == Some(id),
            Outcome::Shutdown => match &self.shutdown {
                None => false,
                Some(sd) => {
                    let over = sd.forced || sd.grace_deadline <= now;
                    over || reading_header || !proxying && (!sd.serving || fed.accepted == Some(id))
                }
            },
        };
        let decided_by_core = crate::core::invariants::ender_of(outcome);
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
            self.timeout_due = !self.activations_stopped();
            self.last_expired = Some(id);
        }
        // A hooked client closed for a failed service went back in line
        // first: it held no permit then, and kept no preparation.
        let requeued = outcome == Outcome::UpstreamFailed;
        if !requeued && self.conns.get(&id).is_some_and(|s| s.permit.is_some()) {
            self.last_outcome = Some(outcome);
            self.last_ended_by = Some(ended_by);
        }
        if let State::Hooking { ok: true, .. } = state
            && !requeued
            && self.service_takes_clients()
        {
            // It left (or timed out) just before its hook's success was seen.
            self.prepared = true;
        }
        if outcome == Outcome::Shutdown
            && let Some(sd) = &mut self.shutdown
        {
            sd.closed += u64::from(!proxying);
            // Only the grace or a second stop closes those, while serving.
            sd.grace_over |= proxying || fed.accepted != Some(id) && !reading_header;
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

    /// After a shutdown that closes the queue, or once a serving one was
    /// forced or its grace ended: nothing is activated any more.
    pub(super) fn activations_stopped(&self) -> bool {
        self.shutdown
            .as_ref()
            .is_some_and(|sd| !sd.serving || sd.forced || sd.grace_over)
    }

    /// How long the head of the line has waited, if every permit is held by
    /// a proxying connection (the core's condition for asking the shell).
    pub(super) fn stall_candidate(&self, now: u64, _warn: u64) -> Option<u64> {
        let head = self
            .conns
            .values()
            .find(|s| matches!(s.state, State::Waiting))?;
        let holders = self.holders();
        let proxying = self
            .conns
            .values()
            .filter(|s| matches!(s.state, State::Proxying { .. }))
            .count();
        (holders > 0 && holders >= self.settings.permits as usize && proxying == holders)
            .then(|| now - head.accepted_at)
    }

    pub(super) fn holders(&self) -> usize {
        self.conns.values().filter(|s| s.permit.is_some()).count()
    }

    /// The line as max-queue counts it: queued plus the one whose hook runs.
    pub(super) fn waiting(&self) -> usize {
        self.conns
            .values()
            .filter(|s| matches!(s.state, State::Waiting | State::Hooking { .. }))
            .count()
    }
}
