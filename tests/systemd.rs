//! systemd integration: the `sd_notify` datagrams on a notify socket the test
//! binds (a path or an abstract `@name`), the watchdog, the service manager's
//! variables kept from hooks, and socket activation (under
//! `systemd-socket-activate`, and refused for anything but a listening TCP
//! socket on descriptor 3).

mod common;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    BIN, Proxy, Upstream, WAIT, closed_with, connect, event, field, holding, roundtrip,
    unused_port, wait_until,
};

/// A scratch directory of this test process, one name per test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tcplock-systemd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

/// The service manager's end: a datagram socket tcplock is pointed at.
struct NotifySocket {
    socket: UnixDatagram,
    /// What `NOTIFY_SOCKET` says.
    name: String,
}

impl NotifySocket {
    fn at_path(name: &str) -> NotifySocket {
        let path = scratch(name);
        let socket = UnixDatagram::bind(&path).unwrap();
        NotifySocket::new(socket, path.to_str().unwrap().to_string())
    }

    fn abstract_name(name: &str) -> NotifySocket {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let unique = format!(
            "tcplock-test-{}-{}-{name}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let addr = UnixAddr::from_abstract_name(unique.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        NotifySocket::new(socket, format!("@{unique}"))
    }

    fn new(socket: UnixDatagram, name: String) -> NotifySocket {
        NotifySocket { socket, name }
    }

    /// The next datagram within `timeout`, if one comes.
    fn recv_within(&self, timeout: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => None,
        }
    }

    fn next(&self, what: &str) -> String {
        self.recv_within(WAIT)
            .unwrap_or_else(|| panic!("no datagram within {WAIT:?}; expected {what}"))
    }

    /// Datagrams already waiting, without waiting for more.
    fn pending(&self) -> Vec<String> {
        self.socket.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.socket.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        self.socket.set_nonblocking(false).unwrap();
        out
    }
}

/// Waits for tcplock's clean exit (`what` if it does not come) and checks
/// no notification followed STOPPING=1.
#[track_caller]
fn exits_with_nothing_after_stopping(proxy: &mut Proxy, notify: &NotifySocket, what: &str) {
    let status = proxy.wait_exit(WAIT).expect(what);
    assert!(status.success(), "{status:?}");
    assert_eq!(
        notify.pending(),
        Vec::<String>::new(),
        "nothing after STOPPING=1"
    );
}

/// `tcplock -l 127.0.0.1:0 ARGS` with `env` added.
fn start_with_env(env: &[(&str, &str)], args: &[&str]) -> Proxy {
    let mut full = vec!["-l", "127.0.0.1:0"];
    full.extend_from_slice(args);
    let mut command = Command::new(BIN);
    command.args(&full).envs(env.iter().copied());
    Proxy::start_command(command, &full)
}

/// `CLOCK_MONOTONIC` in µs, the clock of `MONOTONIC_USEC=`.
fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec for the call.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) },
        0
    );
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000
}

#[test]
fn ready_reloading_ready_stopping_in_order() {
    let upstream = Upstream::echo();
    let notify = NotifySocket::at_path("order.sock");
    let conf = scratch("order.conf");
    std::fs::write(
        &conf,
        format!("upstream = {}\npermits = 1\n", upstream.arg()),
    )
    .unwrap();
    let mut proxy = start_with_env(
        &[("NOTIFY_SOCKET", &notify.name)],
        &["-c", conf.to_str().unwrap()],
    );
    assert_eq!(notify.next("READY=1"), "READY=1\nSTATUS=queued=0 active=0");

    std::fs::write(
        &conf,
        format!("upstream = {}\npermits = 2\n", upstream.arg()),
    )
    .unwrap();
    let before = monotonic_usec();
    proxy.signal("HUP");
    let reloading = notify.next("RELOADING=1");
    let after = monotonic_usec();
    let mut lines = reloading.lines();
    assert_eq!(lines.next(), Some("RELOADING=1"), "{reloading:?}");
    let usec: u64 = lines
        .next()
        .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(
        (before..=after).contains(&usec),
        "MONOTONIC_USEC={usec} not within [{before}, {after}]"
    );
    assert_eq!(notify.next("READY=1 after the reload"), "READY=1");
    let reloaded = proxy.expect_log(event("reloaded"), "the reload");
    assert_eq!(field(&reloaded, "changed").as_deref(), Some("permits"));

    // A reload that fails still ends with READY=1: tcplock serves on.
    std::fs::write(&conf, "permits = none\n").unwrap();
    proxy.signal("HUP");
    assert!(notify.next("RELOADING=1").starts_with("RELOADING=1\n"));
    assert_eq!(notify.next("READY=1 after a failed reload"), "READY=1");
    proxy.expect_log(event("reload_failed"), "the failed reload");

    proxy.signal("TERM");
    assert_eq!(notify.next("STOPPING=1"), "STOPPING=1");
    exits_with_nothing_after_stopping(&mut proxy, &notify, "tcplock exits after SIGTERM");
}

#[test]
fn status_follows_the_counts_at_most_once_a_second_and_idle_stays_asleep() {
    let upstream = Upstream::echo();
    let notify = NotifySocket::abstract_name("status");
    // READY=1 goes out after this, and each STATUS at least a second after
    // the one before (READY=1 included): the n-th cannot arrive sooner than
    // n seconds from here, however late the test thread reads them.
    let spawned = Instant::now();
    let proxy = start_with_env(
        &[("NOTIFY_SOCKET", &notify.name)],
        &["-u", &upstream.arg(), "-n", "1"],
    );
    assert_eq!(notify.next("READY=1"), "READY=1\nSTATUS=queued=0 active=0");
    let _holder = holding(&proxy);
    let waiting: Vec<_> = (0..2).map(|_| proxy.connect()).collect();
    let mut statuses: Vec<(Duration, String)> = Vec::new();
    let deadline = Instant::now() + WAIT;
    while statuses.last().map(|(_, s)| s.as_str()) != Some("STATUS=queued=2 active=1") {
        assert!(Instant::now() < deadline, "statuses so far: {statuses:?}");
        if let Some(status) = notify.recv_within(Duration::from_millis(200)) {
            statuses.push((spawned.elapsed(), status));
        }
    }
    for (n, (at, status)) in statuses.iter().enumerate() {
        assert!(status.starts_with("STATUS=queued="), "{statuses:?}");
        let earliest = Duration::from_secs(n as u64 + 1);
        assert!(*at >= earliest, "status {n} at {at:?}: {statuses:?}");
    }
    // Nothing changes now: the loop sleeps, no wake-up per second.
    let switches = || {
        let status =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/status", proxy.pid())).unwrap();
        status
            .lines()
            .filter(|l| l.contains("ctxt_switches"))
            .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    let before = switches();
    thread::sleep(Duration::from_millis(2_500));
    let woke = switches() - before;
    assert!(woke <= 1, "the idle loop woke {woke} times in 2.5 s");
    assert_eq!(notify.pending(), Vec::<String>::new());
    drop(waiting);
}

#[test]
fn the_watchdog_is_fed_every_half_interval_when_it_is_ours() {
    let upstream = Upstream::echo();
    let notify = NotifySocket::at_path("watchdog.sock");
    // READY=1 goes out after this, the n-th ping after it n × 100 ms later.
    let spawned = Instant::now();
    // 200 ms: a ping every 100 ms.
    let _proxy = start_with_env(
        &[("NOTIFY_SOCKET", &notify.name), ("WATCHDOG_USEC", "200000")],
        &["-u", &upstream.arg()],
    );
    assert_eq!(
        notify.next("READY=1"),
        "READY=1\nSTATUS=queued=0 active=0\nWATCHDOG=1"
    );
    for _ in 0..10 {
        assert_eq!(notify.next("WATCHDOG=1"), "WATCHDOG=1");
    }
    let elapsed = spawned.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1_000),
        "10 pings {elapsed:?} after the start: more often than every 100 ms"
    );

    // Another process's watchdog: nothing is sent for it.
    let notify = NotifySocket::at_path("watchdog-other.sock");
    let _proxy = start_with_env(
        &[
            ("NOTIFY_SOCKET", &notify.name),
            ("WATCHDOG_USEC", "200000"),
            ("WATCHDOG_PID", "1"),
        ],
        &["-u", &upstream.arg()],
    );
    assert_eq!(notify.next("READY=1"), "READY=1\nSTATUS=queued=0 active=0");
    assert_eq!(notify.recv_within(Duration::from_millis(700)), None);
}

const SERVICE_MANAGER_ENV: [&str; 6] = [
    "NOTIFY_SOCKET",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// The names `export -p` (a shell builtin: the hook forks nothing) listed.
fn exported(dump: &str) -> Vec<String> {
    dump.lines()
        .filter_map(|l| l.strip_prefix("export "))
        .map(|l| l.split('=').next().unwrap_or(l).to_string())
        .collect()
}

fn assert_hook_env_clean(dump_path: &PathBuf) {
    let dump = std::fs::read_to_string(dump_path).unwrap();
    let names = exported(&dump);
    assert!(names.iter().any(|n| n == "TCPLOCK_EVENT"), "{dump}");
    assert!(names.iter().any(|n| n == "TCPLOCK_TEST_MARK"), "{dump}");
    for name in SERVICE_MANAGER_ENV {
        assert!(
            !names.iter().any(|n| n == name),
            "{name} reached the hook:\n{dump}"
        );
    }
}

#[test]
fn hooks_never_see_the_service_manager_variables() {
    let upstream = Upstream::echo();
    let notify = NotifySocket::at_path("env.sock");
    let dump = scratch("env.dump");
    let hook = format!("export -p > {}", dump.display());
    let env = [
        ("NOTIFY_SOCKET", notify.name.as_str()),
        // Another process's socket and watchdog: tcplock ignores them.
        ("LISTEN_PID", "1"),
        ("LISTEN_FDS", "1"),
        ("LISTEN_FDNAMES", "web"),
        ("WATCHDOG_USEC", "60000000"),
        ("WATCHDOG_PID", "1"),
        ("TCPLOCK_TEST_MARK", "kept"),
    ];
    let proxy = start_with_env(&env, &["-u", &upstream.arg(), "--on-activate", &hook]);
    let mut client = proxy.connect();
    roundtrip(&mut client, b"through the hook");
    assert_hook_env_clean(&dump);

    // The same where hooks are started without pidfds (std's spawn).
    let dump = scratch("env-fallback.dump");
    let hook = format!("export -p > {}", dump.display());
    let proxy = Proxy::start_injecting_with_env(
        "clone:error=ENOSYS",
        &env,
        &["-u", &upstream.arg(), "--on-activate", &hook],
    );
    let mut client = proxy.connect();
    roundtrip(&mut client, b"through the hook");
    proxy.expect_log(event("pidfd_unavailable"), "the fallback");
    assert_hook_env_clean(&dump);
}

/// `systemd-socket-activate`, from Debian's `systemd` package (`.ci/run`
/// installs it); without it, outside CI, the test says so and passes.
fn socket_activate() -> Option<&'static str> {
    let path = "/usr/bin/systemd-socket-activate";
    if std::path::Path::new(path).exists() {
        return Some(path);
    }
    if std::env::var_os("CI").is_some() {
        panic!("{path} is missing (.ci/run installs the systemd package)");
    }
    eprintln!("skipped: {path} is missing (apt-get install systemd)");
    None
}

#[test]
fn socket_activation_under_systemd_socket_activate() {
    let Some(activate) = socket_activate() else {
        return;
    };
    let upstream = Upstream::echo();
    let notify = NotifySocket::at_path("activate.sock");
    let dump = scratch("activate.dump");
    let hook = format!(
        "export -p > {0}; if [ -e /proc/$$/fd/3 ]; then echo fd3-inherited >> {0}; fi",
        dump.display()
    );
    let port = unused_port();
    let listen = format!("127.0.0.1:{port}");
    let notify_env = format!("NOTIFY_SOCKET={}", notify.name);
    // No -l: the socket systemd-socket-activate passes is the listener.
    let args = [
        "-l",
        &listen,
        "-E",
        &notify_env,
        "-E",
        "TCPLOCK_TEST_MARK=kept",
        "-E",
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        BIN,
        "-u",
        &upstream.arg(),
        "--on-activate",
        &hook,
    ];
    let mut command = Command::new(activate);
    command.args(args);
    // It runs tcplock on the first connection.
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let first = thread::spawn(move || {
        let mut client = None;
        assert!(
            wait_until(WAIT, || {
                client = std::net::TcpStream::connect(addr).ok();
                client.is_some()
            }),
            "systemd-socket-activate never listened on {addr}"
        );
        let mut client = client.unwrap();
        common::set_timeouts(&client, common::IO_TIMEOUT);
        roundtrip(&mut client, b"the first client");
    });
    let mut proxy = Proxy::start_command(command, &args);
    let listening = proxy.expect_log(event("listening"), "listening");
    assert_eq!(field(&listening, "socket").as_deref(), Some("systemd"));
    assert_eq!(proxy.addr(), addr);
    first.join().expect("the first client was served");
    assert_eq!(notify.next("READY=1"), "READY=1\nSTATUS=queued=0 active=0");
    let mut second = connect(addr);
    roundtrip(&mut second, b"the second client");
    drop(second);
    proxy.expect_log(closed_with(2, "ok"), "the second client served");
    assert_hook_env_clean(&dump);
    let dump = std::fs::read_to_string(&dump).unwrap();
    assert!(
        !dump.contains("fd3-inherited"),
        "a hook inherited the listener"
    );

    proxy.signal("TERM");
    let status = proxy.wait_exit(WAIT).expect("exit after SIGTERM");
    assert!(status.success(), "{status:?}");
}

/// Runs tcplock under `bash` with `setup` run first (to put something on
/// descriptor 3) and `LISTEN_PID` naming tcplock itself.
fn run_with_fd3(setup: &str, listen_fds: &str) -> Output {
    let script = format!("{setup}\nLISTEN_PID=$$ LISTEN_FDS={listen_fds} exec \"$0\" \"$@\"");
    let mut child = Command::new("bash")
        .args(["-c", &script, BIN, "-u", "127.0.0.1:1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    let exited = wait_until(WAIT, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if !exited {
        let _ = child.kill();
    }
    let output = child.wait_with_output().unwrap();
    assert!(exited, "tcplock kept running with {setup:?}: {output:?}");
    output
}

#[test]
fn a_passed_descriptor_that_is_no_listening_tcp_socket_is_refused() {
    // Something to connect to, for a connected (not listening) TCP socket.
    let peer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = peer.local_addr().unwrap().port();
    let cases = [
        ("exec 3</dev/null", "1", "fd 3 is not a socket"),
        ("exec 3<&-", "1", "fd 3 is not open"),
        (
            &format!("exec 3<>/dev/tcp/127.0.0.1/{port}") as &str,
            "1",
            "fd 3 is a TCP socket that is not listening",
        ),
        (
            "exec 3<>/dev/udp/127.0.0.1/9",
            "1",
            "fd 3 is not a TCP socket (use ListenStream= with an address and port)",
        ),
        (
            "exec 3</dev/null 4</dev/null",
            "2",
            "LISTEN_FDS=2, but tcplock takes exactly one listening socket",
        ),
    ];
    for (setup, fds, reason) in cases {
        let out = run_with_fd3(setup, fds);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{setup}: {stderr}");
        assert_eq!(
            stderr,
            format!("tcplock: socket activation: {reason}\n"),
            "{setup}"
        );
    }
    // Variables meant for another process are not ours: -l is needed.
    let out = Command::new(BIN)
        .args(["-u", "127.0.0.1:1"])
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "tcplock: no listen address: give -l PORT\n"
    );
    drop(peer);
}

#[test]
fn a_reload_during_shutdown_is_refused_and_nothing_follows_stopping() {
    let upstream = Upstream::echo();
    let notify = NotifySocket::at_path("stopreload.sock");
    let conf = scratch("stopreload.conf");
    let ctl_sock = scratch("stopreload.ctl");
    std::fs::write(
        &conf,
        format!("upstream = {}\npermits = 1\n", upstream.arg()),
    )
    .unwrap();
    let mut proxy = start_with_env(
        &[("NOTIFY_SOCKET", &notify.name)],
        &[
            "-c",
            conf.to_str().unwrap(),
            "--control",
            ctl_sock.to_str().unwrap(),
        ],
    );
    assert_eq!(notify.next("READY=1"), "READY=1\nSTATUS=queued=0 active=0");
    // A held permit keeps the shutdown going (the grace is 30 s).
    let mut holder = holding(&proxy);
    proxy.signal("TERM");
    assert_eq!(notify.next("STOPPING=1"), "STOPPING=1");
    proxy.signal("HUP");
    let skipped = proxy.expect_log(event("reload_skipped"), "SIGHUP during shutdown");
    assert_eq!(field(&skipped, "reason").as_deref(), Some("stopping"));
    let out = common::run(
        &["ctl", "--control", ctl_sock.to_str().unwrap(), "reload"],
        WAIT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert_eq!(stdout, "error msg=stopping\n");
    roundtrip(&mut holder, b"last\n");
    drop(holder);
    exits_with_nothing_after_stopping(&mut proxy, &notify, "tcplock exits");
}

#[test]
fn no_watchdog_gap_reaches_watchdog_usec() {
    let upstream = Upstream::echo();
    let notify = NotifySocket::at_path("watchdog-gaps.sock");
    // 4 s: a ping every 2 s, each gap allowed 2 s of lateness under load.
    let watchdog = Duration::from_secs(4);
    let _proxy = start_with_env(
        &[
            ("NOTIFY_SOCKET", &notify.name),
            ("WATCHDOG_USEC", &watchdog.as_micros().to_string()),
        ],
        &["-u", &upstream.arg()],
    );
    assert!(notify.next("READY=1").ends_with("\nWATCHDOG=1"));
    let mut last = Instant::now();
    for n in 0..3 {
        let ping = notify.recv_within(watchdog);
        let gap = last.elapsed();
        assert_eq!(
            ping.as_deref(),
            Some("WATCHDOG=1"),
            "ping {n} after {gap:?}"
        );
        assert!(gap < watchdog, "ping {n} came {gap:?} after the one before");
        last = Instant::now();
    }
}
