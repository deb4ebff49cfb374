//! The library inside a host program that does its own thing with signals:
//! SIGCHLD ignored (auto-reap) or blocked, SIGPIPE at its default, and a lock
//! that was told to leave signals alone. Each case runs as a child process of
//! this binary (`harness = false`), so its signal state is that of a real host
//! from its first instruction and leaks into nothing else.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{IO_TIMEOUT, Upstream, quiet_lock, reset, roundtrip, set_timeouts, wait_until};
use tcplock::{Hook, Lock, Splice};

const SCENARIO_VAR: &str = "TCPLOCK_HOST_SCENARIO";
/// A case that hangs is killed after this.
const CASE_DEADLINE: Duration = Duration::from_secs(90);

type Scenario = fn();

const CASES: &[(&str, Scenario)] = &[
    (
        "a_command_hook_completes_when_the_host_ignores_sigchld",
        sigchld_ignored,
    ),
    (
        "a_command_hook_completes_when_the_host_blocks_sigchld",
        sigchld_blocked,
    ),
    (
        "a_reset_during_splice_does_not_kill_a_host_with_default_sigpipe",
        sigpipe_default,
    ),
    (
        "a_lock_that_leaves_signals_alone_installs_no_handler",
        no_handlers,
    ),
];

fn main() {
    if let Ok(name) = std::env::var(SCENARIO_VAR) {
        let (_, scenario) = CASES
            .iter()
            .find(|(case, _)| *case == name)
            .unwrap_or_else(|| panic!("unknown scenario {name}"));
        scenario();
        return;
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    let mut failed = Vec::new();
    let mut passed = 0;
    for (name, _) in CASES {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        match run_case(name) {
            Ok(()) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Err(why) => {
                println!("test {name} ... FAILED: {why}");
                failed.push(*name);
            }
        }
    }
    // The summary line libtest prints, so a reader of the whole run counts
    // these cases too.
    let verdict = if failed.is_empty() { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {verdict}. {passed} passed; {} failed; 0 ignored; 0 measured; 0 filtered out\n",
        failed.len()
    );
    assert!(failed.is_empty(), "failed: {failed:?}");
}

/// Runs one scenario in a fresh process of this binary and judges its exit.
fn run_case(name: &str) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .env(SCENARIO_VAR, name)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + CASE_DEADLINE;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            if status.signal() == Some(libc::SIGPIPE) {
                return Err("the host died of SIGPIPE".into());
            }
            return if status.success() {
                Ok(())
            } else {
                Err(format!("the host exited with {status}"))
            };
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no exit within {CASE_DEADLINE:?}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Serves three clients through a lock whose on-activate hook is a command
/// that itself waits for a child, then stops the lock.
fn serve_through_a_command_hook(after_build: impl FnOnce()) {
    let upstream = Upstream::echo();
    let lock = quiet_lock(&upstream)
        .on_activate_hook(Hook::command("sleep 0.05; exit 0"))
        .hook_timeout(Duration::from_secs(60))
        .build()
        .expect("build");
    after_build();
    let (addr, handle) = (lock.local_addr(), lock.handle());
    let runner = thread::spawn(move || lock.run().expect("run"));
    for round in 0..3u8 {
        let mut client = TcpStream::connect(addr).expect("connect");
        set_timeouts(&client, IO_TIMEOUT);
        roundtrip(&mut client, &[b'a' + round; 10]);
    }
    handle.stop();
    assert!(
        wait_until(IO_TIMEOUT, || runner.is_finished()),
        "the lock did not stop"
    );
    runner.join().expect("the loop thread did not panic");
}

fn sigchld_ignored() {
    // Set after the lock is built, as a host may do at any time: whatever the
    // lock installed at build time is replaced by auto-reap.
    serve_through_a_command_hook(|| {
        // SAFETY: setting a disposition to SIG_IGN touches no memory.
        let previous = unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
        assert_ne!(previous, libc::SIG_ERR);
    });
}

fn sigchld_blocked() {
    // Blocked before any thread starts, so no thread of the host takes it.
    // SAFETY: the sets are live for the calls.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        assert_eq!(
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
            0
        );
    }
    serve_through_a_command_hook(|| {});
}

/// The upstream floods each client; each client reads a little, then resets,
/// while tcplock splices into it.
fn sigpipe_default() {
    // SAFETY: setting a disposition to SIG_DFL touches no memory.
    assert_ne!(
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) },
        libc::SIG_ERR
    );
    let upstream = Upstream::spawn(|mut s, _active| {
        let chunk = vec![b'x'; 64 * 1024];
        while s.write_all(&chunk).is_ok() {}
    });
    let lock = quiet_lock(&upstream)
        .splice(Splice::On)
        .permits(4)
        .build()
        .expect("build");
    let (addr, handle) = (lock.local_addr(), lock.handle());
    let runner = thread::spawn(move || lock.run().expect("run"));
    let mut buf = vec![0u8; 256 * 1024];
    for _ in 0..20 {
        let mut client = TcpStream::connect(addr).expect("connect");
        set_timeouts(&client, IO_TIMEOUT);
        client.read_exact(&mut buf).expect("read the flood");
        reset(client);
    }
    // Still alive and serving: the loop survived every reset.
    let mut client = TcpStream::connect(addr).expect("connect");
    set_timeouts(&client, IO_TIMEOUT);
    client
        .read_exact(&mut buf)
        .expect("read the flood after the resets");
    reset(client);
    handle.stop();
    assert!(
        wait_until(IO_TIMEOUT, || runner.is_finished()),
        "the lock did not stop"
    );
    runner.join().expect("the loop thread did not panic");
}

const WATCHED: [libc::c_int; 6] = [
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGUSR1,
    libc::SIGPIPE,
];

fn dispositions() -> Vec<usize> {
    WATCHED
        .iter()
        .map(|&signal| {
            // SAFETY: a null new action only queries; `old` is live and writable.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                assert_eq!(libc::sigaction(signal, std::ptr::null(), &mut old), 0);
                old.sa_sigaction
            }
        })
        .collect()
}

/// Building and running a lock with a command hook leaves every disposition
/// as the host had it.
fn no_handlers() {
    let before = dispositions();
    let upstream = Upstream::echo();
    let lock: Lock = quiet_lock(&upstream)
        .on_activate_hook(Hook::command("exit 0"))
        .handle_signals(false)
        .build()
        .expect("build");
    assert_eq!(
        dispositions(),
        before,
        "building installed a signal handler"
    );
    let (addr, handle) = (lock.local_addr(), lock.handle());
    let runner = thread::spawn(move || lock.run().expect("run"));
    let mut client = TcpStream::connect(addr).expect("connect");
    set_timeouts(&client, IO_TIMEOUT);
    roundtrip(&mut client, b"through the hook");
    assert_eq!(
        dispositions(),
        before,
        "running a hook installed a signal handler"
    );
    drop(client);
    handle.stop();
    assert!(
        wait_until(IO_TIMEOUT, || runner.is_finished()),
        "the lock did not stop"
    );
    runner.join().expect("the loop thread did not panic");
}
