//! Drives tcplock's real core (the sans-I/O state machine) with a synthetic
//! workload on a virtual clock, and prints wait-time percentiles and
//! throughput: what a pool of K instances behind one FIFO queue buys over K
//! single-instance tcplocks behind a least-connections balancer, and what
//! rolling restarts buy over restarting every instance at once.
//!
//! ```sh
//! cargo run --release --features model --example simulate -- \
//!     --clients 100000 --rate 3 --service-ms 1000 --dist lognormal \
//!     --instances 4 --restart-after 50 --restart-ms 3000 --mode balanced
//! cargo run --release --features model --example simulate -- --table
//! ```
//!
//! # The workload
//! Clients arrive as a Poisson process (`--rate` per second). Each holds its
//! instance for a service time drawn from `--dist` (`exp`, or `lognormal`
//! with `--sigma`) with mean `--service-ms`. The service leaks: tcplock
//! restarts an instance after `--restart-after` jobs (its `--restart-after`),
//! and a restarted instance answers `--restart-ms` after its spawn. Arrivals
//! start once every instance is ready. All randomness comes from `--seed`
//! through a splitmix64 generator: a run is reproducible. Arrival times and
//! service times come from two streams and a client's service time is drawn
//! at its arrival, so every mode serves the same clients with the same jobs
//! (common random numbers: near saturation one busy period moves the
//! percentiles more than the dispatch does, and this keeps it out of the
//! comparison).
//!
//! # What it prints
//! Throughput (clients served per second of virtual time, first arrival to
//! last close), the wait from accept to activation (p50, p90, p99, max), the
//! restarts, the most instances out at once (from `upstream_stopping`, or a
//! single instance's `restart_due`, to its next `upstream_ready`), how long
//! no instance took clients, how much instance time sat idle while a client
//! waited (a leastconn balancer's cost: a client committed to a busy
//! instance while another is free), and the wall time.
//!
//! # The simulated shell
//! It answers the core's actions on the virtual clock, as the mio shell
//! would: `Connect` is answered connected at once; the relay ends after the
//! client's service time; `ProbeUpstream` is refused while the instance is
//! not spawned and answered once `--restart-ms` passed since its spawn (the
//! core probes every 100 ms, so a start is ready at the next multiple of
//! 100 ms); `SpawnService` succeeds; `SignalService` makes the process exit
//! 5 ms later, after which `SampleService` reports no process left (a running
//! one reports a constant RSS). Every deadline is the core's own timer.
//!
//! # The modes
//! - `pool`: one core with K instances and one queue; planned restarts are
//!   rolling (the core takes at most one instance out at a time).
//! - `balanced`: K cores of one instance each, behind a dispatcher that sends
//!   each arrival at once to the core with the fewest connections (active
//!   plus queued; ties in turn), as HAProxy's `balance leastconn` does. Each
//!   core restarts its instance on its own after `--restart-after` jobs. The
//!   balancer sees tcplock's listener, which stays up while its instance
//!   restarts, so it keeps sending clients there.
//! - `together`: `balanced`, but with every instance restarted at once: the
//!   cores get no `--restart-after`; each time the K cores together have let
//!   K x N clients through, every ready core is asked for a restart (as a
//!   `tcplock ctl restart` would), drains its client and goes out with the
//!   others. The leak is the same (N jobs per instance on average); only the
//!   timing differs. This is "restart all instances at once".

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tcplock::internals::core::{
    Action, ConnRef, Core, EndedBy, Event, InstanceId, RelayCause, RelayEnd, ServiceExit,
    ServiceSample, ServiceSettings, Settings, StopSignal,
};
use tcplock::{Generation, Outcome, RestartReason};

/// How long a signalled instance takes to exit.
const EXIT_MS: u64 = 5;
/// What a running instance's memory sample says.
const RSS_KIB: u64 = 200_000;
/// A run that has not finished after this many steps per client is stuck.
const STEPS_PER_CLIENT: u64 = 1_000;

fn main() -> ExitCode {
    match parse(std::env::args_os().skip(1)) {
        Ok(Command::Run(workload)) => match simulate(&workload) {
            Ok(report) => {
                print!("{}", header(&workload));
                print!("{}", report.render());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("simulate: {error}");
                ExitCode::FAILURE
            }
        },
        Ok(Command::Table(base)) => {
            print!("{}", table(&base));
            ExitCode::SUCCESS
        }
        Ok(Command::Help) => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("simulate: {error}");
            ExitCode::from(2)
        }
    }
}

// ----- options -----

const USAGE: &str = "\
usage: simulate [options]
  --clients N          clients to serve (100000)
  --rate R             arrivals per second, Poisson (3)
  --service-ms MS      mean service time (1000)
  --dist exp|lognormal service-time distribution (lognormal)
  --sigma S            lognormal shape (1.0)
  --instances K        upstream instances (4)
  --restart-after N    restart an instance after N jobs (off)
  --restart-ms MS      time from spawn to ready (3000)
  --mode pool|balanced|together
                       one pool of K, K single tcplocks behind leastconn,
                       or those with every instance restarted at once (pool)
  --seed S             random seed (1)
  --table              run the README's configurations, print a markdown table
";

/// What one run simulates.
#[derive(Clone, Debug, PartialEq)]
struct Workload {
    clients: u64,
    rate: f64,
    service_ms: f64,
    dist: Dist,
    instances: usize,
    restart_after: Option<u64>,
    restart_ms: u64,
    mode: Mode,
    seed: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            clients: 100_000,
            rate: 3.0,
            service_ms: 1_000.0,
            dist: Dist::LogNormal { sigma: 1.0 },
            instances: 4,
            restart_after: None,
            restart_ms: 3_000,
            mode: Mode::Pool,
            seed: 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Dist {
    Exp,
    LogNormal { sigma: f64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Pool,
    Balanced,
    Together,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Pool => "pool",
            Mode::Balanced => "balanced",
            Mode::Together => "together",
        }
    }
}

#[derive(Debug)]
enum Command {
    Run(Workload),
    Table(Workload),
    Help,
}

fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Command, String> {
    use lexopt::prelude::*;
    let mut w = Workload::default();
    let mut sigma = 1.0;
    let mut lognormal = true;
    let mut table = false;
    let mut parser = lexopt::Parser::from_args(args);
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        let flag = match arg {
            Long(name) => format!("--{name}"),
            Short(c) => format!("-{c}"),
            Value(v) => return Err(format!("unexpected argument {v:?}")),
        };
        let mut value = || -> Result<String, String> {
            parser
                .value()
                .map_err(|e| e.to_string())?
                .into_string()
                .map_err(|v| format!("{flag}: not UTF-8: {v:?}"))
        };
        match flag.as_str() {
            "--clients" => w.clients = number(&flag, &value()?, 1.0)? as u64,
            "--rate" => w.rate = number(&flag, &value()?, f64::MIN_POSITIVE)?,
            "--service-ms" => w.service_ms = number(&flag, &value()?, 1.0)?,
            "--sigma" => sigma = number(&flag, &value()?, 0.0)?,
            "--instances" => w.instances = number(&flag, &value()?, 1.0)? as usize,
            "--restart-after" => w.restart_after = Some(number(&flag, &value()?, 1.0)? as u64),
            "--restart-ms" => w.restart_ms = number(&flag, &value()?, 0.0)? as u64,
            "--seed" => w.seed = number(&flag, &value()?, 0.0)? as u64,
            "--dist" => {
                lognormal = match value()?.as_str() {
                    "exp" => false,
                    "lognormal" => true,
                    other => return Err(format!("{flag}: {other:?} is not exp or lognormal")),
                }
            }
            "--mode" => {
                w.mode = match value()?.as_str() {
                    "pool" => Mode::Pool,
                    "balanced" => Mode::Balanced,
                    "together" => Mode::Together,
                    other => {
                        return Err(format!(
                            "{flag}: {other:?} is not pool, balanced or together"
                        ));
                    }
                }
            }
            "--table" => table = true,
            "-h" | "--help" => return Ok(Command::Help),
            _ => return Err(format!("unknown option {flag} (see --help)")),
        }
    }
    w.dist = if lognormal {
        Dist::LogNormal { sigma }
    } else {
        Dist::Exp
    };
    if w.mode == Mode::Together && w.restart_after.is_none() {
        return Err("--mode together: needs --restart-after".to_string());
    }
    Ok(if table {
        Command::Table(w)
    } else {
        Command::Run(w)
    })
}

/// A finite number of at least `min`, or an error naming the flag.
fn number(flag: &str, text: &str, min: f64) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(n) if n.is_finite() && n >= min && n <= 1e15 => Ok(n),
        _ => Err(format!(
            "{flag}: {text:?} is not a number of at least {min}"
        )),
    }
}

// ----- randomness -----

/// splitmix64: tiny, fast, and good enough for a workload.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: never 0, so its logarithm is finite.
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Exponential with this mean.
    fn exp(&mut self, mean: f64) -> f64 {
        -mean * self.unit().ln()
    }

    /// Standard normal (Box-Muller; the second value is dropped).
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// A service time in whole ms, at least 1.
    fn service(&mut self, dist: Dist, mean: f64) -> u64 {
        let ms = match dist {
            Dist::Exp => self.exp(mean),
            // E[exp(mu + sigma Z)] = exp(mu + sigma^2 / 2) = mean.
            Dist::LogNormal { sigma } => {
                (mean.ln() - sigma * sigma / 2.0 + sigma * self.normal()).exp()
            }
        };
        (ms.round() as u64).max(1)
    }
}

/// The nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ----- the core's instances -----
//
// The core numbers instances from 1 (`InstanceId`); the simulation indexes
// them from 0 within their core.

fn id(instance: usize) -> InstanceId {
    InstanceId(u32::try_from(instance + 1).unwrap_or(u32::MAX))
}

fn index(id: InstanceId) -> usize {
    id.0.saturating_sub(1) as usize
}

/// The core's settings for `instances` instances (permits 1 each).
fn core_settings(instances: usize, restart_after: Option<u64>, restart_ms: u64) -> Settings {
    Settings {
        permits: 1,
        max_queue: usize::MAX,
        stall_warn_ms: None,
        upstreams: (0..instances).map(upstream_name).collect(),
        service: Some(ServiceSettings {
            ready_timeout_ms: restart_ms.saturating_add(60_000),
            restart_after,
            ..ServiceSettings::default()
        }),
        ..Settings::default()
    }
}

fn upstream_name(instance: usize) -> String {
    format!("127.0.0.1:{}", 2002 + instance)
}

/// An action, with the instance it concerns.
enum Todo {
    Connect(ConnRef, usize),
    Relay(ConnRef),
    Closed(ConnRef, Outcome),
    Probe(usize, Generation),
    Spawn(usize, Generation, RestartReason),
    Sample(usize, Generation),
    Signal(usize, Generation, StopSignal),
    ReportIdle,
    Log(Event),
    Nothing,
}

fn decode(action: Action) -> Todo {
    match action {
        Action::Connect { conn, instance } => Todo::Connect(conn, index(instance)),
        Action::StartRelay(conn) => Todo::Relay(conn),
        Action::Close { conn, outcome, .. } => Todo::Closed(conn, outcome),
        Action::ProbeUpstream {
            instance,
            generation,
        } => Todo::Probe(index(instance), generation),
        Action::SpawnService {
            instance,
            generation,
            reason,
            ..
        } => Todo::Spawn(index(instance), generation, reason),
        Action::SampleService {
            instance,
            generation,
        } => Todo::Sample(index(instance), generation),
        Action::SignalService {
            instance,
            generation,
            signal,
        } => Todo::Signal(index(instance), generation, signal),
        Action::ReportIdle => Todo::ReportIdle,
        Action::Log(event) => Todo::Log(event),
        // No hooks, no accept pauses, one address per instance, every
        // connect answers at once.
        Action::ConnectNext(_)
        | Action::AbandonConnect(_)
        | Action::SpawnHook(_)
        | Action::KillHook(_)
        | Action::StopAccepting
        | Action::ResumeAccepting => Todo::Nothing,
    }
}

/// What the simulation learns from a log event.
enum News {
    Activated {
        waited_ms: u64,
    },
    /// The instance takes clients.
    Ready(usize),
    /// The instance became due: a single one takes no new client from now
    /// on; one of a pool keeps serving until its turn comes.
    Due(usize),
    /// The instance is being stopped.
    Stopping(usize),
}

fn news(event: &Event) -> Option<News> {
    match *event {
        Event::Activated { waited_ms, .. } => Some(News::Activated { waited_ms }),
        Event::UpstreamReady { instance, .. } => Some(News::Ready(index(instance))),
        Event::RestartDue { instance, .. } => Some(News::Due(index(instance))),
        Event::UpstreamStopping { instance, .. } => Some(News::Stopping(index(instance))),
        _ => None,
    }
}

fn feed_probed(core: &mut Core, now: u64, instance: usize, generation: Generation, answered: bool) {
    core.handle_service_probed(now, id(instance), generation, answered);
}

fn feed_spawned(core: &mut Core, now: u64, instance: usize, generation: Generation, pid: u32) {
    core.handle_service_spawned(now, id(instance), generation, Ok(pid));
}

fn feed_sampled(
    core: &mut Core,
    now: u64,
    instance: usize,
    generation: Generation,
    s: ServiceSample,
) {
    core.handle_service_sampled(now, id(instance), generation, s);
}

fn feed_exited(core: &mut Core, now: u64, instance: usize, generation: Generation) {
    core.handle_service_exited(now, id(instance), generation, ServiceExit::Signal(15));
}

/// `--mode together`: asks the core to restart this instance.
fn restart_instance(core: &mut Core, now: u64, instance: usize) {
    core.handle_service_restart(now, Some(id(instance)));
}

// ----- the simulation -----

/// What happens at a time, besides the cores' own timers.
#[derive(Clone, Copy)]
enum Happening {
    Arrival,
    RelayEnds {
        core: usize,
        conn: ConnRef,
    },
    Exits {
        core: usize,
        instance: usize,
        generation: Generation,
    },
}

struct Scheduled {
    at: u64,
    seq: u64,
    what: Happening,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    /// Reversed: the heap's top is the earliest, first scheduled first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// One instance's process, as the simulated shell sees it.
#[derive(Default)]
struct Instance {
    /// The live generation and when it was spawned.
    process: Option<(Generation, u64)>,
    /// A signal was sent; its exit is scheduled.
    exiting: bool,
    /// The core lets clients through to it (news since its last ready).
    taking: bool,
    /// The connection holding its permit.
    holding: Option<ConnRef>,
}

struct Sim<'w> {
    w: &'w Workload,
    /// Arrival times.
    rng: Rng,
    /// Service times, drawn per client at its arrival from their own stream,
    /// so every mode serves the same clients with the same jobs.
    jobs: Rng,
    /// The service time of each client not yet proxying, by core and handle.
    job_ms: HashMap<(usize, ConnRef), u64>,
    cores: Vec<Core>,
    /// Instances per core: K in a pool, 1 behind the balancer.
    per_core: usize,
    /// Indexed `core * per_core + instance`.
    instances: Vec<Instance>,
    heap: BinaryHeap<Scheduled>,
    seq: u64,
    now: u64,
    /// The next arrival, unrounded, so rounding does not drift the rate.
    next_arrival: f64,
    arrived: u64,
    closed: u64,
    served: u64,
    waits: Vec<u64>,
    restarts: u64,
    /// `--mode together`: activations since the last synchronized restart.
    since_restart: u64,
    restart_due: bool,
    /// Ties of the least-connections dispatcher go in turn.
    turn: usize,
    /// Virtual time with no instance taking clients, and since when.
    all_out_ms: u64,
    /// The most instances out (not taking clients) at once.
    most_out: usize,
    /// Instance-ms an instance taking clients sat idle while a client waited.
    idle_waiting_ms: u64,
    all_out_since: Option<u64>,
    next_pid: u32,
}

/// What one run measured.
#[derive(Debug)]
struct Report {
    served: u64,
    other: u64,
    /// Sorted, accept to activation.
    waits: Vec<u64>,
    /// First arrival to last close, virtual ms.
    span_ms: u64,
    restarts: u64,
    all_out_ms: u64,
    most_out: usize,
    instances: usize,
    idle_waiting_ms: u64,
    wall: Duration,
}

impl Report {
    fn throughput(&self) -> f64 {
        self.served as f64 * 1_000.0 / self.span_ms.max(1) as f64
    }

    /// Idle-while-waiting time as a share of all instance time.
    fn idle_waiting_pct(&self) -> f64 {
        let instance_ms = self.span_ms.max(1) as f64 * self.instances.max(1) as f64;
        self.idle_waiting_ms as f64 * 100.0 / instance_ms
    }

    fn wait(&self, p: f64) -> u64 {
        percentile(&self.waits, p)
    }

    fn render(&self) -> String {
        format!(
            "served {} (other outcomes {}) in {:.1} s virtual: {:.3} clients/s\n\
             wait ms (accept to activation): p50 {} p90 {} p99 {} max {}\n\
             restarts {}; at most {} of {} instances out at once; \
             none taking clients for {:.1} s ({:.2}% of the run)\n\
             an instance idle while a client waited: {:.1} instance-s ({:.2}% of instance time)\n\
             wall {:.3} s\n",
            self.served,
            self.other,
            self.span_ms as f64 / 1_000.0,
            self.throughput(),
            self.wait(50.0),
            self.wait(90.0),
            self.wait(99.0),
            self.waits.last().copied().unwrap_or(0),
            self.restarts,
            self.most_out,
            self.instances,
            self.all_out_ms as f64 / 1_000.0,
            self.all_out_ms as f64 * 100.0 / self.span_ms.max(1) as f64,
            self.idle_waiting_ms as f64 / 1_000.0,
            self.idle_waiting_pct(),
            self.wall.as_secs_f64(),
        )
    }
}

fn header(w: &Workload) -> String {
    let dist = match w.dist {
        Dist::Exp => "exp".to_string(),
        Dist::LogNormal { sigma } => format!("lognormal sigma {sigma}"),
    };
    let restarts = match (w.restart_after, w.mode) {
        (None, _) => "no leak".to_string(),
        (Some(n), Mode::Pool) => format!("restart each instance after {n} jobs (rolling)"),
        (Some(n), Mode::Balanced) => format!("each core restarts its instance after {n} jobs"),
        (Some(n), Mode::Together) => format!(
            "every instance restarted at once each {} jobs pool-wide",
            n.saturating_mul(w.instances as u64)
        ),
    };
    let load = w.rate * w.service_ms / 1_000.0 / w.instances as f64;
    format!(
        "simulate: mode {} with {} instances; {} clients at {}/s; service {} ms mean ({dist}), \
         offered load {:.0}%; {restarts}; ready {} ms after spawn; seed {}\n",
        w.mode.as_str(),
        w.instances,
        w.clients,
        w.rate,
        w.service_ms,
        load * 100.0,
        w.restart_ms,
        w.seed,
    )
}

fn simulate(w: &Workload) -> Result<Report, String> {
    let started = Instant::now();
    let (cores, per_core, restart_after) = match w.mode {
        Mode::Pool => (1, w.instances, w.restart_after),
        Mode::Balanced => (w.instances, 1, w.restart_after),
        Mode::Together => (w.instances, 1, None),
    };
    let settings = core_settings(per_core, restart_after, w.restart_ms);
    let mut sim = Sim {
        w,
        rng: Rng::new(w.seed),
        jobs: Rng::new(!w.seed),
        job_ms: HashMap::new(),
        cores: (0..cores).map(|_| Core::new(settings.clone(), 0)).collect(),
        per_core,
        instances: (0..w.instances).map(|_| Instance::default()).collect(),
        heap: BinaryHeap::new(),
        seq: 0,
        now: 0,
        next_arrival: 0.0,
        arrived: 0,
        closed: 0,
        served: 0,
        waits: Vec::with_capacity(usize::try_from(w.clients).unwrap_or(0)),
        restarts: 0,
        since_restart: 0,
        restart_due: false,
        turn: 0,
        all_out_ms: 0,
        most_out: 0,
        idle_waiting_ms: 0,
        all_out_since: None,
        next_pid: 100,
    };
    for core in 0..cores {
        sim.drain(core);
    }
    let budget = w
        .clients
        .saturating_add(10)
        .saturating_mul(STEPS_PER_CLIENT);
    let mut steps = 0u64;
    // Warm up: the first generations start before any client comes.
    while !sim.instances.iter().all(|i| i.taking) {
        sim.step()?;
        steps += 1;
        if steps > budget {
            return Err("the instances never became ready".to_string());
        }
    }
    let first_arrival = sim.now;
    sim.all_out_since = None;
    sim.next_arrival = sim.now as f64;
    sim.schedule_arrival();
    while sim.closed < w.clients {
        sim.step()?;
        steps += 1;
        if steps > budget {
            return Err(format!(
                "stuck after {steps} steps: {} of {} clients closed",
                sim.closed, w.clients
            ));
        }
    }
    let span_ms = sim.now - first_arrival;
    let mut waits = sim.waits;
    waits.sort_unstable();
    Ok(Report {
        served: sim.served,
        other: sim.closed - sim.served,
        waits,
        span_ms,
        restarts: sim.restarts,
        all_out_ms: sim.all_out_ms + sim.all_out_since.map_or(0, |since| sim.now - since),
        most_out: sim.most_out,
        instances: w.instances,
        idle_waiting_ms: sim.idle_waiting_ms,
        wall: started.elapsed(),
    })
}

impl Sim<'_> {
    fn schedule(&mut self, at: u64, what: Happening) {
        self.seq += 1;
        self.heap.push(Scheduled {
            at,
            seq: self.seq,
            what,
        });
    }

    fn schedule_arrival(&mut self) {
        if self.arrived < self.w.clients {
            self.next_arrival += self.rng.exp(1_000.0 / self.w.rate);
            let at = (self.next_arrival as u64).max(self.now);
            self.schedule(at, Happening::Arrival);
        }
    }

    /// Moves the clock to the next core deadline or happening and feeds it.
    fn step(&mut self) -> Result<(), String> {
        let timer = self.cores.iter().filter_map(Core::poll_timeout).min();
        let next = self.heap.peek().map(|s| s.at);
        if let Some(t) = timer.filter(|&t| next.is_none_or(|n| t <= n)) {
            self.advance(t);
            for core in 0..self.cores.len() {
                if self.cores[core]
                    .poll_timeout()
                    .is_some_and(|t| t <= self.now)
                {
                    self.cores[core].handle_tick(self.now);
                    self.drain(core);
                }
            }
        } else if let Some(s) = self.heap.pop() {
            self.advance(s.at);
            self.happen(s.what);
        } else {
            return Err("nothing left to happen".to_string());
        }
        self.restart_together();
        Ok(())
    }

    /// Moves the clock to `to`, counting the time an instance that could
    /// serve sat idle while a client waited (in a pool: never, beyond the
    /// millisecond a handover takes).
    fn advance(&mut self, to: u64) {
        if to > self.now && self.cores.iter().any(|core| core.queue_len() > 0) {
            let idle = self
                .instances
                .iter()
                .filter(|i| i.taking && i.holding.is_none())
                .count();
            self.idle_waiting_ms += (to - self.now) * idle as u64;
        }
        self.now = self.now.max(to);
    }

    fn happen(&mut self, what: Happening) {
        let now = self.now;
        match what {
            Happening::Arrival => {
                self.arrived += 1;
                let core = self.least_connections();
                let ms = self.jobs.service(self.w.dist, self.w.service_ms);
                let client = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
                let conn = self.cores[core].handle_accepted(now, client);
                self.job_ms.insert((core, conn), ms);
                self.drain(core);
                self.schedule_arrival();
            }
            Happening::RelayEnds { core, conn } => {
                let end = RelayEnd {
                    cause: RelayCause::Finished,
                    ended_by: EndedBy::Client,
                };
                self.cores[core].handle_relay_ended(now, conn, end);
                self.drain(core);
            }
            Happening::Exits {
                core,
                instance,
                generation,
            } => {
                let slot = &mut self.instances[core * self.per_core + instance];
                if slot.process.is_some_and(|(live, _)| live == generation) {
                    slot.process = None;
                    slot.exiting = false;
                    feed_exited(&mut self.cores[core], now, instance, generation);
                    self.drain(core);
                }
            }
        }
    }

    /// The core with the fewest connections (active plus queued); ties in
    /// turn. A pool is one core.
    fn least_connections(&mut self) -> usize {
        let k = self.cores.len();
        self.turn = (self.turn + 1) % k;
        let mut best = self.turn;
        for i in 1..k {
            let core = (self.turn + i) % k;
            if self.cores[core].conn_count() < self.cores[best].conn_count() {
                best = core;
            }
        }
        best
    }

    /// Performs every action of `core`, feeding the answers that come at once.
    fn drain(&mut self, core: usize) {
        let now = self.now;
        while let Some(action) = self.cores[core].poll_action() {
            match decode(action) {
                Todo::Connect(conn, instance) => {
                    self.instances[core * self.per_core + instance].holding = Some(conn);
                    self.cores[core].handle_upstream_connected(now, conn);
                }
                Todo::Relay(conn) => {
                    let ms = self.job_ms.remove(&(core, conn)).unwrap_or(1);
                    self.schedule(now + ms, Happening::RelayEnds { core, conn });
                }
                Todo::Closed(conn, outcome) => {
                    self.job_ms.remove(&(core, conn));
                    let first = core * self.per_core;
                    for slot in &mut self.instances[first..first + self.per_core] {
                        slot.holding = slot.holding.filter(|&held| held != conn);
                    }
                    self.closed += 1;
                    self.served += u64::from(outcome == Outcome::Ok);
                }
                Todo::Probe(instance, generation) => {
                    let slot = &self.instances[core * self.per_core + instance];
                    let answered = slot.process.is_some_and(|(live, spawned_at)| {
                        live == generation && now >= spawned_at + self.w.restart_ms
                    });
                    feed_probed(&mut self.cores[core], now, instance, generation, answered);
                }
                Todo::Spawn(instance, generation, reason) => {
                    self.instances[core * self.per_core + instance].process =
                        Some((generation, now));
                    self.restarts += u64::from(reason != RestartReason::First);
                    self.next_pid += 1;
                    feed_spawned(
                        &mut self.cores[core],
                        now,
                        instance,
                        generation,
                        self.next_pid,
                    );
                }
                Todo::Sample(instance, generation) => {
                    let slot = &self.instances[core * self.per_core + instance];
                    let sample = if slot.process.is_some_and(|(live, _)| live == generation) {
                        ServiceSample {
                            processes: 1,
                            rss_kib: RSS_KIB,
                        }
                    } else {
                        ServiceSample::default()
                    };
                    feed_sampled(&mut self.cores[core], now, instance, generation, sample);
                }
                Todo::Signal(instance, generation, signal) => {
                    let slot = &mut self.instances[core * self.per_core + instance];
                    if slot.process.is_some_and(|(live, _)| live == generation) && !slot.exiting {
                        slot.exiting = true;
                        let after = if signal == StopSignal::Kill {
                            0
                        } else {
                            EXIT_MS
                        };
                        self.schedule(
                            now + after,
                            Happening::Exits {
                                core,
                                instance,
                                generation,
                            },
                        );
                    }
                }
                Todo::ReportIdle => self.cores[core].handle_holders_idle(now, 0),
                Todo::Log(event) => self.note(core, &event),
                Todo::Nothing => {}
            }
        }
    }

    fn note(&mut self, core: usize, event: &Event) {
        match news(event) {
            Some(News::Activated { waited_ms }) => {
                self.waits.push(waited_ms);
                if let (Mode::Together, Some(n)) = (self.w.mode, self.w.restart_after) {
                    self.since_restart += 1;
                    if self.since_restart >= n.saturating_mul(self.instances.len() as u64) {
                        self.since_restart = 0;
                        self.restart_due = true;
                    }
                }
            }
            Some(News::Ready(instance)) => {
                self.instances[core * self.per_core + instance].taking = true;
                if let Some(since) = self.all_out_since.take() {
                    self.all_out_ms += self.now - since;
                }
            }
            // A single instance due takes no new client; one of a pool due
            // keeps serving until its turn comes and it stops.
            Some(News::Due(instance)) if self.per_core == 1 => self.out(core, instance),
            Some(News::Stopping(instance)) => self.out(core, instance),
            Some(News::Due(_)) | None => {}
        }
    }

    /// The instance takes no new client until its next ready.
    fn out(&mut self, core: usize, instance: usize) {
        self.instances[core * self.per_core + instance].taking = false;
        let out = self.instances.iter().filter(|i| !i.taking).count();
        self.most_out = self.most_out.max(out);
        if self.all_out_since.is_none() && out == self.instances.len() {
            self.all_out_since = Some(self.now);
        }
    }

    /// `--mode together`: every instance taking clients is asked to restart.
    fn restart_together(&mut self) {
        if !std::mem::take(&mut self.restart_due) {
            return;
        }
        for core in 0..self.cores.len() {
            for instance in 0..self.per_core {
                if self.instances[core * self.per_core + instance].taking {
                    restart_instance(&mut self.cores[core], self.now, instance);
                }
            }
            self.drain(core);
        }
    }
}

// ----- the README's table -----

/// The configurations of the README's table, on `base`'s workload.
fn table(base: &Workload) -> String {
    let n = base.restart_after.unwrap_or(50);
    let dist = match base.dist {
        Dist::Exp => "--dist exp".to_string(),
        Dist::LogNormal { sigma } => format!("--dist lognormal --sigma {sigma}"),
    };
    let mut out = format!(
        "cargo run --release --features model --example simulate -- --table \
         --instances {} --service-ms {} {dist} --restart-after {n} --restart-ms {} \
         --clients {} --seed {}\n\
         Per load: rows 1 and 2 differ only in the dispatch (one queue, or leastconn at \
         arrival); rows 4 and 5 only in when the instances restart; row 3 is the pool's \
         one queue with its rolling restarts.\n\n\
         | load | setup | restarts | clients/s | wait p50 | p90 | p99 | max | most out | all out | idle while a client waits |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        base.instances, base.service_ms, base.restart_ms, base.clients, base.seed
    );
    let k = base.instances as f64;
    for load in [0.7, 0.9] {
        let rows = [
            (Mode::Pool, None, "one pool, no leak".to_string()),
            (
                Mode::Balanced,
                None,
                "leastconn over singles, no leak".to_string(),
            ),
            (
                Mode::Pool,
                Some(n),
                format!("one pool, rolling restart every {n}"),
            ),
            (
                Mode::Balanced,
                Some(n),
                format!("leastconn over singles, each restarts every {n}"),
            ),
            (
                Mode::Together,
                Some(n),
                format!("leastconn over singles, all restart together every {n}"),
            ),
        ];
        for (mode, restart_after, label) in rows {
            let w = Workload {
                mode,
                restart_after,
                rate: load * k * 1_000.0 / base.service_ms,
                ..base.clone()
            };
            let row = match simulate(&w) {
                Ok(r) => format!(
                    "{} | {:.3} | {} ms | {} ms | {} ms | {} ms | {} | {:.2}% | {:.2}% |",
                    r.restarts,
                    r.throughput(),
                    r.wait(50.0),
                    r.wait(90.0),
                    r.wait(99.0),
                    r.waits.last().copied().unwrap_or(0),
                    r.most_out,
                    r.all_out_ms as f64 * 100.0 / r.span_ms.max(1) as f64,
                    r.idle_waiting_pct(),
                ),
                Err(error) => format!("{error} | | | | | | | | |"),
            };
            out.push_str(&format!("| {:.0}% | {label} | {row}\n", load * 100.0));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(mode: Mode, instances: usize, restart_after: Option<u64>) -> Workload {
        Workload {
            clients: 2_000,
            rate: 0.8 * instances as f64 * 1_000.0 / 200.0,
            service_ms: 200.0,
            instances,
            restart_after,
            restart_ms: 1_000,
            mode,
            ..Workload::default()
        }
    }

    #[test]
    fn the_generator_is_seeded_and_its_means_are_right() {
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..5).map(|_| rng.next_u64()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let mut rng = Rng::new(1);
        let n = 200_000;
        let exp: f64 = (0..n).map(|_| rng.exp(100.0)).sum::<f64>() / n as f64;
        assert!((exp - 100.0).abs() < 2.0, "exp mean {exp}");
        let dist = Dist::LogNormal { sigma: 1.0 };
        let ln = (0..n).map(|_| rng.service(dist, 1_000.0)).sum::<u64>() as f64 / n as f64;
        assert!((ln - 1_000.0).abs() < 30.0, "lognormal mean {ln}");
        assert!((0..n).all(|_| rng.unit() > 0.0 && rng.service(Dist::Exp, 0.1) >= 1));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[5], 90.0), 5);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn a_pool_of_one_is_one_single_tcplock() {
        let pool = simulate(&small(Mode::Pool, 1, Some(50))).unwrap();
        let single = simulate(&small(Mode::Balanced, 1, Some(50))).unwrap();
        assert_eq!(pool.waits, single.waits);
        assert_eq!(
            (pool.span_ms, pool.restarts),
            (single.span_ms, single.restarts)
        );
        assert!(pool.waits.iter().any(|&w| w > 0), "nobody ever waited");
    }

    #[test]
    fn every_client_is_served_and_the_leak_restarts_every_n() {
        let r = simulate(&small(Mode::Balanced, 2, Some(50))).unwrap();
        assert_eq!((r.served, r.other, r.waits.len()), (2_000, 0, 2_000));
        // 2,000 jobs over two instances, a restart after each 50th.
        assert!((38..=40).contains(&r.restarts), "restarts {}", r.restarts);
        let clean = simulate(&small(Mode::Balanced, 2, None)).unwrap();
        assert_eq!((clean.restarts, clean.all_out_ms), (0, 0));
        assert!(r.wait(99.0) > clean.wait(99.0), "restarts cost no wait");
    }

    #[test]
    fn a_pool_never_idles_an_instance_while_a_client_waits() {
        let pool = simulate(&small(Mode::Pool, 4, None)).unwrap();
        let balanced = simulate(&small(Mode::Balanced, 4, None)).unwrap();
        assert_eq!((pool.served, balanced.served), (2_000, 2_000));
        assert_eq!(pool.idle_waiting_ms, 0, "{pool:?}");
        assert!(balanced.idle_waiting_ms > 0, "{balanced:?}");
        // The same clients with the same jobs: one queue waits less in all.
        let total = |r: &Report| r.waits.iter().sum::<u64>();
        assert!(total(&pool) < total(&balanced));
    }

    #[test]
    fn a_pool_restarts_one_instance_at_a_time() {
        let r = simulate(&small(Mode::Pool, 4, Some(25))).unwrap();
        assert_eq!((r.served, r.other), (2_000, 0));
        // An instance due while another is out keeps serving: a few more
        // than 25 jobs each, so a few fewer restarts than 2,000 / 25.
        assert!((70..=80).contains(&r.restarts), "restarts {}", r.restarts);
        assert_eq!((r.most_out, r.all_out_ms, r.idle_waiting_ms), (1, 0, 0));
    }

    #[test]
    fn restarting_together_empties_the_service() {
        let apart = simulate(&small(Mode::Balanced, 4, Some(25))).unwrap();
        let together = simulate(&small(Mode::Together, 4, Some(25))).unwrap();
        assert!((together.restarts as i64 - apart.restarts as i64).abs() <= 8);
        // Each round takes every instance out for about a restart.
        let rounds = together.restarts / 4;
        assert!(together.all_out_ms >= rounds * 500, "{together:?}");
        assert!(together.all_out_ms > 4 * apart.all_out_ms);
        assert_eq!(together.most_out, 4);
    }

    #[test]
    fn bad_options_are_refused_naming_the_flag() {
        let args = |list: &[&str]| parse(list.iter().map(|s| s.into()).collect::<Vec<_>>());
        let error = |list: &[&str]| args(list).unwrap_err();
        assert!(error(&["--rate", "fast"]).starts_with("--rate: \"fast\""));
        assert!(error(&["--instances", "0"]).starts_with("--instances:"));
        assert!(error(&["--mode", "mesh"]).starts_with("--mode:"));
        assert!(error(&["--mode", "together"]).contains("--restart-after"));
        assert!(error(&["--nope"]).contains("--nope"));
        let Ok(Command::Run(w)) = args(&["--dist", "exp", "--restart-after", "9", "--seed", "3"])
        else {
            panic!("not a run");
        };
        assert_eq!((w.dist, w.restart_after, w.seed), (Dist::Exp, Some(9), 3));
    }
}
