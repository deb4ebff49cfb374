//! Shared helpers for the end-to-end tests: the `tcplock` binary under test
//! (`Proxy`), upstream stand-ins on 127.0.0.1 (`Upstream`), bounded waits and
//! small client helpers.
//!
//! Rules every test follows: each wait is for a condition with a deadline,
//! every loop is bounded, every socket has read and write timeouts, and each
//! test owns its proxy and its upstream (both on port 0), so tests are
//! independent and can run in parallel.
#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_tcplock");
/// Default deadline for "this should happen soon" waits.
pub const WAIT: Duration = Duration::from_secs(10);
/// Read/write timeout on every client socket the tests own.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// Read/write timeout on the upstream stand-ins' sockets: longer than the
/// clients' waits, so a stand-in giving up can never pass for the proxy
/// having done its job (e.g. forwarding a half-close).
pub const UPSTREAM_IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Size of one KiB / MiB, for readability.
pub const KIB: usize = 1024;
pub const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------
// Bounded waiting
// ---------------------------------------------------------------------------

/// Polls `cond` every few milliseconds until it holds (true) or `timeout`
/// has passed (false). The only way tests wait for something to happen.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(3));
    }
}

// ---------------------------------------------------------------------------
// logfmt
// ---------------------------------------------------------------------------

/// Splits one logfmt line into `(key, value)` pairs; double-quoted values are
/// unquoted (with `\"` and `\\` escapes).
pub fn parse_logfmt(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek().is_none() {
            return out;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ' ' {
                break;
            }
            key.push(c);
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => {
                            if let Some(e) = chars.next() {
                                value.push(e);
                            }
                        }
                        _ => value.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ' ' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
            }
        }
        out.push((key, value));
    }
}

/// The value of `key` in a logfmt line.
pub fn field(line: &str, key: &str) -> Option<String> {
    parse_logfmt(line)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// Asserts the logfmt `line` has `key=want`, showing the line if not.
#[track_caller]
pub fn assert_field(line: &str, key: &str, want: &str) {
    assert_eq!(field(line, key).as_deref(), Some(want), "{line}");
}

/// A numeric field, panicking with the line if it is missing or not a number.
pub fn num_field(line: &str, key: &str) -> u64 {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric `{key}=` in log line: {line}"))
}

pub fn is_event(line: &str, event: &str) -> bool {
    // Cheap reject first: tests count events over thousands of lines.
    line.contains(event) && field(line, "event").as_deref() == Some(event)
}

/// Predicate: the line is `event=EVENT`.
pub fn event(event: &'static str) -> impl Fn(&str) -> bool + Clone {
    move |line: &str| is_event(line, event)
}

/// Predicate: the line is `event=EVENT conn=CONN`.
pub fn conn_event(event: &'static str, conn: u64) -> impl Fn(&str) -> bool + Clone {
    move |line: &str| is_event(line, event) && field(line, "conn") == Some(conn.to_string())
}

/// Predicate: the line is `event=closed conn=CONN outcome=OUTCOME`.
pub fn closed_with(conn: u64, outcome: &'static str) -> impl Fn(&str) -> bool + Clone {
    move |line: &str| {
        is_event(line, "closed")
            && field(line, "conn") == Some(conn.to_string())
            && field(line, "outcome").as_deref() == Some(outcome)
    }
}

/// Predicate: any `event=closed` line with this outcome.
pub fn outcome(outcome: &'static str) -> impl Fn(&str) -> bool + Clone {
    move |line: &str| is_event(line, "closed") && field(line, "outcome").as_deref() == Some(outcome)
}

// ---------------------------------------------------------------------------
// The proxy under test
// ---------------------------------------------------------------------------

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    eof: bool,
}

/// stderr of the proxy, line by line, shared with the reader thread.
#[derive(Default)]
pub struct LogBuf {
    state: Mutex<LogState>,
    cv: Condvar,
}

impl LogBuf {
    fn push(&self, line: String) {
        self.state.lock().unwrap().lines.push(line);
        self.cv.notify_all();
    }

    fn set_eof(&self) {
        self.state.lock().unwrap().eof = true;
        self.cv.notify_all();
    }

    /// First line (from the start of the log) matching `pred`, waiting up to
    /// `timeout` for it; returns early with `None` once stderr is closed.
    fn wait_for(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut checked = 0;
        let mut st = self.state.lock().unwrap();
        loop {
            if let Some(l) = st.lines[checked..].iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            checked = st.lines.len();
            if st.eof {
                return None;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            st = self.cv.wait_timeout(st, deadline - now).unwrap().0;
        }
    }

    fn snapshot(&self) -> Vec<String> {
        self.state.lock().unwrap().lines.clone()
    }
}

/// A running `tcplock`. Killed on drop; its stderr is printed if the test
/// is panicking, so a failure always shows what the proxy said.
pub struct Proxy {
    child: Child,
    logs: Arc<LogBuf>,
    reader: Option<JoinHandle<()>>,
    addr: SocketAddr,
    status: Option<ExitStatus>,
    args: Vec<String>,
    /// tcplock's own pid when it runs as a child of `strace` or `unshare`.
    traced: Option<u32>,
}

/// `-l 127.0.0.1:0` followed by `args`: the kernel picks the port.
fn on_any_loopback_port<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut full = vec!["-l", "127.0.0.1:0"];
    full.extend_from_slice(args);
    full
}

impl Proxy {
    /// Starts `tcplock -l 127.0.0.1:0 ARGS...` and waits for `event=listening`.
    pub fn start(args: &[&str]) -> Proxy {
        let full = on_any_loopback_port(args);
        Proxy::start_raw(&full)
    }

    /// Starts `tcplock ARGS...` exactly as given and waits for `event=listening`.
    pub fn start_raw(args: &[&str]) -> Proxy {
        let mut command = Command::new(BIN);
        command.args(args);
        Proxy::start_command(command, args)
    }

    /// Starts `tcplock -l 127.0.0.1:0 ARGS...` with `env` added to (or, with
    /// an empty value, removed from) its environment.
    pub fn start_with_env(env: &[(&str, &str)], args: &[&str]) -> Proxy {
        let full = on_any_loopback_port(args);
        let mut command = Command::new(BIN);
        command.args(&full);
        for (key, value) in env {
            if value.is_empty() {
                command.env_remove(key);
            } else {
                command.env(key, value);
            }
        }
        Proxy::start_command(command, &full)
    }

    /// Starts `tcplock -l 127.0.0.1:0 ARGS...` with at most `limit` open files
    /// (soft and hard, so tcplock cannot raise it).
    pub fn start_with_fd_limit(limit: u32, args: &[&str]) -> Proxy {
        let full = on_any_loopback_port(args);
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--nofile={limit}:{limit}"))
            .arg(BIN)
            .args(&full);
        Proxy::start_command(command, &full)
    }

    /// Starts `tcplock -l 127.0.0.1:0 ARGS...` under `strace` with a fault
    /// injection such as `splice:error=EPERM`: every such call fails, as
    /// under a seccomp filter. `pid()` and signals reach tcplock itself.
    pub fn start_injecting(fault: &str, args: &[&str]) -> Proxy {
        Proxy::start_injecting_with_env(fault, &[], args)
    }

    /// [`Proxy::start_injecting`] with `env` added to tcplock's environment.
    pub fn start_injecting_with_env(fault: &str, env: &[(&str, &str)], args: &[&str]) -> Proxy {
        let full = on_any_loopback_port(args);
        let syscall = fault.split(':').next().unwrap_or(fault);
        let mut command = Command::new("strace");
        command
            .envs(env.iter().copied())
            .args(["-f", "-o", "/dev/null", "-e"])
            .arg(format!("trace={syscall}"))
            .arg("-e")
            .arg(format!("inject={fault}"))
            .arg(BIN)
            .args(&full);
        let mut proxy = Proxy::start_command(command, &full);
        let tracer = proxy.child.id();
        let children = format!("/proc/{tracer}/task/{tracer}/children");
        let tracee =
            std::fs::read_to_string(&children).unwrap_or_else(|e| panic!("{children}: {e}"));
        let tracee = tracee
            .split_whitespace()
            .next()
            .and_then(|pid| pid.parse().ok())
            .unwrap_or_else(|| panic!("strace {tracer} has no child in {children}"));
        proxy.traced = Some(tracee);
        proxy
    }

    /// Starts `tcplock -l 127.0.0.1:0 ARGS...` as PID 1 of a new pid
    /// namespace (`unshare --pid --fork --mount-proc`, as root), the way a
    /// container runs its entrypoint. `pid()` is tcplock's pid as seen from here.
    pub fn start_as_pid_one(args: &[&str]) -> Proxy {
        let full = on_any_loopback_port(args);
        let mut command = Command::new("unshare");
        command
            .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
            .arg(BIN)
            .args(&full);
        let mut proxy = Proxy::start_command(command, &full);
        let outer = proxy.child.id();
        let children = format!("/proc/{outer}/task/{outer}/children");
        let inner =
            std::fs::read_to_string(&children).unwrap_or_else(|e| panic!("{children}: {e}"));
        proxy.traced = Some(
            inner
                .split_whitespace()
                .next()
                .and_then(|pid| pid.parse().ok())
                .unwrap_or_else(|| panic!("unshare {outer} has no child in {children}")),
        );
        proxy
    }

    /// Starts `tcplock -l 127.0.0.1:0 ARGS...` in a mount namespace of its
    /// own where `hosts` is /etc/hosts, so a test can give a name the
    /// addresses it needs (two for one name, say). Needs root and `unshare`.
    pub fn start_with_hosts(hosts: &std::path::Path, args: &[&str]) -> Proxy {
        Proxy::start_with_etc(&[(hosts, "/etc/hosts")], args)
    }

    /// Starts `tcplock -l 127.0.0.1:0 ARGS...` in a mount namespace of its
    /// own where each `(file, target)` is bind-mounted over `target` (such
    /// as /etc/hosts or /etc/resolv.conf). Rewrite a file in place (not by
    /// rename) and tcplock sees the change. Needs root and `unshare`.
    pub fn start_with_etc(files: &[(&std::path::Path, &str)], args: &[&str]) -> Proxy {
        let full = on_any_loopback_port(args);
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "sh", "-c"])
            .arg(
                r#"while [ "$1" != -- ]; do mount --bind "$1" "$2" || exit 1; shift 2; done
                   shift; exec "$@""#,
            )
            .arg("sh");
        for (file, target) in files {
            command.arg(file).arg(target);
        }
        command.arg("--").arg(BIN).args(&full);
        Proxy::start_command(command, &full)
    }

    /// Starts `command` (tcplock, or a wrapper that execs it) and waits for
    /// `event=listening`; `args` names the run in failure output.
    pub fn start_command(mut command: Command, args: &[&str]) -> Proxy {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tcplock");
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::new(LogBuf::default());
        let sink = Arc::clone(&logs);
        let reader = thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        sink.push(line.trim_end_matches(['\n', '\r']).to_string());
                    }
                }
            }
            sink.set_eof();
        });
        let mut proxy = Proxy {
            child,
            logs,
            reader: Some(reader),
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            status: None,
            args: args.iter().map(|s| s.to_string()).collect(),
            traced: None,
        };
        let line = proxy
            .wait_for_log(event("listening"), WAIT)
            .unwrap_or_else(|| {
                panic!("tcplock {args:?} logged no event=listening within {WAIT:?}")
            });
        let addr = field(&line, "addr").unwrap_or_else(|| panic!("no addr= in: {line}"));
        proxy.addr = addr
            .parse()
            .unwrap_or_else(|e| panic!("listening addr {addr:?} unparsable ({e}): {line}"));
        assert_ne!(proxy.addr.port(), 0, "listening on port 0? {line}");
        proxy
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn pid(&self) -> u32 {
        self.traced.unwrap_or_else(|| self.child.id())
    }

    /// A client connection to the proxy, with timeouts set.
    pub fn connect(&self) -> TcpStream {
        connect(self.addr)
    }

    /// The first log line matching `pred`, waiting up to `timeout`.
    pub fn wait_for_log(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        self.logs.wait_for(pred, timeout)
    }

    /// Like `wait_for_log` with the default deadline, panicking with `what`.
    pub fn expect_log(&self, pred: impl Fn(&str) -> bool, what: &str) -> String {
        self.wait_for_log(pred, WAIT)
            .unwrap_or_else(|| panic!("no log line for {what} within {WAIT:?}"))
    }

    /// Number of log lines so far matching `pred`.
    pub fn count_logs(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.logs
            .state
            .lock()
            .unwrap()
            .lines
            .iter()
            .filter(|l| pred(l))
            .count()
    }

    /// Waits until at least `n` lines match `pred`.
    pub fn wait_for_count(&self, pred: impl Fn(&str) -> bool, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.count_logs(&pred) >= n)
    }

    /// All lines logged so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.snapshot()
    }

    /// Lines matching `pred`, in order.
    pub fn matching(&self, pred: impl Fn(&str) -> bool) -> Vec<String> {
        self.logs
            .snapshot()
            .into_iter()
            .filter(|l| pred(l))
            .collect()
    }

    /// Resident set size of the proxy, from /proc/PID/status VmRSS, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Pipes the proxy has open. A spliced direction gives its emptied pipe
    /// back to a pool that keeps it open, so a count above the one at start
    /// proves that some direction spliced.
    pub fn open_pipes(&self) -> usize {
        let dir = format!("/proc/{}/fd", self.pid());
        std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("pipe:"))
            .count()
    }

    /// Sends a signal by name (e.g. "TERM") with kill(1).
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{sig} {} failed", self.pid());
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let child = &mut self.child;
        let mut status = None;
        wait_until(timeout, || {
            status = child.try_wait().expect("try_wait");
            status.is_some()
        });
        if status.is_some() {
            self.status = status;
            self.join_reader();
        }
        status
    }

    /// SIGTERM, then wait up to `timeout` for the exit status. `None` if the
    /// process did not exit in time (it is then killed).
    pub fn stop(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.signal("TERM");
        }
        let st = self.wait_exit(timeout);
        if st.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.join_reader();
        }
        st
    }

    fn join_reader(&mut self) {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // A killed strace would leave its tracee running, holding the log pipe.
        if let Some(pid) = self.traced
            && self.status.is_none()
        {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.join_reader();
        if thread::panicking() {
            let lines = self.logs.snapshot();
            eprintln!(
                "--- tcplock {:?}: stderr ({} lines) ---",
                self.args,
                lines.len()
            );
            let skip = lines.len().saturating_sub(400);
            if skip > 0 {
                eprintln!("[... {skip} earlier lines ...]");
            }
            for l in &lines[skip..] {
                eprintln!("{l}");
            }
            eprintln!("--- end of tcplock stderr ---");
        }
    }
}

/// Runs `tcplock ARGS...` to completion (it must exit within `timeout`,
/// otherwise it is killed and the test panics) and captures its output.
pub fn run(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tcplock");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
        panic!("tcplock {args:?} did not exit within {timeout:?}; stderr:\n{stderr}");
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

// ---------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------

/// Connects with a deadline and sets read/write timeouts and TCP_NODELAY.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, WAIT)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    set_timeouts(&s, IO_TIMEOUT);
    s.set_nodelay(true).expect("nodelay");
    s
}

pub fn set_timeouts(s: &TcpStream, t: Duration) {
    s.set_read_timeout(Some(t)).expect("read timeout");
    s.set_write_timeout(Some(t)).expect("write timeout");
}

/// Reads exactly `n` bytes.
pub fn read_n(s: &mut TcpStream, n: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; n];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// Reads until EOF (bounded by the socket's read timeout per read).
pub fn read_to_eof(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    s.read_to_end(&mut v)?;
    Ok(v)
}

/// Writes `msg` and expects it echoed back exactly.
pub fn roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).expect("write to proxy");
    let got = read_n(s, msg.len()).expect("read echo from proxy");
    assert!(
        got == msg,
        "echo mismatch: sent {} bytes, got different bytes back",
        msg.len()
    );
}

/// Half-closes the client side and expects the echo stand-in to end the
/// connection cleanly with nothing more to say, within `WAIT` (shorter than
/// the stand-in's own timeout, so only a forwarded half-close can pass).
pub fn finish(mut s: TcpStream) {
    s.shutdown(Shutdown::Write).expect("shutdown(Write)");
    s.set_read_timeout(Some(WAIT)).expect("read timeout");
    let rest = read_to_eof(&mut s).expect("read to EOF after shutdown(Write)");
    assert!(
        rest.is_empty(),
        "unexpected {} bytes after half-close",
        rest.len()
    );
}

/// How a connection was ended by the far side.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    Eof,
    Reset,
}

/// Expects the proxy to close this connection within `timeout`: a read
/// returns EOF or a reset. Any data read before that is returned too.
pub fn expect_closed(s: &mut TcpStream, timeout: Duration) -> Result<(Ended, Vec<u8>), String> {
    let deadline = Instant::now() + timeout;
    let mut data = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "still open after {timeout:?} ({} bytes read)",
                data.len()
            ));
        }
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("read timeout");
        match s.read(&mut buf) {
            Ok(0) => return Ok((Ended::Eof, data)),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe
                ) =>
            {
                return Ok((Ended::Reset, data));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "still open after {timeout:?} ({} bytes read)",
                    data.len()
                ));
            }
            Err(e) => return Err(format!("unexpected read error: {e}")),
        }
    }
}

/// Closes `stream` with a reset (SO_LINGER 0) instead of an end of stream.
pub fn reset(stream: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the socket is open for the call, and `linger` is live and of the
    // size passed.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", io::Error::last_os_error());
    drop(stream);
}

/// A client that takes a permit and proves it is through with one round trip;
/// keep it to hold the permit.
pub fn holding(proxy: &Proxy) -> TcpStream {
    let mut holder = proxy.connect();
    roundtrip(&mut holder, b"holding\n");
    holder
}

/// `conn=` of every `hook_started` line, in order.
pub fn hook_conns(proxy: &Proxy) -> Vec<u64> {
    proxy
        .matching(event("hook_started"))
        .iter()
        .map(|l| num_field(l, "conn"))
        .collect()
}

/// A port on 127.0.0.1 with nothing listening on it (bound then released),
/// below the kernel's ephemeral range: a port the kernel hands out for a
/// `:0` bind (every tcplock under test listens on one) could otherwise be
/// given to tcplock as its own listener right after it was released here.
pub fn unused_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = 10_000u16;
    let span = usize::from(ephemeral_low.saturating_sub(low).max(1));
    // Parallel test binaries start from different places.
    let start = (std::process::id() as usize).wrapping_mul(7919);
    for _ in 0..2000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = low + u16::try_from(start.wrapping_add(n * 37) % span).unwrap_or(0);
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr().expect("local_addr").port();
        }
    }
    panic!("no free port below {ephemeral_low} in 2000 tries");
}

// ---------------------------------------------------------------------------
// Deterministic pseudo-random byte stream
// ---------------------------------------------------------------------------

/// xorshift64* byte stream; the same seed gives the same bytes whatever the
/// chunking, so a writer and a checker can each generate it independently.
pub struct Prng {
    state: u64,
    block: Vec<u8>,
    pos: usize,
}

impl Prng {
    const BLOCK: usize = 64 * 1024;

    pub fn new(seed: u64) -> Prng {
        Prng {
            state: seed | 1,
            block: vec![0; Self::BLOCK],
            pos: Self::BLOCK,
        }
    }

    fn refill(&mut self) {
        for chunk in self.block.chunks_exact_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let v = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D);
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        self.pos = 0;
    }

    /// The next `n` bytes of the stream (n ≤ 64 KiB, borrowed).
    pub fn next_bytes(&mut self, n: usize) -> &[u8] {
        if self.pos == Self::BLOCK {
            self.refill();
        }
        let n = n.min(Self::BLOCK - self.pos);
        let out = &self.block[self.pos..self.pos + n];
        self.pos += n;
        out
    }

    /// Compares `data` with the next `data.len()` bytes of the stream;
    /// returns the index of the first difference.
    pub fn check(&mut self, data: &[u8]) -> Option<usize> {
        let mut off = 0;
        while off < data.len() {
            let want = self.next_bytes(data.len() - off);
            let n = want.len();
            if want != &data[off..off + n] {
                let i = want
                    .iter()
                    .zip(&data[off..])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Some(off + i);
            }
            off += n;
        }
        None
    }
}

// ---------------------------------------------------------------------------
// Upstream stand-ins
// ---------------------------------------------------------------------------

/// What an upstream stand-in observed.
#[derive(Default)]
pub struct Stats {
    /// Connections accepted so far.
    pub accepted: AtomicUsize,
    /// Connections currently being served (see `Active`).
    pub current: AtomicUsize,
    /// Highest value `current` ever reached.
    pub max: AtomicUsize,
    /// Bytes read from the proxy / written to it, over all connections.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Connections whose handler has finished.
    pub ended: AtomicUsize,
    /// Connections whose handler ended on an I/O error (reset, broken pipe).
    pub errors: AtomicUsize,
    /// First line of each connection, in the order they arrived (recording
    /// stand-in), or whole requests (reply-after-EOF stand-in).
    pub records: Mutex<Vec<Vec<u8>>>,
}

/// Marks a connection as "being served" for the concurrency count; the
/// count drops when this is dropped. Handlers drop it *before* they half-close
/// towards the proxy, so a proxy that closes a connection and only then
/// connects the next one can never be seen as overlapping.
pub struct Active(Arc<Stats>);

impl Active {
    pub fn stats(&self) -> &Stats {
        &self.0
    }

    pub fn stats_arc(&self) -> Arc<Stats> {
        Arc::clone(&self.0)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.current.fetch_sub(1, Ordering::SeqCst);
        self.0.ended.fetch_add(1, Ordering::SeqCst);
    }
}

type Handler = Arc<dyn Fn(TcpStream, Active) + Send + Sync>;

/// An upstream stand-in: a listener on 127.0.0.1 with an accept thread and
/// one thread per connection running `handler`. Stopped on drop (the
/// listener is closed; connection threads end on their own, all bounded by
/// socket timeouts).
pub struct Upstream {
    addr: SocketAddr,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    /// A stand-in on an ephemeral port running `handler` per connection.
    pub fn spawn(handler: impl Fn(TcpStream, Active) + Send + Sync + 'static) -> Upstream {
        Upstream::spawn_on("127.0.0.1:0", handler).expect("bind upstream stand-in")
    }

    /// A stand-in on a given address.
    pub fn spawn_on(
        addr: &str,
        handler: impl Fn(TcpStream, Active) + Send + Sync + 'static,
    ) -> io::Result<Upstream> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Handler = Arc::new(handler);
        let (st, sp) = (Arc::clone(&stats), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                set_timeouts(&conn, UPSTREAM_IO_TIMEOUT);
                let _ = conn.set_nodelay(true);
                st.accepted.fetch_add(1, Ordering::SeqCst);
                let now = st.current.fetch_add(1, Ordering::SeqCst) + 1;
                st.max.fetch_max(now, Ordering::SeqCst);
                let active = Active(Arc::clone(&st));
                let h = Arc::clone(&handler);
                thread::spawn(move || h(conn, active));
            }
        });
        Ok(Upstream {
            addr,
            stats,
            stop,
            thread: Some(thread),
        })
    }

    /// Echoes everything; on EOF half-closes back.
    pub fn echo() -> Upstream {
        Upstream::spawn(echo_handler)
    }

    /// Echo stand-in on a given address.
    pub fn echo_on(addr: &str) -> io::Result<Upstream> {
        Upstream::spawn_on(addr, echo_handler)
    }

    /// Records the first line (up to `\n`) of each connection in arrival
    /// order, then behaves as the echo stand-in (the line is echoed too).
    pub fn recording() -> Upstream {
        Upstream::spawn(|mut s, active| {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.contains(&b'\n') {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(_) => {
                        active.stats().errors.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
            }
            let line_end = got.iter().position(|&b| b == b'\n').unwrap_or(got.len());
            active
                .stats()
                .records
                .lock()
                .unwrap()
                .push(got[..line_end].to_vec());
            active
                .stats()
                .bytes_in
                .fetch_add(got.len() as u64, Ordering::SeqCst);
            if s.write_all(&got).is_err() {
                active.stats().errors.fetch_add(1, Ordering::SeqCst);
                return;
            }
            echo_handler(s, active);
        })
    }

    /// Reads the whole request (to EOF), records it, then answers
    /// `reply(request)` and closes.
    pub fn reply_after_eof(reply: impl Fn(&[u8]) -> Vec<u8> + Send + Sync + 'static) -> Upstream {
        Upstream::spawn(move |mut s, active| {
            let mut req = Vec::new();
            if s.read_to_end(&mut req).is_err() {
                active.stats().errors.fetch_add(1, Ordering::SeqCst);
                return;
            }
            active
                .stats()
                .bytes_in
                .fetch_add(req.len() as u64, Ordering::SeqCst);
            let answer = reply(&req);
            active.stats().records.lock().unwrap().push(req);
            if s.write_all(&answer).is_err() {
                active.stats().errors.fetch_add(1, Ordering::SeqCst);
                return;
            }
            active
                .stats()
                .bytes_out
                .fetch_add(answer.len() as u64, Ordering::SeqCst);
            drop(active);
            let _ = s.shutdown(Shutdown::Write);
        })
    }

    /// A sink that reads nothing until `gate` opens, then reads slowly
    /// (`chunk` bytes per `pause`) to EOF, counting into `bytes_in`.
    pub fn slow_sink(gate: Arc<AtomicBool>, chunk: usize, pause: Duration) -> Upstream {
        Upstream::spawn(move |mut s, active| {
            if !wait_until(Duration::from_secs(60), || gate.load(Ordering::SeqCst)) {
                return;
            }
            let mut buf = vec![0u8; chunk];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        active
                            .stats()
                            .bytes_in
                            .fetch_add(n as u64, Ordering::SeqCst);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        active.stats().errors.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
                // Deliberate slowness of the stand-in, not a wait for a condition.
                thread::sleep(pause);
            }
            drop(active);
            let _ = s.shutdown(Shutdown::Write);
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `-u` argument for this stand-in.
    pub fn arg(&self) -> String {
        self.addr.to_string()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn accepted(&self) -> usize {
        self.stats.accepted.load(Ordering::SeqCst)
    }

    pub fn current(&self) -> usize {
        self.stats.current.load(Ordering::SeqCst)
    }

    pub fn max_concurrent(&self) -> usize {
        self.stats.max.load(Ordering::SeqCst)
    }

    pub fn ended(&self) -> usize {
        self.stats.ended.load(Ordering::SeqCst)
    }

    pub fn errors(&self) -> usize {
        self.stats.errors.load(Ordering::SeqCst)
    }

    pub fn bytes_in(&self) -> u64 {
        self.stats.bytes_in.load(Ordering::SeqCst)
    }

    /// Recorded first lines / requests, as strings.
    pub fn records(&self) -> Vec<String> {
        self.stats
            .records
            .lock()
            .unwrap()
            .iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept; the accept thread then drops the listener.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Echo loop used by the echo and recording stand-ins: echoes to EOF, then
/// marks itself inactive and half-closes back.
pub fn echo_handler(mut s: TcpStream, active: Active) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                active
                    .stats()
                    .bytes_in
                    .fetch_add(n as u64, Ordering::SeqCst);
                if s.write_all(&buf[..n]).is_err() {
                    active.stats().errors.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                active
                    .stats()
                    .bytes_out
                    .fetch_add(n as u64, Ordering::SeqCst);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                active.stats().errors.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    }
    drop(active);
    let _ = s.shutdown(Shutdown::Write);
}

/// A library lock in front of `upstream` on an ephemeral loopback port, logging
/// errors only; tests add what they exercise.
pub fn quiet_lock(upstream: &Upstream) -> tcplock::Builder {
    tcplock::Lock::builder()
        .listen("127.0.0.1:0")
        .upstream(upstream.arg())
        .log_level(tcplock::LogLevel::Error)
}

/// A listener on `[::1]:0` whose accept queue is full: the kernel drops
/// every further SYN, so a connect to it neither succeeds nor fails. Keep
/// the returned streams alive: they are what fills the queue.
pub fn black_hole() -> (std::net::TcpListener, Vec<std::net::TcpStream>) {
    let listener =
        std::net::TcpListener::bind("[::1]:0").expect("bind [::1]:0 (is IPv6 loopback up?)");
    // SAFETY: a valid listening socket owned by `listener`; listen() again
    // only changes its backlog.
    let rc = unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 0) };
    assert_eq!(rc, 0, "listen(0): {}", std::io::Error::last_os_error());
    let addr = listener.local_addr().expect("local_addr");
    let mut filling = Vec::new();
    for _ in 0..16 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(stream) => filling.push(stream),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return (listener, filling),
            Err(e) => panic!("filling the black hole's backlog: {e}"),
        }
    }
    panic!("16 connections to a listen(0) socket all completed: SYNs are not dropped");
}

/// Sends `-SIG` to `pid` with kill(1).
pub fn kill(sig: &str, pid: u32) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid} failed");
}

/// `tcplock --check ARGS`: its stdout, expecting exit 0 within 10 s and
/// nothing on stderr.
pub fn check_ok(args: &[&str]) -> String {
    let mut full = vec!["--check"];
    full.extend_from_slice(args);
    let out = run(&full, Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{full:?}: {:?} {stderr}", out.status);
    assert_eq!(stderr, "", "{full:?}");
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The Python interpreter with `prometheus_client` (Debian's package
/// installs it for /usr/bin/python3, which need not be the first python3
/// on the PATH), or `None` with the reason printed (a failure under CI,
/// whose `.ci/run` installs it).
pub fn prometheus_parser() -> Option<&'static str> {
    let found = ["/usr/bin/python3", "python3"].into_iter().find(|python| {
        Command::new(python)
            .args(["-c", "import prometheus_client.parser"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3-prometheus-client is missing, and .ci/run installs it"
        );
        eprintln!("skipped: python3 with prometheus_client (python3-prometheus-client) not found");
    }
    found
}

/// Runs the parser `script` under `python -c` with the metrics exposition
/// `text` on its stdin; its stdout, once it exited 0.
pub fn run_parser(python: &str, script: &str, text: &str) -> String {
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the parser");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed the parser");
    let out = child.wait_with_output().expect("parser output");
    assert!(
        out.status.success(),
        "the parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}
