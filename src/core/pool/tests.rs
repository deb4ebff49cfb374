//! The pool's rules: one FIFO line over K instances, each with its own
//! permits, hooks, cool-down and supervised service.

use super::COOLDOWN_BASE_MS;
use crate::core::service::PROBE_INTERVAL_MS;
use crate::core::test_support::{addr, drain, finished};
use crate::core::*;

fn names(k: u32) -> Vec<String> {
    (1..=k).map(|i| format!("127.0.0.1:{}", 8100 + i)).collect()
}

fn pool(k: u32) -> Settings {
    Settings {
        upstreams: names(k),
        ..Settings::default()
    }
}

fn supervised_pool(k: u32, service: ServiceSettings) -> Settings {
    Settings {
        service: Some(service),
        ..pool(k)
    }
}

/// The instance each connect of `actions` goes to, in order.
fn connects(actions: &[Action]) -> Vec<(ConnRef, u32)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Connect { conn, instance } => Some((*conn, instance.0)),
            _ => None,
        })
        .collect()
}

/// Connects `conn` and reports the instance it went to.
fn connect_one(core: &mut Core, now: u64, port: u16) -> (ConnRef, u32) {
    let conn = core.handle_accepted(now, addr(port));
    let (actions, _) = drain(core);
    let went = connects(&actions);
    assert_eq!(went.len(), 1, "{actions:?}");
    core.handle_upstream_connected(now, conn);
    drain(core);
    went[0]
}

/// The hook runs `actions` spawn, in order.
fn spawned_hooks(actions: &[Action]) -> Vec<HookRequest> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SpawnHook(request) => Some(request.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn the_head_goes_to_the_free_instance_idle_longest() {
    let mut core = Core::new(pool(3), 0);
    // Three at once spread over the three instances, lowest number first.
    let first: Vec<u32> = (0..3).map(|n| connect_one(&mut core, 1, n).1).collect();
    assert_eq!(first, [1, 2, 3]);
    // A fourth waits: every permit is held.
    let waiting = core.handle_accepted(2, addr(9));
    assert!(connects(&drain(&mut core).0).is_empty());
    assert_eq!(core.queue_len(), 1);
    // Instance 2 frees first and takes it.
    let stats = core.stats();
    assert_eq!(stats.instances.len(), 3);
    let on_two = core
        .conns_on(InstanceId(2))
        .first()
        .copied()
        .expect("a holder of instance 2");
    core.handle_relay_ended(10, on_two, finished());
    assert_eq!(connects(&drain(&mut core).0), [(waiting, 2)]);
    core.handle_upstream_connected(10, waiting);
    drain(&mut core);
    // Instances 3 then 1 end: 3 at 20, 1 at 30. Then 2 ends at 40. The next
    // client goes to 3, idle longest, then 1, then 2.
    for (at, instance) in [(20, 3), (30, 1), (40, 2)] {
        let holder = core.conns_on(InstanceId(instance))[0];
        core.handle_relay_ended(at, holder, finished());
        drain(&mut core);
    }
    let order: Vec<u32> = (0..3)
        .map(|n| {
            let (conn, instance) = connect_one(&mut core, 50, 20 + n);
            core.handle_relay_ended(50, conn, finished());
            drain(&mut core);
            instance
        })
        .collect();
    // One at a time: each finishes before the next comes, so every free
    // instance is free; the one idle longest goes first, and then the one
    // just used is the most recently busy.
    assert_eq!(order, [3, 1, 2]);
}

#[test]
fn nobody_overtakes_the_head_of_the_line() {
    let mut core = Core::new(pool(2), 0);
    connect_one(&mut core, 1, 1);
    connect_one(&mut core, 1, 2);
    let waiting: Vec<ConnRef> = (0..5)
        .map(|n| core.handle_accepted(2 + n, addr(10 + n as u16)))
        .collect();
    drain(&mut core);
    let mut served = Vec::new();
    for step in 0..5 {
        let at = 10 + step;
        // Whichever instance frees, the next in accept order gets it.
        let instance = if step % 2 == 0 { 1 } else { 2 };
        let holder = core.conns_on(InstanceId(instance))[0];
        core.handle_relay_ended(at, holder, finished());
        let went = connects(&drain(&mut core).0);
        assert_eq!(went.len(), 1);
        assert_eq!(went[0].1, instance);
        core.handle_upstream_connected(at, went[0].0);
        drain(&mut core);
        served.push(went[0].0);
    }
    assert_eq!(served, waiting);
}

#[test]
fn hooks_of_different_instances_run_at_once_and_a_failed_one_sends_the_client_on() {
    let settings = Settings {
        on_activate: Some(HookRef(1)),
        ..pool(2)
    };
    let mut core = Core::new(settings, 0);
    let a = core.handle_accepted(1, addr(1));
    let b = core.handle_accepted(1, addr(2));
    let (actions, _) = drain(&mut core);
    let hooks = spawned_hooks(&actions);
    assert_eq!(hooks.len(), 2, "{actions:?}");
    assert_eq!(
        (hooks[0].context.instance, hooks[0].context.conn),
        (InstanceId(1), a.id())
    );
    assert_eq!(hooks[0].context.upstream, "127.0.0.1:8101");
    assert_eq!(
        (hooks[1].context.instance, hooks[1].context.conn),
        (InstanceId(2), b.id())
    );
    // Instance 2's hook succeeds: b connects there.
    core.handle_hook_exited(2, hooks[1].hook, HookExit::Success);
    assert_eq!(connects(&drain(&mut core).0), [(b, 2)]);
    core.handle_upstream_connected(2, b);
    drain(&mut core);
    // Instance 1's hook fails: a goes back to the head, instance 1 backs
    // off, and a waits for the next free instance rather than for 1.
    core.handle_hook_exited(3, hooks[0].hook, HookExit::Failed(1));
    let (actions, events) = drain(&mut core);
    assert!(connects(&actions).is_empty());
    assert!(events.iter().any(|e| matches!(
        e,
        Event::HookFailed {
            instance: InstanceId(1),
            retry_in_ms: Some(RETRY_BASE_MS),
            ..
        }
    )));
    assert_eq!(core.queue_len(), 1);
    core.handle_relay_ended(4, b, finished());
    let (actions, _) = drain(&mut core);
    let retried = spawned_hooks(&actions)
        .into_iter()
        .next()
        .map(|r| r.context);
    let retried = retried.expect("a's hook runs again on instance 2");
    assert_eq!(
        (retried.instance, retried.conn, retried.attempt),
        (InstanceId(2), a.id(), 2)
    );
}

#[test]
fn a_refused_connect_cools_the_instance_down_and_the_client_tries_the_next() {
    let mut core = Core::new(pool(3), 0);
    let a = core.handle_accepted(1, addr(1));
    assert_eq!(connects(&drain(&mut core).0), [(a, 1)]);
    core.handle_upstream_failed(2, a, "connection refused");
    let (actions, events) = drain(&mut core);
    assert!(events.contains(&Event::InstanceCooldown {
        instance: InstanceId(1),
        ms: COOLDOWN_BASE_MS,
    }));
    assert_eq!(connects(&actions), [(a, 2)]);
    assert!(core.stats().instances[0].cooling_down);
    // Refused again on 2: on to 3.
    core.handle_upstream_failed(3, a, "connection refused");
    assert_eq!(connects(&drain(&mut core).0), [(a, 3)]);
    // And on 3: three instances failed it, it ends.
    core.handle_upstream_failed(4, a, "connection refused");
    let (actions, _) = drain(&mut core);
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Close {
            outcome: Outcome::ConnectFailed,
            ..
        }
    )));
    // Every instance cools down: a newcomer waits for the first to end.
    let b = core.handle_accepted(5, addr(2));
    assert!(connects(&drain(&mut core).0).is_empty());
    core.handle_tick(2 + COOLDOWN_BASE_MS);
    assert_eq!(connects(&drain(&mut core).0), [(b, 1)]);
    // A connect that succeeds ends the cool-down's doubling.
    core.handle_upstream_connected(2 + COOLDOWN_BASE_MS, b);
    drain(&mut core);
    core.handle_relay_ended(2 + COOLDOWN_BASE_MS, b, finished());
    drain(&mut core);
    // (2 and 3 still cool down.)
    let c = core.handle_accepted(2 + COOLDOWN_BASE_MS, addr(3));
    assert_eq!(connects(&drain(&mut core).0), [(c, 1)]);
    core.handle_upstream_failed(2 + COOLDOWN_BASE_MS, c, "connection refused");
    let (_, events) = drain(&mut core);
    assert!(events.contains(&Event::InstanceCooldown {
        instance: InstanceId(1),
        ms: COOLDOWN_BASE_MS,
    }));
}

#[test]
fn a_single_upstream_never_cools_down() {
    let mut core = Core::new(pool(1), 0);
    let a = core.handle_accepted(1, addr(1));
    drain(&mut core);
    core.handle_upstream_failed(2, a, "connection refused");
    let (actions, events) = drain(&mut core);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::InstanceCooldown { .. }))
    );
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Close {
            outcome: Outcome::ConnectFailed,
            ..
        }
    )));
    let b = core.handle_accepted(3, addr(2));
    assert_eq!(connects(&drain(&mut core).0), [(b, 1)]);
}

#[test]
fn a_two_instance_pool_gives_up_on_a_client_after_both_failed() {
    let mut core = Core::new(pool(2), 0);
    let a = core.handle_accepted(1, addr(1));
    drain(&mut core);
    core.handle_upstream_failed(2, a, "refused");
    assert_eq!(connects(&drain(&mut core).0), [(a, 2)]);
    core.handle_upstream_failed(3, a, "refused");
    let (actions, _) = drain(&mut core);
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Close {
            outcome: Outcome::ConnectFailed,
            ..
        }
    )));
}

// ----- supervised pools -----

fn service() -> ServiceSettings {
    ServiceSettings {
        run: ServiceRef(1),
        ..ServiceSettings::default()
    }
}

fn fake_shell(core: &mut Core, now: u64) -> (Vec<Action>, Vec<Event>) {
    fake_shell_failing(core, now, &[])
}

/// Answers every service action of the shell at `now`: port checks refuse,
/// spawns succeed (pid = 100 × instance + generation) but for the `failing`
/// instances, probes of a started generation answer, stops finish at once.
/// Returns the other actions and the events.
fn fake_shell_failing(core: &mut Core, now: u64, failing: &[u32]) -> (Vec<Action>, Vec<Event>) {
    let mut other = Vec::new();
    let mut events = Vec::new();
    loop {
        let (actions, logged) = drain(core);
        events.extend(logged);
        if actions.is_empty() {
            return (other, events);
        }
        for action in actions {
            match action {
                Action::ProbeUpstream {
                    instance,
                    generation,
                } => {
                    let starting = core
                        .stats()
                        .instances
                        .iter()
                        .find(|s| s.id == instance.0)
                        .is_some_and(|s| s.service.pid.is_some());
                    core.handle_service_probed(now, instance, generation, starting);
                }
                Action::SpawnService {
                    instance,
                    generation,
                    ..
                } if failing.contains(&instance.0) => {
                    core.handle_service_spawned(now, instance, generation, Err("no".into()));
                }
                Action::SpawnService {
                    instance,
                    generation,
                    ..
                } => {
                    let pid = 100 * instance.0 + generation.0 as u32;
                    core.handle_service_spawned(now, instance, generation, Ok(pid));
                }
                Action::SignalService {
                    instance,
                    generation,
                    ..
                } => core.handle_service_exited(now, instance, generation, ServiceExit::Code(0)),
                Action::SampleService {
                    instance,
                    generation,
                } => {
                    core.handle_service_sampled(now, instance, generation, ServiceSample::default())
                }
                other_action => other.push(other_action),
            }
        }
    }
}

/// Brings every instance of a supervised pool up: ready at the returned time.
fn bring_up(core: &mut Core, now: u64) -> u64 {
    fake_shell(core, now);
    let at = now + PROBE_INTERVAL_MS;
    core.handle_tick(at);
    fake_shell(core, at);
    assert!(
        core.stats()
            .instances
            .iter()
            .all(|s| s.service.state == Some(ServiceStateName::Ready)),
        "{:?}",
        core.stats().instances
    );
    at
}

/// A supervised pool of `k` whose instances restart after each connection.
fn restarting_after_one(k: u32) -> Settings {
    supervised_pool(
        k,
        ServiceSettings {
            restart_after: Some(1),
            ..service()
        },
    )
}

/// `settings` with the first of its upstreams removed.
fn without_the_first(settings: &Settings) -> Settings {
    Settings {
        upstreams: settings.upstreams[1..].to_vec(),
        ..settings.clone()
    }
}

fn states(core: &Core) -> Vec<ServiceStateName> {
    core.stats()
        .instances
        .iter()
        .filter_map(|s| s.service.state)
        .collect()
}

#[test]
fn planned_restarts_take_one_instance_out_at_a_time() {
    let settings = restarting_after_one(2);
    let mut core = Core::new(settings, 0);
    let mut now = bring_up(&mut core, 0);
    // Instance 1 serves its one connection and becomes due: its turn is
    // free (2 is ready), so it drains and takes no one else.
    let a = core.handle_accepted(now, addr(1));
    let (actions, _) = fake_shell(&mut core, now);
    assert_eq!(connects(&actions), [(a, 1)]);
    core.handle_upstream_connected(now, a);
    fake_shell(&mut core, now);
    assert_eq!(
        states(&core),
        [ServiceStateName::Due, ServiceStateName::Ready]
    );
    // Instance 2 serves one too and becomes due, but 1 is out: 2 keeps
    // serving meanwhile.
    let b = core.handle_accepted(now, addr(2));
    let (actions, _) = fake_shell(&mut core, now);
    assert_eq!(connects(&actions), [(b, 2)]);
    core.handle_upstream_connected(now, b);
    fake_shell(&mut core, now);
    assert_eq!(
        states(&core),
        [ServiceStateName::Due, ServiceStateName::Ready]
    );
    core.handle_relay_ended(now, b, finished());
    fake_shell(&mut core, now);
    let c = core.handle_accepted(now, addr(3));
    let (actions, _) = fake_shell(&mut core, now);
    assert_eq!(
        connects(&actions),
        [(c, 2)],
        "a due instance keeps serving until its turn"
    );
    core.handle_upstream_connected(now, c);
    fake_shell(&mut core, now);
    // 1 drains: it stops and starts again; only once it is ready does 2's
    // turn come.
    core.handle_relay_ended(now, a, finished());
    let (_, events) = fake_shell(&mut core, now);
    assert!(events.iter().any(|e| matches!(
        e,
        Event::UpstreamStopping {
            instance: InstanceId(1),
            reason: RestartReason::AfterN,
            ..
        }
    )));
    assert_eq!(states(&core)[0], ServiceStateName::Starting);
    assert_eq!(states(&core)[1], ServiceStateName::Ready);
    now += PROBE_INTERVAL_MS;
    core.handle_tick(now);
    fake_shell(&mut core, now);
    // 1 is ready: 2 drains now (its holder c still proxies).
    assert_eq!(
        states(&core),
        [ServiceStateName::Ready, ServiceStateName::Due]
    );
    let d = core.handle_accepted(now, addr(4));
    let (actions, _) = fake_shell(&mut core, now);
    assert_eq!(connects(&actions), [(d, 1)]);
    core.handle_relay_ended(now, c, finished());
    let (_, events) = fake_shell(&mut core, now);
    assert!(events.iter().any(|e| matches!(
        e,
        Event::UpstreamStopping {
            instance: InstanceId(2),
            ..
        }
    )));
    core.check_invariants().expect("invariants");
}

#[test]
fn a_crash_restarts_its_instance_at_once_and_alone() {
    let mut core = Core::new(supervised_pool(3, service()), 0);
    let now = bring_up(&mut core, 0);
    let on: Vec<u32> = (0..3).map(|n| connect_one(&mut core, now, n).1).collect();
    assert_eq!(on, [1, 2, 3]);
    let pid_two = core.stats().instances[1].service.pid;
    assert!(pid_two.is_some());
    core.handle_service_exited(
        now + 1,
        InstanceId(2),
        Generation(1),
        ServiceExit::Signal(9),
    );
    let (actions, _) = fake_shell(&mut core, now + 1);
    // Only instance 2's holder is cut; the others proxy on.
    let cut: Vec<_> = actions
        .iter()
        .filter(|a| matches!(a, Action::Close { .. }))
        .collect();
    assert_eq!(cut.len(), 1, "{actions:?}");
    // The stop's look at what is left finds nothing: the next generation
    // starts at once.
    core.handle_tick(now + 1 + PROBE_INTERVAL_MS);
    let (_, events) = fake_shell(&mut core, now + 1 + PROBE_INTERVAL_MS);
    assert!(events.iter().any(|e| matches!(
        e,
        Event::UpstreamStarting {
            instance: InstanceId(2),
            reason: RestartReason::Crash,
            ..
        }
    )));
    assert_eq!(core.active(), 2);
    assert_eq!(states(&core)[0], ServiceStateName::Ready);
    assert_eq!(states(&core)[2], ServiceStateName::Ready);
}

#[test]
fn clients_are_turned_away_only_once_every_instance_failed() {
    let settings = supervised_pool(
        2,
        ServiceSettings {
            start_retries: 1,
            ..service()
        },
    );
    let mut core = Core::new(settings, 0);
    // Instance 1 comes up; instance 2's spawn fails.
    fake_shell_failing(&mut core, 0, &[2]);
    core.handle_tick(PROBE_INTERVAL_MS);
    fake_shell_failing(&mut core, PROBE_INTERVAL_MS, &[2]);
    assert_eq!(
        states(&core),
        [ServiceStateName::Ready, ServiceStateName::Failed]
    );
    // A client is served by instance 1, not turned away.
    let a = core.handle_accepted(PROBE_INTERVAL_MS, addr(1));
    let (actions, _) = fake_shell_failing(&mut core, PROBE_INTERVAL_MS, &[2]);
    assert_eq!(connects(&actions), [(a, 1)]);
    // Instance 1 crashes and cannot start again: now every instance
    // failed, and the waiting client is closed.
    let b = core.handle_accepted(PROBE_INTERVAL_MS, addr(2));
    fake_shell_failing(&mut core, PROBE_INTERVAL_MS, &[2]);
    let now = PROBE_INTERVAL_MS + 1;
    core.handle_service_exited(now, InstanceId(1), Generation(1), ServiceExit::Signal(9));
    fake_shell_failing(&mut core, now, &[1, 2]);
    assert_eq!(core.queue_len(), 1, "b still waits: instance 1 restarts");
    let now = now + PROBE_INTERVAL_MS;
    core.handle_tick(now);
    let (actions, events) = fake_shell_failing(&mut core, now, &[1, 2]);
    assert!(events.iter().any(|e| matches!(
        e,
        Event::UpstreamFailed {
            instance: InstanceId(1),
            ..
        }
    )));
    assert!(actions.iter().any(|x| matches!(
        x,
        Action::Close {
            conn,
            outcome: Outcome::UpstreamFailed,
            ..
        } if *conn == b
    )));
}

#[test]
fn a_reload_adds_and_removes_instances_and_keeps_the_rest() {
    let mut core = Core::new(pool(2), 0);
    let a = connect_one(&mut core, 1, 1);
    let b = connect_one(&mut core, 1, 2);
    assert_eq!((a.1, b.1), (1, 2));
    // Instance 1 (8101) goes, 8103 comes: 2 keeps its number, 8103 takes
    // number 3 while 1 still drains.
    let settings = Settings {
        upstreams: vec!["127.0.0.1:8102".into(), "127.0.0.1:8103".into()],
        ..pool(2)
    };
    core.handle_reload(2, settings.clone());
    drain(&mut core);
    let stats = core.stats();
    let listed: Vec<(u32, &str, bool)> = stats
        .instances
        .iter()
        .map(|s| (s.id, s.upstream.as_str(), s.removed))
        .collect();
    assert_eq!(
        listed,
        [
            (1, "127.0.0.1:8101", true),
            (2, "127.0.0.1:8102", false),
            (3, "127.0.0.1:8103", false)
        ]
    );
    // The removed instance's client proxies on; newcomers go to 3, not 1.
    assert_eq!(core.active(), 2);
    let c = connect_one(&mut core, 3, 3);
    assert_eq!(c.1, 3);
    let d = core.handle_accepted(3, addr(4));
    assert!(connects(&drain(&mut core).0).is_empty(), "1 was removed");
    core.handle_relay_ended(4, a.0, finished());
    assert!(connects(&drain(&mut core).0).is_empty());
    // Once 1 drained its number is free: the next added instance takes it.
    let settings = Settings {
        upstreams: vec![
            "127.0.0.1:8102".into(),
            "127.0.0.1:8103".into(),
            "127.0.0.1:8104".into(),
        ],
        ..settings
    };
    core.handle_reload(5, settings);
    assert_eq!(connects(&drain(&mut core).0), [(d, 1)]);
    assert_eq!(core.stats().instances[0].upstream, "127.0.0.1:8104");
}

#[test]
fn a_reload_that_removes_a_supervised_instance_stops_it_once_drained() {
    let mut core = Core::new(supervised_pool(2, service()), 0);
    let now = bring_up(&mut core, 0);
    let a = connect_one(&mut core, now, 1);
    assert_eq!(a.1, 1);
    let settings = without_the_first(&supervised_pool(2, service()));
    core.handle_reload(now + 1, settings);
    let (_, events) = fake_shell(&mut core, now + 1);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::UpstreamStopping { .. })),
        "a removed instance is stopped only once drained"
    );
    core.handle_relay_ended(now + 2, a.0, finished());
    let (_, events) = fake_shell(&mut core, now + 2);
    assert!(events.iter().any(|e| matches!(
        e,
        Event::UpstreamStopping {
            instance: InstanceId(1),
            reason: RestartReason::Reload,
            ..
        }
    )));
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::UpstreamStarting { .. })),
        "{events:?}"
    );
    assert_eq!(core.stats().instances.len(), 1);
    core.check_invariants().expect("invariants");
}

#[test]
fn an_instance_removed_and_listed_again_while_it_drains_comes_back_as_it_was() {
    let mut core = Core::new(pool(2), 0);
    let a = connect_one(&mut core, 1, 1);
    assert_eq!(a.1, 1);
    let without_one = without_the_first(&pool(2));
    core.handle_reload(2, without_one);
    drain(&mut core);
    assert!(core.stats().instances[0].removed);
    core.handle_reload(3, pool(2));
    drain(&mut core);
    let stats = core.stats();
    assert_eq!(stats.instances.len(), 2, "{:?}", stats.instances);
    assert!(!stats.instances[0].removed);
    assert_eq!(stats.instances[0].active, 1, "its client proxies on");
    // Instance 2 is busy; the next client goes to 1 once it is free.
    let b = connect_one(&mut core, 4, 2);
    assert_eq!(b.1, 2);
    core.handle_relay_ended(5, a.0, finished());
    drain(&mut core);
    let c = connect_one(&mut core, 6, 3);
    assert_eq!(c.1, 1);
}

#[test]
fn the_instance_due_longest_takes_the_next_turn() {
    let settings = restarting_after_one(3);
    let mut core = Core::new(settings, 0);
    let mut now = bring_up(&mut core, 0);
    // One client each, in turn: 1 goes out at once, 2 and 3 wait their turn
    // (2 due first) and keep serving.
    let mut served = Vec::new();
    for port in 1..=3 {
        now += 1;
        let conn = core.handle_accepted(now, addr(port));
        let (actions, _) = fake_shell(&mut core, now);
        let went = connects(&actions);
        core.handle_upstream_connected(now, went[0].0);
        fake_shell(&mut core, now);
        core.handle_relay_ended(now, conn, finished());
        fake_shell(&mut core, now);
        served.push(went[0].1);
    }
    assert_eq!(served, [1, 2, 3]);
    // 1 is ready again: the turn goes to 2, due before 3.
    now += PROBE_INTERVAL_MS;
    core.handle_tick(now);
    let (_, events) = fake_shell(&mut core, now);
    let stopping = |events: &[Event]| {
        events
            .iter()
            .filter_map(|e| match e {
                Event::UpstreamStopping { instance, .. } => Some(instance.0),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(stopping(&events), [2]);
    // 1 serves again and is due again, after 3: once 2 is back, 3 goes, not 1.
    now += 1;
    let conn = core.handle_accepted(now, addr(9));
    let (actions, _) = fake_shell(&mut core, now);
    assert_eq!(connects(&actions)[0].1, 1);
    core.handle_upstream_connected(now, conn);
    core.handle_relay_ended(now, conn, finished());
    fake_shell(&mut core, now);
    now += PROBE_INTERVAL_MS;
    core.handle_tick(now);
    let (_, events) = fake_shell(&mut core, now);
    assert_eq!(stopping(&events), [3]);
    core.check_invariants().expect("invariants");
}

#[test]
fn position_counts_the_whole_pool_in_its_eta_and_free_permits() {
    let mut core = Core::new(pool(2), 0);
    // One connection proxies 1000 ms: the average.
    let first = connect_one(&mut core, 0, 1);
    core.handle_relay_ended(1000, first.0, finished());
    drain(&mut core);
    connect_one(&mut core, 1000, 2);
    connect_one(&mut core, 1000, 3);
    let waiting: Vec<ConnRef> = (0..5)
        .map(|n| core.handle_accepted(1000, addr(10 + n)))
        .collect();
    drain(&mut core);
    // Both permits held: positions 1-2 wait one round, 3-4 two, 5 three.
    for (n, conn) in waiting.iter().enumerate() {
        let p = core
            .position(1000, Target::Conn(conn.id()))
            .expect("waiting");
        let rounds = (n as u64) / 2 + 1;
        assert_eq!((p.eta_ms, p.free_permits), (Some(rounds * 1000), 0), "{n}");
    }
    assert_eq!(core.status(1000).permits, 2);
}

#[test]
fn a_connect_that_times_out_is_abandoned_before_the_next_instance_is_tried() {
    let settings = Settings {
        connect_timeout_ms: Some(1000),
        ..pool(2)
    };
    let mut core = Core::new(settings, 0);
    let a = core.handle_accepted(0, addr(1));
    assert_eq!(connects(&drain(&mut core).0), [(a, 1)]);
    core.handle_tick(1000);
    let (actions, events) = drain(&mut core);
    let abandon = actions
        .iter()
        .position(|x| *x == Action::AbandonConnect(a))
        .expect("the timed-out connect is given up");
    let next = actions
        .iter()
        .position(|x| {
            *x == Action::Connect {
                conn: a,
                instance: InstanceId(2),
            }
        })
        .expect("and the next instance tried");
    assert!(abandon < next, "{actions:?}");
    assert!(events.contains(&Event::InstanceCooldown {
        instance: InstanceId(1),
        ms: COOLDOWN_BASE_MS,
    }));
}

#[test]
fn a_failure_on_an_instance_removed_meanwhile_arms_no_backoff_on_it() {
    let settings = Settings {
        on_activate: Some(HookRef(1)),
        ..pool(3)
    };
    let without_one = without_the_first(&settings);
    let mut core = Core::new(settings, 0);
    // a's hook runs on 1, b's on 2.
    let a = core.handle_accepted(1, addr(1));
    let b = core.handle_accepted(1, addr(2));
    let (actions, _) = drain(&mut core);
    let hooks = spawned_hooks(&actions);
    assert_eq!(hooks[0].context.instance, InstanceId(1));
    core.handle_reload(2, without_one);
    drain(&mut core);
    // The hook of the removed instance fails: no backoff armed on it (the
    // debug invariants would say so), and a goes to a live instance.
    core.handle_hook_exited(3, hooks[0].hook, HookExit::Failed(1));
    let (actions, _) = drain(&mut core);
    let next = spawned_hooks(&actions)
        .into_iter()
        .next()
        .map(|r| r.context);
    let next = next.expect("a's hook runs again elsewhere");
    assert_eq!((next.conn, next.instance), (a.id(), InstanceId(3)));
    // b connects to 2 and is refused after instance 2 is removed too: no
    // cool-down for it.
    core.handle_hook_exited(4, hooks[1].hook, HookExit::Success);
    assert_eq!(connects(&drain(&mut core).0), [(b, 2)]);
    let only_three = Settings {
        upstreams: names(3)[2..].to_vec(),
        ..pool(3)
    };
    core.handle_reload(5, only_three);
    drain(&mut core);
    core.handle_upstream_failed(6, b, "refused");
    let (_, events) = drain(&mut core);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::InstanceCooldown { .. })),
        "{events:?}"
    );
    core.check_invariants().expect("invariants");
}

#[test]
fn an_instance_removed_while_draining_gives_up_its_turn_and_waits_again_when_back() {
    let settings = restarting_after_one(3);
    let mut core = Core::new(settings.clone(), 0);
    let now = bring_up(&mut core, 0);
    // Instance 1 serves one and drains for its restart, its client still on.
    let a = connect_one(&mut core, now, 1);
    assert_eq!(a.1, 1);
    fake_shell(&mut core, now);
    assert_eq!(states(&core)[0], ServiceStateName::Due);
    // Removed: 2 may take the next turn.
    let without_one = without_the_first(&settings);
    core.handle_reload(now + 1, without_one);
    fake_shell(&mut core, now + 1);
    let b = connect_one(&mut core, now + 1, 2);
    assert_eq!(b.1, 2);
    fake_shell(&mut core, now + 1);
    assert_eq!(states(&core)[1], ServiceStateName::Due);
    // Listed again: 1 is back, waiting for its turn, and serving.
    core.handle_reload(now + 2, settings);
    fake_shell(&mut core, now + 2);
    assert_eq!(
        states(&core)[..2],
        [ServiceStateName::Ready, ServiceStateName::Due]
    );
    core.check_invariants()
        .expect("one instance out for maintenance");
}

#[test]
fn an_instance_removed_and_listed_again_while_it_stops_keeps_its_turn() {
    let settings = restarting_after_one(3);
    let mut core = Core::new(settings.clone(), 0);
    let now = bring_up(&mut core, 0);
    // Instance 1 serves one and goes out for its restart; its stop is
    // asked and not yet over.
    let a = connect_one(&mut core, now, 1);
    assert_eq!(a.1, 1);
    core.handle_relay_ended(now, a.0, finished());
    drain(&mut core);
    assert_eq!(states(&core)[0], ServiceStateName::Stopping);
    // Removed, then listed again, while it stops.
    let without_one = without_the_first(&settings);
    core.handle_reload(now + 1, without_one);
    drain(&mut core);
    core.handle_reload(now + 2, settings);
    drain(&mut core);
    // Instance 2 serves one and is due: it waits, 1 is still out.
    let b = connect_one(&mut core, now + 3, 2);
    assert_eq!(b.1, 2);
    drain(&mut core);
    let out = states(&core)
        .iter()
        .filter(|s| **s != ServiceStateName::Ready)
        .count();
    assert_eq!(out, 1, "{:?}", states(&core));
    core.check_invariants().expect("invariants");
}
