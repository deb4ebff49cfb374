//! The `pool` scenario of `examples/bench` (issue 12), run as the bench runs
//! it: its own stand-in instances, the real tcplock binary and, where it is
//! installed, HAProxy. The bench itself asserts nothing; these tests check
//! that what it measures is what it says: every client answered, waits that
//! a serial instance makes unavoidable, the ordering and load counts.

#[allow(dead_code)]
#[path = "../examples/bench/proxy.rs"]
mod proxy;
#[allow(dead_code)]
#[path = "../examples/bench/scenarios.rs"]
mod scenarios;
#[allow(dead_code)]
#[path = "../examples/bench/upstream.rs"]
mod upstream;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use proxy::Kind;
use scenarios::{Scenario, Sizes, summarize_pool};
use upstream::{Arrival, Upstreams};

/// The scenario's values, by name, in the order of `Scenario::Pool.metrics()`.
struct Values {
    clients_per_s: f64,
    wait_p50_ms: f64,
    wait_p99_ms: f64,
    inversions: f64,
    late_inversions: f64,
    served: f64,
    load_spread: f64,
}

fn sizes(clients: usize, instances: usize, service: Duration) -> Sizes {
    Sizes {
        bulk_bytes: 0,
        churn: Duration::ZERO,
        clients: 0,
        churn_permits: 0,
        queued: 0,
        proxying: 0,
        proxying_fill: 0,
        fifo: 0,
        leaving: 0,
        pool_clients: clients,
        pool_instances: instances,
        pool_service: service,
    }
}

fn tcplock() -> Kind {
    Kind::Tcplock {
        exe: PathBuf::from(env!("CARGO_BIN_EXE_tcplock")),
        log_level: "warn".to_owned(),
        extra: Vec::new(),
    }
}

fn start(sizes: &Sizes) -> Upstreams {
    upstream::start(1, sizes.pool_instances, sizes.pool_service).expect("pool instances start")
}

fn run(kind: &Kind, up: &Upstreams, sizes: &Sizes) -> Result<Values, String> {
    let v = Scenario::Pool.run(Some(kind), up, sizes)?;
    let names: Vec<&str> = Scenario::Pool.metrics().iter().map(|m| m.name).collect();
    assert_eq!(
        names,
        [
            "clients/s",
            "wait p50 ms",
            "wait p99 ms",
            "inversions",
            "inversions > 1 ms",
            "served",
            "instance load max−min"
        ]
    );
    assert_eq!(v.len(), names.len(), "{v:?}");
    Ok(Values {
        clients_per_s: v[0],
        wait_p50_ms: v[1],
        wait_p99_ms: v[2],
        inversions: v[3],
        late_inversions: v[4],
        served: v[5],
        load_spread: v[6],
    })
}

/// Requests each instance received, by 0-based instance.
fn per_instance(up: &Upstreams) -> Vec<usize> {
    let mut counts = vec![0; up.pool.len()];
    for a in up.arrivals.lock().unwrap().iter() {
        counts[a.instance] += 1;
    }
    counts
}

fn haproxy() -> Option<Kind> {
    // Debian puts it in /usr/sbin, which a user's PATH may lack.
    let exe = std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("haproxy"))
                .find(|candidate| candidate.is_file())
        })
        .or_else(|| Some(PathBuf::from("/usr/sbin/haproxy")).filter(|p| p.is_file()));
    if exe.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "haproxy is missing under CI (.ci/run installs it)"
        );
        eprintln!("skipped: haproxy is not installed (apt-get install haproxy)");
    }
    exe.map(|exe| Kind::Haproxy { exe })
}

#[test]
fn one_instance_through_tcplock_serves_everyone_in_order_and_waits_add_up() {
    let service = Duration::from_millis(20);
    let sizes = sizes(30, 1, service);
    let up = start(&sizes);
    let v = run(&tcplock(), &up, &sizes).expect("pool run through tcplock");
    assert_eq!(v.served, 30.0);
    assert_eq!(v.inversions, 0.0, "one instance behind a FIFO queue");
    assert_eq!(v.late_inversions, 0.0);
    assert_eq!(v.load_spread, 0.0);
    assert_eq!(per_instance(&up), [30]);
    // One instance serves one request per 20 ms: 30 of them take 600 ms at
    // least, and client i reaches it only after clients 0..i were served.
    assert!(v.clients_per_s <= 50.0, "{} clients/s", v.clients_per_s);
    assert!(v.clients_per_s > 0.0);
    // p50 is client 15's wait (≥ 15 × 20 ms less its own connect delay),
    // p99 client 29's (≥ 29 × 20 ms less the same).
    assert!(v.wait_p50_ms >= 200.0, "p50 {} ms", v.wait_p50_ms);
    assert!(v.wait_p99_ms >= 500.0, "p99 {} ms", v.wait_p99_ms);
    assert!(v.wait_p99_ms >= v.wait_p50_ms);
}

#[test]
fn four_instances_through_haproxy_are_all_used() {
    let Some(haproxy) = haproxy() else {
        return;
    };
    let service = Duration::from_millis(20);
    let sizes = sizes(40, 4, service);
    let up = start(&sizes);
    let v = run(&haproxy, &up, &sizes).expect("pool run through haproxy");
    assert_eq!(v.served, 40.0);
    let counts = per_instance(&up);
    assert_eq!(counts.iter().sum::<usize>(), 40);
    assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
    let spread = counts.iter().max().unwrap() - counts.iter().min().unwrap();
    assert_eq!(v.load_spread, spread as f64);
    // Four instances at one request per 20 ms each: 200 clients/s at most;
    // the last client waits for 9 rounds before its own.
    assert!(v.clients_per_s <= 200.0, "{} clients/s", v.clients_per_s);
    assert!(v.wait_p99_ms >= 140.0, "p99 {} ms", v.wait_p99_ms);
    assert!(v.late_inversions <= v.inversions);
}

/// tcplock with `-u A,B,C,D`: one queue over four instances.
#[test]
fn four_instances_through_tcplock_are_all_used() {
    let service = Duration::from_millis(20);
    let sizes = sizes(40, 4, service);
    let up = start(&sizes);
    let v = match run(&tcplock(), &up, &sizes) {
        Ok(v) => v,
        Err(e) => panic!("pool run through tcplock: {e}"),
    };
    assert_eq!(v.served, 40.0);
    let counts = per_instance(&up);
    assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
    assert!(v.clients_per_s <= 200.0, "{} clients/s", v.clients_per_s);
    assert!(v.wait_p99_ms >= 140.0, "p99 {} ms", v.wait_p99_ms);
    assert!(v.late_inversions <= v.inversions);
}

fn arrival(index: u32, instance: usize, at_ms: u64) -> Arrival {
    Arrival {
        run: 1,
        index,
        instance,
        at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_000 + at_ms),
        kernel_stamp: true,
    }
}

#[test]
fn summary_counts_inversions_waits_and_load() {
    let connected: Vec<SystemTime> = (0..5)
        .map(|i| SystemTime::UNIX_EPOCH + Duration::from_millis(1_000 + i))
        .collect();
    // Client 2 reached an instance at 10 ms, 2 ms before client 1 (12 ms);
    // client 4 at 20 ms, 5 ms before client 3 (25 ms). Instance 1 took
    // three requests, instance 0 two, instance 2 none.
    let arrivals = [
        arrival(0, 0, 0),
        arrival(2, 1, 10),
        arrival(1, 0, 12),
        arrival(4, 1, 20),
        arrival(3, 1, 25),
    ];
    let s = summarize_pool(&arrivals, &connected, 3);
    assert_eq!(s.inversions, 2);
    assert_eq!(s.late_overtakes, 2);
    assert_eq!(s.load_spread, 3);
    // Waits: 0, 11, 8, 22, 16 ms → sorted 0, 8, 11, 16, 22.
    assert_eq!(s.wait_p50_ms, 11.0);
    assert_eq!(s.wait_p99_ms, 22.0);
}

#[test]
fn summary_tells_reordering_within_a_millisecond_from_overtaking() {
    let connected = vec![SystemTime::UNIX_EPOCH; 3];
    let mut late = arrival(2, 1, 5);
    late.at -= Duration::from_micros(300);
    // Client 2 reached its instance 0.3 ms before client 1: an inversion, not
    // an overtake by more than 1 ms; client 0 came 4 ms earlier still.
    let arrivals = [arrival(1, 0, 5), late, arrival(0, 2, 1)];
    let s = summarize_pool(&arrivals, &connected, 3);
    assert_eq!(s.inversions, 1);
    assert_eq!(s.late_overtakes, 0);
    assert_eq!(s.load_spread, 0);
    // Equal times are no inversion either way.
    let tied = [arrival(1, 0, 5), arrival(0, 1, 5)];
    assert_eq!(summarize_pool(&tied, &connected, 2).inversions, 0);
}
