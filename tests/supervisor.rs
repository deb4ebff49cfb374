//! The supervised upstream (`--spawn`), end to end against the stand-in
//! office (`tests/office_standin.py`): a wrapper that forks the real server,
//! whose memory grows per connection, that can ignore SIGTERM and that hands
//! off to a running copy. Each test reads what tcplock logged and what the
//! office recorded, and ends with the proof that no generation was ever
//! started beside a live one.
mod common;
mod officekit;

use common::*;
use officekit::*;
use std::io::Write;
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

/// `event=EV gen=GEN`.
fn gen_event(ev: &'static str, generation: u64) -> impl Fn(&str) -> bool + Clone {
    move |l: &str| is_event(l, ev) && field(l, "gen") == Some(generation.to_string())
}

/// Index of the first log line matching `pred` (panics if none).
fn position(proxy: &Proxy, pred: impl Fn(&str) -> bool, what: &str) -> usize {
    proxy
        .logs()
        .iter()
        .position(|l| pred(l))
        .unwrap_or_else(|| panic!("no log line for {what}"))
}

/// Stops tcplock with SIGTERM and expects exit 0 with nothing of the
/// service left: no live process in the session of any generation.
fn stop_clean(mut proxy: Proxy, office: &Office) {
    let leaders: Vec<u32> = starts(&proxy).iter().map(|&(_, pid)| pid).collect();
    let status = proxy.stop(START_WAIT).expect("tcplock exits after SIGTERM");
    assert!(status.success(), "tcplock exit status {status:?}");
    for leader in leaders {
        let left = session_members(leader);
        assert!(
            left.is_empty(),
            "processes of session {leader} left after tcplock exited: {left:?}"
        );
    }
    office.assert_never_two();
}

#[test]
fn no_client_reaches_a_starting_service() {
    let office = Office::new("gating");
    let port = unused_port();
    let args = office_args(
        &office,
        port,
        "--startup-delay 1.5 --say 'hello from the office'",
        &[],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // What tcplock's own supervisor gave it stays with tcplock.
    let proxy = Proxy::start_with_env(
        &[
            ("NOTIFY_SOCKET", "/run/nowhere"),
            ("LISTEN_FDS", "3"),
            ("WATCHDOG_USEC", "1"),
        ],
        &args,
    );
    // Clients arrive while the office is still starting; each waits.
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let mut c = proxy.connect();
            c.write_all(b"WHO\n").expect("write");
            c
        })
        .collect();
    // Served in turn, each by the ready office.
    for mut c in clients {
        assert_eq!(answer(&mut c).0, 1);
        finish(c);
    }
    let ready_line = ready(&proxy, 1);
    assert!(
        num_field(&ready_line, "start_ms") >= 1500,
        "ready before the server listened: {ready_line}"
    );
    let ready_at = position(&proxy, gen_event("upstream_ready", 1), "ready");
    let first_activation = position(&proxy, event("activated"), "an activation");
    assert!(
        ready_at < first_activation,
        "a client was activated before the service was ready"
    );
    assert!(
        proxy.wait_for_count(outcome("ok"), 3, WAIT),
        "three clients served"
    );
    assert_eq!(proxy.count_logs(event("connect_failed")), 0);

    // The environment: where to listen, which generation, why.
    let start = office.of_gen("wrapper_start", 1).expect("wrapper of gen 1");
    assert_field(&start, "reason", "first");
    assert_field(&start, "notify", "-");
    let listening = office.of_gen("listening", 1).expect("gen 1 listened");
    assert_eq!(num_field(&listening, "port"), u64::from(port));
    let starting = proxy.expect_log(gen_event("upstream_starting", 1), "gen 1 starting");
    assert_eq!(field(&starting, "reason").as_deref(), Some("first"));
    assert_eq!(
        num_field(&starting, "pid"),
        u64::from(office.wrapper_pid(1))
    );
    // A new session: the wrapper leads it.
    assert_eq!(
        field(&start, "sid"),
        field(&start, "pid"),
        "the service is not in a session of its own: {start}"
    );

    // SIGUSR1's dump has one line for the service.
    proxy.signal("USR1");
    let state = proxy.expect_log(
        |l: &str| is_event(l, "state") && field(l, "service").as_deref() == Some("upstream"),
        "the service's state line",
    );
    assert_field(&state, "state", "ready");
    assert_eq!(num_field(&state, "gen"), 1, "{state}");
    assert_eq!(
        num_field(&state, "pid"),
        u64::from(office.wrapper_pid(1)),
        "{state}"
    );
    assert_eq!(num_field(&state, "conns"), 3, "{state}");
    assert!(num_field(&state, "rss_kib") > 1024, "{state}");

    // Its stdout and stderr are log lines.
    let said = |l: &str| {
        is_event(l, "output")
            && field(l, "from").as_deref() == Some("upstream")
            && field(l, "gen").as_deref() == Some("1")
            && field(l, "line").as_deref() == Some("hello from the office")
    };
    assert!(
        proxy.wait_for_count(said, 2, WAIT),
        "the office's stdout and stderr lines were not logged"
    );
    stop_clean(proxy, &office);
}

#[test]
fn restart_after_n_connections_exactly() {
    let office = Office::new("after-n");
    let port = unused_port();
    let proxy = start_proxy(&office, port, "", &["--restart-after", "3"]);
    let served: Vec<u64> = (0..7).map(|_| served_by(&proxy)).collect();
    assert_eq!(served, [1, 1, 1, 2, 2, 2, 3]);
    assert_eq!(
        reasons(&proxy, "upstream_starting"),
        ["first", "after_n", "after_n"]
    );
    let due: Vec<(u64, String)> = proxy
        .matching(event("restart_due"))
        .iter()
        .map(|l| (num_field(l, "gen"), field(l, "reason").unwrap_or_default()))
        .collect();
    assert_eq!(due, [(1, "after_n".into()), (2, "after_n".into())]);
    for generation in [1, 2] {
        let exited = proxy.expect_log(gen_event("upstream_exited", generation), "a planned exit");
        assert_field(&exited, "expected", "true");
    }
    // Each server saw exactly its three connections.
    for generation in [1, 2] {
        let n = office
            .matching("conn")
            .iter()
            .filter(|l| field(l, "gen") == Some(generation.to_string()))
            .count();
        assert_eq!(n, 3, "gen {generation}");
    }
    stop_clean(proxy, &office);
}

#[test]
fn a_ttl_expiry_restarts_with_the_queue_intact() {
    let office = Office::new("ttl");
    let port = unused_port();
    let proxy = start_proxy(
        &office,
        port,
        "",
        &[
            "-t",
            "1s",
            "--restart-on",
            "timeout",
            "--queue-timeout",
            "60s",
        ],
    );
    let mut hung = proxy.connect();
    assert_eq!(who(&mut hung).0, 1);
    // Two clients wait behind the hung one, their questions already sent.
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let mut c = proxy.connect();
            c.write_all(b"WHO\n").expect("write");
            c
        })
        .collect();
    expect_closed(&mut hung, WAIT).expect("the TTL cuts the hung client");
    proxy.expect_log(closed_with(1, "timeout"), "conn 1 timed out");
    let due = proxy.expect_log(gen_event("restart_due", 1), "restart due after the timeout");
    assert_field(&due, "reason", "timeout");
    // Each is done well within its own TTL, so gen 2 serves both.
    for mut c in waiting {
        assert_eq!(answer(&mut c).0, 2);
        finish(c);
    }
    for conn in [2, 3] {
        proxy.expect_log(closed_with(conn, "ok"), "a waiting client served");
    }
    assert_eq!(reasons(&proxy, "upstream_starting"), ["first", "timeout"]);
    stop_clean(proxy, &office);
}

#[test]
fn restart_rss_fires_only_between_connections() {
    let office = Office::new("rss");
    let port = unused_port();
    // Two idle pythons hold ~25 MiB; one connection adds 64.
    let proxy = start_proxy(&office, port, "--grow-mib 64", &["--restart-rss", "60m"]);
    ready(&proxy, 1);
    let mut busy = proxy.connect();
    assert_eq!(who(&mut busy).0, 1);
    let mut next = proxy.connect();
    next.write_all(b"WHO\n").expect("write");
    // Over the limit while busy: due (seen by the 5 s sample), not stopped.
    let due = proxy
        .wait_for_log(gen_event("restart_due", 1), Duration::from_secs(12))
        .expect("no restart_due while the client holds the office over its limit");
    assert_field(&due, "reason", "rss");
    assert_eq!(num_field(&due, "limit_kib"), 60 * 1024, "{due}");
    assert!(num_field(&due, "rss_kib") > 60 * 1024, "{due}");
    roundtrip(&mut busy, b"still served by the due generation\n");
    assert_eq!(proxy.count_logs(event("upstream_stopping")), 0);
    assert!(alive(office.server_pid(1)));
    finish(busy);
    // Drained: stopped, and the waiting client gets a fresh office.
    assert_eq!(answer(&mut next).0, 2);
    finish(next);
    let stopping = position(&proxy, gen_event("upstream_stopping", 1), "gen 1 stopping");
    let closed = position(&proxy, closed_with(1, "ok"), "conn 1 closed");
    assert!(
        closed < stopping,
        "gen 1 stopped while its client was connected"
    );
    assert_eq!(reasons(&proxy, "upstream_starting")[..2], ["first", "rss"]);
    stop_clean(proxy, &office);
}

#[test]
fn max_lifetime_restarts_an_old_generation() {
    let office = Office::new("lifetime");
    let port = unused_port();
    let proxy = start_proxy(&office, port, "", &["--max-lifetime", "2s"]);
    ready(&proxy, 1);
    assert_eq!(served_by(&proxy), 1);
    let due = proxy
        .wait_for_log(gen_event("restart_due", 1), START_WAIT)
        .expect("gen 1 never became due for its age");
    assert_field(&due, "reason", "lifetime");
    ready(&proxy, 2);
    assert_eq!(served_by(&proxy), 2);
    assert_eq!(
        reasons(&proxy, "upstream_starting")[..2],
        ["first", "lifetime"]
    );
    stop_clean(proxy, &office);
}

#[test]
fn a_crashed_server_ends_its_clients_and_restarts_at_once() {
    let office = Office::new("crash-server");
    let port = unused_port();
    let proxy = start_proxy(&office, port, "", &[]);
    let mut client = proxy.connect();
    assert_eq!(who(&mut client).0, 1);
    kill("KILL", office.server_pid(1));
    expect_closed(&mut client, WAIT).expect("the client of the dead office is closed");
    let exited = proxy.expect_log(gen_event("upstream_exited", 1), "gen 1 exited");
    assert_field(&exited, "expected", "false");
    // The wrapper reports its server's death as a shell does: 128 + 9.
    assert_field(&exited, "status", "exit:137");
    let closed = proxy.expect_log(conn_event("closed", 1), "conn 1 closed");
    assert_field(&closed, "outcome", "upstream_error");
    assert_field(&closed, "ended_by", "upstream");
    // The next generation starts without waiting for a client.
    ready(&proxy, 2);
    assert_eq!(reasons(&proxy, "upstream_starting"), ["first", "crash"]);
    assert_eq!(served_by(&proxy), 2);
    stop_clean(proxy, &office);
}

#[test]
fn a_crashed_wrapper_leaves_no_orphan_serving() {
    let office = Office::new("crash-wrapper");
    let port = unused_port();
    let proxy = start_proxy(&office, port, "", &[]);
    assert_eq!(served_by(&proxy), 1);
    let (server, wrapper) = (office.server_pid(1), office.wrapper_pid(1));
    kill("KILL", wrapper);
    let exited = proxy.expect_log(gen_event("upstream_exited", 1), "gen 1 exited");
    assert_field(&exited, "status", "signal:KILL");
    assert_field(&exited, "expected", "false");
    assert!(
        wait_until(WAIT, || !alive(server)),
        "the orphaned server {server} of gen 1 is still running"
    );
    ready(&proxy, 2);
    assert_eq!(served_by(&proxy), 2);
    assert!(session_members(wrapper).is_empty());
    stop_clean(proxy, &office);
}

/// Restarts of an office that takes its time to stop: each new copy starts
/// only after the old one is gone, so none ever finds one running.
#[test]
fn a_new_generation_never_meets_the_old_one() {
    let office = Office::new("handoff");
    let port = unused_port();
    let proxy = start_proxy(&office, port, "--term-delay 1", &["--restart-after", "1"]);
    let served: Vec<u64> = (0..3).map(|_| served_by(&proxy)).collect();
    assert_eq!(served, [1, 2, 3]);
    office.assert_never_two();
    // In the office's own record: gen N's server ended before gen N+1's
    // wrapper started.
    let events = office.events();
    for generation in [1u64, 2] {
        let ended = events
            .iter()
            .position(|l| {
                field(l, "ev").as_deref() == Some("wrapper_exit")
                    && field(l, "gen") == Some(generation.to_string())
            })
            .unwrap_or_else(|| panic!("gen {generation} never exited: {events:#?}"));
        let next = events
            .iter()
            .position(|l| {
                field(l, "ev").as_deref() == Some("wrapper_start")
                    && field(l, "gen") == Some((generation + 1).to_string())
            })
            .unwrap_or_else(|| panic!("gen {} never started: {events:#?}", generation + 1));
        assert!(
            ended < next,
            "gen {} started before gen {generation} ended",
            generation + 1
        );
    }
    stop_clean(proxy, &office);
}

/// The same, proven the other way: a copy started by hand beside a running
/// generation does hand off (so the check above can fail).
#[test]
fn the_stand_in_hands_off_to_a_running_copy() {
    let office = Office::new("handoff-check");
    let port = unused_port();
    let proxy = start_proxy(&office, port, "", &[]);
    ready(&proxy, 1);
    let status = Command::new("python3")
        .arg(SCRIPT)
        .args(["--state", office.dir().to_str().unwrap()])
        .args(["--port", &port.to_string()])
        .status()
        .expect("run a second copy");
    assert!(status.success());
    assert_eq!(office.count("handoff"), 1);
    assert_eq!(office.count("server_start"), 1);
    let mut proxy = proxy;
    proxy.stop(START_WAIT).expect("tcplock exits after SIGTERM");
}

#[test]
fn a_busy_port_is_refused_and_the_start_retried() {
    let office = Office::new("port-busy");
    let squatter = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = squatter.local_addr().unwrap().port();
    let proxy = start_proxy(&office, port, "", &["--start-retries", "10"]);
    let busy = proxy.expect_log(event("upstream_port_busy"), "the port is taken");
    assert_eq!(
        field(&busy, "addr"),
        Some(format!("127.0.0.1:{port}")),
        "{busy}"
    );
    assert!(busy.contains("level=error"), "{busy}");
    assert_eq!(
        office.count("wrapper_start"),
        0,
        "a copy started beside the squatter"
    );
    drop(squatter);
    proxy
        .wait_for_log(event("upstream_ready"), START_WAIT)
        .expect("started once the port was free");
    assert_eq!(office.count("wrapper_start"), 1);
    let mut client = proxy.connect();
    who(&mut client);
    finish(client);
    stop_clean(proxy, &office);
}

#[test]
fn failed_starts_back_off_then_turn_clients_away_until_recovery() {
    let office = Office::new("failing");
    office.set_failing(true);
    let port = unused_port();
    let dir = scratch_dir("failing-conf");
    let path = dir.join("tcplock.conf");
    std::fs::write(
        &path,
        format!(
            "listen = 127.0.0.1:0\nupstream = 127.0.0.1:{port}\nspawn = {}\nstart-retries = 2\n",
            office.command("")
        ),
    )
    .unwrap();
    let proxy = Proxy::start_raw(&["-c", path.to_str().unwrap()]);
    let mut waiting = proxy.connect();
    waiting.write_all(b"WHO\n").expect("write");

    let start_failed = |n: usize| {
        assert!(
            proxy.wait_for_count(event("upstream_start_failed"), n, START_WAIT),
            "no start failure #{n}"
        );
        Instant::now()
    };
    let first = start_failed(1);
    let second = start_failed(2);
    assert!(
        second - first >= Duration::from_millis(800),
        "the retry came after {:?}, not after the 1 s backoff",
        second - first
    );
    let failed = proxy.expect_log(event("upstream_failed"), "declared failed");
    assert_eq!(num_field(&failed, "starts"), 2, "{failed}");
    assert!(num_field(&failed, "retry_in_ms") > 1000, "{failed}");
    // The waiting client is closed, a new one turned away at once.
    expect_closed(&mut waiting, WAIT).expect("the waiting client is closed");
    proxy.expect_log(closed_with(1, "upstream_failed"), "conn 1 upstream_failed");
    let mut late = proxy.connect();
    expect_closed(&mut late, Duration::from_secs(3)).expect("a new client is closed at once");
    let rejected = proxy.expect_log(event("rejected"), "the late client rejected");
    assert_eq!(
        field(&rejected, "reason").as_deref(),
        Some("upstream_failed")
    );

    // Fixed, and one SIGHUP tries at once, even one that lands while the
    // failed start's leftovers are still being stopped.
    office.set_failing(false);
    let fixed = Instant::now();
    proxy.signal("HUP");
    assert!(
        proxy
            .wait_for_log(event("upstream_ready"), START_WAIT)
            .is_some(),
        "not ready after the fix and a SIGHUP"
    );
    assert!(
        fixed.elapsed() < Duration::from_secs(30),
        "ready only after {:?}: the 60 s backoff, not the SIGHUP",
        fixed.elapsed()
    );
    let mut client = proxy.connect();
    who(&mut client);
    finish(client);
    assert!(
        office.count("fail_start") >= 2,
        "the stand-in saw {} failed starts",
        office.count("fail_start")
    );
    stop_clean(proxy, &office);
}

#[test]
fn an_idle_service_is_stopped_and_started_on_demand() {
    let office = Office::new("idle");
    let port = unused_port();
    let proxy = start_proxy(&office, port, "", &["--idle-stop", "1s"]);
    assert_eq!(served_by(&proxy), 1);
    let stopping = proxy
        .wait_for_log(gen_event("upstream_stopping", 1), START_WAIT)
        .expect("no idle stop");
    assert_field(&stopping, "reason", "idle");
    let exited = proxy.expect_log(gen_event("upstream_exited", 1), "gen 1 exited");
    assert_field(&exited, "expected", "true");
    let leader = office.wrapper_pid(1);
    assert!(wait_until(WAIT, || session_members(leader).is_empty()));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the port still answers after the idle stop"
    );
    // Nobody asked: nothing starts.
    assert_eq!(starts(&proxy).len(), 1);
    assert_eq!(served_by(&proxy), 2);
    let start = office.of_gen("wrapper_start", 2).expect("gen 2 started");
    assert_field(&start, "reason", "idle");
    stop_clean(proxy, &office);
}

#[test]
fn sigterm_leaves_no_process_of_the_service_behind() {
    let office = Office::new("sigterm");
    let port = unused_port();
    // The server ignores SIGTERM: the stop timeout's SIGKILL must end it.
    let proxy = start_proxy(
        &office,
        port,
        "--term-delay -1",
        &["--stop-timeout", "1s", "--shutdown-grace", "1s"],
    );
    assert_eq!(served_by(&proxy), 1);
    let (server, wrapper) = (office.server_pid(1), office.wrapper_pid(1));
    let asked = Instant::now();
    stop_clean(proxy, &office);
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "tcplock took {:?} to stop a service with a 1 s stop timeout",
        asked.elapsed()
    );
    assert!(!alive(server) && !alive(wrapper));
    assert!(
        office
            .matching("term")
            .iter()
            .any(|l| field(l, "who").as_deref() == Some("server")),
        "the server itself was never sent SIGTERM: {:#?}",
        office.events()
    );
}

#[test]
fn a_reload_changing_spawn_restarts_once_drained() {
    let office = Office::new("reload");
    let port = unused_port();
    let dir = scratch_dir("reload-conf");
    let path = dir.join("tcplock.conf");
    let conf = |tag: &str| {
        format!(
            "listen = 127.0.0.1:0\nupstream = 127.0.0.1:{port}\nspawn = {}\n",
            office.command(&format!("--tag {tag}"))
        )
    };
    std::fs::write(&path, conf("a")).unwrap();
    let proxy = Proxy::start_raw(&["-c", path.to_str().unwrap()]);
    let mut holder = proxy.connect();
    assert_eq!(who(&mut holder).0, 1);

    std::fs::write(&path, conf("b")).unwrap();
    proxy.signal("HUP");
    let due = proxy.expect_log(gen_event("restart_due", 1), "gen 1 due after the reload");
    assert_field(&due, "reason", "reload");
    roundtrip(&mut holder, b"the old office still serves its client\n");
    assert_eq!(proxy.count_logs(event("upstream_stopping")), 0);
    assert_eq!(office.count("wrapper_start"), 1);
    finish(holder);

    ready(&proxy, 2);
    assert_eq!(served_by(&proxy), 2);
    let start = office.of_gen("wrapper_start", 2).expect("gen 2");
    assert_field(&start, "tag", "b");
    assert_field(&start, "reason", "reload");
    stop_clean(proxy, &office);
}

#[test]
fn hooks_are_told_the_generation_and_pid() {
    let office = Office::new("hookenv");
    let port = unused_port();
    let seen = office.dir().join("hook-env");
    let hook = format!(
        "echo \"$TCPLOCK_GENERATION $TCPLOCK_UPSTREAM_PID\" >> {}",
        seen.display()
    );
    let proxy = start_proxy(&office, port, "", &["--on-activate", &hook]);
    assert_eq!(served_by(&proxy), 1);
    let text = std::fs::read_to_string(&seen).unwrap_or_default();
    assert_eq!(text.trim(), format!("1 {}", office.wrapper_pid(1)));
    stop_clean(proxy, &office);
}

/// The library: `Builder::spawn` and its setters, and the service in
/// `Handle::stats`.
#[test]
fn the_library_supervises_with_the_builder() {
    use tcplock::{RestartReason, ServiceStateName};
    let office = Office::new("library");
    let port = unused_port();
    let lock = tcplock::Lock::builder()
        .listen("127.0.0.1:0")
        .upstream(format!("127.0.0.1:{port}"))
        .log_level(tcplock::LogLevel::Error)
        .spawn(office.command(""))
        .ready_timeout(Duration::from_secs(20))
        .restart_after(2)
        .restart_on(tcplock::RestartOn::default())
        .stop_timeout(Duration::from_secs(5))
        .start_retries(3)
        .build()
        .expect("build");
    let addr = lock.local_addr();
    let handle = lock.handle();
    let runner = std::thread::spawn(move || lock.run());
    let ready = |generation: u64| {
        wait_until(START_WAIT, || {
            let s = handle.stats().service;
            s.state == Some(ServiceStateName::Ready) && s.generation == generation
        })
    };
    assert!(ready(1), "never ready: {:?}", handle.stats().service);
    let first = handle.stats().service;
    assert_eq!(first.pid, Some(office.wrapper_pid(1)));
    for want in [1, 1, 2] {
        let mut client = connect(addr);
        assert_eq!(who(&mut client).0, want);
        finish(client);
    }
    assert!(
        ready(2),
        "no second generation: {:?}",
        handle.stats().service
    );
    assert_eq!(handle.stats().service.restarts(RestartReason::AfterN), 1);
    handle.stop();
    let result = runner.join().expect("the loop thread");
    assert!(result.is_ok(), "{result:?}");
    let leader = office.wrapper_pid(2);
    assert!(session_members(leader).is_empty(), "gen 2 left running");
    office.assert_never_two();
}
