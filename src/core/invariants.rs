//! The invariants of DESIGN.md that can be seen from one snapshot of the core.
//! Debug builds check them after every input; the model test and the fuzzer call
//! [`Core::check_invariants`] directly. Order-dependent rules (FIFO activation,
//! a hook before every proxying connection) need the history and are checked by
//! the drivers that see it.

use std::collections::HashSet;

use super::pool::Instance;
use super::queue::SWEEP_MIN_STALE;
use super::{
    ACCEPT_RETRY_BASE_MS, ACCEPT_RETRY_MAX_MS, Activation, ConnRef, ConnState, Core, EndedBy,
    Outcome, is_queued,
};

impl Core {
    /// Checks the snapshot invariants; the error names the first broken one.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut holding = 0;
        let mut queued = 0;
        // Queued clients that held a permit once (a failed hook or connect,
        // or a service gone, put them back at the head).
        let mut put_back = 0;
        let mut preparing = Vec::new();
        let mut armed = 0;
        for (slot, c) in &self.conns {
            let conn = ConnRef { slot, id: c.id };
            armed += usize::from(c.queue_deadline.is_some());
            if let Some(key) = c.queue_deadline
                && !self.timers.contains(key)
            {
                return Err(format!("conn {} holds a dead queue timer", c.id));
            }
            match &c.state {
                ConnState::Header { deadline } => {
                    armed += usize::from(deadline.is_some());
                    if c.queue_deadline.is_some() || c.via.is_some() {
                        return Err(format!(
                            "conn {} waits for its header with a queue timer or a via",
                            c.id
                        ));
                    }
                    if deadline.is_none() {
                        return Err(format!("conn {} waits for its header forever", c.id));
                    }
                    if self.shutdown.is_some() {
                        return Err(format!("conn {} waits for its header after shutdown", c.id));
                    }
                }
                ConnState::Queued { attempts } => {
                    queued += 1;
                    put_back += usize::from(*attempts > 0);
                }
                ConnState::Activating(step) => {
                    holding += 1;
                    let i = c.instance.index();
                    if i >= self.instances.len() {
                        return Err(format!("conn {} holds a permit of no instance", c.id));
                    }
                    let Activation::Connecting {
                        deadline, attempt, ..
                    } = step
                    else {
                        preparing.push((conn, i));
                        continue;
                    };
                    armed += usize::from(deadline.is_some());
                    armed += usize::from(attempt.is_some());
                    let ends_at = deadline.and_then(|key| self.timers.deadline(key));
                    if attempt.is_some() && ends_at.is_none_or(|at| at <= self.now) {
                        return Err(format!(
                            "conn {} has an attempt deadline but no connect time left",
                            c.id
                        ));
                    }
                }
                ConnState::Proxying { ttl, .. } => {
                    holding += 1;
                    if c.instance.index() >= self.instances.len() {
                        return Err(format!("conn {} holds a permit of no instance", c.id));
                    }
                    armed += usize::from(ttl.is_some());
                    if c.queue_deadline.is_some() {
                        return Err(format!("proxying conn {} still has a queue timer", c.id));
                    }
                }
            }
        }
        if holding != self.active {
            return Err(format!(
                "permit count {} but {holding} connections hold one",
                self.active
            ));
        }
        if queued != self.queue.len() {
            return Err(format!(
                "{queued} queued connections but the queue counts {}",
                self.queue.len()
            ));
        }
        let mut seen = HashSet::new();
        for conn in self.queue.entries() {
            if !is_queued(&self.conns, conn) {
                if self.get(conn).is_some() {
                    return Err(format!("stale queue entry for live conn {}", conn.id));
                }
                continue;
            }
            if !seen.insert(conn) {
                return Err(format!("conn {} is queued twice", conn.id));
            }
        }
        if seen.len() != self.queue.len() {
            return Err(format!(
                "{} live queue entries but {} queued connections",
                seen.len(),
                self.queue.len()
            ));
        }
        if let Some(head) = self.queue.front()
            && !is_queued(&self.conns, head)
        {
            return Err(format!("the queue head (conn {}) is stale", head.id));
        }
        // Stale entries are swept once they outnumber the live ones, so the
        // queue stays within about twice the line (memory bounded by max-queue).
        let stale = self.queue.stale();
        if stale > self.queue.len().max(SWEEP_MIN_STALE) {
            return Err(format!(
                "{stale} stale queue entries beside {} live ones",
                self.queue.len()
            ));
        }
        // Invariant 3 holds by construction (one `Option<RunningHook>` per
        // instance); what can break is a connection waiting for a hook that
        // is not its instance's.
        for &(conn, i) in &preparing {
            let run = self.instances[i].hook.as_ref();
            if run.and_then(|run| self.still_waiting_for(run)) != Some(conn) {
                return Err(format!(
                    "conn {} waits for a hook that instance {} does not run",
                    conn.id,
                    i + 1
                ));
            }
        }
        let mut maintenance = 0;
        for (i, inst) in self.instances.iter().enumerate() {
            // Counted per instance, not in a table: the check runs after
            // every input of a debug build, which must not allocate. With
            // one instance, the pool's count above is this one.
            let holders = if self.instances.len() == 1 {
                holding
            } else {
                self.conns
                    .iter()
                    .filter(|(_, c)| {
                        c.instance.index() == i
                            && matches!(
                                c.state,
                                ConnState::Activating(_) | ConnState::Proxying { .. }
                            )
                    })
                    .count()
            };
            if inst.active != holders {
                return Err(format!(
                    "instance {} counts {} permits but {} connections hold one",
                    i + 1,
                    inst.active,
                    holders
                ));
            }
            for key in inst.timers().into_iter().flatten() {
                if !self.timers.contains(key) {
                    return Err(format!("instance {} holds a dead timer {key:?}", i + 1));
                }
                armed += 1;
            }
            if inst.removed && (inst.retry.is_some() || inst.cooldown.is_some()) {
                return Err(format!("removed instance {} still backs off", i + 1));
            }
            // Invariant 8: a removed instance takes no client, so nothing
            // lets one through to it without its hook.
            if inst.removed && inst.prepared {
                return Err(format!("removed instance {} keeps a preparation", i + 1));
            }
            check_last_outcome(inst)?;
            armed += self.check_service(i)?;
            if inst.removed && inst.service.as_ref().is_some_and(|s| s.in_maintenance()) {
                return Err(format!(
                    "removed instance {} holds the maintenance turn",
                    i + 1
                ));
            }
            maintenance += usize::from(inst.service.as_ref().is_some_and(|s| s.in_maintenance()));
        }
        // Invariant 9: planned restarts take one instance out at a time.
        if maintenance > 1 {
            return Err(format!("{maintenance} instances out for planned restarts"));
        }
        if self.service_failed() && self.queue.len() > 0 {
            return Err(format!(
                "{} clients wait for a failed service",
                self.queue.len()
            ));
        }
        armed += usize::from(self.accept_retry.is_some());
        armed += usize::from(self.stall_check.is_some());
        if self.stall_check.is_some() && self.idle_asked {
            return Err("a stall check is armed while an idle report is awaited".to_string());
        }
        // Invariant 6: after a shutdown nothing new waits. With
        // `--shutdown-queue close` (or once a serving shutdown's grace ran out
        // or it was forced) nothing waits at all and nothing is activated;
        // while serving, those waiting are activated in order.
        if let Some(shutdown) = &self.shutdown {
            armed += usize::from(shutdown.grace.is_some());
            if self.accept_retry.is_some() {
                return Err("an accept retry is armed after shutdown".to_string());
            }
            if self.stall_check.is_some() {
                return Err("a stall check is armed after shutdown".to_string());
            }
            if !shutdown.serving && self.waiting() > 0 {
                return Err("connections still waiting after shutdown".to_string());
            }
            if shutdown.serving && shutdown.grace.is_none() {
                return Err("still serving the queue after the shutdown grace".to_string());
            }
        }
        if armed != self.timers.len() {
            return Err(format!(
                "{} timers armed but {armed} owned: a timer outlived its owner",
                self.timers.len()
            ));
        }
        // A client let straight into a free permit is admitted even with
        // max-queue 0; while its on-activate hook runs, or after it failed and
        // put it back at the head for a retry, it is the one waiting client
        // that max-queue did not admit.
        let admitted_straight = self.waiting() > self.queue.len()
            || self.queue.front().is_some_and(|head| {
                matches!(self.conns[head.slot].state, ConnState::Queued { attempts } if attempts > 0)
            });
        let limit = self
            .settings
            .max_queue
            .max(self.reload_backlog)
            .max(usize::from(admitted_straight));
        if self.waiting() > limit && self.instances.len() == 1 {
            return Err(format!(
                "{} clients wait, more than max-queue {limit}",
                self.waiting()
            ));
        }
        // In a pool every instance may let a client straight in while its
        // hook runs, and a failed connect puts its client back at the head:
        // max-queue bounds the clients never admitted.
        let fresh = self.waiting().saturating_sub(preparing.len() + put_back);
        let fresh_limit = self.settings.max_queue.max(self.reload_backlog);
        if fresh > fresh_limit {
            return Err(format!(
                "{fresh} clients never admitted wait, more than max-queue {fresh_limit}"
            ));
        }
        if !(ACCEPT_RETRY_BASE_MS..=ACCEPT_RETRY_MAX_MS).contains(&self.accept_backoff_ms) {
            return Err(format!(
                "accept retry backoff {} ms outside its bounds",
                self.accept_backoff_ms
            ));
        }
        if let Some(deadline) = self.poll_timeout()
            && deadline <= self.now
        {
            return Err(format!(
                "next deadline {deadline} is not after now {}",
                self.now
            ));
        }
        Ok(())
    }

    /// Invariants 8 and 9 for instance `i`'s supervised service; returns
    /// the timers it holds.
    fn check_service(&self, i: usize) -> Result<usize, String> {
        let Some(service) = &self.instances[i].service else {
            return Ok(0);
        };
        let armed = service.timers();
        if let Some(key) = armed
            .iter()
            .flatten()
            .find(|key| !self.timers.contains(**key))
        {
            return Err(format!("the service holds a dead timer {key:?}"));
        }
        let using = self
            .conns
            .iter()
            .filter(|(_, c)| match c.state {
                ConnState::Proxying { .. }
                | ConnState::Activating(Activation::Connecting { .. }) => c.instance.index() == i,
                _ => false,
            })
            .count();
        if using > 0 && !service.is_ready() {
            return Err(format!(
                "{using} connections use instance {}'s service that is {}",
                i + 1,
                service.state_name()
            ));
        }
        let active = self.instances[i].active;
        if service.is_planned_stop() && active > 0 {
            return Err(format!(
                "a planned stop of instance {} with {active} permits held",
                i + 1
            ));
        }
        Ok(armed.iter().flatten().count())
    }
}

/// Who ended an instance's last permit holder is recorded with its outcome,
/// and only a relay's outcome can be ended by either side.
fn check_last_outcome(inst: &Instance) -> Result<(), String> {
    let fits = match (inst.last_outcome, inst.last_ended_by) {
        (None, None) => true,
        (Some(outcome), Some(ended_by)) => ender_of(outcome).is_none_or(|e| e == ended_by),
        _ => false,
    };
    if !fits {
        let (outcome, ended_by) = (inst.last_outcome, inst.last_ended_by);
        return Err(format!(
            "the last connection ended with {outcome:?}, ended by {ended_by:?}"
        ));
    }
    Ok(())
}

/// The side that always ends a connection with `outcome`: the client for one
/// that left while waiting, tcplock for every outcome it decides. `None` for a
/// relay's outcome, which either peer (or tcplock) may end.
pub(crate) fn ender_of(outcome: Outcome) -> Option<EndedBy> {
    match outcome {
        Outcome::Ok | Outcome::ClientError | Outcome::UpstreamError | Outcome::RelayError => None,
        Outcome::Abandoned => Some(EndedBy::Client),
        Outcome::Timeout
        | Outcome::QueueTimeout
        | Outcome::ConnectFailed
        | Outcome::Rejected
        | Outcome::Shutdown
        | Outcome::UpstreamFailed
        | Outcome::Killed => Some(EndedBy::Tcplock),
    }
}
