//! The LibreOffice example (`examples/libreoffice/`), run for real: tcplock
//! with the example config and the real `restart-office.sh` as both hooks,
//! with `OFFICE_CMD` pointing at a stand-in "office" (a small python3 echo
//! server that takes a moment to open its port, as soffice does). Pins: the
//! first client starts the office, every 20th activation restarts it, a
//! timeout restarts it once, and the script waits for the port each time.

mod common;
mod hookkit;

use std::io::Read;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;

use common::*;
use hookkit::*;

/// The stand-in office: greets each connection with its pid, then echoes.
/// It sleeps before binding so a hook that does not wait for the port fails.
const OFFICE_PY: &str = r#"
import os, socket, sys, time
port, starts = int(sys.argv[1]), sys.argv[2]
time.sleep(0.3)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(16)
with open(starts, "a") as f:
    f.write("%d\n" % os.getpid())
while True:
    c, _ = s.accept()
    try:
        c.sendall(b"office %d\n" % os.getpid())
        while True:
            d = c.recv(4096)
            if not d:
                break
            c.sendall(d)
    except OSError:
        pass
    c.close()
"#;

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/libreoffice")
        .join(name)
}

/// Kills every stand-in office this test started (by the pids they
/// recorded, and the process group in the script's pid file), even when the
/// test fails.
struct Offices<'a> {
    dir: &'a TempDir,
}

impl Drop for Offices<'_> {
    fn drop(&mut self) {
        let mut targets: Vec<String> = self.dir.lines("starts");
        if let Some(pid) = self.dir.lines("state/office.pid").first() {
            targets.push(format!("-{pid}"));
        }
        for target in targets {
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &target])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// One client through the proxy: reads the office's greeting, checks the
/// echo, closes; returns the pid of the office that served it.
fn session(proxy: &Proxy) -> u32 {
    let mut c = proxy.connect();
    let pid = greeting(&mut c);
    roundtrip(&mut c, b"convert this\n");
    finish(c);
    pid
}

fn greeting(c: &mut TcpStream) -> u32 {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        let n = c.read(&mut byte).expect("read the office greeting");
        assert_eq!(n, 1, "EOF before the office greeting: {line:?}");
        line.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&line);
    text.trim()
        .strip_prefix("office ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not an office greeting: {text:?}"))
}

fn starts(dir: &TempDir) -> Vec<u32> {
    dir.lines("starts")
        .iter()
        .map(|l| l.parse().expect("pid in starts"))
        .collect()
}

#[test]
fn restart_office_starts_restarts_every_20_and_after_a_timeout() {
    let dir = TempDir::new("libreoffice");
    let office_py = dir.join("office.py");
    std::fs::write(&office_py, OFFICE_PY).expect("write office.py");
    let _offices = Offices { dir: &dir };
    let port = unused_port();

    let office_cmd = format!(
        "python3 {} {port} {}",
        sh_quote(&office_py.to_string_lossy()),
        sh_quote(&dir.join("starts").to_string_lossy())
    );
    let hook = format!(
        "OFFICE_CMD={} OFFICE_PORT={port} OFFICE_STATE_DIR={} OFFICE_START_WAIT=10 \
         OFFICE_STOP_WAIT=5 {}",
        sh_quote(&office_cmd),
        sh_quote(&dir.join("state").to_string_lossy()),
        sh_quote(&example("restart-office.sh").to_string_lossy())
    );
    let conf = example("tcplock.conf");
    let upstream = format!("127.0.0.1:{port}");
    // The example config as shipped; the command line moves the ports, points
    // the hooks at the stand-in, and shortens the timeout.
    let proxy = Proxy::start(&[
        "-c",
        &conf.to_string_lossy(),
        "-u",
        &upstream,
        "--on-activate",
        &hook,
        "--on-timeout",
        &hook,
        "-t",
        "1s",
        "--hook-timeout",
        "20s",
    ]);

    // The first client starts the office, and only gets through once its
    // port answers.
    let first = session(&proxy);
    assert_eq!(starts(&dir), [first], "the first client starts the office");

    // Activations 1..=19 reuse it.
    for k in 2..=20 {
        assert_eq!(
            session(&proxy),
            first,
            "client {k} served by the first office"
        );
    }
    assert_eq!(starts(&dir).len(), 1);

    // Activation 20 (the 21st client) restarts it; the old one is gone.
    let second = session(&proxy);
    assert_ne!(second, first, "client 21 should get a fresh office");
    assert_eq!(starts(&dir), [first, second]);
    assert!(
        wait_until(WAIT, || not_running(first)),
        "old office {first} still running: {:?}",
        proc_state(first)
    );

    // A connection overstays its timeout: the on-timeout hook restarts.
    let mut stuck = proxy.connect();
    assert_eq!(greeting(&mut stuck), second);
    proxy.expect_log(closed_with(22, "timeout"), "client 22 timed out");
    let timeout_hook = proxy.expect_log(
        |l: &str| is_event(l, "hook_started") && field(l, "kind").as_deref() == Some("timeout"),
        "on-timeout hook",
    );
    let hook_id = num_field(&timeout_hook, "hook");
    let exited = proxy.expect_log(
        move |l: &str| is_event(l, "hook_exited") && num_field(l, "hook") == hook_id,
        "on-timeout hook exit",
    );
    assert_eq!(
        field(&exited, "status").as_deref(),
        Some("exit 0"),
        "{exited}"
    );
    let after_timeout = starts(&dir);
    assert_eq!(after_timeout.len(), 3, "restarted after the timeout");
    let third = after_timeout[2];
    assert!(
        wait_until(WAIT, || not_running(second)),
        "office {second} still running after the timeout restart"
    );

    // The next activation sees LAST_OUTCOME=timeout but the restart already
    // happened: no second restart.
    assert_eq!(session(&proxy), third);
    assert_eq!(starts(&dir).len(), 3);

    let reasons: Vec<String> = proxy
        .logs()
        .into_iter()
        // Hook output is logged as `event=output line="..."`.
        .filter_map(|l| field(&l, "line"))
        .filter(|l| l.starts_with("restart-office: starting office"))
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[0].contains("(not running)"), "{reasons:?}");
    assert!(
        reasons[1].contains("(20 connections served)"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("(a connection timed out)"),
        "{reasons:?}"
    );
    assert_eq!(proxy.count_logs(event("hook_failed")), 0);
}
