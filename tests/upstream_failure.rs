//! The upstream is down: each client is closed (connect_failed) and the
//! permit moves on; once the upstream is back the next client works, and if
//! it goes away again the failure is reported again.
mod common;

use common::*;
use std::thread;
use std::time::Duration;

#[test]
fn upstream_down_then_back_then_down() {
    let port = unused_port();
    let target = format!("127.0.0.1:{port}");
    let proxy = Proxy::start(&["-u", &target, "-n", "1", "--connect-timeout", "2s"]);

    // Three clients at once while nothing listens: each one fails in turn.
    let clients: Vec<_> = (0..3)
        .map(|i| {
            let addr = proxy.addr();
            thread::spawn(move || {
                let mut s = connect(addr);
                if let Err(e) = expect_closed(&mut s, Duration::from_secs(8)) {
                    panic!("client {i}: not closed while the upstream is down: {e}");
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
    for conn in 1..=3 {
        let line = proxy.expect_log(conn_event("connect_failed", conn), "connect_failed");
        assert!(
            field(&line, "error").is_some_and(|e| !e.is_empty()),
            "error= missing: {line}"
        );
        proxy.expect_log(
            closed_with(conn, "connect_failed"),
            "closed outcome=connect_failed",
        );
    }

    // The upstream comes back on the same port.
    let up = Upstream::echo_on(&target)
        .unwrap_or_else(|e| panic!("could not rebind {target} for the upstream stand-in: {e}"));
    let mut s = proxy.connect();
    roundtrip(&mut s, b"back again\n");
    finish(s);
    proxy.expect_log(closed_with(4, "ok"), "closed conn=4 outcome=ok");
    assert_eq!(up.accepted(), 1);

    // And goes away again.
    drop(up);
    let mut s = proxy.connect();
    expect_closed(&mut s, Duration::from_secs(8))
        .unwrap_or_else(|e| panic!("not closed after the upstream went away again: {e}"));
    proxy.expect_log(
        closed_with(5, "connect_failed"),
        "closed conn=5 outcome=connect_failed",
    );
}

/// An upstream whose listen backlog is full never completes a handshake:
/// `--connect-timeout` must give up on it, close the client with
/// connect_failed, and pass the permit on.
#[test]
fn connect_timeout_gives_up_on_an_upstream_that_never_answers() {
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;

    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let target = silent.local_addr().expect("addr");
    // Fill the backlog (never accepted) until a connect no longer completes.
    let mut fillers = Vec::new();
    let mut full = false;
    for _ in 0..2000 {
        match TcpStream::connect_timeout(&target, Duration::from_millis(300)) {
            Ok(s) => fillers.push(s),
            Err(_) => {
                full = true;
                break;
            }
        }
    }
    assert!(full, "could not fill the backlog of the silent upstream");

    let proxy = Proxy::start(&[
        "-u",
        &target.to_string(),
        "-n",
        "1",
        "--connect-timeout",
        "500ms",
    ]);
    let t = Instant::now();
    let mut first = proxy.connect();
    let mut second = proxy.connect();
    expect_closed(&mut first, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("first client not closed by --connect-timeout 500ms: {e}"));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "gave up after only {took:?}"
    );
    proxy.expect_log(conn_event("connect_failed", 1), "connect_failed conn=1");
    proxy.expect_log(
        closed_with(1, "connect_failed"),
        "closed conn=1 outcome=connect_failed",
    );
    // The permit moved on: the second client gets its own attempt.
    expect_closed(&mut second, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("second client not closed by --connect-timeout: {e}"));
    proxy.expect_log(
        closed_with(2, "connect_failed"),
        "closed conn=2 outcome=connect_failed",
    );
    drop(fillers);
}
