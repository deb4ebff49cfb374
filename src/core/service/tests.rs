//! The supervisor's rules, driven with a fake clock and a fake shell.

use super::{PROBE_INTERVAL_MS, START_RETRY_BASE_MS, START_RETRY_MAX_MS};
use crate::core::test_support::{addr, drain, finished};
use crate::core::*;

fn supervised(service: ServiceSettings) -> Settings {
    Settings {
        upstreams: vec!["127.0.0.1:8100".to_string()],
        service: Some(service),
        ..Settings::default()
    }
}

fn service() -> ServiceSettings {
    ServiceSettings {
        run: ServiceRef(1),
        ..ServiceSettings::default()
    }
}

fn actions(core: &mut Core) -> Vec<Action> {
    drain(core).0
}

/// The port check of instance 1's generation `generation`.
fn probe(generation: u64) -> Action {
    Action::ProbeUpstream {
        instance: InstanceId(1),
        generation: Generation(generation),
    }
}

/// A stop signal to instance 1's generation `generation`.
fn signal(generation: u64, signal: StopSignal) -> Action {
    Action::SignalService {
        instance: InstanceId(1),
        generation: Generation(generation),
        signal,
    }
}

/// Answers the port check (free) and then the spawn with `result`.
fn spawned(core: &mut Core, now: u64, generation: u64, result: Result<u32, String>) {
    core.handle_service_probed(now, InstanceId(1), Generation(generation), false);
    actions(core);
    core.handle_service_spawned(now, InstanceId(1), Generation(generation), result);
}

/// Answers the port check and the spawn, then the first probe: the
/// generation is ready at `now + PROBE_INTERVAL_MS`. Returns that time.
fn bring_up(core: &mut Core, now: u64, generation: u64, pid: u32) -> u64 {
    let generation = Generation(generation);
    assert!(actions(core).contains(&Action::ProbeUpstream {
        instance: InstanceId(1),
        generation,
    }));
    core.handle_service_probed(now, InstanceId(1), generation, false);
    let spawn = actions(core);
    assert!(
        matches!(spawn.as_slice(), [Action::SpawnService { instance: InstanceId(1), generation: g, .. }] if *g == generation),
        "{spawn:?}"
    );
    core.handle_service_spawned(now, InstanceId(1), generation, Ok(pid));
    let at = now + PROBE_INTERVAL_MS;
    core.handle_tick(at);
    assert!(actions(core).contains(&Action::ProbeUpstream {
        instance: InstanceId(1),
        generation,
    }));
    core.handle_service_probed(at, InstanceId(1), generation, true);
    at
}

/// Accepts a client and lets it proxy.
fn proxying(core: &mut Core, now: u64, port: u16) -> ConnRef {
    let conn = core.handle_accepted(now, addr(port));
    let connect = actions(core);
    assert!(
        connect.contains(&Action::Connect {
            conn,
            instance: InstanceId(1)
        }),
        "{connect:?}"
    );
    core.handle_upstream_connected(now, conn);
    assert!(actions(core).contains(&Action::StartRelay(conn)));
    conn
}

/// Answers a stop: the process exits and its session empties.
fn stop_done(core: &mut Core, now: u64, generation: u64) {
    let generation = Generation(generation);
    core.handle_service_exited(now, InstanceId(1), generation, ServiceExit::Code(0));
    assert!(actions(core).contains(&Action::SampleService {
        instance: InstanceId(1),
        generation,
    }));
    core.handle_service_sampled(now, InstanceId(1), generation, ServiceSample::default());
}

fn state(core: &Core) -> Option<ServiceStateName> {
    core.stats().service.state
}

#[test]
fn no_client_is_let_in_before_the_service_answers() {
    let mut core = Core::new(supervised(service()), 0);
    assert_eq!(actions(&mut core), vec![probe(1)]);
    core.handle_service_probed(0, InstanceId(1), Generation(1), false);
    assert_eq!(
        actions(&mut core),
        vec![Action::SpawnService {
            instance: InstanceId(1),
            generation: Generation(1),
            reason: RestartReason::First,
            run: ServiceRef(1),
        }]
    );
    core.handle_service_spawned(0, InstanceId(1), Generation(1), Ok(42));
    let client = core.handle_accepted(10, addr(1));
    assert_eq!(actions(&mut core), vec![], "the service is only starting");
    assert_eq!(state(&core), Some(ServiceStateName::Starting));
    core.handle_tick(100);
    assert_eq!(actions(&mut core), vec![probe(1)]);
    core.handle_service_probed(100, InstanceId(1), Generation(1), false);
    assert_eq!(actions(&mut core), vec![], "refused: not ready yet");
    core.handle_tick(200);
    assert_eq!(actions(&mut core), vec![probe(1)]);
    core.handle_service_probed(200, InstanceId(1), Generation(1), true);
    let (acts, events) = drain(&mut core);
    assert!(
        acts.contains(&Action::Connect {
            conn: client,
            instance: InstanceId(1)
        }),
        "{acts:?}"
    );
    assert!(events.contains(&Event::UpstreamReady {
        instance: InstanceId(1),
        generation: Generation(1),
        start_ms: 200
    }));
    assert_eq!(state(&core), Some(ServiceStateName::Ready));
}

#[test]
fn a_busy_port_is_a_failed_start_retried_with_backoff() {
    let mut core = Core::new(supervised(service()), 0);
    actions(&mut core);
    core.handle_service_probed(0, InstanceId(1), Generation(1), true);
    let (acts, events) = drain(&mut core);
    assert!(acts.is_empty(), "nothing is spawned beside it: {acts:?}");
    assert!(events.iter().any(|e| matches!(
        e,
        Event::UpstreamPortBusy {
            instance: InstanceId(1),
            ..
        }
    )));
    core.handle_tick(START_RETRY_BASE_MS - 1);
    assert_eq!(actions(&mut core), vec![]);
    core.handle_tick(START_RETRY_BASE_MS);
    assert_eq!(
        actions(&mut core),
        vec![probe(1)],
        "the same generation number: nothing was spawned"
    );
    core.handle_service_probed(START_RETRY_BASE_MS, InstanceId(1), Generation(1), true);
    core.handle_tick(3 * START_RETRY_BASE_MS - 1);
    assert_eq!(actions(&mut core), vec![], "the second wait doubles");
    core.handle_tick(3 * START_RETRY_BASE_MS);
    assert_eq!(actions(&mut core), vec![probe(1)]);
}

#[test]
fn restart_after_n_waits_for_the_last_permit_and_keeps_the_queue() {
    let mut core = Core::new(
        supervised(ServiceSettings {
            restart_after: Some(2),
            ..service()
        }),
        0,
    );
    let mut now = bring_up(&mut core, 0, 1, 10);
    let first = proxying(&mut core, now, 1);
    core.handle_relay_ended(now, first, finished());
    actions(&mut core);
    let second = proxying(&mut core, now, 2);
    assert_eq!(state(&core), Some(ServiceStateName::Due));
    let waiting = core.handle_accepted(now, addr(3));
    assert_eq!(actions(&mut core), vec![], "a due generation takes no one");
    now += 5;
    core.handle_relay_ended(now, second, finished());
    let acts = actions(&mut core);
    assert!(acts.contains(&signal(1, StopSignal::Term)), "{acts:?}");
    stop_done(&mut core, now, 1);
    let acts = actions(&mut core);
    assert!(acts.contains(&probe(2)), "{acts:?}");
    core.handle_service_probed(now, InstanceId(1), Generation(2), false);
    assert_eq!(
        actions(&mut core),
        vec![Action::SpawnService {
            instance: InstanceId(1),
            generation: Generation(2),
            reason: RestartReason::AfterN,
            run: ServiceRef(1),
        }]
    );
    core.handle_service_spawned(now, InstanceId(1), Generation(2), Ok(11));
    core.handle_tick(now + PROBE_INTERVAL_MS);
    actions(&mut core);
    core.handle_service_probed(now + PROBE_INTERVAL_MS, InstanceId(1), Generation(2), true);
    assert!(actions(&mut core).contains(&Action::Connect {
        conn: waiting,
        instance: InstanceId(1)
    }));
    assert_eq!(core.stats().service.restarts(RestartReason::AfterN), 1);
}

#[test]
fn a_crash_cuts_its_connections_kills_the_leftovers_and_starts_again_at_once() {
    let mut core = Core::new(supervised(service()), 0);
    let now = bring_up(&mut core, 0, 1, 10);
    let conn = proxying(&mut core, now, 1);
    let waiting = core.handle_accepted(now, addr(2));
    actions(&mut core);
    core.handle_service_exited(
        now + 1,
        InstanceId(1),
        Generation(1),
        ServiceExit::Signal(9),
    );
    let (acts, events) = drain(&mut core);
    assert!(acts.iter().any(|a| matches!(
        a,
        Action::Close { conn: c, outcome: Outcome::UpstreamError, ended_by: EndedBy::Upstream, .. } if *c == conn
    )));
    assert!(acts.contains(&signal(1, StopSignal::Kill)));
    assert!(events.contains(&Event::UpstreamExited {
        instance: InstanceId(1),
        generation: Generation(1),
        pid: 10,
        exit: ServiceExit::Signal(9),
        expected: false
    }));
    core.handle_tick(now + 1 + PROBE_INTERVAL_MS);
    assert!(actions(&mut core).contains(&Action::SampleService {
        instance: InstanceId(1),
        generation: Generation(1)
    }));
    core.handle_service_sampled(
        now + 1 + PROBE_INTERVAL_MS,
        InstanceId(1),
        Generation(1),
        ServiceSample::default(),
    );
    assert!(actions(&mut core).contains(&probe(2)));
    assert_eq!(core.state_of(waiting), Some(StateName::Queued));
}

#[test]
fn failed_starts_give_up_close_the_waiting_and_turn_newcomers_away_until_one_is_ready() {
    let mut core = Core::new(
        supervised(ServiceSettings {
            start_retries: 2,
            ..service()
        }),
        0,
    );
    actions(&mut core);
    let waiting = core.handle_accepted(0, addr(1));
    spawned(&mut core, 0, 1, Err("no such file".to_string()));
    actions(&mut core);
    core.handle_tick(START_RETRY_BASE_MS);
    actions(&mut core);
    spawned(&mut core, START_RETRY_BASE_MS, 2, Err("again".to_string()));
    let (acts, events) = drain(&mut core);
    assert!(events.contains(&Event::UpstreamFailed {
        instance: InstanceId(1),
        starts: 2,
        retry_in_ms: START_RETRY_MAX_MS
    }));
    assert!(acts.iter().any(|a| matches!(
        a,
        Action::Close { conn, outcome: Outcome::UpstreamFailed, .. } if *conn == waiting
    )));
    assert_eq!(state(&core), Some(ServiceStateName::Failed));
    let newcomer = core.handle_accepted(START_RETRY_BASE_MS + 1, addr(2));
    assert!(actions(&mut core).iter().any(|a| matches!(
        a,
        Action::Close { conn, outcome: Outcome::Rejected, .. } if *conn == newcomer
    )));
    let retry_at = START_RETRY_BASE_MS + START_RETRY_MAX_MS;
    core.handle_tick(retry_at - 1);
    assert_eq!(actions(&mut core), vec![]);
    let ready_at = bring_up_after_tick(&mut core, retry_at, 3);
    assert_eq!(state(&core), Some(ServiceStateName::Ready));
    proxying(&mut core, ready_at, 3);
}

fn bring_up_after_tick(core: &mut Core, at: u64, generation: u64) -> u64 {
    core.handle_tick(at);
    bring_up(core, at, generation, 99)
}

#[test]
fn memory_over_the_limit_makes_it_due_and_it_restarts_between_connections() {
    let mut core = Core::new(
        supervised(ServiceSettings {
            restart_rss_kib: Some(1000),
            ..service()
        }),
        0,
    );
    let now = bring_up(&mut core, 0, 1, 10);
    let conn = proxying(&mut core, now, 1);
    core.handle_service_sampled(
        now,
        InstanceId(1),
        Generation(1),
        ServiceSample {
            processes: 2,
            rss_kib: 1001,
        },
    );
    let (acts, events) = drain(&mut core);
    assert!(acts.is_empty(), "nothing stops under a client: {acts:?}");
    assert!(events.contains(&Event::RestartDue {
        instance: InstanceId(1),
        generation: Generation(1),
        reason: RestartReason::Rss,
        rss_kib: Some((1001, 1000))
    }));
    core.handle_relay_ended(now + 1, conn, finished());
    assert!(actions(&mut core).contains(&signal(1, StopSignal::Term)));
}

#[test]
fn a_ttl_expiry_cuts_the_client_then_restarts_the_service() {
    let mut core = Core::new(
        Settings {
            ttl_ms: Some(1000),
            ..supervised(service())
        },
        0,
    );
    let now = bring_up(&mut core, 0, 1, 10);
    proxying(&mut core, now, 1);
    let waiting = core.handle_accepted(now, addr(2));
    actions(&mut core);
    core.handle_tick(now + 1000);
    let acts = actions(&mut core);
    assert!(acts.iter().any(|a| matches!(
        a,
        Action::Close {
            outcome: Outcome::Timeout,
            ..
        }
    )));
    assert!(acts.contains(&signal(1, StopSignal::Term)));
    assert_eq!(core.state_of(waiting), Some(StateName::Queued));
}

#[test]
fn a_service_that_ignores_sigterm_is_killed_after_the_stop_timeout() {
    let mut core = Core::new(
        supervised(ServiceSettings {
            restart_after: Some(1),
            stop_timeout_ms: 500,
            ..service()
        }),
        0,
    );
    let now = bring_up(&mut core, 0, 1, 10);
    let conn = proxying(&mut core, now, 1);
    core.handle_relay_ended(now, conn, finished());
    actions(&mut core);
    let mut t = now;
    while t < now + 500 {
        t += PROBE_INTERVAL_MS;
        core.handle_tick(t);
        for action in actions(&mut core) {
            if let Action::SampleService {
                instance: InstanceId(1),
                generation,
            } = action
            {
                core.handle_service_sampled(
                    t,
                    InstanceId(1),
                    generation,
                    ServiceSample {
                        processes: 1,
                        rss_kib: 5,
                    },
                );
            } else if t < now + 500 {
                panic!("only looks before the stop timeout: {action:?}");
            } else {
                assert_eq!(action, signal(1, StopSignal::Kill));
            }
        }
    }
    assert_eq!(state(&core), Some(ServiceStateName::Stopping));
}

#[test]
fn an_idle_service_is_stopped_and_the_next_client_starts_it() {
    let mut core = Core::new(
        supervised(ServiceSettings {
            idle_stop_ms: Some(1000),
            ..service()
        }),
        0,
    );
    let now = bring_up(&mut core, 0, 1, 10);
    let conn = proxying(&mut core, now, 1);
    core.handle_relay_ended(now + 10, conn, finished());
    actions(&mut core);
    core.handle_tick(now + 1009);
    assert_eq!(actions(&mut core), vec![]);
    core.handle_tick(now + 1010);
    assert!(actions(&mut core).contains(&signal(1, StopSignal::Term)));
    stop_done(&mut core, now + 1020, 1);
    assert_eq!(actions(&mut core), vec![], "nobody needs it");
    assert_eq!(state(&core), Some(ServiceStateName::Stopped));
    let client = core.handle_accepted(now + 5000, addr(2));
    let ready_at = bring_up(&mut core, now + 5000, 2, 11);
    let _ = ready_at;
    assert_eq!(core.state_of(client), Some(StateName::Activating));
}

#[test]
fn shutdown_stops_the_service_after_the_connections_and_only_then_finishes() {
    let mut core = Core::new(supervised(service()), 0);
    let now = bring_up(&mut core, 0, 1, 10);
    let conn = proxying(&mut core, now, 1);
    core.handle_shutdown(now);
    let acts = actions(&mut core);
    assert!(
        !acts.iter().any(|a| matches!(
            a,
            Action::SignalService {
                instance: InstanceId(1),
                ..
            }
        )),
        "a client still uses it: {acts:?}"
    );
    core.handle_relay_ended(now + 1, conn, finished());
    let (acts, events) = drain(&mut core);
    assert!(acts.contains(&signal(1, StopSignal::Term)));
    let done = |e: &Event| matches!(e, Event::ShutdownDone { .. });
    assert!(!events.iter().any(done), "the service still runs");
    assert!(!core.is_finished());
    core.handle_service_exited(now + 2, InstanceId(1), Generation(1), ServiceExit::Code(0));
    actions(&mut core);
    core.handle_service_sampled(
        now + 2,
        InstanceId(1),
        Generation(1),
        ServiceSample::default(),
    );
    let (acts, events) = drain(&mut core);
    assert_eq!(acts, vec![], "no new generation");
    assert!(events.iter().any(done), "{events:?}");
    assert!(core.is_finished());
}

#[test]
fn a_reload_that_changes_the_command_restarts_when_drained() {
    let mut core = Core::new(supervised(service()), 0);
    let now = bring_up(&mut core, 0, 1, 10);
    let conn = proxying(&mut core, now, 1);
    core.handle_reload(
        now,
        supervised(ServiceSettings {
            run: ServiceRef(2),
            ..service()
        }),
    );
    assert_eq!(state(&core), Some(ServiceStateName::Due));
    core.handle_relay_ended(now + 1, conn, finished());
    actions(&mut core);
    stop_done(&mut core, now + 2, 1);
    actions(&mut core);
    core.handle_service_probed(now + 2, InstanceId(1), Generation(2), false);
    assert_eq!(
        actions(&mut core),
        vec![Action::SpawnService {
            instance: InstanceId(1),
            generation: Generation(2),
            reason: RestartReason::Reload,
            run: ServiceRef(2),
        }]
    );
}

#[test]
fn hooks_learn_the_generation_and_pid() {
    let mut core = Core::new(
        Settings {
            on_activate: Some(HookRef(1)),
            ..supervised(service())
        },
        0,
    );
    let now = bring_up(&mut core, 0, 1, 77);
    core.handle_accepted(now, addr(1));
    let spawn = actions(&mut core);
    let Some(request) = spawn.iter().find_map(|a| match a {
        Action::SpawnHook(request) => Some(request),
        _ => None,
    }) else {
        panic!("{spawn:?}");
    };
    assert_eq!(request.context.service, Some((Generation(1), 77)));
}

#[test]
fn a_start_that_exits_before_it_is_ready_kills_its_leftovers_and_retries() {
    let mut core = Core::new(supervised(service()), 0);
    actions(&mut core);
    spawned(&mut core, 0, 1, Ok(5));
    core.handle_service_exited(50, InstanceId(1), Generation(1), ServiceExit::Code(1));
    let (acts, events) = drain(&mut core);
    assert!(acts.contains(&signal(1, StopSignal::Kill)));
    assert!(events.iter().any(|e| matches!(
        e,
        Event::UpstreamStartFailed {
            instance: InstanceId(1),
            ..
        }
    )));
    core.handle_tick(150);
    assert_eq!(
        actions(&mut core),
        vec![Action::SampleService {
            instance: InstanceId(1),
            generation: Generation(1)
        }]
    );
    core.handle_service_sampled(150, InstanceId(1), Generation(1), ServiceSample::default());
    assert_eq!(actions(&mut core), vec![], "the retry waits its backoff");
    core.handle_tick(150 + START_RETRY_BASE_MS);
    assert_eq!(actions(&mut core), vec![probe(2)]);
}

#[test]
fn a_shutdown_with_nobody_connected_stops_the_service_at_once() {
    let mut core = Core::new(supervised(service()), 0);
    let now = bring_up(&mut core, 0, 1, 10);
    actions(&mut core);
    core.handle_shutdown(now);
    let acts = actions(&mut core);
    assert!(acts.contains(&signal(1, StopSignal::Term)), "{acts:?}");
    core.handle_shutdown(now + 1);
    assert!(
        actions(&mut core).contains(&signal(1, StopSignal::Kill)),
        "a second stop kills what is left"
    );
    stop_done(&mut core, now + 2, 1);
    assert!(core.is_finished());
}

// ----- found by the model test (src/core/model/service.rs) -----

/// Answers every sample with "nothing left" and ticks on, up to `until`;
/// returns the actions seen (samples answered).
fn tick_answering_samples(core: &mut Core, from: u64, until: u64) -> Vec<Action> {
    let mut seen = Vec::new();
    let mut now = from;
    for _ in 0..10_000 {
        let Some(next) = core.poll_timeout().filter(|t| *t <= until) else {
            break;
        };
        now = now.max(next);
        core.handle_tick(now);
        for action in actions(core) {
            if let Action::SampleService {
                instance: InstanceId(1),
                generation,
            } = action
            {
                core.handle_service_sampled(
                    now,
                    InstanceId(1),
                    generation,
                    ServiceSample::default(),
                );
                seen.extend(actions(core));
            }
            seen.push(action);
        }
    }
    seen
}

/// Model seed 0: the leader exits while the generation is starting. The
/// shell reports that exit once (its pidfd), but the stop begun by the
/// failed start waits for an exit (`exited: false`), so it never ends: the
/// service samples an empty session every 100 ms forever, no retry starts,
/// and a stopping tcplock never finishes.
#[test]
fn an_exit_before_ready_is_a_failed_start_and_the_next_one_follows() {
    let mut core = Core::new(supervised(service()), 0);
    assert!(actions(&mut core).contains(&probe(1)));
    spawned(&mut core, 0, 1, Ok(42));
    actions(&mut core);
    core.handle_service_exited(10, InstanceId(1), Generation(1), ServiceExit::Code(1));
    let _ = actions(&mut core);
    let seen = tick_answering_samples(&mut core, 10, 10 + 2 * START_RETRY_BASE_MS);
    assert!(
        seen.contains(&probe(2)),
        "no retry after the failed start; still {:?}: {:?}",
        state(&core),
        &seen[seen.len().saturating_sub(4)..]
    );
}

/// Model seed 4: a reload turns supervision off, the service stops, a later
/// reload turns it on again: the new service numbers its generations from 1
/// again, so `TCPLOCK_GENERATION` and the log's `gen=` name two different
/// runs alike, and a late answer for the old generation (a probe out when
/// supervision was turned off) is taken for the new one's.
#[test]
fn generations_never_repeat_across_supervision_turned_off_and_on() {
    let mut core = Core::new(supervised(service()), 0);
    let at = bring_up(&mut core, 0, 1, 42);
    actions(&mut core);
    core.handle_reload(
        at,
        Settings {
            service: None,
            ..supervised(service())
        },
    );
    let stop = actions(&mut core);
    assert!(stop.contains(&signal(1, StopSignal::Term)), "{stop:?}");
    stop_done(&mut core, at + 10, 1);
    actions(&mut core);
    core.handle_reload(at + 20, supervised(service()));
    let start = actions(&mut core);
    assert!(
        start.contains(&probe(2)),
        "the next start must be generation 2: {start:?}"
    );
}

/// Model seed 6: a shutdown with no client left does not look at the
/// service: it keeps running (and `is_finished()` stays false) until some
/// later input happens to settle it (the next sample, up to 5 s later; a
/// stray input, which must produce nothing, does it in the model).
#[test]
fn a_shutdown_with_nobody_left_stops_the_service_at_once() {
    let mut core = Core::new(supervised(service()), 0);
    let at = bring_up(&mut core, 0, 1, 42);
    actions(&mut core);
    core.handle_shutdown(at + 1);
    let stop = actions(&mut core);
    assert!(stop.contains(&signal(1, StopSignal::Term)), "{stop:?}");
}

/// Model seed 42: a reload turns supervision on while a client proxies to the
/// upstream run elsewhere: the new service starts (port check) under a
/// connection that uses the upstream, which the core's own invariant forbids
/// ("1 connections use a service that is starting": a debug panic).
#[test]
fn supervision_turned_on_under_a_proxying_client_keeps_the_invariants() {
    let unsupervised = Settings {
        service: None,
        ..supervised(service())
    };
    let mut core = Core::new(unsupervised.clone(), 0);
    let conn = proxying(&mut core, 0, 1);
    core.handle_reload(10, supervised(service()));
    let _ = actions(&mut core);
    core.handle_relay_ended(20, conn, finished());
    let _ = actions(&mut core);
}

/// Model seed 104: after an idle stop, a client still reading its PROXY
/// header counts as someone for `settle_service` (the service should start),
/// but `handle_accepted` does not settle it: nothing starts until some other
/// input, and an input that must be ignored (a stray sample) starts it.
#[test]
fn a_stray_answer_after_a_header_reading_newcomer_does_nothing() {
    let mut settings = supervised(ServiceSettings {
        idle_stop_ms: Some(1_000),
        ..service()
    });
    settings.proxy_header_timeout_ms = Some(60_000);
    let mut core = Core::new(settings, 0);
    let at = bring_up(&mut core, 0, 1, 42);
    actions(&mut core);
    core.handle_tick(at + 1_000);
    let stop = actions(&mut core);
    assert!(
        stop.contains(&signal(1, StopSignal::Term)),
        "idle stop: {stop:?}"
    );
    stop_done(&mut core, at + 1_010, 1);
    actions(&mut core);
    let _conn = core.handle_accepted(at + 2_000, addr(1));
    let _ = actions(&mut core);
    core.handle_service_sampled(
        at + 2_000,
        InstanceId(1),
        Generation(0),
        ServiceSample::default(),
    );
    assert_eq!(
        actions(&mut core),
        vec![],
        "a stray sample must change nothing"
    );
}

/// Accepts a client at `at` into a ready service with an on-activate hook;
/// returns the hook that runs for it.
fn hooked_client(core: &mut Core, at: u64) -> HookId {
    let _conn = core.handle_accepted(at, addr(1));
    actions(core)
        .into_iter()
        .find_map(|a| match a {
            Action::SpawnHook(request) => Some(request.hook),
            _ => None,
        })
        .expect("the on-activate hook runs")
}

/// Model seed 427: with max-queue 0, a client let straight into the free
/// permit runs its on-activate hook; a restart is asked meanwhile (the
/// generation is due); the hook succeeds, the client goes back in line with
/// `attempts: 0`, so the invariant no longer sees it as the one admitted
/// straight: "1 clients wait, more than max-queue 0" (a debug panic).
#[test]
fn a_hooked_client_requeued_for_a_due_service_stays_within_max_queue() {
    let mut settings = supervised(service());
    settings.max_queue = 0;
    settings.on_activate = Some(HookRef(1));
    let mut core = Core::new(settings, 0);
    let at = bring_up(&mut core, 0, 1, 42);
    actions(&mut core);
    let hook = hooked_client(&mut core, at);
    core.handle_service_restart(at + 1, None);
    let _ = actions(&mut core);
    core.handle_hook_exited(at + 2, hook, HookExit::Success);
    let _ = actions(&mut core);
}

/// Model seed 8770: a client whose on-activate hook runs holds a permit but
/// is neither cut by a crash nor closed by the give-up (`fail_waiting` takes
/// Queued and Header only); when its hook then fails (or succeeds: seed
/// 10913, the client is put back for the next generation), it goes back in
/// line while the service is failed: "1 clients wait for a failed service".
#[test]
fn a_client_whose_hook_ran_through_the_give_up_does_not_wait_for_a_failed_service() {
    let mut settings = supervised(ServiceSettings {
        start_retries: 1,
        ..service()
    });
    settings.on_activate = Some(HookRef(1));
    let mut core = Core::new(settings, 0);
    let at = bring_up(&mut core, 0, 1, 42);
    actions(&mut core);
    let hook = hooked_client(&mut core, at);
    // The generation crashes; nothing of it is left; the next start finds
    // the port busy, which with --start-retries 1 gives up.
    core.handle_service_exited(
        at + 1,
        InstanceId(1),
        Generation(1),
        ServiceExit::Signal(11),
    );
    actions(&mut core);
    let t = at + 1 + PROBE_INTERVAL_MS;
    core.handle_tick(t);
    assert!(actions(&mut core).contains(&Action::SampleService {
        instance: InstanceId(1),
        generation: Generation(1)
    }));
    core.handle_service_sampled(t, InstanceId(1), Generation(1), ServiceSample::default());
    assert!(actions(&mut core).contains(&probe(2)));
    core.handle_service_probed(t, InstanceId(1), Generation(2), true);
    let (_, events) = drain(&mut core);
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::UpstreamFailed {
                instance: InstanceId(1),
                ..
            }
        )),
        "{events:?}"
    );
    assert_eq!(state(&core), Some(ServiceStateName::Failed));
    core.handle_hook_exited(t + 1, hook, HookExit::Failed(1));
    let _ = actions(&mut core);
}

/// A start abandoned for a reload (or a shutdown) did not fail: it is
/// stopped with that reason, counts no failure, and the next generation
/// starts at once with the new command, without a backoff.
#[test]
fn a_start_abandoned_for_a_reload_is_stopped_not_failed() {
    let mut core = Core::new(supervised(service()), 0);
    assert!(actions(&mut core).contains(&probe(1)));
    spawned(&mut core, 0, 1, Ok(42));
    actions(&mut core);
    core.handle_reload(
        10,
        supervised(ServiceSettings {
            run: ServiceRef(2),
            ..service()
        }),
    );
    let (_, events) = drain(&mut core);
    assert!(
        events.contains(&Event::UpstreamStopping {
            instance: InstanceId(1),
            generation: Generation(1),
            reason: RestartReason::Reload
        }),
        "{events:?}"
    );
    assert!(
        !events.iter().any(|e| matches!(
            e,
            Event::UpstreamStartFailed {
                instance: InstanceId(1),
                ..
            }
        )),
        "{events:?}"
    );
    stop_done(&mut core, 20, 1);
    assert!(actions(&mut core).contains(&probe(2)));
    core.handle_service_probed(20, InstanceId(1), Generation(2), false);
    assert_eq!(
        actions(&mut core),
        vec![Action::SpawnService {
            instance: InstanceId(1),
            generation: Generation(2),
            reason: RestartReason::Reload,
            run: ServiceRef(2),
        }]
    );
}

/// Model seed 1007: a reload turns supervision on during a shutdown that
/// serves the queue. No service is made before the next start of tcplock,
/// so the line must go on to the upstream as configured, not wait for a
/// service that never comes until the grace runs out.
#[test]
fn supervision_turned_on_during_a_serving_shutdown_keeps_serving_the_queue() {
    let unsupervised = Settings {
        service: None,
        permits: 1,
        serve_queue_on_shutdown: true,
        shutdown_grace_ms: 60_000,
        ..supervised(service())
    };
    let mut core = Core::new(unsupervised.clone(), 0);
    let first = proxying(&mut core, 0, 1);
    let second = core.handle_accepted(0, addr(2));
    assert!(!actions(&mut core).contains(&Action::Connect {
        conn: second,
        instance: InstanceId(1)
    }));
    core.handle_shutdown(10);
    let _ = actions(&mut core);
    core.handle_reload(
        20,
        Settings {
            service: Some(service()),
            ..unsupervised
        },
    );
    let _ = actions(&mut core);
    core.handle_relay_ended(30, first, finished());
    let served = actions(&mut core);
    assert!(
        served.contains(&Action::Connect {
            conn: second,
            instance: InstanceId(1)
        }),
        "{served:?}"
    );
    assert_eq!(state(&core), None);
}

/// Model seed 713: supervision turned on waits for a holder, a client comes
/// meanwhile and waits, then a shutdown serving the queue begins: the service
/// will never be made, so that client goes to the upstream at once.
#[test]
fn a_serving_shutdown_during_the_turn_on_wait_serves_the_waiting_client() {
    let unsupervised = Settings {
        service: None,
        permits: 2,
        serve_queue_on_shutdown: true,
        shutdown_grace_ms: 60_000,
        ..supervised(service())
    };
    let mut core = Core::new(unsupervised.clone(), 0);
    let _first = proxying(&mut core, 0, 1);
    core.handle_reload(
        10,
        Settings {
            service: Some(service()),
            ..unsupervised
        },
    );
    let _ = actions(&mut core);
    let second = core.handle_accepted(20, addr(2));
    assert!(!actions(&mut core).contains(&Action::Connect {
        conn: second,
        instance: InstanceId(1)
    }));
    core.handle_shutdown(30);
    let served = actions(&mut core);
    assert!(
        served.contains(&Action::Connect {
            conn: second,
            instance: InstanceId(1)
        }),
        "{served:?}"
    );
}

#[test]
fn a_preparation_kept_is_not_carried_over_to_the_next_generation() {
    let mut core = Core::new(
        Settings {
            on_activate: Some(HookRef(1)),
            ..supervised(service())
        },
        0,
    );
    let now = bring_up(&mut core, 0, 1, 10);
    actions(&mut core);
    let leaving = core.handle_accepted(now, addr(1));
    let Some(hook) = core.hook_running() else {
        panic!("no on-activate hook for the first client");
    };
    actions(&mut core);
    core.handle_client_left(now, leaving);
    core.handle_hook_exited(now, hook, HookExit::Success);
    let (_, events) = drain(&mut core);
    assert!(events.contains(&Event::PreparationKept { hook }));
    // The generation it prepared is replaced.
    core.handle_service_restart(now, None);
    actions(&mut core);
    stop_done(&mut core, now, 1);
    let ready_at = bring_up(&mut core, now, 2, 11);
    actions(&mut core);
    let client = core.handle_accepted(ready_at, addr(2));
    let acts = actions(&mut core);
    assert!(
        acts.iter().any(|a| matches!(a, Action::SpawnHook(_))),
        "the new generation is prepared afresh: {acts:?}"
    );
    assert!(
        !acts.contains(&Action::Connect {
            conn: client,
            instance: InstanceId(1)
        }),
        "{acts:?}"
    );
}
