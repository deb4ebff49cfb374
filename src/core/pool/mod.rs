//! The instances of the pool behind the one queue: what each holds on its
//! own (permits, its hook slot and backoff, its cool-down, its supervised
//! service), which one takes the head of the line, and how a reload changes
//! the list.
//!
//! One FIFO line serves every instance. The head goes to a free instance or
//! waits; nobody behind it is let through first, because every instance
//! that cannot take the head cannot take anyone behind it either.

use super::*;

/// The first cool-down of an instance whose connect failed; each further
/// failure in a row doubles it, up to [`COOLDOWN_MAX_MS`].
pub const COOLDOWN_BASE_MS: u64 = 1_000;
/// The longest cool-down.
pub const COOLDOWN_MAX_MS: u64 = 30_000;
/// A client whose connect failed on this many instances (or on every
/// instance of a smaller pool) ends `connect_failed`.
pub const CONNECT_TRIES: u8 = 3;

/// One upstream instance and what only it needs.
pub(super) struct Instance {
    /// Its address as the shell names it (`TCPLOCK_UPSTREAM`).
    pub(super) upstream: String,
    /// A reload removed it: it takes no client, drains, stops, and its slot
    /// is free for an added instance once nothing of it is left.
    pub(super) removed: bool,
    /// Connections holding one of its permits: Activating plus Proxying.
    pub(super) active: usize,
    pub(super) hook: Option<RunningHook>,
    /// A TTL on it expired and the on-timeout hook has not run for it yet.
    /// Expiries that pile up while it waits share one run.
    pub(super) timeout_hook_due: Option<(ConnId, SocketAddr)>,
    /// An on-activate hook succeeded on it but its client left: the next
    /// client it takes goes through without running the hook again.
    pub(super) prepared: bool,
    /// Consecutive on-activate failures, for the backoff.
    pub(super) hook_failures: u32,
    /// While a failed on-activate hook backs off: the timer that ends it.
    pub(super) retry: Option<TimerKey>,
    /// While it cools down after a failed connect: the timer that ends it.
    pub(super) cooldown: Option<TimerKey>,
    /// Failed connects in a row, for the cool-down's length.
    pub(super) connect_failures: u32,
    /// When it last took or gave back a permit: among free instances the
    /// one idle longest goes first, so wear spreads evenly.
    pub(super) last_busy: u64,
    pub(super) activations: u64,
    pub(super) timeouts: u64,
    pub(super) last_outcome: Option<Outcome>,
    /// Who ended that connection; set together with `last_outcome`.
    pub(super) last_ended_by: Option<EndedBy>,
    /// `--spawn`: its supervised service. It outlives a reload that turns
    /// supervision off (or removes the instance) until it has stopped.
    pub(super) service: Option<Service>,
    /// Generations spawned so far, across supervision turned off and on.
    pub(super) generations_spawned: u64,
}

impl Instance {
    pub(super) fn new(upstream: String, now: u64) -> Self {
        Instance {
            upstream,
            removed: false,
            active: 0,
            hook: None,
            timeout_hook_due: None,
            prepared: false,
            hook_failures: 0,
            retry: None,
            cooldown: None,
            connect_failures: 0,
            last_busy: now,
            activations: 0,
            timeouts: 0,
            last_outcome: None,
            last_ended_by: None,
            service: None,
            generations_spawned: 0,
        }
    }

    /// A removed instance with nothing left of it: its number may be reused.
    fn is_vacant(&self) -> bool {
        self.removed
            && self.active == 0
            && self.hook.is_none()
            && self.retry.is_none()
            && self.cooldown.is_none()
            && self.service.as_ref().is_none_or(Service::is_at_rest)
    }

    /// Its supervised service's numbers; all zero without one.
    pub(super) fn service_stats(&self) -> ServiceStats {
        self.service
            .as_ref()
            .map(Service::stats)
            .unwrap_or_default()
    }

    /// Every timer it holds outside its service.
    pub(super) fn timers(&self) -> [Option<TimerKey>; 3] {
        [
            self.hook.as_ref().and_then(|run| run.deadline),
            self.retry,
            self.cooldown,
        ]
    }
}

impl Core {
    /// The instances a setting list names, at the start.
    pub(super) fn instances_for(settings: &Settings, now: u64) -> Vec<Instance> {
        let names = instance_names(settings);
        names
            .into_iter()
            .map(|name| Instance::new(name, now))
            .collect()
    }

    /// Instances not removed by a reload.
    pub(super) fn live_instances(&self) -> usize {
        self.instances.iter().filter(|inst| !inst.removed).count()
    }

    /// Permits in all: each live instance's.
    pub(super) fn capacity(&self) -> usize {
        self.live_instances()
            .saturating_mul(self.settings.permits as usize)
    }

    /// Whether an on-activate hook must run before `i` takes a client.
    pub(super) fn hook_needed(&self, i: usize) -> bool {
        self.settings.on_activate.is_some() && !self.instances[i].prepared
    }

    /// Whether instance `i` may take the head of the line now.
    fn can_take(&self, i: usize) -> bool {
        let inst = &self.instances[i];
        !inst.removed
            && inst.hook.is_none()
            && inst.timeout_hook_due.is_none()
            && inst.cooldown.is_none()
            && inst.active < self.settings.permits as usize
            && !(inst.retry.is_some() && self.hook_needed(i))
            && self.service_takes_clients(i)
    }

    /// The instance the head of the line goes to: of those free, the one
    /// with the fewest holders, then the one idle longest, then the lowest
    /// number.
    pub(super) fn pick_instance(&self) -> Option<usize> {
        (0..self.instances.len())
            .filter(|&i| self.can_take(i))
            .min_by_key(|&i| (self.instances[i].active, self.instances[i].last_busy, i))
    }

    /// The instance a hook run belongs to.
    pub(super) fn hook_owner(&self, hook: HookId) -> Option<usize> {
        self.instances
            .iter()
            .position(|inst| inst.hook.as_ref().is_some_and(|run| run.id == hook))
    }

    /// Whether any instance runs a hook.
    pub(super) fn any_hook(&self) -> bool {
        self.instances.iter().any(|inst| inst.hook.is_some())
    }

    /// A client holding a permit of `i` goes back in line, at the head
    /// (behind others put back that were accepted before it): it keeps its
    /// hook attempts, not its permit.
    pub(super) fn back_to_head(&mut self, now: u64, conn: ConnRef, i: usize) {
        let attempts = match self.conns[conn.slot].state {
            ConnState::Activating(Activation::Hook { attempt }) => attempt,
            ConnState::Activating(Activation::Connecting { deadline, attempt }) => {
                self.cancel(deadline);
                self.cancel(attempt);
                // A connect that timed out may still be under way: its
                // socket must not answer for the next instance.
                self.actions.push_back(Action::AbandonConnect(conn));
                1
            }
            _ => 1,
        };
        self.conns[conn.slot].state = ConnState::Queued { attempts };
        self.release_permit(now, i);
        // Ahead of it stay only those put back before it (they were taken
        // and have attempts) that were accepted before it. A client never
        // taken has no attempts: every one of them is behind it.
        let conns = &self.conns;
        let put_back_before = |entry: ConnRef| match conns.get(entry.slot) {
            Some(c) if c.id == entry.id => match c.state {
                ConnState::Queued { attempts } => attempts > 0 && entry.id < conn.id,
                _ => true,
            },
            _ => true,
        };
        self.queue
            .put_back(conn, put_back_before, |entry| is_queued(conns, entry));
    }

    pub(super) fn take_permit(&mut self, now: u64, conn: ConnRef, i: usize) {
        self.conns[conn.slot].instance = InstanceId::at(i);
        self.active += 1;
        let inst = &mut self.instances[i];
        inst.active += 1;
        inst.last_busy = now;
    }

    pub(super) fn release_permit(&mut self, now: u64, i: usize) {
        self.active -= 1;
        let inst = &mut self.instances[i];
        inst.active -= 1;
        inst.last_busy = now;
    }

    /// A connect to `i` failed. Passive health: in a pool of instances not
    /// supervised by tcplock, `i` cools down and the client tries the next
    /// free instance, until it failed on [`CONNECT_TRIES`] of them. Returns
    /// whether the client was put back in line.
    pub(super) fn try_another_instance(&mut self, now: u64, conn: ConnRef, i: usize) -> bool {
        let live = self.live_instances();
        if live < 2 || self.settings.service.is_some() || self.stopped() {
            return false;
        }
        // A reload removed it meanwhile: no cool-down for what is gone.
        if !self.instances[i].removed {
            let inst = &mut self.instances[i];
            inst.connect_failures = inst.connect_failures.saturating_add(1);
            let ms = doubling(COOLDOWN_BASE_MS, COOLDOWN_MAX_MS, inst.connect_failures);
            let previous = inst.cooldown.take();
            self.cancel(previous);
            let key = self.timers.insert(
                now.saturating_add(ms),
                Deadline::Cooldown(InstanceId::at(i)),
            );
            self.instances[i].cooldown = Some(key);
            self.log(Event::InstanceCooldown {
                instance: InstanceId::at(i),
                ms,
            });
        }
        let tries = CONNECT_TRIES.min(u8::try_from(live).unwrap_or(u8::MAX));
        let c = &mut self.conns[conn.slot];
        c.failed_connects = c.failed_connects.saturating_add(1);
        if c.failed_connects >= tries {
            return false;
        }
        self.back_to_head(now, conn, i);
        true
    }

    /// A connect to `i` succeeded: a cool-down, if any, is over.
    pub(super) fn connected_to(&mut self, i: usize) {
        let inst = &mut self.instances[i];
        inst.connect_failures = 0;
        let cooldown = inst.cooldown.take();
        self.cancel(cooldown);
    }

    /// A reload's list: an instance whose address stays keeps running
    /// untouched, a removed one takes no client and goes once drained, an
    /// added one takes the lowest free number and starts.
    pub(super) fn reconcile_instances(&mut self, now: u64) {
        let names = instance_names(&self.settings);
        for i in 0..self.instances.len() {
            let inst = &mut self.instances[i];
            if inst.removed || names.contains(&inst.upstream) {
                continue;
            }
            inst.removed = true;
            inst.prepared = false;
            inst.timeout_hook_due = None;
            if let Some(service) = &mut inst.service {
                service.left_pool();
            }
            let timers = [inst.retry.take(), inst.cooldown.take()];
            for key in timers {
                self.cancel(key);
            }
        }
        for name in names {
            if self
                .instances
                .iter()
                .any(|inst| !inst.removed && inst.upstream == name)
            {
                continue;
            }
            // Removed by an earlier reload and still draining: it is back,
            // as it was, rather than beside a second copy of itself.
            if let Some(i) = self
                .instances
                .iter()
                .position(|inst| inst.removed && !inst.is_vacant() && inst.upstream == name)
            {
                let turn_taken = self.instances.iter().any(|inst| {
                    !inst.removed && inst.service.as_ref().is_some_and(Service::in_maintenance)
                });
                let inst = &mut self.instances[i];
                inst.removed = false;
                if let Some(service) = &mut inst.service {
                    service.rejoined(turn_taken);
                }
                continue;
            }
            let vacant = self.instances.iter().position(Instance::is_vacant);
            match vacant {
                Some(i) => {
                    // Its service's generations go on counting, so a late
                    // report about the old one is told apart.
                    let spawned = self.instances[i].generations_spawned;
                    self.instances[i] = Instance::new(name, now);
                    self.instances[i].generations_spawned = spawned;
                }
                None => self.instances.push(Instance::new(name, now)),
            }
        }
    }

    /// The connections holding a permit of `instance`, in slab order.
    #[cfg(test)]
    pub(super) fn conns_on(&self, instance: InstanceId) -> Vec<ConnRef> {
        self.conns_where(|c| {
            c.instance == instance
                && matches!(
                    c.state,
                    ConnState::Activating(_) | ConnState::Proxying { .. }
                )
        })
    }

    /// `instance`'s name while the core lists it (it is not vacant), for
    /// the shell's per-action look-ups without building [`Stats`].
    pub fn instance_name(&self, instance: InstanceId) -> Option<&str> {
        let inst = self.instances.get(instance.index())?;
        (!inst.is_vacant()).then_some(inst.upstream.as_str())
    }

    /// `instance`'s service numbers while it is listed and no reload
    /// removed it ([`InstanceStats::service`] of that one instance).
    pub fn instance_service(&self, instance: InstanceId) -> Option<ServiceStats> {
        let inst = self.instances.get(instance.index())?;
        (!inst.removed).then(|| inst.service_stats())
    }

    /// Every instance not vacant, into `out`, reusing its memory.
    pub(super) fn write_instance_stats(&self, out: &mut Vec<InstanceStats>) {
        let listed = self
            .instances
            .iter()
            .enumerate()
            .filter(|(_, inst)| !inst.is_vacant());
        let mut count = 0;
        for (i, inst) in listed {
            if out.len() == count {
                out.push(InstanceStats::default());
            }
            let stats = &mut out[count];
            stats.id = InstanceId::at(i).0;
            stats.upstream.clone_from(&inst.upstream);
            stats.active = inst.active;
            stats.activations = inst.activations;
            stats.cooling_down = inst.cooldown.is_some();
            stats.removed = inst.removed;
            stats.service = inst.service_stats();
            count += 1;
        }
        out.truncate(count);
    }
}

/// The instance names a setting list gives: at least one.
fn instance_names(settings: &Settings) -> Vec<String> {
    if settings.upstreams.is_empty() {
        vec![String::new()]
    } else {
        settings.upstreams.clone()
    }
}

#[cfg(test)]
mod tests;
