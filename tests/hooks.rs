//! on-activate and on-timeout hooks, end to end with real `/bin/sh` scripts:
//! ordering against the upstream, the environment, serialisation, retries,
//! the hook timeout, abandoned clients, kept preparations, and reaping.

mod common;
mod hookkit;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime};

use common::*;
use hookkit::*;

/// Hook lines (`hook_started`, `hook_exited`) in log order, as
/// `(event, hook id)`.
fn hook_sequence(proxy: &Proxy) -> Vec<(String, u64)> {
    proxy
        .matching(|l| is_event(l, "hook_started") || is_event(l, "hook_exited"))
        .iter()
        .map(|l| (field(l, "event").unwrap(), num_field(l, "hook")))
        .collect()
}

#[test]
fn the_hook_finishes_before_the_upstream_sees_the_connection() {
    let dir = TempDir::new("order");
    let hook = dir.script(
        "hook.sh",
        "touch \"$D/started\"\nsleep 0.3\ntouch \"$D/done\"",
    );
    // The upstream notes, as it accepts, whether the hook had finished.
    let seen: Arc<Mutex<Vec<(bool, SystemTime)>>> = Arc::default();
    let (seen2, done) = (Arc::clone(&seen), dir.join("done"));
    let upstream = Upstream::spawn(move |s, active| {
        seen2
            .lock()
            .unwrap()
            .push((done.exists(), SystemTime::now()));
        echo_handler(s, active);
    });
    let proxy = Proxy::start(&["-u", &upstream.arg(), "--on-activate", &hook]);

    let mut client = proxy.connect();
    dir.expect_file("started", "hook start");
    assert_eq!(
        upstream.accepted(),
        0,
        "the upstream accepted while the hook was still running"
    );
    roundtrip(&mut client, b"after the hook\n");
    finish(client);

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "one upstream connection");
    let (hook_done, accepted_at) = seen[0];
    assert!(hook_done, "the upstream accepted before the hook finished");
    let done_at = fs::metadata(dir.join("done"))
        .and_then(|m| m.modified())
        .expect("mtime of the hook's done marker");
    assert!(
        done_at <= accepted_at,
        "hook finished at {done_at:?}, upstream accepted at {accepted_at:?}"
    );
    let exited = proxy.expect_log(event("hook_exited"), "hook_exited");
    assert_eq!(field(&exited, "status").as_deref(), Some("exit 0"));
    assert!(num_field(&exited, "duration_ms") >= 250, "{exited}");
}

#[test]
fn the_hook_environment_describes_the_connection() {
    let dir = TempDir::new("env");
    let hook = dir.script("hook.sh", &dump_env_to("env.$TCPLOCK_CONN_ID"));
    let upstream = Upstream::echo();
    let proxy = Proxy::start(&["-u", &upstream.arg(), "--on-activate", &hook]);

    let mut clients = Vec::new();
    for i in 0..3 {
        let mut c = proxy.connect();
        let local = c.local_addr().unwrap();
        roundtrip(&mut c, format!("client {i}\n").as_bytes());
        finish(c);
        clients.push(local);
        assert!(
            proxy.wait_for_count(outcome("ok"), i + 1, WAIT),
            "client {i} not closed"
        );
    }

    let conns = hook_conns(&proxy);
    assert_eq!(conns.len(), 3, "one hook per client: {conns:?}");
    for (i, (&conn, local)) in conns.iter().zip(&clients).enumerate() {
        let env = dir.env_file(&format!("env.{conn}"));
        let get = |k: &str| env.get(k).map(String::as_str).unwrap_or("<unset>");
        assert_eq!(get("TCPLOCK_EVENT"), "activate", "{env:?}");
        assert_eq!(get("TCPLOCK_CONN_ID"), conn.to_string(), "{env:?}");
        assert_eq!(get("TCPLOCK_ACTIVATIONS"), i.to_string(), "{env:?}");
        assert_eq!(get("TCPLOCK_CLIENT_ADDR"), local.to_string(), "{env:?}");
        assert_eq!(get("TCPLOCK_UPSTREAM"), upstream.arg(), "{env:?}");
        assert_eq!(get("TCPLOCK_ATTEMPT"), "1", "{env:?}");
        assert_eq!(get("TCPLOCK_TIMEOUTS"), "0", "{env:?}");
        assert_eq!(get("TCPLOCK_QUEUE_LENGTH"), "0", "{env:?}");
        let last = if i == 0 { "none" } else { "ok" };
        assert_eq!(get("TCPLOCK_LAST_OUTCOME"), last, "{env:?}");
        assert!(env.contains_key("TCPLOCK_ACTIVE"), "{env:?}");
    }
    assert_no_zombies(proxy.pid(), Duration::from_secs(2));
}

#[test]
fn hooks_never_overlap_even_with_free_permits() {
    let dir = TempDir::new("overlap");
    // `mkdir` is atomic: a second hook running at the same time fails it.
    let hook = dir.script(
        "hook.sh",
        r#"if ! mkdir "$D/lock" 2>/dev/null; then
    echo "$TCPLOCK_CONN_ID" >> "$D/overlap"
    echo "hook for conn $TCPLOCK_CONN_ID overlaps another" >&2
    exit 1
fi
echo "$TCPLOCK_CONN_ID" >> "$D/runs"
sleep 0.1
rmdir "$D/lock""#,
    );
    let upstream = Upstream::echo();
    let proxy = Proxy::start(&["-u", &upstream.arg(), "-n", "3", "--on-activate", &hook]);

    let workers: Vec<_> = (0..5)
        .map(|i| {
            let addr = proxy.addr();
            thread::spawn(move || {
                let mut c = connect(addr);
                roundtrip(&mut c, format!("client {i}\n").as_bytes());
                finish(c);
            })
        })
        .collect();
    for w in workers {
        w.join().expect("client thread");
    }
    assert!(
        proxy.wait_for_count(outcome("ok"), 5, WAIT),
        "five clean closes"
    );

    assert_eq!(dir.read("overlap"), "", "hooks overlapped (conn ids)");
    let runs: BTreeSet<String> = dir.lines("runs").into_iter().collect();
    assert_eq!(runs.len(), 5, "one hook run per client: {runs:?}");
    // The log agrees: every start is followed by its own exit before the next start.
    let seq = hook_sequence(&proxy);
    assert_eq!(seq.len(), 10, "{seq:?}");
    for pair in seq.chunks(2) {
        assert_eq!(pair[0].0, "hook_started", "{seq:?}");
        assert_eq!(pair[1].0, "hook_exited", "{seq:?}");
        assert_eq!(pair[0].1, pair[1].1, "{seq:?}");
    }
    assert!(upstream.max_concurrent() <= 3);
    assert_eq!(proxy.count_logs(event("hook_failed")), 0);
}

#[test]
fn a_hook_failing_twice_then_succeeding_still_serves_the_client() {
    let dir = TempDir::new("retry");
    let hook = dir.script(
        "hook.sh",
        r#"echo "$TCPLOCK_ATTEMPT" >> "$D/attempts"
n=$(cat "$D/count" 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" > "$D/count"
[ "$n" -ge 3 ]"#,
    );
    let upstream = Upstream::echo();
    let proxy = Proxy::start(&["-u", &upstream.arg(), "--on-activate", &hook]);

    let mut client = proxy.connect();
    client.write_all(b"patience\n").expect("write to proxy");
    let got = read_n(&mut client, 9).expect("echo after two failed hooks");
    assert_eq!(got, b"patience\n");
    finish(client);

    let failed = proxy.matching(event("hook_failed"));
    assert_eq!(failed.len(), 2, "{failed:?}");
    for (line, backoff) in failed.iter().zip([500, 1000]) {
        assert_eq!(field(line, "kind").as_deref(), Some("activate"), "{line}");
        assert_eq!(field(line, "conn").as_deref(), Some("1"), "{line}");
        assert_eq!(field(line, "status").as_deref(), Some("exit 1"), "{line}");
        assert_eq!(num_field(line, "retry_in_ms"), backoff, "{line}");
    }
    assert_eq!(dir.lines("attempts"), ["1", "2", "3"]);
    assert_eq!(hook_conns(&proxy), [1, 1, 1]);
    assert_eq!(
        upstream.accepted(),
        1,
        "one upstream connection, after success"
    );
    assert_no_zombies(proxy.pid(), Duration::from_secs(2));
}

#[test]
fn a_hook_timeout_kills_the_hook_and_its_background_child() {
    let dir = TempDir::new("hooktimeout");
    // First attempt: leave a background child in the group, then hang.
    let hook = dir.script(
        "hook.sh",
        r#"if [ "$TCPLOCK_ATTEMPT" = 1 ]; then
    sleep 30 >/dev/null 2>&1 &
    echo $! > "$D/bg.tmp"
    mv "$D/bg.tmp" "$D/bg.pid"
    exec sleep 30 >/dev/null 2>&1
fi"#,
    );
    let upstream = Upstream::echo();
    let proxy = Proxy::start(&[
        "-u",
        &upstream.arg(),
        "--on-activate",
        &hook,
        "--hook-timeout",
        "300ms",
    ]);

    let mut client = proxy.connect();
    dir.expect_file("bg.pid", "background child started");
    let bg: u32 = dir.read("bg.pid").trim().parse().expect("bg pid");
    let started = proxy.expect_log(event("hook_started"), "hook_started");
    let hook_pid = num_field(&started, "pid") as u32;

    let timeout = proxy.expect_log(event("hook_timeout"), "hook_timeout");
    assert_eq!(num_field(&timeout, "hook"), 1, "{timeout}");
    assert!(num_field(&timeout, "after_ms") >= 300, "{timeout}");
    let failed = proxy.expect_log(event("hook_failed"), "hook_failed");
    assert_eq!(field(&failed, "reason").as_deref(), Some("hook_timeout"));
    assert_eq!(field(&failed, "status").as_deref(), Some("signal 9"));
    let exited = proxy.expect_log(event("hook_exited"), "hook_exited");
    assert_eq!(num_field(&exited, "pid") as u32, hook_pid);

    assert!(
        wait_until(WAIT, || not_running(hook_pid)),
        "hook process {hook_pid} still running: {:?}",
        proc_state(hook_pid)
    );
    assert!(
        wait_until(WAIT, || not_running(bg)),
        "background child {bg} of the timed-out hook still running: {:?}",
        proc_state(bg)
    );

    // The retry (attempt 2) succeeds and the client is served.
    roundtrip(&mut client, b"served after the retry\n");
    finish(client);
    // Log lines are read on another thread: wait for the last one first.
    proxy.expect_log(closed_with(1, "ok"), "the client's close");
    assert_eq!(proxy.count_logs(event("hook_started")), 2);
    assert_no_zombies(proxy.pid(), Duration::from_secs(2));
}

#[test]
fn an_abandoned_queued_client_never_runs_the_hook() {
    let dir = TempDir::new("abandoned");
    let hook = dir.script("hook.sh", "echo \"$TCPLOCK_CONN_ID\" >> \"$D/runs\"");
    let upstream = Upstream::echo();
    let proxy = Proxy::start(&[
        "-u",
        &upstream.arg(),
        "--on-activate",
        &hook,
        "--log-level",
        "debug",
    ]);

    let mut first = proxy.connect();
    roundtrip(&mut first, b"holding the permit\n");

    let gone = proxy.connect();
    proxy.expect_log(conn_event("accepted", 2), "second client queued");
    drop(gone);
    proxy.expect_log(closed_with(2, "abandoned"), "second client abandoned");

    let mut third = proxy.connect();
    proxy.expect_log(conn_event("accepted", 3), "third client queued");
    finish(first);
    roundtrip(&mut third, b"third\n");
    finish(third);
    assert!(proxy.wait_for_count(outcome("ok"), 2, WAIT));

    assert_eq!(hook_conns(&proxy), [1, 3], "hook runs by conn");
    assert_eq!(dir.lines("runs"), ["1", "3"]);
}

#[test]
fn a_preparation_whose_client_left_goes_to_the_next_in_line() {
    let dir = TempDir::new("kept");
    let hook = dir.script(
        "hook.sh",
        "echo \"$TCPLOCK_CONN_ID\" >> \"$D/runs\"\ntouch \"$D/started\"\nsleep 0.4",
    );
    let upstream = Upstream::echo();
    let proxy = Proxy::start(&[
        "-u",
        &upstream.arg(),
        "--on-activate",
        &hook,
        "--log-level",
        "debug",
    ]);

    let leaver = proxy.connect();
    dir.expect_file("started", "hook for the first client");
    let mut next = proxy.connect();
    proxy.expect_log(conn_event("accepted", 2), "second client queued");
    drop(leaver);
    proxy.expect_log(closed_with(1, "abandoned"), "first client left");

    let kept = proxy.expect_log(event("preparation_kept"), "preparation_kept");
    assert_eq!(num_field(&kept, "hook"), 1, "{kept}");
    roundtrip(&mut next, b"prepared for someone else\n");
    finish(next);
    proxy.expect_log(closed_with(2, "ok"), "the next client's close");
    assert_eq!(dir.lines("runs"), ["1"], "the hook ran once");
    assert_eq!(proxy.count_logs(event("hook_started")), 1);
}

#[test]
fn on_timeout_runs_after_a_ttl_expiry() {
    let dir = TempDir::new("ontimeout");
    let on_timeout = dir.script("timeout.sh", &dump_env_to("env.timeout"));
    let on_activate = dir.script("activate.sh", &dump_env_to("env.$TCPLOCK_CONN_ID"));
    let upstream = Upstream::echo();
    let proxy = Proxy::start(&[
        "-u",
        &upstream.arg(),
        "-t",
        "300ms",
        "--on-activate",
        &on_activate,
        "--on-timeout",
        &on_timeout,
    ]);

    let mut overstayer = proxy.connect();
    roundtrip(&mut overstayer, b"staying too long\n");
    proxy.expect_log(closed_with(1, "timeout"), "TTL expiry");
    expect_closed(&mut overstayer, WAIT).expect("the overstayer is cut off");

    let env = dir.env_file("env.timeout");
    let get = |k: &str| env.get(k).map(String::as_str).unwrap_or("<unset>");
    assert_eq!(get("TCPLOCK_EVENT"), "timeout", "{env:?}");
    assert_eq!(get("TCPLOCK_CONN_ID"), "1", "{env:?}");
    assert_eq!(get("TCPLOCK_TIMEOUTS"), "1", "{env:?}");
    assert_eq!(get("TCPLOCK_LAST_OUTCOME"), "timeout", "{env:?}");
    let started = proxy.expect_log(
        |l: &str| is_event(l, "hook_started") && field(l, "kind").as_deref() == Some("timeout"),
        "on-timeout hook_started",
    );
    assert_eq!(field(&started, "conn").as_deref(), Some("1"), "{started}");

    // The next activation sees what happened.
    let mut next = proxy.connect();
    roundtrip(&mut next, b"next\n");
    finish(next);
    proxy.expect_log(closed_with(2, "ok"), "the next client's close");
    let env = dir.env_file("env.2");
    let get = |k: &str| env.get(k).map(String::as_str).unwrap_or("<unset>");
    assert_eq!(get("TCPLOCK_EVENT"), "activate", "{env:?}");
    assert_eq!(get("TCPLOCK_LAST_OUTCOME"), "timeout", "{env:?}");
    assert_eq!(get("TCPLOCK_TIMEOUTS"), "1", "{env:?}");
    assert_eq!(get("TCPLOCK_ACTIVATIONS"), "1", "{env:?}");
    // The on-timeout hook ran (and ended) before the next on-activate.
    let seq = hook_sequence(&proxy);
    assert_eq!(seq.len(), 6, "{seq:?}");
    let kinds: Vec<String> = proxy
        .matching(event("hook_started"))
        .iter()
        .map(|l| field(l, "kind").unwrap())
        .collect();
    assert_eq!(kinds, ["activate", "timeout", "activate"]);
}

#[test]
fn no_zombies_are_left_after_many_hooks() {
    let dir = TempDir::new("zombies");
    // Every third run fails; some leave a short-lived background child.
    let hook = dir.script(
        "hook.sh",
        r#"n=$(cat "$D/count" 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" > "$D/count"
( sleep 0.05 ) &
[ $((n % 3)) -ne 0 ]"#,
    );
    let upstream = Upstream::echo();
    let proxy = Proxy::start(&["-u", &upstream.arg(), "-n", "2", "--on-activate", &hook]);
    for i in 0..6 {
        let mut c = proxy.connect();
        roundtrip(&mut c, format!("client {i}\n").as_bytes());
        finish(c);
    }
    assert!(proxy.wait_for_count(outcome("ok"), 6, WAIT));
    let starts = proxy.count_logs(event("hook_started"));
    assert!(
        proxy.wait_for_count(event("hook_exited"), starts, WAIT),
        "every started hook exits"
    );
    assert!(proxy.count_logs(event("hook_failed")) >= 1);
    assert_no_zombies(proxy.pid(), Duration::from_secs(2));
    // Nothing of ours is left running under tcplock either.
    let kids = children(proxy.pid());
    assert!(kids.is_empty(), "children of tcplock left: {kids:?}");
}
