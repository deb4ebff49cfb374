//! The checks after every step: the core's observers and the facts it hands
//! out against the shadow, and the invariants of DESIGN.md.

use super::*;

impl Model {
    /// The facts a hook is told (its `TCPLOCK_*` variables) match the shadow.
    pub(super) fn check_context(&self, request: &HookRequest, attempt: u32) -> Result<(), String> {
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
            c.service,
        );
        let shadow = (
            self.relays,
            timeouts,
            self.last_outcome,
            self.last_ended_by,
            queued,
            self.holders(),
            attempt,
            self.service_running(),
        );
        if expected != shadow {
            return Err(format!(
                "hook {} is told (activations, timeouts, last outcome, last ended by, queued, \
                 active, attempt, service) = {expected:?}, the shadow says {shadow:?}",
                request.hook
            ));
        }
        Ok(())
    }

    pub(super) fn check_after(&mut self, fed: &Fed) -> Result<(), String> {
        let now = self.fed;
        self.core
            .check_invariants()
            .map_err(|e| format!("check_invariants: {e}"))?;
        self.check_service_after()?;
        let core = &self.core;

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
        // The head's wait: with `--accept-proxy` the line is in order of
        // complete headers, so the head need not be the longest waiting.
        let mut waits = self
            .conns
            .values()
            .filter(|s| matches!(s.state, State::Waiting))
            .map(|s| now - s.accepted_at)
            .peekable();
        let head_wait_fits = match waits.peek() {
            None => stats.oldest_wait_ms == 0,
            Some(_) => waits.any(|wait| wait == stats.oldest_wait_ms),
        };
        if !head_wait_fits || stats.permits != self.settings.permits {
            return Err(format!(
                "stats say the head waited {} ms with {} permits; no waiting client did, \
                 or the permits are {}",
                stats.oldest_wait_ms, stats.permits, self.settings.permits
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
        if core.paused() != self.paused {
            return Err(format!(
                "core paused: {}, shadow {}",
                core.paused(),
                self.paused
            ));
        }
        self.check_positions(now)?;
        let mut slots: Vec<usize> = self.conns.values().map(|s| s.conn.slot).collect();
        slots.sort_unstable();
        if slots.windows(2).any(|w| w[0] == w[1]) {
            return Err(format!("two live connections share a slot: {slots:?}"));
        }
        for s in self.conns.values() {
            let name = core.state_of(s.conn).map(|n| n.as_str());
            let expected = match s.state {
                State::Header { .. } => "header",
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
                | State::Header { deadline: d }
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
        if let Some((id, header)) = fed.header
            && let Some(s) = self.conns.get(&id)
            && matches!(s.state, State::Header { .. })
        {
            return Err(format!(
                "conn {id} still waits for a header after {header:?}"
            ));
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
            // Back in line: the service stopped taking clients meanwhile.
            && (!matches!(s.state, State::Waiting) || self.service_takes_clients())
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
        let stopped = self.activations_stopped();
        if let Some(sd) = &self.shutdown {
            if let Some(s) = self
                .conns
                .values()
                .find(|s| !matches!(s.state, State::Proxying { .. }))
                .filter(|_| stopped)
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
                && stopped
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
        // Supervised, the core also waits for the service to rest, which the
        // action stream does not show: checked one way here, and by the
        // wind-down.
        let service_rests = !self.view.ever || core.is_finished();
        if core.is_finished() != (finished && service_rests) {
            return Err(format!(
                "is_finished() is {}, the shadow says {finished}",
                core.is_finished()
            ));
        }
        // ShutdownDone closes the log once the core is finished: supervised,
        // that is after the service rests too.
        if (finished && service_rests) != self.shutdown.as_ref().is_some_and(|sd| sd.done_logged) {
            return Err(format!(
                "finished is {finished}, but ShutdownDone disagrees"
            ));
        }

        // Liveness: with no hook running and no shutdown, a due on-timeout
        // hook runs, and a free permit goes to the head of the line unless an
        // on-activate hook backs off.
        if !stopped && self.hook.is_none() {
            // Supervised, a due on-timeout hook waits (like the line) for a
            // generation that takes clients.
            if self.timeout_due && self.shutdown.is_none() && self.service_takes_clients() {
                return Err("a TTL expired but the on-timeout hook did not run".into());
            }
            if queued > 0
                && holders < self.settings.permits as usize
                && !self.paused
                && self.service_takes_clients()
            {
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

    /// `position` of the head and the last of the line agrees with the
    /// shadow's line (by join order); two scans per step, not one per client.
    fn check_positions(&self, now: u64) -> Result<(), String> {
        let mut line: Vec<&Shadow> = self
            .conns
            .values()
            .filter(|s| matches!(s.state, State::Waiting))
            .collect();
        line.sort_by_key(|s| s.joined);
        let ends = [line.first(), line.last()];
        for (place, s) in line
            .iter()
            .enumerate()
            .filter(|(_, s)| ends.iter().flatten().any(|end| end.conn == s.conn))
        {
            let got = self
                .core
                .position(now, crate::core::Target::Conn(s.conn.id))
                .map_err(|e| format!("position of waiting conn {}: {e:?}", s.conn.id))?;
            let free = self.settings.permits.saturating_sub(self.holders() as u32);
            if (got.position, got.ahead, got.waited_ms, got.free_permits)
                != (place + 1, place, now - s.accepted_at, free)
            {
                return Err(format!(
                    "position of conn {} is {got:?}, the shadow has it at {} of {}",
                    s.conn.id,
                    place + 1,
                    line.len()
                ));
            }
        }
        Ok(())
    }
}
