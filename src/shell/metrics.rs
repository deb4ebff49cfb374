//! Prometheus metrics (`--metrics`): what the loop records as it performs the
//! core's actions, and the text exposition format 0.0.4 written into a
//! reused buffer.
//!
//! Gauges and the outcome counters are read off the core's [`Stats`] at
//! scrape time; what only the shell sees (queue waits, connection durations,
//! bytes, hook runs, rejections) is counted by a [`Recorder`] in fixed
//! arrays, so recording costs no allocation and a queued client nothing.
//! Process metrics are read from `/proc/self` at scrape time.

use std::fs::File;
use std::io::{self, Read, Write};

use mio::{Poll, Token};

use super::http::HttpServer;
use super::log::Logger;
use super::{FIRST_METRICS_CONN, METRICS_LISTENER, Shell, Stage};
use crate::api::error::Error;
use crate::config::{Config, LogLevel};
use crate::core::{
    Event, HookExit, HookKind, InstanceStats, Outcome, RejectReason, RestartReason,
    ServiceStateName, Stats,
};
use crate::sys;

/// `--metrics`: the HTTP server, the recorder and the procfs reader.
pub(super) struct Metrics {
    server: HttpServer,
    pub(super) recorder: Recorder,
    proc: ProcReader,
}

/// The address `--metrics ADDR` binds, looked up as a start does it
/// (`--check` too). The builder's address comes as given: `PORT` alone
/// means loopback.
pub(crate) fn resolve_metrics_addr(addr: &str) -> Result<std::net::SocketAddr, Error> {
    let addr = crate::config::units::parse_listen(addr).unwrap_or_else(|_| addr.to_string());
    let resolved = std::net::ToSocketAddrs::to_socket_addrs(addr.as_str());
    // `resolve` never returns an empty list.
    Ok(super::resolve("metrics address", &addr, resolved)?[0])
}

impl Metrics {
    /// Binds the metrics listener if `--metrics` is set.
    pub(super) fn start(
        config: &Config,
        poll: &Poll,
        logger: &mut Logger,
    ) -> Result<Option<Box<Metrics>>, Error> {
        let Some(addr) = &config.metrics else {
            return Ok(None);
        };
        let addr = resolve_metrics_addr(addr)?;
        let server = HttpServer::bind(addr, poll.registry(), METRICS_LISTENER, FIRST_METRICS_CONN)
            .map_err(|source| Error::Bind { addr, source })?;
        if let Some(line) = logger.line(LogLevel::Info, "metrics_listening") {
            line.field("addr", server.local_addr().unwrap_or(addr));
        }
        Ok(Some(Box::new(Metrics {
            server,
            recorder: Recorder::default(),
            proc: ProcReader::new(),
        })))
    }

    pub(super) fn wants_turn(&self) -> bool {
        self.server.wants_turn()
    }

    pub(super) fn next_deadline(&self) -> Option<u64> {
        self.server.next_deadline()
    }

    pub(super) fn open_conns(&self) -> usize {
        self.server.open_conns()
    }
}

impl Shell {
    pub(super) fn metrics_listener_ready(&mut self) {
        if let Some(metrics) = &mut self.metrics {
            metrics.server.listener_ready();
        }
    }

    /// A metrics connection is readable or writable: served in
    /// [`Shell::metrics_turn`], once the core is up to date.
    pub(super) fn metrics_conn_ready(&mut self, token: Token) {
        if let Some(metrics) = &mut self.metrics
            && let Some(index) = metrics.server.conn_index(token)
        {
            metrics.server.conn_event(index);
        }
    }

    /// Accepts, expires, and serves the connections that had events, after
    /// the core took this turn's inputs and time.
    pub(super) fn metrics_turn(&mut self, now: u64) {
        let fixed_fds = self.fixed_fds();
        let Some(metrics) = self.metrics.as_deref_mut() else {
            return;
        };
        let Metrics {
            server,
            recorder,
            proc,
        } = metrics;
        let (core, io, logger) = (&self.core, &self.io, &self.logger);
        let mut render = |out: &mut Vec<u8>| {
            scrape(out, recorder, proc, core, io, logger, fixed_fds);
        };
        server.turn(now, self.poll.registry(), &mut render);
    }

    /// Descriptors open beside the connections' sockets and pipes: those
    /// counted at start (listeners, poll, signal pipe, standard streams...),
    /// idle pipes, control and metrics connections and a running hook's
    /// pidfd. The fallback where the kernel does not count them (before
    /// Linux 6.2): counting beats listing `/proc/self/fd`, which takes about
    /// 8 ms with 10,000 descriptors open.
    fn fixed_fds(&self) -> usize {
        self.fds.baseline()
            + self.pool.idle_pipe_fds()
            + self.metrics.as_ref().map_or(0, |m| m.open_conns())
            + self.control.as_ref().map_or(0, |c| c.open_conns())
            + super::hooks::open_fds(&self.running_hooks)
    }
}

/// Gathers a snapshot and writes the exposition onto `out`.
fn scrape(
    out: &mut Vec<u8>,
    recorder: &Recorder,
    proc: &mut ProcReader,
    core: &crate::core::Core,
    io: &[Option<super::ConnIo>],
    logger: &Logger,
    fixed_fds: usize,
) {
    // One walk over the connection table, which is bounded, and costs a
    // scrape, never a queued client: bytes of relays still running, and the
    // descriptors of every connection.
    let (mut live_up, mut live_down) = (0u64, 0u64);
    let mut fds = fixed_fds;
    for conn in io.iter().flatten() {
        fds += 1;
        match &conn.stage {
            Stage::Relaying(relay) => {
                let (up, down) = relay.bytes();
                live_up = live_up.saturating_add(up);
                live_down = live_down.saturating_add(down);
                fds += 1 + relay.pipe_fds();
            }
            Stage::Connecting(_) => fds += 1,
            Stage::Header | Stage::Waiting => {}
        }
    }
    let snapshot = Snapshot {
        stats: core.stats(),
        paused: core.paused(),
        live_bytes_up: live_up,
        live_bytes_down: live_down,
        log_dropped_lines: logger.dropped_total(),
    };
    let process = proc.read_all(fds);
    let instances: Vec<InstanceSnapshot> = snapshot
        .stats
        .instances
        .iter()
        .map(InstanceSnapshot::of)
        .collect();
    write_exposition(out, recorder, &snapshot, &instances, &process);
}

/// Histogram bucket bounds in milliseconds: 1 ms to 10 min.
const BUCKETS_MS: [u64; 14] = [
    1, 5, 10, 50, 100, 500, 1_000, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000, 600_000,
];

/// The same bounds as the `le` labels show them, in seconds.
const BUCKET_LABELS: [&str; 14] = [
    "0.001", "0.005", "0.01", "0.05", "0.1", "0.5", "1", "5", "10", "30", "60", "120", "300", "600",
];

/// A histogram over [`BUCKETS_MS`]: counts per bucket (not cumulative; the
/// last one is `+Inf`), their sum and count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Histogram {
    buckets: [u64; BUCKETS_MS.len() + 1],
    sum_ms: u64,
}

impl Histogram {
    pub(super) fn observe(&mut self, ms: u64) {
        let bucket = BUCKETS_MS
            .iter()
            .position(|&bound| ms <= bound)
            .unwrap_or(BUCKETS_MS.len());
        self.buckets[bucket] += 1;
        self.sum_ms = self.sum_ms.saturating_add(ms);
    }

    pub(super) fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// How a hook run ended, as `tcplock_hook_runs_total{result}` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum HookResult {
    /// Exit 0, or a closure's ticket proceeded.
    Ok,
    /// A non-zero exit, or a ticket failed or dropped.
    Failed,
    /// Killed by a signal (our hook timeout, or someone else).
    Signaled,
    /// Could not be started.
    SpawnFailed,
    /// A closure hook given up on (hook timeout or shutdown).
    Abandoned,
}

impl HookResult {
    const ALL: [HookResult; 5] = [
        HookResult::Ok,
        HookResult::Failed,
        HookResult::Signaled,
        HookResult::SpawnFailed,
        HookResult::Abandoned,
    ];

    fn as_str(self) -> &'static str {
        match self {
            HookResult::Ok => "ok",
            HookResult::Failed => "failed",
            HookResult::Signaled => "signaled",
            HookResult::SpawnFailed => "spawn_failed",
            HookResult::Abandoned => "abandoned",
        }
    }

    pub(super) fn of(exit: &HookExit) -> HookResult {
        match exit {
            HookExit::Success => HookResult::Ok,
            HookExit::Failed(_) | HookExit::Declined | HookExit::Dropped => HookResult::Failed,
            HookExit::Signaled(_) => HookResult::Signaled,
            HookExit::SpawnFailed(_) => HookResult::SpawnFailed,
            HookExit::Abandoned => HookResult::Abandoned,
        }
    }
}

const HOOK_KINDS: [HookKind; 2] = [HookKind::Activate, HookKind::Timeout];
const REJECT_REASONS: [RejectReason; 3] = [
    RejectReason::QueueFull,
    RejectReason::BadProxyHeader,
    RejectReason::UpstreamFailed,
];

/// A hook kind's place in [`HOOK_KINDS`]: exhaustive, so a new kind fails
/// to compile instead of being counted as another.
const fn hook_kind_index(kind: HookKind) -> usize {
    match kind {
        HookKind::Activate => 0,
        HookKind::Timeout => 1,
    }
}

/// A reject reason's place in [`REJECT_REASONS`], exhaustive likewise.
const fn reject_reason_index(reason: RejectReason) -> usize {
    match reason {
        RejectReason::QueueFull => 0,
        RejectReason::BadProxyHeader => 1,
        RejectReason::UpstreamFailed => 2,
    }
}

// Each table's entries sit at their own index.
const _: () = {
    let mut i = 0;
    while i < HOOK_KINDS.len() {
        assert!(hook_kind_index(HOOK_KINDS[i]) == i);
        i += 1;
    }
    let mut i = 0;
    while i < REJECT_REASONS.len() {
        assert!(reject_reason_index(REJECT_REASONS[i]) == i);
        i += 1;
    }
};

/// What the shell counts as it performs the core's actions. Fixed-size: one
/// per loop, whatever the number of connections.
#[derive(Debug, Default)]
pub(super) struct Recorder {
    queue_wait: Histogram,
    conn_duration: Histogram,
    hook_duration: Histogram,
    /// Bytes of relays that ended (live relays are added at scrape time).
    bytes_up: u64,
    bytes_down: u64,
    hook_runs: [[u64; HookResult::ALL.len()]; HOOK_KINDS.len()],
    rejected: [u64; REJECT_REASONS.len()],
}

impl Recorder {
    /// Counts what a core event tells: a queue wait at activation, a
    /// rejection by reason.
    pub(super) fn event(&mut self, event: &Event) {
        match event {
            Event::Activated { waited_ms, .. } => self.queue_wait.observe(*waited_ms),
            Event::Rejected { reason, .. } => {
                let index = reject_reason_index(*reason);
                self.rejected[index] += 1;
            }
            _ => {}
        }
    }

    /// A relay ended after `duration_ms` (from activation) with these bytes.
    pub(super) fn relay_closed(&mut self, up: u64, down: u64, duration_ms: u64) {
        self.bytes_up = self.bytes_up.saturating_add(up);
        self.bytes_down = self.bytes_down.saturating_add(down);
        self.conn_duration.observe(duration_ms);
    }

    /// A hook run ended; `duration_ms` is `None` for one that never started.
    pub(super) fn hook_ended(&mut self, kind: HookKind, exit: &HookExit, duration_ms: Option<u64>) {
        let result = HookResult::of(exit);
        let index = HookResult::ALL
            .iter()
            .position(|&r| r == result)
            .unwrap_or(0);
        self.hook_runs[hook_kind_index(kind)][index] += 1;
        if let Some(ms) = duration_ms {
            self.hook_duration.observe(ms);
        }
    }

    #[cfg(test)]
    fn conn_duration(&self) -> &Histogram {
        &self.conn_duration
    }
}

/// The state of an upstream instance, as `tcplock_upstream_state{state}`
/// names it: the supervised service's, `ready` for an instance tcplock
/// does not run, and `cooldown` for one a failed connect keeps out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum UpstreamState {
    Stopped,
    Starting,
    Ready,
    Due,
    Stopping,
    Failed,
    Cooldown,
}

impl UpstreamState {
    fn of(state: ServiceStateName) -> UpstreamState {
        match state {
            ServiceStateName::Stopped => UpstreamState::Stopped,
            ServiceStateName::Starting => UpstreamState::Starting,
            ServiceStateName::Ready => UpstreamState::Ready,
            ServiceStateName::Due => UpstreamState::Due,
            ServiceStateName::Stopping => UpstreamState::Stopping,
            ServiceStateName::Failed => UpstreamState::Failed,
        }
    }

    const ALL: [UpstreamState; 7] = [
        UpstreamState::Stopped,
        UpstreamState::Starting,
        UpstreamState::Ready,
        UpstreamState::Due,
        UpstreamState::Stopping,
        UpstreamState::Failed,
        UpstreamState::Cooldown,
    ];

    fn as_str(self) -> &'static str {
        match self {
            UpstreamState::Stopped => "stopped",
            UpstreamState::Starting => "starting",
            UpstreamState::Ready => "ready",
            UpstreamState::Due => "due",
            UpstreamState::Stopping => "stopping",
            UpstreamState::Failed => "failed",
            UpstreamState::Cooldown => "cooldown",
        }
    }
}

/// One upstream instance as the metrics show it.
#[derive(Clone, Copy, Debug)]
pub(super) struct InstanceSnapshot {
    /// The `instance` label: `1`, `2`, ...
    pub instance: u32,
    /// Whether it takes connections.
    pub up: bool,
    pub state: UpstreamState,
    pub generation: u64,
    /// Restarts by reason, in [`RestartReason::RESTARTS`] order; `None`
    /// when tcplock does not run it.
    pub restarts: Option<[u64; RestartReason::RESTARTS.len()]>,
    /// `None` when tcplock does not run it.
    pub rss_bytes: Option<u64>,
    /// Connections holding one of its permits.
    pub active: u64,
    /// Connections let through to it so far.
    pub activations: u64,
    pub cooling_down: bool,
}

impl InstanceSnapshot {
    /// An instance as the core reports it. One tcplock does not run is
    /// ready unless a failed connect put it in cool-down; one a reload
    /// removed is not up, whatever its state.
    fn of(inst: &InstanceStats) -> InstanceSnapshot {
        let service = &inst.service;
        let state = match service.state {
            _ if inst.cooling_down => UpstreamState::Cooldown,
            None => UpstreamState::Ready,
            Some(state) => UpstreamState::of(state),
        };
        let restarts = service
            .state
            .map(|_| RestartReason::RESTARTS.map(|r| service.restarts(r)));
        InstanceSnapshot {
            instance: inst.id,
            up: state == UpstreamState::Ready && !inst.removed,
            state,
            generation: service.generation,
            restarts,
            rss_bytes: service.state.map(|_| service.rss_kib.saturating_mul(1024)),
            active: inst.active as u64,
            activations: inst.activations,
            cooling_down: inst.cooling_down,
        }
    }
}

/// What an unsupervised upstream shows: one instance, up and ready.
#[cfg(test)]
pub(super) const UNSUPERVISED: InstanceSnapshot = InstanceSnapshot {
    instance: 1,
    up: true,
    state: UpstreamState::Ready,
    generation: 0,
    restarts: None,
    rss_bytes: None,
    active: 0,
    activations: 0,
    cooling_down: false,
};

/// Everything a scrape shows beside the recorder, gathered by the loop.
#[derive(Clone, Debug, Default)]
pub(super) struct Snapshot {
    pub stats: Stats,
    /// Activation is paused (the control socket's `pause`).
    pub paused: bool,
    /// Bytes moved so far by relays still running.
    pub live_bytes_up: u64,
    pub live_bytes_down: u64,
    pub log_dropped_lines: u64,
}

/// Writes the whole exposition (text format 0.0.4) onto the end of `out`.
/// Writing into a `Vec` allocates only while it grows: a reused buffer is
/// written without allocating.
pub(super) fn write_exposition(
    out: &mut Vec<u8>,
    recorder: &Recorder,
    snapshot: &Snapshot,
    instances: &[InstanceSnapshot],
    process: &ProcessMetrics,
) {
    // Writing into a Vec cannot fail.
    let _ = write_tcplock(out, recorder, snapshot);
    let _ = write_upstreams(out, instances);
    let _ = write_process(out, process);
}

fn header(out: &mut Vec<u8>, name: &str, kind: &str, help: &str) -> io::Result<()> {
    writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}")
}

fn write_tcplock(out: &mut Vec<u8>, rec: &Recorder, snap: &Snapshot) -> io::Result<()> {
    let stats = &snap.stats;
    header(out, "tcplock_build_info", "gauge", "tcplock's version.")?;
    writeln!(
        out,
        "tcplock_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )?;
    let gauges: [(&str, &str, u64); 4] = [
        (
            "tcplock_queued_connections",
            "Clients waiting in the queue.",
            stats.queue_length as u64,
        ),
        (
            "tcplock_active_connections",
            "Connections holding a permit (activating or proxying).",
            stats.active as u64,
        ),
        (
            "tcplock_permits",
            "Connections that may hold a permit at once: --permits of each instance times the instances of the pool.",
            super::control::pool_permits(stats.permits, &stats.instances),
        ),
        (
            "tcplock_paused",
            "1 while activation is paused.",
            u64::from(snap.paused),
        ),
    ];
    for (name, help, value) in gauges {
        header(out, name, "gauge", help)?;
        writeln!(out, "{name} {value}")?;
    }
    header(
        out,
        "tcplock_oldest_wait_seconds",
        "gauge",
        "How long the client at the head of the queue has waited.",
    )?;
    writeln!(
        out,
        "tcplock_oldest_wait_seconds {}",
        Seconds(stats.oldest_wait_ms)
    )?;

    header(
        out,
        "tcplock_connections_total",
        "counter",
        "Connections ended, by outcome.",
    )?;
    for outcome in Outcome::ALL {
        writeln!(
            out,
            "tcplock_connections_total{{outcome=\"{outcome}\"}} {}",
            stats.count(outcome)
        )?;
    }
    header(
        out,
        "tcplock_rejected_connections_total",
        "counter",
        "Connections turned away at the door, by reason.",
    )?;
    for (reason, count) in REJECT_REASONS.iter().zip(rec.rejected) {
        writeln!(
            out,
            "tcplock_rejected_connections_total{{reason=\"{}\"}} {count}",
            reason.as_str()
        )?;
    }
    write_histogram(
        out,
        "tcplock_queue_wait_seconds",
        "Wait from accept to activation.",
        "",
        &rec.queue_wait,
    )?;
    write_histogram(
        out,
        "tcplock_connection_duration_seconds",
        "Time from activation to close of proxied connections.",
        "",
        &rec.conn_duration,
    )?;
    header(
        out,
        "tcplock_bytes_total",
        "counter",
        "Bytes relayed: up is client to upstream, down is upstream to client.",
    )?;
    let up = rec.bytes_up.saturating_add(snap.live_bytes_up);
    let down = rec.bytes_down.saturating_add(snap.live_bytes_down);
    writeln!(out, "tcplock_bytes_total{{direction=\"up\"}} {up}")?;
    writeln!(out, "tcplock_bytes_total{{direction=\"down\"}} {down}")?;
    header(
        out,
        "tcplock_hook_runs_total",
        "counter",
        "Hook runs ended, by hook and result.",
    )?;
    for (kind, runs) in HOOK_KINDS.iter().zip(&rec.hook_runs) {
        for (result, count) in HookResult::ALL.iter().zip(runs) {
            writeln!(
                out,
                "tcplock_hook_runs_total{{hook=\"{}\",result=\"{}\"}} {count}",
                kind.as_str(),
                result.as_str()
            )?;
        }
    }
    write_histogram(
        out,
        "tcplock_hook_duration_seconds",
        "How long hook runs took.",
        "",
        &rec.hook_duration,
    )?;
    header(
        out,
        "tcplock_log_dropped_lines_total",
        "counter",
        "Log lines dropped because stderr took none.",
    )?;
    writeln!(
        out,
        "tcplock_log_dropped_lines_total {}",
        snap.log_dropped_lines
    )
}

/// `labels` is empty or `name="value",` to go before `le`.
fn write_histogram(
    out: &mut Vec<u8>,
    name: &str,
    help: &str,
    labels: &str,
    histogram: &Histogram,
) -> io::Result<()> {
    header(out, name, "histogram", help)?;
    let mut cumulative = 0;
    for (label, count) in BUCKET_LABELS.iter().zip(histogram.buckets) {
        cumulative += count;
        writeln!(out, "{name}_bucket{{{labels}le=\"{label}\"}} {cumulative}")?;
    }
    let count = histogram.count();
    writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {count}")?;
    let braces = |out: &mut Vec<u8>| -> io::Result<()> {
        match labels.strip_suffix(',') {
            Some(inner) => write!(out, "{{{inner}}}"),
            None => Ok(()),
        }
    };
    write!(out, "{name}_sum")?;
    braces(out)?;
    writeln!(out, " {}", Seconds(histogram.sum_ms))?;
    write!(out, "{name}_count")?;
    braces(out)?;
    writeln!(out, " {count}")
}

/// The per-instance metrics, one sample set per instance. Kept apart so the
/// supervisor (and later the pool) hands in its instances.
pub(super) fn write_upstreams(out: &mut Vec<u8>, instances: &[InstanceSnapshot]) -> io::Result<()> {
    header(
        out,
        "tcplock_upstream_up",
        "gauge",
        "1 while the upstream instance takes connections.",
    )?;
    for i in instances {
        writeln!(
            out,
            "tcplock_upstream_up{{instance=\"{}\"}} {}",
            i.instance,
            u8::from(i.up)
        )?;
    }
    header(
        out,
        "tcplock_upstream_state",
        "gauge",
        "1 for the state the upstream instance is in, 0 for the others.",
    )?;
    for i in instances {
        for state in UpstreamState::ALL {
            writeln!(
                out,
                "tcplock_upstream_state{{instance=\"{}\",state=\"{}\"}} {}",
                i.instance,
                state.as_str(),
                u8::from(state == i.state)
            )?;
        }
    }
    header(
        out,
        "tcplock_upstream_generation",
        "gauge",
        "The upstream instance's generation: 1 for the first process, +1 per restart.",
    )?;
    for i in instances {
        writeln!(
            out,
            "tcplock_upstream_generation{{instance=\"{}\"}} {}",
            i.instance, i.generation
        )?;
    }
    header(
        out,
        "tcplock_upstream_restarts_total",
        "counter",
        "Restarts of the upstream instance, by reason.",
    )?;
    for i in instances {
        let Some(restarts) = &i.restarts else {
            continue;
        };
        for (reason, count) in RestartReason::RESTARTS.iter().zip(restarts) {
            writeln!(
                out,
                "tcplock_upstream_restarts_total{{instance=\"{}\",reason=\"{}\"}} {count}",
                i.instance,
                reason.as_str()
            )?;
        }
    }
    header(
        out,
        "tcplock_upstream_rss_bytes",
        "gauge",
        "Resident memory of the upstream instance's process.",
    )?;
    for i in instances {
        if let Some(rss) = i.rss_bytes {
            writeln!(
                out,
                "tcplock_upstream_rss_bytes{{instance=\"{}\"}} {rss}",
                i.instance
            )?;
        }
    }
    let per_instance: [(&str, &str, &str, InstanceValue); 3] = [
        (
            "tcplock_instance_active",
            "gauge",
            "Connections holding a permit of the instance (activating or proxying).",
            |i| i.active,
        ),
        (
            "tcplock_instance_activations_total",
            "counter",
            "Connections let through to the instance.",
            |i| i.activations,
        ),
        (
            "tcplock_instance_cooling_down",
            "gauge",
            "1 while a failed connect keeps the instance out (passive health).",
            |i| u64::from(i.cooling_down),
        ),
    ];
    for (name, kind, help, value) in per_instance {
        header(out, name, kind, help)?;
        for i in instances {
            writeln!(out, "{name}{{instance=\"{}\"}} {}", i.instance, value(i))?;
        }
    }
    Ok(())
}

/// Reads one per-instance sample off an instance.
type InstanceValue = fn(&InstanceSnapshot) -> u64;

/// Milliseconds shown as seconds without going through a float.
struct Seconds(u64);

impl std::fmt::Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (s, ms) = (self.0 / 1000, self.0 % 1000);
        if ms == 0 {
            write!(f, "{s}")
        } else {
            write!(f, "{s}.{ms:03}")
        }
    }
}

/// The standard `process_*` metrics. Fields a read could not fill are
/// `None` and left out of the exposition.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct ProcessMetrics {
    pub resident_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    /// In clock ticks.
    pub cpu_ticks: Option<u64>,
    pub start_time_seconds: Option<u64>,
    pub ticks_per_second: u64,
}

/// Reads `/proc/self` (procfs never blocks): `stat` for CPU time and
/// resident pages, `limits` for the descriptor limit. The start time is
/// read once, at start-up; open descriptors are the size of
/// `/proc/self/fd` (Linux 6.2+), or counted by the loop.
#[derive(Debug)]
pub(super) struct ProcReader {
    ticks_per_second: u64,
    page_size: u64,
    start_time_seconds: Option<u64>,
    /// Room for one procfs file, reused.
    buf: Box<[u8; 4096]>,
}

impl ProcReader {
    pub(super) fn new() -> ProcReader {
        let (ticks_per_second, page_size) = sys::clock_ticks_and_page_size();
        let mut reader = ProcReader {
            ticks_per_second,
            page_size,
            start_time_seconds: None,
            buf: Box::new([0; 4096]),
        };
        let boot = boot_time("/proc/stat");
        let started = reader
            .read("/proc/self/stat")
            .and_then(|text| stat_field(text, 22));
        if let (Some(boot), Some(started)) = (boot, started)
            && ticks_per_second > 0
        {
            reader.start_time_seconds = Some(boot + started / ticks_per_second);
        }
        reader
    }

    /// Reads the first 4 KiB of a procfs file; `None` if it cannot be read.
    fn read(&mut self, path: &str) -> Option<&str> {
        let mut file = File::open(path).ok()?;
        let mut len = 0;
        while len < self.buf.len() {
            match file.read(&mut self.buf[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
        std::str::from_utf8(&self.buf[..len]).ok()
    }

    pub(super) fn read_all(&mut self, open_fds: usize) -> ProcessMetrics {
        let (ticks_per_second, page_size) = (self.ticks_per_second, self.page_size);
        let mut metrics = ProcessMetrics {
            start_time_seconds: self.start_time_seconds,
            ticks_per_second,
            ..ProcessMetrics::default()
        };
        if let Some(stat) = self.read("/proc/self/stat") {
            let utime = stat_field(stat, 14);
            let stime = stat_field(stat, 15);
            metrics.cpu_ticks = utime.zip(stime).map(|(u, s)| u + s);
            metrics.resident_bytes = stat_field(stat, 24).map(|pages| pages * page_size);
        }
        metrics.max_fds = self
            .read("/proc/self/limits")
            .and_then(|limits| field_after(limits, "Max open files"));
        // Linux 6.2 and later give the number of open descriptors as the
        // size of /proc/self/fd, without listing them; older kernels say 0.
        metrics.open_fds = std::fs::metadata("/proc/self/fd")
            .ok()
            .map(|meta| meta.len())
            .filter(|&n| n > 0)
            .or(u64::try_from(open_fds).ok());
        metrics
    }
}

/// The boot time (`btime`) in `proc_stat`, a `/proc/stat`, read whole:
/// `btime` comes after a line per CPU and the long `intr` line, well past
/// 4 KiB on a big host. Read once, at start-up.
fn boot_time(proc_stat: &str) -> Option<u64> {
    let text = std::fs::read_to_string(proc_stat).ok()?;
    field_after(&text, "btime")
}

/// Field `n` (1-based, as proc(5) numbers them) of `/proc/self/stat`. The
/// command name in field 2 may hold spaces and parentheses: fields are
/// counted from its closing parenthesis.
fn stat_field(stat: &str, n: usize) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_ascii_whitespace()
        .nth(n.checked_sub(3)?)?
        .parse()
        .ok()
}

/// The first number after `label` at the start of a line.
fn field_after(text: &str, label: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with(label))?;
    line[label.len()..]
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

fn write_process(out: &mut Vec<u8>, p: &ProcessMetrics) -> io::Result<()> {
    let gauges = [
        (
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            p.resident_bytes,
        ),
        (
            "process_open_fds",
            "Number of open file descriptors.",
            p.open_fds,
        ),
        (
            "process_max_fds",
            "Maximum number of open file descriptors.",
            p.max_fds,
        ),
    ];
    for (name, help, value) in gauges {
        optional_gauge(out, name, help, value)?;
    }
    if let Some(ticks) = p.cpu_ticks
        && p.ticks_per_second > 0
    {
        header(
            out,
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
        )?;
        let hz = p.ticks_per_second;
        let millis = ticks / hz * 1000 + ticks % hz * 1000 / hz;
        writeln!(out, "process_cpu_seconds_total {}", Seconds(millis))?;
    }
    optional_gauge(
        out,
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        p.start_time_seconds,
    )
}

/// A gauge's family and sample, or nothing when its value could not be read.
fn optional_gauge(out: &mut Vec<u8>, name: &str, help: &str, value: Option<u64>) -> io::Result<()> {
    let Some(value) = value else {
        return Ok(());
    };
    header(out, name, "gauge", help)?;
    writeln!(out, "{name} {value}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(recorder: &Recorder, snapshot: &Snapshot) -> String {
        let mut out = Vec::new();
        write_exposition(
            &mut out,
            recorder,
            snapshot,
            &[UNSUPERVISED],
            &ProcessMetrics::default(),
        );
        String::from_utf8(out).unwrap()
    }

    /// `expected` is one whole line of `text`.
    fn assert_line(text: &str, expected: &str) {
        assert!(
            text.lines().any(|l| l == expected),
            "no `{expected}` in\n{text}"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_sum_and_count() {
        let mut recorder = Recorder::default();
        for ms in [0, 1, 2, 700, 700_000] {
            recorder.relay_closed(10, 20, ms);
        }
        assert_eq!(recorder.conn_duration().count(), 5);
        let text = render(&recorder, &Snapshot::default());
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
                .to_owned()
        };
        let d = "tcplock_connection_duration_seconds";
        assert_eq!(
            line(&format!("{d}_bucket{{le=\"0.001\"}}")),
            format!("{d}_bucket{{le=\"0.001\"}} 2")
        );
        assert!(line(&format!("{d}_bucket{{le=\"0.005\"}}")).ends_with(" 3"));
        assert!(line(&format!("{d}_bucket{{le=\"1\"}}")).ends_with(" 4"));
        assert!(line(&format!("{d}_bucket{{le=\"600\"}}")).ends_with(" 4"));
        assert!(line(&format!("{d}_bucket{{le=\"+Inf\"}}")).ends_with(" 5"));
        assert_eq!(line(&format!("{d}_sum")), format!("{d}_sum 700.703"));
        assert_eq!(line(&format!("{d}_count")), format!("{d}_count 5"));
        assert_eq!(
            line("tcplock_bytes_total{direction=\"up\"}"),
            "tcplock_bytes_total{direction=\"up\"} 50"
        );
    }

    #[test]
    fn a_reused_buffer_is_not_grown_by_the_same_scrape() {
        let recorder = Recorder::default();
        let snapshot = Snapshot::default();
        let mut out = Vec::new();
        write_exposition(
            &mut out,
            &recorder,
            &snapshot,
            &[UNSUPERVISED],
            &ProcessMetrics::default(),
        );
        let (len, capacity) = (out.len(), out.capacity());
        out.clear();
        write_exposition(
            &mut out,
            &recorder,
            &snapshot,
            &[UNSUPERVISED],
            &ProcessMetrics::default(),
        );
        assert_eq!((out.len(), out.capacity()), (len, capacity));
    }

    #[test]
    fn proc_stat_fields_are_counted_after_the_command_name() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 555 1000 25";
        assert_eq!(stat_field(stat, 3), None); // "S" is not a number
        assert_eq!(stat_field(stat, 14), Some(7));
        assert_eq!(stat_field(stat, 15), Some(3));
        assert_eq!(stat_field(stat, 22), Some(555));
        assert_eq!(stat_field(stat, 24), Some(25));
        let limits = "Limit  Soft Limit  Hard Limit  Units\nMax open files            1024                 4096                 files\n";
        assert_eq!(field_after(limits, "Max open files"), Some(1024));
    }

    #[test]
    fn the_boot_time_is_found_past_4_kib_of_cpu_and_intr_lines() {
        let mut text = String::from("cpu  1 2 3 4 5 6 7 8 9 10\n");
        for cpu in 0..256 {
            text.push_str(&format!("cpu{cpu} 11 22 33 44 55 66 77 88 0 0\n"));
        }
        text.push_str("intr 123");
        for _ in 0..2000 {
            text.push_str(" 0");
        }
        text.push_str("\nctxt 99\nbtime 1795894966\nprocesses 12\n");
        assert!(text.len() > 8 * 1024);
        let path = std::env::temp_dir().join(format!("tcplock-stat-{}", std::process::id()));
        std::fs::write(&path, &text).unwrap();
        let boot = boot_time(path.to_str().unwrap());
        let _ = std::fs::remove_file(&path);
        assert_eq!(boot, Some(1_795_894_966));
    }

    #[test]
    fn the_process_reader_reads_this_process() {
        let metrics = ProcReader::new().read_all(3);
        assert!(metrics.resident_bytes.is_some_and(|b| b > 0));
        assert!(metrics.open_fds.is_some_and(|n| n >= 3));
        assert!(metrics.max_fds.is_some_and(|n| n >= 3));
        assert!(metrics.cpu_ticks.is_some());
        assert!(
            metrics
                .start_time_seconds
                .is_some_and(|s| s > 1_600_000_000)
        );
    }

    #[test]
    fn every_instance_has_its_series_and_permits_count_the_pool() {
        let supervised = InstanceStats {
            id: 1,
            upstream: "127.0.0.1:8101".to_string(),
            active: 1,
            activations: 5,
            service: crate::core::ServiceStats {
                state: Some(ServiceStateName::Ready),
                generation: 3,
                rss_kib: 2,
                restarts: {
                    let mut r = [0; RestartReason::ALL.len()];
                    r[RestartReason::Control.index()] = 2;
                    r
                },
                ..Default::default()
            },
            ..InstanceStats::default()
        };
        let cooling = InstanceStats {
            id: 2,
            upstream: "127.0.0.1:8102".to_string(),
            activations: 1,
            cooling_down: true,
            ..InstanceStats::default()
        };
        let snapshot = Snapshot {
            stats: Stats {
                permits: 2,
                instances: vec![supervised, cooling],
                ..Stats::default()
            },
            ..Snapshot::default()
        };
        let instances: Vec<InstanceSnapshot> = snapshot
            .stats
            .instances
            .iter()
            .map(InstanceSnapshot::of)
            .collect();
        let mut out = Vec::new();
        write_exposition(
            &mut out,
            &Recorder::default(),
            &snapshot,
            &instances,
            &ProcessMetrics::default(),
        );
        let text = String::from_utf8(out).unwrap();
        for expected in [
            "tcplock_permits 4",
            "tcplock_upstream_up{instance=\"1\"} 1",
            "tcplock_upstream_up{instance=\"2\"} 0",
            "tcplock_upstream_state{instance=\"1\",state=\"ready\"} 1",
            "tcplock_upstream_state{instance=\"2\",state=\"cooldown\"} 1",
            "tcplock_upstream_state{instance=\"2\",state=\"ready\"} 0",
            "tcplock_upstream_generation{instance=\"1\"} 3",
            "tcplock_upstream_generation{instance=\"2\"} 0",
            "tcplock_upstream_restarts_total{instance=\"1\",reason=\"control\"} 2",
            "tcplock_upstream_rss_bytes{instance=\"1\"} 2048",
            "tcplock_instance_active{instance=\"1\"} 1",
            "tcplock_instance_active{instance=\"2\"} 0",
            "tcplock_instance_activations_total{instance=\"1\"} 5",
            "tcplock_instance_activations_total{instance=\"2\"} 1",
            "tcplock_instance_cooling_down{instance=\"1\"} 0",
            "tcplock_instance_cooling_down{instance=\"2\"} 1",
        ] {
            assert_line(&text, expected);
        }
        // An instance tcplock does not run has no restarts and no memory.
        assert!(!text.contains("tcplock_upstream_restarts_total{instance=\"2\""));
        assert!(!text.contains("tcplock_upstream_rss_bytes{instance=\"2\""));
    }

    #[test]
    fn hook_results_and_rejections_are_counted_by_label() {
        let mut recorder = Recorder::default();
        recorder.hook_ended(HookKind::Activate, &HookExit::Success, Some(3));
        recorder.hook_ended(HookKind::Timeout, &HookExit::Failed(2), Some(4));
        recorder.hook_ended(HookKind::Activate, &HookExit::SpawnFailed("x".into()), None);
        let client = "127.0.0.1:1".parse().unwrap();
        recorder.event(&Event::Rejected {
            conn: crate::core::ConnId(1),
            client,
            reason: RejectReason::QueueFull,
        });
        let text = render(&recorder, &Snapshot::default());
        for expected in [
            "tcplock_hook_runs_total{hook=\"activate\",result=\"ok\"} 1",
            "tcplock_hook_runs_total{hook=\"timeout\",result=\"failed\"} 1",
            "tcplock_hook_runs_total{hook=\"activate\",result=\"spawn_failed\"} 1",
            "tcplock_hook_duration_seconds_count 2",
            "tcplock_rejected_connections_total{reason=\"queue_full\"} 1",
            "tcplock_rejected_connections_total{reason=\"bad_proxy_header\"} 0",
            "tcplock_upstream_up{instance=\"1\"} 1",
            "tcplock_upstream_state{instance=\"1\",state=\"ready\"} 1",
            "tcplock_upstream_state{instance=\"1\",state=\"failed\"} 0",
        ] {
            assert_line(&text, expected);
        }
    }
}
