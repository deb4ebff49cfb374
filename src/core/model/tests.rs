//! The seeded model test: thousands of random scenarios, each reproducible
//! from its seed (`TCPLOCK_MODEL_SEED=...` reruns one).

use std::panic::AssertUnwindSafe;

use super::*;
use crate::core::{
    HookContext, HookRef, RestartOn, RestartReason, ServiceRef, ServiceSettings, ServiceStateName,
};

/// xorshift64*: tiny, deterministic, good enough to pick events.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn duration(&mut self) -> u64 {
        match self.below(10) {
            0..=3 => self.below(20),
            4..=6 => self.below(2_000),
            7..=8 => self.below(120_000),
            _ => self.below(6 * 3_600_000),
        }
    }

    fn limit(&mut self) -> Option<u64> {
        self.chance(60).then(|| self.duration().max(1))
    }
}

fn settings(rng: &mut Rng) -> Settings {
    Settings {
        permits: 1 + rng.below(4) as u32,
        max_queue: if rng.chance(20) {
            1024
        } else {
            rng.below(6) as usize
        },
        ttl_ms: rng.limit(),
        queue_timeout_ms: rng.limit(),
        connect_timeout_ms: rng.limit(),
        on_activate: match rng.below(3) {
            0 => None,
            1 => Some(HookRef(1)),
            _ => Some(HookRef(2)),
        },
        on_timeout: rng.chance(50).then_some(HookRef(3)),
        hook_timeout_ms: rng.limit(),
        shutdown_grace_ms: if rng.chance(20) { 0 } else { rng.duration() },
        upstreams: vec!["127.0.0.1:9".to_string()],
        drop_queued_eof: rng.chance(50),
        serve_queue_on_shutdown: rng.chance(50),
        stall_warn_ms: rng.limit(),
        proxy_header_timeout_ms: rng.chance(30).then(|| rng.duration().max(1)),
        service: rng.chance(40).then(|| service(rng)),
    }
}

/// Small values, so restarts, timeouts and give-ups happen within a run.
fn service(rng: &mut Rng) -> ServiceSettings {
    let small = |rng: &mut Rng, max: u64| rng.chance(50).then(|| 1 + rng.below(max));
    ServiceSettings {
        run: ServiceRef(rng.below(2) as u32),
        ready_timeout_ms: 1 + rng.below(1_000),
        restart_after: small(rng, 4),
        restart_rss_kib: small(rng, 5_000),
        max_lifetime_ms: small(rng, 20_000),
        restart_on: RestartOn {
            timeout: rng.chance(50),
            connect_failed: rng.chance(50),
            upstream_error: rng.chance(50),
        },
        idle_stop_ms: small(rng, 5_000),
        stop_timeout_ms: 1 + rng.below(3_000),
        start_retries: rng.below(4) as u32,
    }
}

fn mood(rng: &mut Rng) -> Mood {
    Mood {
        spawn_fails: rng.chance(15),
        listens_after: (!rng.chance(15)).then(|| rng.below(600)),
        term_exit_after: (!rng.chance(20)).then(|| rng.below(1_500)),
        children: rng.below(3) as u8,
        rss_kib: rng.below(3_000),
        late_probes: rng.chance(40),
    }
}

fn service_op(rng: &mut Rng) -> Op {
    match rng.below(10) {
        0..=2 => Op::AnswerProbe,
        3 => Op::ServiceCrash(if rng.chance(50) {
            ServiceExit::Code(1)
        } else {
            ServiceExit::Signal(11)
        }),
        4..=5 => Op::Mood(mood(rng)),
        6 => Op::PortTaken(rng.below(3_000)),
        7 => Op::ServiceRestart,
        8 => Op::StrayService(
            rng.byte(),
            match rng.below(4) {
                0 => StrayService::Probed(rng.chance(50)),
                1 => StrayService::Spawned,
                2 => StrayService::Exited,
                _ => StrayService::Sampled,
            },
        ),
        _ => Op::Advance(rng.below(300)),
    }
}

fn hook_exit(rng: &mut Rng) -> HookExit {
    match rng.below(20) {
        0..=11 => HookExit::Success,
        12 | 13 => HookExit::Failed(1 + rng.below(3) as i32),
        14 | 15 => HookExit::Signaled(9),
        16 => HookExit::SpawnFailed("no such file".to_string()),
        17 => HookExit::Declined,
        18 => HookExit::Dropped,
        _ => HookExit::Abandoned,
    }
}

fn relay_end(rng: &mut Rng) -> RelayEnd {
    let cause = match rng.below(4) {
        0 => RelayCause::Finished,
        1 => RelayCause::ClientError,
        2 => RelayCause::UpstreamError,
        _ => RelayCause::RelayError,
    };
    let ended_by = match rng.below(3) {
        0 => EndedBy::Client,
        1 => EndedBy::Upstream,
        _ => EndedBy::Tcplock,
    };
    RelayEnd { cause, ended_by }
}

fn op(rng: &mut Rng, supervised: bool) -> Op {
    if supervised && rng.chance(25) {
        return service_op(rng);
    }
    match rng.below(100) {
        0..=19 => Op::Accept,
        20..=23 => Op::ClientLeft(rng.byte()),
        24..=25 => Op::ClientEof(rng.byte()),
        26..=33 => Op::UpstreamConnected(rng.byte()),
        34..=36 => Op::ConnectAttempt(rng.byte(), rng.byte() % 4),
        37..=40 => Op::UpstreamFailed(rng.byte()),
        41..=50 => Op::RelayEnded(rng.byte(), relay_end(rng)),
        51..=60 => Op::HookExited(hook_exit(rng)),
        61..=70 => Op::Advance(rng.duration()),
        71..=72 => Op::AcceptPaused,
        73..=75 => Op::Tick,
        76..=84 => Op::Wake,
        85..=87 => Op::Reload(Box::new(settings(rng))),
        88 => {
            if rng.chance(50) {
                Op::DumpState
            } else {
                Op::HoldersIdle(rng.duration())
            }
        }
        89 => {
            if rng.chance(50) {
                Op::Shutdown
            } else {
                Op::Wake
            }
        }
        94 => match rng.below(3) {
            0 => Op::Pause,
            1 => Op::Resume,
            _ => Op::Kill(rng.byte()),
        },
        90..=93 => Op::ProxyHeader(
            rng.byte(),
            match rng.below(4) {
                0 => ProxyHeader::Local,
                1 => ProxyHeader::Bad,
                _ => ProxyHeader::Client(client_addr(0)),
            },
        ),
        _ => {
            let input = match rng.below(7) {
                0 => StrayInput::ClientLeft,
                1 => StrayInput::UpstreamConnected,
                2 => StrayInput::UpstreamFailed,
                3 => StrayInput::RelayEnded(relay_end(rng)),
                4 => StrayInput::ClientEof,
                5 => StrayInput::ProxyHeader,
                _ => StrayInput::HookExited,
            };
            Op::Stray(rng.byte(), input)
        }
    }
}

fn scenario(seed: u64) -> (Settings, Vec<Op>) {
    let mut rng = Rng::new(seed);
    let initial = settings(&mut rng);
    let len = 10 + rng.below(250) as usize;
    // Some service ops in unsupervised runs too: they must change nothing.
    let supervised = initial.service.is_some() || rng.chance(10);
    let ops = (0..len).map(|_| op(&mut rng, supervised)).collect();
    (initial, ops)
}

/// Runs one seed of a random scenario; on a failure (or a panic in the
/// core, replayed with its trace) panics naming the seed and the variable
/// that reruns it alone.
fn check_seed(label: &str, seed_var: &str, scenario: fn(u64) -> (Settings, Vec<Op>), seed: u64) {
    let (initial, ops) = scenario(seed);
    let fast = std::panic::catch_unwind(AssertUnwindSafe(|| run(initial.clone(), &ops)));
    let result = match fast {
        Ok(result) => result,
        // A panic inside the core: the replay prints the trace up to it
        // and panics again.
        Err(_) => {
            eprintln!(
                "{label} panicked for seed {seed} \
                 (rerun: {seed_var}={seed} cargo test core::model)"
            );
            run_traced(initial, &ops)
        }
    };
    if let Err(failure) = result {
        panic!(
            "{label} failed for seed {seed} \
             (rerun: {seed_var}={seed} cargo test core::model)\n{failure}"
        );
    }
}

/// The seed named by `seed_var` alone, or seeds 0..TCPLOCK_MODEL_RUNS
/// (3,000 unless set).
fn check_seeds(label: &str, seed_var: &str, scenario: fn(u64) -> (Settings, Vec<Op>)) {
    if let Some(seed) = std::env::var(seed_var).ok().and_then(|s| s.parse().ok()) {
        return check_seed(label, seed_var, scenario, seed);
    }
    let count: u64 = std::env::var("TCPLOCK_MODEL_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3_000);
    for seed in 0..count {
        check_seed(label, seed_var, scenario, seed);
    }
}

#[test]
fn random_event_sequences_keep_every_invariant() {
    check_seeds("model test", "TCPLOCK_MODEL_SEED", scenario);
}

#[test]
fn the_checker_rejects_actions_the_core_must_never_emit() {
    let mut model = Model::new(Settings::default(), true);
    model.step(&Op::Accept).expect("accept");
    let conn = model.conns.values().next().expect("live").conn;
    let mut fed = Fed::default();
    let again = model.apply(
        &Action::Connect {
            conn,
            instance: InstanceId(1),
        },
        &mut fed,
    );
    assert!(
        again
            .expect_err("connecting twice")
            .contains("Connect for conn 1 in state")
    );
    let relay = model.apply(&Action::StartRelay(conn), &mut fed);
    assert!(
        relay
            .expect_err("not connected")
            .contains("did not connect")
    );
    let close = Action::Close {
        conn,
        outcome: Outcome::Ok,
        ended_by: EndedBy::Client,
        age_ms: 0,
    };
    assert!(
        model.apply(&close, &mut fed).is_err(),
        "an Ok close before proxying"
    );
    let kill = model.apply(&Action::KillHook(HookId(7)), &mut fed);
    assert!(kill.expect_err("no hook").contains("not running"));
    let failure = model.fail("synthetic");
    assert!(failure.to_string().contains("= conn 1"));
}

/// Found by the fuzzer: a shutdown serving the queue retries a failing
/// on-activate hook until its (days long) grace runs out; winding down must
/// not take a step per retry.
#[test]
fn winding_down_a_serving_shutdown_with_a_long_grace_finishes() {
    let settings = Settings {
        on_activate: Some(HookRef(2)),
        shutdown_grace_ms: 417_600_000,
        serve_queue_on_shutdown: true,
        stall_warn_ms: None,
        upstreams: vec!["127.0.0.1:9".to_string()],
        ..Settings::default()
    };
    let mut ops = vec![Op::Accept, Op::Accept, Op::Shutdown];
    for _ in 0..20 {
        ops.push(Op::HookExited(HookExit::Signaled(9)));
        ops.push(Op::Wake);
    }
    if let Err(failure) = run(settings, &ops) {
        panic!("{failure}");
    }
}

/// Found by the fuzzer: a ready service is sampled every 5 s, so winding
/// down a serving shutdown with a grace of days, a client still connecting,
/// must not take a step per sample.
#[test]
fn winding_down_a_supervised_shutdown_with_a_long_grace_finishes() {
    let settings = Settings {
        on_activate: Some(HookRef(1)),
        connect_timeout_ms: None,
        shutdown_grace_ms: 417_600_000,
        serve_queue_on_shutdown: true,
        stall_warn_ms: None,
        upstreams: vec!["127.0.0.1:9".to_string()],
        service: Some(ServiceSettings {
            run: ServiceRef(1),
            ..ServiceSettings::default()
        }),
        ..Settings::default()
    };
    let ops = vec![Op::Accept, Op::Shutdown];
    if let Err(failure) = run(settings, &ops) {
        panic!("{failure}");
    }
}

/// Found by the fuzzer: a stopping service is looked at every 100 ms, so
/// winding down a service that ignores SIGTERM, with a stop timeout of hours,
/// must not take a step per look.
#[test]
fn winding_down_a_service_that_ignores_sigterm_with_a_long_stop_timeout_finishes() {
    let settings = Settings {
        upstreams: vec!["127.0.0.1:9".to_string()],
        service: Some(ServiceSettings {
            run: ServiceRef(1),
            stop_timeout_ms: 24_415_000,
            ..ServiceSettings::default()
        }),
        ..Settings::default()
    };
    let ignores_term = Mood {
        term_exit_after: None,
        ..Mood::default()
    };
    let ops = vec![Op::Mood(ignores_term), Op::Shutdown];
    if let Err(failure) = run(settings, &ops) {
        panic!("{failure}");
    }
}

/// Was masked for the lead's finding: a client whose on-activate hook runs
/// through the give-up goes back in line when its hook ends, failed or
/// successful, and is closed as `UpstreamFailed` rather than left waiting
/// for a failed service.
#[test]
fn a_hook_that_ends_after_the_give_up_closes_its_client() {
    for exit in [HookExit::Failed(1), HookExit::Success] {
        let settings = Settings {
            on_activate: Some(HookRef(1)),
            stall_warn_ms: None,
            upstreams: vec!["127.0.0.1:9".to_string()],
            service: Some(ServiceSettings {
                run: ServiceRef(1),
                start_retries: 1,
                ..ServiceSettings::default()
            }),
            ..Settings::default()
        };
        let ops = vec![
            Op::Wake,
            Op::Accept,
            Op::ServiceCrash(ServiceExit::Signal(11)),
            Op::PortTaken(1_000_000),
            Op::Wake,
            Op::Wake,
            Op::HookExited(exit),
        ];
        match run_traced(settings, &ops) {
            Ok(()) => {}
            Err(failure) => panic!("{failure}"),
        }
    }
}

// ----- pools (see `pool.rs`) -----

/// `min` to [`pool::MAX_INSTANCES`] distinct names, in a random order.
fn pool_list(rng: &mut Rng, min: usize) -> Vec<String> {
    let k = min + rng.below((pool::MAX_INSTANCES - min + 1) as u64) as usize;
    let mut names: Vec<&str> = pool::NAMES.to_vec();
    let mut list = Vec::new();
    while list.len() < k {
        let name = names.remove(rng.below(names.len() as u64) as usize);
        list.push(name.to_string());
    }
    list
}

fn pool_settings(rng: &mut Rng) -> Settings {
    let mut s = settings(rng);
    s.upstreams = pool_list(rng, 2);
    if rng.chance(50) {
        // A calm pool: no short deadline cuts the traffic short, so the
        // line and the permits of every instance fill up.
        s.max_queue = 1024;
        s.queue_timeout_ms = None;
        s.connect_timeout_ms = rng.chance(50).then_some(60_000);
        s.hook_timeout_ms = None;
        s.ttl_ms = rng.chance(50).then_some(600_000);
        s.stall_warn_ms = None;
    }
    s
}

/// A mood in which generations come up (most of the time in a pool run).
fn good_mood(rng: &mut Rng) -> Mood {
    Mood {
        spawn_fails: false,
        listens_after: Some(rng.below(300)),
        term_exit_after: Some(rng.below(200)),
        ..mood(rng)
    }
}

/// The traffic that makes a pool busy: clients arriving, connecting and
/// finishing, hooks mostly succeeding, time passing in small steps.
fn pool_traffic(rng: &mut Rng) -> Op {
    match rng.below(100) {
        0..=24 => Op::Accept,
        25..=39 => Op::UpstreamConnected(rng.byte()),
        40..=51 => Op::RelayEnded(rng.byte(), relay_end(rng)),
        52..=61 => Op::HookExited(if rng.chance(80) {
            HookExit::Success
        } else {
            hook_exit(rng)
        }),
        62..=65 => Op::UpstreamFailed(rng.byte()),
        66..=75 => Op::Advance(rng.below(500)),
        76..=85 => Op::Wake,
        86..=88 => Op::ClientLeft(rng.byte()),
        89..=90 => Op::InstanceRestart(rng.byte() % 6),
        91 => Op::InstanceCrash(rng.byte(), ServiceExit::Code(1)),
        92 => Op::InstanceMood(rng.byte(), good_mood(rng)),
        93 => Op::Reload(Box::new(Settings {
            upstreams: pool_list(rng, 1),
            ..settings(rng)
        })),
        94 => Op::Pause,
        95 => Op::Resume,
        _ => Op::Tick,
    }
}

fn pool_op(rng: &mut Rng, supervised: bool) -> Op {
    if rng.chance(60) {
        return pool_traffic(rng);
    }
    if rng.chance(10) {
        return match rng.below(5) {
            0 => Op::InstanceCrash(
                rng.byte(),
                if rng.chance(50) {
                    ServiceExit::Code(1)
                } else {
                    ServiceExit::Signal(11)
                },
            ),
            1 => Op::InstanceRestart(rng.byte() % 6),
            2 => Op::InstanceMood(rng.byte(), mood(rng)),
            _ => Op::HookExited(hook_exit(rng)),
        };
    }
    match op(rng, supervised) {
        Op::Reload(mut s) => {
            s.upstreams = pool_list(rng, 1);
            Op::Reload(s)
        }
        other => other,
    }
}

fn pool_scenario(seed: u64) -> (Settings, Vec<Op>) {
    let mut rng = Rng::new(seed ^ 0x5EED_9001);
    let mut initial = pool_settings(&mut rng);
    if rng.chance(20) {
        initial.service = Some(service(&mut rng));
    }
    let len = 10 + rng.below(250) as usize;
    let supervised = initial.service.is_some();
    let mut ops = Vec::with_capacity(len + 1);
    if supervised && rng.chance(80) {
        // Most pools start with instances that come up.
        ops.push(Op::Mood(good_mood(&mut rng)));
    }
    ops.extend((0..len).map(|_| pool_op(&mut rng, supervised)));
    (initial, ops)
}

#[test]
fn random_pool_sequences_keep_every_invariant() {
    check_seeds("pool model test", "TCPLOCK_MODEL_POOL_SEED", pool_scenario);
}

// ----- pools: scenarios -----

fn pool_of(names: &[&str], base: Settings) -> Settings {
    Settings {
        upstreams: names.iter().map(|n| n.to_string()).collect(),
        proxy_header_timeout_ms: None,
        ..base
    }
}

fn plain() -> Settings {
    Settings {
        connect_timeout_ms: None,
        stall_warn_ms: None,
        ..Settings::default()
    }
}

fn supervised(names: &[&str]) -> Settings {
    pool_of(
        names,
        Settings {
            service: Some(ServiceSettings::default()),
            ..plain()
        },
    )
}

const A: &str = "10.0.0.1:8100";
const B: &str = "10.0.0.1:8101";
const C: &str = "10.0.0.2:8100";

fn steps(model: &mut pool::PoolModel, ops: &[Op]) {
    for op in ops {
        if let Err(failure) = model.step(op) {
            panic!("{failure}");
        }
    }
}

fn active_per_instance(model: &pool::PoolModel) -> Vec<(u32, usize)> {
    model
        .core
        .stats()
        .instances
        .iter()
        .map(|i| (i.id, i.active))
        .collect()
}

/// Wakes until every live instance of a supervised pool is ready (bounded).
/// Each instance's service generation, by instance.
fn generations(model: &pool::PoolModel) -> Vec<u64> {
    model
        .core
        .stats()
        .instances
        .iter()
        .map(|i| i.service.generation)
        .collect()
}

fn until_ready(model: &mut pool::PoolModel) {
    for _ in 0..100 {
        let stats = model.core.stats();
        if stats
            .instances
            .iter()
            .filter(|i| !i.removed)
            .all(|i| i.service.state == Some(ServiceStateName::Ready))
        {
            return;
        }
        steps(model, &[Op::Wake]);
    }
    panic!(
        "the pool never got ready: {:?}",
        model.core.stats().instances
    );
}

#[test]
fn a_pool_serves_one_client_per_instance_at_once_in_accept_order() {
    let mut model = pool::PoolModel::new(pool_of(&[A, B, C], plain()), true);
    model.begin().unwrap();
    steps(
        &mut model,
        &[Op::Accept, Op::Accept, Op::Accept, Op::Accept],
    );
    assert_eq!(active_per_instance(&model), vec![(1, 1), (2, 1), (3, 1)]);
    assert_eq!(model.core.queue_len(), 1, "the fourth waits");
    // The first connects and finishes: its instance takes the fourth.
    steps(
        &mut model,
        &[
            Op::UpstreamConnected(0),
            Op::RelayEnded(
                0,
                RelayEnd {
                    cause: RelayCause::Finished,
                    ended_by: EndedBy::Client,
                },
            ),
        ],
    );
    assert_eq!(model.core.queue_len(), 0);
    assert_eq!(model.core.active(), 3);
    model.wind_down().unwrap();
}

#[test]
fn hooks_of_different_instances_run_at_once_and_a_failed_one_moves_its_client() {
    let settings = pool_of(
        &[A, B],
        Settings {
            on_activate: Some(HookRef(1)),
            ..plain()
        },
    );
    let mut model = pool::PoolModel::new(settings, true);
    model.begin().unwrap();
    steps(&mut model, &[Op::Accept, Op::Accept, Op::Accept]);
    assert_eq!(model.live_hooks(), 2, "one hook per instance, both at once");
    assert_eq!(model.core.queue_len(), 1);
    // One hook fails: its instance backs off and its client goes back to
    // the head, ahead of the third.
    steps(&mut model, &[Op::HookExited(HookExit::Failed(1))]);
    assert_eq!(model.core.queue_len(), 2);
    // The other instance's hook succeeds and its client proxies; once it is
    // done, that instance takes the head (the client whose hook failed).
    steps(
        &mut model,
        &[
            Op::HookExited(HookExit::Success),
            Op::UpstreamConnected(0),
            Op::RelayEnded(
                0,
                RelayEnd {
                    cause: RelayCause::Finished,
                    ended_by: EndedBy::Upstream,
                },
            ),
        ],
    );
    assert_eq!(
        model.live_hooks(),
        1,
        "the free instance runs its hook for the head"
    );
    model.wind_down().unwrap();
}

#[test]
fn a_refusing_instance_cools_down_and_its_client_tries_the_next() {
    let mut model = pool::PoolModel::new(pool_of(&[A, B, C], plain()), true);
    model.begin().unwrap();
    steps(&mut model, &[Op::Accept, Op::UpstreamFailed(0)]);
    let stats = model.core.stats();
    let cooling: Vec<u32> = stats
        .instances
        .iter()
        .filter(|i| i.cooling_down)
        .map(|i| i.id)
        .collect();
    assert_eq!(cooling, vec![1]);
    assert_eq!(active_per_instance(&model), vec![(1, 0), (2, 1), (3, 0)]);
    // Two more refusals: after min(3, K) = 3 instances it ends.
    steps(&mut model, &[Op::UpstreamFailed(0), Op::UpstreamFailed(0)]);
    assert_eq!(model.core.stats().count(Outcome::ConnectFailed), 1);
    // Once the cool-downs end, the pool serves again.
    steps(&mut model, &[Op::Advance(30_000), Op::Accept]);
    assert_eq!(model.core.active(), 1);
    model.wind_down().unwrap();
}

#[test]
fn a_rolling_restart_takes_one_instance_out_at_a_time() {
    let mut model = pool::PoolModel::new(supervised(&[A, B, C]), true);
    model.begin().unwrap();
    until_ready(&mut model);
    let before = generations(&model);
    // The checker fails the run if two are out at once.
    steps(&mut model, &[Op::InstanceRestart(0)]);
    until_ready(&mut model);
    for _ in 0..20 {
        steps(&mut model, &[Op::Wake]);
    }
    until_ready(&mut model);
    let after = generations(&model);
    for (b, a) in before.iter().zip(&after) {
        assert!(a > b, "every instance restarted: {before:?} -> {after:?}");
    }
    let restarts: u64 = model
        .core
        .stats()
        .instances
        .iter()
        .map(|i| i.service.restarts(RestartReason::Control))
        .sum();
    assert_eq!(restarts, 3);
    model.wind_down().unwrap();
}

#[test]
fn a_crashed_instance_restarts_alone_while_the_others_serve() {
    let mut model = pool::PoolModel::new(supervised(&[A, B, C]), true);
    model.begin().unwrap();
    until_ready(&mut model);
    let before = generations(&model);
    steps(
        &mut model,
        &[
            Op::InstanceCrash(1, ServiceExit::Signal(11)),
            Op::Accept,
            Op::Accept,
        ],
    );
    assert_eq!(
        model.core.active(),
        2,
        "the other two instances serve at once"
    );
    until_ready(&mut model);
    let after = generations(&model);
    assert_eq!(after[0], before[0]);
    assert!(after[1] > before[1]);
    assert_eq!(after[2], before[2]);
    model.wind_down().unwrap();
}

#[test]
fn a_reload_adds_and_removes_instances_by_name() {
    let mut model = pool::PoolModel::new(pool_of(&[A, B], plain()), true);
    model.begin().unwrap();
    // A client holds instance 1 (A) when the reload removes A.
    steps(&mut model, &[Op::Accept, Op::UpstreamConnected(0)]);
    steps(
        &mut model,
        &[Op::Reload(Box::new(pool_of(&[B, C], plain())))],
    );
    let names = |model: &pool::PoolModel| -> Vec<(u32, String, bool)> {
        model
            .core
            .stats()
            .instances
            .iter()
            .map(|i| (i.id, i.upstream.clone(), i.removed))
            .collect()
    };
    assert_eq!(
        names(&model),
        vec![
            (1, A.to_string(), true),
            (2, B.to_string(), false),
            (3, C.to_string(), false)
        ]
    );
    // New clients go to B and C only; A drains, then its number is free.
    steps(&mut model, &[Op::Accept, Op::Accept, Op::Accept]);
    assert_eq!(active_per_instance(&model), vec![(1, 1), (2, 1), (3, 1)]);
    steps(
        &mut model,
        &[Op::RelayEnded(
            0,
            RelayEnd {
                cause: RelayCause::Finished,
                ended_by: EndedBy::Client,
            },
        )],
    );
    assert!(
        names(&model).iter().all(|(id, _, _)| *id != 1),
        "{:?}",
        names(&model)
    );
    model.wind_down().unwrap();
}

#[test]
fn the_pool_checker_rejects_actions_the_core_must_never_emit() {
    let hooked = pool_of(
        &[A, B],
        Settings {
            on_activate: Some(HookRef(1)),
            ..plain()
        },
    );
    // A second hook for an instance whose hook runs.
    let mut model = pool::PoolModel::new(hooked.clone(), false);
    model.begin().unwrap();
    steps(&mut model, &[Op::Accept, Op::Accept, Op::Accept]);
    let third = model.conn(2).unwrap();
    let request = |instance| {
        Action::SpawnHook(HookRequest {
            hook: HookId(99),
            run: HookRef(1),
            context: HookContext {
                kind: HookKind::Activate,
                conn: third.id(),
                client: client_addr(2),
                instance: InstanceId(instance),
                upstream: [A, B][instance as usize - 1].to_string(),
                activations: 0,
                timeouts: 0,
                last_outcome: None,
                last_ended_by: None,
                queue_length: 0,
                active: 0,
                attempt: 1,
                service: None,
            },
        })
    };
    let err = model.judge(request(1)).unwrap_err();
    assert!(err.contains("while its hook"), "{err}");
    // More holders than permits (and out of line) on a free pool.
    let mut model = pool::PoolModel::new(pool_of(&[A, B], plain()), false);
    model.begin().unwrap();
    steps(&mut model, &[Op::Accept, Op::Accept, Op::Accept]);
    let third = model.conn(2).unwrap();
    let err = model
        .judge(Action::Connect {
            conn: third,
            instance: InstanceId(1),
        })
        .unwrap_err();
    assert!(err.contains("holders"), "{err}");
    // FIFO: a later client activated while an earlier one waits.
    steps(&mut model, &[Op::Accept]);
    let fourth = model.conn(3).unwrap();
    steps(
        &mut model,
        &[
            Op::UpstreamConnected(0),
            Op::RelayEnded(
                0,
                RelayEnd {
                    cause: RelayCause::Finished,
                    ended_by: EndedBy::Client,
                },
            ),
        ],
    );
    let err = model
        .judge(Action::Connect {
            conn: fourth,
            instance: InstanceId(2),
        })
        .unwrap_err();
    assert!(err.contains("FIFO") || err.contains("holders"), "{err}");
    // A cooling instance, and a removed one: the second client waits
    // while the first, refused by instance 1, connects to instance 2.
    let mut model = pool::PoolModel::new(pool_of(&[A, B], plain()), false);
    model.begin().unwrap();
    steps(&mut model, &[Op::Accept, Op::UpstreamFailed(0), Op::Accept]);
    assert_eq!(model.core.queue_len(), 1);
    let second = model.conn(1).unwrap();
    let to_one = Action::Connect {
        conn: second,
        instance: InstanceId(1),
    };
    let err = model.judge(to_one.clone()).unwrap_err();
    assert!(err.contains("cools down"), "{err}");
    steps(&mut model, &[Op::Reload(Box::new(pool_of(&[B], plain())))]);
    assert_eq!(model.core.queue_len(), 1);
    let err = model.judge(to_one).unwrap_err();
    // Idle and with nothing left of it, the removed instance is gone at once.
    assert!(
        err.contains("removed") || err.contains("not in the pool"),
        "{err}"
    );
}
