//! Deterministic tests of the core's rules, with a fake clock.

use super::test_support::{addr, drain};
use super::*;

fn settings() -> Settings {
    Settings {
        upstreams: vec!["127.0.0.1:8100".to_string()],
        ..Settings::default()
    }
}

fn with_hook(hook: u32) -> Settings {
    Settings {
        on_activate: Some(HookRef(hook)),
        ..settings()
    }
}

/// Drains the actions, dropping log lines.
fn actions(core: &mut Core) -> Vec<Action> {
    drain(core).0
}

/// Drains the log lines, dropping the other actions.
fn events(core: &mut Core) -> Vec<Event> {
    drain(core).1
}

fn relay_end(cause: RelayCause, ended_by: EndedBy) -> RelayEnd {
    RelayEnd { cause, ended_by }
}

fn closed(outcome: Outcome) -> impl Fn(&Action) -> bool {
    move |a| matches!(a, Action::Close { outcome: o, .. } if *o == outcome)
}

fn spawned(actions: &[Action]) -> Option<HookRequest> {
    actions.iter().find_map(|a| match a {
        Action::SpawnHook(request) => Some(request.clone()),
        _ => None,
    })
}

/// Accepts and proxies one connection.
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

#[test]
fn one_permit_lets_connections_through_one_at_a_time_in_accept_order() {
    let mut core = Core::new(settings(), 0);
    let first = proxying(&mut core, 0, 1);
    let second = core.handle_accepted(1, addr(2));
    let third = core.handle_accepted(2, addr(3));
    assert_eq!(
        actions(&mut core),
        vec![],
        "nothing activates while the permit is held"
    );
    assert_eq!(core.queue_len(), 2);

    core.handle_relay_ended(10, first, relay_end(RelayCause::Finished, EndedBy::Client));
    let after = actions(&mut core);
    assert!(closed(Outcome::Ok)(&after[0]));
    assert_eq!(
        after[1],
        Action::Connect {
            conn: second,
            instance: InstanceId(1)
        },
        "the next in line goes in the same call"
    );
    core.handle_upstream_connected(11, second);
    core.handle_relay_ended(
        12,
        second,
        relay_end(RelayCause::ClientError, EndedBy::Client),
    );
    let after = actions(&mut core);
    assert!(after.iter().any(closed(Outcome::ClientError)));
    assert!(after.contains(&Action::Connect {
        conn: third,
        instance: InstanceId(1)
    }));
    assert_eq!(core.stats().count(Outcome::Ok), 1);
}

#[test]
fn permits_bound_the_active_connections() {
    let mut core = Core::new(
        Settings {
            permits: 3,
            ..settings()
        },
        0,
    );
    let conns: Vec<ConnRef> = (0..6).map(|i| core.handle_accepted(0, addr(i))).collect();
    let connects = actions(&mut core);
    assert_eq!(
        connects,
        conns[..3]
            .iter()
            .map(|c| Action::Connect {
                conn: *c,
                instance: InstanceId(1)
            })
            .collect::<Vec<_>>()
    );
    assert_eq!(core.active(), 3);
    core.handle_upstream_failed(1, conns[1], "refused");
    let after = actions(&mut core);
    assert!(after.iter().any(closed(Outcome::ConnectFailed)));
    assert!(
        after.contains(&Action::Connect {
            conn: conns[3],
            instance: InstanceId(1)
        }),
        "the permit goes to the next"
    );
}

#[test]
fn a_full_queue_rejects_the_newcomer_only() {
    let mut core = Core::new(
        Settings {
            max_queue: 2,
            ..settings()
        },
        0,
    );
    proxying(&mut core, 0, 1);
    let waiting: Vec<ConnRef> = (2..4).map(|p| core.handle_accepted(0, addr(p))).collect();
    let newcomer = core.handle_accepted(0, addr(4));
    let after = actions(&mut core);
    assert_eq!(
        after,
        vec![Action::Close {
            conn: newcomer,
            outcome: Outcome::Rejected,
            ended_by: EndedBy::Tcplock,
            age_ms: 0
        }]
    );
    assert_eq!(core.queue_len(), 2);
    assert!(
        waiting
            .iter()
            .all(|c| core.state_of(*c) == Some(StateName::Queued))
    );
}

#[test]
fn max_queue_zero_still_lets_a_free_permit_through() {
    let mut core = Core::new(
        Settings {
            max_queue: 0,
            ..settings()
        },
        0,
    );
    let first = core.handle_accepted(0, addr(1));
    assert_eq!(
        actions(&mut core),
        vec![Action::Connect {
            conn: first,
            instance: InstanceId(1)
        }]
    );
    core.handle_accepted(0, addr(2));
    assert!(actions(&mut core).iter().any(closed(Outcome::Rejected)));
}

#[test]
fn queue_timeout_closes_a_waiting_client_and_ttl_cuts_a_proxying_one() {
    let mut core = Core::new(
        Settings {
            ttl_ms: Some(1_000),
            queue_timeout_ms: Some(500),
            ..settings()
        },
        0,
    );
    let first = proxying(&mut core, 0, 1);
    let waiter = core.handle_accepted(100, addr(2));
    assert_eq!(core.poll_timeout(), Some(600));
    core.handle_tick(599);
    assert_eq!(actions(&mut core), vec![]);
    core.handle_tick(600);
    assert_eq!(
        actions(&mut core),
        vec![Action::Close {
            conn: waiter,
            outcome: Outcome::QueueTimeout,
            ended_by: EndedBy::Tcplock,
            age_ms: 500
        }]
    );
    let next = core.handle_accepted(700, addr(3));
    core.handle_tick(1_000);
    let after = actions(&mut core);
    assert!(
        matches!(after[0], Action::Close { conn, outcome: Outcome::Timeout, .. } if conn == first)
    );
    assert_eq!(
        after[1],
        Action::Connect {
            conn: next,
            instance: InstanceId(1)
        }
    );
    assert_eq!(core.stats().timeouts, 1);
}

#[test]
fn a_stale_handle_for_a_reused_slot_is_ignored() {
    let mut core = Core::new(settings(), 0);
    let old = proxying(&mut core, 0, 1);
    core.handle_relay_ended(1, old, relay_end(RelayCause::Finished, EndedBy::Client));
    actions(&mut core);
    let new = core.handle_accepted(2, addr(2));
    assert_eq!(new.slot(), old.slot(), "the slab reuses the slot");
    actions(&mut core);
    core.handle_upstream_connected(3, old);
    core.handle_relay_ended(3, old, relay_end(RelayCause::ClientError, EndedBy::Client));
    core.handle_client_left(3, old);
    assert_eq!(actions(&mut core), vec![]);
    assert_eq!(core.state_of(new), Some(StateName::Activating));
}

#[test]
fn connect_timeout_fails_the_connection() {
    let mut core = Core::new(
        Settings {
            connect_timeout_ms: Some(200),
            ..settings()
        },
        0,
    );
    let conn = core.handle_accepted(0, addr(1));
    actions(&mut core);
    core.handle_tick(200);
    let after = events(&mut core);
    assert!(after.contains(&Event::ConnectFailed {
        instance: InstanceId(1),
        conn: conn.id(),
        error: "connect timeout".to_string()
    }));
    assert_eq!(core.conn_count(), 0);
}

#[test]
fn the_hook_runs_before_the_upstream_sees_the_connection() {
    let mut core = Core::new(with_hook(1), 0);
    let conn = core.handle_accepted(0, addr(1));
    let first = actions(&mut core);
    let request = spawned(&first).expect("a hook starts");
    assert_eq!(first.len(), 1, "no connect before the hook succeeds");
    assert_eq!(request.run, HookRef(1));
    assert_eq!(request.context.kind, HookKind::Activate);
    assert_eq!(request.context.activations, 0);
    assert_eq!(request.context.attempt, 1);
    assert_eq!(request.context.last_outcome, None);
    core.handle_hook_exited(50, request.hook, HookExit::Success);
    assert_eq!(
        actions(&mut core),
        vec![Action::Connect {
            conn,
            instance: InstanceId(1)
        }]
    );
}

#[test]
fn a_failed_hook_retries_with_doubling_backoff_and_keeps_the_place() {
    let mut core = Core::new(with_hook(1), 0);
    let head = core.handle_accepted(0, addr(1));
    let behind = core.handle_accepted(0, addr(2));
    let mut now = 0;
    let mut request = spawned(&actions(&mut core)).expect("hook");
    for (attempt, backoff) in [(1, 500), (2, 1_000), (3, 2_000)] {
        assert_eq!(request.context.conn, head.id());
        assert_eq!(request.context.attempt, attempt);
        core.handle_hook_exited(now, request.hook, HookExit::Failed(1));
        assert!(events(&mut core).iter().any(|e| matches!(
            e,
            Event::HookFailed { retry_in_ms: Some(b), .. } if *b == backoff
        )));
        assert_eq!(core.state_of(head), Some(StateName::Queued));
        assert_eq!(core.active(), 0, "a backing-off client holds no permit");
        core.handle_tick(now + backoff - 1);
        assert_eq!(
            actions(&mut core),
            vec![],
            "nothing runs before the backoff ends"
        );
        now += backoff;
        core.handle_tick(now);
        request = spawned(&actions(&mut core)).expect("retried");
    }
    core.handle_hook_exited(now, request.hook, HookExit::Success);
    assert_eq!(
        actions(&mut core),
        vec![Action::Connect {
            conn: head,
            instance: InstanceId(1)
        }]
    );
    assert_eq!(core.state_of(behind), Some(StateName::Queued));
}

#[test]
fn a_preparation_whose_client_left_serves_the_next_client() {
    let mut core = Core::new(with_hook(1), 0);
    let leaver = core.handle_accepted(0, addr(1));
    let next = core.handle_accepted(0, addr(2));
    let request = spawned(&actions(&mut core)).expect("hook");
    core.handle_client_left(10, leaver);
    assert!(actions(&mut core).iter().any(closed(Outcome::Abandoned)));
    core.handle_hook_exited(20, request.hook, HookExit::Success);
    assert_eq!(
        actions(&mut core),
        vec![Action::Connect {
            conn: next,
            instance: InstanceId(1)
        }],
        "no second hook run for the next client"
    );
}

#[test]
fn hooks_never_overlap_even_with_free_permits() {
    let mut core = Core::new(
        Settings {
            permits: 3,
            ..with_hook(1)
        },
        0,
    );
    let conns: Vec<ConnRef> = (0..3).map(|i| core.handle_accepted(0, addr(i))).collect();
    let mut hooks = 0;
    let mut now = 0;
    for conn in &conns {
        let batch = actions(&mut core);
        let request = spawned(&batch).expect("the next hook starts only now");
        assert_eq!(
            batch
                .iter()
                .filter(|a| matches!(a, Action::SpawnHook(_)))
                .count(),
            1
        );
        assert_eq!(request.context.conn, conn.id());
        hooks += 1;
        now += 10;
        core.handle_hook_exited(now, request.hook, HookExit::Success);
    }
    assert_eq!(hooks, 3);
    assert_eq!(
        actions(&mut core),
        vec![Action::Connect {
            conn: conns[2],
            instance: InstanceId(1)
        }]
    );
}

#[test]
fn the_timeout_hook_runs_before_the_next_activation_hook() {
    let mut core = Core::new(
        Settings {
            ttl_ms: Some(100),
            on_timeout: Some(HookRef(2)),
            ..with_hook(1)
        },
        0,
    );
    let first = core.handle_accepted(0, addr(1));
    let request = spawned(&actions(&mut core)).expect("hook");
    core.handle_hook_exited(1, request.hook, HookExit::Success);
    core.handle_upstream_connected(2, first);
    actions(&mut core);
    core.handle_accepted(3, addr(2));
    assert_eq!(actions(&mut core), vec![]);
    core.handle_tick(102);
    let after = actions(&mut core);
    let request = spawned(&after).expect("the timeout hook");
    assert_eq!(request.run, HookRef(2));
    assert_eq!(request.context.kind, HookKind::Timeout);
    assert_eq!(request.context.timeouts, 1);
    assert_eq!(request.context.last_outcome, Some(Outcome::Timeout));
    core.handle_hook_exited(150, request.hook, HookExit::Success);
    let request = spawned(&actions(&mut core)).expect("then the activation hook");
    assert_eq!(request.run, HookRef(1));
    assert_eq!(request.context.activations, 1);
}

#[test]
fn a_hook_timeout_kills_the_hook_and_counts_as_a_failure() {
    let mut core = Core::new(
        Settings {
            hook_timeout_ms: Some(1_000),
            ..with_hook(4)
        },
        0,
    );
    core.handle_accepted(0, addr(1));
    let request = spawned(&actions(&mut core)).expect("hook");
    core.handle_tick(1_000);
    assert_eq!(actions(&mut core), vec![Action::KillHook(request.hook)]);
    core.handle_hook_exited(1_001, request.hook, HookExit::Signaled(9));
    assert!(events(&mut core).iter().any(|e| matches!(
        e,
        Event::HookFailed {
            timed_out: true,
            ..
        }
    )));
}

#[test]
fn shutdown_closes_the_waiting_lets_proxying_finish_and_then_drains() {
    let mut core = Core::new(
        Settings {
            shutdown_grace_ms: 5_000,
            ..settings()
        },
        0,
    );
    let active = proxying(&mut core, 0, 1);
    core.handle_accepted(1, addr(2));
    core.handle_accepted(1, addr(3));
    core.handle_shutdown(10);
    let after = actions(&mut core);
    assert_eq!(after[0], Action::StopAccepting);
    assert_eq!(
        after
            .iter()
            .filter(|a| closed(Outcome::Shutdown)(a))
            .count(),
        2
    );
    assert!(!core.is_finished());
    core.handle_relay_ended(20, active, relay_end(RelayCause::Finished, EndedBy::Client));
    assert!(actions(&mut core).iter().any(closed(Outcome::Ok)));
    assert!(core.is_finished());
}

#[test]
fn the_shutdown_grace_ends_a_connection_that_never_closes() {
    let mut core = Core::new(
        Settings {
            shutdown_grace_ms: 5_000,
            ..settings()
        },
        0,
    );
    proxying(&mut core, 0, 1);
    core.handle_shutdown(10);
    actions(&mut core);
    core.handle_tick(5_009);
    assert!(!core.is_finished());
    core.handle_tick(5_010);
    assert!(actions(&mut core).iter().any(closed(Outcome::Shutdown)));
    assert!(core.is_finished());
}

#[test]
fn shutdown_kills_a_running_hook_and_waits_for_its_exit() {
    let mut core = Core::new(with_hook(1), 0);
    core.handle_accepted(0, addr(1));
    let request = spawned(&actions(&mut core)).expect("hook");
    core.handle_shutdown(1);
    let after = actions(&mut core);
    assert!(after.contains(&Action::KillHook(request.hook)));
    assert!(!core.is_finished(), "the hook is still to be reaped");
    core.handle_hook_exited(2, request.hook, HookExit::Signaled(9));
    assert!(core.is_finished());
    core.handle_accepted(3, addr(2));
    assert!(actions(&mut core).iter().any(closed(Outcome::Shutdown)));
}

#[test]
fn raising_permits_on_reload_lets_a_waiter_through_at_once() {
    let mut core = Core::new(settings(), 0);
    proxying(&mut core, 0, 1);
    let waiter = core.handle_accepted(1, addr(2));
    actions(&mut core);
    core.handle_reload(
        2,
        Settings {
            permits: 2,
            ..settings()
        },
    );
    assert_eq!(
        actions(&mut core),
        vec![Action::Connect {
            conn: waiter,
            instance: InstanceId(1)
        }]
    );
}

#[test]
fn a_queued_client_that_leaves_never_runs_the_hook() {
    let mut core = Core::new(with_hook(1), 0);
    let first = core.handle_accepted(0, addr(1));
    let gone = core.handle_accepted(0, addr(2));
    let request = spawned(&actions(&mut core)).expect("hook");
    core.handle_client_left(1, gone);
    actions(&mut core);
    core.handle_hook_exited(2, request.hook, HookExit::Success);
    assert_eq!(
        actions(&mut core),
        vec![Action::Connect {
            conn: first,
            instance: InstanceId(1)
        }]
    );
    core.handle_upstream_connected(3, first);
    core.handle_relay_ended(4, first, relay_end(RelayCause::Finished, EndedBy::Client));
    assert!(spawned(&actions(&mut core)).is_none());
}

// ----- regressions found by the model test (src/core/model.rs) -----

/// Found by the model test: with max-queue 0 the first client takes the
/// free permit and waits for its hook; the debug invariant check counted it as
/// one client too many in line and panicked on the very first accept.
#[test]
fn max_queue_zero_admits_a_client_into_a_free_permit_through_a_failing_hook() {
    let mut core = Core::new(
        Settings {
            max_queue: 0,
            ..with_hook(1)
        },
        0,
    );
    let first = core.handle_accepted(0, addr(1));
    let request = spawned(&actions(&mut core)).expect("hook");
    core.handle_accepted(1, addr(2));
    assert!(
        actions(&mut core).iter().any(closed(Outcome::Rejected)),
        "no room in line while the first one's hook runs"
    );
    core.handle_hook_exited(2, request.hook, HookExit::Failed(1));
    assert_eq!(
        core.state_of(first),
        Some(StateName::Queued),
        "back in line, above max-queue 0, for its retry"
    );
    core.handle_tick(2 + RETRY_BASE_MS);
    let retry = spawned(&actions(&mut core)).expect("retried");
    core.handle_hook_exited(3 + RETRY_BASE_MS, retry.hook, HookExit::Success);
    assert_eq!(
        actions(&mut core),
        vec![Action::Connect {
            conn: first,
            instance: InstanceId(1)
        }]
    );
}

/// Found by the model test: a TTL expired while an on-activate hook
/// ran, a reload removed the on-timeout hook and a later one added it back; the
/// old expiry then ran the new hook, long after the fact.
#[test]
fn a_reload_without_an_on_timeout_hook_drops_a_pending_timeout_run() {
    let cleanup = Settings {
        permits: 2,
        ttl_ms: Some(100),
        on_timeout: Some(HookRef(2)),
        ..with_hook(1)
    };
    let mut core = Core::new(cleanup.clone(), 0);
    let first = core.handle_accepted(0, addr(1));
    let request = spawned(&actions(&mut core)).expect("hook");
    core.handle_hook_exited(1, request.hook, HookExit::Success);
    core.handle_upstream_connected(2, first);
    let second = core.handle_accepted(3, addr(2));
    let request = spawned(&actions(&mut core)).expect("the second one's hook");
    core.handle_tick(102);
    assert!(
        actions(&mut core).iter().any(closed(Outcome::Timeout)),
        "the TTL expires while the second hook runs"
    );
    core.handle_reload(
        103,
        Settings {
            on_timeout: None,
            ..cleanup.clone()
        },
    );
    core.handle_reload(104, cleanup);
    core.handle_hook_exited(105, request.hook, HookExit::Success);
    assert_eq!(
        actions(&mut core),
        vec![Action::Connect {
            conn: second,
            instance: InstanceId(1)
        }],
        "no on-timeout run for an expiry seen while none was configured"
    );
}

#[test]
fn outcome_counts_keep_each_outcome_apart() {
    let mut counts = OutcomeCounts::default();
    for (n, outcome) in Outcome::ALL.into_iter().enumerate() {
        for _ in 0..=n {
            counts.add(outcome);
        }
    }
    for (n, outcome) in Outcome::ALL.into_iter().enumerate() {
        assert_eq!(counts.count(outcome), n as u64 + 1, "{outcome}");
    }
}

#[test]
fn a_relay_that_fails_on_its_own_is_no_peers_fault() {
    let mut core = Core::new(with_hook(1), 0);
    let conn = core.handle_accepted(0, addr(1));
    let hook = spawned(&actions(&mut core)).expect("hook").hook;
    core.handle_hook_exited(1, hook, HookExit::Success);
    assert_eq!(
        actions(&mut core),
        vec![Action::Connect {
            conn,
            instance: InstanceId(1)
        }]
    );
    core.handle_upstream_connected(2, conn);
    actions(&mut core);
    core.handle_relay_ended(3, conn, relay_end(RelayCause::RelayError, EndedBy::Tcplock));
    assert!(actions(&mut core).iter().any(closed(Outcome::RelayError)));
    let stats = core.stats();
    assert_eq!(stats.count(Outcome::RelayError), 1);
    assert_eq!(stats.count(Outcome::ClientError), 0);
    assert_eq!(stats.count(Outcome::UpstreamError), 0);

    core.handle_accepted(4, addr(2));
    let next = spawned(&actions(&mut core)).expect("the next client's hook");
    assert_eq!(next.context.last_outcome, Some(Outcome::RelayError));
}

fn ended_by(actions: &[Action]) -> Vec<(Outcome, EndedBy)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Close {
                outcome, ended_by, ..
            } => Some((*outcome, *ended_by)),
            _ => None,
        })
        .collect()
}

#[test]
fn every_close_says_who_ended_it_and_the_next_hook_is_told() {
    let mut core = Core::new(
        Settings {
            ttl_ms: Some(100),
            ..with_hook(1)
        },
        0,
    );
    let first = core.handle_accepted(0, addr(1));
    let hook = spawned(&actions(&mut core)).expect("hook");
    assert_eq!(hook.context.last_ended_by, None);
    // A client that leaves while waiting ended it itself.
    let waiter = core.handle_accepted(1, addr(2));
    core.handle_client_left(2, waiter);
    assert_eq!(
        ended_by(&actions(&mut core)),
        [(Outcome::Abandoned, EndedBy::Client)]
    );
    core.handle_hook_exited(3, hook.hook, HookExit::Success);
    actions(&mut core);
    core.handle_upstream_connected(4, first);
    actions(&mut core);
    // The relay's word on who closed first is passed on as is.
    core.handle_relay_ended(5, first, relay_end(RelayCause::Finished, EndedBy::Upstream));
    assert_eq!(
        ended_by(&actions(&mut core)),
        [(Outcome::Ok, EndedBy::Upstream)]
    );

    let second = core.handle_accepted(6, addr(3));
    let hook = spawned(&actions(&mut core)).expect("hook");
    assert_eq!(hook.context.last_outcome, Some(Outcome::Ok));
    assert_eq!(hook.context.last_ended_by, Some(EndedBy::Upstream));
    core.handle_hook_exited(7, hook.hook, HookExit::Success);
    actions(&mut core);
    core.handle_upstream_connected(8, second);
    actions(&mut core);
    // A TTL expiry is tcplock's doing.
    core.handle_tick(108);
    assert_eq!(
        ended_by(&actions(&mut core)),
        [(Outcome::Timeout, EndedBy::Tcplock)]
    );
    core.handle_accepted(110, addr(4));
    let hook = spawned(&actions(&mut core)).expect("hook");
    assert_eq!(hook.context.last_ended_by, Some(EndedBy::Tcplock));
}

// ----- paused accepting -----

fn resumes(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| **a == Action::ResumeAccepting)
        .count()
}

#[test]
fn a_paused_accept_is_retried_after_a_backoff_doubling_to_one_second() {
    let mut core = Core::new(settings(), 0);
    let mut now = 0;
    let mut waits = Vec::new();
    for _ in 0..7 {
        core.handle_accept_paused(now);
        assert!(core.accept_paused());
        let due = core.poll_timeout().expect("a retry deadline");
        core.handle_tick(due - 1);
        assert_eq!(resumes(&actions(&mut core)), 0, "resumed early");
        core.handle_tick(due);
        assert_eq!(resumes(&actions(&mut core)), 1, "not resumed at {due}");
        assert!(!core.accept_paused());
        waits.push(due - now);
        now = due;
    }
    assert_eq!(waits, [50, 100, 200, 400, 800, 1000, 1000]);

    // An accept in between starts the backoff over.
    core.handle_accepted(now, addr(1));
    actions(&mut core);
    core.handle_accept_paused(now);
    assert_eq!(core.poll_timeout(), Some(now + 50));
}

#[test]
fn a_close_resumes_a_paused_accept_at_once_and_disarms_its_timer() {
    let mut core = Core::new(settings(), 0);
    let conn = core.handle_accepted(0, addr(1));
    actions(&mut core);
    core.handle_accept_paused(10);
    core.handle_client_left(20, conn);
    let after = actions(&mut core);
    assert!(after.iter().any(closed(Outcome::Abandoned)));
    assert_eq!(resumes(&after), 1);
    assert_eq!(
        core.poll_timeout(),
        None,
        "the retry timer outlived the resume"
    );
    core.handle_tick(10_000);
    assert_eq!(resumes(&actions(&mut core)), 0, "resumed twice");
}

#[test]
fn shutdown_drops_a_paused_accept_for_good() {
    let mut core = Core::new(settings(), 0);
    core.handle_accept_paused(0);
    core.handle_shutdown(1);
    assert_eq!(resumes(&actions(&mut core)), 0);
    assert!(!core.accept_paused());
    core.handle_accept_paused(2);
    assert!(!core.accept_paused(), "paused after shutdown");
}

// ----- connecting to several addresses -----

fn connect_nexts(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| matches!(a, Action::ConnectNext(_)))
        .count()
}

#[test]
fn each_upstream_address_gets_its_share_of_what_is_left_of_the_connect_timeout() {
    let mut core = Core::new(settings(), 0); // connect timeout 10 s
    let conn = core.handle_accepted(0, addr(1));
    assert!(actions(&mut core).contains(&Action::Connect {
        conn,
        instance: InstanceId(1)
    }));

    core.handle_connect_attempt(0, conn, 3);
    assert_eq!(core.poll_timeout(), Some(3_333), "a third of 10 s");
    core.handle_tick(3_332);
    assert_eq!(connect_nexts(&actions(&mut core)), 0, "gave up early");
    core.handle_tick(3_333);
    assert_eq!(actions(&mut core), [Action::ConnectNext(conn)]);

    core.handle_connect_attempt(3_333, conn, 2);
    assert_eq!(core.poll_timeout(), Some(6_666), "half of the 6667 ms left");
    core.handle_tick(6_666);
    assert_eq!(actions(&mut core), [Action::ConnectNext(conn)]);

    // The last address gets all that is left, and then the connect fails.
    core.handle_connect_attempt(6_666, conn, 1);
    assert_eq!(core.poll_timeout(), Some(10_000));
    core.handle_tick(10_000);
    assert!(
        actions(&mut core)
            .iter()
            .any(closed(Outcome::ConnectFailed))
    );
}

#[test]
fn an_attempt_that_connects_or_fails_disarms_its_share() {
    let mut core = Core::new(settings(), 0);
    let first = core.handle_accepted(0, addr(1));
    actions(&mut core);
    core.handle_connect_attempt(0, first, 2);
    core.handle_upstream_connected(100, first);
    assert!(actions(&mut core).contains(&Action::StartRelay(first)));
    assert_eq!(
        core.poll_timeout(),
        None,
        "an attempt deadline outlived the connect"
    );

    let mut core = Core::new(settings(), 0);
    let second = core.handle_accepted(0, addr(2));
    actions(&mut core);
    core.handle_connect_attempt(0, second, 2);
    core.handle_upstream_failed(100, second, "refused");
    assert!(
        actions(&mut core)
            .iter()
            .any(closed(Outcome::ConnectFailed))
    );
    assert_eq!(core.poll_timeout(), None);
}

#[test]
fn without_a_connect_timeout_no_address_is_cut_short() {
    let mut core = Core::new(
        Settings {
            connect_timeout_ms: None,
            ..settings()
        },
        0,
    );
    let conn = core.handle_accepted(0, addr(1));
    actions(&mut core);
    core.handle_connect_attempt(0, conn, 2);
    assert_eq!(core.poll_timeout(), None);
}

#[test]
fn leaving_the_queue_newest_first_costs_constant_work_per_client() {
    const CLIENTS: u64 = 2_000;
    let mut core = Core::new(
        Settings {
            max_queue: CLIENTS as usize,
            ..settings()
        },
        0,
    );
    let holder = proxying(&mut core, 0, 1);
    let waiting: Vec<ConnRef> = (0..CLIENTS)
        .map(|i| core.handle_accepted(1, addr(2 + i as u16)))
        .collect();
    assert_eq!(core.queue_len(), CLIENTS as usize);
    // Every other one leaves newest-first, so the survivors keep the line long
    // and the leavers are never at its head.
    for conn in waiting.iter().rev().step_by(2) {
        core.handle_client_left(2, *conn);
    }
    assert_eq!(core.queue_len(), (CLIENTS / 2) as usize);
    assert!(
        core.queue.entry_count() <= CLIENTS as usize,
        "stale entries are swept: {} entries for {} clients",
        core.queue.entry_count(),
        core.queue_len()
    );
    actions(&mut core);
    // FIFO still holds for the survivors.
    core.handle_relay_ended(3, holder, relay_end(RelayCause::Finished, EndedBy::Client));
    assert!(
        actions(&mut core).contains(&Action::Connect {
            conn: waiting[0],
            instance: InstanceId(1)
        }),
        "the oldest survivor goes first"
    );
    for conn in waiting.iter().rev() {
        core.handle_client_left(4, *conn);
    }
    assert_eq!(core.queue_len(), 0);
    assert_eq!(
        core.queue.entry_count(),
        0,
        "an empty line keeps no stale entries"
    );
    // Pushing, popping, skipping and sweeping each entry a bounded number of
    // times; a scan per leave would visit about CLIENTS² / 4 entries.
    let visited = core.queue_entries_visited();
    assert!(
        visited <= 6 * CLIENTS,
        "the queue visited {visited} entries for {CLIENTS} clients"
    );
}

#[test]
fn a_waiting_clients_end_of_stream_keeps_or_drops_it_as_the_setting_says() {
    let mut core = Core::new(with_hook(1), 0);
    let holder = core.handle_accepted(0, addr(1));
    let kept = core.handle_accepted(1, addr(2));
    let dropped_later = core.handle_accepted(1, addr(3));
    let first_hook = spawned(&actions(&mut core)).expect("the holder's hook");
    core.handle_client_eof(2, kept);
    assert_eq!(actions(&mut core), vec![], "keep: it stays in line");
    assert_eq!(core.queue_len(), 2);

    // A reload that turns dropping on drops the one whose end already came.
    let dropping = Settings {
        drop_queued_eof: true,
        ..with_hook(1)
    };
    core.handle_reload(3, dropping);
    assert!(actions(&mut core).iter().any(closed(Outcome::Abandoned)));
    assert_eq!(core.state_of(kept), None);
    assert_eq!(core.queue_len(), 1);

    // From now on an end of stream drops at once, even while its hook runs.
    core.handle_client_eof(4, holder);
    assert!(actions(&mut core).iter().any(closed(Outcome::Abandoned)));
    // Its hook's success serves the next in line without another run.
    core.handle_hook_exited(5, first_hook.hook, HookExit::Success);
    assert_eq!(
        actions(&mut core),
        vec![Action::Connect {
            conn: dropped_later,
            instance: InstanceId(1)
        }]
    );
    core.handle_client_eof(6, dropped_later);
    assert!(actions(&mut core).iter().any(closed(Outcome::Abandoned)));
    assert_eq!(core.conn_count(), 0);
}

#[test]
fn news_of_a_connect_supersedes_its_share_running_out_at_the_same_moment() {
    let settings = || Settings {
        connect_timeout_ms: Some(10_000),
        ..settings()
    };
    // Connected just as the first of two addresses' share ran out: relaying
    // starts on the socket that connected, never a move to the next address.
    let mut core = Core::new(settings(), 0);
    let conn = core.handle_accepted(0, addr(1));
    actions(&mut core);
    core.handle_connect_attempt(0, conn, 2);
    core.handle_upstream_connected(5_000, conn);
    assert_eq!(actions(&mut core), vec![Action::StartRelay(conn)]);

    // The first of three addresses failed as its share ran out: the second
    // gets its own share, not a move on at once.
    let mut core = Core::new(settings(), 0);
    let conn = core.handle_accepted(0, addr(1));
    actions(&mut core);
    core.handle_connect_attempt(0, conn, 3);
    core.handle_connect_attempt(3_333, conn, 2);
    assert_eq!(actions(&mut core), vec![]);
    assert_eq!(core.poll_timeout(), Some(3_333 + 3_333));

    // Every address failed as the last share ran out: the connect fails, and
    // no move to an address is asked for after it.
    let mut core = Core::new(settings(), 0);
    let conn = core.handle_accepted(0, addr(1));
    actions(&mut core);
    core.handle_connect_attempt(0, conn, 2);
    core.handle_upstream_failed(5_000, conn, "refused");
    let after = actions(&mut core);
    assert!(!after.contains(&Action::ConnectNext(conn)), "{after:?}");
    assert!(after.iter().any(closed(Outcome::ConnectFailed)));
}

fn serving(grace_ms: u64) -> Settings {
    Settings {
        shutdown_grace_ms: grace_ms,
        serve_queue_on_shutdown: true,
        ..with_hook(1)
    }
}

fn shutdown_done(events: &[Event]) -> Option<(u64, u64)> {
    events.iter().find_map(|e| match e {
        Event::ShutdownDone { served, closed } => Some((*served, *closed)),
        _ => None,
    })
}

/// Runs the on-activate hook the core asks for and connects its client.
fn serve_next(core: &mut Core, now: u64, expected: ConnRef) {
    let request = spawned(&actions(core)).expect("an on-activate hook");
    assert_eq!(request.context.conn, expected.id, "served out of order");
    core.handle_hook_exited(now, request.hook, HookExit::Success);
    assert_eq!(
        actions(core),
        vec![Action::Connect {
            conn: expected,
            instance: InstanceId(1)
        }]
    );
    core.handle_upstream_connected(now, expected);
    assert_eq!(actions(core), vec![Action::StartRelay(expected)]);
}

#[test]
fn a_serving_shutdown_activates_the_waiting_in_order_with_their_hooks() {
    let mut core = Core::new(serving(60_000), 0);
    let first = core.handle_accepted(0, addr(1));
    serve_next(&mut core, 0, first);
    let waiting: Vec<ConnRef> = (2..=4).map(|p| core.handle_accepted(1, addr(p))).collect();
    core.handle_shutdown(10);
    let after = actions(&mut core);
    assert_eq!(after, vec![Action::StopAccepting], "nobody is closed");
    // A client the shell accepted in the same turn is turned away.
    let late = core.handle_accepted(11, addr(9));
    assert!(actions(&mut core).iter().any(|a| matches!(
        a,
        Action::Close { conn, outcome: Outcome::Shutdown, .. } if *conn == late
    )));
    let mut previous = first;
    for (i, &conn) in waiting.iter().enumerate() {
        let now = 20 + i as u64;
        core.handle_relay_ended(
            now,
            previous,
            relay_end(RelayCause::Finished, EndedBy::Client),
        );
        serve_next(&mut core, now, conn);
        previous = conn;
    }
    core.handle_relay_ended(
        30,
        previous,
        relay_end(RelayCause::Finished, EndedBy::Client),
    );
    assert_eq!(shutdown_done(&events(&mut core)), Some((3, 1)));
    assert!(core.is_finished());
}

#[test]
fn a_serving_shutdown_closes_the_rest_when_the_grace_runs_out() {
    let mut core = Core::new(serving(5_000), 0);
    let first = core.handle_accepted(0, addr(1));
    serve_next(&mut core, 0, first);
    core.handle_accepted(1, addr(2));
    core.handle_accepted(1, addr(3));
    core.handle_shutdown(10);
    actions(&mut core);
    core.handle_tick(5_009);
    assert!(!core.is_finished());
    core.handle_tick(5_010);
    let all: Vec<Action> = std::iter::from_fn(|| core.poll_action()).collect();
    let closes = all.iter().filter(|a| closed(Outcome::Shutdown)(a)).count();
    assert_eq!(closes, 3, "the holder and both waiting: {all:?}");
    let events: Vec<Event> = all
        .into_iter()
        .filter_map(|a| match a {
            Action::Log(e) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(shutdown_done(&events), Some((0, 2)));
    assert!(core.is_finished());
}

#[test]
fn a_second_stop_ends_a_serving_shutdown_at_once() {
    let mut core = Core::new(serving(60_000), 0);
    let first = core.handle_accepted(0, addr(1));
    serve_next(&mut core, 0, first);
    core.handle_accepted(1, addr(2));
    core.handle_shutdown(10);
    actions(&mut core);
    core.handle_shutdown(11);
    let after = actions(&mut core);
    assert_eq!(
        after
            .iter()
            .filter(|a| closed(Outcome::Shutdown)(a))
            .count(),
        2
    );
    assert!(core.is_finished());
    // The hook the first stop let run is not started again.
    core.handle_tick(20_000);
    assert!(spawned(&actions(&mut core)).is_none());
}

#[test]
fn a_closing_shutdown_reports_the_waiting_it_closed() {
    let mut core = Core::new(settings(), 0);
    let active = proxying(&mut core, 0, 1);
    core.handle_accepted(1, addr(2));
    core.handle_accepted(1, addr(3));
    core.handle_shutdown(10);
    assert_eq!(shutdown_done(&events(&mut core)), None, "one still proxies");
    core.handle_relay_ended(20, active, relay_end(RelayCause::Finished, EndedBy::Client));
    assert_eq!(shutdown_done(&events(&mut core)), Some((0, 2)));
}

fn stalls(events: &[Event]) -> Vec<(u64, usize, u64)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::QueueStalled {
                waited_ms,
                holders,
                idle_ms,
            } => Some((*waited_ms, *holders, *idle_ms)),
            _ => None,
        })
        .collect()
}

/// Ticks to `now` and says whether the core asked how idle the holders are.
fn asks_idle(core: &mut Core, now: u64) -> bool {
    core.handle_tick(now);
    let all: Vec<Action> = std::iter::from_fn(|| core.poll_action()).collect();
    all.contains(&Action::ReportIdle)
}

#[test]
fn a_queue_stuck_behind_an_idle_holder_is_warned_once_per_stall() {
    let mut core = Core::new(
        Settings {
            stall_warn_ms: Some(300),
            ..settings()
        },
        0,
    );
    proxying(&mut core, 0, 1);
    core.handle_accepted(100, addr(2));
    assert!(
        !asks_idle(&mut core, 399),
        "the head has not waited long enough"
    );
    assert!(asks_idle(&mut core, 400));
    core.handle_holders_idle(400, 400);
    assert_eq!(stalls(&events(&mut core)), vec![(300, 1, 400)]);
    // Still stuck: asked again, not warned again.
    assert!(asks_idle(&mut core, 700));
    core.handle_holders_idle(700, 700);
    assert_eq!(stalls(&events(&mut core)), vec![]);
    // The holder moved a byte: the stall cleared; it comes back and is warned.
    assert!(asks_idle(&mut core, 1_000));
    core.handle_holders_idle(1_000, 10);
    assert_eq!(stalls(&events(&mut core)), vec![]);
    assert!(!asks_idle(&mut core, 1_289));
    assert!(asks_idle(&mut core, 1_290));
    core.handle_holders_idle(1_290, 300);
    assert_eq!(stalls(&events(&mut core)), vec![(1_190, 1, 300)]);
}

#[test]
fn a_busy_holder_or_a_free_permit_is_no_stall() {
    let mut core = Core::new(
        Settings {
            stall_warn_ms: Some(300),
            ..settings()
        },
        0,
    );
    let holder = proxying(&mut core, 0, 1);
    core.handle_accepted(0, addr(2));
    let mut now = 300;
    for _ in 0..10 {
        assert!(asks_idle(&mut core, now), "asked at {now}");
        core.handle_holders_idle(now, 5);
        assert_eq!(stalls(&events(&mut core)), vec![]);
        now += 295;
    }
    // Off: no more questions.
    core.handle_reload(
        now,
        Settings {
            stall_warn_ms: None,
            ..settings()
        },
    );
    actions(&mut core);
    assert!(!asks_idle(&mut core, now + 10_000));
    assert_eq!(core.poll_timeout(), None);
    core.handle_relay_ended(
        now + 10_000,
        holder,
        relay_end(RelayCause::Finished, EndedBy::Client),
    );
}

fn expecting_headers() -> Settings {
    Settings {
        proxy_header_timeout_ms: Some(5_000),
        queue_timeout_ms: Some(8_000),
        ..settings()
    }
}

#[test]
fn a_proxy_header_comes_before_the_queue_and_names_the_client() {
    let mut core = Core::new(expecting_headers(), 0);
    let first = core.handle_accepted(0, addr(1));
    let second = core.handle_accepted(1, addr(2));
    assert_eq!(core.state_of(first), Some(StateName::Header));
    assert_eq!(actions(&mut core), vec![], "no connect before the header");
    assert_eq!(core.queue_len(), 0, "not in the line yet");
    // The second's header completes first: it is first in line.
    let real = SocketAddr::from(([203, 0, 113, 7], 4242));
    core.handle_proxy_header(2, second, ProxyHeader::Client(real));
    let logged = events(&mut core);
    assert!(logged.contains(&Event::Accepted {
        conn: second.id,
        client: real,
        via: Some(addr(2)),
    }));
    core.handle_proxy_header(3, first, ProxyHeader::Local);
    assert_eq!(core.state_of(first), Some(StateName::Queued));
    core.handle_upstream_connected(4, second);
    let logged = events(&mut core);
    assert!(logged.iter().any(|e| matches!(
        e,
        Event::Activated { conn, client, via: Some(via), .. }
            if *conn == second.id && *client == real && *via == addr(2)
    )));
}

#[test]
fn a_bad_or_late_proxy_header_is_rejected() {
    let mut core = Core::new(expecting_headers(), 0);
    let bad = core.handle_accepted(0, addr(1));
    let late = core.handle_accepted(0, addr(2));
    let slow = core.handle_accepted(0, addr(3));
    core.handle_proxy_header(1, bad, ProxyHeader::Bad);
    let logged = events(&mut core);
    assert!(logged.contains(&Event::Rejected {
        conn: bad.id,
        client: addr(1),
        reason: RejectReason::BadProxyHeader,
    }));
    core.handle_proxy_header(4_999, slow, ProxyHeader::Local);
    let _ = actions(&mut core);
    // `slow` holds the permit; `late` runs out of time for its header.
    core.handle_tick(5_000);
    let after = actions(&mut core);
    assert!(
        after.iter().any(
            |a| matches!(a, Action::Close { conn, outcome: Outcome::Rejected, .. } if *conn == late)
        ),
        "{after:?}"
    );
    // A header read after its deadline changes nothing.
    core.handle_proxy_header(5_001, late, ProxyHeader::Local);
    assert_eq!(actions(&mut core), vec![]);
    assert_eq!(core.stats().count(Outcome::Rejected), 2);
}

#[test]
fn a_shutdown_closes_connections_still_reading_their_header() {
    // Serving the queue at a stop serves those already in line only (found
    // by the model checker when the two features met: seed 35).
    for serve_queue_on_shutdown in [false, true] {
        let mut core = Core::new(
            Settings {
                serve_queue_on_shutdown,
                ..expecting_headers()
            },
            0,
        );
        let waiting = core.handle_accepted(0, addr(1));
        core.handle_shutdown(1);
        let after = actions(&mut core);
        assert!(after.iter().any(|a| matches!(
            a,
            Action::Close { conn, outcome: Outcome::Shutdown, .. } if *conn == waiting
        )));
        assert_eq!(core.conn_count(), 0, "its header timer went with it");
    }
}

#[test]
fn a_header_later_than_the_queue_timeout_ends_as_queue_timeout() {
    let mut core = Core::new(
        Settings {
            proxy_header_timeout_ms: Some(5_000),
            queue_timeout_ms: Some(1_000),
            ..settings()
        },
        0,
    );
    let late = core.handle_accepted(0, addr(2));
    core.handle_proxy_header(2_000, late, ProxyHeader::Local);
    let after = actions(&mut core);
    assert!(
        after.iter().any(|a| matches!(
            a,
            Action::Close { conn, outcome: Outcome::QueueTimeout, .. } if *conn == late
        )),
        "{after:?}"
    );
}

/// `RestartReason::index` is the place in `ALL` (declaration order), and
/// `RESTARTS` is `ALL` without the first start and the shutdown.
#[test]
fn restart_reasons_index_their_place_in_all() {
    for (i, reason) in RestartReason::ALL.into_iter().enumerate() {
        assert_eq!(reason.index(), i, "{reason}");
    }
    let counted: Vec<_> = RestartReason::ALL
        .into_iter()
        .filter(|r| !matches!(r, RestartReason::First | RestartReason::Shutdown))
        .collect();
    assert_eq!(RestartReason::RESTARTS.to_vec(), counted);
}

/// Found by the pool model: a reload removed the instance whose on-activate
/// hook was running; the hook's success must not connect its client to the
/// removed instance. The client goes back to the head of the line, and the
/// next free instance takes it.
#[test]
fn a_hook_that_succeeds_on_a_removed_instance_puts_its_client_back() {
    let pool = |names: &[&str]| Settings {
        upstreams: names.iter().map(|n| n.to_string()).collect(),
        ..with_hook(1)
    };
    let mut core = Core::new(pool(&["10.0.0.1:1", "10.0.0.2:1"]), 0);
    let conn = core.handle_accepted(0, addr(1));
    let hook = spawned(&actions(&mut core)).expect("a hook for the first client");
    assert_eq!(hook.context.instance, InstanceId(1));
    // Instance 1 leaves the pool while its hook runs; instance 2 stays.
    core.handle_reload(1, pool(&["10.0.0.2:1"]));
    let _ = actions(&mut core);
    core.handle_hook_exited(2, hook.hook, HookExit::Success);
    let after = actions(&mut core);
    assert!(
        !after.contains(&Action::Connect {
            conn,
            instance: InstanceId(1)
        }),
        "connected to the removed instance: {after:?}"
    );
    // Back in line, it goes to instance 2 (through that instance's hook).
    let next = spawned(&after).expect("a hook on instance 2");
    assert_eq!(next.context.instance, InstanceId(2));
    assert_eq!(next.context.conn, conn.id());
}

/// Found by the pool model: a refused connect in an unsupervised pool puts
/// the client back at the head; its connect timer must go with its
/// connecting state (no timer outlives its owner).
#[test]
fn a_refused_connect_in_a_pool_leaves_no_connect_timer_behind() {
    let mut core = Core::new(
        Settings {
            upstreams: vec!["10.0.0.1:1".to_string(), "10.0.0.2:1".to_string()],
            connect_timeout_ms: Some(10_000),
            ..settings()
        },
        0,
    );
    let conn = core.handle_accepted(0, addr(1));
    assert_eq!(
        actions(&mut core),
        vec![Action::Connect {
            conn,
            instance: InstanceId(1)
        }]
    );
    core.handle_upstream_failed(1, conn, "refused");
    assert_eq!(
        actions(&mut core),
        vec![
            Action::AbandonConnect(conn),
            Action::Connect {
                conn,
                instance: InstanceId(2)
            }
        ],
        "instance 1 cools down, instance 2 takes the client"
    );
    core.check_invariants().expect("no stray timer");
    // Its second connect gets the whole timeout again, from now.
    core.handle_tick(10_000);
    assert!(
        actions(&mut core).is_empty(),
        "no timeout of the first connect"
    );
}

/// Found by the pool model: clients put back at the head keep their place
/// among themselves. Two connects fail one after the other (the earlier
/// client's first): when the instances cool down, the earlier client must
/// still go first. Pushing each one to the front let the later one overtake
/// it.
#[test]
fn clients_put_back_by_failed_connects_keep_their_accept_order() {
    let mut core = Core::new(
        Settings {
            upstreams: vec!["10.0.0.1:1".to_string(), "10.0.0.2:1".to_string()],
            connect_timeout_ms: None,
            ..settings()
        },
        0,
    );
    let first = core.handle_accepted(0, addr(1));
    let second = core.handle_accepted(0, addr(2));
    let third = core.handle_accepted(0, addr(3));
    let _ = actions(&mut core);
    core.handle_upstream_failed(1, first, "refused");
    core.handle_upstream_failed(1, second, "refused");
    let _ = actions(&mut core);
    core.handle_tick(2_000);
    let connects: Vec<ConnId> = actions(&mut core)
        .iter()
        .filter_map(|a| match a {
            Action::Connect { conn, .. } => Some(conn.id()),
            _ => None,
        })
        .collect();
    assert_eq!(
        connects,
        vec![first.id(), second.id()],
        "accept order after both cool-downs (third: {})",
        third.id()
    );
}

fn pool_of(names: &[&str], base: Settings) -> Settings {
    Settings {
        upstreams: names.iter().map(|n| n.to_string()).collect(),
        ..base
    }
}

/// Found by the pool model: an on-activate hook that fails on an instance a
/// reload removed while it ran arms no retry backoff on that instance (a
/// removed instance holds no timer); its client goes to the next instance.
#[test]
fn a_hook_that_fails_on_a_removed_instance_arms_no_backoff() {
    let mut core = Core::new(pool_of(&["10.0.0.1:1", "10.0.0.2:1"], with_hook(1)), 0);
    let conn = core.handle_accepted(0, addr(1));
    let hook = spawned(&actions(&mut core)).expect("a hook for the first client");
    assert_eq!(hook.context.instance, InstanceId(1));
    core.handle_reload(1, pool_of(&["10.0.0.2:1"], with_hook(1)));
    let _ = actions(&mut core);
    core.handle_hook_exited(2, hook.hook, HookExit::Failed(1));
    core.check_invariants()
        .expect("no backoff on a removed instance");
    let next = spawned(&actions(&mut core)).expect("a hook on instance 2");
    assert_eq!(next.context.instance, InstanceId(2));
    assert_eq!(next.context.conn, conn.id());
}

/// Found by the pool model: a connect that fails on an instance a reload
/// removed while it connected cools nothing down (a removed instance holds
/// no timer); its client goes to the next instance.
#[test]
fn a_connect_that_fails_on_a_removed_instance_cools_nothing_down() {
    let mut core = Core::new(
        pool_of(&["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"], settings()),
        0,
    );
    let conn = core.handle_accepted(0, addr(1));
    let _ = actions(&mut core);
    core.handle_reload(1, pool_of(&["10.0.0.2:1", "10.0.0.3:1"], settings()));
    let _ = actions(&mut core);
    core.handle_upstream_failed(2, conn, "refused");
    core.check_invariants()
        .expect("no cool-down on a removed instance");
    let after = core_actions_and_events(&mut core);
    assert!(
        !after.iter().any(|a| matches!(
            a,
            Action::Log(Event::InstanceCooldown {
                instance: InstanceId(1),
                ..
            })
        )),
        "{after:?}"
    );
    assert!(
        after.contains(&Action::Connect {
            conn,
            instance: InstanceId(2)
        }),
        "{after:?}"
    );
}

fn core_actions_and_events(core: &mut Core) -> Vec<Action> {
    std::iter::from_fn(|| core.poll_action()).collect()
}

/// Found by the pool model: a successful connect ends its instance's
/// cool-down; a client waiting for a free instance is let through at once,
/// not at whatever input comes next.
#[test]
fn a_connect_that_ends_a_cool_down_lets_the_head_through_at_once() {
    let mut core = Core::new(
        pool_of(
            &["10.0.0.1:1", "10.0.0.2:1"],
            Settings {
                permits: 2,
                connect_timeout_ms: None,
                ..settings()
            },
        ),
        0,
    );
    let conns: Vec<ConnRef> = (1..=4)
        .map(|port| core.handle_accepted(0, addr(port)))
        .collect();
    let on = |actions: &[Action], want: InstanceId| -> Vec<ConnId> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Connect { conn, instance } if *instance == want => Some(conn.id()),
                _ => None,
            })
            .collect()
    };
    let first = actions(&mut core);
    let on_one = on(&first, InstanceId(1));
    assert_eq!(on_one.len(), 2, "{first:?}");
    let refused = conns.iter().find(|c| c.id() == on_one[0]).copied().unwrap();
    let connects = conns.iter().find(|c| c.id() == on_one[1]).copied().unwrap();
    // Instance 1 refuses one client: it cools down, its client waits at
    // the head (instance 2 is full).
    core.handle_upstream_failed(1, refused, "refused");
    assert!(on(&actions(&mut core), InstanceId(1)).is_empty());
    // The other client connects to instance 1: the cool-down is over, and
    // the free permit takes the waiting client now.
    core.handle_upstream_connected(2, connects);
    let after = actions(&mut core);
    assert!(
        after.contains(&Action::Connect {
            conn: refused,
            instance: InstanceId(1)
        }),
        "{after:?}"
    );
}
