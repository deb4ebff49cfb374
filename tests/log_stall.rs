//! A stderr nobody drains (a stuck journald or container log pipe) must not
//! stop the proxy: log lines wait in a bounded buffer, the overflow is dropped
//! and counted, and the count is logged once stderr takes lines again.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;

use common::{BIN, IO_TIMEOUT, Upstream, WAIT, connect, field, roundtrip, wait_until};

#[test]
fn a_stalled_stderr_costs_log_lines_not_service() {
    let upstream = Upstream::echo();
    let mut child = Command::new(BIN)
        .args([
            "-l",
            "127.0.0.1:0",
            "-u",
            &upstream.arg(),
            "--log-level",
            "debug",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tcplock");
    let mut stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
    let mut first = String::new();
    stderr
        .read_line(&mut first)
        .expect("read the listening line");
    let addr: std::net::SocketAddr = field(&first, "addr")
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no listening address in {first:?}"));

    // Nobody reads stderr from here on. About 350 bytes of log per client
    // (debug), so 2000 clients write about 700 KiB: far past the pipe's
    // 64 KiB and the log buffer's 256 KiB behind it.
    const CLIENTS: usize = 2000;
    for i in 0..CLIENTS {
        let mut client = connect(addr);
        client.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        roundtrip(&mut client, format!("client {i}").as_bytes());
    }

    // Drain stderr now: the dropped lines are counted in the first line that
    // fits once the buffer has room again.
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = Arc::clone(&lines);
    let reader = thread::spawn(move || {
        for line in stderr.lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line);
        }
    });
    let dropped_line = || {
        lines
            .lock()
            .unwrap()
            .iter()
            .find(|line| line.contains("event=log_dropped"))
            .cloned()
    };
    let mut more = 0;
    let reported = wait_until(WAIT, || {
        // Each client writes more lines, the first of which carries the count.
        let mut client = connect(addr);
        roundtrip(&mut client, b"one more");
        more += 1;
        dropped_line().is_some()
    });
    let line = dropped_line();
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    assert!(reported, "no event=log_dropped after {more} more clients");
    let line = line.unwrap_or_default();
    assert!(line.contains("level=warn"), "{line}");
    let lines: u64 = field(&line, "lines")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no lines=N in {line}"));
    assert!(lines > 0, "{line}");
}
