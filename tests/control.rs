//! The control socket (`--control PATH`) and `tcplock ctl`, end to end: every
//! command and the bad ones, the limits (line length, idle clients, 16
//! connections), the socket file's mode, replacement and removal, and the
//! client's exit codes.

mod common;
mod hookkit;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use hookkit::*;

/// `tcplock ctl --control PATH WORDS...`: exit code, stdout, stderr.
fn ctl(path: &Path, words: &[&str]) -> (i32, String, String) {
    let path = path.to_str().expect("utf-8 path");
    let mut args = vec!["ctl", "--control", path];
    args.extend_from_slice(words);
    let out = run(&args, WAIT);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `ctl` that must succeed; its reply lines without the final `ok`.
fn ctl_ok(path: &Path, words: &[&str]) -> Vec<String> {
    let (code, out, err) = ctl(path, words);
    assert_eq!(code, 0, "ctl {words:?}: stdout {out:?} stderr {err:?}");
    let mut lines: Vec<String> = out.lines().map(str::to_string).collect();
    assert_eq!(lines.pop().as_deref(), Some("ok"), "ctl {words:?}: {out:?}");
    lines
}

/// `ctl` that must get an error reply; its `msg`.
fn ctl_err(path: &Path, words: &[&str]) -> String {
    let (code, out, err) = ctl(path, words);
    assert_eq!(code, 1, "ctl {words:?}: stdout {out:?} stderr {err:?}");
    let last = out.lines().last().unwrap_or("").to_string();
    assert!(last.starts_with("error "), "ctl {words:?}: {out:?}");
    field(&last, "msg").unwrap_or_default()
}

/// A raw control connection with timeouts.
fn session(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

fn read_all(s: &mut UnixStream) -> String {
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read reply");
    out
}

/// The `status` line's fields (tcplock's line; the instance line follows).
fn status(path: &Path) -> String {
    let lines = ctl_ok(path, &["status"]);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[1].starts_with("instance=1 ") && lines[1].contains(" state=ready supervised=no "),
        "{lines:?}"
    );
    lines[0].clone()
}

fn start(dir: &TempDir, upstream: &Upstream, extra: &[&str]) -> (Proxy, std::path::PathBuf) {
    let sock = dir.join("ctl.sock");
    let (up, path) = (
        upstream.arg(),
        sock.to_str().expect("utf-8 path").to_string(),
    );
    let mut args = vec!["-u", up.as_str(), "--control", path.as_str()];
    args.extend_from_slice(extra);
    (Proxy::start(&args), sock)
}

/// Waits until `n` clients are queued, as `status` says.
fn wait_queued(sock: &Path, n: u64) {
    assert!(
        wait_until(WAIT, || num_field(&status(sock), "queued") == n),
        "queued never reached {n}: {}",
        status(sock)
    );
}

#[test]
fn the_socket_is_mode_0600_and_removed_on_exit() {
    let dir = TempDir::new("ctl-mode");
    let upstream = Upstream::echo();
    let (mut proxy, sock) = start(&dir, &upstream, &[]);
    let meta = std::fs::symlink_metadata(&sock).expect("socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(proxy.stop(WAIT).and_then(|s| s.code()), Some(0));
    assert!(!sock.exists(), "socket left behind at exit");
}

#[test]
fn status_counts_connections_and_outcomes() {
    let dir = TempDir::new("ctl-status");
    let upstream = Upstream::echo();
    let (proxy, sock) = start(&dir, &upstream, &[]);
    let line = status(&sock);
    for (key, value) in [
        ("state", "running"),
        ("queued", "0"),
        ("active", "0"),
        ("permits", "1"),
        ("accepted", "0"),
        ("ok", "0"),
        ("killed", "0"),
    ] {
        assert_eq!(field(&line, key).as_deref(), Some(value), "{key} in {line}");
    }
    let holder = holding(&proxy);
    let _waiting = proxy.connect();
    wait_queued(&sock, 1);
    let line = status(&sock);
    assert_eq!(num_field(&line, "active"), 1, "{line}");
    assert_eq!(num_field(&line, "accepted"), 2, "{line}");
    assert_eq!(num_field(&line, "activations"), 1, "{line}");
    finish(holder);
    assert!(wait_until(WAIT, || num_field(&status(&sock), "ok") == 1));
    // The unsupervised upstream's line: ready, its connections the
    // activations.
    assert!(
        wait_until(WAIT, || num_field(&ctl_ok(&sock, &["status"])[1], "conns")
            == 2),
        "{:?}",
        ctl_ok(&sock, &["status"])
    );
    let lines = ctl_ok(&sock, &["status"]);
    assert_eq!(field(&lines[1], "state").as_deref(), Some("ready"));
    assert_eq!(field(&lines[1], "supervised").as_deref(), Some("no"));
}

#[test]
fn bad_commands_get_an_error_reply_and_exit_1() {
    let dir = TempDir::new("ctl-bad");
    let upstream = Upstream::echo();
    let (_proxy, sock) = start(&dir, &upstream, &[]);
    assert_eq!(
        ctl_err(&sock, &["frobnicate"]),
        "unknown command 'frobnicate'"
    );
    assert_eq!(
        ctl_err(&sock, &["kill", "x"]),
        "kill: 'x' is not a connection id"
    );
    assert_eq!(ctl_err(&sock, &["kill", "99"]), "no connection 99");
    assert_eq!(
        ctl_err(&sock, &["status", "now"]),
        "status takes no argument, got 'now'"
    );
    assert_eq!(ctl_err(&sock, &["restart"]), "restart needs --spawn");
    assert_eq!(ctl_err(&sock, &["restart", "all"]), "restart needs --spawn");
    assert_eq!(ctl_err(&sock, &["reload"]), "no config file given with -c");
    // An empty line.
    let mut s = session(&sock);
    s.write_all(b"\n").unwrap();
    assert_eq!(read_all(&mut s), "error msg=\"empty command\"\n");
}

#[test]
fn an_overlong_command_line_is_refused() {
    let dir = TempDir::new("ctl-long");
    let upstream = Upstream::echo();
    let (_proxy, sock) = start(&dir, &upstream, &[]);
    // Exactly 1 KiB is fine (and unknown); one byte more is not.
    let mut s = session(&sock);
    s.write_all(&[b'x'; 1024]).unwrap();
    s.write_all(b"\n").unwrap();
    assert!(read_all(&mut s).starts_with("error msg=\"unknown command"));
    let mut s = session(&sock);
    // The reply may come (and the socket close) before all is written.
    let _ = s.write_all(&[b'x'; 4096]);
    assert_eq!(
        read_all(&mut s),
        "error msg=\"command line longer than 1024 bytes\"\n"
    );
    // The loop still serves.
    assert_eq!(field(&status(&sock), "state").as_deref(), Some("running"));
}

#[test]
fn a_client_that_never_sends_is_closed_after_5s() {
    let dir = TempDir::new("ctl-idle");
    let upstream = Upstream::echo();
    let (_proxy, sock) = start(&dir, &upstream, &[]);
    let started = Instant::now();
    let mut silent = session(&sock);
    // Others are served meanwhile.
    assert_eq!(field(&status(&sock), "state").as_deref(), Some("running"));
    let mut buf = [0u8; 16];
    let n = silent.read(&mut buf).expect("closed, not timed out");
    let waited = started.elapsed();
    assert_eq!(n, 0, "no reply for no command");
    assert!(
        waited >= Duration::from_millis(4_900) && waited < IO_TIMEOUT,
        "closed after {waited:?}"
    );
}

#[test]
fn the_17th_control_connection_is_told_and_closed() {
    let dir = TempDir::new("ctl-17");
    let upstream = Upstream::echo();
    let (_proxy, sock) = start(&dir, &upstream, &[]);
    let held: Vec<UnixStream> = (0..16).map(|_| session(&sock)).collect();
    let mut extra = session(&sock);
    assert_eq!(
        read_all(&mut extra),
        "error msg=\"too many control connections (at most 16)\"\n"
    );
    // One of the 16 is served as usual; once it is done there is room again.
    let mut first = held.into_iter().next().unwrap();
    first.write_all(b"status\n").unwrap();
    let reply = read_all(&mut first);
    assert!(reply.ends_with("\nok\n"), "{reply:?}");
    assert!(
        wait_until(WAIT, || ctl(&sock, &["status"]).0 == 0),
        "a freed slot never took a new client"
    );
}

#[test]
fn ctl_exit_codes_and_the_config_file_way_to_the_socket() {
    let dir = TempDir::new("ctl-codes");
    let upstream = Upstream::echo();
    let (_proxy, sock) = start(&dir, &upstream, &[]);
    assert_eq!(ctl(&sock, &["status"]).0, 0);
    assert_eq!(ctl(&sock, &["nope"]).0, 1);
    let missing = dir.join("missing.sock");
    let (code, _, err) = ctl(&missing, &["status"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    // Usage: no command, no socket, both ways to the socket.
    assert_eq!(ctl(&sock, &[]).0, 2);
    let out = run(&["ctl", "status"], WAIT);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["ctl", "--control", "a", "-c", "b", "status"], WAIT);
    assert_eq!(out.status.code(), Some(2));
    // -c FILE reads the `control` key with the config reader.
    let conf = dir.write_atomic(
        "t.conf",
        &format!(
            "upstream = {}\ncontrol = {}\n",
            upstream.arg(),
            sock.display()
        ),
    );
    let out = run(&["ctl", "-c", conf.to_str().unwrap(), "status"], WAIT);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("state=running "));
    let bare = dir.write_atomic("bare.conf", "permits = 2\n");
    let out = run(&["ctl", "-c", bare.to_str().unwrap(), "status"], WAIT);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sets no control socket"));
}

#[test]
fn position_reports_a_waiting_clients_place() {
    let dir = TempDir::new("ctl-position");
    let upstream = Upstream::echo();
    let (proxy, sock) = start(&dir, &upstream, &[]);
    let _holder = holding(&proxy);
    let first = proxy.connect();
    wait_queued(&sock, 1);
    let second = proxy.connect();
    wait_queued(&sock, 2);
    let third = proxy.connect();
    wait_queued(&sock, 3);
    // Conns 2, 3, 4 wait in that order.
    let line = &ctl_ok(&sock, &["position", "3"])[0];
    assert_eq!(num_field(line, "conn"), 3, "{line}");
    assert_eq!(num_field(line, "position"), 2, "{line}");
    assert_eq!(num_field(line, "ahead"), 1, "{line}");
    assert_eq!(num_field(line, "free_permits"), 0, "{line}");
    assert_eq!(field(line, "eta_ms").as_deref(), Some("unknown"), "{line}");
    let by_addr = third.local_addr().unwrap().to_string();
    let line = &ctl_ok(&sock, &["position", &by_addr])[0];
    assert_eq!(num_field(line, "position"), 3, "{line}");
    assert_eq!(num_field(line, "conn"), 4, "{line}");
    // The one that proxies is not waiting; an unknown one is unknown.
    assert_eq!(
        ctl_err(&sock, &["position", "1"]),
        "not waiting in line: proxying"
    );
    assert_eq!(ctl_err(&sock, &["position", "9"]), "no connection 9");
    // One leaves: the one behind it moves up.
    drop(second);
    assert!(wait_until(WAIT, || {
        num_field(&ctl_ok(&sock, &["position", "4"])[0], "position") == 2
    }));
    drop(first);
}

#[test]
fn position_gives_an_eta_once_a_connection_finished() {
    let dir = TempDir::new("ctl-eta");
    let upstream = Upstream::echo();
    let (proxy, sock) = start(&dir, &upstream, &[]);
    let holder = holding(&proxy);
    // Long enough that the ms it took to connect upstream is rounding.
    std::thread::sleep(Duration::from_millis(300));
    finish(holder);
    let closed = proxy.expect_log(outcome("ok"), "first connection closed");
    let duration = num_field(&closed, "duration_ms");
    let _holder = holding(&proxy);
    let _waiting = proxy.connect();
    wait_queued(&sock, 1);
    let line = &ctl_ok(&sock, &["position", "3"])[0];
    assert_eq!(num_field(line, "position"), 1, "{line}");
    // Permits 1, one ahead holding it: the ETA is one connection's time,
    // the one that finished.
    let eta = num_field(line, "eta_ms");
    assert!(
        eta.abs_diff(duration) <= 1,
        "eta_ms={eta}, the finished connection's duration_ms={duration}: {line}"
    );
}

#[test]
fn pause_stops_activations_and_resume_lets_them_go_on() {
    let dir = TempDir::new("ctl-pause");
    let upstream = Upstream::echo();
    let (proxy, sock) = start(&dir, &upstream, &[]);
    ctl_ok(&sock, &["pause"]);
    assert_eq!(field(&status(&sock), "state").as_deref(), Some("paused"));
    let mut client = proxy.connect();
    wait_queued(&sock, 1);
    // Still queued after a look: nothing activates while paused.
    assert_eq!(num_field(&status(&sock), "active"), 0);
    assert_eq!(proxy.count_logs(event("activated")), 0);
    ctl_ok(&sock, &["resume"]);
    roundtrip(&mut client, b"through\n");
    assert_eq!(field(&status(&sock), "state").as_deref(), Some("running"));
}

#[test]
fn drain_times_out_while_a_permit_is_held_and_stays_paused() {
    let dir = TempDir::new("ctl-drain-timeout");
    let upstream = Upstream::echo();
    let (proxy, sock) = start(&dir, &upstream, &[]);
    let _holder = holding(&proxy);
    let started = Instant::now();
    assert_eq!(ctl_err(&sock, &["drain", "300ms"]), "timeout");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(field(&status(&sock), "state").as_deref(), Some("paused"));
}

#[test]
fn drain_answers_once_no_permit_is_held() {
    let dir = TempDir::new("ctl-drain-ok");
    let upstream = Upstream::echo();
    let (proxy, sock) = start(&dir, &upstream, &[]);
    let holder = holding(&proxy);
    let mut waiting = proxy.connect();
    wait_queued(&sock, 1);
    let sock2 = sock.clone();
    let drain = std::thread::spawn(move || ctl(&sock2, &["drain", "60s"]));
    assert!(
        wait_until(WAIT, || field(&status(&sock), "state").as_deref()
            == Some("draining")),
        "never draining"
    );
    assert!(
        !drain.is_finished(),
        "drain answered while a permit is held"
    );
    finish(holder);
    let (code, out, err) = drain.join().unwrap();
    assert_eq!((code, out.as_str()), (0, "ok\n"), "{err}");
    // Drained and paused: the waiting client still waits, until resumed.
    let line = status(&sock);
    assert_eq!(field(&line, "state").as_deref(), Some("paused"), "{line}");
    assert_eq!(num_field(&line, "queued"), 1, "{line}");
    ctl_ok(&sock, &["resume"]);
    roundtrip(&mut waiting, b"after the drain\n");
    // With nothing held a drain answers at once.
    finish(waiting);
    assert!(wait_until(WAIT, || num_field(&status(&sock), "active") == 0));
    ctl_ok(&sock, &["drain"]);
}

#[test]
fn a_drain_whose_client_hangs_up_stops_waiting_but_stays_paused() {
    let dir = TempDir::new("ctl-drain-gone");
    let upstream = Upstream::echo();
    let (proxy, sock) = start(&dir, &upstream, &[]);
    let _holder = holding(&proxy);
    // One that half-closes after its line still gets its answer later;
    // one that hangs up entirely is forgotten.
    let mut half = session(&sock);
    half.write_all(b"drain 400ms\n").unwrap();
    half.shutdown(std::net::Shutdown::Write).unwrap();
    let mut gone = session(&sock);
    gone.write_all(b"drain\n").unwrap();
    assert!(wait_until(WAIT, || {
        field(&status(&sock), "state").as_deref() == Some("draining")
    }));
    drop(gone);
    assert_eq!(read_all(&mut half), "error msg=timeout\n");
    assert!(
        wait_until(WAIT, || field(&status(&sock), "state").as_deref()
            == Some("paused")),
        "the hung-up drain still counts: {}",
        status(&sock)
    );
}

#[test]
fn kill_ends_a_waiting_or_an_active_connection() {
    let dir = TempDir::new("ctl-kill");
    let upstream = Upstream::echo();
    let (proxy, sock) = start(&dir, &upstream, &[]);
    let mut holder = holding(&proxy);
    let mut waiting = proxy.connect();
    let mut last = proxy.connect();
    wait_queued(&sock, 2);
    ctl_ok(&sock, &["kill", "2"]);
    let line = proxy.expect_log(closed_with(2, "killed"), "waiting conn 2 killed");
    assert_eq!(field(&line, "ended_by").as_deref(), Some("tcplock"));
    expect_closed(&mut waiting, WAIT).expect("the killed waiting client is closed");
    ctl_ok(&sock, &["kill", "1"]);
    let line = proxy.expect_log(closed_with(1, "killed"), "active conn 1 killed");
    assert_eq!(field(&line, "ended_by").as_deref(), Some("tcplock"));
    expect_closed(&mut holder, WAIT).expect("the killed active client is closed");
    // Its permit went to the next in line.
    roundtrip(&mut last, b"next\n");
    let line = status(&sock);
    assert_eq!(num_field(&line, "killed"), 2, "{line}");
    assert_eq!(ctl_err(&sock, &["kill", "1"]), "no connection 1");
}

#[test]
fn conns_lists_every_connection_with_its_bytes() {
    let dir = TempDir::new("ctl-conns");
    let upstream = Upstream::echo();
    let (proxy, sock) = start(&dir, &upstream, &[]);
    let mut holder = holding(&proxy);
    roundtrip(&mut holder, b"0123456789\n");
    let _waiting = proxy.connect();
    wait_queued(&sock, 1);
    let lines = ctl_ok(&sock, &["conns"]);
    assert_eq!(lines.len(), 2, "{lines:?}");
    let (a, b) = (&lines[0], &lines[1]);
    assert_eq!(num_field(a, "conn"), 1);
    assert_eq!(field(a, "state").as_deref(), Some("proxying"));
    assert_eq!(field(a, "instance").as_deref(), Some("1"));
    assert_eq!(
        field(a, "client"),
        Some(holder.local_addr().unwrap().to_string())
    );
    // "holding\n" and "0123456789\n", each way.
    assert_eq!(num_field(a, "bytes_up"), 19, "{a}");
    assert_eq!(num_field(a, "bytes_down"), 19, "{a}");
    assert_eq!(num_field(b, "conn"), 2);
    assert_eq!(field(b, "state").as_deref(), Some("queued"));
    assert_eq!(field(b, "instance"), None, "no permit, no instance: {b}");
    assert_eq!(num_field(b, "bytes_up"), 0);
    assert!(num_field(b, "age_ms") >= num_field(b, "waited_ms"));
}

#[test]
fn reload_answers_with_the_changed_keys_or_the_file_error() {
    let dir = TempDir::new("ctl-reload");
    let upstream = Upstream::echo();
    let sock = dir.join("ctl.sock");
    let base = format!(
        "listen = 127.0.0.1:0\nupstream = {}\ncontrol = {}\n",
        upstream.arg(),
        sock.display()
    );
    let conf = dir.write_atomic("t.conf", &base);
    let _proxy = Proxy::start_raw(&["-c", conf.to_str().unwrap()]);
    dir.write_atomic("t.conf", &format!("{base}permits = 3\n"));
    let lines = ctl_ok(&sock, &["reload"]);
    assert_eq!(lines, ["changed=permits"]);
    assert_eq!(num_field(&status(&sock), "permits"), 3);
    dir.write_atomic("t.conf", &format!("{base}permits = none\n"));
    let msg = ctl_err(&sock, &["reload"]);
    assert!(msg.contains("t.conf:4"), "{msg}");
    assert_eq!(num_field(&status(&sock), "permits"), 3);
}

#[test]
fn stop_shuts_down_like_sigterm() {
    let dir = TempDir::new("ctl-stop");
    let upstream = Upstream::echo();
    let (mut proxy, sock) = start(&dir, &upstream, &[]);
    ctl_ok(&sock, &["stop"]);
    let status = proxy.wait_exit(WAIT).expect("exits after stop");
    assert_eq!(status.code(), Some(0));
    proxy.expect_log(event("shutdown_started"), "shutdown_started");
    assert!(!sock.exists());
}

#[test]
fn a_stale_socket_is_replaced() {
    let dir = TempDir::new("ctl-stale");
    let sock = dir.join("ctl.sock");
    drop(UnixListener::bind(&sock).expect("bind"));
    assert!(sock.exists(), "the stale socket file stays");
    let upstream = Upstream::echo();
    let (_proxy, sock) = start(&dir, &upstream, &[]);
    assert_eq!(field(&status(&sock), "state").as_deref(), Some("running"));
}

#[test]
fn a_live_socket_or_another_file_is_an_error_naming_it() {
    let dir = TempDir::new("ctl-taken");
    let upstream = Upstream::echo();
    let sock = dir.join("live.sock");
    let _live = UnixListener::bind(&sock).expect("bind");
    let out = run(
        &[
            "-l",
            "127.0.0.1:0",
            "-u",
            &upstream.arg(),
            "--control",
            sock.to_str().unwrap(),
        ],
        WAIT,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(sock.to_str().unwrap()) && err.contains("another process"),
        "{err}"
    );
    let file = dir.write_atomic("plain", "not a socket\n");
    let out = run(
        &[
            "-l",
            "127.0.0.1:0",
            "-u",
            &upstream.arg(),
            "--control",
            file.to_str().unwrap(),
        ],
        WAIT,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(file.to_str().unwrap()) && err.contains("not a socket"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "not a socket\n",
        "left alone"
    );
}

#[test]
fn a_reply_larger_than_the_socket_buffer_is_written_as_the_client_reads() {
    let dir = TempDir::new("ctl-big");
    let upstream = Upstream::echo();
    let (proxy, sock) = start(&dir, &upstream, &["--max-queue", "4000"]);
    // ~100 bytes a line (a waiting client names no instance): 3000 lines
    // are well past the 208 KiB a Unix socket buffers by default.
    let clients: Vec<std::net::TcpStream> = (0..3000).map(|_| proxy.connect()).collect();
    wait_queued(&sock, 2999);
    let mut slow = session(&sock);
    slow.write_all(b"conns\n").unwrap();
    // While that reply waits for its reader, the loop serves everyone else.
    for _ in 0..3 {
        assert_eq!(num_field(&status(&sock), "queued"), 2999);
    }
    let reply = read_all(&mut slow);
    let lines: Vec<&str> = reply.lines().collect();
    assert!(reply.len() > 256 * 1024, "{} bytes", reply.len());
    assert_eq!(lines.len(), 3001);
    assert_eq!(lines.last(), Some(&"ok"));
    assert_eq!(num_field(lines[2999], "conn"), 3000);
    drop(clients);
}

#[test]
fn ctl_as_the_17th_client_prints_the_error_line_and_nothing_else() {
    let dir = TempDir::new("ctl-17-ctl");
    let upstream = Upstream::echo();
    let (_proxy, sock) = start(&dir, &upstream, &[]);
    let held: Vec<UnixStream> = (0..16).map(|_| session(&sock)).collect();
    // The command may arrive before or after the refusal: both ways.
    for _ in 0..20 {
        let (code, out, err) = ctl(&sock, &["status"]);
        assert_eq!(
            (code, out.as_str(), err.as_str()),
            (
                1,
                "error msg=\"too many control connections (at most 16)\"\n",
                ""
            )
        );
    }
    drop(held);
}

#[test]
fn ctl_gives_up_on_a_stopped_tcplock_after_10s() {
    let dir = TempDir::new("ctl-stopped");
    let upstream = Upstream::echo();
    let (proxy, sock) = start(&dir, &upstream, &[]);
    proxy.signal("STOP");
    let started = Instant::now();
    let out = run(
        &["ctl", "--control", sock.to_str().unwrap(), "status"],
        Duration::from_secs(40),
    );
    let took = started.elapsed();
    proxy.signal("CONT");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no reply from") && err.contains("within 10 s"),
        "{err}"
    );
    assert!(took >= Duration::from_secs(10), "gave up after {took:?}");
    // Running again, it answers.
    assert_eq!(ctl(&sock, &["status"]).0, 0);
}

#[test]
fn waiting_commands_are_answered_when_shutdown_begins() {
    let dir = TempDir::new("ctl-drain-stop");
    let upstream = Upstream::echo();
    let (mut proxy, sock) = start(&dir, &upstream, &[]);
    // The held permit keeps both the drain and the shutdown waiting.
    let mut holder = holding(&proxy);
    let mut drain = session(&sock);
    drain.write_all(b"drain\n").unwrap();
    assert!(wait_until(WAIT, || {
        field(&status(&sock), "state").as_deref() == Some("draining")
    }));
    proxy.signal("TERM");
    assert_eq!(read_all(&mut drain), "error msg=stopping\n");
    // Once stopping, nothing more waits for an answer after the exit.
    assert_eq!(ctl_err(&sock, &["drain"]), "stopping");
    assert_eq!(ctl_err(&sock, &["reload"]), "stopping");
    roundtrip(&mut holder, b"still served\n");
    drop(holder);
    let status = proxy.wait_exit(WAIT).expect("tcplock exits");
    assert!(status.success(), "{status:?}");
}

#[test]
fn sixteen_stalled_conns_readers_cost_a_part_each_not_the_whole_listing() {
    const CLIENTS: usize = 8000;
    let dir = TempDir::new("ctl-conns-stream");
    let upstream = Upstream::echo();
    let (proxy, sock) = start(&dir, &upstream, &["--max-queue", "10000"]);
    let clients: Vec<std::net::TcpStream> = (0..CLIENTS).map(|_| proxy.connect()).collect();
    assert!(
        wait_until(Duration::from_secs(30), || num_field(
            &status(&sock),
            "queued"
        ) == CLIENTS as u64 - 1),
        "{}",
        status(&sock)
    );
    // ~115 bytes a line: each listing is about 900 KiB.
    let before = proxy.rss_kib();
    let mut readers: Vec<UnixStream> = (0..16)
        .map(|_| {
            let mut s = session(&sock);
            s.write_all(b"conns\n").unwrap();
            // The reply has begun: the server built what it builds.
            let mut first = [0u8; 1];
            s.read_exact(&mut first).unwrap();
            s
        })
        .collect();
    let grown = proxy.rss_kib().saturating_sub(before);
    // Each stalled reader holds at most one 64 KiB part (~1 MiB in all),
    // not its whole listing (~14 MiB in all).
    assert!(grown < 5 * 1024, "RSS grew by {grown} KiB");
    // Each listing is complete: every connection once, then ok.
    for reader in &mut readers {
        let mut reply = b"c".to_vec();
        reader.read_to_end(&mut reply).unwrap();
        let reply = String::from_utf8(reply).unwrap();
        let lines: Vec<&str> = reply.lines().collect();
        assert_eq!(lines.len(), CLIENTS + 1);
        assert_eq!(lines.last(), Some(&"ok"));
        let mut ids: Vec<u64> = lines[..CLIENTS]
            .iter()
            .map(|l| num_field(l, "conn"))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), CLIENTS);
    }
    drop(clients);
}
