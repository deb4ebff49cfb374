//! tcplock benchmark: the scenarios of issue 5, run directly against the
//! upstream, through tcplock, and through HAProxy (when `haproxy` is on the
//! PATH), interleaved, printed as one table of medians with min–max.
//!
//! ```text
//! cargo build --release && cargo run --release --example bench -- [OPTIONS]
//! ```
//! Options: `--quick` (small sizes, one run), `--runs R` (default 5),
//! `--only bulk,churn,queue,proxying,fifo,queue-leave,scrape,pool`,
//! `--targets direct,tcplock,haproxy`,
//! `--tcplock PATH` (or `TCPLOCK_BIN`; default `target/release/tcplock` under
//! the crate root), `--tcplock-args "--splice on"` (extra arguments),
//! `--haproxy PATH`, `--tcplock-log-level LEVEL` (default warn: HAProxy is run
//! without logging too), and size overrides
//! `--bulk-mib`, `--churn-secs`, `--clients`, `--churn-permits`, `--queued`,
//! `--proxying`, `--fifo`, `--leaving` (queue-leave: clients that queue and
//! leave newest-first; each needs a descriptor in the bench and in tcplock),
//! `--pool-clients` (default 400; 100 with `--quick`), `--pool-instances`
//! (4) and `--pool-service-ms` (50): the pool scenario's clients, the
//! instances behind one queue with one permit each, and each request's
//! service time.
//!
//! Not part of `cargo test`: a benchmark prints numbers, it asserts nothing.

mod proxy;
mod scenarios;
mod upstream;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use proxy::Kind;
use scenarios::{Scenario, Sizes};

fn main() -> ExitCode {
    let opts = match Opts::parse() {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

// ----- options -----

struct Opts {
    runs: usize,
    scenarios: Vec<Scenario>,
    targets: Vec<Target>,
    tcplock: PathBuf,
    tcplock_log_level: String,
    tcplock_args: Vec<String>,
    haproxy: Option<PathBuf>,
    sizes: Sizes,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Direct,
    Tcplock,
    Haproxy,
}

impl Target {
    const ALL: [Target; 3] = [Target::Direct, Target::Tcplock, Target::Haproxy];

    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Tcplock => "tcplock",
            Target::Haproxy => "haproxy",
        }
    }
}

impl Opts {
    fn parse() -> Result<Opts, String> {
        use lexopt::prelude::*;
        let mut parser = lexopt::Parser::from_env();
        let mut quick = false;
        let mut runs = None;
        let mut only: Option<String> = None;
        let mut targets: Option<String> = None;
        let mut tcplock = std::env::var_os("TCPLOCK_BIN").map(PathBuf::from);
        let mut haproxy = None;
        let mut log_level = "warn".to_owned();
        let mut tcplock_args = Vec::new();
        let mut overrides: Vec<(String, f64)> = Vec::new();
        while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
            match arg {
                Long("quick") => quick = true,
                Long("runs") => runs = Some(number(&mut parser, "--runs")? as usize),
                Long("only") => only = Some(string(&mut parser)?),
                Long("targets") => targets = Some(string(&mut parser)?),
                Long("tcplock") => tcplock = Some(PathBuf::from(string(&mut parser)?)),
                Long("haproxy") => haproxy = Some(PathBuf::from(string(&mut parser)?)),
                Long("tcplock-log-level") => log_level = string(&mut parser)?,
                Long("tcplock-args") => {
                    let args = string(&mut parser)?;
                    tcplock_args.extend(args.split_whitespace().map(str::to_owned));
                }
                Long(
                    name @ ("bulk-mib" | "churn-secs" | "clients" | "churn-permits" | "queued"
                    | "proxying" | "fifo" | "leaving" | "pool-clients" | "pool-instances"
                    | "pool-service-ms"),
                ) => {
                    let name = name.to_owned();
                    let value = number(&mut parser, &name)?;
                    overrides.push((name, value));
                }
                Long("help") | Short('h') => {
                    return Err(
                        "options: --quick --runs R \
                         --only bulk,churn,queue,proxying,fifo,queue-leave,scrape,pool \
                         --targets direct,tcplock,haproxy --tcplock PATH --tcplock-args ARGS \
                         --haproxy PATH --tcplock-log-level LEVEL --bulk-mib M --churn-secs S --clients C \
                         --churn-permits N --queued K --proxying N --fifo N --leaving K \
                         --pool-clients C --pool-instances K --pool-service-ms MS"
                            .to_owned(),
                    );
                }
                other => return Err(other.unexpected().to_string()),
            }
        }
        let mut sizes = if quick {
            Sizes {
                bulk_bytes: 64 << 20,
                churn: Duration::from_secs(1),
                clients: 16,
                churn_permits: 4,
                queued: 1_000,
                proxying: 64,
                proxying_fill: 64 * 1024,
                fifo: 200,
                leaving: 2_000,
                pool_clients: 100,
                pool_instances: 4,
                pool_service: Duration::from_millis(50),
            }
        } else {
            Sizes {
                bulk_bytes: 1 << 30,
                churn: Duration::from_secs(5),
                clients: 16,
                churn_permits: 4,
                queued: 10_000,
                proxying: 256,
                proxying_fill: 64 * 1024,
                fifo: 1_000,
                leaving: 100_000,
                pool_clients: 400,
                pool_instances: 4,
                pool_service: Duration::from_millis(50),
            }
        };
        for (name, value) in overrides {
            match name.as_str() {
                "bulk-mib" => sizes.bulk_bytes = (value as u64) << 20,
                "churn-secs" => sizes.churn = Duration::from_secs_f64(value),
                "clients" => sizes.clients = value as usize,
                "churn-permits" => sizes.churn_permits = value as usize,
                "queued" => sizes.queued = value as usize,
                "proxying" => sizes.proxying = value as usize,
                "leaving" => sizes.leaving = value as usize,
                "pool-clients" => sizes.pool_clients = value as usize,
                "pool-instances" => sizes.pool_instances = (value as usize).max(1),
                "pool-service-ms" => sizes.pool_service = Duration::from_secs_f64(value / 1e3),
                _ => sizes.fifo = value as usize,
            }
        }
        let scenarios = match only {
            None => Scenario::ALL.to_vec(),
            Some(list) => {
                let names: Vec<&str> = list.split(',').collect();
                if let Some(bad) = names
                    .iter()
                    .find(|n| !Scenario::ALL.iter().any(|s| s.group() == **n))
                {
                    return Err(format!(
                        "--only: unknown scenario '{bad}' (bulk, churn, queue, proxying, fifo, \
                         queue-leave, scrape, pool)"
                    ));
                }
                Scenario::ALL
                    .into_iter()
                    .filter(|s| names.contains(&s.group()))
                    .collect()
            }
        };
        let targets = match targets {
            None => Target::ALL.to_vec(),
            Some(list) => {
                let mut chosen = Vec::new();
                for name in list.split(',') {
                    let target = Target::ALL
                        .into_iter()
                        .find(|t| t.name() == name)
                        .ok_or_else(|| format!("--targets: unknown target '{name}'"))?;
                    chosen.push(target);
                }
                chosen
            }
        };
        let tcplock = tcplock.unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/tcplock")
        });
        Ok(Opts {
            runs: runs.unwrap_or(if quick { 1 } else { 5 }).max(1),
            scenarios,
            targets,
            tcplock,
            tcplock_log_level: log_level,
            tcplock_args,
            haproxy: haproxy.or_else(|| find_on_path("haproxy")),
            sizes,
        })
    }
}

fn string(parser: &mut lexopt::Parser) -> Result<String, String> {
    parser
        .value()
        .map_err(|e| e.to_string())?
        .into_string()
        .map_err(|_| "argument is not unicode".to_owned())
}

fn number(parser: &mut lexopt::Parser, flag: &str) -> Result<f64, String> {
    let value = string(parser)?;
    value
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .ok_or_else(|| format!("{flag}: expected a positive number, got '{value}'"))
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

// ----- running -----

/// Values of one metric per target: `samples[target][run]`.
struct Row {
    scenario: String,
    metric: &'static str,
    higher_is_better: bool,
    samples: [Vec<f64>; 3],
}

fn run(opts: &Opts) -> Result<(), String> {
    if !opts.tcplock.is_file() {
        return Err(format!(
            "tcplock binary not found at {} — build it with `cargo build --release` \
             (or pass --tcplock PATH / set TCPLOCK_BIN)",
            opts.tcplock.display()
        ));
    }
    let mut targets = opts.targets.clone();
    if opts.haproxy.is_none() && targets.contains(&Target::Haproxy) {
        eprintln!("bench: haproxy is not on the PATH; its column stays empty");
        targets.retain(|t| *t != Target::Haproxy);
    }
    match proxy::raise_open_files_limit() {
        Ok(limit) if (limit as usize) < descriptors_needed(opts) => eprintln!(
            "bench: open files limit {limit} is too low for --queued {} / --leaving {}",
            opts.sizes.queued, opts.sizes.leaving
        ),
        Ok(_) => {}
        Err(e) => eprintln!("bench: cannot raise the open files limit: {e}"),
    }
    let load_before = load_average();
    let echo_workers = opts.sizes.proxying.max(opts.sizes.clients) + 16;
    let pool_instances = if opts.scenarios.contains(&Scenario::Pool) {
        opts.sizes.pool_instances
    } else {
        0
    };
    let up = upstream::start(echo_workers, pool_instances, opts.sizes.pool_service)
        .map_err(|e| format!("cannot start upstreams: {e}"))?;
    let kind = |target: Target| match target {
        Target::Direct => None,
        Target::Tcplock => Some(Kind::Tcplock {
            exe: opts.tcplock.clone(),
            log_level: opts.tcplock_log_level.clone(),
            extra: opts.tcplock_args.clone(),
        }),
        Target::Haproxy => opts.haproxy.clone().map(|exe| Kind::Haproxy { exe }),
    };
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for &scenario in &opts.scenarios {
        let label = scenario.label(&opts.sizes);
        let first_row = rows.len();
        for metric in scenario.metrics() {
            rows.push(Row {
                scenario: label.clone(),
                metric: metric.name,
                higher_is_better: metric.higher_is_better,
                samples: Default::default(),
            });
        }
        for round in 1..=opts.runs {
            for &target in &targets {
                if target == Target::Direct && !scenario.has_direct() {
                    continue;
                }
                let result = scenario.run(kind(target).as_ref(), &up, &opts.sizes);
                let summary = match &result {
                    Ok(values) => format_values(values),
                    Err(e) => e.clone(),
                };
                eprintln!(
                    "{label} run {round}/{} {}: {summary}",
                    opts.runs,
                    target.name()
                );
                match result {
                    Ok(values) => {
                        for (row, value) in rows[first_row..].iter_mut().zip(values) {
                            if !value.is_nan() {
                                row.samples[target as usize].push(value);
                            }
                        }
                    }
                    Err(e) => errors.push(format!("{label} {}: {e}", target.name())),
                }
            }
        }
    }
    print_report(opts, &rows, &errors, &load_before);
    Ok(())
}

/// Descriptors the bench itself holds at most: one per client of the largest
/// selected queue scenario, plus some slack.
fn descriptors_needed(opts: &Opts) -> usize {
    let clients = opts.scenarios.iter().map(|s| match s {
        Scenario::Queue => opts.sizes.queued,
        Scenario::QueueLeave => opts.sizes.leaving,
        Scenario::Scrape => opts.sizes.queued,
        Scenario::Pool => opts.sizes.pool_clients,
        _ => 0,
    });
    clients.max().unwrap_or(0) + 512
}

fn format_values(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format_number(*v))
        .collect::<Vec<_>>()
        .join(" ")
}

// ----- report -----

fn print_report(opts: &Opts, rows: &[Row], errors: &[String], load_before: &str) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "command: cargo run --release --example bench{}{}",
        if args.is_empty() { "" } else { " -- " },
        args.join(" ")
    );
    let _ = writeln!(out, "machine: {}", machine());
    let _ = writeln!(
        out,
        "versions: {} | {}",
        first_line(&opts.tcplock, &["-V"]),
        opts.haproxy
            .as_ref()
            .map_or("haproxy: not found".to_owned(), |h| first_line(h, &["-v"]))
    );
    let _ = writeln!(
        out,
        "load average (1/5/15 min): before {load_before}, after {}",
        load_average()
    );
    let _ = writeln!(
        out,
        "runs: {} per target, interleaved; cells are median [min–max]; ratios are of medians; \
         ↑ higher is better, ↓ lower is better; MB = 10^6 bytes",
        opts.runs
    );
    let _ = writeln!(out);
    let header = [
        "scenario",
        "metric",
        "direct",
        "tcplock",
        "haproxy",
        "tcplock/direct",
        "tcplock/haproxy",
    ];
    let mut table: Vec<[String; 7]> = vec![header.map(str::to_owned)];
    for row in rows {
        let medians = row.samples.each_ref().map(|s| median(s));
        let ratio = |other: Option<f64>| match (medians[1], other) {
            (Some(a), Some(b)) if b != 0.0 => format!("{a_over_b:.2}", a_over_b = a / b),
            _ => "—".to_owned(),
        };
        table.push([
            row.scenario.clone(),
            format!(
                "{} {}",
                row.metric,
                if row.higher_is_better { "↑" } else { "↓" }
            ),
            cell(&row.samples[0]),
            cell(&row.samples[1]),
            cell(&row.samples[2]),
            ratio(medians[0]),
            ratio(medians[2]),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|c| {
            table
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for (i, row) in table.iter().enumerate() {
        let mut line = String::new();
        for (c, text) in row.iter().enumerate() {
            let pad = widths[c] - text.chars().count();
            if c < 2 {
                let _ = write!(line, "{text}{}  ", " ".repeat(pad));
            } else {
                let _ = write!(line, "{}{text}  ", " ".repeat(pad));
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
        if i == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * 6;
            let _ = writeln!(out, "{}", "-".repeat(total));
        }
    }
    for note in opts.scenarios.iter().filter_map(|s| s.note()) {
        let _ = writeln!(out, "{note}");
    }
    if !errors.is_empty() {
        let _ = writeln!(out, "\nfailed runs:");
        for e in errors {
            let _ = writeln!(out, "  {e}");
        }
    }
    print!("{out}");
}

fn median(samples: &[f64]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

fn cell(samples: &[f64]) -> String {
    let Some(m) = median(samples) else {
        return "—".to_owned();
    };
    if samples.len() == 1 {
        return format_number(m);
    }
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let max = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "{} [{}–{}]",
        format_number(m),
        format_number(min),
        format_number(max)
    )
}

fn format_number(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || v == v.trunc() && a < 1e15 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned());
    let mem_kib = fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    format!(
        "nproc {nproc}, {cpu}, Linux {kernel}, {} MiB RAM",
        mem_kib.map_or(0, |k| k / 1024)
    )
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".to_owned(),
        |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

fn first_line(exe: &Path, args: &[&str]) -> String {
    Command::new(exe)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("{}: no version", exe.display()))
}
