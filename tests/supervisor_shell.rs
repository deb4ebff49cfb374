//! The supervisor's shell mechanics (`--spawn`): the service's and the
//! hooks' output logged line by line and capped, the service's environment,
//! the parent-death signal, signalling the whole process session, and
//! reaping orphans as a child subreaper. The policies (when to restart, give
//! up, ...) are tested in the other supervisor files.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The stand-in service: prints what its arguments ask for, then serves
/// `hi\n` to each connection on `$TCPLOCK_UPSTREAM_HOST:$TCPLOCK_UPSTREAM_PORT`.
const SERVER: &str = r#"
import os, socket, sys
for arg in sys.argv[1:]:
    if arg == "--env":
        for key in ["TCPLOCK_UPSTREAM_HOST", "TCPLOCK_UPSTREAM_PORT", "TCPLOCK_GENERATION",
                    "TCPLOCK_RESTART_REASON", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID",
                    "WATCHDOG_USEC", "KEPT_VAR"]:
            print("env %s=%s" % (key, os.environ.get(key, "<unset>")), flush=True)
    elif arg == "--long":
        print("x" * 10000, flush=True)
        print("short after long", flush=True)
    elif arg == "--stderr":
        sys.stderr.write("to stderr\n")
        sys.stderr.flush()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((os.environ["TCPLOCK_UPSTREAM_HOST"], int(os.environ["TCPLOCK_UPSTREAM_PORT"])))
s.listen(16)
while True:
    c, _ = s.accept()
    c.sendall(b"hi\n")
    c.close()
"#;

/// The stand-in written to a file of this test's own.
fn server_script(test: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "tcplock-supervisor-shell-{}-{test}.py",
        std::process::id()
    ));
    std::fs::write(&path, SERVER).expect("write the stand-in service");
    path
}

/// The python3 interpreter itself (not a wrapper script that forks first).
fn python() -> String {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

/// `--spawn` arguments running `prelude` then the stand-in with `args`.
fn spawn_args(port: u16, prelude: &str, script: &Path, args: &str) -> Vec<String> {
    vec![
        "-u".into(),
        format!("127.0.0.1:{port}"),
        "--spawn".into(),
        format!("{prelude}exec {} {} {args}", python(), script.display()),
    ]
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// An `event=output` line whose `line=` is exactly `text`.
fn output(text: &'static str) -> impl Fn(&str) -> bool + Clone {
    move |l| is_event(l, "output") && field(l, "line").as_deref() == Some(text)
}

/// `/proc/PID/stat`'s state and parent, or `None` once the pid is gone.
fn proc_state(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Gone for good: neither running nor a zombie.
fn is_gone(pid: u32) -> bool {
    proc_state(pid).is_none()
}

/// A client through the proxy gets the stand-in's greeting.
fn greeted(proxy: &Proxy) {
    let mut client = proxy.connect();
    assert_eq!(read_n(&mut client, 3).expect("greeting"), b"hi\n");
}

#[test]
fn service_output_is_logged_by_line_with_its_generation_and_long_lines_are_cut() {
    let script = server_script("output");
    let args = spawn_args(unused_port(), "", &script, "--long --stderr");
    let proxy = Proxy::start(&strs(&args));
    proxy.expect_log(event("upstream_ready"), "the service ready");
    let cut = proxy.expect_log(
        |l| is_event(l, "output") && field(l, "truncated").as_deref() == Some("true"),
        "the long line, cut",
    );
    assert_field(&cut, "from", "upstream");
    assert_field(&cut, "gen", "1");
    assert_eq!(field(&cut, "line"), Some("x".repeat(4096)), "{cut}");
    // The rest of the long line is dropped, not logged as lines of its own.
    let after = proxy.expect_log(output("short after long"), "the line after the long one");
    assert_eq!(field(&after, "truncated"), None, "{after}");
    let stderr = proxy.expect_log(output("to stderr"), "the service's stderr");
    assert_field(&stderr, "gen", "1");
    greeted(&proxy);
    let xs = proxy.count_logs(|l| {
        is_event(l, "output") && field(l, "line").is_some_and(|line| line.starts_with('x'))
    });
    assert_eq!(xs, 1, "{:#?}", proxy.matching(event("output")));
    let _ = std::fs::remove_file(script);
}

#[test]
fn the_service_gets_its_variables_and_not_systemds() {
    let script = server_script("env");
    let port = unused_port();
    let args = spawn_args(port, "", &script, "--env");
    let proxy = Proxy::start_with_env(
        &[
            ("NOTIFY_SOCKET", "/nonexistent/tcplock-test-notify"),
            ("LISTEN_FDS", "3"),
            ("LISTEN_PID", "1"),
            ("WATCHDOG_USEC", "1000000"),
            ("KEPT_VAR", "kept"),
        ],
        &strs(&args),
    );
    proxy.expect_log(event("upstream_ready"), "the service ready");
    let port = port.to_string();
    for (key, want) in [
        ("TCPLOCK_UPSTREAM_HOST", "127.0.0.1"),
        ("TCPLOCK_UPSTREAM_PORT", port.as_str()),
        ("TCPLOCK_GENERATION", "1"),
        ("TCPLOCK_RESTART_REASON", "first"),
        ("NOTIFY_SOCKET", "<unset>"),
        ("LISTEN_FDS", "<unset>"),
        ("LISTEN_PID", "<unset>"),
        ("WATCHDOG_USEC", "<unset>"),
        ("KEPT_VAR", "kept"),
    ] {
        let prefix = format!("env {key}=");
        let line = proxy.expect_log(
            |l| is_event(l, "output") && field(l, "line").is_some_and(|v| v.starts_with(&prefix)),
            key,
        );
        assert_eq!(
            field(&line, "line"),
            Some(format!("{prefix}{want}")),
            "{line}"
        );
    }
    let _ = std::fs::remove_file(script);
}

#[test]
fn hook_output_is_logged_and_hooks_learn_the_generation_and_pid() {
    let script = server_script("hook");
    let mut args = spawn_args(unused_port(), "", &script, "");
    args.extend([
        "--on-activate".to_string(),
        "echo gen=$TCPLOCK_GENERATION pid=$TCPLOCK_UPSTREAM_PID; echo hook-stderr >&2".to_string(),
    ]);
    let proxy = Proxy::start(&strs(&args));
    let starting = proxy.expect_log(event("upstream_starting"), "the service spawned");
    let pid = field(&starting, "pid").expect("pid=");
    greeted(&proxy);
    let said = proxy.expect_log(
        |l| is_event(l, "output") && field(l, "line").is_some_and(|line| line.starts_with("gen=")),
        "the hook's stdout",
    );
    assert_field(&said, "from", "on-activate");
    assert_field(&said, "gen", "1");
    assert_eq!(
        field(&said, "line"),
        Some(format!("gen=1 pid={pid}")),
        "{said}"
    );
    let stderr = proxy.expect_log(output("hook-stderr"), "the hook's stderr");
    assert_field(&stderr, "from", "on-activate");
    // Its output comes before its exit (which may be logged after the
    // output lines were seen: wait for it before taking the log).
    proxy.expect_log(event("hook_exited"), "the hook's exit");
    let logs = proxy.logs();
    let at = |pred: &dyn Fn(&str) -> bool| logs.iter().position(|l| pred(l));
    let (said_at, exited_at) = (
        at(&|l| l.contains("line=\"gen=")),
        at(&|l| is_event(l, "hook_exited")),
    );
    assert!(
        said_at.is_some() && exited_at.is_some() && said_at < exited_at,
        "{logs:#?}"
    );
    let _ = std::fs::remove_file(script);
}

#[test]
fn killing_tcplock_takes_the_direct_child_with_it() {
    let script = server_script("pdeathsig");
    let args = spawn_args(unused_port(), "", &script, "");
    let mut proxy = Proxy::start(&strs(&args));
    let starting = proxy.expect_log(event("upstream_starting"), "the service spawned");
    let pid: u32 = num_field(&starting, "pid") as u32;
    proxy.expect_log(event("upstream_ready"), "the service ready");
    assert_eq!(proxy_state_parent(pid), Some(proxy.pid()));
    proxy.signal("KILL");
    assert!(proxy.wait_exit(WAIT).is_some(), "tcplock did not die");
    // Re-parented to init (or a subreaper above us), which reaps it.
    assert!(
        wait_until(WAIT, || proc_state(pid)
            .is_none_or(|(state, _)| state == 'Z')),
        "the service {pid} outlived tcplock: {:?}",
        proc_state(pid)
    );
}

fn proxy_state_parent(pid: u32) -> Option<u32> {
    proc_state(pid).map(|(_, ppid)| ppid)
}

#[test]
fn stopping_signals_the_whole_session_and_an_orphan_is_reaped() {
    let script = server_script("session");
    // A grandchild that stays (its subshell exits, so tcplock, the
    // subreaper, becomes its parent), an orphan that exits by itself, and
    // one that left the session first (only SIGCHLD finds it, not a sample
    // of the session).
    let prelude = "(sleep 120 & echo lingering $!; sleep 1 & echo orphan $!; \
                   setsid sleep 1 & echo escaped $!); ";
    let args = spawn_args(unused_port(), prelude, &script, "");
    let mut proxy = Proxy::start(&strs(&args));
    let pid_of = |what: &'static str| -> u32 {
        let line = proxy.expect_log(
            move |l| {
                is_event(l, "output") && field(l, "line").is_some_and(|line| line.starts_with(what))
            },
            what,
        );
        let text = field(&line, "line").expect("line=");
        text[what.len()..].trim().parse().expect("a pid")
    };
    let (lingering, orphan, escaped) = (pid_of("lingering"), pid_of("orphan"), pid_of("escaped"));
    proxy.expect_log(event("upstream_ready"), "the service ready");
    greeted(&proxy);
    let tcplock = proxy.pid();
    assert!(
        wait_until(WAIT, || proc_state(lingering)
            .is_some_and(|(_, p)| p == tcplock)),
        "the lingering grandchild {lingering} was not re-parented to tcplock: {:?}",
        proc_state(lingering)
    );
    // The orphans exit after a second; tcplock reaps them (no zombie left),
    // while still running.
    for pid in [orphan, escaped] {
        assert!(
            wait_until(WAIT, || is_gone(pid)),
            "the orphan {pid} was not reaped: {:?}",
            proc_state(pid)
        );
    }
    assert!(
        proc_state(tcplock).is_some_and(|(state, _)| state != 'Z'),
        "tcplock exited early"
    );
    proxy.signal("TERM");
    let status = proxy.wait_exit(WAIT).expect("tcplock exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    // The grandchild was not the spawned process, yet it is gone: the stop
    // signals the whole session.
    assert!(
        wait_until(WAIT, || is_gone(lingering)
            || proc_state(lingering).is_some_and(|(s, _)| s == 'Z')),
        "the grandchild {lingering} survived the stop: {:?}",
        proc_state(lingering)
    );
    assert!(
        proxy
            .wait_for_log(
                |l| is_event(l, "upstream_exited")
                    && field(l, "expected").as_deref() == Some("true"),
                WAIT
            )
            .is_some(),
        "{:#?}",
        proxy.logs()
    );
    let _ = std::fs::remove_file(script);
}

#[test]
fn a_crashed_service_is_replaced_by_a_new_generation() {
    let script = server_script("crash");
    let args = spawn_args(unused_port(), "", &script, "");
    let mut proxy = Proxy::start(&strs(&args));
    let starting = proxy.expect_log(event("upstream_starting"), "the service spawned");
    proxy.expect_log(event("upstream_ready"), "the service ready");
    greeted(&proxy);
    let pid = field(&starting, "pid").expect("pid=");
    let killed = Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let exited = proxy.expect_log(event("upstream_exited"), "the crash noticed");
    assert_field(&exited, "expected", "false");
    assert_field(&exited, "status", "signal:KILL");
    let second = proxy.expect_log(
        |l| is_event(l, "upstream_starting") && field(l, "gen").as_deref() == Some("2"),
        "a second generation",
    );
    assert_field(&second, "reason", "crash");
    proxy.expect_log(
        |l| is_event(l, "upstream_ready") && field(l, "gen").as_deref() == Some("2"),
        "the second generation ready",
    );
    greeted(&proxy);
    proxy.signal("TERM");
    let status = proxy.wait_exit(WAIT).expect("tcplock exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_file(script);
}

#[test]
fn a_process_a_hook_left_behind_keeps_a_working_stdout() {
    let upstream = Upstream::echo();
    let hook = "sh -c 'sleep 0.3; echo late-line; exec sleep 120' & echo daemon $!";
    let proxy = Proxy::start(&["-u", &upstream.arg(), "--on-activate", hook]);
    let mut client = proxy.connect();
    roundtrip(&mut client, b"ping");
    let said = proxy.expect_log(
        |l| is_event(l, "output") && field(l, "line").is_some_and(|v| v.starts_with("daemon ")),
        "the hook's line",
    );
    let daemon: u32 = field(&said, "line").expect("line=")["daemon ".len()..]
        .parse()
        .expect("a pid");
    proxy.expect_log(event("hook_exited"), "the hook's exit");
    // Written after the hook exited: still read and credited to the hook,
    // and the writer did not die of SIGPIPE.
    let late = proxy.expect_log(output("late-line"), "the daemon's line");
    assert_field(&late, "from", "on-activate");
    let alive = proc_state(daemon).is_some_and(|(state, _)| state != 'Z');
    let _ = Command::new("kill")
        .args(["-KILL", &daemon.to_string()])
        .status();
    assert!(alive, "the daemon {daemon} died: {:?}", proc_state(daemon));
}

#[test]
fn a_service_flooding_its_output_is_read_to_the_end_while_clients_are_served() {
    let script = server_script("flood");
    // 50 MB without a newline (one line, cut), then a line saying so.
    let prelude = "(head -c 50000000 /dev/zero | tr '\\0' x; echo; echo flood-done) & ";
    let args = spawn_args(unused_port(), prelude, &script, "");
    let proxy = Proxy::start(&strs(&args));
    proxy.expect_log(event("upstream_ready"), "the service ready");
    for _ in 0..20 {
        greeted(&proxy);
    }
    // Every byte was read (the writer was never left blocked on a full
    // pipe), and dropped past the cap rather than logged.
    proxy.expect_log(output("flood-done"), "the end of the flood");
    let cut = proxy
        .matching(|l| is_event(l, "output") && field(l, "truncated").as_deref() == Some("true"));
    assert_eq!(cut.len(), 1, "{cut:#?}");
    assert_eq!(field(&cut[0], "line"), Some("x".repeat(4096)));
    let _ = std::fs::remove_file(script);
}

#[test]
fn without_pidfds_the_service_is_watched_through_sigchld() {
    let script = server_script("nopidfd");
    let args = spawn_args(unused_port(), "", &script, "");
    // The first `clone` (the service's, with CLONE_PIDFD) fails as under a
    // seccomp filter or an old kernel; a plain fork works.
    let mut proxy = Proxy::start_injecting("clone:error=ENOSYS:when=1", &strs(&args));
    let starting = proxy.expect_log(event("upstream_starting"), "the service spawned");
    proxy.expect_log(event("upstream_ready"), "the service ready");
    assert_eq!(proxy.count_logs(event("pidfd_unavailable")), 1);
    greeted(&proxy);
    let pid = field(&starting, "pid").expect("pid=");
    assert_eq!(
        proc_state(pid.parse().expect("a pid")).map(|(_, ppid)| ppid),
        Some(proxy.pid()),
        "the service runs as tcplock's child"
    );
    let killed = Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let exited = proxy.expect_log(event("upstream_exited"), "the crash noticed");
    assert_field(&exited, "status", "signal:KILL");
    assert_field(&exited, "expected", "false");
    proxy.expect_log(
        |l| is_event(l, "upstream_ready") && field(l, "gen").as_deref() == Some("2"),
        "the second generation ready",
    );
    greeted(&proxy);
    proxy.signal("TERM");
    let status = proxy.wait_exit(WAIT).expect("tcplock exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_file(script);
}

#[test]
fn a_service_on_the_second_address_of_its_name_is_found_ready() {
    // getaddrinfo puts ::1 before 127.0.0.1; the service listens on the
    // second only. Needs root and unshare for a private /etc/hosts.
    let hosts =
        std::env::temp_dir().join(format!("tcplock-supervisor-hosts-{}", std::process::id()));
    std::fs::write(&hosts, "::1 localhost\n127.0.0.1 localhost\n").expect("write the hosts file");
    let script = server_script("second-address");
    let port = unused_port();
    let spawn = format!(
        "TCPLOCK_UPSTREAM_HOST=127.0.0.1 exec {} {}",
        python(),
        script.display()
    );
    let upstream = format!("localhost:{port}");
    let proxy = Proxy::start_with_hosts(&hosts, &["-u", &upstream, "--spawn", &spawn]);
    let _ = std::fs::remove_file(&hosts);
    proxy.expect_log(event("upstream_ready"), "the service found on 127.0.0.1");
    greeted(&proxy);
    let _ = std::fs::remove_file(script);
}
