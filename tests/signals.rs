//! Signals, end to end: SIGHUP reloads the config file (hooks, permits; a
//! broken file changes nothing), SIGTERM/SIGINT stop gracefully (queued
//! clients closed at once, proxying ones finish within the grace), SIGUSR1
//! dumps the state.

mod common;
mod hookkit;

use std::time::{Duration, Instant};

use common::*;
use hookkit::*;

/// A config file in `dir` naming the upstream plus `extra` lines.
fn config(dir: &TempDir, upstream: &Upstream, extra: &str) -> String {
    let path = dir.write_atomic(
        "tcplock.conf",
        &format!(
            "# written by the test\nupstream = {}\n{extra}",
            upstream.arg()
        ),
    );
    path.to_string_lossy().into_owned()
}

/// Predicate: `event=reloaded` whose `changed=` list holds `key`.
fn reloaded_with(key: &'static str) -> impl Fn(&str) -> bool + Clone {
    move |l: &str| {
        is_event(l, "reloaded")
            && field(l, "changed").is_some_and(|c| c.split(',').any(|k| k == key))
    }
}

#[test]
fn sighup_swaps_the_hook_and_a_broken_file_keeps_the_last_good_one() {
    let dir = TempDir::new("hup-hook");
    let a = dir.script("a.sh", "echo \"$TCPLOCK_CONN_ID\" >> \"$D/ran-a\"");
    let b = dir.script("b.sh", "echo \"$TCPLOCK_CONN_ID\" >> \"$D/ran-b\"");
    let upstream = Upstream::echo();
    let file = config(&dir, &upstream, &format!("on-activate = {a}\n"));
    let proxy = Proxy::start(&["-c", &file]);

    let mut c = proxy.connect();
    roundtrip(&mut c, b"one\n");
    finish(c);
    assert_eq!(dir.lines("ran-a"), ["1"]);

    config(&dir, &upstream, &format!("on-activate = {b}\n"));
    proxy.signal("HUP");
    let reloaded = proxy.expect_log(reloaded_with("on-activate"), "reload to hook B");
    assert_eq!(field(&reloaded, "file").as_deref(), Some(file.as_str()));
    let mut c = proxy.connect();
    roundtrip(&mut c, b"two\n");
    finish(c);
    assert_eq!(dir.lines("ran-a"), ["1"], "hook A ran after the reload");
    assert_eq!(dir.lines("ran-b"), ["2"]);

    // Line 4 is broken: nothing of this file applies, B stays.
    config(
        &dir,
        &upstream,
        &format!("on-activate = {a}\nno-such-key = 1\n"),
    );
    proxy.signal("HUP");
    let failed = proxy.expect_log(event("reload_failed"), "reload_failed");
    let error = field(&failed, "error").unwrap_or_default();
    assert!(
        error.starts_with(&format!("{file}:4:")),
        "reload_failed should name {file}:4, got: {failed}"
    );
    assert!(error.contains("no-such-key"), "{failed}");
    let mut c = proxy.connect();
    roundtrip(&mut c, b"three\n");
    finish(c);
    assert_eq!(dir.lines("ran-b"), ["2", "3"], "hook B stays in force");
    assert_eq!(dir.lines("ran-a"), ["1"]);
    assert_eq!(proxy.count_logs(event("reloaded")), 1);
}

#[test]
fn sighup_raising_permits_lets_a_waiter_through() {
    let dir = TempDir::new("hup-permits");
    let upstream = Upstream::echo();
    let file = config(&dir, &upstream, "permits = 1\n");
    let proxy = Proxy::start(&["-c", &file, "--log-level", "debug"]);

    let mut first = proxy.connect();
    roundtrip(&mut first, b"holding\n");
    let mut waiter = proxy.connect();
    proxy.expect_log(conn_event("accepted", 2), "waiter queued");
    assert_eq!(proxy.count_logs(conn_event("activated", 2)), 0);

    config(&dir, &upstream, "permits = 2\n");
    proxy.signal("HUP");
    proxy.expect_log(reloaded_with("permits"), "reload to permits = 2");
    proxy.expect_log(conn_event("activated", 2), "waiter let through");
    roundtrip(&mut waiter, b"let through while the first still holds\n");
    assert_eq!(upstream.current(), 2, "both connections proxy at once");
    roundtrip(&mut first, b"still here\n");
    finish(waiter);
    finish(first);
}

#[test]
fn sighup_turning_splice_off_closes_the_idle_pipes() {
    let dir = TempDir::new("hup-splice");
    let upstream = Upstream::echo();
    let file = config(&dir, &upstream, "splice = auto\n");
    let proxy = Proxy::start(&["-c", &file]);
    let at_start = proxy.open_pipes();

    // Whole-buffer writes splice, and the emptied pipes stay in the pool.
    let mut bulk = proxy.connect();
    roundtrip(&mut bulk, &vec![0x5a_u8; 256 * KIB]);
    finish(bulk);
    proxy.expect_log(closed_with(1, "ok"), "bulk connection closed");
    assert!(proxy.open_pipes() > at_start, "no pipe left in the pool");

    config(&dir, &upstream, "splice = off\n");
    proxy.signal("HUP");
    proxy.expect_log(reloaded_with("splice"), "reload to splice = off");
    assert_eq!(
        proxy.open_pipes(),
        at_start,
        "idle pipes kept after splice = off"
    );
}

#[test]
fn sighup_without_a_file_or_with_a_new_listen_address() {
    // No -c: nothing to reload, and the proxy keeps working.
    let upstream = Upstream::echo();
    let proxy = Proxy::start(&["-u", &upstream.arg()]);
    proxy.signal("HUP");
    proxy.expect_log(event("reload_skipped"), "reload_skipped");
    let mut c = proxy.connect();
    roundtrip(&mut c, b"still serving\n");
    finish(c);

    // listen set only by the file: a change is reported as ignored.
    let dir = TempDir::new("hup-listen");
    let file = config(&dir, &upstream, "listen = 127.0.0.1:0\n");
    let proxy = Proxy::start_raw(&["-c", &file]);
    let port = unused_port();
    config(&dir, &upstream, &format!("listen = 127.0.0.1:{port}\n"));
    proxy.signal("HUP");
    let ignored = proxy.expect_log(event("reload_ignored"), "reload_ignored");
    assert_eq!(
        field(&ignored, "key").as_deref(),
        Some("listen"),
        "{ignored}"
    );
    let mut c = proxy.connect();
    roundtrip(&mut c, b"same socket\n");
    finish(c);
}

#[test]
fn sigterm_closes_queued_clients_at_once_and_lets_the_proxying_one_finish() {
    let upstream = Upstream::echo();
    let mut proxy = Proxy::start(&[
        "-u",
        &upstream.arg(),
        "--shutdown-grace",
        "10s",
        "--log-level",
        "debug",
    ]);
    let mut proxying = proxy.connect();
    roundtrip(&mut proxying, b"before the signal\n");
    let mut queued: Vec<_> = (2..=3)
        .map(|id| {
            let c = proxy.connect();
            proxy.expect_log(conn_event("accepted", id), "queued client");
            c
        })
        .collect();

    proxy.signal("TERM");
    let shutdown = proxy.expect_log(event("shutdown_started"), "shutdown");
    assert_eq!(num_field(&shutdown, "queued"), 2, "{shutdown}");
    assert_eq!(num_field(&shutdown, "active"), 1, "{shutdown}");
    assert_eq!(num_field(&shutdown, "grace_ms"), 10_000, "{shutdown}");
    for (c, id) in queued.iter_mut().zip(2..) {
        let (ended, data) =
            expect_closed(c, Duration::from_secs(2)).expect("queued client closed at once");
        assert_eq!(ended, Ended::Eof, "queued client {id}");
        assert!(data.is_empty());
        proxy.expect_log(closed_with(id, "shutdown"), "queued client closed");
    }

    // The proxying client is untouched and finishes its exchange.
    roundtrip(&mut proxying, b"after the signal\n");
    assert_eq!(
        proxy.wait_exit(Duration::from_millis(200)),
        None,
        "exited early"
    );
    finish(proxying);
    let status = proxy
        .wait_exit(WAIT)
        .expect("exit once the last client is done");
    assert_eq!(status.code(), Some(0), "{status:?}");
    proxy.expect_log(closed_with(1, "ok"), "proxying client closed cleanly");
    assert_eq!(upstream.accepted(), 1);
}

#[test]
fn sigterm_exits_after_the_grace_when_a_client_never_closes() {
    let upstream = Upstream::echo();
    let mut proxy = Proxy::start(&["-u", &upstream.arg(), "--shutdown-grace", "1s"]);
    let mut stubborn = proxy.connect();
    roundtrip(&mut stubborn, b"never closing\n");

    let sent = Instant::now();
    proxy.signal("TERM");
    let status = proxy.wait_exit(WAIT).expect("exit after the grace");
    let took = sent.elapsed();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(took >= Duration::from_millis(900), "exited after {took:?}");
    assert!(took < Duration::from_secs(5), "exited after {took:?}");
    assert_eq!(proxy.count_logs(closed_with(1, "shutdown")), 1);
    expect_closed(&mut stubborn, WAIT).expect("client closed by the shutdown");
}

#[test]
fn sigint_also_stops_gracefully_and_a_second_signal_stops_at_once() {
    let upstream = Upstream::echo();
    let mut proxy = Proxy::start(&["-u", &upstream.arg(), "--shutdown-grace", "30s"]);
    let mut stubborn = proxy.connect();
    roundtrip(&mut stubborn, b"never closing\n");

    proxy.signal("INT");
    proxy.expect_log(event("shutdown_started"), "shutdown on SIGINT");
    assert_eq!(
        proxy.wait_exit(Duration::from_millis(200)),
        None,
        "no grace"
    );
    let sent = Instant::now();
    proxy.signal("TERM");
    let status = proxy.wait_exit(WAIT).expect("exit on the second signal");
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "second signal took {:?}",
        sent.elapsed()
    );
    assert!(status.code().is_some(), "exited by itself: {status:?}");
    expect_closed(&mut stubborn, WAIT).expect("client closed");
}

#[test]
fn sigterm_kills_a_running_hook_and_its_group() {
    let dir = TempDir::new("term-hook");
    let hook = dir.script(
        "hook.sh",
        "sleep 30 >/dev/null 2>&1 &\necho $! > \"$D/bg.tmp\"\nmv \"$D/bg.tmp\" \"$D/bg.pid\"\n\
         exec sleep 30 >/dev/null 2>&1",
    );
    let upstream = Upstream::echo();
    let mut proxy = Proxy::start(&["-u", &upstream.arg(), "--on-activate", &hook]);
    let mut waiting = proxy.connect();
    dir.expect_file("bg.pid", "hook started its background child");
    let bg: u32 = dir.read("bg.pid").trim().parse().expect("bg pid");
    let started = proxy.expect_log(event("hook_started"), "hook_started");
    let hook_pid = num_field(&started, "pid") as u32;

    proxy.signal("TERM");
    let status = proxy.wait_exit(WAIT).expect("exit with a hook running");
    assert_eq!(status.code(), Some(0), "{status:?}");
    expect_closed(&mut waiting, WAIT).expect("the activating client is closed");
    assert!(
        wait_until(WAIT, || not_running(hook_pid) && not_running(bg)),
        "hook {hook_pid} ({:?}) or its child {bg} ({:?}) survived the shutdown",
        proc_state(hook_pid),
        proc_state(bg)
    );
    assert_eq!(upstream.accepted(), 0);
}

#[test]
fn sigusr1_logs_every_connection_and_a_summary() {
    let dir = TempDir::new("usr1");
    let hook = dir.script(
        "hook.sh",
        "touch \"$D/started\"\nexec sleep 30 >/dev/null 2>&1",
    );
    let upstream = Upstream::echo();
    let mut proxy = Proxy::start(&[
        "-u",
        &upstream.arg(),
        "-n",
        "2",
        "--on-activate",
        &hook,
        "--log-level",
        "debug",
    ]);
    let conns: Vec<_> = (1..=3)
        .map(|id| {
            let c = proxy.connect();
            proxy.expect_log(conn_event("accepted", id), "accepted");
            c
        })
        .collect();
    dir.expect_file("started", "hook for conn 1 running");

    proxy.signal("USR1");
    let summary = proxy.expect_log(event("state_summary"), "state_summary");
    let states: Vec<(u64, String)> = proxy
        .matching(event("state"))
        .iter()
        .map(|l| (num_field(l, "conn"), field(l, "state").unwrap()))
        .collect();
    assert_eq!(
        states,
        [
            (1, "activating".to_string()),
            (2, "queued".to_string()),
            (3, "queued".to_string())
        ],
        "{states:?}"
    );
    for l in proxy.matching(event("state")) {
        assert!(field(&l, "client").is_some(), "{l}");
        let _ = num_field(&l, "age_ms");
    }
    assert_eq!(field(&summary, "hook_running").as_deref(), Some("true"));
    assert_eq!(num_field(&summary, "queued"), 2, "{summary}");
    drop(conns);
    // SIGTERM also ends the sleeping hook (a plain kill would orphan it).
    let status = proxy.stop(WAIT).expect("graceful stop");
    assert_eq!(status.code(), Some(0));
}
