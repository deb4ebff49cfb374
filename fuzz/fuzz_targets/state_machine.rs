//! Drives the core with an arbitrary sequence of events through the model
//! checker of `tcplock::internals::core::model`, which panics on the first broken invariant.
//!
//! `cargo +nightly fuzz run state_machine` from the repository root (or
//! `cargo fuzz run state_machine` in `fuzz/`, which pins nightly). Replay a crash
//! with `TCPLOCK_MODEL_TRACE=1 cargo +nightly fuzz run state_machine
//! fuzz/artifacts/state_machine/crash-...`, print its events with
//! `cargo +nightly fuzz fmt state_machine fuzz/artifacts/state_machine/crash-...`.

#![no_main]

use std::sync::LazyLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tcplock::internals::core::model::{self, Mood, Op, POOL_NAMES, StrayInput, StrayService};
use tcplock::internals::core::{
    EndedBy, HookExit, HookRef, ProxyHeader, RelayCause, RelayEnd, RestartOn, ServiceExit,
    ServiceRef, ServiceSettings, Settings,
};

/// Longer inputs add little the fuzzer cannot reach by shorter ones, and cost time.
const MAX_OPS: usize = 400;

#[derive(Arbitrary, Debug)]
struct Input {
    initial: Knobs,
    ops: Vec<Event>,
    /// How many instances (1 + this modulo 4): one runs the exact
    /// single-upstream model, more the pool model. Reloads draw their lists
    /// from their own `Knobs::pool`.
    instances: u8,
}

#[derive(Arbitrary, Debug)]
enum Event {
    Accept,
    ClientLeft(u8),
    UpstreamConnected(u8),
    UpstreamFailed(u8),
    ConnectAttempt(u8, u8),
    RelayEnded(u8, End),
    HookExited(Exit),
    Advance(Span),
    Tick,
    Wake,
    Reload(Knobs),
    AcceptPaused,
    DumpState,
    Shutdown,
    Stray(u8, Stray),
    ClientEof(u8),
    HoldersIdle(Span),
    ProxyHeader(u8, Header),
    Pause,
    Resume,
    Kill(u8),
    // The supervised upstream: the fake shell's answers and moods.
    AnswerProbe,
    AnswerSpawn,
    AnswerSample,
    ReportExit,
    /// The live generation's leader crashes: exit code, or killed by SIGSEGV.
    ServiceCrash(bool),
    Mood(MoodKnobs),
    PortTaken(Span),
    ServiceRestart,
    StrayService(u8, StraySvc),
    // A pool: one instance's leader crashes, one instance (0: all) is
    // restarted, one instance's generations behave so.
    InstanceCrash(u8, bool),
    InstanceRestart(u8),
    InstanceMood(u8, MoodKnobs),
}

/// How the fake shell and the generations it spawns behave.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct MoodKnobs {
    spawn_fails: bool,
    listens_after: Option<Span>,
    term_exit_after: Option<Span>,
    children: u8,
    rss_kib: u16,
    late_probes: bool,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum StraySvc {
    Probed(bool),
    Spawned,
    Exited,
    Sampled,
}

/// `--spawn` and its policies (small values, so things happen).
#[derive(Arbitrary, Debug, Clone, Copy)]
struct ServiceKnobs {
    /// Which command and address: a reload to another one restarts it.
    run: bool,
    ready_timeout: Span,
    restart_after: Option<u8>,
    restart_rss_kib: Option<u16>,
    max_lifetime: Option<Span>,
    restart_on_timeout: bool,
    restart_on_connect_failed: bool,
    restart_on_upstream_error: bool,
    idle_stop: Option<Span>,
    stop_timeout: Span,
    start_retries: u8,
}

/// What an `--accept-proxy` client's header turned out to be.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Header {
    Client,
    Local,
    Bad,
}

/// A duration in one of a few ranges, so small steps and hour-long jumps are
/// both easy to reach.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Span {
    Ms(u8),
    Seconds(u16),
    Hours(u8),
}

#[derive(Arbitrary, Debug)]
struct Knobs {
    permits: u8,
    max_queue: u8,
    ttl: Option<Span>,
    queue_timeout: Option<Span>,
    connect_timeout: Option<Span>,
    /// 0: none, 1 and 2: two different commands (a reload between them drops a
    /// kept preparation).
    on_activate: u8,
    on_timeout: bool,
    hook_timeout: Option<Span>,
    shutdown_grace: Span,
    drop_queued_eof: bool,
    serve_queue_on_shutdown: bool,
    stall_warn: Option<Span>,
    /// `--accept-proxy`'s header timeout (fixed at start: a reload keeps the
    /// initial one).
    proxy_header: Option<Span>,
    /// `--spawn`: tcplock supervises the upstream.
    service: Option<ServiceKnobs>,
    /// A reload's list in a pool run: a bit per name of `model::pool::NAMES`
    /// (at most four are kept; none: the first).
    pool: u8,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct End {
    cause: Cause,
    by: By,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Cause {
    Finished,
    ClientError,
    UpstreamError,
    RelayError,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum By {
    Client,
    Upstream,
    Tcplock,
}

#[derive(Arbitrary, Debug)]
enum Exit {
    Success,
    Failed(i8),
    Signaled(u8),
    SpawnFailed,
    Declined,
    Dropped,
    Abandoned,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Stray {
    ClientLeft,
    UpstreamConnected,
    UpstreamFailed,
    RelayEnded(End),
    HookExited,
    ClientEof,
    ProxyHeader,
}

impl Span {
    fn ms(self) -> u64 {
        match self {
            Span::Ms(n) => u64::from(n),
            Span::Seconds(n) => u64::from(n) * 1_000,
            Span::Hours(n) => u64::from(n) * 3_600_000,
        }
    }
}

impl End {
    fn relay_end(self) -> RelayEnd {
        let cause = match self.cause {
            Cause::Finished => RelayCause::Finished,
            Cause::ClientError => RelayCause::ClientError,
            Cause::UpstreamError => RelayCause::UpstreamError,
            Cause::RelayError => RelayCause::RelayError,
        };
        let ended_by = match self.by {
            By::Client => EndedBy::Client,
            By::Upstream => EndedBy::Upstream,
            By::Tcplock => EndedBy::Tcplock,
        };
        RelayEnd { cause, ended_by }
    }
}

impl Knobs {
    /// The instances a reload lists in a pool run.
    fn pool_list(&self) -> Vec<String> {
        POOL_NAMES
            .iter()
            .enumerate()
            .filter(|(i, _)| self.pool & (1 << i) != 0)
            .map(|(_, name)| name.to_string())
            .collect()
    }

    /// `model::run` sanitizes further (permits >= 1, zero durations = none).
    fn settings(&self) -> Settings {
        let hook = match self.on_activate % 3 {
            0 => None,
            1 => Some(HookRef(1)),
            _ => Some(HookRef(2)),
        };
        Settings {
            permits: u32::from(self.permits % 8),
            max_queue: usize::from(self.max_queue % 16),
            ttl_ms: self.ttl.map(Span::ms),
            queue_timeout_ms: self.queue_timeout.map(Span::ms),
            connect_timeout_ms: self.connect_timeout.map(Span::ms),
            on_activate: hook,
            on_timeout: self.on_timeout.then(|| HookRef(3)),
            hook_timeout_ms: self.hook_timeout.map(Span::ms),
            shutdown_grace_ms: self.shutdown_grace.ms(),
            upstreams: vec!["127.0.0.1:9".to_string()],
            drop_queued_eof: self.drop_queued_eof,
            serve_queue_on_shutdown: self.serve_queue_on_shutdown,
            stall_warn_ms: self.stall_warn.map(Span::ms),
            proxy_header_timeout_ms: self.proxy_header.map(Span::ms),
            service: self.service.map(|s| ServiceSettings {
                run: ServiceRef(u32::from(s.run)),
                ready_timeout_ms: s.ready_timeout.ms(),
                restart_after: s.restart_after.map(u64::from),
                restart_rss_kib: s.restart_rss_kib.map(u64::from),
                max_lifetime_ms: s.max_lifetime.map(Span::ms),
                restart_on: RestartOn {
                    timeout: s.restart_on_timeout,
                    connect_failed: s.restart_on_connect_failed,
                    upstream_error: s.restart_on_upstream_error,
                },
                idle_stop_ms: s.idle_stop.map(Span::ms),
                stop_timeout_ms: s.stop_timeout.ms(),
                start_retries: u32::from(s.start_retries % 8),
            }),
        }
    }
}

impl Event {
    fn op(&self, pool: bool) -> Op {
        match self {
            Event::Accept => Op::Accept,
            Event::ClientLeft(i) => Op::ClientLeft(*i),
            Event::ClientEof(i) => Op::ClientEof(*i),
            Event::ProxyHeader(i, header) => Op::ProxyHeader(
                *i,
                match header {
                    // The model names the client itself.
                    Header::Client => ProxyHeader::Client(([192, 0, 2, 1], 1).into()),
                    Header::Local => ProxyHeader::Local,
                    Header::Bad => ProxyHeader::Bad,
                },
            ),
            Event::UpstreamConnected(i) => Op::UpstreamConnected(*i),
            Event::UpstreamFailed(i) => Op::UpstreamFailed(*i),
            Event::ConnectAttempt(i, left) => Op::ConnectAttempt(*i, *left),
            Event::RelayEnded(i, end) => Op::RelayEnded(*i, end.relay_end()),
            Event::HookExited(exit) => Op::HookExited(match exit {
                Exit::Success => HookExit::Success,
                Exit::Failed(code) => HookExit::Failed(i32::from(*code)),
                Exit::Signaled(signal) => HookExit::Signaled(i32::from(*signal)),
                Exit::SpawnFailed => HookExit::SpawnFailed("not found".to_string()),
                Exit::Declined => HookExit::Declined,
                Exit::Dropped => HookExit::Dropped,
                Exit::Abandoned => HookExit::Abandoned,
            }),
            Event::Advance(span) => Op::Advance(span.ms()),
            Event::Tick => Op::Tick,
            Event::Wake => Op::Wake,
            Event::Reload(knobs) => {
                let mut settings = knobs.settings();
                if pool {
                    settings.upstreams = knobs.pool_list();
                }
                Op::Reload(Box::new(settings))
            }
            Event::AcceptPaused => Op::AcceptPaused,
            Event::DumpState => Op::DumpState,
            Event::Shutdown => Op::Shutdown,
            Event::HoldersIdle(span) => Op::HoldersIdle(span.ms()),
            Event::Pause => Op::Pause,
            Event::Resume => Op::Resume,
            Event::Kill(i) => Op::Kill(*i),
            Event::Stray(i, stray) => Op::Stray(
                *i,
                match stray {
                    Stray::ClientLeft => StrayInput::ClientLeft,
                    Stray::UpstreamConnected => StrayInput::UpstreamConnected,
                    Stray::UpstreamFailed => StrayInput::UpstreamFailed,
                    Stray::RelayEnded(end) => StrayInput::RelayEnded(end.relay_end()),
                    Stray::HookExited => StrayInput::HookExited,
                    Stray::ClientEof => StrayInput::ClientEof,
                    Stray::ProxyHeader => StrayInput::ProxyHeader,
                },
            ),
            Event::AnswerProbe => Op::AnswerProbe,
            Event::AnswerSpawn => Op::AnswerSpawn,
            Event::AnswerSample => Op::AnswerSample,
            Event::ReportExit => Op::ReportExit,
            Event::ServiceCrash(code) => Op::ServiceCrash(if *code {
                ServiceExit::Code(1)
            } else {
                ServiceExit::Signal(11)
            }),
            Event::Mood(m) => Op::Mood(m.mood()),
            Event::InstanceCrash(i, code) => Op::InstanceCrash(
                *i,
                if *code {
                    ServiceExit::Code(1)
                } else {
                    ServiceExit::Signal(11)
                },
            ),
            Event::InstanceRestart(i) => Op::InstanceRestart(*i),
            Event::InstanceMood(i, m) => Op::InstanceMood(*i, m.mood()),
            Event::PortTaken(span) => Op::PortTaken(span.ms()),
            Event::ServiceRestart => Op::ServiceRestart,
            Event::StrayService(i, stray) => Op::StrayService(
                *i,
                match stray {
                    StraySvc::Probed(answered) => StrayService::Probed(*answered),
                    StraySvc::Spawned => StrayService::Spawned,
                    StraySvc::Exited => StrayService::Exited,
                    StraySvc::Sampled => StrayService::Sampled,
                },
            ),
        }
    }
}

impl MoodKnobs {
    fn mood(&self) -> Mood {
        Mood {
            spawn_fails: self.spawn_fails,
            listens_after: self.listens_after.map(Span::ms),
            term_exit_after: self.term_exit_after.map(Span::ms),
            children: self.children % 3,
            rss_kib: u64::from(self.rss_kib),
            late_probes: self.late_probes,
        }
    }
}

/// `TCPLOCK_MODEL_TRACE=1` traces every step from the start, so that a panic
/// inside the core (rather than a broken invariant, which is always traced)
/// prints the steps leading to it when a crash input is replayed.
static TRACE: LazyLock<bool> = LazyLock::new(|| std::env::var_os("TCPLOCK_MODEL_TRACE").is_some());

fuzz_target!(|input: Input| {
    let k = 1 + usize::from(input.instances % 4);
    let mut settings = input.initial.settings();
    if k > 1 {
        // K distinct names, from the input's own bits.
        let start = usize::from(input.initial.pool) % POOL_NAMES.len();
        settings.upstreams = (0..k)
            .map(|j| POOL_NAMES[(start + j) % POOL_NAMES.len()].to_string())
            .collect();
    }
    let ops: Vec<Op> = input
        .ops
        .iter()
        .take(MAX_OPS)
        .map(|event| event.op(k > 1))
        .collect();
    let result = if *TRACE {
        model::run_traced(settings, &ops)
    } else {
        model::run(settings, &ops)
    };
    if let Err(failure) = result {
        panic!("{failure}");
    }
});
