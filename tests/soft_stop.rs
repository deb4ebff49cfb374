//! `--shutdown-queue serve`: a stop closes the listener at once (a new
//! tcplock can bind the port) and keeps serving the waiting clients in order
//! until the queue is empty or the grace runs out; a second stop is immediate.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// Connects `n` clients that queue behind a holder, each having sent its
/// line already; returns them in accept order (ids 2, 3, ...).
fn queue_clients(proxy: &Proxy, n: u64) -> Vec<(TcpStream, Vec<u8>)> {
    (2..2 + n)
        .map(|id| {
            let mut c = proxy.connect();
            let line = format!("client {id}\n").into_bytes();
            c.write_all(&line).expect("write while queued");
            proxy.expect_log(conn_event("accepted", id), "queued client");
            (c, line)
        })
        .collect()
}

/// tcplock with one permit that serves its queue for up to `grace` on a stop.
fn serving(upstream: &Upstream, grace: &str) -> Proxy {
    Proxy::start(&[
        "-u",
        &upstream.arg(),
        "--shutdown-queue",
        "serve",
        "--shutdown-grace",
        grace,
        "--log-level",
        "debug",
    ])
}

#[test]
fn serve_activates_the_waiting_in_order_while_a_new_tcplock_binds_the_port() {
    let upstream = Upstream::recording();
    let mut proxy = serving(&upstream, "60s");
    let mut holder = proxy.connect();
    roundtrip(&mut holder, b"client 1\n");
    let queued = queue_clients(&proxy, 5);

    proxy.signal("TERM");
    let shutdown = proxy.expect_log(event("shutdown_started"), "shutdown");
    assert_eq!(num_field(&shutdown, "queued"), 5, "{shutdown}");
    assert_eq!(num_field(&shutdown, "active"), 1, "{shutdown}");

    // The port is free at once: a new tcplock binds it while the old one
    // still serves its line.
    let listen = proxy.addr().to_string();
    let successor = Proxy::start_raw(&["-l", &listen, "-u", &upstream.arg()]);
    let mut fresh = successor.connect();
    roundtrip(&mut fresh, b"client of the new one\n");
    finish(fresh);

    finish(holder);
    for (mut c, line) in queued {
        let echo = read_n(&mut c, line.len()).expect("served after the stop");
        assert_eq!(echo, line);
        finish(c);
    }
    let status = proxy.wait_exit(WAIT).expect("exit once the line is served");
    assert_eq!(status.code(), Some(0), "{status:?}");
    let done = proxy.expect_log(event("shutdown_done"), "shutdown_done");
    assert_eq!(num_field(&done, "served"), 5, "{done}");
    assert_eq!(num_field(&done, "closed"), 0, "{done}");
    let old: Vec<String> = upstream
        .records()
        .into_iter()
        .filter(|r| r.starts_with("client ") && !r.contains("new one"))
        .collect();
    let expected: Vec<String> = (1..=6).map(|i| format!("client {i}")).collect();
    assert_eq!(old, expected, "served out of order");
}

#[test]
fn serve_closes_the_rest_when_the_grace_runs_out() {
    let upstream = Upstream::echo();
    let mut proxy = serving(&upstream, "1s");
    let mut stubborn = proxy.connect();
    roundtrip(&mut stubborn, b"never closing\n");
    let queued = queue_clients(&proxy, 3);

    let sent = Instant::now();
    proxy.signal("TERM");
    let status = proxy.wait_exit(WAIT).expect("exit after the grace");
    let took = sent.elapsed();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(took >= Duration::from_millis(900), "exited after {took:?}");
    for ((mut c, _), id) in queued.into_iter().zip(2..) {
        let (_, data) = expect_closed(&mut c, WAIT).expect("closed at the grace");
        assert!(data.is_empty(), "client {id} was served");
        assert_eq!(
            proxy.count_logs(closed_with(id, "shutdown")),
            1,
            "client {id}"
        );
    }
    expect_closed(&mut stubborn, WAIT).expect("the holder is cut too");
    let done = proxy.expect_log(event("shutdown_done"), "shutdown_done");
    assert_eq!(num_field(&done, "served"), 0, "{done}");
    assert_eq!(num_field(&done, "closed"), 3, "{done}");
    assert_eq!(upstream.accepted(), 1);
}

#[test]
fn a_second_sigterm_stops_a_serving_shutdown_at_once() {
    let upstream = Upstream::echo();
    let mut proxy = serving(&upstream, "60s");
    let mut stubborn = proxy.connect();
    roundtrip(&mut stubborn, b"never closing\n");
    let mut queued = queue_clients(&proxy, 2);

    proxy.signal("TERM");
    proxy.expect_log(event("shutdown_started"), "shutdown");
    // Still serving: the waiting client is kept, not closed.
    let (c, _) = &mut queued[0];
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("read timeout");
    let mut byte = [0u8; 1];
    let kept = matches!(c.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        || e.kind() == std::io::ErrorKind::TimedOut);
    assert!(kept, "a waiting client was closed by the first stop");

    let sent = Instant::now();
    proxy.signal("TERM");
    let status = proxy.wait_exit(WAIT).expect("exit on the second signal");
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "second signal took {:?}",
        sent.elapsed()
    );
    assert!(status.code().is_some(), "exited by itself: {status:?}");
    proxy.expect_log(event("shutdown_forced"), "shutdown_forced");
    for (mut c, _) in queued {
        expect_closed(&mut c, WAIT).expect("closed by the second stop");
    }
    expect_closed(&mut stubborn, WAIT).expect("holder closed");
}
