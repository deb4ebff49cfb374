//! What an operator asks of the core through the control socket: pause and
//! resume activations, end one connection, and read-only snapshots (status,
//! connections, a waiting client's place in line).
//!
//! The snapshots take `now` but change nothing: a deadline that passed is
//! fired by the next input, as always. Each costs one pass over the slab or
//! the queue, paid only when asked.

use std::net::SocketAddr;

use super::*;

/// A moving average weighs the newest proxying duration by one in this many.
const AVG_WEIGHT: u64 = 4;

/// Which connection a `position` or `kill` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Its id, as logs show it.
    Conn(ConnId),
    /// Its client's address (the PROXY header's, with `--accept-proxy`).
    Client(SocketAddr),
}

/// A waiting client's place in line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// The connection.
    pub conn: ConnId,
    /// 1 for the head of the line.
    pub position: usize,
    /// Clients ahead of it: `position - 1`.
    pub ahead: usize,
    /// Since accept.
    pub waited_ms: u64,
    /// Its expected wait from now: with `free` permits free and `permits` in
    /// all, it waits for `ceil((position - free) / permits)` rounds of the
    /// average proxying duration. `None` while paused, or before any
    /// connection finished proxying.
    pub eta_ms: Option<u64>,
    /// Permits nobody holds.
    pub free_permits: u32,
}

/// Why `position` has no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PositionError {
    /// No connection is known by that id or client address.
    Unknown,
    /// The connection exists but is not waiting in line (it holds a permit,
    /// or is still reading its PROXY header).
    NotWaiting(StateName),
}

/// One connection, for `conns`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// The connection (the shell adds its byte counts by slot).
    pub conn: ConnRef,
    /// Its state.
    pub state: StateName,
    /// The instance whose permit it holds; `None` while it waits.
    pub instance: Option<InstanceId>,
    /// Its client.
    pub client: SocketAddr,
    /// Since accept.
    pub age_ms: u64,
    /// From accept until proxying, or until now if it is not proxying yet.
    pub waited_ms: u64,
}

/// The core's part of a `status` reply, taken at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreStatus {
    /// An operator paused activations.
    pub paused: bool,
    /// A shutdown began.
    pub stopping: bool,
    /// Clients in line.
    pub queued: usize,
    /// Connections holding a permit.
    pub active: usize,
    /// Permits in all: each live instance's.
    pub permits: u32,
    /// How long the head of the line has waited; 0 with nobody in line.
    pub oldest_wait_ms: u64,
    /// Connections accepted so far.
    pub accepted: u64,
    /// Connections let through so far.
    pub activations: u64,
    /// TTL expiries so far.
    pub timeouts: u64,
    /// Connections ended, per outcome.
    pub outcomes: OutcomeCounts,
}

impl Core {
    /// Stop letting clients through: accepting, queueing and every timeout
    /// go on. Returns whether it was running (a second pause changes nothing).
    pub fn handle_pause(&mut self, now: u64) -> bool {
        self.advance(now);
        let was_running = !std::mem::replace(&mut self.paused, true);
        if was_running {
            self.log(Event::Paused {
                queued: self.queue.len(),
            });
        }
        self.check();
        was_running
    }

    /// Let clients through again. Returns whether it was paused.
    pub fn handle_resume(&mut self, now: u64) -> bool {
        self.advance(now);
        let was_paused = std::mem::replace(&mut self.paused, false);
        if was_paused {
            self.log(Event::Resumed {
                queued: self.queue.len(),
            });
            self.pump(now);
        }
        self.check();
        was_paused
    }

    /// End one connection, waiting or active, as `killed` by tcplock; its
    /// permit, if any, goes to the next in line. Returns whether it existed.
    pub fn handle_kill(&mut self, now: u64, id: ConnId) -> bool {
        self.advance(now);
        let found = self
            .conns
            .iter()
            .find(|(_, c)| c.id == id)
            .map(|(slot, c)| (ConnRef { slot, id }, c.state.name()));
        if let Some((conn, state)) = found {
            self.log(Event::Killed { conn: id, state });
            self.end(now, conn, Outcome::Killed, EndedBy::Tcplock);
            self.pump(now);
        }
        self.check();
        found.is_some()
    }

    /// Whether an operator paused activations.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// A waiting client's place in line: one pass over the queue.
    pub fn position(&self, now: u64, target: Target) -> Result<Position, PositionError> {
        let conns = &self.conns;
        let matches = |c: &Conn| match target {
            Target::Conn(id) => c.id == id,
            Target::Client(addr) => c.client == addr,
        };
        let live = self
            .queue
            .iter()
            .filter(|entry| is_queued(conns, *entry))
            .enumerate()
            .find(|(_, entry)| matches(&conns[entry.slot]));
        let Some((ahead, entry)) = live else {
            return Err(match conns.iter().find(|(_, c)| matches(c)) {
                Some((_, c)) => PositionError::NotWaiting(c.state.name()),
                None => PositionError::Unknown,
            });
        };
        // A pool's permits: every live instance's; free are those of
        // instances that could take a client but for their holders.
        let permits = u32::try_from(self.capacity()).unwrap_or(u32::MAX);
        let free: usize = self
            .instances
            .iter()
            .filter(|inst| !inst.removed && inst.cooldown.is_none())
            .map(|inst| (self.settings.permits as usize).saturating_sub(inst.active))
            .sum();
        let free_permits = u32::try_from(free).unwrap_or(u32::MAX);
        let position = ahead + 1;
        let eta_ms = self.proxy_ms_avg.filter(|_| !self.paused).map(|avg| {
            let behind_free = position.saturating_sub(free_permits as usize) as u64;
            behind_free
                .div_ceil(u64::from(permits.max(1)))
                .saturating_mul(avg)
        });
        Ok(Position {
            conn: entry.id,
            position,
            ahead,
            waited_ms: now.saturating_sub(conns[entry.slot].accepted_at),
            eta_ms,
            free_permits,
        })
    }

    /// Every connection, in accept order.
    #[cfg(test)]
    pub fn conns_info(&self, now: u64) -> Vec<ConnInfo> {
        let mut all: Vec<ConnInfo> = self
            .conns
            .iter()
            .map(|(slot, c)| conn_info(now, slot, c))
            .collect();
        all.sort_unstable_by_key(|info| info.conn.id);
        all
    }

    /// The first connection in slab order at slot `from` or after, for a
    /// listing written a part at a time: the next call starts at its slot
    /// plus one. Connections that come and go meanwhile may or may not be
    /// listed; each one present throughout is listed once.
    pub fn conn_info_from(&self, now: u64, from: usize) -> Option<ConnInfo> {
        (from..self.conns.capacity())
            .find_map(|slot| self.conns.get(slot).map(|c| conn_info(now, slot, c)))
    }

    /// A shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        self.shutdown.is_some()
    }

    /// The numbers of a `status` line.
    pub fn status(&self, now: u64) -> CoreStatus {
        let oldest_wait_ms = self.queue.front().map_or(0, |head| {
            now.saturating_sub(self.conns[head.slot].accepted_at)
        });
        CoreStatus {
            paused: self.paused,
            stopping: self.shutdown.is_some(),
            queued: self.queue.len(),
            active: self.active,
            permits: u32::try_from(self.capacity()).unwrap_or(u32::MAX),
            oldest_wait_ms,
            accepted: self.next_conn_id - 1,
            activations: self.counters.activations,
            timeouts: self.counters.timeouts,
            outcomes: self.counters.outcomes,
        }
    }

    /// A proxying connection ended after `ms`: fold it into the average.
    pub(super) fn note_proxy_duration(&mut self, ms: u64) {
        self.proxy_ms_avg = Some(match self.proxy_ms_avg {
            None => ms,
            Some(avg) => {
                let weighted = avg.saturating_mul(AVG_WEIGHT - 1).saturating_add(ms);
                weighted / AVG_WEIGHT
            }
        });
    }
}

fn conn_info(now: u64, slot: usize, c: &Conn) -> ConnInfo {
    let until = match c.state {
        ConnState::Proxying { since, .. } => since,
        _ => now,
    };
    let holds_permit = matches!(
        c.state,
        ConnState::Activating(_) | ConnState::Proxying { .. }
    );
    ConnInfo {
        conn: ConnRef { slot, id: c.id },
        state: c.state.name(),
        instance: holds_permit.then_some(c.instance),
        client: c.client,
        age_ms: now.saturating_sub(c.accepted_at),
        waited_ms: until.saturating_sub(c.accepted_at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::test_support::addr;

    fn core(permits: u32) -> Core {
        Core::new(
            Settings {
                permits,
                upstreams: vec!["127.0.0.1:8100".to_string()],
                ..Settings::default()
            },
            0,
        )
    }

    fn actions(core: &mut Core) -> Vec<Action> {
        std::iter::from_fn(|| core.poll_action())
            .filter(|a| !matches!(a, Action::Log(_)))
            .collect()
    }

    fn proxying(core: &mut Core, now: u64, port: u16) -> ConnRef {
        let conn = core.handle_accepted(now, addr(port));
        assert_eq!(
            actions(core),
            vec![Action::Connect {
                conn,
                instance: InstanceId(1)
            }]
        );
        core.handle_upstream_connected(now, conn);
        assert_eq!(actions(core), vec![Action::StartRelay(conn)]);
        conn
    }

    fn finished(core: &mut Core, now: u64, conn: ConnRef) {
        let end = RelayEnd {
            cause: RelayCause::Finished,
            ended_by: EndedBy::Client,
        };
        core.handle_relay_ended(now, conn, end);
        let _ = actions(core);
    }

    #[test]
    fn a_paused_core_queues_but_activates_nobody_until_resumed() {
        let mut core = core(1);
        assert!(core.handle_pause(0));
        assert!(!core.handle_pause(0), "a second pause changes nothing");
        let conn = core.handle_accepted(1, addr(1));
        assert_eq!(actions(&mut core), vec![]);
        assert_eq!(core.status(5).queued, 1);
        assert!(core.status(5).paused);
        assert!(core.handle_resume(10));
        assert_eq!(
            actions(&mut core),
            vec![Action::Connect {
                conn,
                instance: InstanceId(1)
            }]
        );
        assert!(!core.handle_resume(11));
    }

    #[test]
    fn a_paused_core_still_times_out_queued_clients() {
        let mut core = Core::new(
            Settings {
                queue_timeout_ms: Some(100),
                ..Settings::default()
            },
            0,
        );
        core.handle_pause(0);
        let conn = core.handle_accepted(0, addr(1));
        core.handle_tick(100);
        let closed = actions(&mut core);
        assert!(matches!(
            closed[..],
            [Action::Close { conn: c, outcome: Outcome::QueueTimeout, .. }] if c == conn
        ));
    }

    #[test]
    fn kill_ends_a_waiting_or_active_connection_and_passes_the_permit_on() {
        let mut core = core(1);
        let active = proxying(&mut core, 0, 1);
        let waiting = core.handle_accepted(1, addr(2));
        let last = core.handle_accepted(2, addr(3));
        assert!(core.handle_kill(5, waiting.id()));
        assert_eq!(
            actions(&mut core),
            vec![Action::Close {
                conn: waiting,
                outcome: Outcome::Killed,
                ended_by: EndedBy::Tcplock,
                age_ms: 4,
            }]
        );
        assert!(core.handle_kill(6, active.id()));
        assert_eq!(
            actions(&mut core),
            vec![
                Action::Close {
                    conn: active,
                    outcome: Outcome::Killed,
                    ended_by: EndedBy::Tcplock,
                    age_ms: 6,
                },
                Action::Connect {
                    conn: last,
                    instance: InstanceId(1)
                },
            ]
        );
        assert!(!core.handle_kill(7, active.id()), "already gone");
        assert!(!core.handle_kill(7, ConnId(99)));
        assert_eq!(core.stats().count(Outcome::Killed), 2);
    }

    #[test]
    fn position_counts_waiting_clients_in_line_order() {
        let mut core = core(2);
        let _a = proxying(&mut core, 0, 1);
        let _b = proxying(&mut core, 0, 2);
        let c = core.handle_accepted(10, addr(3));
        let d = core.handle_accepted(20, addr(4));
        let e = core.handle_accepted(30, addr(5));
        core.handle_client_left(31, d);
        assert_eq!(
            core.position(50, Target::Conn(c.id())),
            Ok(Position {
                conn: c.id(),
                position: 1,
                ahead: 0,
                waited_ms: 40,
                eta_ms: None,
                free_permits: 0,
            })
        );
        let by_addr = core.position(50, Target::Client(addr(5))).unwrap();
        assert_eq!(
            (by_addr.conn, by_addr.position, by_addr.ahead),
            (e.id(), 2, 1)
        );
        assert_eq!(
            core.position(50, Target::Client(addr(1))),
            Err(PositionError::NotWaiting(StateName::Proxying))
        );
        assert_eq!(
            core.position(50, Target::Conn(d.id())),
            Err(PositionError::Unknown)
        );
    }

    #[test]
    fn eta_is_rounds_of_the_average_proxying_duration() {
        let mut core = core(2);
        // Durations 1000 then 2000: the average moves a quarter of the way.
        let a = proxying(&mut core, 0, 1);
        finished(&mut core, 1000, a);
        let b = proxying(&mut core, 1000, 2);
        finished(&mut core, 3000, b);
        let _ = actions(&mut core);
        let avg = 1250;
        let _x = proxying(&mut core, 3000, 3);
        let _y = proxying(&mut core, 3000, 4);
        let queued: Vec<ConnRef> = (5..10)
            .map(|p| core.handle_accepted(3000, addr(p)))
            .collect();
        let eta = |core: &Core, i: usize| {
            core.position(3000, Target::Conn(queued[i].id()))
                .unwrap()
                .eta_ms
        };
        // Two permits: positions 1-2 wait one round, 3-4 two, 5 three.
        assert_eq!(eta(&core, 0), Some(avg));
        assert_eq!(eta(&core, 1), Some(avg));
        assert_eq!(eta(&core, 2), Some(2 * avg));
        assert_eq!(eta(&core, 4), Some(3 * avg));
        core.handle_pause(3000);
        assert_eq!(eta(&core, 0), None, "no ETA while paused");
    }

    #[test]
    fn conns_and_status_describe_the_connections() {
        let mut core = core(1);
        let a = core.handle_accepted(0, addr(1));
        let _ = actions(&mut core);
        core.handle_upstream_connected(40, a);
        let b = core.handle_accepted(50, addr(2));
        let _ = actions(&mut core);
        let info = core.conns_info(100);
        assert_eq!(
            info,
            vec![
                ConnInfo {
                    conn: a,
                    state: StateName::Proxying,
                    instance: Some(InstanceId(1)),
                    client: addr(1),
                    age_ms: 100,
                    waited_ms: 40,
                },
                ConnInfo {
                    conn: b,
                    state: StateName::Queued,
                    instance: None,
                    client: addr(2),
                    age_ms: 50,
                    waited_ms: 50,
                },
            ]
        );
        let status = core.status(100);
        assert_eq!(
            (
                status.queued,
                status.active,
                status.permits,
                status.oldest_wait_ms
            ),
            (1, 1, 1, 50)
        );
        assert_eq!((status.accepted, status.activations), (2, 1));
        assert!(!status.paused && !status.stopping);
    }

    #[test]
    fn a_queued_client_costs_no_more_for_the_proxying_start_time() {
        // `since` fits in the room the Connecting variant takes anyway:
        // Proxying { ttl, since } is as large as Connecting { deadline,
        // attempt }, so the state (and every queued client's slab entry)
        // did not grow.
        assert_eq!(
            std::mem::size_of::<ConnState>(),
            std::mem::size_of::<Activation>()
        );
    }
}
